"""imgstore diff: files, metadata, symlinks, kernel and boot parameters, Debian packages; from manifests only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Cli, disk_state
from treeutil import IS_ROOT

from imgstore import commit, diff
from imgstore.manifest import DIR, FILE, Entry
from imgstore.store import Store

PROFILE = """
[commit]
require_kernel = true
[boot]
append = "root=/dev/nfs nfsroot={nfs_server}:{root} ro"
[deploy]
tftp_root = "tftp"
"""

STATUS_1 = """\
Package: adduser
Status: install ok installed
Priority: important
Architecture: all
Version: 3.134
Description: add and remove users and groups
 This package includes the 'adduser' and 'deluser' commands.
 .
 Package: not-a-package (a continuation line)

Package: curl
Status: install ok installed
Architecture: amd64
Version: 7.88.1-10+deb12u4

Package: libc6
Status: install ok installed
Architecture: amd64
Multi-Arch: same
Version: 2.36-9+deb12u3

Package: libc6
Status: install ok installed
Architecture: i386
Multi-Arch: same
Version: 2.36-9+deb12u3

Package: oldpkg
Status: install ok installed
Architecture: amd64
Version: 1.0-1

Package: rcpkg
Status: deinstall ok config-files
Architecture: amd64
Version: 0.5

Package: downpkg
Status: install ok installed
Architecture: amd64
Version: 2.0-1

Package: heldpkg
Status: hold ok installed
Architecture: amd64
Version: 5.0

Package: fonts-x
Status: install ok installed
Architecture: all
Version: 1.0
"""

STATUS_2 = """\
Package: adduser
Status: install ok installed
Priority: important
Architecture: all
Version: 3.134

Package: curl
Status: install ok installed
Architecture: amd64
Version: 7.88.1-10+deb12u5

Package: libc6
Status: install ok installed
Architecture: amd64
Multi-Arch: same
Version: 2.36-9+deb12u4

Package: newpkg
Status: install ok installed
Architecture: amd64
Version: 0.1~rc1-1

Package: halfpkg
Status: install reinstreq half-installed
Architecture: amd64
Version: 3.0

Package: downpkg
Status: install ok installed
Architecture: amd64
Version: 1.9-1

Package: heldpkg
Status: hold ok installed
Architecture: amd64
Version: 5.0

