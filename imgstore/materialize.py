"""materialize: lay a generation out as a read-only tree that NFS can export, once, at its own path.

    <store>/<gen id>-<profile>-rootfs/        the tree (never changed once renamed into place)
    <store>/<gen id>-<profile>-rootfs.keys    its index: for each key (content or symlink target + owner +
                                              mode + xattrs + mtime), one path of the tree that has it
    <store>/mat/<2 hex>/<key>                 single shared copies: boot files, files repair puts back

A tree's regular files and symlinks are made in it, or hardlinked from another tree that has the same key
(found through that tree's index), so generations that share files share storage: ten generations differing
by one package cost one tree's worth of data plus directories. Removing a tree (gc) frees what no other tree
links. (Linking a symlink costs a tenth of creating one on ext4, as ostree's bare checkouts do too.)
The tree is built under a temp name and renamed into place, so a half-built tree is never visible; a
temp tree left by a crash (or by an earlier boot of the server) is discarded, never reused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

import blake3
import zstandard

from . import faults, fill, generations, native
from .browse import entries as manifest_entries
from .checkout import _apply_fd, _apply_path, _write_content, check_objects, restore
from .durable import (
    DIR_FLAGS,
    TMP_PREFIX,
    fsync_dir,
    no_space,
    remove_stale_temps,
    remove_tree,
    syncfs,
    writing_back,
)
from .errors import ImgstoreError
from .generations import Generation
from .manifest import FILE, SYMLINK, Entry
from .store import Store

MAT = "mat"
KEYS = ".keys"
# Left in mat/ by an earlier imgstore (whose trees linked every file to a copy in mat/) while its materialize made
# copies: a command that finds it removes the copies no tree links, as that version did.
UNSYNCED = f"{TMP_PREFIX}unsynced"


def tree_path(store: Store, gen: Generation) -> Path:
    return store.root / f"{gen.gen_id}-{gen.profile}-rootfs"


def mat_key(e: Entry) -> str:
    """A regular file's key starts from its content's digest (64 hex digits), a symlink's from its target."""
    h = blake3.blake3(e.digest.encode() if e.type == FILE else b"symlink\0" + e.target)
    h.update(b"%d %d %o %d %d" % (e.uid, e.gid, e.mode, e.mtime_ns, e.sparse))
    for k, v in e.xattrs:
        h.update(b"\0" + k + b"\0" + v)
    return h.hexdigest()


def keys_path(tree: Path) -> Path:
    return tree.with_name(tree.name + KEYS)


def mat_path(store: Store, key: str) -> Path:
    return store.root / MAT / key[:2] / key


def discard_stale(store: Store) -> list[str]:
    """Remove temp trees, indexes whose tree is gone and mat temp files; call with the store lock held (so
    nothing is writing them)."""
    gone = []
    for p in store.root.iterdir():
        if p.name.startswith(TMP_PREFIX):
            if p.is_dir() and not p.is_symlink():
                _rmtree(p)
            else:
                p.unlink()
            gone.append(p.name)
        elif p.name.endswith(f"-rootfs{KEYS}") and not _is_real_dir(p.with_name(p.name[: -len(KEYS)])):
            p.unlink()  # its tree was never renamed into place, or gc removed it before the index
            gone.append(p.name)
    # Temp packs and loose objects of a killed commit, temp stat caches.
    for folder in ("packs", "objects", "cache"):
        n = remove_stale_temps(store.root / folder)
        if n:
            gone.append(f"{folder}/ ({n} temp files)")
    if os.path.lexists(store.root / MAT / UNSYNCED):
        # An earlier imgstore's materialize stopped before its syncfs: the copies no tree links (the ones it
        # made among them) go.
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
    staging = store.root / f"{TMP_PREFIX}{gen.gen_id[:16]}-{gen.profile}-rootfs"
    keys_tmp = store.root / f"{TMP_PREFIX}{final.name}{KEYS}"
    if os.path.lexists(staging):
        _rmtree(staging)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(keys_tmp)
    os.mkdir(staging, 0o700)
    make: list[Entry] = []
    try:
        root_fd = os.open(staging, DIR_FLAGS)
        try:
            with _Earlier(store, final) as earlier:
                make, sources, keys = _plan(es, earlier, root_fd)
                check_objects(store.objects, es)  # before the first write (a source found changed is made anew)
                fill.make_dirs(es, root_fd)
                with writing_back(store.root):
                    made = fill.make_and_link(store.objects, es, make, sources, root_fd,
                                              fault=lambda: faults.point("materialize.in-fill"))
                restore(store.objects, es, staging, own=os.geteuid() == 0, made=made,
                        link_source=lambda e: sources.get(id(e)))
            _write_keys(keys_tmp, keys)
        finally:
            os.close(root_fd)
        faults.point("materialize.before-sync")
        syncfs(store.root)  # the whole tree and its index, durably, before either becomes visible
        os.rename(keys_tmp, keys_path(final))  # an index without its tree is removed by discard_stale
        os.rename(staging, final)
        fsync_dir(store.root)
    except BaseException as exc:
        _rmtree(staging)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(keys_tmp)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space(store.root, exc, sum(e.size for e in make)) from exc
        raise
    return final, True


