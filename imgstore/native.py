"""imgstore's loops in Rust (native/src/lib.rs, built into imgstore/_native by setuptools-rust when cargo and
Debian's crates are installed: scripts/setup.sh): commit's walk (with its stat cache lookups) and read loop,
materialize's write and link loops, the manifest decoder, the pack index reader and materialize's keys.
Optional: without it all of them run in Python, slower (docs/benchmarks.md) and the same in every byte. Each
accessor gives None where the module was not built or IMGSTORE_NATIVE=0 turns it off; the caller then runs its
Python version."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from typing import Any, cast

# (path, st_ino, st_size, st_mtime_ns, st_ctime_ns) of each file, the block, where to start, where to stop.
NativeRead = Callable[[list[tuple[bytes, int, int, int, int]], memoryview, int, int], list[bytes | None]]
# (path, symlink target or None, loose object's path or None, offset in the block, size, raw digest,
#  (uid, gid, mode, mtime_ns), xattrs, sparse)
MakeSpec = tuple[bytes, bytes | None, bytes | None, int, int, bytes, tuple[int, int, int, int],
                 list[tuple[bytes, bytes]], bool]
# (pack fd or -1, block offset, block's compressed length, what to make)
MakeGroup = tuple[int, int, int, list[MakeSpec]]
# root fd, groups, own, threads -> (group, entry) of each entry not made.
NativeFill = Callable[[int, list[MakeGroup], bool, int], list[tuple[int, int]]]
# root fd, entries (files and symlinks), (source root fd, path below it) of each, own, threads
#  -> indexes not linked.
NativeLink = Callable[[int, list[Any], list[tuple[int, bytes]], bool, int], list[int]]
# root fd, directory paths (parents first) -> how many were made (mode 0700) before the first that could not be.
NativeDirs = Callable[[int, list[bytes]], int]
# The lines after the header, the Entry class -> the entries, or None for Python to decode.
NativeDecode = Callable[[bytes, type], "list[Any] | None"]
# records, block format, index offset, pack number, PackIndex.slots -> whether all were valid (and added).
NativeIndex = Callable[[bytes, bool, int, int, dict[bytes, int]], bool]
# Entries -> materialize.mat_key of each file and symlink, None for the others.
NativeKeys = Callable[[list[Any]], list[str | None]]
# Chunks of the walk: (path, absolute path, Stat, first path of the inode or None[, stat cache row or None]) of
# each entry or a run of them (scan.Run), paths on other filesystems, sockets, how many were excluded, the first
# entry the stat cache did not have as it was or None, (errno, path, whether listing a directory failed) or None.
NativeWalker = Iterator[tuple[list[Any], list[bytes], list[bytes], int, "int | None", "tuple[int, bytes, bool] | None"]]
# root, its st_dev, exclude patterns, (stat cache path, its margin, paths and path prefixes commit keeps) or None
#  -> the walk of the tree (started by the first next()).
NativeWalk = Callable[[bytes, int, list[bytes], "tuple[bytes, int, list[bytes], list[bytes]] | None"], NativeWalker]


def reader() -> NativeRead | None:
    return cast("NativeRead | None", _function("read_files"))


def filler() -> NativeFill | None:
    return cast("NativeFill | None", _function("fill"))


def linker() -> NativeLink | None:
    return cast("NativeLink | None", _function("link_files"))


def dir_maker() -> NativeDirs | None:
    return cast("NativeDirs | None", _function("make_dirs"))


def decoder() -> NativeDecode | None:
    return cast("NativeDecode | None", _function("decode_manifest"))


def indexer() -> NativeIndex | None:
    return cast("NativeIndex | None", _function("add_index_records"))


def keyer() -> NativeKeys | None:
    return cast("NativeKeys | None", _function("mat_keys"))


def walker() -> NativeWalk | None:
    return cast("NativeWalk | None", _function("walk_tree"))


def describe() -> str:
    """What `imgstore --version` says about it."""
    if _turned_off():
        return "pure Python: IMGSTORE_NATIVE=0"
    if reader() is None:
        return "pure Python: the native loops are not built (scripts/setup.sh installs cargo and the crates)"
    return "native read and write loops"


def _function(name: str) -> object | None:
    if _turned_off():
        return None
    try:
        module = importlib.import_module(f"{__package__}._native")
    except ImportError:
        return None
    return getattr(module, name, None)


def _turned_off() -> bool:
    return os.environ.get("IMGSTORE_NATIVE", "1") == "0"
