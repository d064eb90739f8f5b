"""Fault injection for tests: IMGSTORE_FAULT=<point>[:raise|:kill] makes the process fail there.

Read in this one place. `raise` raises RuntimeError (an unexpected crash inside Python); `kill` sends
SIGKILL to the process itself (a power cut, as far as the store is concerned).
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("IMGSTORE_FAULT", "")


class InjectedFault(RuntimeError):
    pass


def point(name: str) -> None:
    if not _SPEC:
        return
    target, _, how = _SPEC.partition(":")
    if target != name:
        return
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault at {name}")
