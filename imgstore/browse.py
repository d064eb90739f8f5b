"""Reading a generation without checking it out: its manifest, a directory listing, one file."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

from . import fill, manifest
from .checkout import CheckoutResult, Progress, check_objects, prepare_destination, restore
from .durable import DIR_FLAGS, TMP_PREFIX, no_space, remove_tree
from .errors import IntegrityError, NotFound, UsageError
from .generations import Generation
from .manifest import DIR, FILE, HARDLINK, SYMLINK, Entry
from .store import Store


def entries(store: Store, gen: Generation) -> list[Entry]:
    if not store.objects.has(gen.manifest):
        raise IntegrityError(f"the manifest of {gen.ref} is missing", "run: imgstore verify")
    return manifest.decode(store.objects.read(gen.manifest), f"manifest of {gen.ref}")


def _rel(path: str) -> bytes:
    p = os.fsencode(path).strip(b"/")
    parts = [x for x in p.split(b"/") if x not in (b"", b".")]
    if b".." in parts:
        raise UsageError(f"path {path!r} contains '..'", "give a path inside the generation, like /etc/fstab")
    return b"/".join(parts) or b"."


def find(store: Store, gen: Generation, path: str) -> tuple[Entry, list[Entry]]:
    rel = _rel(path)
    es = entries(store, gen)
    for e in es:
        if e.path == rel:
            return e, es
    raise NotFound(f"{path} is not in {gen.ref}", f"run: imgstore ls {gen.ref} {os.path.dirname(path) or '/'}")


def listdir(store: Store, gen: Generation, path: str) -> list[Entry]:
    e, es = find(store, gen, path)
    if e.type != DIR:
        return [e]
    prefix = b"" if e.path == b"." else e.path + b"/"
    return [x for x in es if x.path.startswith(prefix) and x.path != b"." and b"/" not in x.path[len(prefix):]]


def read_file(store: Store, gen: Generation, path: str) -> Iterator[bytes]:
    e, es = find(store, gen, path)
    if e.type == HARDLINK:
        e = next(x for x in es if x.path == e.target)
    if e.type != FILE:
        raise UsageError(
            f"{path} in {gen.ref} is not a regular file (type {e.type})", f"run: imgstore ls {gen.ref} {path}"
        )
    return store.objects.read_chunks(e.digest)


def checkout(store: Store, gen: Generation, dest: Path, progress: Progress | None = None) -> CheckoutResult:
    """Build the tree under a temp name beside `dest` and rename it into place: a checkout that fails (a
    damaged object found half-way, a full disk) leaves nothing behind."""
    es = entries(store, gen)
    check_objects(store.objects, es)  # missing objects: fail before anything is created
    prepare_destination(dest)
    dest = dest.absolute()
    staging = dest.with_name(f"{TMP_PREFIX}{dest.name}"[:255])
    if os.path.lexists(staging):
        remove_tree(staging)
    os.mkdir(staging, 0o700)
    make = [e for e in es if e.type == FILE or e.type == SYMLINK]
    try:
        root_fd = os.open(staging, DIR_FLAGS)
        try:
            fill.make_dirs(es, root_fd)
            fill.make_files(store.objects, make, root_fd, progress)
        finally:
            os.close(root_fd)
        # Then the directories' metadata, the hardlinks and the devices, in one pass.
        res = restore(store.objects, es, staging, own=os.geteuid() == 0, made={id(e) for e in make})
        if progress:
            progress(res.entries, res.bytes)
        os.rename(staging, dest)  # replaces an empty directory, or creates the name
    except BaseException as exc:
        remove_tree(staging)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space(dest, exc, sum(e.size for e in make)) from exc
        raise
    return res
