"""forkjoin: share work that is mostly system calls between this process and one forked child.

Two threads of one Python process creating files spend much of their time handing the GIL to each other
(a first materialize of the rootfs: 37,000 futex calls for 5,900 copies); two processes do not. The child
is a fork: it shares the parent's descriptors (the store lock among them, so the lock is held until both
are gone), dies with the parent (PR_SET_PDEATHSIG), and ends with os._exit, so it never flushes, closes or
finalizes anything of the parent's (database connections, buffered output). An exception in the child is
raised again in the parent; a fault point that kills the child kills the parent too (faults.kill_too), as a
power cut would.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeVar

from . import faults
from .errors import ImgstoreError

T = TypeVar("T")
PR_SET_PDEATHSIG = 1


def halves(items: Sequence[T], weight: Callable[[T], int]) -> tuple[list[T], list[T]]:
    """Two lists of about equal total weight, each keeping the items' order."""
    out: tuple[list[T], list[T]] = ([], [])
    load = [0, 0]
    for item in items:
        i = 0 if load[0] <= load[1] else 1
        out[i].append(item)
        load[i] += weight(item)
    return out


class QuietThread(threading.Thread):
    """A thread that takes no lock a forked child could need (it waits in a system call, e.g. `imgstore
    serve`'s worker watching its client): run_split forks while it runs; the child does without it."""


def _others_running() -> bool:
    me = threading.current_thread()
    return any(t is not me and not isinstance(t, QuietThread) for t in threading.enumerate())


def run_split(fn: Callable[[T], object], items: Sequence[T], weight: Callable[[T], int]) -> None:
    """fn(item) for every item: about half of them (by weight) in a forked child, the rest here. The first
    error is raised once both are done; on an error here the child is killed. With other threads running
    (a fork copies only the calling thread, and locks the others hold stay held), everything runs here,
    unless they are QuietThreads."""
    if len(items) < 2 or _others_running():
        for item in items:
            fn(item)
        return
    mine, theirs = halves(items, weight)
    parent = os.getpid()
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError:  # no memory or processes left for a child: everything here
        os.close(r)
        os.close(w)
        for item in items:
            fn(item)
        return
    if pid == 0:
        os.close(r)
        _child(fn, theirs, parent, w)
    os.close(w)
    chunks = []
    try:
        for item in mine:
            fn(item)
        while chunk := os.read(r, 1 << 16):  # the child's pickled exception, if any; EOF when it exits
            chunks.append(chunk)
    except BaseException:
        os.kill(pid, signal.SIGKILL)  # our own child, not reaped yet: the pid is still its
        raise
    finally:
        os.close(r)
        status = os.waitpid(pid, 0)[1]
    if chunks:
        import pickle

        raise pickle.loads(b"".join(chunks))
    if status != 0:
        how = f"was killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else (
            f"exited with status {os.waitstatus_to_exitcode(status)}")
        raise ImgstoreError(f"the process forked to share this command's work {how}", "run the command again")


def _child(fn: Callable[[T], object], items: list[T], parent: int, w: int) -> NoReturn:
    code = 1
    try:
        from .durable import _libc

        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)
        faults.kill_too = parent
        for item in items:
            fn(item)
        code = 0
    except BaseException as exc:
        import pickle

        try:
            report = pickle.dumps(exc)
            pickle.loads(report)  # an exception whose class cannot be rebuilt from its args must not fail there
        except Exception:
            report = pickle.dumps(ImgstoreError(f"{type(exc).__name__}: {exc}"))
        try:
            while report:
                report = report[os.write(w, report):]
        except OSError:
            pass
    finally:
        os._exit(code)
