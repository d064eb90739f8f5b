# The Rust read and write loops (native/src/lib.rs), built by setuptools-rust when cargo and Debian's crates are there.
def read_files(
    files: list[tuple[bytes, int, int, int, int]], buf: memoryview, offset: int, limit: int, /
) -> list[bytes | None]: ...
def write_files(
    root_fd: int,
    block: bytes,
    entries: list[tuple[bytes, bytes | None, int, int, bytes, int, int, int, int, list[tuple[bytes, bytes]]]],
    own: bool,
    /,
) -> int: ...
