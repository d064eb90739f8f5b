"""Nodes: machines known by name and MAC, following their profile's active generation or pinned."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from .errors import Conflict, NotFound, UsageError
from .mac import MacAddress, validate_ip, validate_node_name
from .schema import nodes


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


def _row(r: Any) -> Node:
    m = r._mapping
    return Node(m["name"], MacAddress(m["mac"]), m["ip"], m["profile"], m["pinned"])


def list_(conn: Connection, profile: str | None = None) -> list[Node]:
    q = select(nodes).order_by(nodes.c.profile, nodes.c.name)
    if profile is not None:
        q = q.where(nodes.c.profile == profile)
    return [_row(r) for r in conn.execute(q)]


def get(conn: Connection, name_or_mac: str) -> Node:
    """A node by name, or by MAC in any accepted spelling."""
    r = conn.execute(select(nodes).where(nodes.c.name == name_or_mac)).first()
    if r is None:
        try:
            mac = MacAddress.parse(name_or_mac)
        except UsageError:
            mac = None
        if mac is not None:
            r = conn.execute(select(nodes).where(nodes.c.mac == str(mac))).first()
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
    if conn.execute(select(nodes.c.name).where(nodes.c.name == name)).first():
        raise Conflict(f"node {name!r} already exists", f"pick another name, or: imgstore node edit {name}")
    other = conn.execute(select(nodes.c.name).where(nodes.c.mac == str(m))).first()
    if other:
        raise Conflict(f"MAC {m} already belongs to node {other[0]!r}", f"remove it first: imgstore node rm {other[0]}")
    conn.execute(insert(nodes).values(name=name, mac=str(m), ip=ip, profile=profile, pinned=None,
                                      created=time.time()))
    return get(conn, name)


def edit(conn: Connection, node: Node, mac: str | None = None, ip: str | None = None,
         profile: str | None = None) -> Node:
    values: dict[str, Any] = {}
    if mac is not None:
        m = MacAddress.parse(mac)
        other = conn.execute(select(nodes.c.name).where(nodes.c.mac == str(m), nodes.c.name != node.name)).first()
        if other:
            raise Conflict(f"MAC {m} already belongs to node {other[0]!r}", f"imgstore node rm {other[0]} first")
        values["mac"] = str(m)
    if ip is not None:
        values["ip"] = validate_ip(ip) if ip else None
    if profile is not None and profile != node.profile:
        values["profile"] = profile
        values["pinned"] = None  # a pin to another profile's generation makes no sense
    if values:
        conn.execute(update(nodes).where(nodes.c.name == node.name).values(**values))
    return get(conn, node.name)


def set_pin(conn: Connection, node: Node, gen_pk: int | None) -> None:
    conn.execute(update(nodes).where(nodes.c.name == node.name).values(pinned=gen_pk))


def remove(conn: Connection, node: Node) -> None:
    conn.execute(delete(nodes).where(nodes.c.name == node.name))
