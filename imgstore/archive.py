"""export and import: a generation as a tar (zstd), a squashfs image or a directory, and back.

The tar is POSIX pax, written here block by block so the same generation always gives the same bytes:
members in manifest order named ./path, numeric owners only (no user or group names), nanosecond mtimes
as pax `mtime`, xattrs (security.capability, POSIX ACLs, ...) as `SCHILY.xattr.<name>` with their raw
bytes, names and link targets that are not UTF-8 under `hdrcharset=BINARY`, hardlinks as hardlinks,
sparse files in GNU sparse format 1.0 (holes are the all-zero 4 KiB blocks, as checkout makes them).
GNU tar and Python's tarfile read it.

import validates every member before the first write, extracts into a staging tree inside the store
under the store lock, and commits that tree like any chroot, so the same tree gives the same
generation id whichever way it arrived.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any, BinaryIO

import zstandard

from . import bootfiles, generations
from .browse import checkout as browse_checkout
from .browse import entries as manifest_entries
from .checkout import DIR_FLAGS, Progress, _apply_fd, _apply_path, check_objects
from .commit import CommitResult
from .commit import commit as commit_tree
from .durable import TMP_PREFIX, fsync_dir, no_space, tmp_name
from .errors import Conflict, ImgstoreError, IntegrityError, NotFound, UsageError
from .generations import Generation
from .locking import store_lock
from .manifest import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, Entry
from .materialize import _rmtree
from .statcache import cache_path
from .store import Store

FORMATS = ("tar", "squashfs", "dir")
BLOCKSIZE = 512
RECORDSIZE = 20 * BLOCKSIZE  # archives end on a 10 KiB record, as GNU tar and tarfile write them
HOLE = 4096
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_LEVEL = 3
NS = 10**9


def format_for(out: Path, given: str | None) -> str:
    if given is not None:
        if given not in FORMATS:
            raise UsageError(f"unknown export format {given!r}", f"use --format {', '.join(FORMATS)}")
        return given
    name = out.name
    if name.endswith((".tar.zst", ".tzst", ".tar")):
        return "tar"
    if name.endswith((".sqfs", ".squashfs")):
        return "squashfs"
    if _OTHER_ARCHIVE.search(name):
        # Not silently a directory called web.tar.gz.
        raise UsageError(f"imgstore does not write {name.rpartition('.')[2]} archives ({out})",
                         "name it .tar.zst, .tar or .sqfs, or pass --format dir for a directory")
    return "dir"


_OTHER_ARCHIVE = re.compile(r"\.(tar\.[a-z0-9]+|tgz|txz|tbz2?|zip|gz|xz|bz2|zst|img|iso|cpio)$", re.IGNORECASE)


@dataclass
class ExportResult:
    generation: str
    gen_id: str
    out: Path
    format: str
    entries: int
    bytes: int  # size of what was written: the archive file, or the files of the tree
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- tar writing ------------------------------------------------------------------------------------
def _octal(n: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, n)


def _fits(n: int, width: int) -> bool:
    return 0 <= n < 1 << (3 * (width - 1))


def _portable(raw: bytes) -> bool:
    return all(0x20 <= c < 0x7F for c in raw)


def _stub(raw: bytes, limit: int) -> bytes:
    """What old readers see when the real name is in a pax record: printable ASCII, truncated."""
    return bytes(c if 0x20 <= c < 0x7F else 0x5F for c in raw[:limit])


def _pax_record(key: bytes, value: bytes) -> bytes:
    n = len(key) + len(value) + 3
    p = 0
    while (total := n + len(str(p))) != p:  # the length counts its own digits
        p = total
    return b"%d %s=%s\n" % (p, key, value)


def _pax_time(ns: int) -> bytes:
    sign = b"-" if ns < 0 else b""
    sec, frac = divmod(abs(ns), NS)
    return sign + (b"%d.%09d" % (sec, frac)).rstrip(b"0") if frac else sign + b"%d" % sec


def _header(name: bytes, e: Entry, size: int, typeflag: bytes, linkname: bytes = b"") -> bytes:
    h = bytearray(BLOCKSIZE)
    h[0:len(name)] = name
    h[100:108] = _octal(e.mode, 8)
    h[108:116] = _octal(e.uid if _fits(e.uid, 8) else 0, 8)
    h[116:124] = _octal(e.gid if _fits(e.gid, 8) else 0, 8)
    h[124:136] = _octal(size if _fits(size, 12) else 0, 12)
    sec = e.mtime_ns // NS
    h[136:148] = _octal(sec if _fits(sec, 12) else 0, 12)
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157:157 + len(linkname)] = linkname
    h[257:265] = b"ustar\x0000"
    if typeflag in (b"3", b"4"):
        h[329:337] = _octal(e.rdev[0], 8)
        h[337:345] = _octal(e.rdev[1], 8)
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _pad(n: int) -> bytes:
    return bytes(-n % BLOCKSIZE)


_ZERO_MIB = bytes(1 << 20)


def _aligned(chunks: Iterable[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    """Re-cut a content stream into pieces of `size` bytes (the last may be shorter)."""
    buf = bytearray()
    for c in chunks:
        if not buf and len(c) == size:
            yield c  # the object store's chunks are already 1 MiB: no copy
            continue
        buf += c
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


def data_regions(chunks: Iterable[bytes], size: int) -> list[tuple[int, int]]:
    """(offset, length) of the content outside all-zero 4 KiB blocks: the data of a sparse file."""
    regions: list[tuple[int, int]] = []
    zero = _ZERO_MIB[:HOLE]
    pos = 0
    for piece in _aligned(chunks):
        if piece == _ZERO_MIB[:len(piece)]:
            pos += len(piece)
            continue
        for i in range(0, len(piece), HOLE):
            block = piece[i:i + HOLE]
            if block != zero[:len(block)]:
                if regions and regions[-1][0] + regions[-1][1] == pos:
                    regions[-1] = (regions[-1][0], regions[-1][1] + len(block))
                else:
                    regions.append((pos, len(block)))
            pos += len(block)
    if pos != size:
        raise IntegrityError(f"an object has {pos} bytes, its manifest entry {size}", "run: imgstore verify")
    return regions


class _TarWriter:
    """Collects small writes (headers) so the compressor sees large ones."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink = sink
        self.buf = bytearray()
        self.offset = 0

    def write(self, data: bytes) -> None:
        self.offset += len(data)
        if len(data) >= 1 << 16:
            self.flush()
            self.sink.write(data)
            return
        self.buf += data
        if len(self.buf) >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.sink.write(bytes(self.buf))
            self.buf.clear()


