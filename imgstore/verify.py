"""verify: re-hash every object, pack and manifest; report what is missing or damaged, and who needs it.

--repair moves damaged loose objects to quarantine/ and rewrites damaged packs without their bad
objects, so that the next commit of a tree holding that content stores it again (the stat cache is
cleared for that reason).
"""

from __future__ import annotations

import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3

from . import faults, generations, manifest
from .durable import TMP_PREFIX, remove_tree
from .errors import IntegrityError
from .generations import Generation
from .manifest import FILE
from .objects import ObjectStore, read_pack_index
from .store import Store

if TYPE_CHECKING:
    from .repair import TreeProblem


@dataclass
class Problem:
    kind: str  # missing | damaged | tree | temp
    what: str  # object digest or path
    detail: str
    generations: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class VerifyReport:
    objects: int = 0
    packs: int = 0
    generations: int = 0
    trees: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not any(p.kind in ("missing", "damaged", "tree") for p in self.problems)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "problems"}
        d["ok"] = self.ok
        d["problems"] = [p.as_dict() for p in self.problems]
        return d


def _check_object(objects: ObjectStore, digest: str) -> str | None:
    try:
        n = 0
        for chunk in objects.read_chunks(digest):
            n += len(chunk)
        return None
    except IntegrityError as exc:
        return exc.message
    except FileNotFoundError:  # its pack went away since the index was read: _confirm looks again
        return f"object {digest[:16]} is missing"


def _check_pack(objects: ObjectStore, name: str) -> tuple[str | None, list[tuple[str, str]], int] | None:
    """Return (pack-level problem, [(digest, problem)], object count), or None if the pack is gone."""
    path = objects.pack_path(name)
    h = blake3.blake3()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        slots = read_pack_index(path, name)
    except FileNotFoundError:
        return None  # removed since the listing: gc rewrote it, after copying what it kept into a new pack
    except IntegrityError as exc:
        return exc.message, [], 0
    bad: list[tuple[str, str]] = []
    if h.hexdigest() != name:
        for digest, _slot in slots:
            why = _check_object(objects, digest.hex())
            if why:
                bad.append((digest.hex(), why))
        return f"pack {name[:16]} does not match its hash", bad, len(slots)
    return None, [], len(slots)


def _live(store: Store) -> list[Generation]:
    with store.engine.connect() as conn:
        return generations.list_(conn)


def _direct(g: Generation) -> set[str]:
    return {g.gen_id, g.manifest} | {d for d in (g.kernel, g.initrd) if d}


def _files(objects: ObjectStore, g: Generation) -> set[str]:
    return {e.digest for e in manifest.decode(objects.read(g.manifest), f"manifest of {g.ref}") if e.type == FILE}


