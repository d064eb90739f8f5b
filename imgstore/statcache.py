"""The stat cache: what commit read last time, so an unchanged file is not read again.

In the spirit of git's index. An entry is trusted only if inode, size, mtime and ctime all match and the
file's ctime is older than the start of the scan that read it: a file changed during or right after that
scan (timestamps are coarser than writes) is read again.

Rows are kept in manifest order, so the cache is read alongside the walk (a merge, like git's index)
and the next one is written as the commit goes: neither is ever held whole in memory, which matters at a
million files.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from zstandard import ZstdError

from .durable import fsync_dir, no_space, tmp_name
from .errors import NoSpace
from .manifest import sort_key

if TYPE_CHECKING:
    from zstandard import ZstdCompressionObj

MAGIC = b"imgstore-statcache 4\n"  # then a zstd stream: header, then one record per file (docs/format.md)
MARGIN_NS = 1_000_000_000  # far above the coarse clock tick file timestamps use

# A row: ino, size, mtime_ns, ctime_ns, then the raw BLAKE3 digest.
_STAT = struct.Struct("<QQqq")
ROW = _STAT.size + 32
_LEN = struct.Struct("<I")
_START = struct.Struct("<q")
_BUFFER = 1 << 20


class StatCache:
    """Lookups and records must each come in manifest order, one lookup and one record per file.

    The next cache is written only from the first file that differs: until then every record is a copy of
    the old row the lookup found, so an unchanged tree writes nothing, and a changed one copies that many
    old rows before its own records."""

    def __init__(self, path: Path, root: str) -> None:
        self.path = path
        self.root = root
        self.trusted_before_ns = 0
        self._old: Iterator[tuple[bytes, bytes]] = iter(())
        self._cur: tuple[bytes, bytes] | None = None
        self._cur_key: list[bytes] | None = None
        self._lookups = 0
        self._first_miss: int | None = None  # the first lookup that did not find its file as it was
        self._started: int | None = None
        self._out: BinaryIO | None = None
        self._tmp: Path | None = None
        self._zstd: ZstdCompressionObj | None = None
        self._buf = bytearray()
        self._broken: Exception | None = None
        self.records = 0

    @classmethod
    def load(cls, path: Path, root: str) -> StatCache:
        cache = cls(path, root)
        reader = _Reader.open(path, root)
        if reader is not None:
            cache.trusted_before_ns = reader.started - MARGIN_NS
            cache._old = reader.rows()
            cache._advance()
        return cache

    def _advance(self) -> None:
        try:
            self._cur = next(self._old, None)
        except (OSError, ValueError, struct.error, ZstdError):
            self._cur = None  # a damaged tail: what follows is read from the files
            self._miss()
        self._cur_key = None

    def _miss(self) -> None:
        if self._first_miss is None:
            self._first_miss = self._lookups

    def lookup(self, rel: bytes, ino: int, size: int, mtime_ns: int, ctime_ns: int) -> str | None:
        row = self._find(rel)
        try:
            if row is None or ctime_ns >= self.trusted_before_ns or row[:_STAT.size] != _STAT.pack(
                    ino, size, mtime_ns, ctime_ns):
                self._miss()
                return None
            return row[_STAT.size:].hex()
        finally:
            self._lookups += 1

    def _find(self, rel: bytes) -> bytes | None:
        key: list[bytes] | None = None
        while self._cur is not None:
            if self._cur[0] == rel:
                row = self._cur[1]
                self._advance()
                return row
            if key is None:
                key = sort_key(rel)
            if self._cur_key is None:
                self._cur_key = sort_key(self._cur[0])
            if self._cur_key > key:
                return None  # rel is new
            self._miss()  # an old path that is gone
            self._advance()
        return None

    # -- the next cache --------------------------------------------------------------------------
    def begin(self, scan_started_ns: int) -> None:
        """Record the next cache, for a scan that started at `scan_started_ns`."""
        self._started = scan_started_ns

    def record(self, rel: bytes, ino: int, size: int, mtime_ns: int, ctime_ns: int, digest: str) -> None:
        first_miss = self._first_miss
        if first_miss is None or self.records < first_miss:
            self.records += 1  # a copy of the old row its lookup found
            return
        if self._zstd is None:
            if self._broken is not None:
                return
            try:
                self._start()
            except (OSError, ValueError, struct.error, ZstdError, NoSpace) as exc:
                self._give_up(exc)
                return
        buf = self._buf
        buf += _LEN.pack(len(rel))
        buf += rel
        buf += _STAT.pack(ino, size, mtime_ns, ctime_ns)
        buf += bytes.fromhex(digest)
        self.records += 1
        if len(buf) >= _BUFFER:
            try:
                self._flush()
            except (OSError, NoSpace) as exc:
                self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        """Record no more (the old cache stays: a row is trusted only if the file still matches it); save()
        raises `exc` so that commit can warn."""
        self.discard()
        self._broken = exc if isinstance(exc, (OSError, NoSpace)) else OSError(f"the old stat cache: {exc}")
        self._zstd = None

    def _start(self) -> None:
        """Open the temp file and copy the old rows the records so far repeat."""
        assert self._started is not None, "begin() first"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from .objects import loose_compressor

        self._tmp = tmp_name(self.path)
        self._out = open(self._tmp, "xb")
        self._write(MAGIC)
        self._zstd = loose_compressor(None).compressobj()  # its own: the manifest streams meanwhile
        root = os.fsencode(self.root)
        self._buf += _LEN.pack(len(root)) + root + _START.pack(self._started)
        if self.records:
            reader = _Reader.open(self.path, self.root)
            if reader is None:
                raise OSError("the stat cache changed during the commit")
            copied = 0
            for rel, row in reader.rows():
                if copied == self.records:
                    break
                self._buf += _LEN.pack(len(rel)) + rel + row
                copied += 1
                if len(self._buf) >= _BUFFER:
                    self._flush()
            if copied != self.records:
                raise OSError("the stat cache changed during the commit")

    def _flush(self) -> None:
        assert self._zstd is not None
        self._write(self._zstd.compress(bytes(self._buf)))
        self._buf.clear()

    def _write(self, data: bytes) -> None:
        assert self._out is not None
        try:
            self._out.write(data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise no_space(self.path, exc) from exc
            raise

    @property
    def unchanged(self) -> bool:
        """Every file was found in the cache as it was and no cached file is gone. Ask after the last lookup."""
        if self._cur is not None:
            self._miss()  # rows past the last file: files removed at the end of the tree
        return self._first_miss is None and self.records > 0

    def save(self) -> None:
        """Make the recorded cache the current one, atomically and durably."""
        if self._broken is not None:
            raise self._broken
        try:
            if self._zstd is None:
                self._first_miss = self.records
                self._start()
            assert self._out is not None and self._tmp is not None and self._zstd is not None
            self._write(self._zstd.compress(bytes(self._buf)) + self._zstd.flush())
            out, self._out = self._out, None
            with out:
                out.flush()
                os.fchmod(out.fileno(), 0o600)
                os.fsync(out.fileno())
            os.rename(self._tmp, self.path)
        except BaseException:
            self.discard()
            raise
        fsync_dir(self.path.parent)

    def discard(self) -> None:
        """Drop what was recorded and not saved (a failed or no-op commit)."""
        out, self._out = self._out, None
        if out is not None:
            try:
                out.close()  # may flush into a full disk and fail again: the temp file goes regardless
            except OSError:
                pass
        if self._tmp is not None:
            _unlink(self._tmp)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Reader:
    """The old cache's header, then its records one at a time."""

    def __init__(self, f: BinaryIO) -> None:
        import zstandard

        self.f = f
        # A decompressor of its own, not the thread's: commit decompresses pack indexes meanwhile.
        self.stream = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        self.buf = b""
        self.pos = 0

    def need(self, n: int) -> bool:
        if len(self.buf) - self.pos < n:
            parts = [self.buf[self.pos:]]
            have = len(parts[0])
            while have < n:  # a zstd stream may return less than asked for
                more = self.stream.read(max(n - have, _BUFFER))
                if not more:
                    break
                parts.append(more)
                have += len(more)
            self.buf = b"".join(parts)
            self.pos = 0
        return len(self.buf) - self.pos >= n

    started = 0

    @classmethod
    def open(cls, path: Path, root: str) -> _Reader | None:
        """A reader past the header, or None if there is no usable cache of this tree."""
        try:
            f = open(path, "rb")
        except OSError:
            return None  # a missing or unreadable cache only costs a full read
        reader = cls(f)
        try:
            started = reader.header(os.fsencode(root))
        except (OSError, ValueError, struct.error, ZstdError):
            started = None
        if started is None:
            f.close()
            return None
        reader.started = started
        return reader

    def header(self, root: bytes) -> int | None:
        """The scan start, if this cache is of this format and this tree."""
        if self.f.read(len(MAGIC)) != MAGIC or not self.need(_LEN.size):
            return None
        (n,) = _LEN.unpack_from(self.buf, self.pos)
        self.pos += _LEN.size
        if not self.need(n + _START.size) or self.buf[self.pos:self.pos + n] != root:
            return None
        (started,) = _START.unpack_from(self.buf, self.pos + n)
        self.pos += n + _START.size
        return int(started)

    def rows(self) -> Iterator[tuple[bytes, bytes]]:
        with self.f:
            while self.need(_LEN.size):
                (n,) = _LEN.unpack_from(self.buf, self.pos)
                if not self.need(_LEN.size + n + ROW):
                    raise ValueError("truncated stat cache")
                start = self.pos + _LEN.size
                self.pos = start + n + ROW
                yield self.buf[start:start + n], self.buf[start + n:self.pos]


def cache_path(store_root: Path, profile: str, chroot: str) -> Path:
    import blake3

    key = blake3.blake3(os.fsencode(chroot)).hexdigest()[:16]
    return store_root / "cache" / f"stat-{profile}-{key}"
