"""Deploying generations: what each node boots, changed only by atomic renames.

The database says what should be booted (each profile's active generation, each node's pin). The
visible state (the profile's root link, pxelinux.cfg/default, one pxelinux.cfg/01-<mac> per node, and
the per-generation kernel/initrd folders) is derived from it by `desired()` and written by `apply()`.
A command changes the database first (after materializing what it will point at) and then applies; a
crash in between leaves drift that `imgstore status` reports and `imgstore sync` (or re-running the
command) repairs. Order: tree and TFTP files durable -> database row -> visible switch.
"""

from __future__ import annotations

import errno
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import faults, generations, nodes, pxelinux
from .db import Connection, where
from .durable import TMP_PREFIX, fsync_dir, no_space, syncfs, write_atomic
from .errors import ConfigError, NotFound, UsageError
from .generations import Generation
from .locking import store_lock
from .manifest import FILE, Entry
from .materialize import discard_stale, ensure_mat, materialize, tree_path
from .nodes import Node
from .profiles import Profile
from .store import Store


@dataclass
class Desired:
    links: dict[Path, str] = field(default_factory=dict)  # root link -> target
    files: dict[Path, bytes] = field(default_factory=dict)  # config path -> content
    gens: dict[int, tuple[Profile, Generation]] = field(default_factory=dict)  # what must be materialized


@dataclass
class Change:
    profile: str
    action: str
    from_ref: str | None = None
    to_ref: str | None = None
    nodes_moved: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    materialized: list[str] = field(default_factory=list)
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- state --------------------------------------------------------------------------------------
def active(conn: Connection, profile: str) -> Generation | None:
    r = conn.execute("SELECT active FROM profile_state WHERE profile = :profile", {"profile": profile}).first()
    return generations.by_pk(conn, r[0]) if r and r[0] is not None else None


def effective(conn: Connection, node: Node, act: Generation | None) -> Generation | None:
    return generations.by_pk(conn, node.pinned) if node.pinned is not None else act


def desired(store: Store, conn: Connection, profiles: list[Profile]) -> Desired:
    """What the visible state should be. Links are applied in the order they are added here: first each
    profile's own links (what following nodes resolve through), then the per-node names, so that a node
    whose name moves from a pin to following its profile never passes through an older generation."""
    d = Desired()
    per_node: list[tuple[Path, str]] = []

    configs: dict[tuple[str, int], bytes] = {}

    def boot(p: Profile, g: Generation, name: str, follows: bool) -> None:
        d.gens[g.pk] = (p, g)
        cfg = configs.get((p.name, g.pk))
        if cfg is None:
            cfg = configs[p.name, g.pk] = pxelinux.config(p, g, tree_path(store, g))
            d.files[p.tftp_root / pxelinux.gen_config(p, g)] = cfg
        # Per-node names are symlinks: to the profile's link when the node follows the profile (a rollout
        # renames that one link for all of them), else to the generation's config. Flipping a symlink frees
        # no data blocks, which on this kind of filesystem is 100x cheaper than replacing a file
        # (docs/format.md).
        if p.mac_files == "copy":
            d.files[p.tftp_root / name] = cfg
        elif follows:
            per_node.append((p.tftp_root / name, pxelinux.follow_target(p)))
        else:
            per_node.append((p.tftp_root / name, pxelinux.link_target(p, g)))

    for p in profiles:
        act = active(conn, p.name)
        if act is not None:
            d.gens[act.pk] = (p, act)
            if p.mac_files == "link":
                d.links[p.tftp_root / pxelinux.profile_link(p)] = pxelinux.profile_link_target(p, act)
            d.links[p.root_link] = os.fspath(tree_path(store, act))
            if p.serve_default:
                boot(p, act, pxelinux.default_file(), follows=True)
        for n in nodes.list_(conn, p.name):
            g = effective(conn, n, act)
            if g is not None:
                boot(p, g, pxelinux.mac_file(n.mac), follows=n.pinned is None)
    d.links.update(sorted(per_node))
    return d


