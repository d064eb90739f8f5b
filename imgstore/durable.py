"""Durable-write primitives. Every file or link that another process may read is written here.

The pattern is always the same: write a temp file in the target directory, fsync it, rename it over
the target, fsync the directory. A reader sees the old content or the new one, never a mix, and after
a power loss the rename is either there or not.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from .errors import NoSpace

TMP_PREFIX = ".imgstore-tmp-"

StrPath = str | os.PathLike[str]


def tmp_name(target: StrPath) -> Path:
    target = Path(target)
    return target.with_name(f"{TMP_PREFIX}{os.urandom(6).hex()}-{target.name}"[:250])


def fsync_dir(path: StrPath) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


MIN_FREE = 1 << 20  # what any change needs at least: database journal pages, a config, a link


def no_space(path: StrPath, exc: OSError | None = None, needed: int | None = None) -> NoSpace:
    need = f"about {max(needed or 0, MIN_FREE) / 1e6:.1f} MB more are needed"
    return NoSpace(
        f"no space left on the filesystem of {os.fspath(path)}; {need}",
        "free space there (imgstore gc removes unneeded generations) and run the command again",
    )


@contextmanager
def atomic_file(target: StrPath, mode: int = 0o644, sync_dir: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file; on success it replaces `target` atomically and durably."""
    target = Path(target)
    tmp = tmp_name(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.rename(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space(target, exc) from exc
        raise
    if sync_dir:
        fsync_dir(target.parent)


def write_atomic(target: StrPath, data: bytes, mode: int = 0o644, sync_dir: bool = True) -> None:
    with atomic_file(target, mode, sync_dir) as f:
        f.write(data)


def syncfs(path: StrPath) -> None:
    """Everything written to path's filesystem durable, data and metadata, with one syncfs(2): far cheaper
    than an fsync per file for thousands of small files (and than sync(2), which waits for every disk)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc().syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


@contextmanager
def writing_back(path: StrPath, every: float = 0.1) -> Iterator[None]:
    """While the body runs, a thread calls syncfs(2) on path's filesystem every `every` seconds, so the data
    written meanwhile goes to disk as it is written (the kernel would wait 30 s) and the syncfs after the body
    has less left: a first materialization's files are made by two processes while this one's thread waits on
    the disk. Only a head start: durability is still the caller's syncfs after the body."""
    import threading

    from .forkjoin import QuietThread  # a forked child does without it: it takes no lock the child needs

    libc = _libc()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every):
            libc.syncfs(fd)  # a failure only loses the head start

    thread = QuietThread(target=run, name="imgstore-writeback", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        os.close(fd)


WRITEBACK = 8 << 20  # bytes written to a big file between two start_writeback() calls


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing this range of the file to disk now, without waiting (sync_file_range(2),
    as borg does): the fsync that makes the file durable then waits for the last few MB instead of all of it
    (a minbase's 46 MB pack: 0.03 s -> 0.01 s). Only a head start: durability is still the fsync's."""
    fn = getattr(_libc(), "sync_file_range", None)
    if fn is not None:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # a failure only loses the head start


_SYNC_FILE_RANGE_WRITE = 2


def write_back(f: BinaryIO, started: int, end: int) -> int:
    """For a file being written: start the writeback of its bytes from `started` to `end` once they are
    WRITEBACK or more. Returns where the writeback has been started up to."""
    if end - started < WRITEBACK:
        return started
    f.flush()
    start_writeback(f.fileno(), started, end - started)
    return end


@functools.cache
def _libc() -> Any:
    """The C library, loaded once, for what `os` has no wrapper of (syncfs, sync_file_range)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "sync_file_range"):
        libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return libc


def replace_symlink(link: StrPath, target: str, sync_dir: bool = True) -> None:
    """Point `link` at `target` by renaming a new symlink over it: the link never disappears."""
    link = Path(link)
    tmp = tmp_name(link)
    os.symlink(target, tmp)
    try:
        os.rename(tmp, link)
    except BaseException:
        os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(link.parent)


def remove_stale_temps(directory: StrPath) -> int:
    """Remove temp files an interrupted command left in `directory`; return how many."""
    n = 0
    try:
        with os.scandir(directory) as it:
            for e in it:
                if e.name.startswith(TMP_PREFIX) and not e.is_dir(follow_symlinks=False):
                    os.unlink(e.path)
                    n += 1
    except FileNotFoundError:
        pass
    return n


def remove_tree(path: StrPath) -> None:
    """rm -rf that also works on trees with read-only directories (checkouts, materialized trees)."""
    import shutil

    if os.path.islink(path):
        os.unlink(path)  # a symlink where a tree should be: remove the link, never what it points at
        return
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                os.chmod(full, 0o700)
    if os.path.lexists(path) and not os.path.islink(path):
        os.chmod(path, 0o700)
    shutil.rmtree(path)


DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
LONG_PATH = 3800  # below PATH_MAX (4096) with room for what callers append


def open_dir(root_fd: int, rel: bytes) -> int:
    """Open a directory below root_fd one component at a time, following no symlink on the way."""
    if rel in (b"", b"."):
        return root_fd
    fd = root_fd
    for part in rel.split(b"/"):
        nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
        if fd != root_fd:
            os.close(fd)
        fd = nfd
    return fd


@contextmanager
def short_path(abspath: bytes, root: bytes, rel: bytes) -> Iterator[bytes]:
    """A path the kernel accepts for `abspath` (= root/rel), however long: past PATH_MAX it goes through
    /proc/self/fd/<parent fd>/<name>, which resolves the parent by its fd and the name without following."""
    if len(abspath) < LONG_PATH:
        yield abspath
        return
    parent, _, name = rel.rpartition(b"/")
    root_fd = os.open(root, DIR_FLAGS)
    try:
        dfd = open_dir(root_fd, parent)
        try:
            yield b"/proc/self/fd/%d/%s" % (dfd, name)
        finally:
            if dfd != root_fd:
                os.close(dfd)
    finally:
        os.close(root_fd)
