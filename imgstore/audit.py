"""The audit log: every command that changes something, with time, user, host, command line and result.

Kept in the database (table `events`) so every boot server sharing a PostgreSQL database sees one
trail. The CLI records one event per command after it finishes (ok or error); commands add what they
touched (profile, node, generation) with note().
"""

from __future__ import annotations

import getpass
import os
import shlex
import sys
import time
from typing import Any

from .db import Connection, where

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
    """Who ran the command: the sudo caller if any."""
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def host() -> str:
    return os.uname().nodename  # what socket.gethostname() returns, without importing socket (3 ms)


def record(conn: Connection, command: str, result: str, detail: str = "") -> None:
    conn.execute(
        'INSERT INTO events (at, "user", host, command, argv, profile, node, generation, result, detail) '
        "VALUES (:at, :user, :host, :command, :argv, :profile, :node, :generation, :result, :detail)",
        {"at": time.time(), "user": user(), "host": host(), "command": command[:32],
         "argv": shlex.join(["imgstore", *sys.argv[1:]]), "profile": _ctx.get("profile"), "node": _ctx.get("node"),
         "generation": _ctx.get("generation"), "result": result, "detail": (detail or _ctx.get("detail", ""))[:2000]},
    )


def query(conn: Connection, profile: str | None = None, node: str | None = None, since: float | None = None,
          until: float | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    sql = "SELECT * FROM events" + where(
        "profile = :profile" if profile else None, "node = :node" if node else None,
        None if since is None else "at >= :since", None if until is None else "at <= :until",
    ) + " ORDER BY id DESC" + (" LIMIT :limit" if limit else "")
    params = {"profile": profile, "node": node, "since": since, "until": until, "limit": limit}
    rows = [dict(r) for r in conn.execute(sql, params)]
    rows.reverse()
    return rows
