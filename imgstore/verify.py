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
from typing import Any

import blake3

from . import generations, manifest
from .durable import TMP_PREFIX, remove_tree
from .errors import IntegrityError
from .generations import Generation
from .manifest import FILE
from .objects import ObjectStore, compressor, read_pack_index
from .store import Store


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


def _check_pack(objects: ObjectStore, name: str) -> tuple[str | None, list[tuple[str, str]], int]:
    """Return (pack-level problem, [(digest, problem)], object count)."""
    path = objects.pack_path(name)
    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    try:
        slots = list(read_pack_index(path, name))
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


def verify(store: Store, repair: bool = False, progress: Callable[[int], None] | None = None) -> VerifyReport:
    t0 = time.monotonic()
    rep = VerifyReport()
    objects = store.objects
    with store.engine.connect() as conn:
        gens = generations.list_(conn)
    rep.generations = len(gens)

    damaged: dict[str, str] = {}
    bad_packs: list[str] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for name, (pack_problem, bad, count) in zip(
            objects.pack_names(), pool.map(lambda n: _check_pack(objects, n), objects.pack_names()), strict=True
        ):
            rep.packs += 1
            rep.objects += count
            if pack_problem:
                bad_packs.append(name)
                if not bad:
                    rep.problems.append(Problem("damaged", f"packs/{name}.pack", pack_problem))
            for digest, problem in bad:
                damaged[digest] = problem
        loose = list(objects.loose_digests())
        for digest, why in zip(loose, pool.map(lambda d: _check_object(objects, d), loose), strict=True):
            rep.objects += 1
            if progress:
                progress(rep.objects)
            if why:
                damaged[digest] = why

    # Who needs what: generation object, manifest, every file, kernel, initrd.
    users: dict[str, list[Generation]] = defaultdict(list)
    for g in gens:
        needed = {g.gen_id, g.manifest} | {d for d in (g.kernel, g.initrd) if d}
        if g.manifest not in damaged and objects.has(g.manifest):
            try:
                for e in manifest.decode(objects.read(g.manifest), f"manifest of {g.ref}"):
                    if e.type == FILE:
                        needed.add(e.digest)
            except IntegrityError as exc:
                damaged[g.manifest] = exc.message
        for d in needed:
            users[d].append(g)
    for digest, gs in sorted(users.items()):
        refs = sorted({g.ref for g in gs})
        if digest in damaged:
            rep.problems.append(Problem("damaged", digest, damaged.pop(digest) or "", refs))
        elif not objects.has(digest):
            rep.problems.append(Problem("missing", digest, f"object {digest[:16]} is missing", refs))
    for digest, why in sorted(damaged.items()):  # damaged but needed by no generation
        rep.problems.append(Problem("damaged", digest, why, []))
    _check_trees(store, gens, rep)
    for sub in ("objects", "packs", ""):
        folder = store.root / sub
        for name in os.listdir(folder) if folder.is_dir() else []:
            if name.startswith(TMP_PREFIX):
                rep.problems.append(Problem("temp", f"{sub}/{name}".lstrip("/"), "left by an interrupted command"))

    if repair:
        _repair(store, rep, bad_packs)
        _repair_trees_and_tftp(store, rep, gens)
    rep.seconds = time.monotonic() - t0
    return rep


def _check_trees(store: Store, gens: list[Generation], rep: VerifyReport) -> None:
    """Materialized trees against their manifests (each shared copy is hashed once)."""
    from .repair import check_tree, materialized

    hashes: dict[tuple[int, int], str] = {}
    for g in materialized(store, gens):
        try:
            es = manifest.decode(store.objects.read(g.manifest), f"manifest of {g.ref}")
        except IntegrityError:
            continue
        rep.trees += 1
        for tp in check_tree(store, g, es, hashes):
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
        good: list[tuple[str, int, bytes]] = []
        try:
            slots = list(read_pack_index(objects.pack_path(name), name))
        except IntegrityError:
            slots = []
        for raw, slot in slots:
            if raw.hex() in bad:
                continue
            try:
                data = objects.read(raw.hex())
            except IntegrityError:
                continue
            good.append((raw.hex(), slot.size, data))
        quarantine.mkdir(exist_ok=True)
        objects.index.clear()
        for hexd, size, data in good:
            objects.add_compressed(hexd, size, compressor().compress(data))
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
