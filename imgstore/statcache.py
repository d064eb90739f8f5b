"""The stat cache: what commit read last time, so an unchanged file is not read again.

In the spirit of git's index. An entry is trusted only if inode, size, mtime and ctime all match and the
file's ctime is older than the start of the scan that read it: a file changed during or right after that
scan (timestamps are coarser than writes) is read again.
"""

from __future__ import annotations

import marshal
import os
import struct
from pathlib import Path

from zstandard import ZstdError

from .durable import write_atomic

MAGIC = b"imgstore-statcache 3\n"  # then one zstd frame of marshal((root, scan start, rows))
MARGIN_NS = 1_000_000_000  # far above the coarse clock tick file timestamps use

# One bytes object a file: ino, size, mtime_ns, ctime_ns, then the raw BLAKE3 digest. A tuple of four ints
# and the digest would take about 2.5x the memory, which matters at a million files.
_STAT = struct.Struct("<QQqq")
Row = bytes


class StatCache:
    def __init__(self, path: Path, root: str, trusted_before_ns: int, rows: dict[bytes, Row]) -> None:
        self.path = path
        self.root = root
        self.trusted_before_ns = trusted_before_ns
        self.rows = rows
        self.new: dict[bytes, Row] = {}

    @classmethod
    def load(cls, path: Path, root: str) -> StatCache:
        try:
            data = path.read_bytes()
            if data.startswith(MAGIC):
                from .objects import decompressor

                saved_root, started, rows = marshal.loads(decompressor().decompress(data[len(MAGIC):]))
                if saved_root == root and isinstance(rows, dict):
                    return cls(path, root, started - MARGIN_NS, rows)
        except (OSError, ValueError, EOFError, TypeError, ZstdError):
            pass  # a missing or unreadable cache only costs a full read
        return cls(path, root, 0, {})

    def lookup(self, rel: bytes, ino: int, size: int, mtime_ns: int, ctime_ns: int) -> str | None:
        row = self.rows.get(rel)
        if row is None or ctime_ns >= self.trusted_before_ns:
            return None
        if row[:_STAT.size] == _STAT.pack(ino, size, mtime_ns, ctime_ns):
            return row[_STAT.size:].hex()
        return None

    def record(self, rel: bytes, ino: int, size: int, mtime_ns: int, ctime_ns: int, digest: str) -> None:
        self.new[rel] = _STAT.pack(ino, size, mtime_ns, ctime_ns) + bytes.fromhex(digest)

    @property
    def unchanged(self) -> bool:
        """Every file was found in the cache as it was: saving would only move the trust horizon."""
        return self.new == self.rows and bool(self.rows)

    def save(self, scan_started_ns: int) -> None:
        from .objects import compressor

        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = compressor().compress(marshal.dumps((self.root, scan_started_ns, self.new)))
        write_atomic(self.path, MAGIC + data, 0o600)


def cache_path(store_root: Path, profile: str, chroot: str) -> Path:
    import blake3

    key = blake3.blake3(os.fsencode(chroot)).hexdigest()[:16]
    return store_root / "cache" / f"stat-{profile}-{key}"
