"""The stat cache is read alongside the walk and written as the commit goes (imgstore/statcache.py): every
kind of change must still be noticed, an unchanged tree must read no file, and a cache larger than one
read buffer must be used whole."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import disk_state, write_profile
from treeutil import IS_ROOT, PING_CAP, make_nasty_tree

from imgstore import commit, native
from imgstore.statcache import MAGIC, StatCache, cache_path
from imgstore.store import Store


@pytest.fixture(autouse=True, params=["native-merge", "python-merge"])
def merge(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test with the stat cache merged in the native walk's thread and in Python (StatCache.merged)."""
    if request.param == "python-merge":
        monkeypatch.setattr(native, "walker", lambda: None)
    elif native.walker() is None:
        pytest.skip("the native module is not built")
    return str(request.param)


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
    path.write_bytes(MAGIC + os.urandom(5000))
    assert commit.commit(store, tree, "t", "four", no_kernel=True).read_files == 20_000


def test_a_file_read_early_does_not_hold_back_the_rest(store: Store, tmp_path: Path, monkeypatch, merge: str) -> None:  # type: ignore[no-untyped-def]
    # One changed file at the start of a tree of cached ones: its batch never fills, so it is sent off
    # once BATCH_FILES entries wait behind it (else the whole tree would wait in memory).
    write_profile(store.root, "t")
    tree = _tree(tmp_path / "chroot", 12, 100)
    _settle()
    commit.commit(store, tree, "t", "one", no_kernel=True)
    (tree / "d000/f0000").write_bytes(b"changed")
    _settle()
    monkeypatch.setattr(commit, "BATCH_FILES", 8)
    walked = [0]
    real_walk = commit.walk_cached

    def counting_walk(*args, **kwargs):  # type: ignore[no-untyped-def]
        it, report = real_walk(*args, **kwargs)

        def counted():  # type: ignore[no-untyped-def]
            for found in it:
                walked[0] += 1 if isinstance(found, tuple) else found.n  # a run of cached entries is many
                yield found

        return counted(), report

    sent_at: list[int] = []  # how far the walk was when a batch went to the reading threads
    real_submit = commit._Pool.submit

    def spy(self: commit._Pool, fn: Any, batch: list[commit.Found]) -> Any:
        sent_at.append(walked[0])
        return real_submit(self, fn, batch)

    monkeypatch.setattr(commit, "walk_cached", counting_walk)
    monkeypatch.setattr(commit._Pool, "submit", spy)
    second = commit.commit(store, tree, "t", "two", no_kernel=True)
    assert second.created and second.read_files == 1 and len(sent_at) == 1
    # Sent once 8 entries waited behind it, not after all 1,213 (when a thread reads it is the scheduler's); the
    # native walk hands cached entries over in runs of at most a chunk (512).
    assert sent_at[0] < (20 if merge == "python-merge" else 20 + 512) < second.entries
    assert commit.commit(store, tree, "t", "three", no_kernel=True).read_files == 0


HOUR = 3600 * 10**9


