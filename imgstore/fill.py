"""fill: make a generation's directories, files and symlinks below a new, empty tree's directory fd, on every
core. materialize and checkout build their trees with it, then let restore() do the rest (directories'
metadata, hardlinks, devices, and whatever the fast loops left), as it would have without them.

The Rust loops (native.py) run in one thread per core with the GIL released: each block of a pack is read and
decompressed once, its files written, checked against their digests and given their metadata. Without them,
two processes (forkjoin) share the blocks. Anything the loops cannot make exactly (an error, damaged content)
is made by Python afterwards, which raises the error with its message.

The paths are used whole below the root fd: manifest.decode checked that every entry's parent is a directory
listed before it, so they go through directories this command made, and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

from . import native
from .checkout import make_new
from .durable import LONG_PATH, open_dir
from .forkjoin import run_split
from .manifest import DIR, FILE, SYMLINK, Entry
from .objects import ObjectStore, PackSlot

COPY_COST = 16 << 10  # making one file (create, metadata) costs about as much as writing this many bytes
SYMLINK_RUN = 512  # symlinks a thread of the write loop makes in a row
PROGRESS_EVERY = 64 << 20  # bytes the write loop makes between two progress reports, when asked for them

Group = list[tuple[Entry, PackSlot | None]]


def make_dirs(es: list[Entry], root_fd: int) -> None:
    """Make every directory of the manifest below root_fd, mode 0700 (restore() gives them theirs last)."""
    paths = [e.path for e in es[1:] if e.type == DIR]
    native_dirs = native.dir_maker()
    for path in paths[native_dirs(root_fd, paths) if native_dirs else 0:]:  # the rest: Python names the error
        with _in_parent(root_fd, path) as (fd, name):
            os.mkdir(name, 0o700, dir_fd=fd)


def make_files(objects: ObjectStore, make: list[Entry], root_fd: int,
               progress: Callable[[int, int], None] | None = None, fault: Callable[[], None] | None = None) -> None:
    """Make these files and symlinks below root_fd, exactly (content, owner where root, xattrs, mode, times).
    `progress(entries, bytes)` is told every PROGRESS_EVERY bytes; `fault()` is called where the work may be
    cut short by a test (faults.py): after each part of it, in each process."""
    groups: dict[object, Group] = {}
    symlinks = 0
    for e in make:
        slot = objects.index.get(bytes.fromhex(e.digest)) if e.type == FILE else None
        if slot is not None:
            key: object = (slot.pack, slot.offset)  # the files of a block together: it is decompressed once
        elif e.type == SYMLINK:
            key, symlinks = (None, symlinks // SYMLINK_RUN), symlinks + 1
        else:
            key = id(e)  # a loose object: a group of its own
        groups.setdefault(key, []).append((e, slot))
    own = os.geteuid() == 0
    fill = native.filler()

    def make_group(group: Group) -> None:  # without the native module: in two processes (forkjoin)
        for e, _ in group:
            _make_here(objects, root_fd, e, own)
        if fault:
            fault()

    entries = nbytes = 0
    for work in _parts(list(groups.values()), PROGRESS_EVERY if progress else None):
        if fill is None:
            run_split(make_group, work, weight=lambda g: sum(e.size + COPY_COST for e, _ in g))
        else:
            left = fill(root_fd, [_group(objects, g) for g in work], own, threads())
            if fault:
                fault()
            for gi, i in left:
                _make_here(objects, root_fd, work[gi][i][0], own)
        if progress:
            entries += sum(len(g) for g in work)
            nbytes += sum(e.size for g in work for e, _ in g)
            progress(entries, nbytes)


def _parts(groups: list[Group], every: int | None) -> Iterator[list[Group]]:
    """The groups in runs of about `every` bytes (all at once without)."""
    if every is None:
        yield groups
        return
    part: list[Group] = []
    size = 0
    for g in groups:
        part.append(g)
        size += sum(e.size + COPY_COST for e, _ in g)
        if size >= every:
            yield part
            part, size = [], 0
    if part:
        yield part


def _group(objects: ObjectStore, group: Group) -> native.MakeGroup:
    """What the write loop needs to make a group: where its block is, and each entry."""
    slot = group[0][1]
    specs: list[native.MakeSpec] = []
    for e, s in group:
        meta = (e.uid, e.gid, e.mode, e.mtime_ns)
        if e.type == SYMLINK:
            specs.append((e.path, e.target, None, 0, 0, b"", meta, list(e.xattrs), False))
        else:
            loose = None if s is not None else os.fsencode(objects.loose_path(e.digest))
            specs.append((e.path, None, loose, s.inner if s else 0, e.size, bytes.fromhex(e.digest), meta,
                          list(e.xattrs), e.sparse))
    if slot is None:
        return -1, 0, 0, specs
    return objects.pack_fd(slot.pack), slot.offset, slot.clen, specs


def make_and_link(objects: ObjectStore, es: list[Entry], make: list[Entry], sources: dict[int, tuple[int, bytes]],
                  root_fd: int, fault: Callable[[], None] | None = None) -> set[int]:
    """make_files(make), and hardlink the entries that have a source ({id(entry): (directory fd, path below
    it)}: another tree's file, or an earlier path of this tree) in the Rust link loop where it is built; return
    the ids of the entries made or linked. The links to other trees are made while the write loop runs (both
    release the GIL), those within this tree after it (their sources are among what it makes). restore() does
    the rest as it would have: a source that is not what its entry says, or at the link limit, gets a new file."""
    link = native.linker()
    if link is None:
        make_files(objects, make, root_fd, fault=fault)
        return {id(e) for e in make}
    outside = [e for e in es if id(e) in sources and sources[id(e)][0] != root_fd]
    inside = [e for e in es if id(e) in sources and sources[id(e)][0] == root_fd]
    own = os.geteuid() == 0

    def linked(todo: list[Entry]) -> set[int]:
        if not todo:
            return set()
        failed = set(link(root_fd, todo, [sources[id(e)] for e in todo], own, threads()))
        return {id(e) for i, e in enumerate(todo) if i not in failed}

    done: list[set[int]] = []
    errors: list[BaseException] = []

    def link_outside() -> None:
        try:
            done.append(linked(outside))
        except BaseException as exc:  # re-raised below, in the command's thread
            errors.append(exc)

    beside = threading.Thread(target=link_outside, name="imgstore-link") if outside else None
    if beside:
        beside.start()
    try:
        make_files(objects, make, root_fd, fault=fault)
    finally:
        if beside:
            beside.join()
    if errors:
        raise errors[0]
    return {id(e) for e in make}.union(*done, linked(inside))


def threads() -> int:
    """Threads for the write and link loops: one per core this process may run on."""
    return len(os.sched_getaffinity(0))


def _make_here(objects: ObjectStore, root_fd: int, e: Entry, own: bool) -> None:
    with _in_parent(root_fd, e.path) as (fd, name):
        make_new(objects, fd, name, e, own)


@contextlib.contextmanager
def _in_parent(root_fd: int, path: bytes) -> Iterator[tuple[int, bytes]]:
    """(directory fd, name) for `path` below root_fd: the path itself while the kernel takes it whole."""
    if len(path) < LONG_PATH:
        yield root_fd, path
        return
    parent, _, name = path.rpartition(b"/")
    fd = open_dir(root_fd, parent)
    try:
        yield fd, name
    finally:
        os.close(fd)
