"""Generations: numbered per profile (web@42), identified by the hash of their generation object.

A generation object is the canonical text below, stored as an object; its BLAKE3 is the generation id,
so the same manifest, kernel, initrd and boot parameters always give the same id.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

from .db import Connection, Row, where
from .errors import NotFound, UsageError
from .manifest import escape

GEN_HEADER = "imgstore-generation 1\n"


class Generation(NamedTuple):
    """A generation's database row."""

    pk: int
    profile: str
    number: int
    gen_id: str
    manifest: str
    kernel: str | None
    kernel_name: str | None
    initrd: str | None
    initrd_name: str | None
    append: str
    created: float
    message: str
    user: str
    host: str
    source: str
    files: int
    size: int
    new_bytes: int
    meta: dict[str, Any]
    deleted: float | None = None

    @property
    def ref(self) -> str:
        return f"{self.profile}@{self.number}"

    @property
    def short(self) -> str:
        return self.gen_id[:12]

    def as_dict(self) -> dict[str, Any]:
        d = self._asdict()
        d.pop("pk")
        d["ref"] = self.ref
        return d


def canonical(manifest: str, kernel: str | None, kernel_name: str | None, initrd: str | None,
              initrd_name: str | None, append: str) -> bytes:
    def v(x: str | None) -> str:
        return "-" if x is None else escape(x.encode("utf-8", "surrogateescape")).decode()

    return (
        f"{GEN_HEADER}manifest {manifest}\nkernel {v(kernel)}\nkernel-name {v(kernel_name)}\n"
        f"initrd {v(initrd)}\ninitrd-name {v(initrd_name)}\nappend {v(append)}\n"
    ).encode()


def _row(m: Row) -> Generation:
    return Generation(
        pk=m["id"], profile=m["profile"], number=m["number"], gen_id=m["gen_id"], manifest=m["manifest"],
        kernel=m["kernel"], kernel_name=m["kernel_name"], initrd=m["initrd"], initrd_name=m["initrd_name"],
        append=m["append"], created=m["created"], message=m["message"], user=m["user"], host=m["host"],
        source=m["source"], files=m["files"], size=m["size"], new_bytes=m["new_bytes"],
        meta=json.loads(m["meta"] or "{}"), deleted=m["deleted"],
    )


def list_(conn: Connection, profile: str | None = None, deleted: bool = False) -> list[Generation]:
    sql = "SELECT * FROM generations" + where(
        None if deleted else "deleted IS NULL", None if profile is None else "profile = :profile")
    return [_row(r) for r in conn.execute(sql + " ORDER BY profile, number", {"profile": profile})]


def by_pk(conn: Connection, pk: int) -> Generation:
    r = conn.execute("SELECT * FROM generations WHERE id = :pk", {"pk": pk}).first()
    if r is None:
        raise NotFound(f"generation row {pk} does not exist", "run: imgstore generations")
    return _row(r)


def latest(conn: Connection, profile: str) -> Generation | None:
    r = conn.execute("SELECT * FROM generations WHERE profile = :profile AND deleted IS NULL "
                     "ORDER BY number DESC LIMIT 1", {"profile": profile}).first()
    return _row(r) if r else None


def add(conn: Connection, **values: Any) -> Generation:
    """A new row numbered after the profile's last (gc'd ones included: numbers are never reused); every
    column but id, number and deleted must be given."""
    values["number"] = (conn.execute("SELECT max(number) FROM generations WHERE profile = :profile",
                                     {"profile": values["profile"]}).scalar() or 0) + 1
    values["meta"] = json.dumps(values.get("meta") or {}, sort_keys=True)
    r = conn.execute(
        'INSERT INTO generations (profile, number, gen_id, manifest, kernel, kernel_name, initrd, initrd_name, '
        'append, created, message, "user", host, source, files, size, new_bytes, meta) VALUES (:profile, '
        ':number, :gen_id, :manifest, :kernel, :kernel_name, :initrd, :initrd_name, :append, :created, '
        ':message, :user, :host, :source, :files, :size, :new_bytes, :meta) RETURNING *', values).first()
    assert r is not None
    return _row(r)


