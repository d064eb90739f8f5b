"""materialize: lay a generation out as a read-only tree that NFS can export, once, at its own path.

    <store>/<gen id>-<profile>-rootfs/     the tree (never changed once renamed into place)
    <store>/mat/<2 hex>/<key>              one uncompressed copy per content + owner + mode + xattrs + mtime,
                                           one symlink per target + owner + xattrs + mtime

Every regular file and symlink in a tree is a hardlink to its copy in mat/, so generations that share files
share storage: ten generations differing by one package cost one tree's worth of data plus directories.
(Linking a symlink costs a tenth of creating one on ext4, as ostree's bare checkouts do too.)
The tree is built under a temp name and renamed into place, so a half-built tree is never visible; a
temp tree left by a crash (or by an earlier boot of the server) is discarded, never reused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import blake3

from . import faults
from .browse import entries as manifest_entries
from .checkout import _apply_fd, _apply_path, _write_content, check_objects, restore
from .durable import DIR_FLAGS, TMP_PREFIX, fsync_dir, no_space, remove_stale_temps, remove_tree, syncfs
from .forkjoin import run_split
from .generations import Generation
from .manifest import FILE, SYMLINK, Entry
from .store import Store

MAT = "mat"
# In mat/ while a materialize makes copies: each is made at its name, so a kill can leave one half-made, and
# syncfs makes their data durable only at the end, so after a power cut a copy can exist with its data lost.
# Until then only the staging tree links them; a command that finds the marker removes that tree, then them.
UNSYNCED = f"{TMP_PREFIX}unsynced"
COPY_COST = 16 << 10  # making one copy (create, metadata) costs about as much as writing this many bytes


def tree_path(store: Store, gen: Generation) -> Path:
    return store.root / f"{gen.gen_id}-{gen.profile}-rootfs"


def mat_key(e: Entry) -> str:
    """A regular file's key starts from its content's digest (64 hex digits), a symlink's from its target."""
    h = blake3.blake3(e.digest.encode() if e.type == FILE else b"symlink\0" + e.target)
    h.update(b"%d %d %o %d %d" % (e.uid, e.gid, e.mode, e.mtime_ns, e.sparse))
    for k, v in e.xattrs:
        h.update(b"\0" + k + b"\0" + v)
    return h.hexdigest()


def mat_path(store: Store, key: str) -> Path:
    return store.root / MAT / key[:2] / key


def discard_stale(store: Store) -> list[str]:
    """Remove temp trees and mat temp files; call with the store lock held (so nothing is writing them)."""
    gone = []
    for p in store.root.iterdir():
        if p.name.startswith(TMP_PREFIX):
            if p.is_dir() and not p.is_symlink():
                _rmtree(p)
            else:
                p.unlink()
            gone.append(p.name)
    # Temp packs and loose objects of a killed commit, temp stat caches.
    for folder in ("packs", "objects", "cache"):
        n = remove_stale_temps(store.root / folder)
        if n:
            gone.append(f"{folder}/ ({n} temp files)")
    if os.path.lexists(store.root / MAT / UNSYNCED):
        # A materialize stopped before its syncfs: the copies no tree links (the ones it made among them) go.
        n = sweep_mat(store)[0]
        gone.append(f"{MAT}/ ({n} copies made before a crash)")
    n = remove_stale_temps(store.root / MAT)
    if n:
        gone.append(f"{MAT}/ ({n} temp files)")
    return gone


def sweep_mat(store: Store) -> tuple[int, int]:
    """Remove the shared copies no tree or TFTP file links to (one link left), then the UNSYNCED marker;
    return (copies, bytes) removed. The store lock must be held."""
    mat = store.root / MAT
    n = freed = 0
    for dirpath, dirs, files in os.walk(mat):
        # A shared symlink to a directory is listed among the folders (walk follows it to classify it).
        for f in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, f)
            st = os.lstat(path)
            if st.st_nlink == 1 and f != UNSYNCED:
                os.unlink(path)
                n += 1
                freed += st.st_blocks * 512
    _unmark(store.root)  # last: a sweep killed half-way is done again
    return n, freed


def _rmtree(p: Path) -> None:
    remove_tree(p)


