from typing import Any

# The Rust read and write loops (native/src/lib.rs), built by setuptools-rust when cargo and Debian's crates are there.
def read_files(
    files: list[tuple[bytes, int, int, int, int]], buf: memoryview, offset: int, limit: int, /
) -> list[bytes | None]: ...
def fill(
    root_fd: int,
    groups: list[tuple[int, int, int, list[tuple[bytes, bytes | None, bytes | None, int, int, bytes,
                                                 tuple[int, int, int, int], list[tuple[bytes, bytes]], bool]]]],
    own: bool,
    threads: int,
    /,
) -> list[tuple[int, int]]: ...
def link_files(
    root_fd: int, entries: list[Any], sources: list[tuple[int, bytes]], own: bool, /
) -> list[int]: ...
def decode_manifest(body: bytes, entry: type, /) -> list[Any] | None: ...
def add_index_records(
    records: bytes, blocks: bool, index_offset: int, pack_no: int, slots: dict[bytes, int], /
) -> bool: ...
def mat_keys(entries: list[Any], /) -> list[str | None]: ...
