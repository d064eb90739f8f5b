"""The audit log: every command that changes something, with time, user, host, command line and result.

Kept in the database (table `events`) so every boot server sharing a PostgreSQL database sees one
trail. The CLI records one event per command after it finishes (ok or error); commands add what they
touched (profile, node, generation) with note().
"""

from __future__ import annotations

import getpass
import os
import shlex
import socket
import sys
import time
from typing import Any

from sqlalchemy import Connection, insert, select

from .schema import events

MUTATING = frozenset({
    "init", "commit", "checkout", "rollout", "rollback", "pin", "unpin", "sync", "gc", "adopt", "materialize",
    "import", "export", "watch", "node add", "node edit", "node rm", "node import-dhcpd", "verify --repair",
})

_ctx: dict[str, Any] = {}


def note(**fields: Any) -> None:
    """Attach profile=, node=, generation=, detail= to the event the CLI writes for this command."""
    _ctx.update({k: v for k, v in fields.items() if v is not None})


def command_name(argv: list[str]) -> str:
    words = [a for a in argv if not a.startswith("-")]
    # Skip the value of --root/-R when given as a separate word.
    for i, a in enumerate(argv):
        if a in ("--root", "-R") and i + 1 < len(argv) and argv[i + 1] in words:
            words.remove(argv[i + 1])
    if not words:
        return ""
    if words[0] in ("node", "profile") and len(words) > 1:
        return f"{words[0]} {words[1]}"
    if words[0] == "verify" and "--repair" in argv:
        return "verify --repair"
    return words[0]


def user() -> str:
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def record(conn: Connection, command: str, result: str, detail: str = "") -> None:
    conn.execute(insert(events).values(
        at=time.time(), user=user(), host=socket.gethostname(), command=command[:32],
        argv=shlex.join(["imgstore", *sys.argv[1:]]), profile=_ctx.get("profile"), node=_ctx.get("node"),
        generation=_ctx.get("generation"), result=result, detail=(detail or _ctx.get("detail", ""))[:2000],
    ))


def query(conn: Connection, profile: str | None = None, node: str | None = None, since: float | None = None,
          until: float | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    q = select(events).order_by(events.c.id.desc())
    if profile:
        q = q.where(events.c.profile == profile)
    if node:
        q = q.where(events.c.node == node)
    if since is not None:
        q = q.where(events.c.at >= since)
    if until is not None:
        q = q.where(events.c.at <= until)
    if limit:
        q = q.limit(limit)
    rows = [dict(r._mapping) for r in conn.execute(q)]
    rows.reverse()
    return rows
