# The Rust read loop (native/src/lib.rs), built by setuptools-rust when cargo and Debian's crates are there.
def read_files(
    files: list[tuple[bytes, int, int, int, int]], buf: memoryview, offset: int, limit: int, /
) -> list[bytes | None]: ...
