"""`imgstore status CHROOT`: what changed since the profile's latest generation, read-only, on real trees."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import blake3
import pytest
from conftest import Cli, disk_state, write_profile

from imgstore import commit
from imgstore.changes import ChangeReport, chroot_changes
from imgstore.store import Store

IS_ROOT = os.geteuid() == 0


def _tree(root: Path) -> Path:
    for d in ("etc", "usr/bin", "usr/share/doc/pkg", "var/log", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/motd").write_text("welcome\n")
    (root / "etc/hostname").write_text("www1\n")
    (root / "etc/keep").write_text("unchanged\n")
    (root / "usr/bin/tool").write_bytes(b"\x7fELF" + bytes(range(256)) * 20)
    (root / "usr/bin/tool").chmod(0o755)
    for i in range(20):
        (root / f"usr/share/doc/pkg/file{i}").write_text(f"doc {i}\n")
    (root / "var/log/old.log").write_text("log\n")
    os.symlink("hostname", root / "etc/link")
    return root


def _committed(store: Store, tmp_path: Path, name: str = "t") -> Path:
    write_profile(store.root, name)
    tree = _tree(tmp_path / "chroot")
    # The stat cache only trusts files whose ctime is older than the scan that recorded them, by a margin.
    time.sleep(1.1)
    commit.commit(store, tree, name, "base", no_kernel=True)
    return tree


def _kinds(rep: ChangeReport) -> dict[str, dict[str, tuple[str, ...]]]:
    return {k: {c.path: c.fields for c in rep.of(k)} for k in ("added", "removed", "modified", "metadata")}


def test_unchanged_tree_reads_nothing_and_writes_nothing(store: Store, tmp_path: Path) -> None:
    tree = _committed(store, tmp_path)
    before = disk_state(store.root)
    rep = chroot_changes(store, "t", tree)
    assert rep.clean, _kinds(rep)
    assert rep.hashed == 0 and rep.hashed_bytes == 0
    assert rep.base == "t@1" and rep.entries > 25
    assert disk_state(store.root) == before  # not even the stat cache is saved


def test_each_kind_of_change_is_told_apart(store: Store, tmp_path: Path) -> None:
    tree = _committed(store, tmp_path)
    (tree / "etc/new.conf").write_text("added\n")  # added
    (tree / "var/log/old.log").unlink()  # removed
    (tree / "etc/motd").write_text("welcome, changed\n")  # content and size
    # Same size, mtime put back: only reading the file can tell; the stat cache misses on ctime.
    tool = tree / "usr/bin/tool"
    st = tool.stat()
    data = bytearray(tool.read_bytes())
    data[100] ^= 0xFF
    tool.write_bytes(bytes(data))
    os.utime(tool, ns=(st.st_atime_ns, st.st_mtime_ns))
    (tree / "usr/share/doc/pkg/file1").chmod(0o600)  # mode
    os.utime(tree / "usr/share/doc/pkg/file2", ns=(1_000_000_000, 1_000_000_000))  # touch: mtime only
    os.setxattr(tree / "usr/share/doc/pkg/file3", "user.note", b"x")  # xattrs
    os.unlink(tree / "etc/link")
    os.symlink("motd", tree / "etc/link")  # symlink retarget
    (tree / "usr/share/doc/pkg/file4").unlink()
    (tree / "usr/share/doc/pkg/file4").mkdir()  # type change
    if IS_ROOT:
        os.chown(tree / "usr/share/doc/pkg/file5", 1234, 1234)  # owner

    rep = chroot_changes(store, "t", tree)
    k = _kinds(rep)
    assert k["added"] == {"/etc/new.conf": ()}
    assert k["removed"] == {"/var/log/old.log": ()}
    assert k["modified"]["/etc/motd"][0] == "content"
    assert k["modified"]["/usr/bin/tool"] == ("content",)
    assert k["modified"]["/usr/share/doc/pkg/file4"] == ("type",)
    meta = k["metadata"]
    assert meta["/usr/share/doc/pkg/file1"] == ("mode",)
    assert meta["/usr/share/doc/pkg/file2"] == ("mtime",)
    assert meta["/usr/share/doc/pkg/file3"] == ("xattrs",)
    assert meta["/etc/link"] == ("mtime", "target")
    if IS_ROOT:
        assert meta["/usr/share/doc/pkg/file5"] == ("owner",)
    # Directories whose entries came and went show their new mtime, nothing else.
    assert all(f == ("mtime",) for p, f in meta.items() if p in ("/etc", "/var/log", "/usr/share/doc/pkg"))
    untouched = {"/etc/keep", "/etc/hostname", "/usr/share/doc/pkg/file0", "/usr/share/doc/pkg/file9"}
    assert not untouched & set().union(*k.values())
    # Read: the same-size files whose stat changed (tool, file1-3, file5 when root); not motd (its size
    # already tells), not the other files.
    assert rep.hashed == (5 if IS_ROOT else 4)


def test_metadata_only_file_change_is_hashed_but_not_modified(store: Store, tmp_path: Path) -> None:
    tree = _committed(store, tmp_path)
    f = tree / "etc/hostname"
    f.write_text(f.read_text())  # rewritten with the same bytes: new mtime and ctime, same content
    rep = chroot_changes(store, "t", tree)
    assert _kinds(rep)["metadata"] == {"/etc/hostname": ("mtime",)} and not rep.modified
    assert rep.hashed == 1


def test_excludes_and_new_directories(store: Store, tmp_path: Path) -> None:
    tree = _committed(store, tmp_path)
    (tree / "tmp/scratch").write_text("excluded by default\n")
    deep = tree / "opt/app/lib"
    deep.mkdir(parents=True)
    for i in range(5):
        (deep / f"m{i}.py").write_text("x\n")
    rep = chroot_changes(store, "t", tree)
    added = [c.path for c in rep.added]
    assert added == ["/opt", "/opt/app", "/opt/app/lib"] + [f"/opt/app/lib/m{i}.py" for i in range(5)]
    assert rep.excluded >= 1
    from imgstore.changes import collapse

    assert [(c.path, n) for c, n in collapse(rep.added)] == [("/opt", 7)]


def test_before_the_first_commit_everything_is_added(store: Store, tmp_path: Path) -> None:
    write_profile(store.root, "t")
    tree = _tree(tmp_path / "chroot")
    rep = chroot_changes(store, "t", tree)
    assert rep.base is None and rep.added[0].path == "/" and len(rep.added) == rep.entries
    assert not (rep.removed or rep.modified or rep.metadata)


@pytest.mark.root
def test_device_node_renumbered(store: Store, tmp_path: Path) -> None:
    if not IS_ROOT:
        pytest.skip("mknod needs root")
    write_profile(store.root, "t")
    tree = _tree(tmp_path / "chroot")
    os.mknod(tree / "etc/null", 0o666 | 0o020000, os.makedev(1, 3))
    time.sleep(1.1)
    commit.commit(store, tree, "t", no_kernel=True)
    os.unlink(tree / "etc/null")
    os.mknod(tree / "etc/null", 0o666 | 0o020000, os.makedev(1, 5))
    os.utime(tree / "etc/null", ns=(0, 0))
    rep = chroot_changes(store, "t", tree)
    k = _kinds(rep)
    assert k["metadata"] == {"/etc": ("mtime",), "/etc/null": ("mtime", "device")}
    assert not (k["added"] or k["removed"] or k["modified"])


def test_cli_status_human_json_and_profile_resolution(tmp_path: Path, cli: Cli) -> None:
    assert cli("init").returncode == 0
    root = tmp_path / "store"
    tree = _tree(tmp_path / "chroot")
    write_profile(root, "t", f'[commit]\nchroot = "{tree}"\nrequire_kernel = false\n[deploy]\ntftp_root = "tftp"\n')
    write_profile(root, "u")  # a second profile without a chroot
    assert cli("commit", "-p", "t", "--no-kernel").returncode == 0

    # CHROOT alone: several profiles, but only t has it as commit.chroot.
    r = cli("status", tree)
    assert r.returncode == 0 and "nothing changed" in r.stdout and "t@1" in r.stdout, r.stdout + r.stderr
    (tree / "etc/motd").write_text("changed for the status test\n")
    (tree / "opt/x/y").mkdir(parents=True)
    r = cli("status", "--profile", "t")
    assert r.returncode == 0, r.stderr
    assert "~ /etc/motd (content, mtime)" in r.stdout and "+ /opt/ (and 2 entries below)" in r.stdout
    assert "imgstore commit" in r.stdout
    r = cli("status", tree, "--json")
    doc = json.loads(r.stdout)
    assert doc["counts"] == {"added": 3, "removed": 0, "modified": 1, "metadata": 1}
    assert doc["base"] == "t@1" and doc["clean"] is False
    assert [m["path"] for m in doc["modified"]] == ["/etc/motd"]

    # Mistakes: one line, exit 2, naming the fix.
    other = tmp_path / "elsewhere"
    other.mkdir()
    r = cli("status", other)
    assert r.returncode == 2 and "not the commit.chroot of any profile" in r.stderr and "--profile" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("status", "--profile", "u")
    assert r.returncode == 2 and "sets no commit.chroot" in r.stderr
    r = cli("status", tmp_path / "missing", "-p", "t")
    assert r.returncode == 3 and "does not exist" in r.stderr
    r = cli("status", "-p", "nosuch")
    assert r.returncode == 3


def test_nasty_tree_unchanged_then_odd_names_renamed(store: Store, tmp_path: Path) -> None:
    """Every entry type and odd name (escapes, non-UTF-8, newline, 4,000-byte paths) compares exactly."""
    from treeutil import make_nasty_tree

    write_profile(store.root, "t")
    tree = tmp_path / "nasty"
    make_nasty_tree(tree)
    time.sleep(1.1)
    commit.commit(store, tree, "t", no_kernel=True)
    rep = chroot_changes(store, "t", tree)
    assert rep.clean and rep.hashed == 0, _kinds(rep)

    names = os.fsencode(tree / "names")
    os.rename(names + b"/\xff\xfe-latin1-\xe9", names + b"/renamed-\xff")
    os.rename(names + b"/new\nline", names + b"/per%cent,comma=eq sp-2")
    rep = chroot_changes(store, "t", tree)
    k = _kinds(rep)
    assert set(k["added"]) == {"/names/renamed-\\xff", "/names/per%cent,comma=eq sp-2"}
    assert set(k["removed"]) == {"/names/\\xff\\xfe-latin1-\\xe9", "/names/new\\x0aline"}
    assert k["metadata"] == {"/names": ("mtime",)} and not k["modified"]
    json.dumps(rep.as_dict())  # printable as JSON whatever the names


def test_noop_commit_writes_nothing_and_a_changed_file_rewrites_the_cache(store: Store, tmp_path: Path) -> None:
    from imgstore.statcache import MAGIC, StatCache, cache_path, key

    tree = _committed(store, tmp_path)
    path = cache_path(store.root, "t", os.fspath(tree))
    assert path.read_bytes().startswith(MAGIC)
    before = disk_state(store.root)
    again = commit.commit(store, tree, "t", "again", no_kernel=True)
    assert not again.created and again.read_files == 0
    assert disk_state(store.root) == before  # no-op: the stat cache is not rewritten either
    (tree / "etc/motd").write_text("changed\n")
    changed = commit.commit(store, tree, "t", "changed", no_kernel=True)
    assert changed.created and changed.read_files == 1
    cache = StatCache.load(path, os.fspath(tree))
    st = os.lstat(tree / "etc/motd")
    row = cache._find(b"etc/motd")  # (a lookup would not trust a file changed a moment ago)
    assert row is not None and row[:2] == (b"etc/motd", key(st))  # the path, its lstat fields, its manifest line
    assert row[2].split(b"\t")[7] == blake3.blake3(b"changed\n").hexdigest().encode()
    assert row[2] in store.objects.read(changed.generation.manifest).split(b"\n", 1)[1]
    # A cache from an older format (or damaged) is ignored: the next commit reads everything, and works.
    import zstandard

    root = os.fsencode(tree)
    v4 = len(root).to_bytes(4, "little") + root + bytes(8) + (8).to_bytes(4, "little") + b"etc/motd" + bytes(64)
    for old in (b"imgstore-statcache 4\n" + zstandard.ZstdCompressor().compress(v4),
                b"imgstore-statcache 2\n" + b"\x00garbage"):
        path.write_bytes(old)
        assert commit.commit(store, tree, "t", "after", no_kernel=True).read_files > 20
