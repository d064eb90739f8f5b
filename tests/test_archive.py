"""export (tar, squashfs, dir) and import: exact round trips, reproducible bytes, hostile archives refused."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from conftest import Cli, disk_state
from test_deploy import PROFILE, _chroot
from treeutil import IS_ROOT, diff_snapshots, make_nasty_tree, snapshot

from imgstore import commit
from imgstore.store import Store

PLAIN = "[commit]\ndefault_excludes = false\nrequire_kernel = false\n[deploy]\ntftp_root = \"tftp\"\n"
GNU_TAR_X = ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"]


def _init(cli: Cli, root: Path, profiles: dict[str, str]) -> None:
    r = cli("init", root=root)
    assert r.returncode == 0, r.stderr
    for name, body in profiles.items():
        (root / "profiles" / f"{name}.toml").write_text(body)


def _gen_id(cli: Cli, ref: str, root: Path | None = None) -> str:
    r = cli("show", ref, "--json", root=root)
    assert r.returncode == 0, r.stderr
    return str(json.loads(r.stdout)["gen_id"])


def _commit(cli: Cli, tree: Path, profile: str, *extra: str) -> str:
    r = cli("commit", tree, "-p", profile, *extra, "--json")
    assert r.returncode == 0, r.stderr
    return str(json.loads(r.stdout)["generation"]["gen_id"])


def _state(store: Path) -> tuple[dict[str, object], list[str]]:
    """disk_state of a store, and apart from it the audit trail's rows (failed work is logged by design)."""
    state = disk_state(store)
    rows = state.pop("<database>")
    assert isinstance(rows, list)
    state["<database>"] = [x for x in rows if not x.startswith('INSERT INTO "events"')]
    return state, [x for x in rows if x.startswith('INSERT INTO "events"')]


