"""The read loop of commit and the write loop of materialize in Rust (native/src/lib.rs, built into
imgstore/_native by setuptools-rust when cargo and Debian's crates are installed: scripts/setup.sh).
Optional: without it both run in Python, slower (docs/benchmarks.md) and the same in every byte."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

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


# (path, symlink target or None, loose object's path or None, offset in the block, size, raw digest,
#  (uid, gid, mode, mtime_ns), xattrs, sparse)
MakeSpec = tuple[bytes, bytes | None, bytes | None, int, int, bytes, tuple[int, int, int, int],
                 list[tuple[bytes, bytes]], bool]
# (pack fd or -1, block offset, block's compressed length, what to make)
MakeGroup = tuple[int, int, int, list[MakeSpec]]
# root fd, groups, own, threads -> (group, entry) of each entry not made.
NativeFill = Callable[[int, list[MakeGroup], bool, int], list[tuple[int, int]]]


def filler() -> NativeFill | None:
    """The Rust write loop of materialize, unless it was not built or IMGSTORE_NATIVE=0 turns it off."""
    if _turned_off():
        return None
    try:
        from ._native import fill
    except ImportError:
        return None
    return fill


# root fd, entries (files and symlinks), (source root fd, path below it) of each, own -> indexes not linked.
NativeLink = Callable[[int, list[Any], list[tuple[int, bytes]], bool], list[int]]


def linker() -> NativeLink | None:
    """The Rust link loop of materialize, unless it was not built or IMGSTORE_NATIVE=0 turns it off."""
    if _turned_off():
        return None
    try:
        from ._native import link_files
    except ImportError:
        return None
    return link_files


# The lines after the header, the Entry class -> the entries, or None for Python to decode.
NativeDecode = Callable[[bytes, type], "list[Any] | None"]


def decoder() -> NativeDecode | None:
    """The Rust manifest decoder, unless it was not built or IMGSTORE_NATIVE=0 turns it off."""
    if _turned_off():
        return None
    try:
        from ._native import decode_manifest
    except ImportError:
        return None
    return decode_manifest


# records, block format, index offset, pack number, PackIndex.slots -> whether all were valid (and added).
NativeIndex = Callable[[bytes, bool, int, int, dict[bytes, int]], bool]


def indexer() -> NativeIndex | None:
    """The Rust pack index reader, unless it was not built or IMGSTORE_NATIVE=0 turns it off."""
    if _turned_off():
        return None
    try:
        from ._native import add_index_records
    except ImportError:
        return None
    return add_index_records


# Entries -> materialize.mat_key of each file and symlink, None for the others.
NativeKeys = Callable[[list[Any]], list[str | None]]


def keyer() -> NativeKeys | None:
    """The Rust materialize.mat_key, unless it was not built or IMGSTORE_NATIVE=0 turns it off."""
    if _turned_off():
        return None
    try:
        from ._native import mat_keys
    except ImportError:
        return None
    return mat_keys


def describe() -> str:
    """What `imgstore --version` says about it."""
    if _turned_off():
        return "pure Python: IMGSTORE_NATIVE=0"
    if reader() is None:
        return "pure Python: the native loops are not built (scripts/setup.sh installs cargo and the crates)"
    return "native read and write loops"


def _turned_off() -> bool:
    return os.environ.get("IMGSTORE_NATIVE", "1") == "0"
