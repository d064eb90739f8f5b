"""verify catches damaged and missing objects, names the generations that need them, and exits non-zero."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Cli, write_profile

from imgstore import browse, commit, faults
from imgstore.errors import IntegrityError
from imgstore.store import Store


def _two_generations(store: Store, tmp_path: Path) -> tuple[Path, object, object]:
    write_profile(store.root, "t", "[commit]\ndefault_excludes = false\nrequire_kernel = false\n")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(2 << 20))  # loose object
    (tree / "small").write_bytes(b"small file " * 10)  # packed object
    g1 = commit.commit(store, tree, "t", no_kernel=True).generation
    (tree / "only-in-2").write_bytes(b"second generation only")
    g2 = commit.commit(store, tree, "t", no_kernel=True).generation
    return tree, g1, g2


def _xor_byte(path: Path, offset: int) -> None:
    # XOR, never overwrite with a constant: that is a no-op one time in 256.
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def _loose(store: Store) -> Path:
    d = next(iter(store.objects.loose_digests()))
    return store.objects.loose_path(d)


def _pack(store: Store) -> Path:
    return store.objects.pack_path(store.objects.pack_names()[0])


def test_clean_store_exits_zero(store: Store, tmp_path: Path, cli: Cli) -> None:
    _two_generations(store, tmp_path)
    r = cli("verify")
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_flipped_byte_in_loose_object(store: Store, tmp_path: Path, cli: Cli) -> None:
    _two_generations(store, tmp_path)
    p = _loose(store)
    _xor_byte(p, p.stat().st_size // 2)
    r = cli("verify", "--json")
    assert r.returncode == 6
    rep = json.loads(r.stdout)
    assert not rep["ok"]
    bad = [p for p in rep["problems"] if p["kind"] == "damaged"]
    assert len(bad) == 1 and bad[0]["generations"] == ["t@1", "t@2"]
    r = cli("verify")
    assert "needed by t@1, t@2" in r.stdout and "imgstore verify --repair" in r.stderr


def test_flipped_byte_in_pack(store: Store, tmp_path: Path, cli: Cli) -> None:
    _two_generations(store, tmp_path)
    for name in store.objects.pack_names():
        _xor_byte(store.objects.pack_path(name), 10)  # inside the first object's frame
    r = cli("verify", "--json")
    assert r.returncode == 6
    assert any(p["kind"] == "damaged" for p in json.loads(r.stdout)["problems"])


def test_truncated_objects(store: Store, tmp_path: Path, cli: Cli) -> None:
    for cut in ("zero", "half"):
        sub = tmp_path / cut
        s = Store.init(sub / "store")
        _two_generations(s, sub)
        p = _loose(s)
        os.chmod(p, 0o644)
        os.truncate(p, 0 if cut == "zero" else p.stat().st_size // 2)
        r = cli("verify", root=sub / "store")
        assert r.returncode == 6, (cut, r.stdout)
        pk = _pack(s)
        os.chmod(pk, 0o644)
        os.truncate(pk, pk.stat().st_size // 2)
        r = cli("verify", "--json", root=sub / "store")
        assert r.returncode == 6
        s.close()


def test_deleted_object_and_checkout_fails_before_touching_anything(store: Store, tmp_path: Path, cli: Cli) -> None:
    tree, g1, g2 = _two_generations(store, tmp_path)
    os.unlink(_loose(store))
    r = cli("verify")
    assert r.returncode == 6 and "missing" in r.stdout and "t@1, t@2" in r.stdout
    dest = tmp_path / "out"
    r = cli("checkout", "t@1", dest)
    assert r.returncode == 6 and not dest.exists(), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_unaffected_generation_keeps_working(store: Store, tmp_path: Path) -> None:
    write_profile(store.root, "a", "[commit]\ndefault_excludes = false\nrequire_kernel = false\n")
    write_profile(store.root, "b", "[commit]\ndefault_excludes = false\nrequire_kernel = false\n")
    ta, tb = tmp_path / "a", tmp_path / "b"
    ta.mkdir()
    tb.mkdir()
    (ta / "x").write_bytes(os.urandom(2 << 20))
    (tb / "y").write_bytes(os.urandom(2 << 20))
    ga = commit.commit(store, ta, "a", no_kernel=True).generation
    gb = commit.commit(store, tb, "b", no_kernel=True).generation
    e = next(e for e in browse.entries(store, ga) if e.path == b"x")
    os.unlink(store.objects.loose_path(e.digest))
    browse.checkout(store, gb, tmp_path / "ok")
    assert (tmp_path / "ok/y").read_bytes() == (tb / "y").read_bytes()
    try:
        browse.checkout(store, ga, tmp_path / "bad")
    except IntegrityError:
        pass
    else:
        raise AssertionError("checkout of a damaged generation succeeded")
    assert not (tmp_path / "bad").exists()


def test_missing_manifest(store: Store, tmp_path: Path, cli: Cli) -> None:
    _tree, g1, _g2 = _two_generations(store, tmp_path)
    # Manifests are small: they live in packs. Remove every pack to lose them.
    for name in store.objects.pack_names():
        os.unlink(store.objects.pack_path(name))
    r = cli("verify")
    assert r.returncode == 6 and "missing" in r.stdout
    r = cli("checkout", "t@1", tmp_path / "out")
    assert r.returncode == 6 and "manifest of t@1 is missing" in r.stderr


def test_repair_quarantines_then_recommit_restores(store: Store, tmp_path: Path, cli: Cli) -> None:
    tree, _g1, _g2 = _two_generations(store, tmp_path)
    p = _loose(store)
    _xor_byte(p, 100)
    assert cli("verify").returncode == 6
    r = cli("verify", "--repair")
    assert "quarantine" in r.stdout
    # The chroot still has the content: committing it stores the object again.
    (tree / "new").write_text("n")
    write_profile(store.root, "t", "[commit]\ndefault_excludes = false\nrequire_kernel = false\n")
    r = cli("commit", tree, "-p", "t", "--no-kernel")
    assert r.returncode == 0, r.stderr
    r = cli("verify")
    assert r.returncode == 0, r.stdout


# -- verify takes no lock: gc may remove generations and objects under it --------------------------------
def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] == "T"


def _verify_held_at(root: Path, point: str) -> subprocess.Popen[str]:
    """`imgstore verify --json`, started and paused (SIGSTOP) at one of imgstore.faults.PAUSE_POINTS."""
    env = {k: v for k, v in os.environ.items() if k not in ("IMGSTORE_FAULT", "IMGSTORE_DEBUG")}
    env.update(IMGSTORE_ROOT=os.fspath(root), IMGSTORE_FAULT=f"{point}:stop")
    p = subprocess.Popen([sys.executable, "-m", "imgstore", "verify", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not _stopped(p.pid):
        if p.poll() is not None:
            out, err = p.communicate()
            raise AssertionError(f"verify never reached {point}: {out}{err}")
        assert time.monotonic() < deadline, f"verify did not reach {point}"
        time.sleep(0.01)
    return p


def _resume(p: subprocess.Popen[str]) -> tuple[int, dict[str, Any], str]:
    os.kill(p.pid, signal.SIGCONT)
    out, err = p.communicate(timeout=300)
    assert "Traceback" not in err, err
    return p.returncode, json.loads(out), err


RACE_POINTS = ["verify.after-listing", "verify.after-objects", "verify.after-tree-listing"]


def test_every_pause_point_is_listed_and_raced() -> None:
    import re

    in_code = set()
    for f in (Path(__file__).parent.parent / "imgstore").glob("*.py"):
        in_code |= set(re.findall(r'faults\.pause_point\("([^"]+)"\)', f.read_text()))
    assert in_code == set(faults.PAUSE_POINTS) == set(RACE_POINTS)


@pytest.mark.parametrize("point", RACE_POINTS)
def test_verify_racing_gc_reports_only_what_live_generations_need(tmp_path: Path, cli: Cli, point: str) -> None:
    """gc removes generations (trees, then rows, then objects, rewriting packs that hold both live and dead
    objects) while verify is paused at `point`: verify must not report what gc just removed, but a truly
    missing object of a generation gc kept must still be reported."""
    assert cli("init").returncode == 0
    root = tmp_path / "store"
    write_profile(root, "t", "[commit]\ndefault_excludes = false\nrequire_kernel = false\n")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "shared").write_bytes(b"in every generation " * 50)
    n = 0

    def commit_next() -> None:
        nonlocal n
        n += 1
        for old in tree.glob("unique-*"):
            old.unlink()
        for old in tree.glob(f"small-{n - 2}"):
            old.unlink()
        (tree / f"unique-{n}").write_bytes(os.urandom(2 << 20))  # a loose object only this generation has
        # In this generation's pack and needed by the next one too: gc rewrites the pack, keeping it.
        (tree / f"small-{n}").write_bytes(b"small %d " % n * 20)
        r = cli("commit", tree, "-p", "t", "--no-kernel")
        assert r.returncode == 0, r.stderr

    def race(damage: bool) -> tuple[int, dict[str, Any], str, str]:
        for _ in range(3):
            commit_next()
        if point == "verify.after-tree-listing":
            for i in (n - 2, n - 1, n):
                assert cli("materialize", f"t@{i}").returncode == 0
        digest = ""
        if damage:  # the loose object only the generation gc keeps has, deleted for real
            listing = json.loads(cli("ls", f"t@{n}", "/", "--json").stdout)
            digest = next(e["digest"] for e in listing if e["path"] == f"unique-{n}")
            (root / "objects" / digest[:2] / digest).unlink()
        packs_before = set((root / "packs").iterdir())
        p = _verify_held_at(root, point)
        try:
            r = cli("gc", "--keep", "1", *(["--force"] if damage else []), "--json")
        finally:
            rc, rep, err = _resume(p)
        assert r.returncode == 0, r.stderr
        assert len(json.loads(r.stdout)["removed"]) >= 2
        assert packs_before - set((root / "packs").iterdir()), "gc rewrote no pack: the test races nothing"
        return rc, rep, err, digest

    rc, rep, err, _ = race(damage=False)
    assert rc == 0 and rep["ok"], (rep, err)
    assert [p for p in rep["problems"] if p["kind"] != "temp"] == []

    rc, rep, err, digest = race(damage=True)
    assert rc == 6 and not rep["ok"], rep
    bad = [(p["kind"], p["what"], p["generations"]) for p in rep["problems"] if p["kind"] != "temp"]
    assert bad == [("missing", digest, [f"t@{n}"])], bad


@pytest.mark.parametrize("at", [0, 1, 5])
def test_verify_inside_a_tree_gc_removes_meanwhile(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  at: int) -> None:
    """gc renames a materialized tree away and deletes it while verify, which takes no lock, is half-way
    through it: an entry verify has just stat'ed is gone when it reads its xattrs, opens it or hashes it.
    Not an error (the scripts/reliability.py soak saw `No such file or directory: /proc/self/fd/11/var`):
    the tree is gone, so nothing is reported."""
    import shutil

    from imgstore import generations, materialize, repair, verify
    from imgstore.scan import entry_from_stat as real

    tree = tmp_path / "tree"
    for d in ("etc", "var/lib", "usr/bin"):
        (tree / d).mkdir(parents=True)
        (tree / d / "file").write_bytes(d.encode() * 100)
    write_profile(store.root, "t", "[commit]\ndefault_excludes = false\nrequire_kernel = false\n")
    g = commit.commit(store, tree, "t", no_kernel=True).generation
    path, _ = materialize.materialize(store, g)
    seen = 0

    def gc_meanwhile(rel: bytes, abspath: bytes, st: os.stat_result) -> object:
        nonlocal seen
        seen += 1
        if seen == at + 1 and path.exists():  # what gc does: one rename, then the deletion
            gone = path.with_name(".gone")
            os.rename(path, gone)
            shutil.rmtree(gone)
        return real(rel, abspath, st)

    monkeypatch.setattr(repair, "entry_from_stat", gc_meanwhile)
    rep = verify.verify(store)
    assert seen > at and not path.exists()
    assert rep.ok and [p for p in rep.problems if p.kind != "temp"] == [], rep.problems
    with store.engine.connect() as conn:
        assert generations.resolve(conn, "t@1").gen_id == g.gen_id
