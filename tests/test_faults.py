"""Crashes and damage: a command killed at any fault point leaves the old state or the new one, never a mix,
never a lost object; damaged storage is detected and refused before anything is touched.

Every command runs as a real process (IMGSTORE_FAULT=<point>:kill makes it SIGKILL itself there). The
"after" state each kill is compared with is what a clean run of the same command produces in a twin
store built from the same chroots. The machinery (fleet, visible state, invariants, damage) is shared
with the soak, scripts/reliability.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from treeutil import diff_snapshots, snapshot

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(REPO / "scripts"))

import reliability as rel  # noqa: E402

# Which point each command is also crashed at with `raise` (an unexpected exception, not a kill).
RAISE_AT = {
    "commit": "commit.after-manifest",
    "materialize": "materialize.before-sync",
    "rollout": "deploy.before-switch",
    "rollback": "rollback.before-row",
    "rollback-to": "apply.before-link",
    "gc": "gc.after-rows",
}
CASES = [(sc, p, "kill") for sc in rel.SCENARIOS for p in rel.SCENARIO_POINTS[sc]] + [
    (sc, p, "raise") for sc, p in RAISE_AT.items()]

# A known bug, checked strictly: each case listed must still show it (so a fix makes the test fail until
# the entry is removed), and no other case may. Temp packs and loose-object temps in packs/ and objects/
# are removed by nothing but `verify --repair`; a re-run commit leaves them (imgstore/commit.py).
KNOWN_TEMP_LEAKS: set[tuple[str, str, str]] = set()  # fixed: commit discards what a killed command left

State = tuple[dict[str, bytes | None], dict[str, rel.DbGen]]


@pytest.fixture(scope="module")
def chroots(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return rel.make_chroots(tmp_path_factory.mktemp("chroots"))


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory, chroots: list[Path]) -> Callable[[str], State]:
    """The visible state and generations a clean run of a scenario's command ends in (in a twin store)."""
    cache: dict[str, State] = {}

    def get(scenario: str) -> State:
        if scenario not in cache:
            root = tmp_path_factory.mktemp(f"twin-{scenario}") / "store"
            rel.build_fleet(root, chroots, scenario)
            r = rel.cli(root, *rel.scenario_args(scenario, chroots))
            assert r.returncode == 0, r.stderr
            cache[scenario] = (rel.visible(root), rel.db_gens(root))
        return cache[scenario]

    return get