def materialize(store: Store, gen: Generation) -> tuple[Path, bool]:
    """Return (tree path, whether it was created now). Idempotent; the store lock must be held."""
    final = tree_path(store, gen)
    if _is_real_dir(final):
        return final, False
    if os.path.lexists(final):
        # Not something materialize made (a planted symlink or file): never serve it, never follow it.
        os.unlink(final)
    es = manifest_entries(store, gen)
    sources, todo = _plan_mat(store, es)
    check_objects(store.objects, (e for e, _ in todo.values()))  # what the shared copies lack, before writing
    _real_dir(store.root / MAT)
    staging = store.root / f"{TMP_PREFIX}{gen.gen_id[:16]}-{gen.profile}-rootfs"
    if os.path.lexists(staging):
        _rmtree(staging)
    os.mkdir(staging, 0o700)
    try:
        if todo:
            _mark_unsynced(store.root / MAT)
        _fill_mat(store, todo)
        with _writing_back(store.root, bool(todo)):
            restore(store.objects, es, staging, own=os.geteuid() == 0, link_source=lambda e: sources[id(e)])
        faults.point("materialize.before-sync")
        syncfs(store.root)  # the whole tree and the new copies, durably, before the tree becomes visible
        os.rename(staging, final)
        fsync_dir(store.root)
        _unmark(store.root)
    except BaseException as exc:
        _rmtree(staging)
        if todo:
            # The copies made so far go too: one the child was writing when it was killed (after an error
            # here) is half-made at its name. If the sweep fails, the marker stays for the next command.
            with contextlib.suppress(OSError):
                sweep_mat(store)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            missing = sum(e.size for e in es if e.type == FILE and not _is_file(mat_path(store, mat_key(e))))
            raise no_space(store.root, exc, missing) from exc
        raise
    return final, True


@contextlib.contextmanager
def _writing_back(root: Path, new_copies: bool) -> Iterator[None]:
    """While the tree is made (one core, mostly mkdir and link), a thread waits on a first syncfs, which
    writes the new copies' data out meanwhile: the syncfs after the tree then has mostly metadata left to
    write (first materialize of the rootfs, 6 alternating pairs: 0.88 against 0.925 s median, 4 pairs to 2).
    Its error, if any, is left for that second syncfs to raise."""
    if not new_copies:
        yield
        return

    def sync() -> None:
        with contextlib.suppress(OSError):
            syncfs(root)

    t = threading.Thread(target=sync, name="imgstore-syncfs")
    t.start()
    try:
        yield
    finally:
        t.join()


