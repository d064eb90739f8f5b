"""diff: what changed between two generations, from their manifests alone.

Both manifests are in manifest order (depth-first, siblings by name bytes), so one merge walk pairs the
entries by path in O(n). No content is read: a file's content is its hash. The only object read besides
the manifests is var/lib/dpkg/status of each side, for the package changes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import generations, manifest
from .browse import entries as manifest_entries
from .errors import IntegrityError
from .generations import Generation
from .manifest import BLOCK, CHAR, FILE, HARDLINK, SYMLINK, Entry
from .store import Store

DPKG_STATUS = b"var/lib/dpkg/status"

# What a changed path is filed under, in the order the human report lists them.
ADDED, REMOVED, MODIFIED, SYMLINK_CHANGED = "added", "removed", "modified", "symlink"
METADATA, MTIME = "metadata", "mtime"


def show_path(path: bytes) -> str:
    """'/etc/fstab'. A name that is not valid UTF-8 is given %XX-escaped, as the manifest writes it."""
    if path == b".":
        return "/"
    try:
        return "/" + path.decode("utf-8")
    except UnicodeDecodeError:
        return "/" + manifest.escape(path).decode("ascii")


@dataclass(frozen=True, slots=True)
class FileChange:
    path: bytes
    change: str  # added | removed | modified | symlink | metadata | mtime
    type_a: str | None  # manifest type letter on each side (None: absent)
    type_b: str | None
    size_a: int = 0  # regular-file bytes (hardlinks count 0: their bytes belong to the first link)
    size_b: int = 0
    fields: tuple[str, ...] = ()  # what differs: type content hardlink sparse rdev target mode owner xattrs mtime
    target_a: bytes = b""
    target_b: bytes = b""

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "path": show_path(self.path), "change": self.change, "type_a": self.type_a, "type_b": self.type_b,
            "size_a": self.size_a, "size_b": self.size_b, "delta": self.size_b - self.size_a,
            "fields": list(self.fields),
        }
        if self.change == SYMLINK_CHANGED:
            d["target_a"] = self.target_a.decode("utf-8", "backslashreplace")
            d["target_b"] = self.target_b.decode("utf-8", "backslashreplace")
        return d


@dataclass(frozen=True, slots=True)
class PackageChange:
    package: str  # name, or name:arch when several architectures of it are installed
    change: str  # installed | removed | upgraded | downgraded
    old: str | None  # version
    new: str | None
    arch: str

    def as_dict(self) -> dict[str, Any]:
        return {"package": self.package, "change": self.change, "old": self.old, "new": self.new, "arch": self.arch}


@dataclass(frozen=True, slots=True)
class BootChange:
    what: str  # kernel | initrd | append
    old: str | None  # file name (kernel, initrd) or the APPEND template
    new: str | None
    old_digest: str | None = None
    new_digest: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"what": self.what, "old": self.old, "new": self.new, "old_digest": self.old_digest,
                "new_digest": self.new_digest}


@dataclass
class GenDiff:
    a: str  # generation references
    b: str
    a_id: str
    b_id: str
    files: list[FileChange] = field(default_factory=list)
    boot: list[BootChange] = field(default_factory=list)
    packages: list[PackageChange] = field(default_factory=list)
    packages_known: bool = False  # at least one side has var/lib/dpkg/status
    packages_a: int = 0
    packages_b: int = 0
    entries_a: int = 0
    entries_b: int = 0
    size_a: int = 0  # bytes of regular files, as `imgstore show` counts them
    size_b: int = 0

    def count(self, change: str) -> int:
        return sum(1 for f in self.files if f.change == change)

    def bytes_of(self, change: str) -> int:
        """Added bytes, removed bytes (positive), or the net growth of modified files."""
        if change == REMOVED:
            return sum(f.size_a for f in self.files if f.change == REMOVED)
        return sum(f.size_b - f.size_a for f in self.files if f.change == change)

    @property
    def identical(self) -> bool:
        return not self.files and not self.boot

    def summary(self) -> dict[str, Any]:
        return {
            "added": self.count(ADDED), "removed": self.count(REMOVED), "modified": self.count(MODIFIED),
            "symlinks": self.count(SYMLINK_CHANGED), "metadata": self.count(METADATA), "mtime_only": self.count(MTIME),
            "bytes_added": self.bytes_of(ADDED), "bytes_removed": self.bytes_of(REMOVED),
            "bytes_modified": self.bytes_of(MODIFIED), "size_a": self.size_a, "size_b": self.size_b,
            "delta": self.size_b - self.size_a, "entries_a": self.entries_a, "entries_b": self.entries_b,
            "packages_installed": sum(p.change == "installed" for p in self.packages),
            "packages_removed": sum(p.change == "removed" for p in self.packages),
            "packages_upgraded": sum(p.change == "upgraded" for p in self.packages),
            "packages_downgraded": sum(p.change == "downgraded" for p in self.packages),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "a": self.a, "b": self.b, "a_id": self.a_id, "b_id": self.b_id, "identical": self.identical,
            "summary": self.summary(), "boot": [c.as_dict() for c in self.boot],
            "packages": [p.as_dict() for p in self.packages] if self.packages_known else None,
            "packages_a": self.packages_a, "packages_b": self.packages_b,
            "files": [f.as_dict() for f in self.files],
        }


# -- entry comparison -------------------------------------------------------------------------------
def _fsize(e: Entry) -> int:
    return e.size if e.type == FILE else 0


def _kind(t: str) -> str:
    return FILE if t == HARDLINK else t  # a hardlink is a regular file that shares its inode


def _fields(a: Entry, b: Entry, content_a: dict[bytes, str], content_b: dict[bytes, str]) -> tuple[str, ...]:
    out: list[str] = []
    if _kind(a.type) != _kind(b.type):
        out.append("type")
    elif a.type in (FILE, HARDLINK):
        ca = a.digest if a.type == FILE else content_a.get(a.target, "")
        cb = b.digest if b.type == FILE else content_b.get(b.target, "")
        if ca != cb:
            out.append("content")
        if a.type != b.type or (a.type == HARDLINK and a.target != b.target):
            out.append("hardlink")
        if a.type == b.type == FILE and a.sparse != b.sparse:
            out.append("sparse")
    elif a.type in (CHAR, BLOCK) and a.rdev != b.rdev:
        out.append("rdev")
    elif a.type == SYMLINK and a.target != b.target:
        out.append("target")
    if a.mode != b.mode:
        out.append("mode")
    if (a.uid, a.gid) != (b.uid, b.gid):
        out.append("owner")
    if a.xattrs != b.xattrs:
        out.append("xattrs")
    if a.mtime_ns != b.mtime_ns:
        out.append("mtime")
    return tuple(out)


def _classify(fields: tuple[str, ...]) -> str:
    if {"type", "content", "rdev"} & set(fields):
        return MODIFIED
    if "target" in fields:
        return SYMLINK_CHANGED
    if fields == ("mtime",):
        return MTIME
    return METADATA


def _ordered(es: list[Entry], what: str) -> Iterator[tuple[bytes, Entry]]:
    # Comparing paths with '/' as NUL (which no name contains) orders them as comparing their lists of
    # components does, i.e. in manifest order; and it is one C call per entry.
    prev: bytes | None = None
    for e in es:
        key = b"" if e.path == b"." else e.path.replace(b"/", b"\0")
        if prev is not None and key <= prev:
            raise IntegrityError(f"the manifest of {what} is not in manifest order at {e.path!r}",
                                 "run: imgstore verify")
        prev = key
        yield key, e


def compare(a: list[Entry], b: list[Entry], what_a: str = "A", what_b: str = "B") -> list[FileChange]:
    """Every path that differs between two manifests, in manifest order (one merge walk)."""
    changes: list[FileChange] = []
    content_a: dict[bytes, str] = {}  # first-link path -> digest, for hardlinks (always to an earlier file)
    content_b: dict[bytes, str] = {}
    ia, ib = _ordered(a, what_a), _ordered(b, what_b)
    na, nb = next(ia, None), next(ib, None)
    while na is not None or nb is not None:
        if nb is None or (na is not None and na[0] < nb[0]):
            assert na is not None
            ea = na[1]
            if ea.type == FILE:
                content_a[ea.path] = ea.digest
            changes.append(FileChange(ea.path, REMOVED, ea.type, None, size_a=_fsize(ea), target_a=ea.target))
            na = next(ia, None)
        elif na is None or nb[0] < na[0]:
            eb = nb[1]
            if eb.type == FILE:
                content_b[eb.path] = eb.digest
            changes.append(FileChange(eb.path, ADDED, None, eb.type, size_b=_fsize(eb), target_b=eb.target))
            nb = next(ib, None)
        else:
            ea, eb = na[1], nb[1]
            if ea.type == FILE:
                content_a[ea.path] = ea.digest
            if eb.type == FILE:
                content_b[eb.path] = eb.digest
            fields = _fields(ea, eb, content_a, content_b)
            if fields:
                changes.append(FileChange(ea.path, _classify(fields), ea.type, eb.type, _fsize(ea), _fsize(eb),
                                          fields, ea.target, eb.target))
            na, nb = next(ia, None), next(ib, None)
    return changes


# -- boot files -------------------------------------------------------------------------------------
def boot_changes(a: Generation, b: Generation) -> list[BootChange]:
    out = []
    if (a.kernel, a.kernel_name) != (b.kernel, b.kernel_name):
        out.append(BootChange("kernel", a.kernel_name, b.kernel_name, a.kernel, b.kernel))
    if (a.initrd, a.initrd_name) != (b.initrd, b.initrd_name):
        out.append(BootChange("initrd", a.initrd_name, b.initrd_name, a.initrd, b.initrd))
    if a.append != b.append:
        out.append(BootChange("append", a.append, b.append))
    return out


# -- Debian packages --------------------------------------------------------------------------------
def parse_dpkg_status(data: bytes) -> list[tuple[str, str, str]]:
    """(package, architecture, version) of every installed package in a dpkg status file.

    Installed means the Status field's last word is `installed` ("install ok installed", and also
    "hold ok installed" for a held package); half-installed, config-files and not-installed do not count.
    """
    out = []
    for para in re.split(rb"\n[ \t]*\n", data):
        fields: dict[bytes, bytes] = {}
        for line in para.split(b"\n"):
            if not line or line[:1] in (b" ", b"\t", b"#"):
                continue  # continuation lines belong to multi-line fields we do not need
            key, sep, value = line.partition(b":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        status = fields.get(b"status", b"").split()
        if len(status) == 3 and status[2] == b"installed" and fields.get(b"package"):
            out.append((
                fields[b"package"].decode("utf-8", "replace"),
                fields.get(b"architecture", b"").decode("utf-8", "replace"),
                fields.get(b"version", b"").decode("utf-8", "replace"),
            ))
    return out


def _order(c: str) -> int:
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    if c == "~":
        return -1
    return ord(c) + 256


def _verrevcmp(a: str, b: str) -> int:
    """dpkg's comparison of an upstream version or revision (lib/dpkg/version.c)."""
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) else 0
            bc = _order(b[j]) if j < len(b) else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def _split_version(v: str) -> tuple[int, str, str]:
    epoch, sep, rest = v.partition(":")
    if not sep:
        epoch, rest = "0", v
    upstream, dash, revision = rest.rpartition("-")
    if not dash:
        upstream, revision = rest, ""
    try:
        return int(epoch), upstream, revision
    except ValueError:
        return 0, v, ""