def _verify_ok(root: Path) -> None:
    """`imgstore verify` exits 0; temp files a crash left are allowed (reported as kind "temp")."""
    r = rel.cli(root, "verify", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [p for p in json.loads(r.stdout)["problems"] if p["kind"] != "temp"] == []


def _ids(case: tuple[str, str, str]) -> str:
    return "-".join(case)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_crash_at_fault_point(case: tuple[str, str, str], chroots: list[Path], clean_run: Callable[[str], State],
                              tmp_path: Path) -> None:
    scenario, point, how = case
    root = tmp_path / "store"
    rel.build_fleet(root, chroots, scenario)
    args = rel.scenario_args(scenario, chroots)
    before, gens_before = rel.visible(root), rel.db_gens(root)
    after, gens_after = clean_run(scenario)
    assert before != after or scenario in ("commit", "materialize", "gc")

    r = rel.cli(root, *args, fault=f"{point}:{how}")
    if how == "kill":
        assert r.returncode == rel.KILLED, f"{point} is not on the path of imgstore {' '.join(args)}: {r.stderr}"
    else:
        assert rel.clean_failure(r, 1) is None and f"injected fault at {point}" in r.stderr, r.stderr

    # At the moment of the crash: each visible item whole, as before or as after; nothing missing.
    mid = rel.visible(root)
    assert rel.torn(mid, before, after) == []
    _verify_ok(root)
    assert rel.check_store(root) == []
    gens_mid = rel.db_gens(root)
    assert gens_mid in (gens_before, gens_after)

    # Running the command again succeeds (a plain rollback resumes, it does not roll back twice), ends where
    # a clean run ends, and removes the temp files.
    r = rel.cli(root, *args)
    assert r.returncode == 0, r.stderr
    assert rel.visible(root) == after
    assert rel.db_gens(root) == gens_after
    assert rel.check_store(root) == []
    left = rel.temps(root)
    if case in KNOWN_TEMP_LEAKS:
        assert left, "temp files are cleaned now: remove the case from KNOWN_TEMP_LEAKS"
        assert all(x.startswith(("packs/", "objects/")) for x in left), left
    else:
        assert left == []
    if left:
        pytest.xfail(f"known bug: a re-run {scenario} does not remove {left}")


@pytest.mark.parametrize("command", ["materialize", "rollout"])
def test_stale_staging_tree_is_discarded_not_reused(command: str, chroots: list[Path], tmp_path: Path) -> None:
    """A staging tree left by an earlier crash, with wrong content, under the very name materialize would use."""
    root = tmp_path / "store"
    rel.build_fleet(root, chroots)
    gid = json.loads(rel.cli(root, "show", "web@3", "--json").stdout)["gen_id"]
    planted = [root / f".imgstore-tmp-{gid[:16]}-web-rootfs", root / ".imgstore-tmp-0123456789abcdef-web-rootfs"]
    for p in planted:
        assert rel.cli(root, "checkout", "web@3", p).returncode == 0
        os.chmod(p / "etc", 0o755)
        (p / "etc/motd").unlink()
        (p / "etc/motd").write_text("stale content from a crash\n")
        (p / "etc/extra").write_text("not in web@3\n")
        (p / "usr/lib/small-00").unlink()
        for dirpath, dirnames, _ in os.walk(p):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o555)  # as read-only as a finished tree
    r = rel.cli(root, *(["materialize", "web@3"] if command == "materialize" else ["rollout", "web@3"]))
    assert r.returncode == 0, r.stderr
    tree = root / f"{gid}-web-rootfs"
    assert rel.cli(root, "checkout", "web@3", tmp_path / "co").returncode == 0
    strip = lambda s: {k: {a: b for a, b in v.items() if a != "link_group"} for k, v in s.items()}  # noqa: E731
    assert diff_snapshots(strip(snapshot(tmp_path / "co")), strip(snapshot(tree))) == []
    assert not any(p.exists() for p in planted)
    assert rel.temps(root) == []
    assert rel.check_store(root) == []
    if command == "rollout":
        assert os.readlink(root / "netboot/root") == os.fspath(tree)


@pytest.mark.slow
def test_gc_killed_while_removing_a_tree(tmp_path: Path) -> None:
    """SIGKILL while gc deletes a doomed generation's tree. The row is marked removed only after the trees are
    gone, so the generation is still live: its tree must be whole or absent, never half deleted under its
    final name, which the next rollout of it would serve as it is. (The soak found this; gc now renames the
    tree out of sight before deleting it.)"""
    chroots = rel.make_chroots(tmp_path / "chroots", many=4000)
    root = tmp_path / "store"
    rel.build_fleet(root, chroots, "gc")
    tree = root / f"{rel.db_gens(root)['web@3'].gen_id}-web-rootfs"
    many = tree / "usr/lib/many"
    proc = rel.spawn(root, "gc", "--keep", "1")
    while proc.poll() is None:
        try:
            if len(os.listdir(many)) < 4000:
                break
        except FileNotFoundError:
            break
    proc.kill()
    proc.communicate()
    assert proc.returncode == rel.KILLED, "gc finished before the kill: make its tree bigger"
    assert not rel.db_gens(root)["web@3"].deleted
    assert rel.check_store(root) == []  # the tree under its name, if any, is whole
    r = rel.cli(root, "gc", "--keep", "1")
    assert r.returncode == 0, r.stderr
    assert rel.check_store(root) == [] and rel.temps(root) == []
    assert not tree.exists() and rel.db_gens(root)["web@3"].deleted