class _Earlier:
    """The files and symlinks of the store's other trees, by key, read from their indexes (KEYS): a new tree
    links to them instead of making its own. restore() checks each before it links it (checkout._link)."""

    def __init__(self, store: Store, final: Path) -> None:
        self.store, self.final = store, final
        self.fds: list[int] = []
        self.index: dict[bytes, tuple[int, bytes]] = {}

    def __enter__(self) -> _Earlier:
        _index_unindexed(self.store)
        for keys in sorted(self.store.root.glob(f"*-rootfs{KEYS}"), key=lambda p: p.name):
            tree = keys.with_name(keys.name[: -len(KEYS)])
            if tree == self.final or keys.name.startswith(TMP_PREFIX):
                continue
            try:
                data = zstandard.ZstdDecompressor().decompress(keys.read_bytes())
                fd = os.open(tree, DIR_FLAGS)
            except (OSError, zstandard.ZstdError):
                continue  # its tree is gone (discard_stale removes the index) or the index is unreadable
            self.fds.append(fd)
            for rec in data.split(b"\0"):
                if len(rec) > 65 and rec[64:65] == b" ":
                    self.index.setdefault(rec[:64], (fd, rec[65:]))
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds:
            os.close(fd)


def _index_unindexed(store: Store) -> None:
    """Write the index of each tree an earlier imgstore made without one (its files link to copies in mat/),
    from its generation's manifest, so that new trees share its files rather than copy them all. Once per
    tree; one whose generation or manifest cannot be read stays without (it is then not shared from)."""
    trees = [p for p in store.root.glob("*-rootfs") if not p.name.startswith(TMP_PREFIX)
             and not os.path.lexists(keys_path(p)) and _is_real_dir(p)]
    if not trees:
        return
    with store.engine.connect() as conn:
        for tree in trees:
            try:
                es = manifest_entries(store, generations.resolve(conn, tree.name[:64], tree.name[65:-len('-rootfs')]))
            except ImgstoreError:
                continue
            keys: dict[str, bytes] = {}
            for e in es:
                if e.type == FILE or e.type == SYMLINK:
                    keys.setdefault(mat_key(e), e.path)
            tmp = store.root / f"{TMP_PREFIX}{tree.name}{KEYS}"
            _write_keys(tmp, keys, sync=True)
            os.rename(tmp, keys_path(tree))
    fsync_dir(store.root)


def _plan(es: list[Entry], earlier: _Earlier, root_fd: int
          ) -> tuple[list[Entry], dict[int, tuple[int, bytes]], dict[str, bytes]]:
    """Which files and symlinks to make (the first of each key that no other tree has), where the others link
    from ({id(entry): (directory fd, path below it)}: another tree, or an earlier path of this one), and the
    new tree's index ({key: path})."""
    make: list[Entry] = []
    sources: dict[int, tuple[int, bytes]] = {}
    keys: dict[str, bytes] = {}
    keyer = native.keyer()
    for e, key in zip(es, keyer(es) if keyer else map(_key_or_none, es), strict=True):
        if key is None:
            continue
        first = keys.get(key)
        if first is not None:
            sources[id(e)] = (root_fd, first)
            continue
        keys[key] = e.path
        hit = earlier.index.get(key.encode())
        if hit is None:
            make.append(e)
        else:
            sources[id(e)] = hit
    return make, sources, keys


def _key_or_none(e: Entry) -> str | None:
    return mat_key(e) if e.type == FILE or e.type == SYMLINK else None


def _write_keys(path: Path, keys: dict[str, bytes], sync: bool = False) -> None:
    """A tree's index: for each key, one path of the tree that has it (zstd; records `<key> <path>\\0`).
    Unsynced unless `sync`: the syncfs before a new tree is renamed into place covers it."""
    data = b"".join(b"%s %s\0" % (k.encode(), p) for k, p in keys.items())
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644), "wb") as f:
        f.write(zstandard.ZstdCompressor(level=1).compress(data))
        if sync:
            f.flush()
            os.fsync(f.fileno())


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
        _make_mat(store, e, dfd, os.fspath(path))
    finally:
        os.close(dfd)
    dirty.add(path.parent)
    return path


def _make_mat(store: Store, e: Entry, mat_fd: int, path: str) -> None:
    """Make one shared copy at `path` (in mat/, whose descriptor is `mat_fd`), with no syncfs after it: it is
    written as an unnamed inode (O_TMPFILE) in its subfolder, fsynced and linked in once complete, so a killed
    command leaves nothing behind; where the filesystem has no O_TMPFILE, and for symlinks, under a temp name
    in mat/ itself (not in its 256 subfolders: finding a killed command's leftovers is then one listing, which
    every commit does) and renamed into place."""
    folder, name = os.path.split(path)
    tmp = f"{os.path.dirname(folder)}/{TMP_PREFIX}{name}"
    if e.type == SYMLINK:
        _make_mat_symlink(e, path, tmp)
        return
    fd, named = _create(folder, tmp)
    try:
        try:
            _write_content(store.objects, fd, e)
            _apply_fd(fd, e, os.geteuid() == 0)
            os.fsync(fd)
            faults.point("materialize.before-mat-link")
            if not named:
                _link_fd(fd, mat_fd, f"{name[:2]}/{name}")
        finally:
            os.close(fd)
    except BaseException as exc:
        if named:
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space(folder, exc, e.size) from exc
        raise
    if named:
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


def _open_new(path: str) -> int:
    """Create `path` for writing; whatever is there (a killed command's temp file, a symlink someone planted
    at a copy's key) is replaced, never followed."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        os.unlink(path)
        return os.open(path, flags, 0o600)


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
    """A shared symlink, made at `at` and renamed to `path` once it has its metadata."""
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
    os.rename(at, path)
