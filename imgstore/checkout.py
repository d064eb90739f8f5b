"""checkout: lay a generation's tree out exactly, with every piece of metadata the manifest records.

Everything is created relative to directory file descriptors opened with O_NOFOLLOW, so a symlink
planted inside the destination is never followed, and a manifest is validated before the first write.
Metadata is applied in the only order that keeps it: owner (which clears setuid and capabilities),
then xattrs, then mode, then times; directories get their times after their children exist.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from .durable import no_space, open_dir
from .errors import Conflict, IntegrityError, UsageError
from .manifest import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, Entry
from .objects import ObjectStore

ZERO_BLOCK = 4096
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class CheckoutResult(NamedTuple):
    entries: int
    files: int
    bytes: int


Progress = Callable[[int, int], None]


def _proc(dirfd: int, name: bytes) -> bytes:
    # Path-based calls with no dir_fd variant (lsetxattr) go through the directory's magic link; the
    # last component is not followed.
    return b"/proc/self/fd/%d/%s" % (dirfd, name)


def prepare_destination(dest: Path) -> None:
    """Refuse a destination that exists and is not an empty directory (a checkout never merges)."""
    try:
        os.lstat(dest)
    except FileNotFoundError:
        if not dest.parent.is_dir():
            raise UsageError(f"the parent of {dest} does not exist", "create it first") from None
        return
    if not os.path.isdir(dest) or os.path.islink(dest):
        raise Conflict(f"{dest} exists and is not a directory", "choose a new or empty directory")
    if os.listdir(dest):
        raise Conflict(f"{dest} exists and is not empty", "choose a new or empty directory")


def restore(
    objects: ObjectStore,
    entries: list[Entry],
    dest: Path,
    progress: Progress | None = None,
    own: bool = True,
    made: set[int] | None = None,
    link_source: Callable[[Entry], tuple[int, bytes] | None] | None = None,
) -> CheckoutResult:
    """Create every entry under `dest`, which must exist and be empty.

    With `made` (materialize), the directories exist already, and so do the entries whose id() it holds;
    `link_source(entry)` gives (directory fd, path below it) of a file or symlink to hardlink instead of
    making a new one, or None. Where a link cannot be made (too many links already), a new one is made.
    """
    if made is None:  # else the caller checked, before it made them
        check_objects(objects, entries)
    root_fd = os.open(dest, DIR_FLAGS)
    # Only the directories on the path to the current entry are open (the manifest is in depth-first
    # order): a tree with thousands of directories must not need thousands of file descriptors. A
    # directory gets its metadata when it is left: creating children changes its mtime.
    stack: list[tuple[bytes, int, Entry]] = [(b".", root_fd, entries[0])]
    sources = _SourceDir()
    nfiles = nbytes = 0
    try:
        for n, e in enumerate(entries[1:], 2):
            parent, _, name = e.path.rpartition(b"/")
            parent = parent or b"."
            while stack[-1][0] != parent:
                if len(stack) == 1:
                    raise IntegrityError(f"manifest entry {e.path!r} is out of tree order", "run: imgstore verify")
                _, fd, de = stack.pop()
                try:
                    _apply_fd(fd, de, own)
                finally:
                    os.close(fd)
            pfd = stack[-1][1]
            try:
                if e.type == DIR:
                    if made is None:
                        os.mkdir(name, 0o700, dir_fd=pfd)
                    stack.append((e.path, os.open(name, DIR_FLAGS, dir_fd=pfd), e))
                    continue
                if e.type == FILE:
                    nfiles += 1
                    nbytes += e.size
                if made is not None and id(e) in made:
                    pass  # made already (materialize's two processes)
                elif e.type == FILE or e.type == SYMLINK:
                    if not (link_source and _link(link_source(e), sources, e, pfd, name, own)):
                        make_new(objects, pfd, name, e, own)
                elif e.type == HARDLINK:
                    tparent, _, tname = e.target.rpartition(b"/")
                    sfd = open_dir(root_fd, tparent)
                    try:
                        os.link(tname, name, src_dir_fd=sfd, dst_dir_fd=pfd, follow_symlinks=False)
                    finally:
                        if sfd != root_fd:
                            os.close(sfd)
                elif e.type in (CHAR, BLOCK, FIFO):
                    kind = {CHAR: 0o020000, BLOCK: 0o060000, FIFO: 0o010000}[e.type]
                    os.mknod(name, kind | 0o600, os.makedev(*e.rdev), dir_fd=pfd)
                    _apply_path(pfd, name, e, own, symlink=False)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise no_space(dest, exc, sum(x.size for x in entries[n - 1:] if x.type == FILE)) from exc
                raise
            if progress and n % 256 == 0:
                progress(n, nbytes)
        while stack:
            _, fd, de = stack.pop()
            try:
                _apply_fd(fd, de, own)
            finally:
                os.close(fd)
        if progress:
            progress(len(entries), nbytes)
    finally:
        sources.close()
        for _, fd, _ in stack:
            os.close(fd)
    return CheckoutResult(len(entries), nfiles, nbytes)


def make_new(objects: ObjectStore, dir_fd: int, name: bytes, e: Entry, own: bool) -> None:
    """A new regular file (its content, then its metadata) or symlink `name` in dir_fd."""
    if e.type == SYMLINK:
        os.symlink(e.target, name, dir_fd=dir_fd)
        _apply_path(dir_fd, name, e, own, symlink=True)
        return
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        _write_content(objects, fd, e)
        _apply_fd(fd, e, own)
    finally:
        os.close(fd)


class _SourceDir:
    """Directories of the trees files are linked from, opened one component at a time (no symlink followed)
    and kept open along the path of the last one: in the manifest's depth-first order, each is opened once."""

    def __init__(self) -> None:
        self.open_paths: dict[int, list[tuple[bytes, int]]] = {}  # root fd -> [(path below it, fd)], a path

    def open(self, root_fd: int, parent: bytes) -> int:
        if not parent:
            return root_fd
        stack = self.open_paths.setdefault(root_fd, [])
        if stack and stack[-1][0] == parent:
            return stack[-1][1]
        if b".." in parent.split(b"/"):
            raise OSError(errno.EINVAL, "'..' in a source path")
        while stack and stack[-1][0] != parent and not parent.startswith(stack[-1][0] + b"/"):
            os.close(stack.pop()[1])
        path, fd = stack[-1] if stack else (b"", root_fd)
        if path == parent:
            return fd
        for part in (parent[len(path) + 1:] if path else parent).split(b"/"):
            fd = os.open(part, DIR_FLAGS, dir_fd=fd)
            path = path + b"/" + part if path else part
            stack.append((path, fd))
        return fd

    def close(self) -> None:
        for stack in self.open_paths.values():
            for _, fd in stack:
                os.close(fd)
        self.open_paths.clear()


