"""The stat cache: the manifest line commit wrote for each entry last time, so that an unchanged entry is
neither read nor described again.

In the spirit of git's index. A line is used again only if the entry's lstat fields (inode, size, mtime,
ctime, mode, link count, owner, sparseness) all match its row and its ctime is older than the start of the
scan that recorded it: an entry changed during or right after that scan (timestamps are coarser than writes)
is examined again. Whatever else a line says moves ctime when it changes (content, xattrs; a symlink or a
device cannot change in place), except which path of a hardlinked inode comes first; that, and that the
content a file's line names is still stored (gc), commit checks.

Rows are kept in manifest order, so the cache is read alongside the walk (a merge, like git's index) and the
next one is written as the commit goes: neither is ever held whole in memory, which matters at a million
files. Where the native module is built, commit's walk does the merge in its own thread (native/src/merge.rs,
the twin of lookup()) and hands over runs of entries found as they were; merged() is the Python way.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from zstandard import ZstdError

from .durable import fsync_dir, no_space, tmp_name
from .errors import NoSpace
from .manifest import sort_key

if TYPE_CHECKING:
    from zstandard import ZstdCompressor

    from .scan import Cached, Lstat, Walked

MAGIC = b"imgstore-statcache 6\n"  # then blocks: a header, then one record per entry (docs/format.md)
MARGIN_NS = 1_000_000_000  # far above the coarse clock tick file timestamps use

KEY = struct.Struct("<QqqqIQII?")  # ino, size, mtime_ns, ctime_ns, mode, nlink, uid, gid, sparse
NEVER = b"\xff" * KEY.size  # a key no lstat gives (its size would be -1)
_LENS = struct.Struct("<II")  # a record: path and line lengths, then the path, key and line
_LEN = struct.Struct("<I")
_START = struct.Struct("<q")
_BUFFER = 1 << 20

Row = tuple[bytes, bytes, bytes]  # path, key, manifest line


def key(st: Lstat) -> bytes:
    """What must not have moved for a cached line to still describe the entry."""
    made: bytes | None = getattr(st, "key", None)  # the native walk's Stat brings it (its fields are slower to get)
    if made is not None:
        return made
    size = st.st_size
    try:
        return KEY.pack(st.st_ino, size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_nlink, st.st_uid,
                        st.st_gid, st.st_blocks * 512 < size)
    except struct.error:
        return NEVER  # a time past 2262 (ext4 goes to 2446): such an entry is examined every time


class StatCache:
    """Lookups and records must each come in manifest order, one lookup and one record per entry.

    The next cache is written only from the first entry that differs: until then every record is a copy of
    the old row the lookup found, so an unchanged tree writes nothing, and a changed one copies that many
    old rows before its own records."""

    def __init__(self, path: Path, root: str) -> None:
        self.path = path
        self.root = root
        self.trusted_before_ns = 0
        self._old: Iterator[Row] = iter(())
        self._cur: Row | None = None
        self._cur_key: list[bytes] | None = None
        self._lookups = 0
        self._first_miss: int | None = None  # the first lookup that did not find its entry as it was
        self._started: int | None = None
        self._out: BinaryIO | None = None
        self._tmp: Path | None = None
        self._zstd: ZstdCompressor | None = None
        self._buf = bytearray()
        self._broken: Exception | None = None
        self.records = 0

    @classmethod
    def load(cls, path: Path, root: str) -> StatCache:
        cache = cls(path, root)
        cache._load()
        return cache

    def _load(self) -> None:
        reader = _Reader.open(self.path, self.root)
        if reader is not None:
            self.trusted_before_ns = reader.started - MARGIN_NS
            self._old = reader.rows()
            self._advance()

    def merged(self, walked: Iterable[Walked]) -> Iterator[Cached]:
        """The walk's entries, each with its row if lookup() finds it (the old cache is read from the first)."""
        self._load()
        lookup = self.lookup
        for w in walked:
            yield w[0], w[1], w[2], w[3], lookup(w[0], w[2])

    def _advance(self) -> None:
        try:
            self._cur = next(self._old, None)
        except (OSError, ValueError, struct.error, ZstdError):
            self._cur = None  # a damaged tail: what follows is examined anew
            self._gone()
        self._cur_key = None

    def _gone(self) -> None:
        if self._first_miss is None:
            self._first_miss = self._lookups

    def lookup(self, rel: bytes, st: Lstat) -> Row | None:
        """The row recorded for this entry, if its line still describes it; None is a miss."""
        row = self._cur
        if row is not None and row[0] == rel:  # the common case, without a call to _find or _advance
            try:
                self._cur = next(self._old, None)
            except (OSError, ValueError, struct.error, ZstdError):
                self._cur = None
                self._gone()
            self._cur_key = None
        else:
            row = self._find(rel)
        self._lookups += 1
        if row is None or st.st_ctime_ns >= self.trusted_before_ns or row[1] != key(st) or row[1] == NEVER:
            self.missed(self._lookups - 1)
            return None
        return row

    def missed(self, at: int) -> None:
        """Entry number `at` (from 0, in walk order) was not found as it was: the next cache is written from there
        (or from an earlier miss)."""
        if self._first_miss is None or at < self._first_miss:
            self._first_miss = at

    def _find(self, rel: bytes) -> Row | None:
        rel_key: list[bytes] | None = None
        while (cur := self._cur) is not None:
            if cur[0] == rel:
                self._advance()
                return cur
            if rel_key is None:
                rel_key = sort_key(rel)
            if self._cur_key is None:
                self._cur_key = sort_key(cur[0])
            if self._cur_key > rel_key:
                return None  # rel is new
            self._gone()  # an old path that is gone
            self._advance()
        return None

    # -- the next cache --------------------------------------------------------------------------
    def begin(self, scan_started_ns: int) -> None:
        """Record the next cache, for a scan that started at `scan_started_ns`."""
        self._started = scan_started_ns

    def record(self, rel: bytes, k: bytes, line: bytes) -> None:
        """A row: `line` describes the entry as its lstat fields `k` (key()) were."""
        first_miss = self._first_miss
        if first_miss is None or self.records < first_miss:
            self.records += 1  # a copy of the old row its lookup found
            return
        if self._broken is None:
            try:
                if self._zstd is None:
                    self._start()  # copies the `records` old rows before this one
                self._add(rel, k, line)
            except (OSError, ValueError, struct.error, ZstdError, NoSpace) as exc:
                self._give_up(exc)
        self.records += 1

    def record_run(self, n: int, records: bytes) -> None:
        """`n` rows at once, as the old cache had them (`records`: theirs, joined as in the file)."""
        first_miss = self._first_miss
        copies = n if first_miss is None else min(n, max(0, first_miss - self.records))
        self.records += copies  # copies of old rows, as in record()
        if copies == n:
            return
        pos = 0
        for _ in range(copies):  # a run that spans the first miss (the native walk ends runs there)
            plen, llen = _LENS.unpack_from(records, pos)
            pos += _LENS.size + plen + KEY.size + llen
        if self._broken is None:
            try:
                if self._zstd is None:
                    self._start()
                self._buf += memoryview(records)[pos:]
                if len(self._buf) >= _BUFFER:
                    self._flush()
            except (OSError, ValueError, struct.error, ZstdError, NoSpace) as exc:
                self._give_up(exc)
        self.records += n - copies

    def _add(self, rel: bytes, k: bytes, line: bytes) -> None:
        buf = self._buf
        buf += _LENS.pack(len(rel), len(line))
        buf += rel
        buf += k
        buf += line
        if len(buf) >= _BUFFER:
            self._flush()

    def _give_up(self, exc: Exception) -> None:
        """Record no more (the old cache stays: a row is trusted only if the entry still matches it); save()
        raises `exc` so that commit can warn."""
        self.discard()
        self._broken = exc if isinstance(exc, (OSError, NoSpace)) else OSError(f"the old stat cache: {exc}")
        self._zstd = None

    def _start(self) -> None:
        """Begin the next cache with the old rows the records so far repeat."""
        assert self._started is not None, "begin() first"
        import zstandard

        # Each block its own frame with a checksum, checked before any of its lines is used again.
        self._zstd = zstandard.ZstdCompressor(level=1, write_checksum=True)  # as small as level 3, and faster
        root = os.fsencode(self.root)
        self._buf += _LEN.pack(len(root)) + root + _START.pack(self._started)
        if self.records:
            reader = _Reader.open(self.path, self.root)
            if reader is None:
                raise OSError("the stat cache changed during the commit")
            copied = 0
            for rel, k, line in reader.rows():
                if copied == self.records:
                    break
                self._add(rel, k, line)
                copied += 1
            if copied != self.records:
                raise OSError("the stat cache changed during the commit")

    def _flush(self) -> None:
        assert self._zstd is not None
        if self._out is None:  # only now: a commit of a small tree that fails leaves no temp file behind
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = tmp_name(self.path)
            self._out = open(self._tmp, "xb")
            self._write(MAGIC)
        frame = self._zstd.compress(bytes(self._buf))
        self._write(_LEN.pack(len(frame)) + frame)
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
        """Every entry was found in the cache as it was and no cached entry is gone. Ask after the last lookup."""
        if self._cur is not None:
            self._gone()  # rows past the last entry: entries removed at the end of the tree
        return self._first_miss is None and self.records > 0

    def save(self) -> None:
        """Make the recorded cache the current one, atomically and durably."""
        if self._broken is not None:
            raise self._broken
        try:
            if self._zstd is None:
                self._first_miss = self.records
                self._start()
            if self._buf or self._out is None:
                self._flush()
            out, self._out = self._out, None
            assert out is not None and self._tmp is not None
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
    """The old cache's header, then its records one at a time, a block at a time."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.block = b""
        self.pos = 0
        self.started = 0

    def next_block(self) -> bool:
        import zstandard

        head = self.f.read(_LEN.size)
        if not head:
            return False
        if len(head) < _LEN.size:
            raise ValueError("truncated stat cache")
        (n,) = _LEN.unpack(head)
        frame = self.f.read(n)
        # A decompressor of its own, not the thread's: commit decompresses pack indexes meanwhile.
        d = zstandard.ZstdDecompressor().decompressobj()
        self.block = d.decompress(frame)  # checks the frame's checksum
        if len(frame) < n or not d.eof:
            raise ValueError("truncated stat cache")
        self.pos = 0
        return True

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
        if self.f.read(len(MAGIC)) != MAGIC or not self.next_block():
            return None
        b = self.block
        (n,) = _LEN.unpack_from(b)
        if b[_LEN.size:_LEN.size + n] != root:
            return None
        (started,) = _START.unpack_from(b, _LEN.size + n)
        self.pos = _LEN.size + n + _START.size
        return int(started)

    def rows(self) -> Iterator[Row]:
        with self.f:
            while True:
                b, pos = self.block, self.pos
                end = len(b)
                while pos < end:
                    plen, llen = _LENS.unpack_from(b, pos)
                    p = pos + _LENS.size
                    k = p + plen
                    line = k + KEY.size
                    pos = line + llen
                    if pos > end:
                        raise ValueError("a stat cache record past its block")
                    yield b[p:k], b[k:line], b[line:pos]
                if not self.next_block():
                    return


def file_digest(line: bytes) -> bytes | None:
    """The raw content digest a file's manifest line names; None for any other kind of entry."""
    if line.split(b"\t", 2)[1] != b"f":
        return None
    return bytes.fromhex(line.rsplit(b"\t", 2)[1][:64].decode())


def cache_path(store_root: Path, profile: str, chroot: str) -> Path:
    import blake3

    name = blake3.blake3(os.fsencode(chroot)).hexdigest()[:16]
    return store_root / "cache" / f"stat-{profile}-{name}"
