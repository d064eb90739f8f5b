"""Nodes: machines known by name and MAC, following their profile's active generation or pinned."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .db import Connection, Row, where
from .errors import Conflict, NotFound, UsageError
from .mac import MacAddress, validate_ip, validate_node_name


@dataclass(frozen=True)
class Node:
    name: str
    mac: MacAddress
    ip: str | None
    profile: str
    pinned: int | None  # generation row id

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mac": str(self.mac), "ip": self.ip, "profile": self.profile,
                "pxelinux_file": self.mac.pxelinux_name}


def _row(m: Row) -> Node:
    return Node(m["name"], MacAddress(m["mac"]), m["ip"], m["profile"], m["pinned"])


def list_(conn: Connection, profile: str | None = None) -> list[Node]:
    sql = "SELECT * FROM nodes" + where(None if profile is None else "profile = :profile")
    return [_row(r) for r in conn.execute(sql + " ORDER BY profile, name", {"profile": profile})]


def get(conn: Connection, name_or_mac: str) -> Node:
    """A node by name, or by MAC in any accepted spelling."""
    r = conn.execute("SELECT * FROM nodes WHERE name = :name", {"name": name_or_mac}).first()
    if r is None:
        try:
            mac = MacAddress.parse(name_or_mac)
        except UsageError:
            mac = None
        if mac is not None:
            r = conn.execute("SELECT * FROM nodes WHERE mac = :mac", {"mac": str(mac)}).first()
    if r is None:
        import difflib

        known = [n.name for n in list_(conn)]
        close = difflib.get_close_matches(name_or_mac, known, 3, 0.5)
        raise NotFound(
            f"no node {name_or_mac!r}" + (f"; closest: {', '.join(close)}" if close else ""),
            "run: imgstore node list (or imgstore node add NAME --mac MAC --profile PROFILE)",
        )
    return _row(r)


def add(conn: Connection, name: str, mac: str, ip: str | None, profile: str) -> Node:
    validate_node_name(name)
    m = MacAddress.parse(mac)
    ip = validate_ip(ip) if ip else None
    if conn.execute("SELECT name FROM nodes WHERE name = :name", {"name": name}).first():
        raise Conflict(f"node {name!r} already exists", f"pick another name, or: imgstore node edit {name}")
    other = _mac_owner(conn, m, name)
    if other:
        raise Conflict(f"MAC {m} already belongs to node {other!r}", f"remove it first: imgstore node rm {other}")
    conn.execute("INSERT INTO nodes (name, mac, ip, profile, pinned, created) "
                 "VALUES (:name, :mac, :ip, :profile, NULL, :created)",
                 {"name": name, "mac": str(m), "ip": ip, "profile": profile, "created": time.time()})
    return get(conn, name)


def edit(conn: Connection, node: Node, mac: str | None = None, ip: str | None = None,
         profile: str | None = None) -> Node:
    values: dict[str, Any] = {}
    if mac is not None:
        m = MacAddress.parse(mac)
        other = _mac_owner(conn, m, node.name)
        if other:
            raise Conflict(f"MAC {m} already belongs to node {other!r}", f"imgstore node rm {other} first")
        values["mac"] = str(m)
    if ip is not None:
        values["ip"] = validate_ip(ip) if ip else None
    if profile is not None and profile != node.profile:
        values["profile"] = profile
        values["pinned"] = None  # a pin to another profile's generation makes no sense
    if values:  # column names from the code above, never from input
        conn.execute(f"UPDATE nodes SET {', '.join(f'{k} = :{k}' for k in values)} WHERE name = :name",
                     {**values, "name": node.name})
    return get(conn, node.name)


def _mac_owner(conn: Connection, mac: MacAddress, other_than: str) -> str | None:
    r = conn.execute("SELECT name FROM nodes WHERE mac = :mac AND name <> :name",
                     {"mac": str(mac), "name": other_than}).first()
    return None if r is None else str(r[0])


def set_pin(conn: Connection, node: Node, gen_pk: int | None) -> None:
    conn.execute("UPDATE nodes SET pinned = :pinned WHERE name = :name", {"pinned": gen_pk, "name": node.name})


def remove(conn: Connection, node: Node) -> None:
    conn.execute("DELETE FROM nodes WHERE name = :name", {"name": node.name})