def _write_member(w: _TarWriter, store: Store, e: Entry) -> int:
    """Write one entry; return the content bytes written."""
    name = b"./" if e.path == b"." else b"./" + e.path + (b"/" if e.type == DIR else b"")
    typeflag = {FILE: b"0", HARDLINK: b"1", SYMLINK: b"2", CHAR: b"3", BLOCK: b"4", DIR: b"5", FIFO: b"6"}[e.type]
    linkname = b"./" + e.target if e.type == HARDLINK else e.target if e.type == SYMLINK else b""
    size = e.size if e.type == FILE else 0
    regions: list[tuple[int, int]] | None = None
    sparse_recs: list[bytes] = []
    map_block = b""
    header_name = name
    if e.type == FILE and e.sparse:
        regions = data_regions(store.objects.read_chunks(e.digest), e.size)
        sparse_map = list(regions)
        if not sparse_map or sum(sparse_map[-1]) != e.size:
            sparse_map.append((e.size, 0))  # GNU tar marks a trailing hole with an empty last region
        text = b"%d\n" % len(sparse_map) + b"".join(b"%d\n%d\n" % r for r in sparse_map)
        map_block = text + _pad(len(text))
        size = len(map_block) + sum(n for _o, n in regions)
        d, _, base = name.rpartition(b"/")
        header_name = d + b"/GNUSparseFile.0/" + base
        sparse_recs = [_pax_record(b"GNU.sparse.major", b"1"), _pax_record(b"GNU.sparse.minor", b"0"),
                       _pax_record(b"GNU.sparse.name", name), _pax_record(b"GNU.sparse.realsize", b"%d" % e.size)]

    recs: list[bytes] = []
    if not (len(header_name) <= 100 and _portable(header_name)):
        recs.append(_pax_record(b"path", header_name))
    if linkname and not (len(linkname) <= 100 and _portable(linkname)):
        recs.append(_pax_record(b"linkpath", linkname))
    if not _fits(size, 12):
        recs.append(_pax_record(b"size", b"%d" % size))
    if not _fits(e.uid, 8):
        recs.append(_pax_record(b"uid", b"%d" % e.uid))
    if not _fits(e.gid, 8):
        recs.append(_pax_record(b"gid", b"%d" % e.gid))
    if e.mtime_ns % NS or not _fits(e.mtime_ns // NS, 12):
        recs.append(_pax_record(b"mtime", _pax_time(e.mtime_ns)))
    recs += sparse_recs
    recs += [_pax_record(b"SCHILY.xattr." + k, v) for k, v in e.xattrs]
    if recs:
        binary = False
        for raw in (header_name, linkname, name if sparse_recs else b""):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                binary = True
        if binary:
            recs.insert(0, _pax_record(b"hdrcharset", b"BINARY"))
        body = b"".join(recs)
        pax = Entry(path=b"", type=FILE, mode=0o644, uid=0, gid=0, mtime_ns=0)
        w.write(_header(b"././@PaxHeader", pax, len(body), b"x") + body + _pad(len(body)))
    w.write(_header(_stub(header_name, 100), e, size, typeflag, _stub(linkname, 100)))
    if e.type != FILE:
        return 0
    if regions is None:
        n = 0
        for chunk in store.objects.read_chunks(e.digest):
            w.write(chunk)
            n += len(chunk)
        if n != e.size:
            raise IntegrityError(f"object {e.digest[:16]} has {n} bytes, its manifest entry {e.size}",
                                 "run: imgstore verify")
        w.write(_pad(n))
        return n
    w.write(map_block)
    pos = 0
    ri = 0
    for piece in _aligned(store.objects.read_chunks(e.digest)):
        end = pos + len(piece)
        while ri < len(regions) and regions[ri][0] < end:
            off, length = regions[ri]
            lo, hi = max(off, pos), min(off + length, end)
            w.write(piece[lo - pos:hi - pos])
            if off + length > end:
                break
            ri += 1
        pos = end
    w.write(_pad(size))
    return e.size


def write_tar(store: Store, entries: list[Entry], sink: BinaryIO, progress: Progress | None = None) -> None:
    w = _TarWriter(sink)
    nbytes = 0
    for n, e in enumerate(entries, 1):
        nbytes += _write_member(w, store, e)
        if progress and n % 256 == 0:
            progress(n, nbytes)
    w.write(bytes(2 * BLOCKSIZE))
    w.write(bytes(-w.offset % RECORDSIZE))
    w.flush()
    if progress:
        progress(len(entries), nbytes)


# -- publishing an output file ----------------------------------------------------------------------
def _check_out(out: Path, force: bool, is_dir: bool) -> None:
    if not out.parent.is_dir():
        raise NotFound(f"the folder of {out} does not exist", "create it first, or choose another output path")
    if not os.path.lexists(out):
        return
    if is_dir:
        if not out.is_dir() or out.is_symlink():
            raise Conflict(f"{out} exists and is not a directory", "choose a new path for the exported tree")
        if any(os.scandir(out)):
            raise Conflict(f"{out} exists and is not empty",
                           "choose a new or empty directory (export never deletes a tree; remove it yourself)")
        return
    if out.is_dir() and not out.is_symlink():
        raise Conflict(f"{out} is a directory", "give the path of the file to write")
    if not force:
        raise Conflict(f"{out} already exists", "choose another name, or pass --force to replace it")


@contextmanager
def _staged_file(out: Path, force: bool) -> Iterator[Path]:
    """A temp path next to `out`; on success it becomes `out` (never clobbering one without `force`)."""
    tmp = tmp_name(out)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.rename(tmp, out)
        else:
            try:
                os.link(tmp, out)  # fails if `out` appeared meanwhile: no silent overwrite
            except FileExistsError:
                raise Conflict(f"{out} appeared while exporting", "choose another name, or pass --force") from None
            os.unlink(tmp)
        fsync_dir(out.parent)
    except BaseException as exc:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space(out, exc) from exc
        raise


def _export_tar(store: Store, es: list[Entry], out: Path, force: bool, progress: Progress | None) -> int:
    compress = not out.name.endswith(".tar")
    with _staged_file(out, force) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with open(fd, "wb") as f:
            if compress:
                # Multi-threaded zstd output does not depend on the number of threads (zstd >= 1.5).
                cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1, write_checksum=True)
                with cctx.stream_writer(f, closefd=False) as z:
                    write_tar(store, es, z, progress)
            else:
                write_tar(store, es, f, progress)
        return os.stat(tmp).st_size


