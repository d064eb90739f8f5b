"""Fault injection for tests: IMGSTORE_FAULT=<point>[:raise|:kill|:stop] makes the process fail or pause there.

Read in this one place. `raise` raises RuntimeError (an unexpected crash inside Python); `kill` sends
SIGKILL to the process itself (a power cut, as far as the store is concerned); `stop` sends SIGSTOP to the
process itself: it stays paused there until it gets SIGCONT, so that a test can run another command at
exactly that moment and turn a race into a deterministic test.

Two kinds of points, named <module>.<moment>:
- fault points, `point()`: where a command that changes the store can crash. tests/test_faults.py kills
  each command at each of them (scripts/reliability.py lists them).
- pause points, `pause_point()`: where a command that takes no lock (verify) can be held while another
  command changes the store under it. Killing a read-only command proves nothing, so these are listed in
  PAUSE_POINTS instead, and tests/test_verify.py runs gc at each of them.
"""

from __future__ import annotations

import os
import signal

PAUSE_POINTS = {
    "verify.after-listing": "verify has read the generations from the database and no object yet",
    "verify.after-objects": "verify has hashed every pack and loose object and read no manifest yet",
    "verify.after-tree-listing": "verify has listed the materialized trees and checked none of them yet",
}


# A process that shares the command's work (forkjoin's child) dies with it at a `kill` point: set to the pid.
kill_too: int | None = None


class InjectedFault(RuntimeError):
    pass


def point(name: str) -> None:
    spec = os.environ.get("IMGSTORE_FAULT")  # read each time: a worker of `imgstore serve` takes its client's
    if not spec:
        return
    target, _, how = spec.partition(":")
    if target != name:
        return
    if how == "kill":
        if kill_too is not None:
            os.kill(kill_too, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    raise InjectedFault(f"injected fault at {name}")


def pause_point(name: str) -> None:
    point(name)  # the same actions; tests/test_verify.py checks that every name used is in PAUSE_POINTS