def verify(store: Store, repair: bool = False, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check everything; see _confirm for how a check that takes no lock copes with gc running meanwhile."""
    t0 = time.monotonic()
    rep = VerifyReport()
    gens = _live(store)
    rep.generations = len(gens)
    faults.pause_point("verify.after-listing")
    # A reader of its own (store.objects is for --repair's writes), with an index gc cannot break up, made
    # after the listing: every object the listed generations need was stored before it.
    objects = _fresh_objects(store.root)
    try:
        bad_packs = _check(store, objects, gens, rep, progress)
    finally:
        objects.close()
    if repair:
        _repair(store, rep, bad_packs)
        _repair_trees_and_tftp(store, rep, _live(store))
    rep.seconds = time.monotonic() - t0
    return rep


def _check(store: Store, objects: ObjectStore, gens: list[Generation], rep: VerifyReport,
           progress: Callable[[int], None] | None) -> list[str]:
    """Fill rep with what is missing or damaged; return the names of the damaged packs."""
    damaged: dict[str, str] = {}
    bad_packs: list[str] = []
    pack_problems: list[tuple[str, str]] = []
    packs = objects.pack_names()
    with ThreadPoolExecutor(max_workers=2) as pool:
        for name, checked in zip(packs, pool.map(lambda n: _check_pack(objects, n), packs), strict=True):
            if checked is None:
                continue
            pack_problem, bad, count = checked
            rep.packs += 1
            rep.objects += count
            if pack_problem:
                bad_packs.append(name)
                if not bad:
                    pack_problems.append((name, pack_problem))
            for digest, problem in bad:
                damaged[digest] = problem
        loose = list(objects.loose_digests())
        for digest, why in zip(loose, pool.map(lambda d: _check_object(objects, d), loose), strict=True):
            rep.objects += 1
            if progress:
                progress(rep.objects)
            if why:
                damaged[digest] = why
    # A damaged pack gc removed since (it needed nothing in it) is no problem any more.
    rep.problems += [Problem("damaged", f"packs/{name}.pack", why) for name, why in pack_problems
                     if objects.pack_path(name).exists()]
    faults.pause_point("verify.after-objects")

    # Who needs what: generation object, manifest, every file, kernel, initrd.
    users: dict[str, list[Generation]] = defaultdict(list)
    unread: list[Generation] = []  # generations whose files are not known: their manifest could not be read
    for g in gens:
        needed = _direct(g)
        if g.manifest in damaged or not objects.has(g.manifest):
            unread.append(g)
        else:
            try:
                needed |= _files(objects, g)
            except IntegrityError as exc:
                damaged[g.manifest] = exc.message
                unread.append(g)
            except FileNotFoundError:  # its pack went away since the index was read
                unread.append(g)
        for d in needed:
            users[d].append(g)
    suspects = set(damaged) | {g.manifest for g in unread} | {d for d in users if not objects.has(d)}
    if suspects:
        rep.problems += _confirm(store, users, suspects, unread)
    _check_trees(store, objects, gens, rep)
    for sub in ("objects", "packs", ""):
        folder = store.root / sub
        for name in os.listdir(folder) if folder.is_dir() else []:
            if name.startswith(TMP_PREFIX):
                rep.problems.append(Problem("temp", f"{sub}/{name}".lstrip("/"), "left by an interrupted command"))
    return bad_packs


def _fresh_objects(root: Path) -> ObjectStore:
    """A new look at the object store (its index copes with gc rewriting packs meanwhile)."""
    return ObjectStore(root)


def _state(objects: ObjectStore, digest: str) -> tuple[str, str] | None:
    """None if the object is there and intact, else (missing | damaged, why). Raises FileNotFoundError if
    the pack holding it went away while it was read (gc moved it): the caller looks again."""
    if not objects.has(digest):
        return "missing", f"object {digest[:16]} is missing"
    try:
        for _chunk in objects.read_chunks(digest):
            pass
    except IntegrityError as exc:
        if not objects.has(digest):  # a loose object removed between the look-up and the read
            return "missing", f"object {digest[:16]} is missing"
        return "damaged", exc.message
    return None


def _confirm(store: Store, users: dict[str, list[Generation]], suspects: set[str],
             unread: list[Generation]) -> list[Problem]:
    """The suspects (objects found missing or damaged) that are still bad and still needed.

    verify takes no lock (read-only commands never wait), so gc may have run since the generations were
    listed. gc removes the rows of generations before their objects, and commit stores objects before the
    row that needs them. So a missing object is a real problem only if a generation that needs it is live
    both before (commit) and after (gc) a fresh look finds the object missing: the database is read, the
    object store looked at anew (a new pack listing: gc may have rewritten packs), the database read again.
    A damaged object is reported even if no live generation needs it, as before.
    """
    before = {g.pk for g in _live(store)}
    todo = [g for g in unread if g.pk in before]
    pending = set(suspects)
    found: dict[str, tuple[str, str]] = {}
    # A read that finds the object's pack gone looks again (gc moved the object to a newer pack). Still
    # moving after 20 looks: the object exists, so it is not reported.
    for _attempt in range(20):
        retry: set[str] = set()
        retry_gens: list[Generation] = []
        fresh = _fresh_objects(store.root)
        try:
            for g in todo:
                try:
                    files = _files(fresh, g)
                except IntegrityError:
                    continue  # the manifest itself is a suspect
                except FileNotFoundError:
                    retry_gens.append(g)
                    continue
                for d in files:
                    users[d].append(g)
                    if not fresh.has(d):
                        pending.add(d)
            for d in sorted(pending):
                try:
                    state = _state(fresh, d)
                except FileNotFoundError:
                    retry.add(d)
                    continue
                if state is not None:
                    found[d] = state
        finally:
            fresh.close()
        if not retry and not retry_gens:
            break
        pending, todo = retry, retry_gens
    after = {g.pk for g in _live(store)}
    problems: list[Problem] = []
    for d, (kind, why) in sorted(found.items()):
        refs = sorted({g.ref for g in users.get(d, []) if g.pk in before and g.pk in after})
        if kind == "damaged" or refs:
            problems.append(Problem(kind, d, why, refs))
    return problems


def _check_trees(store: Store, objects: ObjectStore, gens: list[Generation], rep: VerifyReport) -> None:
    """Materialized trees against their manifests (each shared copy is hashed once).

    gc makes a tree vanish at once (one rename) before it deletes it, and before the generation's row: a
    tree found wrong counts only if it is still in place after the check and its generation still live
    after that.
    """
    from .materialize import tree_path
    from .repair import check_tree, materialized

    hashes: dict[tuple[int, int], str] = {}
    trees = materialized(store, gens)
    faults.pause_point("verify.after-tree-listing")
    found: list[tuple[Generation, list[TreeProblem]]] = []
    for g in trees:
        try:
            try:
                data = objects.read(g.manifest)
            except FileNotFoundError:  # its pack went away since the index was read: gc moved it
                fresh = _fresh_objects(store.root)
                try:
                    data = fresh.read(g.manifest)
                finally:
                    fresh.close()
            es = manifest.decode(data, f"manifest of {g.ref}")
        except (IntegrityError, FileNotFoundError):
            continue  # the manifest is reported missing or damaged if a live generation needs it
        rep.trees += 1
        problems = check_tree(store, g, es, hashes)
        if problems:
            found.append((g, problems))
    found = [(g, ps) for g, ps in found if tree_path(store, g).is_dir()]
    live = {g.pk for g in _live(store)} if found else set()
    for g, ps in found:
        if g.pk not in live:
            continue
        for tp in ps:
            rep.problems.append(Problem("tree", f"{g.ref}:/{tp.path}", f"materialized tree of {g.ref}: /{tp.path}: "
                                        f"{tp.what} differs from the manifest", [g.ref]))


def _repair_trees_and_tftp(store: Store, rep: VerifyReport, gens: list[Generation]) -> None:
    from . import deploy
    from .repair import check_tree, materialized, recover_objects, repair_tree

    lost = {p.what for p in rep.problems if p.kind in ("damaged", "missing") and len(p.what) == 64}
    if lost:
        for digest, source in sorted(recover_objects(store, lost, gens).items()):
            rep.repaired.append(f"object {digest[:16]}: stored again from {source}")
    hashes: dict[tuple[int, int], str] = {}
    for g in materialized(store, gens):
        try:
            es = manifest.decode(store.objects.read(g.manifest), f"manifest of {g.ref}")
        except IntegrityError:
            continue
        if any(e.type == FILE and not store.objects.has(e.digest) for e in es):
            continue  # cannot mend from objects we do not have; verify keeps reporting it
        problems = check_tree(store, g, es, hashes)
        if problems:
            repair_tree(store, g, es, problems)
            hashes.clear()
            rep.repaired.extend(f"tree {p}: restored" for p in problems)
    profiles = store.profiles()
    with store.engine.connect() as conn:
        want = deploy.desired(store, conn, profiles)
    for profile, g in want.gens.values():
        deploy.prepare(store, profile, g, [], repair=True)
    rep.repaired.extend(f"rewrote {w}" for w in deploy.apply(store, want))


def _repair(store: Store, rep: VerifyReport, bad_packs: list[str]) -> None:
    objects = store.objects
    quarantine = store.root / "quarantine"
    bad = {p.what for p in rep.problems if p.kind == "damaged"}
    for name in bad_packs:
        # Copy the good objects into a new pack, then retire the damaged one.
        good: list[tuple[str, bytes]] = []
        try:
            slots = read_pack_index(objects.pack_path(name), name)
        except IntegrityError:
            slots = []
        for raw, _slot in slots:
            if raw.hex() in bad:
                continue
            try:
                data = objects.read(raw.hex())
            except IntegrityError:
                continue
            good.append((raw.hex(), data))
        quarantine.mkdir(exist_ok=True)
        objects.index.clear()
        for hexd, data in good:
            objects.add_small(hexd, data)
        objects.flush()  # the good objects are durable in a new pack before the old one goes
        os.rename(objects.pack_path(name), quarantine / f"{name}.pack")
        objects._index = None
        rep.repaired.append(f"pack {name[:16]}: kept {len(good)} good objects, moved the pack to quarantine/")
    for hexd in sorted(bad):
        loose = objects.loose_path(hexd) if len(hexd) == 64 else None
        if loose is not None and loose.exists():
            quarantine.mkdir(exist_ok=True)
            os.rename(loose, quarantine / hexd)
            rep.repaired.append(f"object {hexd[:16]}: moved to quarantine/")
    for prob in rep.problems:
        if prob.kind == "temp":
            path = store.root / prob.what
            try:
                if path.is_dir() and not path.is_symlink():
                    remove_tree(path)
                else:
                    os.unlink(path)
                rep.repaired.append(f"removed {prob.what}")
            except FileNotFoundError:
                pass
    shutil.rmtree(store.root / "cache", ignore_errors=True)
    (store.root / "cache").mkdir(exist_ok=True)
