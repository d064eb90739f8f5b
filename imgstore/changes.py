"""What changed in a chroot since its profile's latest generation: `imgstore status CHROOT`.

The same walk as commit (scan.scan with the profile's excludes), merged against the latest generation's
manifest; both are in manifest order, so one pass compares them, line by line. A file whose inode, size,
mtime and ctime match the commit's stat cache is not read; only files whose stat differs (and whose size
does not already prove a content change) are hashed, to tell a content change from a metadata-only one.

Read-only: nothing in the store is written, not even the stat cache, and the store lock is not taken.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from . import generations, manifest
from .errors import IntegrityError, UsageError
from .manifest import BLOCK, CHAR, FILE, Entry, sort_key
from .scan import Found, scan
from .statcache import StatCache, cache_path, file_digest
from .store import Store

ADDED, REMOVED, MODIFIED, METADATA = "added", "removed", "modified", "metadata"
KINDS = (ADDED, REMOVED, MODIFIED, METADATA)
_CHUNK = 1 << 20


def show_path(rel: bytes) -> str:
    """A path as one printable line: '/'-rooted, undecodable bytes as \\xNN, control characters escaped."""
    if rel == b".":
        return "/"
    text = rel.decode("utf-8", "backslashreplace")
    return "/" + "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # one of KINDS
    path: str  # for people and JSON (show_path)
    type: str  # manifest entry type, of the tree's entry (of the generation's for removed ones)
    fields: tuple[str, ...] = ()  # what differs: content, type, mode, owner, xattrs, mtime, target, ...
    raw: bytes = b""  # the exact relative path

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "type": self.type}
        if self.kind in (MODIFIED, METADATA):
            d["fields"] = list(self.fields)
        return d


@dataclass
class ChangeReport:
    profile: str
    chroot: str
    base: str | None  # the generation compared against (web@4), None before the first commit
    base_id: str | None
    added: list[Change] = field(default_factory=list)
    removed: list[Change] = field(default_factory=list)
    modified: list[Change] = field(default_factory=list)
    metadata: list[Change] = field(default_factory=list)
    entries: int = 0  # entries in the tree (after excludes)
    hashed: int = 0  # files read to compare contents
    hashed_bytes: int = 0
    excluded: int = 0
    skipped_mounts: list[str] = field(default_factory=list)
    skipped_sockets: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not (self.added or self.removed or self.modified or self.metadata)

    def of(self, kind: str) -> list[Change]:
        lists: dict[str, list[Change]] = {ADDED: self.added, REMOVED: self.removed, MODIFIED: self.modified,
                                          METADATA: self.metadata}
        return lists[kind]

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile, "chroot": self.chroot, "base": self.base, "base_id": self.base_id,
            "clean": self.clean, "counts": {k: len(self.of(k)) for k in KINDS},
            **{k: [c.as_dict() for c in self.of(k)] for k in KINDS},
            "entries": self.entries, "hashed": self.hashed, "hashed_bytes": self.hashed_bytes,
            "excluded": self.excluded, "skipped_mounts": self.skipped_mounts,
            "skipped_sockets": self.skipped_sockets, "seconds": round(self.seconds, 3),
        }


def resolve_target(store: Store, profile: str | None, chroot: Path | None) -> tuple[str, Path]:
    """(profile name, chroot) from what the command line gave: a profile uses its commit.chroot; a chroot
    alone belongs to the store's only profile, or to the one profile whose commit.chroot it is."""
    if profile is not None:
        prof = store.profile(profile)
        if chroot is not None:
            return prof.name, chroot.absolute()
        if prof.chroot is None:
            raise UsageError(f"profile {prof.name} sets no commit.chroot",
                             f"give the chroot path as an argument, or set [commit] chroot in {prof.path}")
        return prof.name, prof.chroot
    if chroot is None:
        raise UsageError("no chroot given", "give the chroot path, or --profile NAME to use its commit.chroot")
    chroot = chroot.absolute()
    profiles = store.profiles()
    if len(profiles) == 1:
        return profiles[0].name, chroot
    owners = [p.name for p in profiles if p.chroot is not None and _same_dir(p.chroot, chroot)]
    if len(owners) == 1:
        return owners[0], chroot
    names = ", ".join(p.name for p in profiles) or "none"
    if owners:
        raise UsageError(f"{chroot} is the commit.chroot of several profiles ({', '.join(owners)})",
                         "pass --profile NAME")
    raise UsageError(f"{chroot} is not the commit.chroot of any profile", f"pass --profile NAME (profiles: {names})")


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normpath(a.absolute()) == os.path.normpath(b)


