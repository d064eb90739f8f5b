"""The read loop of commit and the write loop of materialize in Rust (native/src/lib.rs, built into
imgstore/_native by setuptools-rust when cargo and Debian's crates are installed: scripts/setup.sh).
Optional: without it both run in Python, slower (docs/benchmarks.md) and the same in every byte."""

from __future__ import annotations

import os
from collections.abc import Callable

# (path, st_ino, st_size, st_mtime_ns, st_ctime_ns) of each file, the block, where to start, where to stop.
NativeRead = Callable[[list[tuple[bytes, int, int, int, int]], memoryview, int, int], list[bytes | None]]


def reader() -> NativeRead | None:
    """The Rust read loop, unless it was not built or IMGSTORE_NATIVE=0 turns it off."""
    if _turned_off():
        return None
    try:
        from ._native import read_files
    except ImportError:
        return None
    return read_files


# (path, symlink target or None, offset in the block, size, raw digest, uid, gid, mode, mtime_ns, xattrs).
MakeSpec = tuple[bytes, bytes | None, int, int, bytes, int, int, int, int, list[tuple[bytes, bytes]]]
# root fd, the decompressed block the files' contents are in, what to make, own -> how many were made.
NativeWrite = Callable[[int, bytes, list[MakeSpec], bool], int]


def writer() -> NativeWrite | None:
    """The Rust write loop, unless it was not built or IMGSTORE_NATIVE=0 turns it off."""
    if _turned_off():
        return None
    try:
        from ._native import write_files
    except ImportError:
        return None
    return write_files


def describe() -> str:
    """What `imgstore --version` says about it."""
    if _turned_off():
        return "pure Python: IMGSTORE_NATIVE=0"
    if reader() is None:
        return "pure Python: the native read loop is not built (scripts/setup.sh installs cargo and the crates)"
    return "native read loop"


def _turned_off() -> bool:
    return os.environ.get("IMGSTORE_NATIVE", "1") == "0"
