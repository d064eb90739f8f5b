"""commit: turn the current state of a chroot into a generation.

Order (docs/format.md, "Write ordering"): every object durable -> manifest object -> generation
object -> database row -> stat cache. A crash at any point leaves at worst unreferenced objects,
which gc removes; never a row that points at something missing.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3

from . import audit, bootfiles, faults, generations, manifest, metadata, native
from .durable import LONG_PATH, no_space
from .errors import ChangedWhileReading, NoSpace, NotFound, UsageError
from .generations import Generation
from .locking import store_lock
from .manifest import FILE, HARDLINK, SYMLINK, Entry, decode_line
from .objects import BLOCK, LOOSE_MIN, Block, ObjectStore
from .scan import Found, Lstat, Run, describe, walk_cached
from .statcache import Row, StatCache, cache_path, file_digest, key
from .store import Store

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

    from .profiles import Profile

RETRIES = 3
BATCH_FILES = 1024
BATCH_BYTES = 2 << 20  # a batch's new small files make one or two blocks (objects.BLOCK)
WINDOW = 8  # batches in flight between the walk and the writer
OUT_CHUNK = 64 << 10  # manifest lines handed on at a time


class CommitResult:
    """What a commit made, read and stored."""

    def __init__(self, generation: Generation, created: bool, entries: int = 0, files: int = 0, bytes: int = 0,
                 read_files: int = 0, read_bytes: int = 0, new_objects: int = 0, new_bytes: int = 0,
                 skipped_mounts: list[str] | None = None, skipped_sockets: list[str] | None = None,
                 excluded: int = 0, seconds: float = 0.0) -> None:
        self.generation = generation
        self.created = created
        self.entries = entries
        self.files = files
        self.bytes = bytes
        self.read_files = read_files
        self.read_bytes = read_bytes
        self.new_objects = new_objects
        self.new_bytes = new_bytes
        self.skipped_mounts = skipped_mounts if skipped_mounts is not None else []
        self.skipped_sockets = skipped_sockets if skipped_sockets is not None else []
        self.excluded = excluded
        self.seconds = seconds

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["generation"] = self.generation.as_dict()
        return d


Progress = Callable[[int, int], None]
# What a worker returns for a batch: (digest, bytes read) per file, then the objects and bytes it stored.
_Batch = tuple[list[tuple[str, int]], int, int]


def _same(a: Lstat, b: Lstat) -> bool:
    return (a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns) == (b.st_ino, b.st_size, b.st_mtime_ns, b.st_ctime_ns)


class _Reader:
    """Reads and hashes files in worker threads. A new small file is read straight into the thread's block,
    which is compressed and written into the open pack once full; a large one is compressed into a loose
    object as it is read. Reads, hashing, compression and writes release the GIL; small files are read and
    hashed a run at a time by the Rust loop (imgstore/native.py) where it is built."""

    def __init__(self, store: Store) -> None:
        self.objects = store.objects
        self._local = threading.local()

    def batch(self, founds: list[Found]) -> _Batch:
        block: Block | None = getattr(self._local, "block", None)
        if block is None:
            block = self._local.block = Block()
        done: list[tuple[str, int]] = []
        seen: set[bytes] = set()
        stored = [0, 0]  # new objects, new bytes

        def store_block() -> None:
            n, added = self.objects.add_block(*block.take())
            stored[0] += n
            stored[1] += added

        try:
            i = 0
            while i < len(founds):
                n = self.read_native(founds, i, block, seen, done)
                if n == 0:  # a large file, a long path, or a file the native loop left to Python
                    digest, nread, loose_new = self.read(founds[i], block, seen)
                    done.append((digest, nread))
                    if loose_new:
                        stored[0] += 1
                        stored[1] += loose_new
                    n = 1
                i += n
                if block.used >= BLOCK:
                    store_block()
            if block.objs:
                store_block()
        finally:
            block.clear()  # what an error left unstored is not kept for the next batch
        return done, stored[0], stored[1]

    @cached_property
    def read_files(self) -> native.NativeRead | None:
        """The Rust read loop, looked up with the first batch: a no-op commit reads nothing and does not load it."""
        return native.reader()

    def read_native(self, founds: list[Found], start: int, block: Block, seen: set[bytes],
                    done: list[tuple[str, int]]) -> int:
        """Read and hash the small files from founds[start] on in Rust (imgstore/_native), as many as fill the
        block, with the GIL released throughout; returns how many it did (0: founds[start] is Python's).
        Only files exactly as the walk saw them (inode, size, mtime, ctime) are taken, so their entries and
        stat cache rows (from the walk's lstat) stand as they are."""
        read_files = self.read_files
        if read_files is None:
            return 0
        want: list[tuple[bytes, int, int, int, int]] = []
        room = BLOCK - block.used
        for j in range(start, len(founds)):
            f = founds[j]
            st = f.st
            if st.st_size >= LOOSE_MIN or len(f.abspath) >= LONG_PATH or room <= 0:
                break
            want.append((f.abspath, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            room -= st.st_size
        if not want:
            return 0
        n = 0
        at = block.used
        for raw in read_files(want, block.view, at, BLOCK):
            if raw is None:
                break
            size = want[n][2]
            if raw not in seen and not self.objects.has_raw(raw):
                seen.add(raw)
                if block.used != at:  # a duplicate before it left a gap
                    block.view[block.used:block.used + size] = block.view[at:at + size]
                block.keep(raw, size)
            at += size
            done.append((raw.hex(), size))
            n += 1
        return n

    def read(self, found: Found, block: Block, seen: set[bytes]) -> tuple[str, int, int]:
        """(digest, bytes read, bytes stored loose) of one file; a new small one is kept in `block`."""
        e = found.entry
        for _attempt in range(RETRIES):
            try:
                with found.path() as p:
                    fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except FileNotFoundError:
                raise ChangedWhileReading(
                    f"{os.fsdecode(found.abspath)} was removed while commit read it",
                    "let the chroot settle (stop what writes to it) and run commit again",
                ) from None
            try:
                before = os.fstat(fd)
                if not stat.S_ISREG(before.st_mode) or before.st_ino != found.st.st_ino:
                    raise ChangedWhileReading(
                        f"{os.fsdecode(found.abspath)} was replaced while commit read it",
                        "let the chroot settle and run commit again",
                    )
                size = before.st_size
                if size < LOOSE_MIN:
                    room = block.room(size)
                    n = _read_into(fd, room)
                    # A file that grew, shrank or was written meanwhile shows in its size, mtime or ctime.
                    if n != size or not _same(before, os.fstat(fd)):
                        continue
                    raw = blake3.blake3(room).digest()
                    if raw not in seen and not self.objects.has_raw(raw):
                        seen.add(raw)
                        block.keep(raw, size)
                    result = (raw.hex(), size, 0)
                else:
                    with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
                        digest, new = self.objects.put_stream(f)
                    if not _same(before, os.fstat(fd)):
                        continue
                    result = (digest, size, new)
            finally:
                os.close(fd)
            # The manifest must describe what we read, even if the file changed after the walk.
            e.size, e.mtime_ns = size, before.st_mtime_ns
            e.mode, e.uid, e.gid = stat.S_IMODE(before.st_mode), before.st_uid, before.st_gid
            e.sparse = size > 0 and before.st_blocks * 512 < size
            found.st = before
            return result
        raise ChangedWhileReading(
            f"{os.fsdecode(found.abspath)} kept changing while commit read it ({RETRIES} tries)",
            "stop what writes to the chroot (or exclude that file in the profile) and run commit again",
        )


class _Pool:
    """The reading threads, started with the first batch: an unchanged tree reads nothing, and its commit does
    not even import concurrent.futures (with logging, 0.003-0.005 s of a 0.11 s no-op)."""

    def __init__(self) -> None:
        self.executor: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[[list[Found]], _Batch], batch: list[Found]) -> Future[_Batch]:
        if self.executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self.executor = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
        return self.executor.submit(fn, batch)

    def shutdown(self, cancel_futures: bool = False) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=cancel_futures)


@contextmanager
def _workers() -> Iterator[_Pool]:
    """The reading threads. Meanwhile the GIL is handed over more often: the walk and the workers each release
    it for every system call, and with Python's default 5 ms a thread back from one can wait for the GIL
    longer than the call took. On an error, batches not started yet are dropped (a full disk: no point)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    pool = _Pool()
    try:
        yield pool
    except BaseException:
        pool.shutdown(cancel_futures=True)
        raise
    finally:
        pool.shutdown()
        sys.setswitchinterval(old)


def _read_into(fd: int, room: memoryview) -> int:
    """Read into `room` until it is full or the file ends; returns the bytes read."""
    n = 0
    while n < len(room):
        got = os.readv(fd, [room[n:]])
        if not got:
            break
        n += got
    return n


def _stored(objects: ObjectStore) -> Callable[[list[bytes]], bool]:
    def stored(digests: list[bytes]) -> bool:
        """Whether all are stored: looked up in the pack index at C speed, else one by one."""
        return all(map(objects.index.slots.__contains__, digests)) or all(map(objects.has_raw, digests))

    return stored


def _ready(item: Row | Found | Run) -> bool:
    return not isinstance(item, Found) or bool(item.entry.digest)


class _Kept(Mapping[bytes, Entry]):
    """Entries by path; an entry given as its manifest line (from the stat cache) is decoded when looked at."""

    def __init__(self) -> None:
        self._d: dict[bytes, Entry | bytes] = {}

    def __setitem__(self, path: bytes, entry: Entry | bytes) -> None:
        self._d[path] = entry

    def __getitem__(self, path: bytes) -> Entry:
        e = self._d[path]
        if isinstance(e, bytes):
            e = self._d[path] = decode_line(e[:-1])
        return e

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


_LOOKED_AT = frozenset((b"vmlinuz", b"initrd.img", b"etc/debian_version", b"etc/os-release", b"usr/lib/os-release",
                        b"var/lib/dpkg/status"))  # besides symlinks, hardlinks and boot/: see bootfiles, metadata
# Entries held behind a file still being read before the walk waits for it. A large file being compressed
# (libcrypto: 4.7 MB, 0.03 s) must not stop the walk of the 4,000 entries after it (0.025 s of an
# after-an-upgrade commit); at a few hundred bytes an entry the bound is about 10 MB.
MAX_WAITING = 32768
POLL = 32  # entries between two looks at whether the oldest batch being read is done
SWITCH_INTERVAL = 0.001  # first commit of a minbase rootfs: 0.44 s with Python's 0.005, 0.39 s with 0.001-0.0002


def commit(
    store: Store,
    chroot: Path,
    profile_name: str,
    message: str = "",
    kernel: Path | None = None,
    initrd: Path | None = None,
    no_kernel: bool = False,
    progress: Progress | None = None,
    wait: bool = True,
    locked: bool = False,
    source: str | None = None,
) -> CommitResult:
    """Commit `chroot` as the profile's next generation (or return the latest if nothing changed).

    `locked`: the caller already holds the store lock (import does, between extraction and commit).
    `source`: what to record as the generation's origin instead of the chroot path.
    """
    t0 = time.monotonic()
    profile = store.profile(profile_name)
    chroot = chroot.absolute()
    for p, what in ((kernel, "--kernel"), (initrd, "--initrd")):
        if p is not None and not p.is_file():
            raise NotFound(f"{what} {p} is not a file", f"give the path of the {what[2:]} image")
    if no_kernel and (kernel or initrd):
        raise UsageError("--no-kernel contradicts --kernel/--initrd", "give one or the other")
    # The old stat cache is read with the walk, from its first entry on: inside the lock.
    cache = StatCache(cache_path(store.root, profile.name, os.fspath(chroot)), os.fspath(chroot))
    objects = store.objects
    walked, report = walk_cached(chroot, profile.excludes, cache, _LOOKED_AT, (b"boot/",), _stored(objects))
    root = os.fsencode(chroot)
    _ = store.engine  # open and check the database before doing any work

    with nullcontext() if locked else store_lock(store.root, "commit", wait):
        if not locked:
            # What a killed command left behind is garbage now (only lock holders write temp files); a
            # caller that holds the lock (import) may have staging of its own in the store.
            from .materialize import discard_stale

            discard_stale(store)
        scan_started = time.time_ns()
        _ = objects.index, objects.loose  # loaded before the worker threads look at them
        result = {"files": 0, "bytes": 0, "read_files": 0, "read_bytes": 0, "new_objects": 0, "new_bytes": 0}
        pending: deque[tuple[list[Found], Future[_Batch]]] = deque()
        reader = _Reader(store)
        batch: list[Found] = []
        batch_bytes = 0
        entries = 0
        kept = _Kept()  # what bootfiles and metadata look at; nothing else is kept

        def take_head() -> None:
            founds, fut = pending.popleft()
            done, new_objects, new_bytes = fut.result()
            for found, (digest, nread) in zip(founds, done, strict=True):
                found.entry.digest = digest
                result["read_files"] += 1
                result["read_bytes"] += nread
            result["new_objects"] += new_objects
            result["new_bytes"] += new_bytes

        def cached(rel: bytes, st: Lstat, first: bytes | None, row: Row) -> bool:
            """Whether the cached row of a walked entry can be used. Its lstat fields match, so it is of the same
            kind; but a file's content may have been removed by gc since, and which path of a hardlinked inode
            comes first is the walk's to say (an exclude may have hidden the first)."""
            if first is not None:  # a later path of a hardlinked file
                e = decode_line(row[2][:-1])
                if e.type != HARDLINK or e.target != first:
                    return False
                kept[rel] = e
                return True
            digest = file_digest(row[2]) if stat.S_ISREG(st.st_mode) else None
            if digest is not None:  # a file's line
                if not objects.has_raw(digest):
                    return False
                result["files"] += 1
                result["bytes"] += st.st_size
            elif stat.S_ISREG(st.st_mode):
                return False  # a hardlink's line, whose first path is now excluded
            elif stat.S_ISLNK(st.st_mode):
                kept[rel] = row[2]
                return True
            if rel.startswith(b"boot/") or rel in _LOOKED_AT:
                kept[rel] = row[2]
            return True

        def complete() -> Iterator[bytes]:
            """The manifest: the tree's entries in walk (= manifest) order, each as soon as it and all before
            it are known. An entry as the stat cache found it is its cached line; files are read in batches by
            worker threads, and a line waits for its head's batch."""
            nonlocal batch, batch_bytes, entries
            waiting: deque[Row | Found | Run] = deque()

            def emit(item: Row | Found | Run) -> bytes:
                if isinstance(item, Found):
                    e = item.entry
                    item = (e.path, key(item.st), e.encode())
                elif not isinstance(item, tuple):
                    cache.record_run(item.n, item.records)
                    return item.lines
                cache.record(*item)
                return item[2]

            out = bytearray(manifest.HEADER)  # lines go out in chunks: a yield per line costs more
            record = cache.record
            poll_at = POLL
            progress_at = 256
            with _workers() as pool:
                for w in walked:
                    item: Row | Found | Run
                    if isinstance(w, tuple):
                        entries += 1
                        rel, _abspath, st, first, row = w
                        if row is not None and cached(rel, st, first, row):
                            item = row
                        else:
                            if row is not None:
                                cache.missed(entries - 1)
                            item = describe(w, root)
                            e = item.entry
                            if e.type in (SYMLINK, HARDLINK) or e.path.startswith(b"boot/") or e.path in _LOOKED_AT:
                                kept[e.path] = e
                            if e.type == FILE:
                                result["files"] += 1
                                result["bytes"] += e.size
                                # Small files travel in batches: one task per file would cost more in thread
                                # hand-offs than reading the file does.
                                batch.append(item)
                                batch_bytes += e.size
                                if len(batch) >= BATCH_FILES or batch_bytes >= BATCH_BYTES:
                                    pending.append((batch, pool.submit(reader.batch, batch)))
                                    batch, batch_bytes = [], 0
                                    while len(pending) > WINDOW:
                                        take_head()
                            else:
                                item = (e.path, key(st), e.encode())
                    else:  # a run of entries found as they were (the native walk's): nothing to look at
                        item = w
                        entries += w.n
                        result["files"] += w.files
                        result["bytes"] += w.size
                    if waiting or isinstance(item, Found):
                        waiting.append(item)
                        held = entries - cache.records  # entries waiting (a run is many)
                        if batch and waiting[0] is batch[0] and held > BATCH_FILES:
                            # The head waits in a batch that may never fill (one changed file among cached ones):
                            # a task for it costs less than holding every entry after it in line.
                            pending.append((batch, pool.submit(reader.batch, batch)))
                            batch, batch_bytes = [], 0
                        # The head's batch is asked about every POLL entries (done() takes a lock), not each time:
                        # until it is done, nothing behind it can go out anyway.
                        if entries >= poll_at or held > MAX_WAITING:
                            poll_at = entries + POLL
                            while pending and (pending[0][1].done() or held > MAX_WAITING):
                                take_head()
                            while waiting and _ready(waiting[0]):
                                out += emit(waiting.popleft())
                    elif isinstance(item, tuple):  # nothing waits before it: the common case of an unchanged tree
                        record(*item)
                        out += item[2]
                    else:
                        out += emit(item)
                    if len(out) >= OUT_CHUNK:
                        yield bytes(out)
                        out.clear()
                    if progress and entries >= progress_at:
                        progress_at = entries + 256
                        progress(entries, result["bytes"])
                if batch:
                    pending.append((batch, pool.submit(reader.batch, batch)))
                    batch, batch_bytes = [], 0
                while pending:
                    take_head()
                    # The lines its batch held back go out while the workers finish the batches after it.
                    while waiting and _ready(waiting[0]):
                        out += emit(waiting.popleft())
                while waiting:
                    out += emit(waiting.popleft())
                yield bytes(out)
            if kernel is None and not no_kernel and profile.require_kernel and bootfiles.find(kept)[0] is None:
                # Before anything is stored: the open pack is discarded, a small manifest never written.
                raise NotFound(
                    f"no kernel found in {chroot}/boot (vmlinuz-*) or at {chroot}/vmlinuz",
                    "install a kernel in the chroot, pass --kernel FILE, or pass --no-kernel",
                )
            faults.point("commit.before-flush")
            objects.flush()  # every object durable before the manifest that names them

        cache.begin(scan_started)
        try:
            manifest_digest, mnew = objects.put_chunks(complete())
        except BaseException as exc:
            cache.discard()
            objects.abort()
            if isinstance(exc, NoSpace) or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)):
                # How much more: what the rest of the tree holds that is not stored yet (uncompressed, so an
                # upper bound), plus what was in flight.
                rest = 0
                for w in walked:
                    if not isinstance(w, tuple):
                        continue  # a run: its files' content is stored
                    _, _, st, first, row = w
                    if first is None and stat.S_ISREG(st.st_mode):
                        digest = None if row is None else file_digest(row[2])
                        if digest is None or not objects.has_raw(digest):
                            rest += st.st_size
                inflight = sum(f.entry.size for founds, _ in pending for f in founds) + batch_bytes
                raise no_space(store.root, None, rest + inflight) from exc
            raise
        if progress:
            progress(entries, result["bytes"])

        faults.point("commit.after-manifest")
        try:
            gen, created = _record(store, profile, chroot, kernel, initrd, no_kernel, kept, manifest_digest,
                                   message, source, result, mnew)
            faults.point("commit.after-row")
            try:
                if result["read_files"] or not cache.unchanged:  # a no-op commit writes nothing
                    cache.save()
            except (OSError, NoSpace) as exc:
                # The generation exists; the cache only saves reading unchanged files next time.
                import sys

                print(f"imgstore: warning: the stat cache was not saved ({exc}); the next commit reads every file",
                      file=sys.stderr)
        finally:
            cache.discard()
    return CommitResult(
        generation=gen, created=created, entries=entries, skipped_mounts=report.skipped_mounts,
        skipped_sockets=report.skipped_sockets, excluded=report.excluded, seconds=time.monotonic() - t0,
        **result,
    )


