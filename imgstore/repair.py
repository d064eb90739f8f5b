"""Materialized trees checked against their manifests, repaired in place; lost objects recovered from them.

A tree is never replaced while nodes may run from it over NFS (their file handles name its inodes), so a
damaged tree is mended entry by entry: a changed byte or mode is rewritten into the same inode (which
also mends every other generation sharing that copy), a deleted entry is recreated, an added one
removed. Conversely, when an object is damaged or missing but a materialized tree still holds that
content intact, the object is stored again from the tree.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import blake3

from . import manifest
from .checkout import _apply_fd, _apply_path, _write_content
from .durable import open_dir
from .errors import IntegrityError
from .generations import Generation
from .manifest import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, Entry
from .materialize import ensure_mat, tree_path
from .scan import entry_from_stat
from .store import Store

KINDS = {FILE: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK, CHAR: stat.S_IFCHR, BLOCK: stat.S_IFBLK,
         FIFO: stat.S_IFIFO}


@dataclass
class TreeProblem:
    generation: str
    path: str
    what: str  # content | metadata | missing | added | type

    def __str__(self) -> str:
        return f"{self.generation}: /{self.path}: {self.what}"


def _hash_file(dfd: int, name: bytes, cache: dict[tuple[int, int], str], st: os.stat_result) -> str:
    key = (st.st_dev, st.st_ino)
    if key not in cache:
        h = blake3.blake3()
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        with os.fdopen(fd, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        cache[key] = h.hexdigest()
    return cache[key]


def _meta(e: Entry) -> tuple[object, ...]:
    return (e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs, e.target if e.type == SYMLINK else b"", e.rdev)


DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def check_tree(store: Store, gen: Generation, entries: list[Entry], hashes: dict[tuple[int, int], str]
               ) -> list[TreeProblem]:
    """Compare a materialized tree with its manifest, through directory fds only: nothing planted in the
    tree (a symlink where a directory was) can make verify read outside the store, and deep paths work."""
    problems: list[TreeProblem] = []
    first_link: dict[bytes, Entry] = {e.path: e for e in entries if e.type == FILE}
    try:
        root_fd = os.open(tree_path(store, gen), DIR_FLAGS)
    except OSError:
        return [TreeProblem(gen.ref, ".", "type")]
    # The directories on the path to the current entry: (path, fd or None if not a real directory,
    # names expected in it).
    stack: list[tuple[bytes, int | None, set[bytes]]] = [(b".", root_fd, set())]

    def unreachable(e: Entry, rel: str, what: str) -> None:
        """A problem with an entry whose contents cannot be looked at: a directory's are all missing."""
        problems.append(TreeProblem(gen.ref, rel, what))
        if e.type == DIR:
            stack.append((e.path, None, set()))

    def leave() -> None:
        path, fd, names = stack.pop()
        if fd is None:
            return
        try:
            for extra in sorted({os.fsencode(n) for n in os.listdir(fd)} - names):
                rel = extra if path == b"." else path + b"/" + extra
                problems.append(TreeProblem(gen.ref, os.fsdecode(rel), "added"))
        finally:
            os.close(fd)

    try:
        for e in entries[1:]:
            parent, _, name = e.path.rpartition(b"/")
            parent = parent or b"."
            while stack[-1][0] != parent:
                leave()
            pfd = stack[-1][1]
            stack[-1][2].add(name)
            rel = os.fsdecode(e.path)
            if pfd is None:  # its directory is not a real directory: everything below is missing
                unreachable(e, rel, "missing")
                continue
            want = first_link[e.target] if e.type == HARDLINK else e
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if stat.S_IFMT(st.st_mode) != KINDS[want.type]:
                    unreachable(e, rel, "type")
                    continue
                # Path-based reads go through the directory's fd link; the last component is not followed.
                actual = entry_from_stat(e.path, b"/proc/self/fd/%d/%s" % (pfd, name), st)
                if actual is None:
                    problems.append(TreeProblem(gen.ref, rel, "type"))
                    continue
                if _meta(actual) != _meta(want) or (want.type == FILE and st.st_size != want.size):
                    problems.append(TreeProblem(gen.ref, rel, "metadata"))
                if want.type == FILE and _hash_file(pfd, name, hashes, st) != want.digest:
                    problems.append(TreeProblem(gen.ref, rel, "content"))
                if e.type == DIR:
                    stack.append((e.path, os.open(name, DIR_FLAGS, dir_fd=pfd), set()))
            except FileNotFoundError:  # not there, or gone since its stat (gc removing the tree: verify takes no lock)
                unreachable(e, rel, "missing")
        root_e = entries[0]
        st = os.fstat(root_fd)
        actual = entry_from_stat(b".", b"/proc/self/fd/%d" % root_fd, st)
        if actual is None or _meta(actual) != _meta(root_e):
            problems.append(TreeProblem(gen.ref, ".", "metadata"))
        while stack:
            leave()
    finally:
        for _, fd, _ in stack:
            if fd is not None:
                os.close(fd)
    return problems


