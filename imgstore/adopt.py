"""adopt: bring an existing, hand-managed root directory (a real /netboot/root) under imgstore.

The directory becomes the profile's first generation; then, in one renameat2(RENAME_EXCHANGE), the
managed symlink takes its place and the original moves aside to DIR.pre-imgstore. At no moment is the
path missing, running nodes keep their NFS file handles (they refer to inodes, not names), and
nothing is deleted.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

from . import commit, deploy
from .durable import TMP_PREFIX, fsync_dir
from .errors import Conflict, NotFound, UsageError
from .locking import store_lock
from .materialize import discard_stale, tree_path
from .store import Store

RENAME_EXCHANGE = 2
AT_FDCWD = -100


def exchange(a: Path, b: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(err)}", os.fspath(b))


def adopt(store: Store, directory: Path, profile_name: str, message: str = "adopted",
          kernel: Path | None = None, initrd: Path | None = None, wait: bool = True) -> dict[str, Any]:
    profile = store.profile(profile_name)
    directory = directory.absolute()
    if directory.is_symlink():
        raise UsageError(f"{directory} is already a symlink (managed already?)", "run: imgstore status")
    if not directory.is_dir():
        raise NotFound(f"{directory} is not a directory", "give the existing root directory, e.g. /netboot/root")
    if directory != profile.root_link.absolute():
        raise UsageError(
            f"{directory} is not the root link of profile {profile.name} ({profile.root_link})",
            f"set root_link = \"{directory}\" in [deploy] of {profile.path}",
        )
    kept = directory.with_name(directory.name + ".pre-imgstore")
    if kept.exists():
        raise Conflict(f"{kept} already exists", "move it away first; adopt keeps the original there")
    res = commit.commit(store, directory, profile.name, message, kernel, initrd, wait=wait)
    gen = res.generation
    with store_lock(store.root, "adopt", wait):
        discard_stale(store)
        done: list[str] = []
        deploy.prepare(store, profile, gen, done)
        target = tree_path(store, gen)
        tmp = directory.with_name(f"{TMP_PREFIX}{directory.name}")
        os.symlink(target, tmp)
        exchange(tmp, directory)  # now: directory -> tree, tmp = the original directory
        os.rename(tmp, kept)
        fsync_dir(directory.parent)
        with store.engine.begin() as conn:
            cur = deploy.active(conn, profile.name)
            deploy.set_active(conn, profile.name, gen)
            deploy.record(conn, profile.name, "adopt", cur, gen)
        change = deploy.Change(profile.name, "adopt", None, gen.ref)
        deploy.finish(store, profile, change)
    return {"generation": gen.ref, "id": gen.gen_id, "kept": os.fspath(kept), "target": os.fspath(target),
            "written": change.written}
