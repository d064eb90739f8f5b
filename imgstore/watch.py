"""imgstore watch: show a chroot's changes live, and optionally commit once it has been quiet for a while.

Events only say *that* something changed, never *what* a generation holds: inotify drops events when its
queue overflows, and a directory created and filled before its watch is added is only partly seen. So an
auto-commit is an ordinary commit (commit.commit), which walks the whole tree; events merely trigger it.
Nothing can be missed as long as some event arrives after the last change, and the last change of anything
is itself an event. Events that arrive while a commit runs trigger another one after the next quiet period.

The recursive inotify watch (watchdog) adds watches for new directories itself; when its thread dies (the
chroot was removed and recreated, the watch limit was hit) the watch is scheduled again and the next
commit is forced, since events may have been lost in between. While apt or dpkg holds its lock in the
chroot, an auto-commit waits: a pause in the middle of an installation is not a state worth keeping.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import re
import struct
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from .changes import chroot_changes, show_path
from .commit import CommitResult, commit
from .errors import ImgstoreError, NotFound, UsageError
from .scan import compile_excludes
from .store import Store

CREATED, DELETED, CHANGED = "created", "deleted", "changed"
_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, DirCreatedEvent, FileDeletedEvent, DirDeletedEvent, FileModifiedEvent, FileMovedEvent,
    DirMovedEvent, FileAttribEvent, DirAttribEvent,
]  # no open/close events: reading a file (as commit does) changes nothing
_APT_LOCKS = (b"var/lib/dpkg/lock-frontend", b"var/lib/dpkg/lock", b"var/lib/apt/lists/lock",
              b"var/cache/apt/archives/lock")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h)?\s*$")


def parse_duration(text: str) -> float:
    """'30s', '2m', '500ms', '1h' or plain seconds ('45', '0.5')."""
    m = _DURATION.match(text)
    if not m:
        raise UsageError(f"{text!r} is not a duration", "write it like 30s, 500ms, 2m or 1h")
    scale = {"ms": 0.001, None: 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}[m.group(2)]
    return float(m.group(1)) * scale


@dataclass
class Batch:
    """Changed paths seen within one short window, coalesced to their net effect."""

    started: float  # time.time() of the first event
    paths: dict[bytes, str] = field(default_factory=dict)  # relative path -> CREATED/DELETED/CHANGED

    def add(self, rel: bytes, kind: str) -> None:
        prev = self.paths.get(rel)
        if prev == CREATED and kind == DELETED:
            del self.paths[rel]  # came and went: no net change
            return
        if prev == CREATED and kind == CHANGED:
            return
        if prev == DELETED and kind == CREATED:
            kind = CHANGED  # replaced
        self.paths[rel] = kind

    def counts(self) -> dict[str, int]:
        out = {CREATED: 0, DELETED: 0, CHANGED: 0}
        for kind in self.paths.values():
            out[kind] += 1
        return out

    def groups(self, limit: int = 6) -> list[tuple[str, int]]:
        """At most `limit` (path, changes) groups: single paths, or 'dir/' standing for the changes below it,
        at the deepest level that still fits; paths relative to the chroot."""
        split = sorted(p.split(b"/") for p in self.paths)
        if not split:
            return []
        depth = max(len(s) for s in split)
        grouped: dict[tuple[bytes, ...], list[bytes]] = {}
        while depth >= 1:
            grouped = {}
            for s in split:
                grouped.setdefault(tuple(s[:depth]), []).append(b"/".join(s))
            if len(grouped) <= limit:
                break
            depth -= 1
        out = []
        for key, members in list(grouped.items())[:limit]:
            if len(members) == 1:
                out.append((show_path(members[0])[1:] or ".", 1))
            else:
                out.append((show_path(b"/".join(key))[1:] + "/", len(members)))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"time": self.started, "counts": self.counts(),
                "paths": {show_path(p)[1:] or ".": k for p, k in sorted(self.paths.items())}}


class _Handler(FileSystemEventHandler):
    def __init__(self, q: queue.SimpleQueue[FileSystemEvent]) -> None:
        self.q = q

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.q.put(event)


class _LogTap(logging.Handler):
    """watchdog reports a queue overflow or a failed re-watch only in its log; we need to act on them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: queue.SimpleQueue[tuple[int, str]] = queue.SimpleQueue()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.put((record.levelno, record.getMessage()))