def profiles(conn: Connection) -> list[str]:
    """The profiles that have (or had) generations."""
    return sorted(r[0] for r in conn.execute("SELECT DISTINCT profile FROM generations"))


REF_RE = re.compile(r"^(?:(?P<profile>[a-z][a-z0-9_-]*)@)?(?P<sel>latest|-\d+|\d+)$")
ID_PREFIX_RE = re.compile(r"[0-9a-f]{4,64}")


def resolve(conn: Connection, ref: str, profile: str | None = None) -> Generation:
    """`42` (with a profile), `web@42`, `web@latest`, `web@-1`, or a unique prefix of a generation id. A prefix
    made of digits only (`3141`) is a number first and an id prefix if no generation has that number."""
    ref = ref.strip()
    m = REF_RE.match(ref)
    if m is None:
        if (g := _by_id(conn, ref, profile)) is not None:
            return g
        raise not_found(conn, ref, profile)
    prof = m.group("profile") or profile
    sel = m.group("sel")
    if prof is None and len(used := profiles(conn)) == 1:
        prof = used[0]
    if prof is not None and (g := _select(list_(conn, prof), sel)) is not None:
        return g
    if m.group("profile") is None and (g := _by_id(conn, ref, profile)) is not None:
        return g
    if prof is None:
        raise UsageError(f"generation {ref!r} needs a profile", f"write it as PROFILE@{sel} or pass --profile")
    raise not_found(conn, f"{prof}@{sel}", prof)


def _select(gens: list[Generation], sel: str) -> Generation | None:
    """`latest`, `-N` (N back from the latest) or a number, among a profile's generations (oldest first)."""
    if not gens:
        return None
    if sel == "latest":
        return gens[-1]
    if sel.startswith("-"):
        back = int(sel[1:])
        return gens[-1 - back] if back < len(gens) else None
    return next((g for g in gens if g.number == int(sel)), None)


def _by_id(conn: Connection, prefix: str, profile: str | None) -> Generation | None:
    """The generation whose id starts with `prefix`; None if none does or it is not 4-64 hex digits; an error
    if several do."""
    if not ID_PREFIX_RE.fullmatch(prefix):
        return None
    rows = [_row(r) for r in conn.execute(
        "SELECT * FROM generations WHERE gen_id LIKE :prefix AND deleted IS NULL ORDER BY id",
        {"prefix": prefix + "%"})]  # the prefix is hex: nothing in it LIKE treats specially
    if len({g.gen_id for g in rows}) == 1 and (len(rows) == 1 or profile):
        matching = [g for g in rows if profile is None or g.profile == profile]
        if matching:
            return matching[-1]
    if len(rows) > 1:
        raise UsageError(
            f"generation id prefix {prefix!r} is ambiguous: {', '.join(g.ref for g in rows[:5])}",
            "give more characters of the id, or PROFILE@NUMBER",
        )
    return None


def not_found(conn: Connection, ref: str, profile: str | None) -> NotFound:
    for g in list_(conn, profile, deleted=True):
        if g.deleted is not None and ref in (g.ref, g.gen_id) or (len(ref) >= 6 and g.gen_id.startswith(ref)):
            import time

            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(g.deleted or 0))
            return NotFound(f"generation {g.ref} was removed by gc on {when}", "run: imgstore generations")
    gens = list_(conn, profile) or list_(conn)
    candidates = [g.ref for g in gens] + [g.gen_id[:12] for g in gens]
    import difflib  # only to suggest a name: not imported by every command

    close = difflib.get_close_matches(ref, candidates, 3, 0.4)
    if not close and gens:
        close = [g.ref for g in gens[-3:]]
    hint = "run: imgstore generations"
    return NotFound(
        f"no generation {ref!r}" + (f"; closest: {', '.join(close)}" if close else "; the store has none yet"), hint
    )


def users_of(conn: Connection) -> list[Generation]:
    return list_(conn)
