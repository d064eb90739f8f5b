"""The store lock: flock on <store>/lock, released by the kernel when the holder dies.

Commands that change the store hold it exclusively; read-only commands never take it. The holder
writes who it is into <store>/lock.info so a waiter can say whom it waits for.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import Busy


def holder(root: Path) -> str:
    try:
        info = json.loads((root / "lock.info").read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} ({info['command']}) since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another imgstore process"


@contextmanager
def store_lock(root: Path, command: str, wait: bool = True) -> Iterator[None]:
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = holder(root)
            if not wait:
                raise Busy(f"the store is locked by {who}", "wait for it to finish, or run without --no-wait") from None
            if sys.stderr.isatty() or os.environ.get("IMGSTORE_LOCK_VERBOSE"):
                print(f"imgstore: waiting for the store lock held by {who}", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        info = {"pid": os.getpid(), "command": command, "since": time.time()}
        # Not atomic on purpose: it is advisory text for people, rewritten by every holder.
        with open(root / "lock.info", "w") as f:
            json.dump(info, f)
        yield
    finally:
        os.close(fd)