def boot_entries(gen: Generation) -> list[tuple[str, Entry]]:
    out = []
    for name, digest in (("vmlinuz", gen.kernel), ("initrd.img", gen.initrd)):
        if digest:
            out.append((name, Entry(path=name.encode(), type=FILE, mode=0o644, uid=0, gid=0, mtime_ns=0,
                                    digest=digest)))
    return out


def _same_content(path: Path, digest: str) -> bool:
    import blake3

    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest() == digest


def prepare(store: Store, profile: Profile, gen: Generation, done: list[str], repair: bool = False) -> None:
    """Materialize the tree and place kernel/initrd in the TFTP root. Idempotent, durable on return."""
    if not gen.kernel:
        raise UsageError(f"{gen.ref} has no kernel (it was committed with --no-kernel)",
                         "commit the chroot again with a kernel in /boot or --kernel FILE")
    _, created = materialize(store, gen)
    if created:
        done.append(gen.ref)
    dirty: set[Path] = set()
    for name, e in boot_entries(gen):
        dest = profile.tftp_root / pxelinux.gen_dir(profile, gen) / name
        if not dest.exists() or (repair and not _same_content(dest, e.digest)):
            src = ensure_mat(store, e, dirty)
            if repair and not _same_content(src, e.digest):  # the shared copy itself was changed
                src.unlink()
                src = ensure_mat(store, e, dirty)
            pxelinux.place_file(src, dest)
    for d in dirty:
        fsync_dir(d)
    pxelinux.install_bootloader(profile)


def apply(store: Store, want: Desired) -> list[str]:
    """Write every config and link that differs from `want`. Returns the paths written."""
    changed: list[tuple[Path, bytes]] = []
    for path, content in sorted(want.files.items()):
        try:
            with open(path, "rb") as f:
                if f.read(len(content) + 1) == content:
                    continue
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass
        changed.append((path, content))
    written: list[str] = []
    temps: list[tuple[Path, Path]] = []
    dirs: set[Path] = set()
    try:
        for path, content in changed:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            temps.append((tmp, path))
            try:
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, 0o644)  # tftpd drops to nobody
            finally:
                os.close(fd)
            dirs.add(path.parent)
    except OSError as exc:
        for tmp, _ in temps:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space(changed[0][0].parent, exc, sum(len(c) for _, c in changed)) from exc
        raise
    if temps:
        for d in dirs:
            syncfs(d)
        faults.point("apply.before-rename")
        for tmp, path in temps:
            os.rename(tmp, path)
            written.append(os.fspath(path))
        for d in dirs:
            fsync_dir(d)
    faults.point("apply.before-link")
    link_temps: list[tuple[Path, Path]] = []
    for link, target in want.links.items():  # in order: see desired()
        try:
            if os.readlink(link) == target:
                continue
        except FileNotFoundError:
            pass
        except OSError as exc:
            if link.is_dir():
                raise ConfigError(f"{link} exists and is a directory, not a symlink ({exc.strerror})",
                                  f"move it away, or adopt it: imgstore adopt {link}") from None
            # A plain file where a link belongs (hand-written config): the rename below replaces it.
        link.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        tmp = link.with_name(f"{TMP_PREFIX}{link.name}")
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        try:
            os.symlink(target, tmp)
        except OSError as exc:
            for t, _ in link_temps:
                os.unlink(t)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise no_space(link.parent, exc) from exc
            raise
        link_temps.append((tmp, link))
    for i, (tmp, link) in enumerate(link_temps):
        os.rename(tmp, link)  # the name is never missing: the new link replaces the old one
        written.append(os.fspath(link))
        if i + 1 == len(link_temps) or link_temps[i + 1][1].parent != link.parent:
            fsync_dir(link.parent)  # durable before the next directory's links, which may resolve through it
    return written