def chroot_changes(store: Store, profile: str, chroot: Path) -> ChangeReport:
    t0 = time.monotonic()
    prof = store.profile(profile)
    chroot = chroot.absolute()
    found_iter, scan_report = scan(chroot, prof.excludes)
    with store.engine.connect() as conn:
        gen = generations.latest(conn, prof.name)
    old = _manifest_lines(store, gen) if gen is not None else []
    cache = StatCache.load(cache_path(store.root, prof.name, os.fspath(chroot)), os.fspath(chroot))
    rep = ChangeReport(prof.name, os.fspath(chroot), gen.ref if gen else None, gen.gen_id if gen else None)
    to_hash: list[tuple[Found, bytes, list[str]]] = []

    for o, f in _merge(old, found_iter):
        if f is None:
            assert o is not None
            rep.removed.append(Change(REMOVED, show_path(o[0]), o[1].split(b"\t", 2)[1].decode(), (), o[0]))
            continue
        rep.entries += 1
        if o is None:
            rep.added.append(_change(ADDED, f.entry))
        else:
            _compare(o[1], f, cache, rep, to_hash)

    if to_hash:
        with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
            digests = list(pool.map(_hash, (f.abspath for f, _d, _fields in to_hash)))
        for (f, old_digest, fields), digest in zip(to_hash, digests, strict=True):
            if digest is None:  # removed while we looked
                rep.removed.append(_change(REMOVED, f.entry))
                continue
            rep.hashed += 1
            rep.hashed_bytes += f.entry.size
            if digest.encode() != old_digest:
                rep.modified.append(_change(MODIFIED, f.entry, ("content", *fields)))
            elif fields:
                rep.metadata.append(_change(METADATA, f.entry, tuple(fields)))
        for lst in (rep.removed, rep.modified, rep.metadata):
            lst.sort(key=lambda c: sort_key(c.raw))
    rep.excluded = scan_report.excluded
    rep.skipped_mounts = scan_report.skipped_mounts
    rep.skipped_sockets = scan_report.skipped_sockets
    rep.seconds = time.monotonic() - t0
    return rep


OldLine = tuple[bytes, bytes]  # (exact path, manifest line without its newline)


def _manifest_lines(store: Store, gen: generations.Generation) -> list[OldLine]:
    """The generation's manifest as (path, line) pairs, in manifest order.

    Lines are compared as encoded text instead of decoded entries: the encoding is canonical, so equal
    entries give equal lines, and skipping manifest.decode halves the time of a status on an unchanged
    tree. Nothing from these lines is ever written anywhere, so decode's safety checks are not needed here
    (imgstore verify runs them).
    """
    data = store.objects.read(gen.manifest)
    if not data.startswith(manifest.HEADER):
        raise IntegrityError(f"the manifest of {gen.ref} is not an imgstore manifest of a known version",
                             "run: imgstore verify")
    out = []
    for line in data[len(manifest.HEADER):].split(b"\n"):
        if line:
            path = line[:line.index(b"\t")]
            out.append((manifest.unescape(path) if b"%" in path else path, line))
    return out


def _merge(old: list[OldLine], new: Iterator[Found]) -> Iterator[tuple[OldLine | None, Found | None]]:
    """Walk two manifest-ordered sequences together: (None, added), (removed, None) or (old, same path)."""
    oi = iter(old)
    o = next(oi, None)
    okey = sort_key(o[0]) if o is not None else []
    for f in new:
        if o is not None and o[0] != f.entry.path:
            nkey = sort_key(f.entry.path)
            while o is not None and okey < nkey:
                yield o, None
                o = next(oi, None)
                okey = sort_key(o[0]) if o is not None else []
        if o is not None and o[0] == f.entry.path:
            yield o, f
            o = next(oi, None)
            okey = sort_key(o[0]) if o is not None else []
        else:
            yield None, f
    while o is not None:
        yield o, None
        o = next(oi, None)


def _change(kind: str, e: Entry, fields: tuple[str, ...] = ()) -> Change:
    return Change(kind, show_path(e.path), e.type, fields, e.path)


def _compare(old_line: bytes, f: Found, cache: StatCache, rep: ChangeReport,
             to_hash: list[tuple[Found, bytes, list[str]]]) -> None:
    n = f.entry
    digest = None
    if n.type == FILE:
        row = cache.lookup(n.path, f.st)
        raw = None if row is None else file_digest(row[2])
        if raw is not None:
            digest = n.digest = raw.hex()
    new_line = n.encode()[:-1]
    if new_line == old_line:
        return
    # Fields by position (docs/format.md): path type mode uid gid mtime_ns size data xattrs
    o, w = old_line.split(b"\t"), new_line.split(b"\t")
    if o[1] != w[1]:
        rep.modified.append(_change(MODIFIED, n, ("type",)))
        return
    fields = []
    if o[2] != w[2]:
        fields.append("mode")
    if o[3:5] != w[3:5]:
        fields.append("owner")
    if o[8] != w[8]:
        fields.append("xattrs")
    if o[5] != w[5]:
        fields.append("mtime")
    if n.type != FILE:
        if o[7] != w[7]:
            fields.append("device" if n.type in (CHAR, BLOCK) else "target")
        if fields:
            rep.metadata.append(_change(METADATA, n, tuple(fields)))
        return
    old_digest, _, old_flag = o[7].partition(b",")
    if (old_flag == b"sparse") != n.sparse:
        fields.append("sparse")
    if o[6] != w[6] or (digest is not None and digest.encode() != old_digest):
        rep.modified.append(_change(MODIFIED, n, ("content", *fields)))
    elif digest is None:
        to_hash.append((f, old_digest, fields))
    elif fields:
        rep.metadata.append(_change(METADATA, n, tuple(fields)))


def _hash(abspath: bytes) -> str | None:
    try:
        fd = os.open(abspath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        h = blake3.blake3()
        while chunk := os.read(fd, _CHUNK):
            h.update(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)


def collapse(changes: list[Change]) -> Iterator[tuple[Change, int]]:
    """Each change with the number of changes of the same kind below it, skipping those: a new or removed
    directory is shown once, not with every file inside it. Input in manifest order."""
    i = 0
    while i < len(changes):
        c = changes[i]
        prefix = c.raw + b"/" if c.raw != b"." else b""
        j = i + 1
        if c.type == "d":
            while j < len(changes) and changes[j].raw.startswith(prefix):
                j += 1
        yield c, j - i - 1
        i = j