def _link(source: tuple[int, bytes] | None, cache: _SourceDir, e: Entry, dir_fd: int, name: bytes,
          own: bool) -> bool:
    """Hardlink `name` in dir_fd to source = (directory fd, path below it) if it is the file or symlink `e`
    describes (type, owner where `own`, mode, size, mtime: a source changed by hand, or an index that lies,
    costs a new file, never a wrong one). False where there is none, where it has as many links as the
    filesystem allows (EMLINK: ext4's 65,000), or where it may not be linked (EPERM)."""
    if source is None:
        return False
    parent, _, base = source[1].rpartition(b"/")
    try:
        sfd = cache.open(source[0], parent)
        st = os.stat(base, dir_fd=sfd, follow_symlinks=False)
    except (OSError, ValueError):
        return False
    kind, size = (stat.S_IFREG, e.size) if e.type == FILE else (stat.S_IFLNK, len(e.target))
    if (stat.S_IFMT(st.st_mode) != kind or st.st_size != size or own and (st.st_uid != e.uid or st.st_gid != e.gid)
            or st.st_mtime_ns != e.mtime_ns or (kind == stat.S_IFREG and stat.S_IMODE(st.st_mode) != e.mode)):
        return False
    try:
        os.link(base, name, src_dir_fd=sfd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EMLINK, errno.EPERM):
            raise
        return False  # at the link limit, or not ours to link (protected_hardlinks, an immutable file)
    return True


def check_objects(objects: ObjectStore, entries: Iterable[Entry]) -> None:
    """Fail before the first write if any content is missing."""
    missing = sorted({e.digest for e in entries if e.type == FILE and not objects.has(e.digest)})
    if missing:
        raise IntegrityError(
            f"{len(missing)} object(s) this generation needs are missing (first: {missing[0][:16]})",
            "run: imgstore verify",
        )


def _write_content(objects: ObjectStore, fd: int, e: Entry) -> None:
    if not e.sparse:
        for chunk in objects.read_chunks(e.digest):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        return
    # Sparse: seek over all-zero blocks so the restored file keeps its holes.
    zero = bytes(ZERO_BLOCK)
    pos = 0
    for chunk in objects.read_chunks(e.digest):
        for i in range(0, len(chunk), ZERO_BLOCK):
            block = chunk[i:i + ZERO_BLOCK]
            if block != zero[: len(block)]:
                os.pwrite(fd, block, pos)
            pos += len(block)
    os.ftruncate(fd, pos)


PRIVILEGED_XATTRS = (b"security.", b"trusted.")


def _set_xattrs(target: int | bytes, e: Entry, follow: bool, own: bool = True) -> None:
    for k, v in e.xattrs:
        if own or not k.startswith(PRIVILEGED_XATTRS):  # unprivileged checkouts skip what needs root
            os.setxattr(target, k, v, follow_symlinks=follow)


def _apply_fd(fd: int, e: Entry, own: bool) -> None:
    if own:
        os.fchown(fd, e.uid, e.gid)
    _set_xattrs(fd, e, True, own)
    os.fchmod(fd, e.mode)
    os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))


def _apply_path(dirfd: int, name: bytes, e: Entry, own: bool, symlink: bool) -> None:
    if symlink:
        if own:
            os.chown(name, e.uid, e.gid, dir_fd=dirfd, follow_symlinks=False)
        if e.xattrs:
            _set_xattrs(_proc(dirfd, name), e, False, own)
        os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=dirfd, follow_symlinks=False)
        return
    # Device nodes and FIFOs cannot be opened safely for I/O; an O_PATH handle pins the inode we just
    # made, and /proc/self/fd/N reaches it without looking the name up again.
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        p = b"/proc/self/fd/%d" % fd
        if own:
            os.chown(p, e.uid, e.gid)
        _set_xattrs(p, e, True, own)
        os.chmod(p, e.mode)
        os.utime(p, ns=(e.mtime_ns, e.mtime_ns))
    finally:
        os.close(fd)