# -- commands -----------------------------------------------------------------------------------
def record(conn: Connection, profile: str, kind: str, frm: Generation | None, to: Generation | None,
            node: str | None = None, moved: list[str] | None = None) -> None:
    from .audit import host, user

    conn.execute(
        'INSERT INTO activations (at, profile, kind, node, from_gen, to_gen, "user", host, nodes) '
        "VALUES (:at, :profile, :kind, :node, :from_gen, :to_gen, :user, :host, :nodes)",
        {"at": time.time(), "profile": profile, "kind": kind, "node": node, "from_gen": frm.pk if frm else None,
         "to_gen": to.pk if to else None, "user": user(), "host": host(),
         "nodes": json.dumps(moved or [])},
    )


def set_active(conn: Connection, profile: str, gen: Generation) -> None:
    conn.execute(
        "INSERT INTO profile_state (profile, active, updated) VALUES (:profile, :active, :updated) "
        "ON CONFLICT (profile) DO UPDATE SET active = excluded.active, updated = excluded.updated",
        {"profile": profile, "active": gen.pk, "updated": time.time()},
    )


def _following(conn: Connection, profile: str) -> list[Node]:
    return [n for n in nodes.list_(conn, profile) if n.pinned is None]


def finish(store: Store, profile: Profile, change: Change) -> Change:
    with store.engine.connect() as conn:
        want = desired(store, conn, [profile])
    faults.point("deploy.before-switch")
    change.written = apply(store, want)
    _end_pending(store)
    return change


# A command that dies between its database row and its visible switch must not be repeated by a re-run
# (a second `rollback` would go back one step further). Before the row, it leaves a note of what it is
# doing; the next deploy command under the lock completes that switch, and a re-run of the same
# command then stops there.
PENDING = "deploy-pending.json"


def _begin_pending(store: Store, kind: str, profile: str, node: str | None) -> None:
    with store.engine.connect() as conn:
        last = conn.execute("SELECT max(id) FROM activations").scalar() or 0
    write_atomic(store.root / PENDING, json.dumps(
        {"kind": kind, "profile": profile, "node": node, "after": last}).encode(), 0o600)


def _end_pending(store: Store) -> None:
    try:
        os.unlink(store.root / PENDING)
    except FileNotFoundError:
        return
    fsync_dir(store.root)


