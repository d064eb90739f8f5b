"""Walk a chroot into manifest entries, exactly and without ever following a symlink.

The walk stays on the chroot's filesystem: /proc, /sys, /dev/pts and other mounts left behind by
`chroot ... apt-get` are skipped and reported. Sockets are skipped with a warning (they cannot be
recreated meaningfully). Siblings are visited in name-byte order, so the output is in manifest order.

Where the native module is built, the walk runs in a thread of its own (native/src/walk.rs), ahead of the loop
that consumes it; _walk is its Python twin, and tests/test_walk.py checks that both yield the same.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol, Union

from . import native
from .durable import LONG_PATH, short_path
from .errors import NotFound, UsageError
from .manifest import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, Entry

if TYPE_CHECKING:
    from .statcache import Row, StatCache

DEFAULT_EXCLUDES: tuple[str, ...] = (
    "/var/cache/apt/archives/*.deb",
    "/var/cache/apt/archives/partial/*",
    "/var/cache/apt/*.bin",
    "/var/lib/apt/lists/*",
    "/var/cache/debconf/*-old",
    "/tmp/*",
    "/var/tmp/*",
    "/proc/*",
    "/sys/*",
    "/dev/pts/*",
    "/root/.bash_history",
)


def check_excludes(patterns: Sequence[str]) -> None:
    for pat in patterns:
        if not pat.startswith("/"):
            raise UsageError(
                f"exclude pattern {pat!r} must start with '/'", "anchor it at the chroot root, e.g. /tmp/*"
            )


def compile_excludes(patterns: Sequence[str]) -> re.Pattern[bytes] | None:
    """Glob patterns anchored at the chroot root: '*' and '?' stay inside one name, '**' crosses '/'."""
    check_excludes(patterns)
    parts = []
    for pat in patterns:
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**", i):
                rx += ".*"
                i += 2
            elif pat[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pat[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                rx += re.escape(pat[i])
                i += 1
        parts.append(rx.rstrip("/"))
    if not parts:
        return None
    return re.compile(("(?:" + "|".join(parts) + ")").encode("utf-8", "surrogateescape"), re.DOTALL)


class Lstat(Protocol):
    """What commit uses of an lstat: an os.stat_result, or the native walk's Stat (the same names)."""

    @property
    def st_mode(self) -> int: ...
    @property
    def st_ino(self) -> int: ...
    @property
    def st_dev(self) -> int: ...
    @property
    def st_nlink(self) -> int: ...
    @property
    def st_uid(self) -> int: ...
    @property
    def st_gid(self) -> int: ...
    @property
    def st_size(self) -> int: ...
    @property
    def st_blocks(self) -> int: ...
    @property
    def st_rdev(self) -> int: ...
    @property
    def st_mtime_ns(self) -> int: ...
    @property
    def st_ctime_ns(self) -> int: ...


Walked = tuple[bytes, bytes, Lstat, bytes | None]
"""What the walk yields: path, absolute path, lstat, and for a later path of a hardlinked file the first path."""


class Run(Protocol):
    """Consecutive entries the stat cache has as they were, which commit need not look at one by one (the native
    walk's, native/src/walk.rs)."""

    n: int
    lines: bytes  # their manifest lines
    records: bytes  # their stat cache records, as the cache file has them
    digests: list[bytes]  # the raw digests of the files among them
    files: int
    size: int  # the files' bytes

    def items(self) -> list[Cached]: ...


Cached = Union[tuple[bytes, bytes, Lstat, bytes | None, "Row | None"], Run]
"""What walk_cached yields: a walked entry with its stat cache row (None: a miss), or a run of them."""


class Found:
    """An entry plus what commit needs to read it and to record it in the stat cache."""

    __slots__ = ("entry", "abspath", "st", "root")

    def __init__(self, entry: Entry, abspath: bytes, st: Lstat, root: bytes = b"") -> None:
        self.entry = entry
        self.abspath = abspath
        self.st = st
        self.root = root

    def path(self) -> AbstractContextManager[bytes]:
        """A usable path even past PATH_MAX (see durable.short_path)."""
        return short_path(self.abspath, self.root, self.entry.path)


class ScanReport:
    """What a walk left out."""

    def __init__(self, skipped_mounts: list[str], skipped_sockets: list[str], excluded: int = 0) -> None:
        self.skipped_mounts = skipped_mounts
        self.skipped_sockets = skipped_sockets
        self.excluded = excluded


