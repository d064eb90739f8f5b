"""Tree manifests: the exact description of a rootfs, one entry per file system object.

A manifest is a text file, one entry per line, fields separated by TAB, stored as a zstd-compressed
content-addressed object. docs/format.md specifies it; decode() refuses anything that could make a
checkout write outside its destination ('..', absolute paths, empty components, a parent that is not
a directory).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from . import native
from .errors import IntegrityError

HEADER = b"imgstore-manifest 1\n"

# Entry types. A hardlink entry ('h') points at the first path of the same inode, which is always
# an earlier entry of type 'f'.
FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO = "f", "d", "l", "h", "c", "b", "p"
TYPES = frozenset((FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO))

_UNSAFE = re.compile(rb"[^\x21-\x24\x26-\x2b\x2d-\x3c\x3e-\x7e]")  # escapes %, ',', '=', space, controls, 8-bit
_ESCAPED = re.compile(rb"%([0-9A-F]{2})")
_HEX64 = re.compile(rb"[0-9a-f]{64}")
_TYPE_OF = {t.encode(): t for t in TYPES}


def escape(raw: bytes) -> bytes:
    return _UNSAFE.sub(lambda m: b"%%%02X" % m.group(0)[0], raw)


def unescape(text: bytes) -> bytes:
    if b"%" not in text:  # most names: no regex call (a manifest decode does one per entry)
        return text
    return _ESCAPED.sub(lambda m: bytes((int(m.group(1), 16),)), text)


class Entry:
    """One line of a manifest. The records every command imports are plain classes and NamedTuples, not
    dataclasses: importing dataclasses (with inspect) and generating their methods cost each command
    about 0.01 s (docs/benchmarks.md)."""

    __slots__ = ("path", "type", "mode", "uid", "gid", "mtime_ns", "size", "digest", "target", "rdev", "xattrs",
                 "sparse")

    def __init__(self, path: bytes, type: str, mode: int, uid: int, gid: int, mtime_ns: int, size: int = 0,
                 digest: str = "", target: bytes = b"", rdev: tuple[int, int] = (0, 0),
                 xattrs: tuple[tuple[bytes, bytes], ...] = (), sparse: bool = False) -> None:
        self.path = path  # relative to the tree root, b"." for the root itself
        self.type = type
        self.mode = mode  # permission bits incl. setuid/setgid/sticky (07777)
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.size = size
        self.digest = digest  # BLAKE3 hex of the content, files only
        self.target = target  # symlink target (verbatim) or first path of a hardlink
        self.rdev = rdev
        self.xattrs = xattrs
        self.sparse = sparse

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in Entry.__slots__)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return "Entry(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in Entry.__slots__) + ")"

    def meta_key(self) -> tuple[object, ...]:
        return (self.type, self.mode, self.uid, self.gid, self.xattrs, self.target, self.rdev)

    def encode(self) -> bytes:
        t = self.type
        if t == FILE:
            data = self.digest.encode() + (b",sparse" if self.sparse else b"")
        elif t in (SYMLINK, HARDLINK):
            data = escape(self.target)
        elif t in (CHAR, BLOCK):
            data = b"%d,%d" % self.rdev
        else:
            data = b"-"
        xa = b",".join(escape(k) + b"=" + v.hex().encode() for k, v in self.xattrs) or b"-"
        return b"%s\t%s\t%o\t%d\t%d\t%d\t%d\t%s\t%s\n" % (
            escape(self.path), t.encode(), self.mode, self.uid, self.gid, self.mtime_ns, self.size, data, xa,
        )


def sort_key(path: bytes) -> list[bytes]:
    """Manifest order: depth-first, siblings sorted by name bytes (the root b'.' first)."""
    return [] if path == b"." else path.split(b"/")


def encode(entries: Iterable[Entry]) -> Iterator[bytes]:
    yield HEADER
    for e in entries:
        yield e.encode()


def check_path(path: bytes) -> None:
    if path == b".":
        return
    if not path or path.startswith(b"/") or b"\0" in path:
        raise IntegrityError(
            f"manifest entry {path!r} is not a safe relative path", "the manifest is hostile or damaged"
        )
    for part in path.split(b"/"):
        if part in (b"", b".", b".."):
            raise IntegrityError(
                f"manifest entry {path!r} has a '{part.decode()}' component", "the manifest is hostile or damaged"
            )


def decode(data: bytes, what: str = "manifest") -> list[Entry]:
    """Parse and validate a whole manifest."""
    if not data.startswith(HEADER):
        raise IntegrityError(f"{what} is not an imgstore manifest of a known version", "run: imgstore verify")
    fast = native.decoder()
    if fast is not None:
        # The same entries, checked the same way (the rootfs's 6,884: 0.027 s against 0.07 s); None where
        # anything is not exactly canonical and valid: decoded below, which names what is wrong.
        decoded = fast(data[len(HEADER):], Entry)
        if decoded is not None:
            return decoded
    entries: list[Entry] = []
    kinds: dict[bytes, str] = {}
    open_dirs: list[bytes] = []  # the directories on the path to the previous entry: tree order
    for lineno, line in enumerate(data[len(HEADER):].split(b"\n"), start=2):
        if not line:
            continue
        try:
            e = decode_line(line)
        except (ValueError, IndexError) as exc:
            raise IntegrityError(f"{what} line {lineno} is malformed ({exc})", "run: imgstore verify") from None
        check_path(e.path)
        if e.path in kinds:
            raise IntegrityError(f"{what} lists {e.path!r} twice", "the manifest is hostile or damaged")
        if e.path != b".":
            parent = e.path.rpartition(b"/")[0] or b"."
            if kinds.get(parent) != DIR:
                raise IntegrityError(
                    f"{what}: the parent of {e.path!r} is not an earlier directory entry",
                    "the manifest is hostile or damaged",
                )
            while open_dirs and open_dirs[-1] != parent:
                open_dirs.pop()
            if not open_dirs:
                raise IntegrityError(f"{what}: {e.path!r} is out of tree order", "the manifest is hostile or damaged")
        elif e.type != DIR:
            raise IntegrityError(f"{what}: the root entry is not a directory", "the manifest is hostile or damaged")
        if e.type == DIR:
            open_dirs.append(e.path)
        if e.type == HARDLINK:
            check_path(e.target)
            if kinds.get(e.target) != FILE:
                raise IntegrityError(
                    f"{what}: hardlink {e.path!r} points at {e.target!r}, which is not an earlier file",
                    "the manifest is hostile or damaged",
                )
        kinds[e.path] = e.type
        entries.append(e)
    if not entries or entries[0].path != b".":
        raise IntegrityError(f"{what} has no root entry", "the manifest is hostile or damaged")
    return entries


def decode_line(line: bytes) -> Entry:
    """One entry (without its newline), unchecked: decode() checks paths and order."""
    path_s, t_s, mode_s, uid_s, gid_s, mtime_s, size_s, data, xa = line.split(b"\t")
    t = _TYPE_OF.get(t_s)
    if t is None:
        raise ValueError(f"unknown type {t_s!r}")
    mode, uid, gid, size = int(mode_s, 8), int(uid_s), int(gid_s), int(size_s)
    if mode & ~0o7777 or uid < 0 or gid < 0 or size < 0:
        raise ValueError("mode, owner or size out of range")
    digest, target, rdev, sparse = "", b"", (0, 0), False
    if t == FILE:
        hexd, _, flag = data.partition(b",")
        if not _HEX64.fullmatch(hexd):
            raise ValueError("bad content hash")
        digest, sparse = hexd.decode(), flag == b"sparse"
    elif t in (SYMLINK, HARDLINK):
        target = unescape(data)
    elif t in (CHAR, BLOCK):
        major, minor = data.split(b",")
        rdev = (int(major), int(minor))
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    if xa != b"-":
        pairs = []
        for item in xa.split(b","):
            k, v = item.split(b"=")
            pairs.append((unescape(k), bytes.fromhex(v.decode())))
        xattrs = tuple(pairs)
    # Positional: the slotted dataclass's __init__ is the hot path of every manifest read.
    return Entry(unescape(path_s), t, mode, uid, gid, int(mtime_s), size, digest, target, rdev, xattrs, sparse)