def _export_squashfs(store: Store, gen: Generation, es: list[Entry], out: Path, force: bool,
                     progress: Progress | None) -> int:
    exe = shutil.which("mksquashfs")
    if exe is None:
        raise NotFound("mksquashfs is not installed", "run: apt-get install squashfs-tools")
    if os.geteuid() != 0:
        raise UsageError("a squashfs export needs root (its temporary checkout must keep owners and devices)",
                         "run it as root, or use --format tar")
    tree = tmp_name(out).with_suffix(".tree")
    try:
        browse_checkout(store, gen, tree, progress)
        # Only the superblock's creation time would differ between two runs (mksquashfs >= 4.4 is
        # otherwise reproducible); set it to the newest mtime of the tree. File times are kept as they are.
        mkfs_time = max(0, max(e.mtime_ns for e in es) // NS)
        with _staged_file(out, force) as tmp:
            r = subprocess.run(
                [exe, os.fspath(tree), os.fspath(tmp), "-noappend", "-no-progress", "-quiet", "-xattrs",
                 "-comp", "zstd", "-mkfs-time", str(mkfs_time)],
                capture_output=True, text=True, errors="replace",
            )
            if r.returncode != 0:
                last = (r.stderr.strip() or r.stdout.strip() or "no message").splitlines()[-1]
                if "No space left" in r.stderr:
                    raise no_space(out, OSError(errno.ENOSPC, last))
                raise ImgstoreError(f"mksquashfs failed: {last}", "check its message; the output was not written")
            return os.stat(tmp).st_size
    finally:
        if os.path.lexists(tree):
            _rmtree(tree)


def _export_dir(store: Store, gen: Generation, out: Path, progress: Progress | None) -> int:
    tree = tmp_name(out)
    try:
        res = browse_checkout(store, gen, tree, progress)
        try:
            os.rename(tree, out)  # replaces an empty directory; a half-made tree is never at `out`
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise Conflict(f"{out} appeared while exporting", "choose a new or empty directory") from None
            raise
        fsync_dir(out.parent)
        return res.bytes
    except BaseException:
        if os.path.lexists(tree):
            _rmtree(tree)
        raise


def export(store: Store, ref: str, out: Path, fmt: str | None = None, force: bool = False,
           progress: Progress | None = None, profile: str | None = None) -> ExportResult:
    t0 = time.monotonic()
    out = out.absolute()
    kind = format_for(out, fmt)
    with store.engine.connect() as conn:
        gen = generations.resolve(conn, ref, profile)
    _check_out(out, force, kind == "dir")
    es = manifest_entries(store, gen)
    check_objects(store.objects, es)  # before anything is written
    if kind == "tar":
        size = _export_tar(store, es, out, force, progress)
    elif kind == "squashfs":
        size = _export_squashfs(store, gen, es, out, force, progress)
    else:
        size = _export_dir(store, gen, out, progress)
    res = ExportResult(gen.ref, gen.gen_id, out, kind, len(es), size, time.monotonic() - t0)
    if kind == "squashfs":
        acls = sum(1 for e in es if any(k.startswith(b"system.") for k, _ in e.xattrs))
        if acls:
            res.warnings.append(f"squashfs cannot store POSIX ACLs (system.* xattrs): {acls} entries lost theirs")
        if any(e.mtime_ns % NS for e in es):
            res.warnings.append("squashfs keeps mtimes in whole seconds; the nanoseconds were dropped")
    return res


# -- tar reading ------------------------------------------------------------------------------------
def _hostile(what: str) -> IntegrityError:
    return IntegrityError(what, "the archive is hostile or damaged; nothing was written")


@contextmanager
def _open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist", "give the path of a .tar.zst or .tar file") from None
    with f:
        src: IO[bytes] = f
        if f.read(4) == ZSTD_MAGIC:
            f.seek(0)
            src = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        else:
            f.seek(0)
        try:
            with tarfile.open(fileobj=src, mode="r|", encoding="utf-8", errors="surrogateescape") as tf:
                yield tf
        except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
            raise IntegrityError(f"{path} is not a readable tar archive ({exc})",
                                 "give a .tar.zst or .tar made by imgstore export or tar --format=pax") from None


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _rel(name: str, what: str) -> bytes:
    raw = _b(name)
    if raw.startswith(b"/"):
        raise _hostile(f"archive member {raw!r} has an absolute {what}")
    parts = raw.split(b"/")
    while parts and parts[0] == b".":
        parts.pop(0)
    while parts and parts[-1] == b"":
        parts.pop()
    if not parts:
        return b"."
    if b".." in parts:
        raise _hostile(f"archive member {raw!r} has a '..' in its {what}")
    if b"" in parts or b"." in parts or b"\0" in raw:
        raise _hostile(f"archive member {raw!r} has an empty or '.' component in its {what}")
    return b"/".join(parts)


def _mtime_ns(m: tarfile.TarInfo) -> int:
    raw = m.pax_headers.get("mtime")
    if raw is None:
        return int(m.mtime) * NS
    try:
        ns = int((Decimal(raw) * NS).to_integral_value(rounding=ROUND_FLOOR))
    except (InvalidOperation, OverflowError, ValueError):
        ns = 1 << 63
    if not -(1 << 63) <= ns < 1 << 63:
        raise _hostile(f"archive member {m.name!r} has a malformed mtime {raw!r}")
    return ns


def _xattrs(m: tarfile.TarInfo) -> tuple[tuple[bytes, bytes], ...]:
    out = []
    for k, v in m.pax_headers.items():
        if k.startswith("SCHILY.xattr."):
            out.append((_b(k[len("SCHILY.xattr."):]), _b(v)))
        elif k.startswith("SCHILY.acl."):
            raise UsageError(
                f"archive member {m.name!r} carries ACLs as text ({k}, tar --acls); imgstore keeps them as xattrs",
                "create the archive with tar --xattrs --xattrs-include='*' (no --acls), or with imgstore export",
            )
    return tuple(sorted(out))


@dataclass
class _Step:
    entry: Entry
    member: bool  # False: a directory the archive implies but does not list
    sparse: list[tuple[int, int]] | None = None


def _plan(tf: tarfile.TarFile) -> list[_Step]:
    """Validate every member and return what to create, in order; nothing is written here."""
    steps: list[_Step] = []
    kinds: dict[bytes, str] = {b".": DIR}
    explicit: set[bytes] = set()
    first_link: dict[bytes, bytes] = {}
    uid, gid = (0, 0) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
    # Directories the archive does not list (the root included) get fixed, documented metadata.
    steps.append(_Step(Entry(path=b".", type=DIR, mode=0o755, uid=uid, gid=gid, mtime_ns=0), False))
    for m in tf:
        path = _rel(m.name, "path")
        e = Entry(path=path, type="", mode=m.mode & 0o7777, uid=m.uid, gid=m.gid, mtime_ns=_mtime_ns(m),
                  xattrs=_xattrs(m))
        if m.isreg():
            e.type, e.size = FILE, m.size
        elif m.isdir():
            e.type = DIR
        elif m.issym():
            e.type, e.target = SYMLINK, _b(m.linkname)
            if not e.target:
                raise _hostile(f"archive member {path!r} is a symlink with an empty target")
        elif m.islnk():
            e.type, target = HARDLINK, _rel(m.linkname, "link target")
            if kinds.get(target) not in (FILE, HARDLINK):
                raise _hostile(f"archive member {path!r} is a hardlink to {target!r}, not to an earlier file")
            e.target = first_link.get(target, target)
        elif m.ischr() or m.isblk():
            e.type, e.rdev = (CHAR if m.ischr() else BLOCK), (m.devmajor, m.devminor)
        elif m.isfifo():
            e.type = FIFO
        else:
            raise _hostile(f"archive member {m.name!r} has the unsupported type {m.type!r}")
        if not all(0 <= n < 1 << 32 for n in (e.uid, e.gid, *e.rdev)):
            raise _hostile(f"archive member {path!r} has an owner or device number out of range")
        parts = path.split(b"/")
        for i in range(1, len(parts)):
            parent = b"/".join(parts[:i])
            k = kinds.get(parent)
            if k is None:
                kinds[parent] = DIR
                steps.append(_Step(Entry(path=parent, type=DIR, mode=0o755, uid=uid, gid=gid, mtime_ns=0), False))
            elif k != DIR:
                raise _hostile(f"archive member {path!r} lies below {parent!r}, which is not a directory")
        if path == b"." and e.type != DIR:
            raise _hostile(f"archive member {m.name!r} names the root but is not a directory")
        if path in explicit:
            raise _hostile(f"archive lists {path!r} twice")
        if path in kinds and e.type != DIR:
            raise _hostile(f"archive member {path!r} is not a directory, but earlier members lie below it")
        kinds[path] = e.type
        explicit.add(path)
        if e.type == FILE:
            first_link[path] = path
        elif e.type == HARDLINK:
            first_link[path] = e.target
        if os.geteuid() != 0 and (e.uid != uid or e.gid != gid or e.type in (CHAR, BLOCK)
                                  or any(k.startswith((b"security.", b"trusted.")) for k, _ in e.xattrs)):
            raise UsageError(f"{path!r} in the archive needs root to be recreated (owner, device or xattr)",
                             "run the import as root")
        sp: Any = m.sparse  # typeshed says list[int]; tarfile fills it with (offset, length) pairs
        sparse = [(int(o), int(n)) for o, n in sp] if e.type == FILE and sp is not None else None
        steps.append(_Step(e, True, sparse))
    return steps


def _write_file(fd: int, src: IO[bytes], size: int, sparse: list[tuple[int, int]] | None) -> None:
    if sparse is None:
        left = size
        while left:
            chunk = src.read(min(left, 1 << 20))
            if not chunk:
                raise _hostile("the archive ends inside a file")
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
            left -= len(chunk)
        return
    # tarfile presents the dense content; read only the data regions. Its buffered reader cannot seek
    # in a stream, the raw member reader below it can (forward, which is all this needs).
    raw: IO[bytes] = getattr(src, "raw", src)
    for off, length in sparse:
        raw.seek(off)
        done = 0
        while done < length:
            chunk = raw.read(min(length - done, 1 << 20))
            if not chunk:
                raise _hostile("the archive ends inside a file")
            os.pwrite(fd, chunk, off + done)
            done += len(chunk)
    os.ftruncate(fd, size)


def _extract(tf: tarfile.TarFile, steps: list[_Step], dest: Path) -> None:
    """Create the planned tree under `dest` (an empty directory), reading the archive a second time."""
    root_fd = os.open(dest, DIR_FLAGS)
    dirfds: dict[bytes, int] = {b".": root_fd}
    dirs: dict[bytes, Entry] = {}  # in creation order; a listed directory replaces an implied one's metadata
    members = iter(tf)
    try:
        for step in steps:
            e = step.entry
            m = next(members) if step.member else None
            if m is not None and _rel(m.name, "path") != e.path:
                raise _hostile(f"{e.path!r} changed in the archive while it was imported")
            if e.type == DIR:
                if e.path not in dirfds:
                    parent, _, name = e.path.rpartition(b"/")
                    os.mkdir(name, 0o700, dir_fd=dirfds[parent or b"."])
                    dirfds[e.path] = os.open(name, DIR_FLAGS, dir_fd=dirfds[parent or b"."])
                dirs[e.path] = e
                continue
            parent, _, name = e.path.rpartition(b"/")
            pfd = dirfds[parent or b"."]
            if e.type == FILE:
                assert m is not None
                src = tf.extractfile(m)
                assert src is not None
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=pfd)
                try:
                    _write_file(fd, src, e.size, step.sparse)
                    _apply_fd(fd, e, own=os.geteuid() == 0)
                finally:
                    os.close(fd)
            elif e.type == HARDLINK:
                tparent, _, tname = e.target.rpartition(b"/")
                os.link(tname, name, src_dir_fd=dirfds[tparent or b"."], dst_dir_fd=pfd, follow_symlinks=False)
            elif e.type == SYMLINK:
                os.symlink(e.target, name, dir_fd=pfd)
                _apply_path(pfd, name, e, os.geteuid() == 0, symlink=True)
            else:
                kind = {CHAR: stat.S_IFCHR, BLOCK: stat.S_IFBLK, FIFO: stat.S_IFIFO}[e.type]
                os.mknod(name, kind | 0o600, os.makedev(*e.rdev), dir_fd=pfd)
                _apply_path(pfd, name, e, os.geteuid() == 0, symlink=False)
        # Directories last, deepest first: creating their children changed their mtimes.
        for path in reversed(dirs):
            _apply_fd(dirfds[path], dirs[path], own=os.geteuid() == 0)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space(dest, exc) from exc
        raise
    finally:
        for fd in dirfds.values():
            os.close(fd)