Package: fonts-x
Status: install ok installed
Architecture: amd64
Version: 1.1
"""

FIXED = 1_700_000_000_000_000_000


def _fix_dir_times(root: Path) -> None:
    """Directories get a fixed mtime, so the only mtime changes are the ones a test makes."""
    for dirpath, _dirs, _files in os.walk(root):
        os.utime(dirpath, ns=(FIXED, FIXED))


def _v1(root: Path) -> None:
    for d in ("etc", "boot", "usr/bin", "var/log", "var/lib/dpkg"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/motd").write_text("one\n")
    (root / "etc/config").write_text("key = value\n")
    (root / "etc/touched").write_text("same content\n")
    (root / "etc/xattr-file").write_text("x\n")
    (root / "etc/owned").write_text("o\n")
    (root / "var/log/old.log").write_bytes(b"l" * 100)
    (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\n")
    (root / "usr/bin/tool").chmod(0o755)
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-alias")
    (root / "big.bin").write_bytes(os.urandom(2 << 20))  # a loose object
    os.symlink("target-a", root / "link")
    (root / "boot/vmlinuz-6.1.0-27-amd64").write_bytes(b"K27" * 1000)
    (root / "boot/initrd.img-6.1.0-27-amd64").write_bytes(b"I27" * 1000)
    (root / "var/lib/dpkg/status").write_text(STATUS_1)
    _fix_dir_times(root)


def _v2(root: Path) -> None:
    (root / "etc/new.conf").write_bytes(b"0123456789")
    (root / "var/log/old.log").unlink()
    (root / "etc/motd").write_text("two, longer\n")
    (root / "etc/config").chmod(0o600)
    os.setxattr(root / "etc/xattr-file", "user.origin", b"diff-test")
    st = os.stat(root / "etc/touched")
    os.utime(root / "etc/touched", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    if IS_ROOT:
        os.chown(root / "etc/owned", 1000, 1000)
    (root / "big.bin").write_bytes(os.urandom(3 << 20))
    (root / "link").unlink()
    os.symlink("target-b", root / "link")
    for f in ("vmlinuz", "initrd.img"):
        (root / f"boot/{f}-6.1.0-27-amd64").unlink()
    (root / "boot/vmlinuz-6.1.0-28-amd64").write_bytes(b"K28" * 1000)
    (root / "boot/initrd.img-6.1.0-28-amd64").write_bytes(b"I28" * 1000)
    (root / "var/lib/dpkg/status").write_text(STATUS_2)
    _fix_dir_times(root)


@pytest.fixture
def two_gens(store: Store, tmp_path: Path) -> Store:
    """web@1 and web@2 of a chroot that changed in every way diff reports."""
    prof = store.profiles_dir / "web.toml"
    prof.write_text(PROFILE)
    tree = tmp_path / "chroot"
    _v1(tree)
    assert commit.commit(store, tree, "web", "one").generation.ref == "web@1"
    _v2(tree)
    prof.write_text(PROFILE.replace(" ro\"", " ro quiet\""))
    assert commit.commit(store, tree, "web", "two").generation.ref == "web@2"
    return store


def _by_path(d: diff.GenDiff) -> dict[bytes, tuple[str, tuple[str, ...]]]:
    return {f.path: (f.change, f.fields) for f in d.files}


def test_diff_reports_every_kind_of_change(two_gens: Store) -> None:
    d = diff.diff(two_gens, "web@1", "web@2")
    got = _by_path(d)
    want = {
        b"etc/new.conf": ("added", ()),
        b"var/log/old.log": ("removed", ()),
        b"etc/motd": ("modified", ("content", "mtime")),
        b"big.bin": ("modified", ("content", "mtime")),
        b"etc/config": ("metadata", ("mode",)),
        b"etc/xattr-file": ("metadata", ("xattrs",)),
        b"etc/touched": ("mtime", ("mtime",)),
        b"link": ("symlink", ("target", "mtime")),
        b"boot/vmlinuz-6.1.0-27-amd64": ("removed", ()),
        b"boot/initrd.img-6.1.0-27-amd64": ("removed", ()),
        b"boot/vmlinuz-6.1.0-28-amd64": ("added", ()),
        b"boot/initrd.img-6.1.0-28-amd64": ("added", ()),
        b"var/lib/dpkg/status": ("modified", ("content", "mtime")),
    }
    if IS_ROOT:
        want[b"etc/owned"] = ("metadata", ("owner",))
    assert got == want
    # Unchanged paths (the hardlink pair, directories with fixed times) are not listed at all.
    assert b"usr/bin/tool-alias" not in got and b"etc" not in got
    motd = next(f for f in d.files if f.path == b"etc/motd")
    assert (motd.size_a, motd.size_b) == (4, 12)
    link = next(f for f in d.files if f.path == b"link")
    assert (link.target_a, link.target_b) == (b"target-a", b"target-b")
    s = d.summary()
    assert (s["added"], s["removed"], s["modified"], s["symlinks"], s["mtime_only"]) == (3, 3, 3, 1, 1)
    assert s["metadata"] == (3 if IS_ROOT else 2)
    assert s["bytes_added"] == 10 + 3000 + 3000 and s["bytes_removed"] == 100 + 3000 + 3000
    assert s["delta"] == s["size_b"] - s["size_a"] == 10 - 100 + 8 + (1 << 20) + len(STATUS_2) - len(STATUS_1)

    assert [(b.what, b.old, b.new) for b in d.boot] == [
        ("kernel", "vmlinuz-6.1.0-27-amd64", "vmlinuz-6.1.0-28-amd64"),
        ("initrd", "initrd.img-6.1.0-27-amd64", "initrd.img-6.1.0-28-amd64"),
        ("append", "root=/dev/nfs nfsroot={nfs_server}:{root} ro",
         "root=/dev/nfs nfsroot={nfs_server}:{root} ro quiet"),
    ]
    assert [(p.package, p.change, p.old, p.new) for p in d.packages] == [
        ("curl", "upgraded", "7.88.1-10+deb12u4", "7.88.1-10+deb12u5"),
        ("downpkg", "downgraded", "2.0-1", "1.9-1"),
        ("fonts-x", "upgraded", "1.0", "1.1"),  # arch all -> amd64 is an upgrade, not remove + install
        ("libc6:amd64", "upgraded", "2.36-9+deb12u3", "2.36-9+deb12u4"),
        ("libc6:i386", "removed", "2.36-9+deb12u3", None),
        ("newpkg", "installed", None, "0.1~rc1-1"),
        ("oldpkg", "removed", "1.0-1", None),
    ]
    assert (d.packages_a, d.packages_b) == (8, 7)  # held counts, config-files and half-installed do not


def test_diff_reads_no_content_objects(two_gens: Store) -> None:
    """Only the manifests and dpkg status are read: the loose objects of big.bin can be gone."""
    loose = list((two_gens.root / "objects").rglob("*"))
    files = [p for p in loose if p.is_file()]
    assert len(files) == 2, files  # big.bin of each generation; everything else is packed
    for p in files:
        p.unlink()
    d = diff.diff(two_gens, "web@1", "web@2")
    big = next(f for f in d.files if f.path == b"big.bin")
    assert big.change == "modified" and big.size_b - big.size_a == 1 << 20


def test_diff_cli_summary_files_and_json(two_gens: Store, cli: Cli) -> None:
    r = cli("diff", "web@-1", "web@latest")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "web@1" in out and "web@2" in out
    assert "3 added (+6.0 kB), 3 removed (-6.1 kB), 3 modified (+1.0 MB), 1 symlinks retargeted" in out
    assert "kernel    vmlinuz-6.1.0-27-amd64 -> vmlinuz-6.1.0-28-amd64" in out
    assert "append" in out and "ro quiet" in out
    assert "  ^ curl 7.88.1-10+deb12u4 -> 7.88.1-10+deb12u5" in out
    assert "  + newpkg 0.1~rc1-1" in out and "  - oldpkg 1.0-1" in out and "  v downpkg 2.0-1 -> 1.9-1" in out
    assert "L /link  target-a -> target-b" in out
    assert "/etc/new.conf" not in out  # the path list needs --files

    r = cli("diff", "web@1", "2", "--files")  # B takes A's profile
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "A /etc/new.conf  10 B" in lines
    assert "D /var/log/old.log  100 B" in lines
    assert "t /etc/touched  (mtime)" in lines
    assert "m /etc/config  (mode)" in lines
    assert any(line.startswith("M /big.bin  +1.0 MB") for line in lines)

    r = cli("diff", "web@1", "web@2", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["a"] == "web@1" and data["b"] == "web@2" and data["identical"] is False
    assert data["summary"]["added"] == 3 and data["summary"]["packages_upgraded"] == 3
    paths = {f["path"]: f for f in data["files"]}
    assert paths["/etc/motd"]["delta"] == 8 and paths["/link"]["target_b"] == "target-b"
    assert {p["package"] for p in data["packages"]} >= {"curl", "newpkg", "libc6:i386"}
    assert [b["what"] for b in data["boot"]] == ["kernel", "initrd", "append"]


def test_diff_identical_and_reversed(two_gens: Store, cli: Cli) -> None:
    r = cli("diff", "web@2", "web@2")
    assert r.returncode == 0 and "identical" in r.stdout
    back = diff.diff(two_gens, "web@2", "web@1")
    assert {p.package: p.change for p in back.packages}["newpkg"] == "removed"
    assert {p.package: p.change for p in back.packages}["downpkg"] == "upgraded"
    assert back.summary()["added"] == 3 and back.summary()["removed"] == 3


def test_diff_without_dpkg_and_odd_names(store: Store, tmp_path: Path) -> None:
    (store.profiles_dir / "t.toml").write_text("[commit]\nrequire_kernel = false\n")
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "a").write_text("a")
    commit.commit(store, tree, "t", no_kernel=True)
    os.mkdir(tree / "d")
    (tree / os.fsdecode(b"d/\xff-latin")).write_text("x")  # not UTF-8
    (tree / "d/new\nline").write_text("y")
    os.utime(tree / "d", ns=(FIXED, FIXED))
    os.utime(tree, ns=(FIXED, FIXED))
    commit.commit(store, tree, "t", no_kernel=True)
    d = diff.diff(store, "t@1", "t@2")
    assert not d.packages_known and d.as_dict()["packages"] is None
    shown = {f.as_dict()["path"]: f.change for f in d.files}
    assert shown == {"/": "mtime", "/d": "added", "/d/%FF-latin": "added", "/d/new\nline": "added"}
    json.dumps(d.as_dict(), ensure_ascii=False).encode("utf-8")  # printable as UTF-8 JSON


def test_diff_type_change_and_hardlinks() -> None:
    def e(path: bytes, t: str, **kw: object) -> Entry:
        return Entry(path=path, type=t, mode=0o644, uid=0, gid=0, mtime_ns=1, **kw)  # type: ignore[arg-type]

    h1, h2 = "1" * 64, "2" * 64
    a = [e(b".", DIR), e(b"f", FILE, size=5, digest=h1), e(b"g", "h", target=b"f"), e(b"x", FILE, digest=h1),
         e(b"y", "l", target=b"t")]
    b = [e(b".", DIR), e(b"f", FILE, size=6, digest=h2), e(b"g", "h", target=b"f"), e(b"x", "h", target=b"f"),
         e(b"y", FILE, digest=h1)]
    got = {c.path: (c.change, c.fields) for c in diff.compare(a, b)}
    assert got == {
        b"f": ("modified", ("content",)),
        b"g": ("modified", ("content",)),  # the hardlink's content is its first link's
        b"x": ("modified", ("content", "hardlink")),
        b"y": ("modified", ("type",)),
    }


def test_diff_rejects_unordered_manifest() -> None:
    a = [Entry(path=p, type=DIR, mode=0o755, uid=0, gid=0, mtime_ns=0) for p in (b".", b"b", b"a")]
    from imgstore.errors import IntegrityError

    with pytest.raises(IntegrityError, match="not in manifest order"):
        diff.compare(a, a)


VERSION_PAIRS = [
    ("1.0", "1.0"), ("1.0~rc1", "1.0"), ("1.0", "1.0+b1"), ("1:0.9", "2.0"), ("1.0-1", "1.0-2"),
    ("1.0a", "1.0"), ("2.36-9", "2.36-9+deb12u4"), ("7.88.1-10+deb12u4", "7.88.1-10+deb12u5"),
    ("1.0~~", "1.0~"), ("1.0~", "1.0"), ("0.1~rc1-1", "0.1-1"), ("1.2.3", "1.2.10"), ("1.002", "1.2"),
    ("2:1", "1:9"), ("1.0-0", "1.0"), ("a", "b"), ("1.0+dfsg-1", "1.0-1"), ("9", "10"), ("1.0.", "1.0"),
    ("3.0-1ubuntu1", "3.0-1"), ("1.0-1~bpo12+1", "1.0-1"), ("20230101", "20221231"), ("1:1.0", "1.0"),
]


def test_version_order_matches_dpkg() -> None:
    dpkg = shutil.which("dpkg")
    if dpkg is None:
        pytest.skip("dpkg is not installed")
    for a, b in VERSION_PAIRS:
        mine = diff.compare_versions(a, b)
        ours = "lt" if mine < 0 else "eq" if mine == 0 else "gt"
        r = subprocess.run([dpkg, "--compare-versions", a, ours, b])
        assert r.returncode == 0, f"{a} {ours} {b} is not what dpkg says"


def test_diff_bad_references_change_nothing(two_gens: Store, cli: Cli) -> None:
    before = disk_state(two_gens.root)
    r = cli("diff", "web@1", "web@9")
    assert r.returncode == 3 and "no generation 'web@9'" in r.stderr and "Traceback" not in r.stderr
    r = cli("diff", "nosuch@1", "web@1")
    assert r.returncode == 3, r.stderr
    assert disk_state(two_gens.root) == before


@pytest.mark.slow
def test_diff_is_a_merge_walk_fast_on_large_manifests() -> None:
    """200,000 entries with 1% changed: one pass, no quadratic work."""
    def tree(changed: int) -> list[Entry]:
        es = [Entry(path=b".", type=DIR, mode=0o755, uid=0, gid=0, mtime_ns=0)]
        for d in range(400):
            es.append(Entry(path=b"d%04d" % d, type=DIR, mode=0o755, uid=0, gid=0, mtime_ns=0))
            for f in range(500):
                n = d * 500 + f
                digest = ("%064x" % (n + (10**9 if n % 100 == 0 and changed else 0)))
                es.append(Entry(path=b"d%04d/f%04d" % (d, f), type=FILE, mode=0o644, uid=0, gid=0, mtime_ns=n,
                                size=n, digest=digest))
        return es

    a, b = tree(0), tree(1)
    t0 = time.monotonic()
    changes = diff.compare(a, b)
    elapsed = time.monotonic() - t0
    assert len(changes) == 2000
    assert elapsed < 10, f"compare of 2 x {len(a):,} entries took {elapsed:.1f} s"


def test_merge_key_orders_like_the_manifest() -> None:
    """The walk's key ('/' as NUL) sorts paths exactly as manifest.sort_key does."""
    import random

    from imgstore.manifest import sort_key

    rng = random.Random(7)
    alphabet = [b"a", b"b", b"-", b".", b"\x01", b"\xff", b" ", b"z", b"0"]
    paths = {b"/".join(b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3)))
                       for _ in range(rng.randint(1, 4))) for _ in range(3000)}
    paths = {p for p in paths if all(part not in (b".", b"..") for part in p.split(b"/"))}
    by_manifest = sorted(paths, key=sort_key)
    assert by_manifest == sorted(paths, key=lambda p: p.replace(b"/", b"\0"))