def repair_tree(store: Store, gen: Generation, entries: list[Entry], problems: list[TreeProblem]) -> None:
    """Mend the listed problems in place; objects must be intact (check before calling)."""
    root = os.fsencode(tree_path(store, gen))
    by_path = {e.path: e for e in entries}
    own = os.geteuid() == 0
    dirty: set[Path] = set()
    for prob in sorted(problems, key=lambda p: (p.what != "added", p.path.count("/"))):
        rel = os.fsencode(prob.path)
        p = root + b"/" + rel
        if prob.what == "added":
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            elif os.path.lexists(p):
                os.unlink(p)
            continue
        e = by_path[rel]
        if prob.what in ("type", "missing") and os.path.lexists(p):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        parent, _, name = p.rpartition(b"/")
        dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            _mend(store, e, by_path, dfd, name, p, own, dirty, prob.what)
        finally:
            os.close(dfd)
    # Mending changed the parents' mtimes: give every ancestor its recorded metadata back, deepest first.
    ancestors = {b"."}
    for prob in problems:
        parts = os.fsencode(prob.path).split(b"/")[:-1]
        ancestors.update(b"/".join(parts[:i]) for i in range(1, len(parts) + 1))
    for rel in sorted(ancestors, key=lambda a: -a.count(b"/") - (a != b".")):
        d = by_path.get(rel)
        if d is None or d.type != DIR:
            continue
        fd = os.open(root if rel == b"." else root + b"/" + rel, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            _apply_fd(fd, d, own)
        finally:
            os.close(fd)


def _mend(store: Store, e: Entry, by_path: dict[bytes, Entry], dfd: int, name: bytes, p: bytes, own: bool,
          dirty: set[Path], what: str) -> None:
    if e.type == HARDLINK:
        e = by_path[e.target]
    if e.type == FILE:
        if what in ("missing", "type"):
            os.link(ensure_mat(store, e, dirty), name, dst_dir_fd=dfd)
            return
        # Rewrite the same inode: every tree sharing this copy is mended with it.
        fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW, dir_fd=dfd)
        try:
            if what == "content":
                os.ftruncate(fd, 0)
                _write_content(store.objects, fd, e)
            _apply_fd(fd, e, own)
        finally:
            os.close(fd)
    elif e.type == DIR:
        if what in ("missing", "type"):
            os.mkdir(name, 0o700, dir_fd=dfd)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
        try:
            _apply_fd(fd, e, own)
        finally:
            os.close(fd)
    elif e.type == SYMLINK:
        if what != "metadata" or os.readlink(p) != e.target:
            if os.path.lexists(p):
                os.unlink(p)
            os.symlink(e.target, name, dir_fd=dfd)
        _apply_path(dfd, name, e, own, symlink=True)
    else:
        if what in ("missing", "type"):
            kind = {CHAR: stat.S_IFCHR, BLOCK: stat.S_IFBLK, FIFO: stat.S_IFIFO}[e.type]
            os.mknod(name, kind | 0o600, os.makedev(*e.rdev), dir_fd=dfd)
        _apply_path(dfd, name, e, own, symlink=False)


def materialized(store: Store, gens: list[Generation]) -> list[Generation]:
    return [g for g in gens if tree_path(store, g).is_dir()]


def recover_objects(store: Store, digests: set[str], gens: list[Generation]) -> dict[str, str]:
    """Store again every listed object for which an intact copy exists in a materialized tree."""
    found: dict[str, str] = {}
    for g in materialized(store, gens):
        try:
            es = manifest.decode(store.objects.read(g.manifest), f"manifest of {g.ref}")
        except IntegrityError:
            continue
        try:
            root_fd = os.open(tree_path(store, g), DIR_FLAGS)
        except OSError:
            continue
        for e in es:
            if e.type != FILE or e.digest not in digests or e.digest in found:
                continue
            parent, _, name = e.path.rpartition(b"/")
            try:
                dfd = open_dir(root_fd, parent)
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
                finally:
                    if dfd != root_fd:
                        os.close(dfd)
                with os.fdopen(fd, "rb") as f:
                    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                        continue
                    digest, _ = store.objects.put_stream(f)
            except OSError:
                continue
            if digest == e.digest:
                found[e.digest] = f"{g.ref}:/{os.fsdecode(e.path)}"
        os.close(root_fd)
    store.objects.flush()
    return found
