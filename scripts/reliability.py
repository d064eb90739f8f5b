#!/usr/bin/env python3
"""Reliability soak: kill imgstore commands at random moments and prove that nothing is ever lost.

    scripts/reliability.py [--kills N] [--quick] [--seed S] [--write-docs] [--workdir DIR] [--keep]

Kills commit, materialize, rollout, rollback and gc with SIGKILL, at the fault points of
imgstore/faults.py and at random moments from outside (while the command holds the store lock),
and after every kill checks the invariants of docs/format.md:

- `verify` finds nothing missing or damaged (temp files of the killed command are allowed), and no
  generation in the database references a missing object;
- the root link and every pxelinux.cfg file are byte-identical to their state before the command or
  after it (never a mix within one file, never missing), and only name trees and kernels that exist;
- every materialized tree is complete and exact;
- re-running the command succeeds, ends in the state a clean run gives, and removes the temp files;
- no generation that existed before is lost (gc may only remove what it is meant to remove).

Then it damages stores (flipped bytes, truncated and deleted objects and packs, a missing manifest, a
garbage, truncated, deleted or newer database), runs bad command lines, and runs commands concurrently.
It prints a Markdown report ending in "data lost: N"; --write-docs also writes it to docs/reliability.md.
The machinery here is shared with tests/test_faults.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
os.environ.pop("IMGSTORE_FAULT", None)  # read once when imgstore.faults is imported: the soak itself must not fail
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import blake3  # noqa: E402

from imgstore import browse, commit, deploy, gc, generations, manifest, nodes, verify  # noqa: E402
from imgstore.durable import TMP_PREFIX  # noqa: E402
from imgstore.errors import ImgstoreError  # noqa: E402
from imgstore.locking import store_lock  # noqa: E402
from imgstore.materialize import discard_stale, materialize, tree_path  # noqa: E402
from imgstore.profiles import SCHEMA  # noqa: E402
from imgstore.store import Store  # noqa: E402

PROFILE = """
[commit]
require_kernel = true
[boot]
serial = "0 115200"
append = "console=ttyS0 nfsroot={nfs_server}:{root},{nfs_options}"
[deploy]
tftp_root = "tftpboot"
root_link = "netboot/root"
serve_default = true
nfs_server = "10.0.0.1"
nfs_options = "ro,actimeo=120"
"""

# The fault points each command passes, in order (imgstore/faults.py; IMGSTORE_FAULT=<point>:kill).
FAULT_POINTS: dict[str, list[str]] = {
    "commit": ["commit.before-flush", "commit.after-manifest", "commit.before-row", "commit.after-row"],
    "materialize": ["materialize.in-fill", "materialize.before-sync"],
    "rollout": ["materialize.in-fill", "materialize.before-sync", "materialize.before-mat-link",
                "rollout.before-row", "deploy.before-switch", "apply.before-rename", "apply.before-link"],
    "rollback": ["materialize.in-fill", "materialize.before-sync", "materialize.before-mat-link",
                 "rollback.before-row", "deploy.before-switch", "apply.before-rename", "apply.before-link"],
    "gc": ["gc.after-trees", "gc.after-rows", "gc.before-pack-delete", "gc.before-mat-sweep"],
}
COMMANDS = list(FAULT_POINTS)
MACS = {"www1": "52:54:00:ab:cd:ef", "www2": "52:54:00:00:00:02", "www3": "52:54:00:12:34:56"}
KILLED = -signal.SIGKILL
ROOTFS_RE = re.compile(r"^([0-9a-f]{64})-([a-z][a-z0-9_-]*)-rootfs$")


# -- running the real command line ------------------------------------------------------------------
def _env(root: Path, fault: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["IMGSTORE_ROOT"] = os.fspath(root)
    env.pop("IMGSTORE_FAULT", None)
    env.pop("IMGSTORE_DEBUG", None)
    env.pop("IMGSTORE_DATABASE", None)
    if fault:
        env["IMGSTORE_FAULT"] = fault
    return env


def cli(root: Path, *args: str | os.PathLike[str], fault: str | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `imgstore ARGS` against the store at root, as its own process."""
    return subprocess.run([sys.executable, "-m", "imgstore", *[os.fspath(a) for a in args]], capture_output=True,
                          text=True, env=_env(root, fault), errors="surrogateescape", timeout=timeout)


def spawn(root: Path, *args: str | os.PathLike[str], fault: str | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "imgstore", *[os.fspath(a) for a in args]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(root, fault), errors="surrogateescape")


def clean_failure(r: subprocess.CompletedProcess[str], code: int) -> str | None:
    """None if the command failed the way every user-facing failure must: one line, documented code."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    if r.returncode != code:
        return f"exit code {r.returncode}, expected {code}: {r.stderr.strip()[-300:]}"
    if "Traceback" in r.stderr + r.stdout:
        return f"traceback: {r.stderr.strip()[-300:]}"
    if len(lines) != 1 or not lines[0].startswith("imgstore: error: "):
        return f"not one 'imgstore: error:' line: {r.stderr.strip()[-300:]}"
    return None


@contextlib.contextmanager
def opened(root: Path) -> Iterator[Store]:
    """A fresh Store each time: an ObjectStore caches its pack index, which a killed command may have changed."""
    s = Store.open(root)
    try:
        yield s
    finally:
        s.close()


# -- what nodes see --------------------------------------------------------------------------------
def _item(path: Path, follow: bool) -> bytes | None:
    """A config as a node sees it: its bytes; for a symlink, `-> target` and the bytes it leads to."""
    try:
        if not os.path.islink(path):
            return path.read_bytes()
        head = b"-> " + os.fsencode(os.readlink(path))
    except FileNotFoundError:
        return None
    if not follow:
        return head
    try:
        return head + b"\n" + path.read_bytes()
    except FileNotFoundError:
        return head + b"\n<dangling>"


def visible(root: Path, profile: str = "web") -> dict[str, bytes | None]:
    """The root link and every pxelinux.cfg file (per-MAC and default), by path relative to the store. The
    store's own path is replaced by <store>, so a twin store built elsewhere compares equal."""
    with opened(root) as s:
        p = s.profile(profile)
    me = os.fsencode(root)
    items = {p.root_link: False}
    cfg = p.tftp_root / "pxelinux.cfg"
    for name in sorted(os.listdir(cfg)) if cfg.is_dir() else []:
        if not name.startswith(TMP_PREFIX) and (os.path.islink(cfg / name) or not (cfg / name).is_dir()):
            items[cfg / name] = True
    out: dict[str, bytes | None] = {}
    for path, follow in items.items():
        v = _item(path, follow)
        out[os.path.relpath(path, root)] = None if v is None else v.replace(me, b"<store>")
    return out


def torn(mid: dict[str, bytes | None], before: dict[str, bytes | None], after: dict[str, bytes | None]) -> list[str]:
    """Visible items that are neither as before the command nor as after it."""
    return [k for k in sorted(set(mid) | set(before) | set(after))
            if mid.get(k) != before.get(k) and mid.get(k) != after.get(k)]


