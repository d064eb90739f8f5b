"""The read loop of commit in Rust (native/src/lib.rs, built into imgstore/_native by setuptools-rust when
cargo and Debian's crates are installed: scripts/setup.sh). Optional: without it commit reads in Python,
slower on a first commit (docs/benchmarks.md) and the same in every stored byte."""

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


def describe() -> str:
    """What `imgstore --version` says about it."""
    if _turned_off():
        return "pure Python: IMGSTORE_NATIVE=0"
    if reader() is None:
        return "pure Python: the native read loop is not built (scripts/setup.sh installs cargo and the crates)"
    return "native read loop"


def _turned_off() -> bool:
    return os.environ.get("IMGSTORE_NATIVE", "1") == "0"