def _record(store: Store, profile: Profile, chroot: Path, kernel: Path | None, initrd: Path | None,
            no_kernel: bool, kept: Mapping[bytes, Entry], manifest_digest: str, message: str, source: str | None,
            result: dict[str, int], manifest_new: int) -> tuple[Generation, bool]:
    """Boot files, the generation object and the database row. Returns (generation, created)."""
    objects = store.objects
    k_entry, i_entry = bootfiles.find(kept)
    kernel_digest, kernel_name = _boot_file(objects, kernel, k_entry, no_kernel)
    initrd_digest, initrd_name = _boot_file(objects, initrd, i_entry, no_kernel)
    gen_text = generations.canonical(
        manifest_digest, kernel_digest, kernel_name, initrd_digest, initrd_name, profile.append
    )
    gen_id, gnew = objects.put_bytes(gen_text)
    objects.flush()
    faults.point("commit.before-row")

    with store.engine.begin() as conn:
        prev = generations.latest(conn, profile.name)
        if prev is not None and prev.gen_id == gen_id:
            return prev, False
        gen = generations.add(
            conn, profile=profile.name, gen_id=gen_id, manifest=manifest_digest, kernel=kernel_digest,
            kernel_name=kernel_name, initrd=initrd_digest, initrd_name=initrd_name, append=profile.append,
            created=time.time(), message=message, user=audit.user(), host=audit.host(),
            source=source or os.fspath(chroot), files=result["files"], size=result["bytes"],
            new_bytes=result["new_bytes"] + manifest_new + gnew,
            meta=metadata.collect(chroot, kept, kernel_name),
        )
        return gen, True


def _boot_file(objects: ObjectStore, given: Path | None, found: Entry | None,
               no_kernel: bool) -> tuple[str | None, str | None]:
    """(digest, name) of a kernel or initrd: the file given on the command line, else the one in the tree."""
    if given is not None:
        with open(given, "rb") as f:
            digest, _ = objects.put_stream(f)
        return digest, given.name
    if found is not None and not no_kernel:
        return found.digest, os.fsdecode(found.path).rsplit("/", 1)[-1]
    return None, None