def _mark_unsynced(mat: Path) -> None:
    with open(os.open(mat / UNSYNCED, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "wb"):
        pass
    fsync_dir(mat)  # durable before the first copy is named


def _unmark(root: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(root / MAT / UNSYNCED)  # lost in a crash: the next command sweeps for nothing


def _is_real_dir(p: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(p).st_mode)
    except FileNotFoundError:
        return False


def _is_file(p: str | Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(p).st_mode)
    except FileNotFoundError:
        return False


def _real_dir(p: Path) -> None:
    """Make sure p is a directory of ours, not a symlink someone planted in its place."""
    if os.path.lexists(p) and not _is_real_dir(p):
        os.unlink(p)
    os.makedirs(p, mode=0o755, exist_ok=True)


def _plan_mat(store: Store, es: list[Entry]) -> tuple[dict[int, str], dict[str, tuple[Entry, str]]]:
    """Where each file's and symlink's shared copy is ({id(entry): path}, for restore() to link), and which
    copies are missing ({key: (entry, path)})."""
    sources: dict[int, str] = {}
    todo: dict[str, tuple[Entry, str]] = {}
    base = os.fspath(store.root / MAT)
    present: dict[str, tuple[set[str], set[str]]] = {}  # each subfolder's files and symlinks: one listing
    for e in es:
        if e.type != FILE and e.type != SYMLINK:
            continue
        key = mat_key(e)
        sub = key[:2]
        listing = present.get(sub)
        if listing is None:
            listing = present[sub] = _listing(f"{base}/{sub}")
        path = sources[id(e)] = f"{base}/{sub}/{key}"
        if key not in listing[e.type == SYMLINK] and key not in todo:
            todo[key] = (e, path)
    return sources, todo


def _fill_mat(store: Store, todo: dict[str, tuple[Entry, str]]) -> None:
    """Make the missing shared copies, in two processes (forkjoin): creating a file is mostly kernel time
    (ext4 here: about as much as ostree's copy checkout spends), which two processes spend in parallel.
    Files that come from the same block go to the same process, whose cache holds the decompressed block."""
    if not todo:
        return
    base = store.root / MAT  # made by materialize() already
    for sub in {key[:2] for key in todo}:
        _real_dir(base / sub)
    index = store.objects.index
    groups: dict[object, list[tuple[Entry, str]]] = {}
    for key, (e, path) in todo.items():
        slot = index.get(bytes.fromhex(e.digest)) if e.type == FILE else None
        groups.setdefault(key if slot is None else (slot.pack, slot.offset), []).append((e, path))
    dfd = os.open(base, DIR_FLAGS)
    try:
        def make(group: list[tuple[Entry, str]]) -> None:
            for e, path in group:
                _make_mat(store, e, dfd, path)

        run_split(make, list(groups.values()), weight=lambda g: sum(e.size + COPY_COST for e, _ in g))
    finally:
        os.close(dfd)


def _listing(folder: str) -> tuple[set[str], set[str]]:
    """The regular files and the symlinks in a mat/ subfolder: a symlink at a file's key is not its copy."""
    files: set[str] = set()
    links: set[str] = set()
    try:
        with os.scandir(folder) as it:
            for d in it:
                if d.is_symlink():
                    links.add(d.name)
                elif d.is_file(follow_symlinks=False):
                    files.add(d.name)
    except FileNotFoundError:
        pass
    return files, links


def ensure_mat(store: Store, e: Entry, dirty: set[Path]) -> Path:
    """The shared read-only copy of this file's content with this metadata; created if missing."""
    path = mat_path(store, mat_key(e))
    if _is_file(path):
        return path
    if os.path.lexists(path):
        os.unlink(path)  # a symlink planted in mat/ is never linked into a tree
    _real_dir(path.parent.parent)
    _real_dir(path.parent)
    dfd = os.open(path.parent.parent, DIR_FLAGS)
    try:
        _make_mat(store, e, dfd, os.fspath(path), sync=True)  # no syncfs follows (boot files, repair)
    finally:
        os.close(dfd)
    dirty.add(path.parent)
    return path


def _make_mat(store: Store, e: Entry, mat_fd: int, path: str, sync: bool = False) -> None:
    """Make one shared copy at `path` (in mat/, whose descriptor is `mat_fd`).

    materialize() marks mat/ UNSYNCED before its copies and syncs the whole filesystem once after them: its
    copies are made at their names directly (the cheapest way: an unnamed file linked in once complete cost
    40% more per copy, 0.27 against 0.19 s for 5,000), and one a kill leaves half-made is removed by the
    marker's sweep; one that fails is removed here. `sync` (a single copy, no marker: boot files, repair):
    the copy is written as an unnamed inode (O_TMPFILE) in its subfolder, fsynced and linked in once
    complete, so a killed command leaves nothing behind; where the filesystem has no O_TMPFILE, and for
    symlinks, under a temp name in mat/ itself (not in its 256 subfolders: finding a killed command's
    leftovers is then one listing, which every commit does) and renamed into place."""
    folder, name = os.path.split(path)
    rel = f"{name[:2]}/{name}"
    tmp = f"{os.path.dirname(folder)}/{TMP_PREFIX}{name}"
    if e.type == SYMLINK:
        _make_mat_symlink(e, path, tmp if sync else path)
        return
    own = os.geteuid() == 0
    if sync:
        fd, named = _create(folder, tmp)
        made = tmp if named else None  # what to remove if this copy fails
    else:
        fd, made = _open_new(rel, mat_fd), rel
    try:
        try:
            _write_content(store.objects, fd, e)
            _apply_fd(fd, e, own)
            if sync:
                os.fsync(fd)
            faults.point("materialize.before-mat-link")
            if made is None:
                _link_fd(fd, mat_fd, rel)
        finally:
            os.close(fd)
    except BaseException as exc:
        if made is not None:
            os.unlink(made, dir_fd=mat_fd)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space(folder, exc, e.size) from exc
        raise
    if sync and made is not None:
        os.rename(tmp, path)


# Whether copies are made as O_TMPFILE files: naming one goes through /proc (a chroot may not have it), and
# whether the filesystem takes O_TMPFILE is learned on the first try.
_tmpfile = [os.path.isdir("/proc/self/fd")]


def _create(folder: str, tmp: str) -> tuple[int, bool]:
    """A new file to write a copy into: (fd, False) for an unnamed one in `folder`, (fd, True) for `tmp`."""
    if _tmpfile[0]:
        try:
            return os.open(folder, os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o600), False
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            _tmpfile[0] = False
    return _open_new(tmp), True


def _open_new(path: str, dir_fd: int | None = None) -> int:
    """Create `path` for writing; whatever is there (a killed command's temp file, a symlink someone planted
    at a copy's key) is replaced, never followed."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        os.unlink(path, dir_fd=dir_fd)
        return os.open(path, flags, 0o600, dir_fd=dir_fd)


def _link_fd(fd: int, dir_fd: int, name: str) -> None:
    """Give the unnamed file `fd` its name (linkat through /proc, which needs no privilege). A dir_fd makes
    os.link call linkat() with AT_SYMLINK_FOLLOW rather than link(), which would not follow the magic link."""
    src = f"/proc/self/fd/{fd}"
    try:
        os.link(src, name, dst_dir_fd=dir_fd)
    except FileExistsError:  # something not ours at the key (a planted symlink): the copy replaces it
        os.unlink(name, dir_fd=dir_fd)
        os.link(src, name, dst_dir_fd=dir_fd)


def _make_mat_symlink(e: Entry, path: str, at: str) -> None:
    """A shared symlink, made at `at` and renamed to `path` once it has its metadata (or made at `path` itself
    when the two are the same: materialize()'s marked copies)."""
    try:
        os.symlink(e.target, at)
    except FileExistsError:  # left by a killed command, or planted at the key
        os.unlink(at)
        os.symlink(e.target, at)
    folder, name = os.path.split(at)
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _apply_path(dfd, os.fsencode(name), e, own=os.geteuid() == 0, symlink=True)
    except BaseException:
        os.unlink(at)
        raise
    finally:
        os.close(dfd)
    faults.point("materialize.before-mat-link")
    if at != path:
        os.rename(at, path)