def _changed(a: dict[str, object], b: dict[str, object]) -> list[str]:
    """Paths that differ between two store states."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


@pytest.mark.parametrize("kind", rel.OBJECT_DAMAGE)
def test_damaged_object(kind: str, chroots: list[Path], tmp_path: Path) -> None:
    """Content only web@3 needs is damaged: verify names web@3 alone; every way to deploy or check out web@3
    fails with one line and exit code 6 before touching anything; web@1 and web@2 keep working."""
    root = tmp_path / "store"
    rel.build_fleet(root, chroots)
    rel.damage_objects(root, kind)
    r = rel.cli(root, "verify", "--json")
    assert r.returncode == 6 and "Traceback" not in r.stderr, r.stderr
    named = {g for p in json.loads(r.stdout)["problems"] if p["kind"] != "temp" for g in p["generations"]}
    assert named == {"web@3"}
    r = rel.cli(root, "verify")
    assert r.returncode == 6 and "web@3" in r.stdout and "Traceback" not in r.stdout + r.stderr

    before, state = rel.visible(root), rel.store_state(root)
    tree3 = root / f"{rel.db_gens(root)['web@3'].gen_id}-web-rootfs"
    for args in (["rollout", "web@3"], ["rollback", "--to", "web@3"], ["materialize", "web@3"],
                 ["pin", "www1", "web@3"], ["rollout", "--canary", "www3", "web@3"]):
        r = rel.cli(root, *args)
        assert rel.clean_failure(r, 6) is None, (args, r.stderr)
        assert rel.visible(root) == before, args
        assert not tree3.exists() and not [t for t in rel.temps(root) if t.endswith("-rootfs")], args
        assert _changed(state, rel.store_state(root)) == [], args

    dest = tmp_path / "co3"
    r = rel.cli(root, "checkout", "web@3", dest)
    assert rel.clean_failure(r, 6) is None, r.stderr
    assert not dest.exists()

    # Unaffected generations keep working, and the next command cleans what the failures left.
    r = rel.cli(root, "rollout", "web@1")
    assert r.returncode == 0, r.stderr
    assert os.readlink(root / "netboot/root") == os.fspath(root / f"{rel.db_gens(root)['web@1'].gen_id}-web-rootfs")
    assert rel.temps(root) == []
    assert rel.cli(root, "checkout", "web@2", tmp_path / "co2").returncode == 0
    assert diff_snapshots(snapshot(chroots[1]), snapshot(tmp_path / "co2")) == []
    assert rel.cli(root, "cat", "web@1", "/etc/motd").stdout == "generation 1\n"
    assert rel.check_store_unaffected(root) == []
    assert rel.cli(root, "status").returncode == 0


@pytest.mark.parametrize("kind", rel.DB_DAMAGE)
def test_damaged_database(kind: str, chroots: list[Path], tmp_path: Path) -> None:
    """Every command refuses a garbage, truncated, deleted or newer database with one line and exit code 5,
    and changes nothing."""
    root = tmp_path / "store"
    rel.build_fleet(root, chroots)
    before, state = rel.visible(root), rel.store_state(root)
    rel.damage_database(root, kind)
    word = {"db-newer": "newer imgstore", "db-deleted": "missing"}.get(kind, "cannot be used")
    dest = tmp_path / "co"
    for args in (["generations"], ["show", "web@1"], ["rollout", "web@3"], ["rollback"], ["materialize", "web@3"],
                 ["commit", chroots[3], "-p", "web"], ["gc"], ["verify"], ["checkout", "web@1", dest], ["status"],
                 ["node", "add", "www9", "--mac", "52:54:00:00:00:09", "-p", "web"], ["sync"]):
        r = rel.cli(root, *args)
        assert rel.clean_failure(r, 5) is None, (args, r.stderr)
        assert word in r.stderr, (args, r.stderr)
    assert rel.visible(root) == before
    assert not dest.exists()
    assert {k: v for k, v in rel.store_state(root).items() if k != "<database>"} == {
        k: v for k, v in state.items() if k != "<database>"}


def test_every_fault_point_is_exercised() -> None:
    """Each fault point in the code is crashed at by a test here, and every point listed still exists."""
    import re

    in_code = set()
    for f in (REPO / "imgstore").glob("*.py"):
        in_code |= set(re.findall(r'faults\.point\("([^"]+)"\)', f.read_text()))
    listed = {p for ps in rel.FAULT_POINTS.values() for p in ps}
    tested = {p for _, p, how in CASES if how == "kill"}
    assert listed == in_code, (sorted(in_code - listed), sorted(listed - in_code))
    assert tested == in_code


@pytest.mark.slow
def test_reliability_soak_quick(tmp_path: Path) -> None:
    """scripts/reliability.py --quick: about 30 random kills, concurrency, bad input, corruption."""
    r = subprocess.run([sys.executable, os.fspath(REPO / "scripts/reliability.py"), "--quick", "--seed", "1",
                        "--workdir", os.fspath(tmp_path)], capture_output=True, text=True, timeout=600)
    assert "data lost: 0" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "invariant violations: 0" in r.stdout, r.stdout[-3000:]
    assert r.returncode == 0, r.stderr[-3000:]
    kills = int(r.stdout.split("### Kills survived: ")[1].split()[0])
    assert kills >= 30