def resume(store: Store, kind: str | None = None, node: str | None = None,
           profile: str | None = None) -> Change | None:
    """Complete an interrupted deploy command; return its Change if it is the one (kind, profile, node)."""
    try:
        note = json.loads((store.root / PENDING).read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        _end_pending(store)  # a torn note cannot exist (written atomically); be safe anyway
        return None
    with store.engine.connect() as conn:
        row = conn.execute("SELECT * FROM activations WHERE id > :after AND profile = :profile "
                           "ORDER BY id DESC LIMIT 1", note).first()
    if row is None:  # it died before its row: nothing was decided, nothing to complete
        _end_pending(store)
        return None
    p = store.profile(note["profile"])
    with store.engine.connect() as conn:
        to = generations.by_pk(conn, row["to_gen"]).ref if row["to_gen"] else None
        frm = generations.by_pk(conn, row["from_gen"]).ref if row["from_gen"] else None
    change = finish(store, p, Change(p.name, f"{note['kind']} (completed after an interruption)", frm, to,
                                     json.loads(row["nodes"])))
    same = note["kind"] == kind and note["node"] == node and (profile is None or note["profile"] == profile)
    return change if same else None


def rollout(store: Store, profile_name: str, ref: str | None = None, dry_run: bool = False,
            wait: bool = True) -> Change:
    """Make GEN (default: latest) the profile's active generation; release canary pins equal to it."""
    profile = store.profile(profile_name)
    with store_lock(store.root, "rollout", wait):
        if not dry_run:
            resume(store)  # re-running a rollout is idempotent anyway: complete, then carry on
        with store.engine.connect() as conn:
            gen = _resolve(conn, profile, ref)
            cur = active(conn, profile.name)
            members = nodes.list_(conn, profile.name)
            moved = [n.name for n in members if n.pinned is None] if (cur is None or cur.pk != gen.pk) else []
            released = [n.name for n in members if n.pinned == gen.pk]
        change = Change(profile.name, "rollout", cur.ref if cur else None, gen.ref, moved + released,
                        dry_run=dry_run)
        if dry_run:
            change.materialized = [] if tree_path(store, gen).exists() else [gen.ref]
            return change
        discard_stale(store)
        prepare(store, profile, gen, change.materialized)
        faults.point("rollout.before-row")
        _begin_pending(store, "rollout", profile.name, None)
        with store.engine.begin() as conn:
            set_active(conn, profile.name, gen)
            for name in released:
                nodes.set_pin(conn, nodes.get(conn, name), None)
            record(conn, profile.name, "rollout", cur, gen, moved=change.nodes_moved)
        return finish(store, profile, change)


def canary(store: Store, node_ref: str, ref: str | None = None, dry_run: bool = False, wait: bool = True) -> Change:
    """Pin one node to GEN (default: its profile's latest); nothing else changes."""
    with store.engine.connect() as conn:
        node = nodes.get(conn, node_ref)
    return pin(store, node.name, ref, dry_run, wait, kind="canary")


def pin(store: Store, node_ref: str, ref: str | None, dry_run: bool = False, wait: bool = True,
        kind: str = "pin") -> Change:
    with store_lock(store.root, kind, wait):
        if not dry_run:
            resume(store)
        with store.engine.connect() as conn:
            node = nodes.get(conn, node_ref)
            profile = store.profile(node.profile)
            gen = _resolve(conn, profile, ref)
            before = effective(conn, node, active(conn, profile.name))
        change = Change(profile.name, kind, before.ref if before else None, gen.ref, [node.name], dry_run=dry_run)
        if dry_run:
            return change
        discard_stale(store)
        prepare(store, profile, gen, change.materialized)
        _begin_pending(store, kind, profile.name, node.name)
        with store.engine.begin() as conn:
            nodes.set_pin(conn, node, gen.pk)
            record(conn, profile.name, kind, before, gen, node=node.name, moved=[node.name])
        return finish(store, profile, change)


def unpin(store: Store, node_ref: str, dry_run: bool = False, wait: bool = True, kind: str = "unpin") -> Change:
    """Let a node follow its profile's active generation again (rollback --node, unpin)."""
    with store_lock(store.root, kind, wait):
        with store.engine.connect() as conn:
            node = nodes.get(conn, node_ref)
        if not dry_run:
            done = resume(store, kind, node.name)
            if done is not None:
                return done
        with store.engine.connect() as conn:
            node = nodes.get(conn, node_ref)
            profile = store.profile(node.profile)
            act = active(conn, profile.name)
            before = effective(conn, node, act)
        if node.pinned is None:
            raise UsageError(f"node {node.name} is not pinned; it follows {profile.name}",
                             f"to move the whole profile back: imgstore rollback --profile {profile.name}")
        change = Change(profile.name, kind, before.ref if before else None, act.ref if act else None, [node.name],
                        dry_run=dry_run)
        if dry_run:
            return change
        _begin_pending(store, kind, profile.name, node.name)
        with store.engine.begin() as conn:
            nodes.set_pin(conn, node, None)
            record(conn, profile.name, kind, before, act, node=node.name, moved=[node.name])
        change = finish(store, profile, change)
        if act is None:
            # Nothing to follow yet: the node's file would point at nothing, so it goes.
            f = profile.tftp_root / pxelinux.mac_file(node.mac)
            if f.exists():
                f.unlink()
                change.written.append(os.fspath(f))
        return change


def previous_active(conn: Connection, profile: str) -> Generation | None:
    """Walk the activation history as a stack: each rollout pushes what it replaced, each rollback pops."""
    stack: list[int | None] = []
    for m in conn.execute("SELECT * FROM activations WHERE profile = :profile AND node IS NULL ORDER BY id",
                          {"profile": profile}):
        if m["kind"] == "rollout" and m["from_gen"] != m["to_gen"]:
            stack.append(m["from_gen"])
        elif m["kind"] == "rollback" and stack:
            stack.pop()
    while stack:
        pk = stack.pop()
        if pk is not None:
            g = generations.by_pk(conn, pk)
            if g.deleted is None:  # gc removed it: keep walking back
                return g
    return None


def rollback(store: Store, profile_name: str, to: str | None = None, dry_run: bool = False,
             wait: bool = True) -> Change:
    """Return the profile to the generation active before (repeatable), or to GEN with --to."""
    profile = store.profile(profile_name)
    with store_lock(store.root, "rollback", wait):
        if not dry_run:
            done = resume(store, "rollback" if to is None else "rollback-to", None, profile.name)
            if done is not None:
                return done
        with store.engine.connect() as conn:
            cur = active(conn, profile.name)
            if to is not None:
                target = _resolve(conn, profile, to)
            else:
                prev = previous_active(conn, profile.name)
                if prev is None:
                    raise NotFound(
                        f"profile {profile.name} has no earlier active generation to roll back to",
                        f"see imgstore history --profile {profile.name}; pick one with --to GEN",
                    )
                target = prev
            moved = [n.name for n in _following(conn, profile.name)]
        change = Change(profile.name, "rollback", cur.ref if cur else None, target.ref, moved, dry_run=dry_run)
        if dry_run:
            return change
        discard_stale(store)
        prepare(store, profile, target, change.materialized)
        faults.point("rollback.before-row")
        _begin_pending(store, "rollback" if to is None else "rollback-to", profile.name, None)
        with store.engine.begin() as conn:
            set_active(conn, profile.name, target)
            # --to behaves like a rollout to an older generation: it can itself be rolled back.
            record(conn, profile.name, "rollout" if to else "rollback", cur, target, moved=moved)
        return finish(store, profile, change)


def sync(store: Store, profiles: list[Profile], dry_run: bool = False, wait: bool = True,
         locked: bool = False) -> list[str]:
    """Re-derive every visible file and link from the database and write what differs (drift repair).

    `locked`: the caller holds the store lock already (node commands: change the row, then sync)."""
    with nullcontext() if locked else store_lock(store.root, "sync", wait):
        with store.engine.connect() as conn:
            want = desired(store, conn, profiles)
        if dry_run:
            return sorted(os.fspath(p) for p in want.files) + sorted(os.fspath(p) for p in want.links)
        discard_stale(store)
        done: list[str] = []
        for profile, gen in want.gens.values():
            prepare(store, profile, gen, done, repair=True)
        written = apply(store, want)
        _end_pending(store)  # whatever was interrupted is complete now
        from .status import stale_configs

        for d in stale_configs(profiles, want):
            os.unlink(d.path)
            written.append(d.path)
        return written


def _resolve(conn: Connection, profile: Profile, ref: str | None) -> Generation:
    if ref is None:
        g = generations.latest(conn, profile.name)
        if g is None:
            raise NotFound(f"profile {profile.name} has no generations yet",
                           f"run: imgstore commit CHROOT --profile {profile.name}")
        return g
    g = generations.resolve(conn, ref, profile.name)
    if g.profile != profile.name:
        raise UsageError(f"{g.ref} belongs to profile {g.profile}, not {profile.name}",
                         f"give a generation of {profile.name}")
    return g


def history(conn: Connection, profile: str | None = None, node: str | None = None) -> list[dict[str, Any]]:
    sql = "SELECT * FROM activations" + where(
        "profile = :profile" if profile else None, "node = :node" if node else None) + " ORDER BY id"
    refs: dict[int, str] = {}

    def ref(pk: int | None) -> str | None:
        if pk is None:
            return None
        if pk not in refs:
            refs[pk] = generations.by_pk(conn, pk).ref
        return refs[pk]

    out = []
    for m in conn.execute(sql, {"profile": profile, "node": node}):
        out.append({"at": m["at"], "profile": m["profile"], "kind": m["kind"], "node": m["node"],
                    "from": ref(m["from_gen"]), "to": ref(m["to_gen"]), "user": m["user"], "host": m["host"],
                    "nodes": json.loads(m["nodes"])})
    return out
