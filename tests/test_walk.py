"""The native walk (native/src/walk.rs) against scan._walk, its Python twin: the same entries, in the same order,
with the same lstat fields, the same hardlink firsts and the same report, on trees made to trip it up."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import write_profile
from hypothesis import given, settings
from hypothesis import strategies as st
from treeutil import make_nasty_tree

from imgstore import commit, native, scan
from imgstore.commit import _LOOKED_AT
from imgstore.errors import UsageError
from imgstore.statcache import KEY, StatCache, _Reader, cache_path, key

pytestmark = pytest.mark.skipif(native.walker() is None, reason="the native module is not built")

IS_ROOT = os.geteuid() == 0
EXCLUDES = ["/tmp/*", "/var/cache/**/*.deb", "/excluded-dir/", "/names/?x*", "/deep/**/skip-me"]


def _walk(tree: Path, excludes: list[str], monkeypatch: pytest.MonkeyPatch, python: bool
          ) -> tuple[list[tuple[Any, ...]], tuple[list[str], list[str], int]]:
    if python:
        monkeypatch.setattr(native, "walker", lambda: None)
    try:
        walked, report = scan.walk(tree, excludes)
        out = [(rel, abspath, key(s), s.st_dev, s.st_rdev, first) for rel, abspath, s, first in walked]
    finally:
        monkeypatch.undo()
    return out, (report.skipped_mounts, report.skipped_sockets, report.excluded)


def _tricky_tree(tree: Path) -> None:
    make_nasty_tree(tree)
    for d in ("tmp/a", "var/cache/apt/archives", "excluded-dir/sub", "deep"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "tmp/a/f").write_text("x")
    (tree / "var/cache/apt/archives/curl.deb").write_text("deb")
    (tree / "var/cache/apt/archives/keep.txt").write_text("kept")
    (tree / "excluded-dir/sub/f").write_text("x")
    (tree / "names/ax-excluded").write_text("x")
    (tree / "names/axe").mkdir()
    (tree / "names/axe/inside").write_text("x")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.fspath(tree / "names/run.sock"))
    sock.close()
    for i in range(1500):  # more entries than a chunk, in a directory of their own
        (tree / "deep" / f"f{i:04d}").write_bytes(b"%d" % i)
    os.link(tree / "deep/f0001", tree / "deep/hardlink-b")
    os.link(tree / "deep/f0001", tree / "a-first-hardlink")
    # Deeper than the levels the walk keeps open (KEEP_OPEN: 128), with siblings after each subdirectory, so
    # that closed levels are reopened; and past PATH_MAX as a whole.
    fd = os.open(tree / "deep", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(350):
            os.mkdir(b"d%03d-padding" % level, dir_fd=fd)
            os.mkdir(b"e%03d" % level, dir_fd=fd)
            with open(os.open(b"z-file", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd), "wb") as f:
                f.write(b"level %d" % level)
            if level == 200:
                os.mkdir(b"skip-me", dir_fd=fd)
            nxt = os.open(b"d%03d-padding" % level, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)


def test_native_and_python_walks_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = tmp_path / "tree"
    _tricky_tree(tree)
    if IS_ROOT:
        (tree / "proc").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "none", tree / "proc"], check=True)
    try:
        for excludes in (EXCLUDES, []):
            py, py_report = _walk(tree, excludes, monkeypatch, python=True)
            nat, nat_report = _walk(tree, excludes, monkeypatch, python=False)
            assert len(nat) == len(py) > 2500
            assert nat == py
            assert nat_report == py_report
    finally:
        if IS_ROOT:
            subprocess.run(["umount", tree / "proc"], check=True)
    assert py_report[1] == ["/names/run.sock"]
    if IS_ROOT:
        assert py_report[0] == ["/proc"]
    nat, (_, _, excluded) = _walk(tree, EXCLUDES, monkeypatch, python=False)
    assert excluded == 6  # tmp/a, curl.deb, excluded-dir, names/ax-excluded, names/axe, deep/.../skip-me
    paths = {rel for rel, *_ in nat}
    assert b"var/cache/apt/archives/keep.txt" in paths and b"names" in paths
    assert max(len(abspath) for _, abspath, *_ in nat) > 4096
    firsts = {rel: first for rel, *_, first in nat if first is not None}
    assert firsts[b"deep/f0001"] == firsts[b"deep/hardlink-b"] == b"a-first-hardlink"
    assert b"a-first-hardlink" not in firsts


def test_the_walk_starts_when_the_first_entry_is_asked_for(tmp_path: Path) -> None:
    """commit takes the store lock and its scan start between walk() and the first entry."""
    (tmp_path / "before").write_text("x")
    walked, _ = scan.walk(tmp_path, [])
    (tmp_path / "after").write_text("y")
    assert [rel for rel, *_ in walked] == [b".", b"after", b"before"]


def test_a_directory_that_cannot_be_listed_is_named(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    root = os.fsencode(tmp_path / "f")
    walker = native.walker()
    assert walker is not None
    st_ = os.lstat(root)
    with pytest.raises(UsageError, match=r"cannot read directory .*/f: Not a directory"):
        list(scan._walk_native(walker(root, st_.st_dev, [], None), root, scan.ScanReport([], [])))


def test_stopping_early_stops_the_walk(tmp_path: Path) -> None:
    for i in range(40_000):  # more than the thread may be ahead of the loop (64 chunks of 512)
        os.close(os.open(tmp_path / f"{i}", os.O_WRONLY | os.O_CREAT, 0o644))
    walked, _ = scan.walk(tmp_path, [])
    assert next(walked)[0] == b"."
    assert next(walked)[0] == b"0"
    assert _walk_threads() == 1
    del walked  # the thread finds nobody listening at its next chunk and ends
    deadline = time.monotonic() + 10
    while _walk_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _walk_threads() == 0


def _walk_threads() -> int:
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return names.count("imgstore-walk")


_PATTERN = st.lists(st.sampled_from(["/", "a", "b", "*", "**", "?", ".", "\n", "é", "[", "\\"]), max_size=8)
_PATH = st.lists(st.sampled_from(["/", "a", "b", ".", "\n", "é", "[", "\\", "ab"]), max_size=10)


@settings(max_examples=400, deadline=None)
@given(st.lists(_PATTERN, min_size=1, max_size=3), _PATH)
def test_exclude_patterns_match_as_the_python_regex_does(patterns: list[list[str]], path: list[str]) -> None:
    pats = ["/" + "".join(p) for p in patterns]
    subject = ("/" + "".join(path)).encode("utf-8", "surrogateescape")
    rx = scan.compile_excludes(pats)
    assert rx is not None
    expected = rx.fullmatch(subject) is not None
    got = native_matches([p.encode("utf-8", "surrogateescape") for p in pats], subject)
    assert got == expected, (pats, subject)


def native_matches(patterns: list[bytes], path: bytes) -> bool:
    matches = native._function("exclude_matches")
    assert callable(matches)
    return bool(matches(patterns, path))


# -- the stat cache merged in the walk's thread (native/src/merge.rs) against StatCache.merged --------------------

HOUR = 3600 * 10**9


def _merged(tree: Path, store_root: Path, monkeypatch: pytest.MonkeyPatch, python: bool,
            stored: Any = lambda digests: True) -> tuple[list[tuple[Any, ...]], list[Any], int | None, bool]:
    """The walk with its stat cache rows, runs opened up (and checked against their entries); the runs; the first
    miss; whether any row was left over."""
    if python:
        monkeypatch.setattr(native, "walker", lambda: None)
    try:
        cache = StatCache(cache_path(store_root, "t", os.fspath(tree)), os.fspath(tree))
        walked, _ = scan.walk_cached(tree, EXCLUDES, cache, _LOOKED_AT, (b"boot/",), stored)
        out: list[tuple[Any, ...]] = []
        runs = []
        for w in walked:
            items = [w] if isinstance(w, tuple) else w.items()
            if not isinstance(w, tuple):
                runs.append(w)
                rows = [i[4] for i in items]
                assert w.n == len(items) > 0
                assert w.lines == b"".join(r[2] for r in rows)
                assert w.records == b"".join(len(r[0]).to_bytes(4, "little") + len(r[2]).to_bytes(4, "little")
                                             + r[0] + r[1] + r[2] for r in rows)
                assert all(len(r[1]) == KEY.size for r in rows)
                files = [(r, i) for r, i in zip(rows, items, strict=True) if r[2].split(b"\t")[1] == b"f"]
                assert w.digests == [bytes.fromhex(r[2].split(b"\t")[7][:64].decode()) for r, _ in files]
                assert (w.files, w.size) == (len(files), sum(i[2].st_size for _, i in files))
            out += [(rel, abspath, key(s), first, row) for rel, abspath, s, first, row in items]
        unchanged = cache.unchanged  # False as nothing was recorded, but it notes rows left over as a miss
    finally:
        monkeypatch.undo()
    return out, runs, cache._first_miss, unchanged


def _both(tree: Path, store_root: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any
          ) -> tuple[list[tuple[Any, ...]], list[Any], int | None, bool]:
    py, py_runs, py_miss, py_unchanged = _merged(tree, store_root, monkeypatch, python=True, **kw)
    nat, runs, miss, unchanged = _merged(tree, store_root, monkeypatch, python=False, **kw)
    assert py_runs == []
    assert nat == py
    assert (miss, unchanged) == (py_miss, py_unchanged)
    return nat, runs, miss, unchanged


def test_the_native_merge_finds_what_statcache_finds(tmp_path: Path, store: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    tree = tmp_path / "tree"
    _tricky_tree(tree)
    (tree / "boot").mkdir()
    (tree / "boot/vmlinuz-6.1.0-9-amd64").write_bytes(b"kernel")
    (tree / "etc").mkdir(exist_ok=True)
    (tree / "etc/os-release").write_text("ID=debian\n")
    write_profile(store.root, "t", f"[commit]\nrequire_kernel = false\nexclude = {json.dumps(EXCLUDES)}\n")
    # A cache whose scan started before every entry's last change trusts none of them (recorded as if an hour
    # earlier: building the tree takes seconds, so "just now" would trust its first entries).
    real = StatCache.begin
    monkeypatch.setattr(StatCache, "begin", lambda self, ns: real(self, ns - HOUR))
    commit.commit(store, tree, "t", "fresh", no_kernel=True)
    monkeypatch.undo()
    out, runs, miss, unchanged = _both(tree, store.root, monkeypatch)
    assert runs == [] and miss == 0 and not unchanged and all(row is None for *_, row in out)

    monkeypatch.setattr(StatCache, "begin", lambda self, ns: real(self, ns + HOUR))  # as if recorded an hour on
    commit.commit(store, tree, "t", "trusted", no_kernel=True)
    monkeypatch.undo()
    out, runs, miss, unchanged = _both(tree, store.root, monkeypatch)
    assert miss is None and all(row is not None for *_, row in out)
    in_runs = {rel for run in runs for rel, *_ in run.items()}
    assert len(in_runs) > 2000 and sum(run.n for run in runs) == len(in_runs)
    alone = {rel: KEY.unpack(k) for rel, _, k, *_ in out if rel not in in_runs}  # (ino, size, .., mode, nlink, ..)
    # What commit looks at itself: symlinks, later hardlinks, boot/ and the files metadata reads.
    assert {b"boot/vmlinuz-6.1.0-9-amd64", b"etc/os-release", b"deep/f0001", b"deep/hardlink-b"} <= set(alone)
    assert all(rel.startswith(b"boot/") or rel in commit._LOOKED_AT or k[5] > 1 or k[4] & 0o170000 == 0o120000
               for rel, k in alone.items())

    # Changes in the middle, a new path, and the last path removed.
    (tree / "deep/f0700").write_bytes(b"longer than before")
    os.chmod(tree / "deep/f0900", 0o600)
    os.unlink(tree / "deep/f1000")
    (tree / "deep/f0800-new").write_text("new")
    last = max((rel for rel, *_ in out), key=lambda r: r.split(b"/"))
    os.unlink(tree / os.fsdecode(last))
    out, runs, miss, unchanged = _both(tree, store.root, monkeypatch)
    missed = [rel for rel, *_, row in out if row is None]
    dirs = {b".", b"deep", last.rpartition(b"/")[0] or b"."}  # their mtimes moved
    assert [m for m in missed if m not in dirs] == [b"deep/f0700", b"deep/f0800-new", b"deep/f0900"]
    assert miss == [rel for rel, *_ in out].index(missed[0]) and not unchanged

    # A digest not stored: its run comes entry by entry.
    gone = next(run for run in runs if run.files).digests[0]
    out2, runs2, *_ = _both(tree, store.root, monkeypatch, stored=lambda ds: gone not in ds)
    assert out2 == out
    assert all(gone not in run.digests for run in runs2)
    assert len(runs2) == len(runs) - 1

    # A torn cache: its intact head is used, the rest is a miss.
    monkeypatch.setattr(StatCache, "begin", lambda self, ns: real(self, ns + HOUR))
    commit.commit(store, tree, "t", "trusted again", no_kernel=True)
    monkeypatch.undo()
    path = cache_path(store.root, "t", os.fspath(tree))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out, runs, miss, unchanged = _both(tree, store.root, monkeypatch)
    assert miss is not None and 0 < miss < len(out) and not unchanged
    # No run spans the first miss (the next cache is copied up to it and written from it).
    assert not any(out[miss][0] in {rel for rel, *_ in run.items()[1:]} for run in runs)
    # A block claiming 4 GB after whole ones: a damaged tail, read as far as the file goes.
    path.write_bytes(data + b"\xf0\xff\xff\xff" + b"not a frame")
    out, runs, miss, unchanged = _both(tree, store.root, monkeypatch)
    assert miss is not None and not unchanged


def test_a_run_across_the_first_miss_is_recorded_from_there(tmp_path: Path, store: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    write_profile(store.root, "t")
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(300):
        (tree / f"f{i:03d}").write_bytes(b"%d" % i)
    real = StatCache.begin
    monkeypatch.setattr(StatCache, "begin", lambda self, ns: real(self, ns + HOUR))
    commit.commit(store, tree, "t", "one", no_kernel=True)
    path = cache_path(store.root, "t", os.fspath(tree))

    def rows() -> list[tuple[bytes, bytes, bytes]]:
        reader = _Reader.open(path, os.fspath(tree))
        assert reader is not None
        return list(reader.rows())

    old = rows()
    blob = b"".join(len(p).to_bytes(4, "little") + len(line).to_bytes(4, "little") + p + k + line
                    for p, k, line in old[1:])
    for first_miss in (1, 2, 150, 300):
        cache = StatCache(path, os.fspath(tree))
        cache.begin(time.time_ns())
        cache.record(*old[0])
        cache.missed(first_miss)
        cache.record_run(len(old) - 1, blob)
        cache.save()
        assert rows() == old