def temps(root: Path) -> list[str]:
    """Every temp file or staging tree in the store, its TFTP root and its link folder (not inside trees)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for n in dirnames + filenames:
            if n.startswith(TMP_PREFIX):
                found.append(os.path.normpath(os.path.join(rel, n)))
        # Trees and staging trees hold the chroot's own files: not ours to judge.
        dirnames[:] = [d for d in dirnames if not d.startswith(TMP_PREFIX) and not d.endswith("-rootfs")]
    return sorted(found)


# -- the invariants --------------------------------------------------------------------------------
def _hash(path: str, st: os.stat_result, cache: dict[Any, Any]) -> str:
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in cache:
        h = blake3.blake3()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        cache[key] = h.hexdigest()
    return str(cache[key])


def check_tree(store: Store, gen: generations.Generation, path: Path, cache: dict[Any, Any]) -> list[str]:
    """A materialized tree must be exactly its manifest: every entry, right type, size and content."""
    import stat as st_

    bad: list[str] = []
    want = {e.path: e for e in browse.entries(store, gen)}
    have: set[bytes] = {b"."}
    root_b = os.fsencode(path)
    skip = len(root_b) + 1
    for dirpath, dirnames, filenames in os.walk(root_b):
        for n in dirnames + filenames:
            have.add((dirpath + b"/" + n)[skip:])
    for p in sorted(have ^ set(want)):
        bad.append(f"tree of {gen.ref}: {'extra' if p in have else 'missing'} {p!r}")
    kinds = {"f": st_.S_ISREG, "h": st_.S_ISREG, "d": st_.S_ISDIR, "l": st_.S_ISLNK, "c": st_.S_ISCHR,
             "b": st_.S_ISBLK, "p": st_.S_ISFIFO}
    for p, e in want.items():
        if p not in have:
            continue
        full = os.path.join(root_b, p) if p != b"." else root_b
        st = os.lstat(full)
        if not kinds[e.type](st.st_mode):
            bad.append(f"tree of {gen.ref}: {p!r} has the wrong type")
        elif e.type == manifest.FILE and (st.st_size != e.size or _hash(os.fsdecode(full), st, cache) != e.digest):
            bad.append(f"tree of {gen.ref}: {p!r} has the wrong content")
        elif e.type == manifest.SYMLINK and os.readlink(full) != e.target:
            bad.append(f"tree of {gen.ref}: {p!r} points elsewhere")
    return bad


def _references(root: Path, vis: dict[str, bytes | None]) -> list[str]:
    """Invariant 3: the root link and every config only name trees and TFTP files that exist."""
    bad = []
    me = os.fsencode(root)
    for key, value in vis.items():
        if value is None:
            continue
        if value.startswith(b"-> "):
            target, nl, value = value[3:].partition(b"\n")
            if not nl:  # the root link
                if not os.path.isdir(target.replace(b"<store>", me)):
                    bad.append(f"{key} points at {target!r}, which is not a tree")
                continue
        text = value.replace(b"<store>", me).decode("utf-8", "replace")
        if "imgstore.gen=" not in text or not text.endswith("IPAPPEND 3\n"):
            bad.append(f"{key} is not a complete config")
        for m in re.finditer(r"^\s*(?:KERNEL|INITRD) (\S+)", text, re.M):
            if not (root / "tftpboot" / m.group(1)).is_file():
                bad.append(f"{key} names {m.group(1)}, which does not exist")
        for m in re.finditer(r"nfsroot=[^:\s]+:([^,\s]+)", text):
            if not os.path.isdir(m.group(1)):
                bad.append(f"{key} names the tree {m.group(1)}, which does not exist")
    return bad


def check_store(root: Path, cache: dict[Any, Any] | None = None) -> list[str]:
    """Every invariant that must hold at any moment, even right after a SIGKILL. Empty when all hold.

    `cache` remembers file hashes and trees already found exact: a tree is never changed after its rename
    (invariant 2), so one checked under the same inode needs no second look; a tree renamed into place
    later has a new inode."""
    cache = {} if cache is None else cache
    bad: list[str] = []
    with opened(root) as s:
        rep = verify.verify(s)
        bad += [f"verify: {p.kind}: {p.what}: {p.detail}" for p in rep.problems if p.kind != "temp"]
        bad += [f"{ref} references a missing object" for ref in gc.missing_objects(s)]
        with s.engine.connect() as conn:
            by_id = {g.gen_id: g for g in generations.list_(conn, deleted=True)}
        for d in sorted(os.listdir(root)):
            m = ROOTFS_RE.match(d)
            if not m:
                continue
            g = by_id.get(m.group(1))
            if g is None:
                bad.append(f"tree {d} belongs to no generation")
            elif g.deleted is None:
                ino = ("tree", d, os.lstat(root / d).st_ino)
                if ino not in cache:
                    problems = check_tree(s, g, root / d, cache)
                    bad += problems
                    if not problems:
                        cache[ino] = True
    bad += _references(root, visible(root))
    return bad


@dataclass(frozen=True)
class DbGen:
    ref: str
    gen_id: str
    deleted: bool


def db_gens(root: Path) -> dict[str, DbGen]:
    with opened(root) as s, s.engine.connect() as conn:
        return {g.ref: DbGen(g.ref, g.gen_id, g.deleted is not None) for g in generations.list_(conn, deleted=True)}


# -- building stores -------------------------------------------------------------------------------
def _write(path: Path, data: bytes, mtime: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(mtime, mtime))


def make_chroots(base: Path, many: int = 0) -> list[Path]:
    """Four chroots, the states web@1..4 are committed from. Unique to c3: etc/motd, usr/lib/three.bin (a
    loose object), its kernel (so deploying web@3 makes a boot file's copy in mat/) and etc/x; c4 keeps etc/x
    (so gc must rewrite the pack it shares with c3's motd).
    `many` more small files in c3's usr/lib/many/ make its tree slow to remove."""
    rng = random.Random(5)
    shared = rng.randbytes(1_500_000)
    three, four = rng.randbytes(1_200_000), rng.randbytes(1_300_000)
    out = []
    for i in range(1, 5):
        c = base / f"c{i}"
        t = 1_700_000_000_000_000_000 + i
        _write(c / "etc/motd", f"generation {i}\n".encode(), t)
        _write(c / "etc/fstab", b"proc /proc proc defaults 0 0\n", t)
        _write(c / "usr/share/big", shared, t)
        for n in range(20):
            _write(c / f"usr/lib/small-{n:02}", f"library {n}\n".encode() * 40, t)
        _write(c / "boot/vmlinuz-6.1.0-28-amd64", b"KERNEL" * 1000 + (b" 3" if i == 3 else b""), t)
        _write(c / "boot/initrd.img-6.1.0-28-amd64", b"INITRD" * 500, t)
        if i >= 3:
            _write(c / "etc/x", b"added in generation 3, kept in 4\n", t)
        if i == 3:
            _write(c / "usr/lib/three.bin", three, t)
            for n in range(many):
                _write(c / f"usr/lib/many/f-{n:05}", b"%d\n" % n, t)
        if i == 4:
            _write(c / "usr/lib/four.bin", four, t)
            _write(c / "etc/new-small", b"new in generation 4\n", t)
        os.symlink("../usr/share/big", c / "etc/biglink")
        out.append(c)
    return out


def new_store(root: Path, profile: str = PROFILE) -> Store:
    s = Store.init(root)
    (root / "profiles/web.toml").write_text(profile)
    return s


def build_fleet(root: Path, chroots: list[Path], scenario: str = "") -> None:
    """web@1..3 committed, nodes www1 and www3 following web, www2 pinned to web@1, rollouts web@1 then web@2.
    Scenario "gc" also commits web@4 and materializes web@3 (so gc has a tree, a pack to rewrite and
    shared copies to remove)."""
    s = new_store(root, PROFILE + 'mac_files = "copy"\n' if scenario.endswith("-copy") else PROFILE)
    try:
        for c in chroots[:3]:
            commit.commit(s, c, "web")
        with store_lock(s.root, "build"), s.engine.begin() as conn:
            for name, mac in MACS.items():
                nodes.add(conn, name, mac, None, "web")
        deploy.rollout(s, "web", "web@1")
        deploy.pin(s, "www2", "web@1")
        deploy.rollout(s, "web", "web@2")
        if scenario == "gc":
            commit.commit(s, chroots[3], "web")
            with store_lock(s.root, "build"), s.engine.connect() as conn:
                materialize(s, generations.resolve(conn, "web@3"))
    finally:
        s.close()


# The command each scenario runs (after build_fleet), for tests and the soak's first pass.
SCENARIOS: dict[str, list[str]] = {
    "commit": ["commit", "{c4}", "-p", "web", "-m", "four"],
    "materialize": ["materialize", "web@3"],
    "rollout": ["rollout", "web@3"],
    "rollback": ["rollback"],
    "rollback-to": ["rollback", "--to", "web@3"],
    "gc": ["gc", "--keep", "1"],
}
SCENARIO_POINTS: dict[str, list[str]] = {
    "commit": FAULT_POINTS["commit"],
    "materialize": FAULT_POINTS["materialize"],
    "rollout": FAULT_POINTS["rollout"],
    # web@1 is materialized already, and its config exists: a plain rollback only flips links.
    "rollback": [p for p in FAULT_POINTS["rollback"]
                 if not p.startswith("materialize.") and p != "apply.before-rename"],
    "rollback-to": FAULT_POINTS["rollback"],
    "gc": FAULT_POINTS["gc"],
}
if "mac_files" in SCHEMA["deploy"]:
    # Per-MAC files as copies, not links: each node's file is renamed into place on its own.
    SCENARIOS["rollout-copy"] = SCENARIOS["rollout"]
    SCENARIO_POINTS["rollout-copy"] = FAULT_POINTS["rollout"]


def scenario_args(name: str, chroots: list[Path]) -> list[str]:
    return [a.format(c4=chroots[3]) for a in SCENARIOS[name]]


# -- damage ----------------------------------------------------------------------------------------
def xor_byte(path: Path, offset: int) -> None:
    # XOR, never overwrite with a constant: that is a no-op one time in 256.
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def _truncate(path: Path, size: int) -> None:
    os.chmod(path, 0o644)
    os.truncate(path, size)


OBJECT_DAMAGE = ["flip-loose", "flip-packed", "flip-manifest", "truncate-zero-loose", "truncate-half-loose",
                 "truncate-zero-pack", "truncate-half-pack", "delete-loose", "delete-pack", "missing-manifest"]
DB_DAMAGE = ["db-garbage", "db-truncated", "db-deleted", "db-newer"]


def damage_objects(root: Path, kind: str, ref: str = "web@3") -> str:
    """Damage content only `ref` needs (built by build_fleet: etc/motd and usr/lib/three.bin of web@3).
    Returns what was done, for the report."""
    with opened(root) as s:
        with s.engine.connect() as conn:
            g = generations.resolve(conn, ref)
        others: set[str] = set()
        with s.engine.connect() as conn:
            for o in generations.list_(conn):
                if o.pk != g.pk:
                    others |= {e.digest for e in browse.entries(s, o) if e.type == manifest.FILE}
        files = {e.path: e for e in browse.entries(s, g) if e.type == manifest.FILE and e.digest not in others}
        loose = next(e.digest for e in files.values() if os.path.exists(s.objects.loose_path(e.digest)))
        packed = files[b"etc/motd"].digest
        slot = s.objects.index[bytes.fromhex(packed)]
        mslot = s.objects.index[bytes.fromhex(g.manifest)]
        loose_path, pack_path = s.objects.loose_path(loose), s.objects.pack_path(slot.pack)
        mpack_path = s.objects.pack_path(mslot.pack)
    if kind == "flip-loose":
        xor_byte(loose_path, loose_path.stat().st_size // 2)
    elif kind == "flip-packed":
        xor_byte(pack_path, slot.offset + slot.clen // 2)
    elif kind == "flip-manifest":
        xor_byte(mpack_path, mslot.offset + mslot.clen // 2)
    elif kind.startswith("truncate-"):
        target = loose_path if kind.endswith("loose") else pack_path
        _truncate(target, 0 if "zero" in kind else target.stat().st_size // 2)
    elif kind == "delete-loose":
        loose_path.unlink()
    elif kind == "delete-pack":
        pack_path.unlink()
    elif kind == "missing-manifest":
        mpack_path.unlink()
    else:
        raise ValueError(kind)
    return kind


def damage_database(root: Path, kind: str) -> None:
    db = root / "imgstore.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file: the damage is the whole story
    if kind == "db-newer":
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
        conn.commit()
    conn.close()
    for p in root.glob("imgstore.db-*"):
        p.unlink()
    if kind == "db-garbage":
        size = db.stat().st_size
        db.write_bytes(random.Random(1).randbytes(size))
    elif kind == "db-truncated":
        _truncate(db, db.stat().st_size // 2)
    elif kind == "db-deleted":
        db.unlink()
    elif kind != "db-newer":
        raise ValueError(kind)


def store_state(root: Path) -> dict[str, object]:
    """Names, sizes, modes and mtimes in the store (not inside trees) and the database rows but the audit
    log: to prove a failed command changed nothing. The database files and the lock are not compared."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.endswith("-rootfs") or dirpath != os.fspath(root)]
        for n in dirnames + filenames:
            if n in ("lock", "lock.info") or n.startswith("imgstore.db"):
                continue
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, 0 if os.path.isdir(p) else st.st_size, st.st_mtime_ns)
    with contextlib.suppress(sqlite3.DatabaseError):
        if (root / "imgstore.db").exists():
            conn = sqlite3.connect(f"file:{root / 'imgstore.db'}?mode=ro", uri=True)
            # The audit log records failed commands too, by design: it is not state a failure may not change.
            out["<database>"] = [x for x in conn.iterdump() if not x.startswith('INSERT INTO "events"')]
            conn.close()
    return out


GC_ROLLBACK = ("Plain `rollback` walks the activation history back to a generation gc already removed (gc "
               "keeps only the first rollback target); it then fails with \"the manifest of web@N is missing (run: "
               "imgstore verify)\", exit 6, naming the wrong cause. Nothing is changed. The soak used `rollback "
               "--to` instead.")


# ===================================================================================================
# The soak
# ===================================================================================================
@dataclass
class Tally:
    kills: Counter[tuple[str, str]] = field(default_factory=Counter)
    survived: Counter[tuple[str, str]] = field(default_factory=Counter)
    not_reached: Counter[str] = field(default_factory=Counter)
    finished_first: int = 0
    violations: list[str] = field(default_factory=list)
    data_lost: list[str] = field(default_factory=list)
    temp_leaks: Counter[str] = field(default_factory=Counter)
    known: Counter[str] = field(default_factory=Counter)
    known_hits: Counter[tuple[str, str]] = field(default_factory=Counter)
    killed_after_done: int = 0
    load: float = 0.0
    cli_reruns: bool = True
    corruptions: list[dict[str, Any]] = field(default_factory=list)
    bad_inputs: list[tuple[str, str, str | None]] = field(default_factory=list)
    concurrent: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


class Soak:
    def __init__(self, work: Path, rng: random.Random, tally: Tally, log: bool = True) -> None:
        self.work, self.rng, self.t, self.log = work, rng, tally, log
        self.root = work / "store"
        self.chroot = work / "chroot"
        self.cache: dict[Any, Any] = {}
        # Seconds from taking the store lock to exiting, per command; and from exec to the lock.
        self.work_time: dict[str, float] = defaultdict(lambda: 0.5)
        self.startup = 0.35
        self.err = ""
        self.counter = 0
        self.known_temps: set[str] = set()

    # -- the store and its chroot ------------------------------------------------------------------
    def setup(self) -> None:
        rng = self.rng
        c = self.chroot
        _write(c / "usr/share/big", rng.randbytes(1_500_000), time.time_ns())
        for n in range(300):
            _write(c / f"usr/lib/mod-{n:03}", rng.randbytes(rng.randrange(100, 6000)), time.time_ns())
        self.mutate(kernel=True)
        s = new_store(self.root)
        try:
            commit.commit(s, c, "web", message="soak 1")
            with store_lock(s.root, "soak"), s.engine.begin() as conn:
                for name, mac in MACS.items():
                    nodes.add(conn, name, mac, None, "web")
            deploy.rollout(s, "web")
            self.mutate()
            commit.commit(s, c, "web", message="soak 2")
            deploy.pin(s, "www2", "web@2")
            deploy.rollout(s, "web")
        finally:
            s.close()

    def mutate(self, kernel: bool = False) -> None:
        """Change the chroot like an apt upgrade would: some files rewritten, one added, one removed."""
        rng, c = self.rng, self.chroot
        self.counter += 1
        now = time.time_ns()
        _write(c / "etc/motd", f"soak state {self.counter}\n".encode(), now)
        for _ in range(rng.randrange(1, 12)):
            _write(c / f"usr/lib/mod-{rng.randrange(300):03}", rng.randbytes(rng.randrange(100, 6000)), now)
        _write(c / f"var/lib/added-{self.counter}", rng.randbytes(rng.randrange(10, 3000)), now)
        added = sorted((c / "var/lib").glob("added-*"))
        if len(added) > 5:
            added[0].unlink()
        if rng.random() < 0.3:  # a big package: its own loose object
            for old in (c / "opt").glob("big-*"):
                old.unlink()
            _write(c / f"opt/big-{self.counter}", rng.randbytes(rng.randrange(1 << 20, 3 << 20)), now)
        if kernel or rng.random() < 0.1:
            for old in (c / "boot").glob("*"):
                old.unlink()
            v = f"6.1.0-{self.counter}-amd64"
            _write(c / f"boot/vmlinuz-{v}", f"KERNEL {v}\n".encode() * 2000, now)
            _write(c / f"boot/initrd.img-{v}", f"INITRD {v}\n".encode() * 1000, now)

    # -- one kill ----------------------------------------------------------------------------------
    def pick(self, command: str, point: str | None) -> tuple[list[str], dict[str, Any]]:
        """The command line to run, and what the soak must remember to judge it. A fault point is given a
        command that passes it (a tree to build for materialize.*, a real switch for apply.*)."""
        rng = self.rng
        with opened(self.root) as s, s.engine.connect() as conn:
            gens = generations.list_(conn, "web")
            act = deploy.active(conn, "web")
            prev = deploy.previous_active(conn, "web")
            refs = [g.ref for g in gens]
            bare = [g.ref for g in gens if not tree_path(s, g).exists()]
            keep = rng.choice([1, 2, 2, 3])
            root_pks = gc.roots(s, keep)
            roots = {g.ref for g in gens if g.pk in root_pks}
        info: dict[str, Any] = {"active": act.ref if act else None}
        others = [r for r in refs if r != info["active"]] or refs
        # A generation never deployed needs a tree (materialize.*) and a new config (apply.before-rename).
        wants_tree = point is not None and (point.startswith("materialize.") or point == "apply.before-rename")
        if command == "commit":
            if rng.random() < 0.85:
                self.mutate()
            return ["commit", os.fspath(self.chroot), "-p", "web", "-m", f"soak {self.counter}"], info
        if command == "materialize":
            return ["materialize", rng.choice(bare or refs)], info
        if command == "rollout":
            choices = [r for r in bare if r != info["active"]] if wants_tree else []
            target = rng.choice(choices or (others[-3:] + [r for r in bare if r in others]))
            info["target"] = target
            if target == refs[-1] and rng.random() < 0.5:
                return ["rollout"], info
            return ["rollout", target], info
        if command == "rollback":
            if prev is not None and prev.deleted is not None:
                self.t.known[GC_ROLLBACK] += 1
                prev = None
            if prev is not None and not wants_tree and rng.random() < 0.7:
                info["target"] = prev.ref
                return ["rollback"], info
            choices = [r for r in bare if r != info["active"]] if wants_tree else []
            info["target"] = rng.choice(choices or others)
            return ["rollback", "--to", info["target"]], info
        info["roots"] = roots
        return ["gc", "--keep", str(keep)], info

    def kill_once(self, command: str, point: str | None) -> bool:
        """Run one command, kill it, check everything, recover. False if the kill did not happen."""
        args, info = self.pick(command, point)
        before = visible(self.root)
        gens_before = db_gens(self.root)
        t0 = time.monotonic()
        if point is not None:
            proc = spawn(self.root, *args, fault=f"{point}:kill")
            self.err = proc.communicate(timeout=600)[1]
            moment = point
        else:
            proc = spawn(self.root, *args)
            moment = self._kill_randomly(proc, command)
        rc = proc.returncode
        if rc != KILLED:
            if rc != 0:
                self.violation(f"{' '.join(args)} failed without a kill: rc {rc}: {self.err.strip()[-300:]}")
            elif point is not None:
                self.t.not_reached[point] += 1
                if self.log:
                    print(f"  {point} not reached by {' '.join(args)}", file=sys.stderr)
            else:
                self.t.finished_first += 1
                self._learn(command, time.monotonic() - t0 - self.startup)
            return False
        key = (command, moment)
        self.t.kills[key] += 1
        n_before = len(self.t.violations) + len(self.t.data_lost)

        mid = visible(self.root)
        self.lost(f"after killing {' '.join(args)} at {moment}", check_store(self.root, self.cache))

        # Recovery: the same command again (a killed rollout or rollback resumes its switch). Except a plain
        # rollback killed after it had finished (between its last write and its exit): running it again
        # is a second rollback, so the operator checks `imgstore status` instead, and so does the soak.
        if args == ["rollback"] and self._rollback_done(info["target"]):
            self.t.killed_after_done += 1
            r = cli(self.root, "status")
            failed = None if r.returncode == 0 else f"status: rc {r.returncode}: {r.stdout.strip()[-200:]}"
        else:
            t1 = time.monotonic()
            failed = self.rerun(args)
            self._learn(command, time.monotonic() - t1 - (self.startup if self.t.cli_reruns else 0))
        if failed:
            self.violation(f"re-running {' '.join(args)} after a kill at {moment} failed: {failed}")
        after = visible(self.root)
        self.lost(f"killed at {moment}, {' '.join(args)}",
                  [f"{k} was neither as before nor as after" for k in torn(mid, before, after)])
        self.lost(f"after re-running {' '.join(args)}", check_store(self.root, self.cache))
        self.check_generations(command, args, info, gens_before, moment)
        left = [x for x in temps(self.root) if x not in self.known_temps]
        for x in left:
            self.t.temp_leaks[x.split("/")[0] if "/" in x else "(store root)"] += 1
        self.known_temps |= set(left)
        if left:
            self.t.known_hits[key] += 1
        if len(self.t.violations) + len(self.t.data_lost) == n_before:
            self.t.survived[key] += 1
        return True

    def _kill_randomly(self, proc: subprocess.Popen[str], command: str) -> str:
        """SIGKILL at a random moment while the command holds the store lock (or, rarely, before)."""
        t_spawn = time.monotonic()
        if self.rng.random() < 0.1:
            time.sleep(self.rng.uniform(0, 0.3))
            proc.send_signal(signal.SIGKILL)
            self.err = proc.communicate(timeout=600)[1]
            return "random SIGKILL (startup)"
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                info = json.loads((self.root / "lock.info").read_text())
                if info.get("pid") == proc.pid:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.002)
        if proc.poll() is None:
            self.startup = 0.8 * self.startup + 0.2 * (time.monotonic() - t_spawn)
        time.sleep(self.rng.uniform(0, self.work_time[command] * 1.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        self.err = proc.communicate(timeout=600)[1]
        return "random SIGKILL"

    def _rollback_done(self, target: str) -> bool:
        """The rollback's row is written and no switch is pending (deploy.PENDING): it had completed."""
        pending = getattr(deploy, "PENDING", None)
        if pending is not None and (self.root / pending).exists():
            return False
        with opened(self.root) as s, s.engine.connect() as conn:
            act = deploy.active(conn, "web")
        return act is not None and act.ref == target

    def rerun(self, args: list[str]) -> str | None:
        """Run a command to completion; None if it succeeded. Through the CLI, or (--quick, to save the
        interpreter start) through the same library calls the CLI makes."""
        if self.t.cli_reruns:
            r = cli(self.root, *args)
            return None if r.returncode == 0 else f"rc {r.returncode}: {r.stderr.strip()[-200:]}"
        try:
            with opened(self.root) as s:
                if args[0] == "commit":
                    commit.commit(s, Path(args[1]), "web", message=args[-1])
                elif args[0] == "materialize":
                    with store_lock(s.root, "materialize"):
                        with s.engine.connect() as conn:
                            g = generations.resolve(conn, args[1])
                        discard_stale(s)
                        materialize(s, g)
                elif args[0] == "rollout":
                    deploy.rollout(s, "web", args[1] if len(args) > 1 else None)
                elif args[0] == "rollback":
                    deploy.rollback(s, "web", args[2] if len(args) > 2 else None)
                elif args[0] == "gc":
                    gc.gc(s, int(args[2]))
                elif args[0] == "sync":
                    deploy.sync(s, s.profiles())
                else:
                    raise ValueError(args)
        except ImgstoreError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _learn(self, command: str, work: float) -> None:
        self.work_time[command] = max(0.02, 0.7 * self.work_time[command] + 0.3 * work)

    def check_generations(self, command: str, args: list[str], info: dict[str, Any],
                          before: dict[str, DbGen], moment: str) -> None:
        now = db_gens(self.root)
        for ref, g in before.items():
            if g.deleted:
                continue
            if ref not in now or now[ref].gen_id != g.gen_id:
                self.lost(f"{' '.join(args)} killed at {moment}", [f"{ref} vanished from the database"])
            elif now[ref].deleted and not (command == "gc" and ref not in info["roots"]):
                self.lost(f"{' '.join(args)} killed at {moment}", [f"{ref} was marked removed; it was a root"])
        created = [r for r in now if r not in before]
        if command != "commit" and created:
            self.violation(f"{' '.join(args)} created generations {created}")
        if command == "commit":
            if len(created) > 1:
                self.violation(f"a killed commit and its re-run created {len(created)} generations: {created}")
            # Converged: committing the same chroot once more finds nothing to do.
            with opened(self.root) as s:
                res = commit.commit(s, self.chroot, "web", message="convergence check")
            if res.created:
                self.violation(f"after a killed commit and its re-run, the chroot differs from {res.generation.ref}")
        if command in ("rollout", "rollback") and "target" in info:
            with opened(self.root) as s, s.engine.connect() as conn:
                act = deploy.active(conn, "web")
            if act is None or act.ref != info["target"]:
                self.violation(f"{' '.join(args)}: active is {act.ref if act else None}, not {info['target']}")

    def violation(self, what: str) -> None:
        self.t.violations.append(what)
        if self.log:
            print(f"  VIOLATION: {what}", file=sys.stderr)

    def lost(self, context: str, problems: list[str]) -> None:
        """One event, however many problems it shows (a damaged tree is one problem per file)."""
        if not problems:
            return
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        self.t.data_lost.append(f"{context}: {problems[0]}{more}")
        if self.log:
            print(f"  DATA LOST: {self.t.data_lost[-1]}", file=sys.stderr)

    # -- concurrency -------------------------------------------------------------------------------
    def concurrent_round(self) -> None:
        """Writers and readers at once: writers serialise on the store lock, readers never see a broken store."""
        self.mutate()
        # Targets the concurrent gc --keep 3 keeps whatever runs first: the two latest generations, which stay
        # among the last three even after the concurrent commit adds one. (Other roots, such as the rollback
        # target, move when a concurrent rollout runs first; a rollout of what gc then removed fails, rightly.)
        with opened(self.root) as s, s.engine.connect() as conn:
            refs = [g.ref for g in generations.list_(conn, "web")][-2:]
        writers = [
            ["commit", os.fspath(self.chroot), "-p", "web", "-m", "concurrent"],
            ["rollout", self.rng.choice(refs)],
            ["materialize", self.rng.choice(refs)],
            ["gc", "--keep", "3"],
            ["rollout", "--no-wait", self.rng.choice(refs)],
        ]
        readers = [["verify"], ["status"], ["generations"], ["show", "web@latest"]]
        self.rng.shuffle(writers)
        procs = [(a, spawn(self.root, *a)) for a in writers + readers]
        result: dict[str, Any] = {"commands": len(procs), "ok": 0, "busy": 0, "failures": []}
        for a, p in procs:
            out, err = p.communicate(timeout=600)
            # status reports drift (8) while a rollout is between its database row and its switch.
            rc = p.returncode
            ok = rc == 0 or (rc == 7 and "--no-wait" in a) or (a[0] == "status" and rc == 8)
            if p.returncode == 7:
                result["busy"] += 1
            if ok:
                result["ok"] += 1
            else:
                result["failures"].append(f"{' '.join(a)}: rc {p.returncode}: {err.strip()[-200:]}")
        problems = check_store(self.root, self.cache)
        self.lost("after concurrent commands", problems)
        for f in result["failures"]:
            # verify takes no lock, but confirms what it finds against a fresh look: gc at work is no failure.
            self.violation(f"concurrent {f}")
        r = cli(self.root, "status")
        if r.returncode != 0:
            self.violation(f"drift after concurrent commands: {r.stdout.strip()[-300:]}")
        self.t.concurrent.append(result)

    # -- bad input ---------------------------------------------------------------------------------
    def bad_inputs(self, quick: bool) -> None:
        w = self.work
        afile = w / "a-file"
        afile.write_text("x")
        nonempty = w / "nonempty"
        (nonempty / "x").parent.mkdir(exist_ok=True)
        (nonempty / "x").write_text("x")
        cases: list[tuple[list[str], int]] = [
            (["commit", os.fspath(w / "missing"), "-p", "web"], 3),
            (["commit", os.fspath(afile), "-p", "web"], 2),
            (["commit", os.fspath(self.chroot), "-p", "nosuch"], 3),
            (["rollout", "web@9999"], 3),
            (["rollout", "-p", "nosuch"], 3),
            (["rollout", "--canary", "nosuch"], 3),
            (["rollback", "--to", "web@9999"], 3),
            (["rollback", "--node", "nosuch"], 3),
            (["materialize", "web@9999"], 3),
            (["checkout", "web@latest", os.fspath(nonempty)], 8),
            (["checkout", "web@latest", os.fspath(afile)], 8),
            (["checkout", "web@latest", os.fspath(w / "no/such/parent")], 2),
            (["gc", "--keep", "-1"], 2),
            (["gc", "--older-than", "soon"], 2),
            (["pin", "nosuch", "web@1"], 3),
            (["node", "add", "www9", "--mac", "52:54:00:zz:00:01", "-p", "web"], 2),
            (["node", "add", "../evil", "--mac", "52:54:00:00:00:09", "-p", "web"], 2),
            (["node", "add", "www9", "--mac", MACS["www1"], "-p", "web"], 8),
            (["cat", "web@latest", "/no/such/file"], 3),
            (["ls", "web@latest", "/../etc"], 2),
            (["show", "ffffffffffff"], 3),
            (["rollout", "--no-such-option"], 2),
        ]
        if quick:
            cases = cases[::4]
        before = store_state(self.root)
        for args, code in cases:
            r = cli(self.root, *args)
            problem = clean_failure(r, code)
            self.t.bad_inputs.append((" ".join(a.replace(os.fspath(w), "$W") for a in args), f"{code}", problem))
        if store_state(self.root) != before:
            self.violation("a rejected command changed the store")
        if (w / "no").exists():
            self.violation("a rejected checkout created its destination")


# -- corruptions -----------------------------------------------------------------------------------
def corruption_trial(work: Path, chroots: list[Path], kind: str) -> dict[str, Any]:
    """Damage a fresh store and check: verify detects it, operations on the affected generation fail
    cleanly before touching anything, unaffected generations keep working."""
    root = work / kind / "store"
    build_fleet(root, chroots)
    res: dict[str, Any] = {"damage": kind, "problems": []}
    probs: list[str] = res["problems"]
    if kind in DB_DAMAGE:
        vis, state = visible(root), store_state(root)
        damage_database(root, kind)
        dest = work / kind / "co"
        for args in (["generations"], ["rollout", "web@3"], ["commit", os.fspath(chroots[3]), "-p", "web"],
                     ["gc"], ["verify"], ["checkout", "web@1", os.fspath(dest)], ["status"]):
            why = clean_failure(cli(root, *args), 5)
            if why:
                probs.append(f"{args[0]}: {why}")
        res["detected"] = not any(p.startswith("verify:") for p in probs)
        res["refused"] = not probs
        res["untouched"] = visible(root) == vis and not dest.exists() and {
            k: v for k, v in store_state(root).items() if k != "<database>"} == {
            k: v for k, v in state.items() if k != "<database>"}
        res["unaffected_ok"] = None
        return res
    damage_objects(root, kind)
    r = cli(root, "verify", "--json")
    try:
        rep = json.loads(r.stdout)
        named = {g for p in rep["problems"] if p["kind"] != "temp" for g in p["generations"]}
    except (ValueError, KeyError):
        rep, named = None, set()
    res["detected"] = r.returncode == 6 and rep is not None and named == {"web@3"} and "Traceback" not in r.stderr
    if not res["detected"]:
        probs.append(f"verify: rc {r.returncode}, generations named {sorted(named)}")
    vis = visible(root)
    with opened(root) as s, s.engine.connect() as conn:
        tree3 = tree_path(s, generations.resolve(conn, "web@3"))
    dest = work / kind / "co3"
    refused = True
    for args in (["rollout", "web@3"], ["rollback", "--to", "web@3"], ["materialize", "web@3"],
                 ["checkout", "web@3", os.fspath(dest)]):
        why = clean_failure(cli(root, *args), 6)
        if why:
            refused = False
            probs.append(f"{' '.join(args[:2])}: {why}")
    res["refused"] = refused
    staging = [t for t in temps(root) if t.endswith("-rootfs")]
    res["untouched"] = visible(root) == vis and not tree3.exists() and not staging
    res["checkout_untouched"] = not dest.exists()
    if not res["untouched"]:
        probs.append("the visible state, the tree or a staging tree changed")
    if not res["checkout_untouched"]:
        probs.append("checkout created its destination before failing")
    ok = cli(root, "rollout", "web@1").returncode == 0 and visible(root) != vis
    co = work / kind / "co1"
    ok = ok and cli(root, "checkout", "web@2", os.fspath(co)).returncode == 0
    ok = ok and (co / "etc/motd").read_bytes() == (chroots[1] / "etc/motd").read_bytes()
    ok = ok and cli(root, "cat", "web@1", "/etc/motd").stdout == "generation 1\n"
    left = temps(root)
    res["unaffected_ok"] = ok and not check_store_unaffected(root)
    if left:
        probs.append(f"temp files left after the next command: {left}")
    if not res["unaffected_ok"]:
        probs.append("an unaffected generation stopped working")
    return res


def check_store_unaffected(root: Path) -> list[str]:
    """check_store, minus what the deliberate damage explains (problems naming web@3 only)."""
    return [p for p in check_store(root) if "web@3" not in p and "verify:" not in p]


# -- the run ---------------------------------------------------------------------------------------
def run(kills: int, quick: bool, seed: int, work: Path, log: bool = True) -> Tally:
    rng = random.Random(seed)
    t = Tally(cli_reruns=not quick, load=os.getloadavg()[0])
    soak = Soak(work, rng, t, log)
    t0 = time.monotonic()
    soak.setup()
    # First pass: every fault point of every command at least once; then random points and moments.
    schedule: list[tuple[str, str | None]] = [(c, p) for c in COMMANDS for p in FAULT_POINTS[c]]
    if quick:
        schedule = schedule[::2]
    weights = {"commit": 3, "materialize": 2, "rollout": 3, "rollback": 2, "gc": 2}
    attempts = 0
    while sum(t.kills.values()) < kills and attempts < kills * 6:
        attempts += 1
        if schedule:
            command, point = schedule.pop(0)
        else:
            command = rng.choices(COMMANDS, [weights[c] for c in COMMANDS])[0]
            point = rng.choice(FAULT_POINTS[command]) if rng.random() < 0.5 else None
        done = soak.kill_once(command, point)
        if log and done:
            n = sum(t.kills.values())
            if n % 10 == 0:
                print(f"  {n} kills, {time.monotonic() - t0:.0f} s", file=sys.stderr)
    t.seconds["kills"] = time.monotonic() - t0

    t1 = time.monotonic()
    for _ in range(1 if quick else 5):
        soak.concurrent_round()
    t.seconds["concurrent"] = time.monotonic() - t1

    t1 = time.monotonic()
    soak.bad_inputs(quick)
    t.seconds["bad inputs"] = time.monotonic() - t1

    t1 = time.monotonic()
    chroots = make_chroots(work / "fleet-chroots")
    kinds = OBJECT_DAMAGE + DB_DAMAGE
    if quick:
        kinds = ["flip-packed", "db-garbage"]
    for kind in kinds:
        r = corruption_trial(work / "corrupt", chroots, kind)
        t.corruptions.append(r)
        if not (r["detected"] and r["refused"] and r["untouched"] and r.get("checkout_untouched", True)):
            soak.violation(f"damage {kind}: {'; '.join(r['problems'])}")
        if r["unaffected_ok"] is False:
            soak.lost(f"damage {kind}", ["an unaffected generation stopped working"])
    t.seconds["corruptions"] = time.monotonic() - t1
    t.seconds["total"] = time.monotonic() - t0
    return t


# -- the report ------------------------------------------------------------------------------------
def report(t: Tally, kills: int, seed: int, quick: bool) -> str:
    out: list[str] = []
    w = out.append
    total = sum(t.kills.values())
    w(f"Run: `scripts/reliability.py --kills {kills}{' --quick' if quick else ''} --seed {seed}` on "
      f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs (load average {t.load:.1f} at the start), Python "
      f"{sys.version.split()[0]}; "
      f"{t.seconds.get('total', 0):.0f} s in all ({t.seconds.get('kills', 0):.0f} s of kills). Re-runs after a "
      + ("kill through the command line." if t.cli_reruns else "kill through the library calls the CLI makes."))
    w("")
    w(f"### Kills survived: {sum(t.survived.values())} of {total}")
    w("")
    w("| command | killed at | kills | survived | a known issue showed |")
    w("| --- | --- | ---: | ---: | ---: |")
    for c in COMMANDS:
        for (cmd, moment), n in sorted(t.kills.items()):
            if cmd == c:
                w(f"| {cmd} | `{moment}` | {n} | {t.survived[(cmd, moment)]} | {t.known_hits[(cmd, moment)]} |")
    per_cmd = Counter({c: sum(n for (cmd, _), n in t.kills.items() if cmd == c) for c in COMMANDS})
    w(f"| **all** | | **{total}** | **{sum(t.survived.values())}** | **{sum(t.known_hits.values())}** |")
    w("")
    w("Survived: every invariant held and the re-run succeeded. Known issues are listed under Findings.")
    w("")
    w("Per command: " + ", ".join(f"{c} {per_cmd[c]}" for c in COMMANDS) + ". "
      f"Random kills that came after the command had already exited (not counted): {t.finished_first}; "
      f"plain rollbacks killed after their last write, before exiting (not re-run, a re-run would roll back "
      f"again; checked with `imgstore status`): {t.killed_after_done}.")
    if t.not_reached:
        w("Fault points a randomly chosen command did not pass (not counted): "
          + ", ".join(f"`{p}` {n}" for p, n in sorted(t.not_reached.items())) + ".")
    w("")
    w("### Corruptions tried and detected")
    w("")
    w("| damage (to content only web@3 needs) | detected | web@3 refused, one line, right code | nothing touched "
      "| checkout made no destination | web@1, web@2 still work |")
    w("| --- | :---: | :---: | :---: | :---: | :---: |")

    def yn(v: object) -> str:
        return "n/a" if v is None else ("yes" if v else "**no**")

    for r in t.corruptions:
        w(f"| {r['damage']} | {yn(r['detected'])} | {yn(r['refused'])} | {yn(r['untouched'])} | "
          f"{yn(r.get('checkout_untouched', True))} | {yn(r['unaffected_ok'])} |")
    det = sum(bool(r["detected"]) for r in t.corruptions)
    w("")
    w(f"{len(t.corruptions)} corruptions tried, {det} detected.")
    for r in t.corruptions:
        for p in r["problems"]:
            w(f"- {r['damage']}: {p}")
    w("")
    w("### Bad inputs")
    w("")
    ok = sum(p is None for _, _, p in t.bad_inputs)
    w(f"{len(t.bad_inputs)} tried, {ok} rejected with one line, the documented exit code and nothing changed.")
    w("")
    w("| command line | expected exit | result |")
    w("| --- | ---: | --- |")
    for args, code, problem in t.bad_inputs:
        shown = "ok" if problem is None else " / ".join(problem.replace("|", "/").splitlines())
        w(f"| `imgstore {args}` | {code} | {shown} |")
    w("")
    w("### Concurrent runs")
    w("")
    n_cmd = sum(r["commands"] for r in t.concurrent)
    w(f"{len(t.concurrent)} round(s) of {n_cmd // max(1, len(t.concurrent))} commands started at once "
      f"(commit, rollout, materialize, gc, rollout --no-wait; verify, status, generations, show): {n_cmd} runs, "
      f"{sum(r['ok'] for r in t.concurrent)} as expected, {sum(r['busy'] for r in t.concurrent)} told busy "
      "(exit 7, --no-wait).")
    for r in t.concurrent:
        for f in r["failures"]:
            w(f"- {f}")
    w("")
    w("### Findings")
    w("")
    if t.temp_leaks:
        w("- Temp files a killed command left and re-running it did not remove: "
          + ", ".join(f"{where}/ {n}" for where, n in sorted(t.temp_leaks.items())) + ".")
    for v in t.violations:
        w(f"- violation: {v}")
    for f, n in sorted(t.known.items()):
        w(f"- {f} (seen {n} time{'s' if n > 1 else ''})")
    bad_in = [(a, p) for a, _, p in t.bad_inputs if p is not None]
    for a, p in bad_in:
        w(f"- `imgstore {a}` was not rejected as documented: {' / '.join(p.splitlines())}")
    if not (t.temp_leaks or t.violations or t.known or bad_in):
        w("- none")
    w("")
    w(f"known issues seen: {sum(t.known.values()) + sum(t.temp_leaks.values())}")
    w("")
    w(f"invariant violations: {len(t.violations)}")
    w("")
    w(f"data lost: {len(t.data_lost)}")
    for d in t.data_lost:
        w(f"- {d}")
    return "\n".join(out) + "\n"


DOC_HEAD = """# Reliability

`scripts/reliability.py` is a soak test: it kills imgstore commands at random moments and checks, after
every kill, that nothing was lost. `tests/test_faults.py` crashes each command at each fault point one
by one (and checks damaged storage case by case); the soak adds random moments, hundreds of kills in a
row on one store, concurrency, corruption and bad input.

```
scripts/reliability.py                  # 200 kills and everything else: 5 to 8 minutes on 2 cores
scripts/reliability.py --quick          # 30 kills and a sample of the rest: under a minute
scripts/reliability.py --kills 1000 --seed 7 --keep --workdir /var/tmp/soak
scripts/reliability.py --write-docs     # also rewrite this page with the report
pytest -m slow tests/test_faults.py     # runs --quick and requires "data lost: 0"
```

It prints the report below and exits 0 when nothing was lost and no invariant was violated, 1 otherwise.
Known issues (bugs already reported, listed under Findings) are counted but do not change the exit code.
The seed is printed; the same seed replays the same choices (timing still varies).

## What it checks

1. **Kills.** A store with three nodes (two following the profile, one pinned) and a chroot of about
   300 files is changed over and over by `commit` (the chroot changes like an apt upgrade between
   commits), `materialize`, `rollout`, `rollback` (plain and `--to`) and `gc`, run as real processes.
   Each run is killed with SIGKILL: at a fault point of `imgstore/faults.py`
   (`IMGSTORE_FAULT=<point>:kill`, every point at least once), or from outside at a random moment while
   the command holds the store lock. After each kill, before anything else runs:
   - `verify` finds nothing missing or damaged (temp files are allowed), and no generation in the
     database references a missing object;
   - every materialized tree of a live generation is exactly its manifest (entries, types, sizes,
     content hashes, link targets);
   - the root link and every per-MAC and default config name only trees and kernels that exist.

   Then the same command is run again (a killed rollout or rollback resumes rather than starting over),
   and:
   - the re-run succeeds, and the same invariants hold;
   - at the moment of the kill, the root link and each `pxelinux.cfg` file were byte-identical to their
     state before the command or to the state after it (links compared by target and by what they lead to);
   - no generation that existed before is gone or changed its id; gc only removed generations that were
     not roots; a killed commit and its re-run created at most one generation, and committing the same
     chroot once more finds nothing to do; a rollout or rollback ends on its target;
   - temp files left by the kill are gone (those that are not are counted under Findings).
2. **Concurrency.** Writers (commit, rollout, materialize, gc, `rollout --no-wait`) and readers (verify,
   status, generations, show) started at the same moment: writers queue on the store lock, `--no-wait`
   is told busy (exit 7), readers see a whole store, the store is whole afterwards and has no drift.
3. **Bad input.** Wrong paths, generations, profiles, nodes, MACs and options: one line on stderr, the
   documented exit code (docs/exit-codes.md), nothing changed in the store.
4. **Corruption.** A fresh store per case; damage to content only web@3 needs: a flipped byte (XOR) in a
   loose object, a packed object or a manifest; a loose object or a pack truncated to zero or to half; a
   deleted object or pack; a missing manifest. `verify` must name exactly web@3; rollout,
   `rollback --to`, materialize and checkout of web@3 must fail with one line and exit 6 before touching
   anything; web@1 and web@2 must keep working (rollout, checkout, cat). And damage to the database
   (garbage, truncated, deleted, migrated by a newer imgstore): every command exits 5 with one line and
   changes nothing.

"Data lost" counts events where any of these held no more: an object missing or damaged, a generation
gone, a visible file torn or pointing at nothing, a live tree inexact. It must be 0.

## Latest output

"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=None, help="kills to survive (default 200; --quick: 30)")
    ap.add_argument("--quick", action="store_true", help="about 30 kills and a sample of the rest (CI)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: time-based; printed)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build the stores (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--write-docs", action="store_true", help="write the report to docs/reliability.md")
    a = ap.parse_args()
    kills = a.kills if a.kills is not None else (30 if a.quick else 200)
    seed = a.seed if a.seed is not None else int(time.time()) % 100_000
    work = Path(tempfile.mkdtemp(prefix="imgstore-soak-", dir=a.workdir))
    print(f"reliability soak: {kills} kills, seed {seed}, in {work}", file=sys.stderr)
    try:
        t = run(kills, a.quick, seed, work)
    except (ImgstoreError, OSError, subprocess.SubprocessError) as exc:
        print(f"reliability: the soak itself failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = report(t, kills, seed, a.quick)
    print(text)
    if a.write_docs:
        (REPO / "docs/reliability.md").write_text(DOC_HEAD + text)
        print("wrote docs/reliability.md", file=sys.stderr)
    return 0 if not (t.data_lost or t.violations) else 1


if __name__ == "__main__":
    sys.exit(main())