@dataclass
class ImportResult:
    archive: Path
    members: int
    commit: CommitResult
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"archive": self.archive, "members": self.members, "seconds": self.seconds,
                **self.commit.as_dict()}


def import_archive(
    store: Store, archive: Path, profile: str, message: str = "", kernel: Path | None = None,
    initrd: Path | None = None, no_kernel: bool = False, progress: Progress | None = None, wait: bool = True,
) -> ImportResult:
    t0 = time.monotonic()
    archive = archive.absolute()
    store.profile(profile)  # a wrong profile fails before the archive is read
    for p, what in ((kernel, "--kernel"), (initrd, "--initrd")):
        if p is not None and not p.is_file():
            raise NotFound(f"{what} {p} is not a file", f"give the path of the {what[2:]} image")
    if no_kernel and (kernel or initrd):
        raise UsageError("--no-kernel contradicts --kernel/--initrd", "give one or the other")
    with _open_tar(archive) as tf:
        steps = _plan(tf)
    if kernel is None and not no_kernel:
        found, _initrd = bootfiles.find({s.entry.path: s.entry for s in steps})
        if found is None:  # what commit would say, but before anything is written
            raise NotFound(f"no kernel in {archive} (boot/vmlinuz-* or vmlinuz)",
                           "pass --kernel FILE, or --no-kernel to import it without one")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", archive.name)[:80]
    staging = store.root / f"{TMP_PREFIX}import-{secrets.token_hex(6)}-{safe}"
    # One lock for extraction, commit and cleanup: staging is only ever written under the store lock
    # (docs/format.md, invariant 4), and nothing else can discard it while it is in use.
    with store_lock(store.root, "import", wait):
        try:
            os.mkdir(staging, 0o700)
            with _open_tar(archive) as tf:
                _extract(tf, steps, staging)
            res = commit_tree(store, staging, profile, message or f"import {archive.name}", kernel, initrd,
                              no_kernel, progress, wait, locked=True, source=f"import of {archive}")
            with suppress(FileNotFoundError):
                os.unlink(cache_path(store.root, profile, os.fspath(staging)))  # a stat cache for a tree now gone
        finally:
            if os.path.lexists(staging):
                _rmtree(staging)
    return ImportResult(archive, sum(s.member for s in steps), res, time.monotonic() - t0)