def read_xattrs(path: bytes, follow: bool = False) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    if not names:
        return ()
    out = []
    for name in sorted(names):
        try:
            out.append((name.encode("utf-8", "surrogateescape"), os.getxattr(path, name, follow_symlinks=follow)))
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed between list and get
                raise
    return tuple(out)


def entry_from_stat(rel: bytes, abspath: bytes, st: Lstat) -> Entry | None:
    m = st.st_mode
    e = Entry(
        path=rel, type="", mode=stat.S_IMODE(m), uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns,
    )
    if stat.S_ISREG(m):
        e.type, e.size = FILE, st.st_size
        e.sparse = st.st_size > 0 and st.st_blocks * 512 < st.st_size
    elif stat.S_ISDIR(m):
        e.type = DIR
    elif stat.S_ISLNK(m):
        e.type = SYMLINK
        e.target = os.readlink(abspath)
        e.size = len(e.target)
    elif stat.S_ISCHR(m):
        e.type, e.rdev = CHAR, (os.major(st.st_rdev), os.minor(st.st_rdev))
    elif stat.S_ISBLK(m):
        e.type, e.rdev = BLOCK, (os.major(st.st_rdev), os.minor(st.st_rdev))
    elif stat.S_ISFIFO(m):
        e.type = FIFO
    else:
        return None  # socket (or something stranger)
    e.xattrs = read_xattrs(abspath)
    return e


def describe(walked: Walked | tuple[bytes, bytes, Lstat, bytes | None, Row | None], root: bytes) -> Found:
    """A walked path as a whole entry: its xattrs and symlink target read."""
    rel, abspath, st, first = walked[0], walked[1], walked[2], walked[3]
    if first is not None:
        entry: Entry | None = Entry(path=rel, type=HARDLINK, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid,
                                    gid=st.st_gid, mtime_ns=st.st_mtime_ns, target=first)
    elif len(abspath) < LONG_PATH:  # the common case, without a context manager per entry
        entry = entry_from_stat(rel, abspath, st)
    else:
        with short_path(abspath, root, rel) as p:
            entry = entry_from_stat(rel, p, st)
    assert entry is not None, "the walk skips sockets"
    return Found(entry, abspath, st, root)


def walk(
    root: str | os.PathLike[str], excludes: Sequence[str] = DEFAULT_EXCLUDES,
) -> tuple[Iterator[Walked], ScanReport]:
    """Return an iterator over the tree's paths in manifest order, and the report it fills."""
    root_b, st = _root(root)
    report = ScanReport([], [])
    walker = native.walker()
    if walker is None:
        return _walk(root_b, st, compile_excludes(excludes), report), report
    return _walk_native(walker(root_b, st.st_dev, _patterns(excludes), None), root_b, report), report


def walk_cached(
    root: str | os.PathLike[str], excludes: Sequence[str], cache: StatCache, looked_at: Collection[bytes],
    prefixes: Sequence[bytes], stored: Callable[[list[bytes]], bool],
) -> tuple[Iterator[Cached], ScanReport]:
    """walk(), each entry with its row in `cache` (StatCache.lookup: the old cache is read from the first entry
    on). The native walk does the lookups in its thread, and gives runs of entries found as they were, except
    those in `looked_at` or below a path in `prefixes`: a run whose files' content is not all `stored` (raw
    digests) comes as its entries."""
    from .statcache import MARGIN_NS

    root_b, st = _root(root)
    report = ScanReport([], [])
    walker = native.walker()
    if walker is None:
        return cache.merged(_walk(root_b, st, compile_excludes(excludes), report)), report
    spec = (os.fsencode(cache.path), MARGIN_NS, list(looked_at), list(prefixes))
    return _merge_native(walker(root_b, st.st_dev, _patterns(excludes), spec), root_b, report, cache, stored), report


def _patterns(excludes: Sequence[str]) -> list[bytes]:
    """The exclude patterns, checked, as the native walk takes them."""
    check_excludes(excludes)
    return [p.encode("utf-8", "surrogateescape") for p in excludes]


