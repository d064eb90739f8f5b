"""The stat cache is read alongside the walk and written as the commit goes (imgstore/statcache.py): every
kind of change must still be noticed, an unchanged tree must read no file, and a cache larger than one
read buffer must be used whole."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import disk_state, write_profile

from imgstore import commit
from imgstore.statcache import cache_path
from imgstore.store import Store


def _tree(root: Path, dirs: int, per_dir: int) -> Path:
    for d in range(dirs):
        sub = root / f"d{d:03d}"
        sub.mkdir(parents=True)
        for i in range(per_dir):
            (sub / f"f{i:04d}").write_bytes(b"file %d/%d\n" % (d, i) * (1 + i % 7))
    return root


def _settle() -> None:
    time.sleep(1.1)  # the cache trusts only files whose ctime is older than its scan, by a margin


def test_a_cache_of_many_megabytes_is_used_whole(store: Store, tmp_path: Path) -> None:
    # 15,000 rows are about 1.3 MB: more than the reader takes at once, and the pack index is decompressed
    # between the first read and the next (a shared decompressor once cut the cache at its first megabyte).
    write_profile(store.root, "t")
    tree = _tree(tmp_path / "chroot", 15, 1000)
    _settle()
    first = commit.commit(store, tree, "t", "one", no_kernel=True)
    assert first.read_files == 15_000
    before = _files(store.root)
    fresh = Store.open(store.root)  # as a new process: the pack index is read during this commit
    try:
        again = commit.commit(fresh, tree, "t", "again", no_kernel=True)
    finally:
        fresh.close()
    assert (again.read_files, again.created) == (0, False)
    # No file written (a manifest over 1 MiB is streamed through a temp file, so folder times may move).
    assert _files(store.root) == before


def _files(root: Path) -> dict[str, object]:
    return {k: v for k, v in disk_state(root).items() if not (root / k).is_dir()}


def test_every_kind_of_change_is_read_and_the_next_commit_reads_nothing(store: Store, tmp_path: Path) -> None:
    write_profile(store.root, "t")
    tree = _tree(tmp_path / "chroot", 4, 50)
    _settle()
    commit.commit(store, tree, "t", "one", no_kernel=True)
    # Removed at the start, in the middle and at the very end; added before, between and after the
    # cached paths; one modified; one replaced by a directory of the same name.
    for rel in ("d000/f0000", "d001/f0020", "d003/f0049"):
        (tree / rel).unlink()
    for rel in ("a-first", "d001/f0020x", "d002/f0010.new", "zz-last"):
        (tree / rel).write_bytes(b"new " + rel.encode())
    (tree / "d002/f0003").write_bytes(b"modified")
    (tree / "d003/f0007").unlink()
    (tree / "d003/f0007").mkdir()
    (tree / "d003/f0007/inside").write_bytes(b"inside")
    _settle()
    second = commit.commit(store, tree, "t", "two", no_kernel=True)
    assert second.created and second.read_files == 4 + 1 + 1
    third = commit.commit(store, tree, "t", "three", no_kernel=True)
    assert (third.read_files, third.created) == (0, False)
    # The cache now describes the second tree: removing the last file is noticed, and nothing else read.
    (tree / "zz-last").unlink()
    (tree / "d000/f0001").unlink()
    fourth = commit.commit(store, tree, "t", "four", no_kernel=True)
    assert fourth.created and fourth.read_files == 0
    assert commit.commit(store, tree, "t", "five", no_kernel=True).created is False


def test_a_damaged_cache_costs_reading_not_correctness(store: Store, tmp_path: Path) -> None:
    write_profile(store.root, "t")
    tree = _tree(tmp_path / "chroot", 20, 1000)
    _settle()
    first = commit.commit(store, tree, "t", "one", no_kernel=True)
    path = cache_path(store.root, "t", os.fspath(tree))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a torn tail
    again = commit.commit(store, tree, "t", "again", no_kernel=True)
    assert not again.created and again.generation.gen_id == first.generation.gen_id
    assert 0 < again.read_files < 20_000  # the intact head was used, the rest read
    assert commit.commit(store, tree, "t", "three", no_kernel=True).read_files == 0  # rewritten whole
    path.write_bytes(b"imgstore-statcache 4\n" + os.urandom(5000))
    assert commit.commit(store, tree, "t", "four", no_kernel=True).read_files == 20_000


def test_a_file_read_early_does_not_hold_back_the_rest(store: Store, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # One changed file at the start of a tree of cached ones: its batch never fills, so it is sent off
    # once MAX_WAITING entries wait behind it (else the whole tree would wait in memory).
    write_profile(store.root, "t")
    tree = _tree(tmp_path / "chroot", 3, 100)
    _settle()
    commit.commit(store, tree, "t", "one", no_kernel=True)
    (tree / "d000/f0000").write_bytes(b"changed")
    _settle()
    monkeypatch.setattr(commit, "MAX_WAITING", 8)
    walked = [0]
    real_scan = commit.scan

    def counting_scan(*args, **kwargs):  # type: ignore[no-untyped-def]
        it, report = real_scan(*args, **kwargs)

        def counted():  # type: ignore[no-untyped-def]
            for found in it:
                walked[0] += 1
                yield found

        return counted(), report

    read_at: list[int] = []
    real_read = commit._Reader.__call__

    def spy(self: commit._Reader, found: commit.Found) -> tuple[str, bytes | None, int, int]:
        read_at.append(walked[0])
        return real_read(self, found)

    monkeypatch.setattr(commit, "scan", counting_scan)
    monkeypatch.setattr(commit._Reader, "__call__", spy)
    second = commit.commit(store, tree, "t", "two", no_kernel=True)
    assert second.created and second.read_files == 1 and len(read_at) == 1
    assert read_at[0] < 20 < second.entries  # read while the walk was near it, not after all 304 entries
    assert commit.commit(store, tree, "t", "three", no_kernel=True).read_files == 0