def _trust_every_change(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Record caches as if their scan had started an hour from now. A change made after such a commit then has
    a ctime the cache trusts, so only the comparison of stat fields can notice it: the racy rule (which
    re-examines whatever changed after the scan began) would otherwise hide a comparison that misses it."""
    real = StatCache.begin
    monkeypatch.setattr(StatCache, "begin", lambda self, ns: real(self, ns + HOUR))


def _manifest_lines(store: Store, res: commit.CommitResult) -> list[bytes]:
    return store.objects.read(res.generation.manifest).split(b"\n")


def _same_as_a_full_read(store: Store, tree: Path, profile: str, cached: commit.CommitResult) -> None:
    """The generation `cached` made with the stat cache is exactly the one made without it."""
    cache_path(store.root, profile, os.fspath(tree)).unlink()
    full = commit.commit(store, tree, profile, "full read")
    assert full.read_files == full.files > 0
    assert _manifest_lines(store, cached) == _manifest_lines(store, full)
    assert (full.created, full.generation.gen_id) == (False, cached.generation.gen_id)


def test_changes_that_only_move_ctime_give_the_manifest_of_a_full_read(
        store: Store, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    write_profile(store.root, "t")
    tree = tmp_path / "chroot"
    make_nasty_tree(tree)
    (tree / "boot").mkdir()
    for rel, data in ((b"boot/vmlinuz-6.1.0-9-amd64", b"kernel"), (b"boot/initrd.img-6.1.0-9-amd64", b"initrd"),
                      (b"names/back\\slash", b"bs"), (b"etc/zz-last", b"last")):
        with open(os.path.join(os.fsencode(tree), rel), "wb") as f:
            f.write(data)
    os.symlink("boot/vmlinuz-6.1.0-9-amd64", tree / "vmlinuz")  # the kernel is found through the symlink
    os.setxattr(tree / "compressible.txt", "user.before", b"1")
    _trust_every_change(monkeypatch)
    first = commit.commit(store, tree, "t", "one")
    assert first.generation.kernel_name == "vmlinuz-6.1.0-9-amd64"
    again = commit.commit(store, tree, "t", "again")
    assert (again.read_files, again.created) == (0, False)

    def same_mtime(rel: str) -> None:  # touch -m back to the mtime it had: only ctime moves
        st = os.lstat(tree / rel)
        os.utime(tree / rel, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    os.chmod(tree / "etc/fstab", 0o600)
    os.chmod(tree / "var-sparse.img", 0o600)
    os.chmod(tree / "shared", 0o755)
    os.setxattr(tree / "compressible.txt", "user.after", b"2")
    os.removexattr(tree / "compressible.txt", "user.before")
    os.setxattr(tree / "names", "user.dir", b"d")
    for rel in ("big.bin", "etc", "empty", "names/back\\slash"):
        same_mtime(rel)
    dangling = os.lstat(tree / "dangling")  # a symlink replaced by one of the same target, owner and mtime
    os.unlink(tree / "dangling")
    os.symlink("does/not/exist", tree / "dangling")
    os.utime(tree / "dangling", ns=(dangling.st_atime_ns, dangling.st_mtime_ns), follow_symlinks=False)
    # Hardlinks added: to a lone file, and one that sorts before the first path of an existing group.
    os.link(tree / "etc/zz-last", tree / "etc/aa-first")
    os.link(tree / "usr/bin/perl", tree / "usr/bin/aaa-perl")
    same_mtime("etc")
    same_mtime("usr/bin")
    if IS_ROOT:
        os.chown(tree / "etc/hostname", 1, 2)
        os.lchown(tree / "absolute", 7, 8)
        os.setxattr(tree / "zeros-not-sparse", "security.capability", PING_CAP)
        os.removexattr(tree / "bin/ping", "security.capability")
        os.chown(tree / "dev/sda", 0, 7)
        os.chmod(tree / "dev/null", 0o660)
        os.setxattr(tree / "dev/initctl", "trusted.fifo", b"f")
        os.setxattr(tree / "absolute", "trusted.link", b"l", follow_symlinks=False)
    changed = commit.commit(store, tree, "t", "changed")
    assert changed.created
    assert 0 < changed.read_files < changed.files  # the cache was used
    _same_as_a_full_read(store, tree, "t", changed)
    assert commit.commit(store, tree, "t", "no-op").read_files == 0


def test_a_hardlink_group_whose_first_path_is_excluded_is_described_anew(
        store: Store, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # No inode changes (no ctime moves), yet the entries' lines do: what was a hardlink is now the file.
    write_profile(store.root, "t")
    tree = tmp_path / "chroot"
    (tree / "a").mkdir(parents=True)
    (tree / "a/first").write_bytes(b"linked")
    os.link(tree / "a/first", tree / "a/second")
    os.link(tree / "a/first", tree / "a/third")
    (tree / "b").write_bytes(b"b")
    _trust_every_change(monkeypatch)
    commit.commit(store, tree, "t", "one", no_kernel=True)
    write_profile(store.root, "t", '[commit]\nrequire_kernel = false\nexclude = ["/a/first"]\n')
    changed = commit.commit(store, tree, "t", "excluded", no_kernel=True)
    assert changed.created
    _same_as_a_full_read(store, tree, "t", changed)


def test_a_cached_file_whose_object_is_gone_is_read_again(store: Store, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import blake3

    from imgstore.objects import LOOSE_MIN

    write_profile(store.root, "t")
    tree = tmp_path / "chroot"
    tree.mkdir()
    big = os.urandom(LOOSE_MIN + 1)  # a loose object: one file to delete
    (tree / "big").write_bytes(big)
    (tree / "small").write_bytes(b"small")
    _trust_every_change(monkeypatch)
    first = commit.commit(store, tree, "t", "one", no_kernel=True)
    digest = blake3.blake3(big).hexdigest()
    store.objects.loose_path(digest).unlink()  # as gc or verify --repair may have since
    again = commit.commit(store, tree, "t", "again", no_kernel=True)
    assert (again.read_files, again.created, again.generation.gen_id) == (1, False, first.generation.gen_id)
    assert store.objects.has(digest)  # stored again
    assert commit.commit(store, tree, "t", "three", no_kernel=True).read_files == 0
