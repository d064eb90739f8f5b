"""gc: remove what no generation worth keeping needs, in the reverse of the write order.

Roots: each profile's active generation and the one `rollback` would return to, every node's pinned
and effective generation, and the last N generations of each profile. Everything else older than the
cut-off is removed: first what others can see (materialized trees, TFTP folders), then the database
row is marked deleted (it stays, so history reads and numbers are never reused), then the objects no
remaining generation needs, then the shared copies no tree links to any more.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import deploy, faults, generations, manifest, nodes, pxelinux
from .durable import TMP_PREFIX
from .errors import IntegrityError, NoSpace
from .generations import Generation
from .locking import store_lock
from .manifest import FILE
from .materialize import _rmtree, discard_stale, keys_path, sweep_mat, tree_path
from .objects import read_pack_index
from .store import RESERVE, RESERVE_SIZE, Store, make_reserve


@dataclass
class GcResult:
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    objects: int = 0
    packs_rewritten: int = 0
    bytes_freed: int = 0
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _freed(trees: list[Path]) -> int:
    """Bytes that removing these trees frees: files whose every link is inside them (trees share files)."""
    total = 0
    shared: dict[tuple[int, int], list[int]] = {}  # (dev, ino) -> [links still to see, bytes]
    for tree in trees:
        for dirpath, _dirs, files in os.walk(tree):
            for f in files:
                try:
                    st = os.lstat(os.path.join(dirpath, f))
                except FileNotFoundError:
                    continue
                if st.st_nlink == 1:
                    total += st.st_blocks * 512
                    continue
                left = shared.setdefault((st.st_dev, st.st_ino), [st.st_nlink, st.st_blocks * 512])
                left[0] -= 1
                if left[0] == 0:
                    total += left[1]
    return total


def roots(store: Store, keep: int) -> set[int]:
    keep_pks: set[int] = set()
    with store.engine.connect() as conn:
        for p in {g.profile for g in generations.list_(conn)}:
            act = deploy.active(conn, p)
            if act is not None:
                keep_pks.add(act.pk)
            prev = deploy.previous_active(conn, p)
            if prev is not None:
                keep_pks.add(prev.pk)
            keep_pks.update(g.pk for g in generations.list_(conn, p)[-keep:] if keep > 0)
            for n in nodes.list_(conn, p):
                eff = deploy.effective(conn, n, act)
                if eff is not None:
                    keep_pks.add(eff.pk)
    return keep_pks


def needed_objects(store: Store, gens: list[Generation]) -> set[str]:
    need: set[str] = set()
    for g in gens:
        need.update(d for d in (g.gen_id, g.manifest, g.kernel, g.initrd) if d)
        for e in manifest.decode(store.objects.read(g.manifest), f"manifest of {g.ref}"):
            if e.type == FILE:
                need.add(e.digest)
    return need


def _nearly_full(root: Path) -> bool:
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize < 2 * RESERVE_SIZE


def _release_reserve(root: Path) -> None:
    try:
        os.unlink(root / RESERVE)
    except FileNotFoundError:
        pass


def missing_objects(store: Store) -> list[str]:
    """Generations that reference a missing object (a quick presence check, not a re-hash)."""
    bad = []
    with store.engine.connect() as conn:
        gens = generations.list_(conn)
    for g in gens:
        try:
            needed = needed_objects(store, [g])
        except IntegrityError:
            bad.append(g.ref)
            continue
        if any(not store.objects.has(d) for d in needed):
            bad.append(g.ref)
    return bad


def gc(store: Store, keep: int = 3, older_than: float | None = None, dry_run: bool = False,
       force: bool = False, wait: bool = True) -> GcResult:
    res = GcResult(dry_run=dry_run)
    with store_lock(store.root, "gc", wait):
        if not dry_run and _nearly_full(store.root):
            # Even opening the database needs room (SQLite's -wal and -shm files): give the reserve back
            # first. It is made again at the end, from space gc freed.
            _release_reserve(store.root)
        if not force:
            bad = missing_objects(store)
            if bad:
                raise IntegrityError(
                    f"generations {', '.join(bad[:5])} reference missing objects; gc would make it worse",
                    "run imgstore verify and repair first, or gc --force to proceed anyway",
                )
        keep_pks = roots(store, keep)
        cutoff = time.time() - older_than if older_than is not None else None
        with store.engine.connect() as conn:
            all_gens = generations.list_(conn)
        doomed = [g for g in all_gens if g.pk not in keep_pks and (cutoff is None or g.created < cutoff)]
        kept = [g for g in all_gens if g not in doomed]
        res.removed = [g.ref for g in doomed]
        res.kept = [g.ref for g in kept]
        if dry_run:
            return res
        _release_reserve(store.root)  # room for gc's own writes, even on a full disk
        discard_stale(store)
        profiles = {p.name: p for p in store.profiles()}
        # 1. What others can see.
        res.bytes_freed += _freed([t for g in doomed if (t := tree_path(store, g)).is_dir()])
        for g in doomed:
            t = tree_path(store, g)
            if t.is_dir():
                # Out of sight first (one rename), then deleted: killed half-way, gc leaves a temp tree the
                # next command discards, never a partial tree under a generation's name.
                doomed_tree = t.with_name(f"{TMP_PREFIX}gc-{t.name}")
                os.rename(t, doomed_tree)
                keys_path(t).unlink(missing_ok=True)  # no tree links from it any more
                _rmtree(doomed_tree)
            p = profiles.get(g.profile)
            if p is not None:
                d = p.tftp_root / pxelinux.gen_dir(p, g)
                if d.is_dir():
                    shutil.rmtree(d)
                cfg = p.tftp_root / pxelinux.gen_config(p, g)
                if cfg.exists():
                    cfg.unlink()
        faults.point("gc.after-trees")
        # 2. The database rows.
        if doomed:
            with store.engine.begin() as conn:
                now = time.time()
                for g in doomed:
                    conn.execute("UPDATE generations SET deleted = :now WHERE id = :pk", {"now": now, "pk": g.pk})
        faults.point("gc.after-rows")
        # 3. Objects nothing kept needs.
        need = needed_objects(store, kept)
        _sweep_objects(store, need, res)
        faults.point("gc.before-mat-sweep")
        # 4. Shared copies no tree or TFTP file links to any more.
        res.bytes_freed += sweep_mat(store)[1]
        make_reserve(store.root)
    return res


def _sweep_objects(store: Store, need: set[str], res: GcResult) -> None:
    objects = store.objects
    for digest in list(objects.loose_digests()):
        if digest not in need:
            p = objects.loose_path(digest)
            res.bytes_freed += p.stat().st_blocks * 512
            p.unlink()
            res.objects += 1
    for name in objects.pack_names():
        path = objects.pack_path(name)
        try:
            slots = read_pack_index(path, name)
        except IntegrityError:
            continue  # verify reports it; gc never deletes what it cannot read
        live = [(d, s) for d, s in slots if d.hex() in need]  # in pack order: neighbours stay neighbours
        if len(live) == len(slots):
            continue
        size = path.stat().st_blocks * 512
        if live:
            # Copy the live objects into the open pack; the old pack goes only once they are durable.
            try:
                for d, _slot in live:
                    objects.add_small(d.hex(), objects.read(d.hex()), force=True)
                objects.flush()
            except NoSpace:
                objects.abort()  # no room to rewrite it now: keep the whole pack, nothing is lost
                continue
            res.packs_rewritten += 1
        faults.point("gc.before-pack-delete")
        path.unlink()
        res.objects += len(slots) - len(live)
        res.bytes_freed += size
    objects._index = None  # rebuilt from the packs that remain
