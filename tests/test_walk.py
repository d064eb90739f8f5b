"""The native walk (native/src/walk.rs) against scan._walk, its Python twin: the same entries, in the same order,
with the same lstat fields, the same hardlink firsts and the same report, on trees made to trip it up."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from treeutil import make_nasty_tree

from imgstore import native, scan
from imgstore.errors import UsageError
from imgstore.statcache import key

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
        list(scan._walk_native(walker(root, st_.st_dev, []), root, st_, scan.ScanReport([], [])))


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