def _root(root: str | os.PathLike[str]) -> tuple[bytes, os.stat_result]:
    root_b = os.fsencode(root)
    try:
        st = os.lstat(root_b)
    except FileNotFoundError:
        raise NotFound(
            f"chroot {os.fsdecode(root_b)} does not exist", "give the path of the chroot directory"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{os.fsdecode(root_b)} is not a directory", "give the path of the chroot directory")
    return root_b, st


def scan(
    root: str | os.PathLike[str], excludes: Sequence[str] = DEFAULT_EXCLUDES,
) -> tuple[Iterator[Found], ScanReport]:
    """Return an iterator over the tree's entries in manifest order, and the report it fills."""
    walked, report = walk(root, excludes)
    root_b = os.fsencode(root)
    return (describe(w, root_b) for w in walked), report


def _list(absdir: bytes, root: bytes = b"", rel: bytes = b"") -> list[bytes]:
    try:
        if len(absdir) < LONG_PATH:  # the common case, without a context manager per directory
            return sorted(os.listdir(absdir))
        with short_path(absdir, root, rel) as p:
            return sorted(os.listdir(p))
    except FileNotFoundError:
        return []  # removed while we walk
    except OSError as exc:
        raise UsageError(f"cannot read directory {os.fsdecode(absdir)}: {exc.strerror}", "check permissions") from None


_KINDS = frozenset((stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO))  # besides S_IFREG


def _walk_native(chunks: native.NativeWalker, root: bytes, report: ScanReport) -> Iterator[Walked]:
    """_walk's entries and report, from the native walk's thread (native/src/walk.rs)."""
    for items, mounts, sockets, excluded, _, error in chunks:
        yield from items
        _report(report, root, mounts, sockets, excluded, error)


def _merge_native(chunks: native.NativeWalker, root: bytes, report: ScanReport, cache: StatCache,
                  stored: Callable[[list[bytes]], bool]) -> Iterator[Cached]:
    """StatCache.merged(_walk(...)), from the native walk's thread, in runs where it can."""
    for items, mounts, sockets, excluded, first_miss, error in chunks:
        if first_miss is not None:
            cache.missed(first_miss)
        for item in items:
            if isinstance(item, tuple):
                yield item
            else:
                if stored(item.digests):
                    yield item
                else:
                    yield from item.items()  # gc removed content the cache names: commit reads those files
        _report(report, root, mounts, sockets, excluded, error)


def _report(report: ScanReport, root: bytes, mounts: list[bytes], sockets: list[bytes], excluded: int,
            error: tuple[int, bytes, bool] | None) -> None:
    report.skipped_mounts += ["/" + os.fsdecode(m) for m in mounts]
    report.skipped_sockets += ["/" + os.fsdecode(s) for s in sockets]
    report.excluded += excluded
    if error is not None:
        code, rel, listing = error
        path = root + b"/" + rel if rel else root
        if listing:
            raise UsageError(f"cannot read directory {os.fsdecode(path)}: {os.strerror(code)}", "check permissions")
        raise OSError(code, os.strerror(code), path)


def _walk(
    root: bytes, root_st: Lstat, exclude_rx: re.Pattern[bytes] | None, report: ScanReport,
) -> Iterator[Walked]:
    # An explicit stack, not recursion: paths may be 4,000 bytes deep. A directory's walk stops at each
    # subdirectory and goes on after it, from the iterator over its names left on the stack.
    dev = root_st.st_dev
    links: dict[int, bytes] = {}
    yield b".", root, root_st, None
    stack: list[tuple[bytes, bytes, Iterator[bytes]]] = [(root + b"/", b"", iter(_list(root)))]
    while stack:
        absdir, reldir, names = stack.pop()
        for name in names:
            rel = reldir + name
            abspath = absdir + name
            if exclude_rx is not None and exclude_rx.fullmatch(b"/" + rel):
                report.excluded += 1
                continue
            try:
                if len(abspath) < LONG_PATH:  # the common case, without a context manager per entry
                    st = os.lstat(abspath)
                else:
                    with short_path(abspath, root, rel) as p:
                        st = os.lstat(p)
            except FileNotFoundError:
                continue  # removed while we walk: it is simply not in this generation
            if st.st_dev != dev:
                report.skipped_mounts.append("/" + os.fsdecode(rel))
                continue
            kind = stat.S_IFMT(st.st_mode)
            first = None
            if kind == stat.S_IFREG:
                if st.st_nlink > 1:
                    first = links.get(st.st_ino)
                    if first is None:
                        links[st.st_ino] = rel
            elif kind not in _KINDS:
                report.skipped_sockets.append("/" + os.fsdecode(rel))  # a socket (or something stranger)
                continue
            yield rel, abspath, st, first
            if kind == stat.S_IFDIR:
                stack.append((absdir, reldir, names))
                stack.append((abspath + b"/", rel + b"/", iter(_list(abspath, root, rel))))
                break