def _simple_tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("www3\n")
    (root / "big.bin").write_bytes(os.urandom(3 << 20))  # a loose object
    (root / "etc/odd name\twith tab").write_text("x")
    os.symlink("etc/hostname", root / "link")
    os.utime(root / "etc/hostname", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return root


@pytest.fixture
def simple(tmp_path: Path, cli: Cli) -> Path:
    """A store with t@1, a small tree committed as any user can."""
    store = tmp_path / "store"
    _init(cli, store, {"t": PLAIN})
    _commit(cli, _simple_tree(tmp_path / "tree"), "t", "--no-kernel")
    return store


@pytest.fixture(scope="module")
def nasty(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(store, tree, gen id): the nasty tree committed once as t@1, for the tests that only read it."""
    if not IS_ROOT:
        pytest.skip("needs root: owners, devices, security xattrs")
    base = tmp_path_factory.mktemp("nasty")
    store = Store.init(base / "store")
    for name in ("t", "u"):
        (store.profiles_dir / f"{name}.toml").write_text(PLAIN)
    tree = base / "tree"
    make_nasty_tree(tree)
    res = commit.commit(store, tree, "t", no_kernel=True)
    store.close()
    return store.root, tree, res.generation.gen_id


# -- round trips ------------------------------------------------------------------------------------
@pytest.mark.root
@pytest.mark.slow
def test_nasty_tree_export_import_roundtrip(nasty: tuple[Path, Path, str], tmp_path: Path, cli: Cli) -> None:
    store, tree, gen_id = nasty
    out = tmp_path / "exp" / "t1.tar.zst"
    out.parent.mkdir()
    r = cli("export", "t@1", out, root=store)
    assert r.returncode == 0, r.stderr
    assert f"as tar to {out}" in r.stdout

    # Into another profile with the same boot parameters: the very same generation id.
    r = cli("import", out, "--profile", "u", "--no-kernel", "--json", root=store)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["generation"]["gen_id"] == gen_id and res["created"] is True
    assert res["generation"]["message"] == "import t1.tar.zst"
    # Into a fresh store: the same again.
    store2 = tmp_path / "store2"
    _init(cli, store2, {"t": PLAIN})
    r = cli("import", out, "-p", "t", "--no-kernel", "-m", "from the DR site", root=store2)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("imported t@1 ") and _gen_id(cli, "t@1", store2) == gen_id

    # The imported generation checks out to exactly the original tree.
    co = tmp_path / "co"
    assert cli("checkout", "u@1", co, root=store).returncode == 0
    problems = diff_snapshots(snapshot(tree), snapshot(co))
    assert not problems, "\n".join(problems[:20])
    # No staging tree and no stat cache for it are left behind.
    for s in (store, store2):
        assert not [p for p in os.listdir(s) if p.startswith(".imgstore-tmp-")]
        assert not [p for p in os.listdir(s / "cache") if p.startswith("stat-u") or p.startswith("stat-t")
                    and "import" in p]
    assert len(os.listdir(store / "cache")) == 1  # only the commit of the real chroot keeps one
    assert os.listdir(store2 / "cache") == []

    # GNU tar reads the archive into the same exact tree...
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    r2 = subprocess.run([*GNU_TAR_X, os.fspath(out), "-I", "zstd", "-C", os.fspath(gnu)],
                        capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr
    problems = diff_snapshots(snapshot(tree), snapshot(gnu))
    assert not problems, "\n".join(problems[:20])
    # ...and an archive GNU tar makes of the tree imports as the same generation.
    gnu_tar = tmp_path / "gnu.tar"
    r2 = subprocess.run(["tar", "--format=pax", "--xattrs", "--xattrs-include=*", "--sparse", "--numeric-owner",
                         "-C", os.fspath(tree), "-cpf", os.fspath(gnu_tar), "."], capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr
    store3 = tmp_path / "store3"
    _init(cli, store3, {"t": PLAIN})
    r = cli("import", gnu_tar, "-p", "t", "--no-kernel", root=store3)
    assert r.returncode == 0, r.stderr
    assert _gen_id(cli, "t@1", store3) == gen_id


def test_kernel_generation_roundtrip(tmp_path: Path, cli: Cli) -> None:
    """Kernel and initrd are found in the imported tree as commit finds them: same id, same kernel."""
    store = tmp_path / "store"
    _init(cli, store, {"web": PROFILE})
    gen_id = _commit(cli, _chroot(tmp_path / "chroot", "hello\n"), "web")
    out = tmp_path / "web.tar"  # plain tar, no zstd
    assert cli("export", "web@1", out).returncode == 0
    assert tarfile.is_tarfile(out)
    store2 = tmp_path / "store2"
    _init(cli, store2, {"web": PROFILE})
    r = cli("import", out, "-p", "web", "--json", root=store2)
    assert r.returncode == 0, r.stderr
    g = json.loads(r.stdout)["generation"]
    assert g["gen_id"] == gen_id and g["kernel_name"] == "vmlinuz-6.1.0-28-amd64"
    assert g["meta"]["kernel_version"] == "6.1.0-28-amd64"


def test_tar_is_reproducible_and_readable(simple: Path, tmp_path: Path, cli: Cli) -> None:
    a, b, plain = tmp_path / "a.tar.zst", tmp_path / "b.tar.zst", tmp_path / "c.tar"
    for out in (a, b, plain):
        r = cli("export", "t@1", out)
        assert r.returncode == 0, r.stderr
    assert a.read_bytes() == b.read_bytes()
    # The zstd file holds exactly the plain tar stream.
    assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(a.read_bytes())).read() == plain.read_bytes()
    assert plain.stat().st_size % 10240 == 0
    with tarfile.open(plain) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert list(members)[:2] == [".", "./big.bin"]
    host = members["./etc/hostname"]
    assert host.pax_headers["mtime"] == "1600000000.123456789" and host.uname == "" and host.gname == ""
    assert members["./link"].issym() and members["./link"].linkname == "etc/hostname"
    assert members["./etc/odd name\twith tab"].isreg()
    # Importing the export into the profile it came from changes nothing: the same tree, the same id.
    r = cli("import", a, "-p", "t", "--no-kernel")
    assert r.returncode == 0 and "nothing changed" in r.stdout and "identical to t@1" in r.stdout, r.stderr
    # Nothing but the result is left in the output folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.zst", "b.tar.zst", "c.tar", "store", "tree"]


@pytest.mark.root
def test_tar_reproducible_for_nasty_tree(nasty: tuple[Path, Path, str], tmp_path: Path, cli: Cli) -> None:
    store = nasty[0]
    a, b = tmp_path / "a.tar.zst", tmp_path / "b.tar.zst"
    assert cli("export", "t@1", a, root=store).returncode == 0
    assert cli("export", "t@1", b, root=store).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(a.open("rb")), mode="r|") as tf:
        members = {m.name: m for m in tf}
    ping = members["./bin/ping"]
    assert ping.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == bytes.fromhex(
        "0000000200200000000000000000000000000000")
    assert members["./usr/sbin/perl-again"].islnk() and members["./usr/sbin/perl-again"].linkname == "./usr/bin/perl"
    assert members["./dev/sda"].isblk() and (members["./dev/sda"].devmajor, members["./dev/sda"].devminor) == (8, 0)
    assert members["./setuid"].mode == 0o4755
    sparse = members["./var-sparse.img"]
    assert sparse.sparse is not None and sparse.size == 1 << 30
    assert os.fsencode(os.path.basename(next(n for n in members if "latin1" in n))) == b"\xff\xfe-latin1-\xe9"
    assert a.stat().st_size < 8 << 20  # the 1 GiB sparse file is stored as its data only


@pytest.mark.root
@pytest.mark.slow
def test_squashfs_export_is_reproducible_and_complete(nasty: tuple[Path, Path, str], tmp_path: Path,
                                                      cli: Cli) -> None:
    if shutil.which("mksquashfs") is None:
        pytest.fail("mksquashfs is missing: apt-get install squashfs-tools (scripts/test.sh does)")
    store, tree, _gen = nasty
    a, b = tmp_path / "a.sqfs", tmp_path / "b.squashfs"
    r = cli("export", "t@1", a, "--json", root=store)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["format"] == "squashfs" and any("ACL" in w for w in res["warnings"])
    r = cli("export", "t@1", b, root=store)
    assert r.returncode == 0 and "squashfs cannot store POSIX ACLs" in r.stderr
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sqfs", "b.squashfs"]  # no temp tree left

    listing = subprocess.run(["unsquashfs", "-l", os.fspath(a)], capture_output=True, check=True).stdout
    listed = listing.split(b"\n")
    expected = [b"squashfs-root" + (b"" if p == b"." else b"/" + p) for p in sorted(snapshot(tree))]
    # One name holds a newline, which the listing shows as two lines.
    assert sorted(x for x in listed if x) == sorted(x for p in expected for x in p.split(b"\n"))

    unsq = tmp_path / "unsq"
    subprocess.run(["unsquashfs", "-q", "-d", os.fspath(unsq), os.fspath(a)], capture_output=True, check=True)
    want, got = snapshot(tree), snapshot(unsq)
    for snap in (want, got):  # what squashfs cannot keep: nanoseconds and POSIX ACLs
        for d in snap.values():
            d["mtime_ns"] //= 10**9
            d["xattrs"] = [x for x in d["xattrs"] if not x[0].startswith("system.posix_acl")]
    problems = diff_snapshots(want, got)
    assert not problems, "\n".join(problems[:20])


@pytest.mark.root
def test_dir_export_is_an_exact_checkout(nasty: tuple[Path, Path, str], tmp_path: Path, cli: Cli) -> None:
    store, tree, _gen = nasty
    out = tmp_path / "empty-dir"
    out.mkdir()  # an existing empty directory is fine
    r = cli("export", "t@1", out, root=store)
    assert r.returncode == 0 and "as dir" in r.stdout, r.stderr
    problems = diff_snapshots(snapshot(tree), snapshot(out))
    assert not problems, "\n".join(problems[:20])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty-dir"]


# -- hostile archives -------------------------------------------------------------------------------
def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"",
            link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.linkname, ti.mode = kind, len(data), link, 0o644
    return ti, data


def _odd(name: str, **fields: object) -> tuple[tarfile.TarInfo, bytes]:
    ti, data = _member(name, data=b"x")
    for k, v in fields.items():
        setattr(ti, k, v)
    return ti, data


HOSTILE = {
    "negative-owner": [_odd("neg", uid=-2)],
    "bad-mtime": [_odd("t", pax_headers={"mtime": "nan"})],
    "huge-mtime": [_odd("t", pax_headers={"mtime": "1e400"})],
    "dotdot": [_member("../evil", data=b"x")],
    "dotdot-inside": [_member("./a/", tarfile.DIRTYPE), _member("a/../../evil", data=b"x")],
    "absolute": [_member("/tmp/imgstore-test-evil", data=b"x")],
    "through-symlink": [_member("link", tarfile.SYMTYPE, link="/tmp"), _member("link/imgstore-test-evil", data=b"x")],
    "through-file": [_member("file", data=b"x"), _member("file/child", data=b"y")],
    "hardlink-out": [_member("ok", data=b"x"), _member("hl", tarfile.LNKTYPE, link="../../etc/passwd")],
    "hardlink-absolute": [_member("hl", tarfile.LNKTYPE, link="/etc/passwd")],
    "hardlink-forward": [_member("hl", tarfile.LNKTYPE, link="later"), _member("later", data=b"x")],
    "hardlink-to-dir": [_member("d", tarfile.DIRTYPE), _member("hl", tarfile.LNKTYPE, link="d")],
    "duplicate": [_member("twice", data=b"x"), _member("twice", data=b"y")],
    "file-over-dir": [_member("d/f", data=b"x"), _member("d", data=b"y")],
}


def _write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], zstd: bool) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in [_member("fine.txt", data=b"fine"), *members, _member("after.txt", data=b"after")]:
            tf.addfile(ti, io.BytesIO(data))
    raw = buf.getvalue()
    path.write_bytes(zstandard.ZstdCompressor().compress(raw) if zstd else raw)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_members_are_refused_before_anything_is_written(simple: Path, tmp_path: Path, cli: Cli,
                                                                 case: str) -> None:
    archive = tmp_path / f"{case}.tar.zst"
    _write_tar(archive, HOSTILE[case], zstd=case != "absolute")
    before, events = _state(simple)
    r = cli("import", archive, "-p", "t", "--no-kernel")
    assert r.returncode == 6, (r.returncode, r.stderr)
    assert r.stderr.startswith("imgstore: error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "nothing was written" in r.stderr
    after, events_after = _state(simple)
    assert after == before
    assert len(events_after) == len(events) + 1 and "'error 6'" in events_after[-1]  # only the audit trail
    assert not os.path.lexists(tmp_path / "evil") and not os.path.lexists("/tmp/imgstore-test-evil")
    assert not os.path.lexists(simple.parent / "evil")


# -- bad input ---------------------------------------------------------------------------------------
def test_export_bad_input_changes_nothing(simple: Path, tmp_path: Path, cli: Cli) -> None:
    outdir = tmp_path / "out"
    outdir.mkdir()
    existing = outdir / "there.tar.zst"
    existing.write_bytes(b"keep me")
    (outdir / "full").mkdir()
    (outdir / "full" / "x").write_text("x")
    before = disk_state(outdir)
    store_before, _events = _state(simple)
    cases = [
        (("export", "t@7", outdir / "x.tar.zst"), 3, "no generation 't@7'"),
        (("export", "nosuch@1", outdir / "x.tar.zst"), 3, "no generation"),
        (("export", "t@1", existing), 8, "already exists"),
        (("export", "t@1", outdir / "x.zip", "--format", "zip"), 2, "unknown export format 'zip'"),
        (("export", "t@1", outdir / "missing" / "x.tar.zst"), 3, "does not exist"),
        (("export", "t@1", outdir / "full"), 8, "not empty"),
        (("export", "t@1", outdir / "full", "--format", "tar"), 8, "is a directory"),
        (("export", "t@1", outdir / "x.tar.gz"), 2, "does not write gz archives"),
        (("import", outdir / "nope.tar.zst", "-p", "t"), 3, "does not exist"),
        (("import", existing, "-p", "t"), 6, "not a readable tar archive"),
        (("import", existing, "-p", "nosuch"), 3, "profile 'nosuch' does not exist"),
    ]
    for args, code, text in cases:
        r = cli(*args)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert text in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert disk_state(outdir) == before, args
        assert _state(simple)[0] == store_before, args
    assert existing.read_bytes() == b"keep me"

    # A tree without a kernel is refused before anything is written, unless --no-kernel.
    r = cli("export", "t@1", outdir / "nok.tar")
    assert r.returncode == 0, r.stderr
    before, store_before = disk_state(outdir), _state(simple)[0]
    r = cli("import", outdir / "nok.tar", "-p", "t")
    assert r.returncode == 3 and "no kernel in" in r.stderr and "--no-kernel" in r.stderr, r.stderr
    assert disk_state(outdir) == before and _state(simple)[0] == store_before

    r = cli("export", "t@1", existing, "--force")
    assert r.returncode == 0, r.stderr
    assert existing.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"


def test_truncated_archive_is_refused(simple: Path, tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "t.tar.zst"
    assert cli("export", "t@1", out).returncode == 0
    cut = tmp_path / "cut.tar.zst"
    cut.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    before, _events = _state(simple)
    r = cli("import", cut, "-p", "t", "--no-kernel")
    assert r.returncode == 6, r.stderr
    assert _state(simple)[0] == before


def test_export_with_missing_object_writes_nothing(simple: Path, tmp_path: Path, cli: Cli) -> None:
    loose = [p for p in (simple / "objects").rglob("*") if p.is_file()]
    assert len(loose) == 1  # big.bin
    loose[0].unlink()
    outdir = tmp_path / "out"
    outdir.mkdir()
    for name in ("x.tar.zst", "x.dir"):
        r = cli("export", "t@1", outdir / name)
        assert r.returncode == 6 and "missing" in r.stderr, r.stderr
    assert list(outdir.iterdir()) == []


# -- crashes ------------------------------------------------------------------------------------------
def test_import_crash_leaves_no_generation_and_staging_is_discarded(simple: Path, tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "t.tar.zst"
    assert cli("export", "t@1", out).returncode == 0
    (simple / "profiles" / "u.toml").write_text(PLAIN)

    # An unexpected error inside commit: the staging tree is removed on the way out.
    r = cli("import", out, "-p", "u", "--no-kernel", env={"IMGSTORE_FAULT": "commit.before-row"})
    assert r.returncode == 1 and "injected fault" in r.stderr, r.stderr
    assert not [p for p in os.listdir(simple) if p.startswith(".imgstore-tmp-")]

    # A power cut just before the database row: no generation, the staging tree stays behind...
    r = cli("import", out, "-p", "u", "--no-kernel", env={"IMGSTORE_FAULT": "commit.before-row:kill"})
    assert r.returncode == -9, r.stderr
    staging = [p for p in os.listdir(simple) if p.startswith(".imgstore-tmp-import-")]
    assert len(staging) == 1 and staging[0].endswith("-t.tar.zst")
    r = cli("generations", "-p", "u", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == []
    # ...until the next command that holds the lock discards it as left over from a crash.
    r = cli("gc")
    assert r.returncode == 0, r.stderr
    assert not [p for p in os.listdir(simple) if p.startswith(".imgstore-tmp-")]
    r = cli("import", out, "-p", "u", "--no-kernel", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["generation"]["gen_id"] == _gen_id(cli, "t@1")