def compare_versions(a: str, b: str) -> int:
    """<0, 0 or >0 as Debian orders versions (epoch, upstream, revision; '~' sorts before anything)."""
    ea, ua, ra = _split_version(a)
    eb, ub, rb = _split_version(b)
    if ea != eb:
        return ea - eb
    return _verrevcmp(ua, ub) or _verrevcmp(ra, rb)


def _keyed(pkgs: list[tuple[str, str, str]], multi: set[str]) -> dict[str, tuple[str, str]]:
    return {(f"{n}:{arch}" if n in multi else n): (arch, v) for n, arch, v in pkgs}


def package_changes(a: list[tuple[str, str, str]], b: list[tuple[str, str, str]]) -> list[PackageChange]:
    # A package is keyed by name, or by name:arch when either side has it for several architectures
    # (Multi-Arch: same); a package moving from arch all to amd64 is then an upgrade, not remove + install.
    multi = set()
    for side in (a, b):
        seen: dict[str, str] = {}
        for n, arch, _v in side:
            if n in seen and seen[n] != arch:
                multi.add(n)
            seen[n] = arch
    ka, kb = _keyed(a, multi), _keyed(b, multi)
    out = []
    for key in sorted(set(ka) | set(kb)):
        if key not in ka:
            out.append(PackageChange(key, "installed", None, kb[key][1], kb[key][0]))
        elif key not in kb:
            out.append(PackageChange(key, "removed", ka[key][1], None, ka[key][0]))
        elif ka[key][1] != kb[key][1]:
            c = compare_versions(kb[key][1], ka[key][1])
            out.append(PackageChange(key, "upgraded" if c >= 0 else "downgraded", ka[key][1], kb[key][1], kb[key][0]))
    return out