def package_manager_busy(chroot: Path) -> bool:
    """Whether a process holds apt's or dpkg's lock in the chroot (a test lock: we never take it)."""
    root = os.fsencode(chroot)
    for rel in _APT_LOCKS:
        try:
            fd = os.open(root + b"/" + rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            # struct flock: l_type, l_whence, l_start, l_len, l_pid (+ padding); F_GETLK answers with the
            # conflicting lock, or l_type F_UNLCK. Unlike lockf() it does not take the lock.
            req = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            res = fcntl.fcntl(fd, fcntl.F_GETLK, req)
            if struct.unpack("hhqqi4x", res)[0] != fcntl.F_UNLCK:
                return True
        except OSError:
            continue
        finally:
            os.close(fd)
    return False


class Watcher:
    """Watch a chroot; report batches of changes; with auto_commit, commit after `quiet_period` seconds
    without changes, then keep watching. run() blocks until stop() (from any thread or a signal handler),
    until `until()` is true, or KeyboardInterrupt."""

    def __init__(
        self,
        store: Store,
        profile: str,
        chroot: Path,
        *,
        auto_commit: bool = False,
        quiet_period: float = 30.0,
        message: str = "",
        no_kernel: bool = False,
        on_batch: Callable[[Batch], None] | None = None,
        on_commit: Callable[[CommitResult], None] | None = None,
        on_notice: Callable[[str], None] | None = None,
        settle: float = 0.2,
        max_batch: float = 1.0,
    ) -> None:
        self.store = store
        self.profile = store.profile(profile)
        self.chroot = chroot.absolute()
        self.auto_commit = auto_commit
        self.quiet_period = quiet_period
        self.message = message or "auto-commit by imgstore watch"
        self.no_kernel = no_kernel
        self.on_batch = on_batch
        self.on_commit = on_commit
        self.on_notice = on_notice
        self.settle = settle  # a batch ends after this long without events ...
        self.max_batch = max_batch  # ... or after this long in any case: one line a second under load
        self.batches = 0
        self.commits: list[CommitResult] = []
        self.dirty = False  # something changed since the last commit
        self.ready = threading.Event()  # set once the watch is in place: changes from then on are seen
        self._root = os.fsencode(self.chroot)
        self._exclude = compile_excludes(self.profile.excludes)
        store_root = os.fsencode(store.root.absolute())
        self._store_rel = store_root[len(self._root) + 1:] if store_root.startswith(self._root + b"/") else None
        self._events: queue.SimpleQueue[FileSystemEvent] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._observer: Any = None
        self._batch: Batch | None = None
        self._batch_t0 = 0.0
        self._last_event = 0.0
        self._waiting_for_apt = False
        self._watch_error: str | None = None
        self._reschedule = False  # start a fresh watch at the next health check

    # -- control -------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self, until: Callable[[], bool] | None = None) -> None:
        if not self.chroot.is_dir():
            raise NotFound(f"chroot {self.chroot} does not exist", "give the path of the chroot directory")
        # watchdog warns (with a screenful of repr) when a new directory is watched twice in a race it
        # resolves itself; harmless, and not for an operator's terminal.
        warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)
        tap = _LogTap()
        wd_log = logging.getLogger("watchdog")
        wd_log.addHandler(tap)
        try:
            self._schedule()
            if self._observer is None:
                raise UsageError(f"cannot watch {self.chroot}: {self._watch_error}", _watch_hint(self._watch_error))
            if self.auto_commit:
                pending = chroot_changes(self.store, self.profile.name, self.chroot)
                if not pending.clean:
                    self.dirty = True
                    self._last_event = time.monotonic()
                    n = sum(len(pending.of(k)) for k in ("added", "removed", "modified", "metadata"))
                    since = f"since {pending.base}" if pending.base else "(no generation yet)"
                    self._notice(f"{n:,} changes {since} are not committed yet; committing them after the "
                                 "quiet period")
            mode = (f"auto-commit after {self.quiet_period:g} s without changes" if self.auto_commit
                    else "showing changes only")
            self._notice(f"watching {self.chroot} for profile {self.profile.name} ({mode}); Ctrl-C to stop")
            self.ready.set()
            while not self._stop.is_set() and not (until is not None and until()):
                self._drain(self.settle / 2)
                self._read_log(tap)
                now = time.monotonic()
                self._health()
                if self._batch is not None and (now - self._last_event >= self.settle
                                                or now - self._batch_t0 >= self.max_batch):
                    self._flush_batch()
                if self.auto_commit and self.dirty and now - self._last_event >= self.quiet_period:
                    self._try_commit()
            self._flush_batch()
        finally:
            wd_log.removeHandler(tap)
            self._unschedule()

    # -- events ---------------------------------------------------------------------------------
    def _drain(self, timeout: float) -> None:
        try:
            ev = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._take(ev)
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                return

    def _take(self, ev: FileSystemEvent) -> None:
        if isinstance(ev, (FileMovedEvent, DirMovedEvent)):
            self._record(ev.src_path, DELETED)
            self._record(ev.dest_path, CREATED)
        elif isinstance(ev, (FileCreatedEvent, DirCreatedEvent)):
            self._record(ev.src_path, CREATED)
        elif isinstance(ev, (FileDeletedEvent, DirDeletedEvent)):
            self._record(ev.src_path, DELETED)
        else:
            self._record(ev.src_path, CHANGED)

    def _record(self, path: bytes | str, kind: str) -> None:
        p = os.fsencode(path)
        if p == self._root:
            rel = b"."
        elif p.startswith(self._root + b"/"):
            rel = p[len(self._root) + 1:]
        else:
            return
        if self._ignored(rel):
            return
        now = time.monotonic()
        if self._batch is None:
            self._batch = Batch(time.time())
            self._batch_t0 = now
        self._batch.add(rel, kind)
        self._last_event = now
        self.dirty = True

    def _ignored(self, rel: bytes) -> bool:
        if self._store_rel is not None and (rel == self._store_rel or rel.startswith(self._store_rel + b"/")):
            return True  # a store inside its own chroot must not trigger itself
        if self._exclude is None or rel == b".":
            return False
        # The walk prunes at the first excluded component, so a path below one is excluded too.
        parts = rel.split(b"/")
        return any(self._exclude.fullmatch(b"/" + b"/".join(parts[:i])) for i in range(1, len(parts) + 1))

    def _flush_batch(self) -> None:
        b, self._batch = self._batch, None
        if b is None or not b.paths:
            return
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(b)

    # -- committing -----------------------------------------------------------------------------
    def _try_commit(self) -> None:
        if package_manager_busy(self.chroot):
            if not self._waiting_for_apt:
                self._notice("apt or dpkg holds its lock in the chroot: committing once it is done")
                self._waiting_for_apt = True
            return
        self._waiting_for_apt = False
        self._flush_batch()
        self.dirty = False  # events during the commit set it again: they may have come too late for its walk
        try:
            res = commit(self.store, self.chroot, self.profile.name, self.message, no_kernel=self.no_kernel)
        except (ImgstoreError, OSError) as exc:
            self.dirty = True
            self._last_event = time.monotonic()
            self._notice(f"auto-commit failed: {exc}; trying again after the next quiet period")
            return
        self.commits.append(res)
        if self.on_commit is not None:
            self.on_commit(res)

    # -- the observer -----------------------------------------------------------------------------
    def _schedule(self) -> None:
        obs = Observer()
        try:
            obs.schedule(_Handler(self._events), os.fspath(self.chroot), recursive=True, event_filter=_EVENTS)
            obs.start()
        except OSError as exc:
            obs.stop()
            self._watch_error = exc.strerror or str(exc)
            if exc.errno == errno.ENOSPC:
                self._watch_error = "the inotify watch limit is reached"
            return
        self._observer = obs

    def _unschedule(self) -> None:
        obs, self._observer = self._observer, None
        if obs is not None:
            obs.stop()
            if obs.is_alive():
                obs.join(5)

    def _health(self) -> None:
        """Re-watch when the observer or its inotify thread died, and force the next commit."""
        obs = self._observer
        healthy = obs is not None and obs.is_alive() and obs.emitters and all(e.is_alive() for e in obs.emitters)
        if healthy and not self._reschedule:
            return
        self._reschedule = False
        was_running = obs is not None
        self._unschedule()
        self._schedule()
        if self._observer is None:
            if was_running:
                self._notice(f"lost the watch on {self.chroot} ({self._watch_error}); retrying every second")
                # Unwatched, nothing would ever trigger: commit after a quiet period regardless.
                self.dirty = True
                self._last_event = time.monotonic()
            self._stop.wait(1)
            return
        self._notice(f"watching {self.chroot} again; changes in between are caught by the next commit's walk")
        self.dirty = True
        self._last_event = time.monotonic()

    def _read_log(self, tap: _LogTap) -> None:
        while True:
            try:
                level, msg = tap.messages.get_nowait()
            except queue.Empty:
                return
            if "overflow" in msg.lower():
                self.dirty = True
                self._last_event = time.monotonic()
                # Watches of directories created meanwhile may be missing too: start over from a fresh walk.
                self._reschedule = True
                self._notice("the kernel's event queue overflowed: some changes were not shown; "
                             "the next commit walks the whole tree, so it still takes all of them")
            else:
                self._reschedule = self._reschedule or level >= logging.ERROR
                self._notice(f"watch: {msg}")

    def _notice(self, text: str) -> None:
        if self.on_notice is not None:
            self.on_notice(text)


def _watch_hint(error: str | None) -> str:
    if error and "limit" in error:
        return "raise it: sysctl fs.inotify.max_user_watches=1048576 (and max_user_instances)"
    return "check that the chroot exists and is readable"
