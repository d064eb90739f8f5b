"""status: what each profile and node boots, and drift between the database and the files on disk.

Drift is anything a TFTP server or NFS client would see that the database does not say: a hand-edited
or deleted per-MAC file, a root link pointing elsewhere, a kernel changed in place, an imgstore config
left for a node that no longer exists. Each item names the command that repairs it: imgstore sync.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from . import deploy, generations, nodes, pxelinux
from .materialize import tree_path
from .profiles import Profile
from .store import Store

FIX = "imgstore sync"


@dataclass
class Drift:
    kind: str  # missing | modified | wrong-target | not-a-link | stale | bad-permissions
    path: str
    detail: str
    fix: str = FIX

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Status:
    profiles: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    drift: list[Drift] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"profiles": self.profiles, "nodes": self.nodes, "drift": [d.as_dict() for d in self.drift]}


def _hash(path: Path) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def status(store: Store, profiles: list[Profile]) -> Status:
    st = Status()
    with store.engine.connect() as conn:
        want = deploy.desired(store, conn, profiles)
        for p in profiles:
            act = deploy.active(conn, p.name)
            st.profiles.append({"profile": p.name, "active": act.ref if act else None,
                                "active_id": act.gen_id if act else None, "root_link": os.fspath(p.root_link)})
            for n in nodes.list_(conn, p.name):
                eff = deploy.effective(conn, n, act)
                pinned = generations.by_pk(conn, n.pinned).ref if n.pinned is not None else None
                st.nodes.append({**n.as_dict(), "pinned": pinned, "effective": eff.ref if eff else None})
    st.drift = drift(store, profiles, want)
    return st


def drift(store: Store, profiles: list[Profile], want: deploy.Desired) -> list[Drift]:
    out: list[Drift] = []
    for path, content in sorted(want.files.items()):
        try:
            actual = path.read_bytes()
        except FileNotFoundError:
            out.append(Drift("missing", os.fspath(path), "the node would boot pxelinux.cfg/default or nothing"))
            continue
        if actual != content:
            out.append(Drift("modified", os.fspath(path), "differs from what the database says (hand-edited?)"))
        elif os.stat(path).st_mode & 0o777 != 0o644:
            out.append(Drift("bad-permissions", os.fspath(path), f"mode {os.stat(path).st_mode & 0o777:o}, want 644"))
    for link, target in sorted(want.links.items()):
        try:
            actual_t = os.readlink(link)
        except FileNotFoundError:
            out.append(Drift("missing", os.fspath(link), f"should point at {target}"))
            continue
        except OSError:
            is_dir = link.is_dir()
            out.append(Drift("not-a-link", os.fspath(link), "is a directory, not a symlink" if is_dir
                             else "is a plain file (hand-written?), not imgstore's link",
                             f"imgstore adopt {link}" if is_dir else FIX))
            continue
        if actual_t != target:
            out.append(Drift("wrong-target", os.fspath(link), f"points at {actual_t}, should point at {target}"))
    for profile, gen in want.gens.values():
        if not tree_path(store, gen).is_dir():
            out.append(Drift("missing", os.fspath(tree_path(store, gen)), f"materialized tree of {gen.ref}"))
        for name, e in deploy.boot_entries(gen):
            f = profile.tftp_root / pxelinux.gen_dir(profile, gen) / name
            if not f.is_file():
                out.append(Drift("missing", os.fspath(f), f"{name} of {gen.ref}"))
            elif _hash(f) != e.digest:
                out.append(Drift("modified", os.fspath(f), f"{name} of {gen.ref} does not match its hash"))
    out.extend(stale_configs(profiles, want))
    return out


def stale_configs(profiles: list[Profile], want: deploy.Desired) -> list[Drift]:
    """imgstore-written configs the database no longer wants (a removed node, say)."""
    out = []
    for root in sorted({p.tftp_root for p in profiles}):
        cfg = root / pxelinux.CFG_DIR
        if not cfg.is_dir():
            continue
        for f in sorted(cfg.iterdir()):
            if f in want.files or f in want.links or f.name.startswith("."):
                continue
            if f.is_symlink():
                ours = os.readlink(f).startswith("imgstore/")
            elif f.is_file():
                with open(f, "rb") as fh:
                    ours = fh.read(len(pxelinux.MARK)) == pxelinux.MARK.encode()
            else:
                ours = False
            if ours:
                out.append(Drift("stale", os.fspath(f), "written by imgstore for a node or profile that is gone"))
    return out