def _dpkg_status(store: Store, es: list[Entry]) -> bytes | None:
    by_path = {e.path: e for e in es if e.path == DPKG_STATUS or e.type == FILE}
    e = by_path.get(DPKG_STATUS)
    if e is not None and e.type == HARDLINK:
        e = by_path.get(e.target)
    if e is None or e.type != FILE:
        return None
    return store.objects.read(e.digest)


# -- the operation ----------------------------------------------------------------------------------
def diff_generations(store: Store, a: Generation, b: Generation) -> GenDiff:
    ea, eb = manifest_entries(store, a), manifest_entries(store, b)
    d = GenDiff(a.ref, b.ref, a.gen_id, b.gen_id, entries_a=len(ea), entries_b=len(eb),
                size_a=sum(_fsize(e) for e in ea), size_b=sum(_fsize(e) for e in eb))
    d.files = compare(ea, eb, a.ref, b.ref)
    d.boot = boot_changes(a, b)
    sa, sb = _dpkg_status(store, ea), _dpkg_status(store, eb)
    if sa is not None or sb is not None:
        pa, pb = parse_dpkg_status(sa or b""), parse_dpkg_status(sb or b"")
        d.packages_known, d.packages_a, d.packages_b = True, len(pa), len(pb)
        d.packages = package_changes(pa, pb)
    return d


def diff(store: Store, ref_a: str, ref_b: str, profile: str | None = None) -> GenDiff:
    """Compare two generations given as references (web@41, web@-1, 42 with a profile, an id prefix).

    B without a profile takes A's: `diff web@41 42`.
    """
    with store.engine.connect() as conn:
        a = generations.resolve(conn, ref_a, profile)
        b = generations.resolve(conn, ref_b, profile or a.profile)
    return diff_generations(store, a, b)
