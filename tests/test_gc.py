"""gc: keeps every root, removes the rest in reverse write order, frees space, refuses a damaged store."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import Cli
from test_deploy import PROFILE, _chroot


def _store_with_history(tmp_path: Path, cli: Cli, n: int = 6) -> Path:
    assert cli("init").returncode == 0
    store = tmp_path / "store"
    (store / "profiles/web.toml").write_text(PROFILE)
    tree = _chroot(tmp_path / "chroot", "x")
    for i in range(1, n + 1):
        (tree / "etc/motd").write_text(f"gen {i}\n")
        for old in (tree / "etc").glob("unique-*"):
            old.unlink()
        (tree / f"etc/unique-{i}").write_bytes(os.urandom(2 << 20))  # a loose object per generation
        assert cli("commit", tree, "-p", "web", "-m", f"gen {i}").returncode == 0
    assert cli("node", "add", "www1", "--mac", "52:54:00:00:00:01", "-p", "web").returncode == 0
    assert cli("node", "add", "www2", "--mac", "52:54:00:00:00:02", "-p", "web").returncode == 0
    return store


def test_gc_keeps_roots_and_frees_the_rest(tmp_path: Path, cli: Cli) -> None:
    store = _store_with_history(tmp_path, cli)
    assert cli("rollout", "web@2").returncode == 0
    assert cli("rollout", "web@3").returncode == 0  # active 3, rollback target 2
    assert cli("pin", "www2", "web@1").returncode == 0  # pinned: kept
    r = cli("gc", "--keep", "1", "--dry-run", "--json")
    plan = json.loads(r.stdout)
    assert plan["removed"] == ["web@4", "web@5"] and plan["dry_run"]
    assert cli("verify").returncode == 0
    before = sum(f.stat().st_size for f in (store / "objects").rglob("*") if f.is_file())
    r = cli("gc", "--keep", "1", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["removed"] == ["web@4", "web@5"] and res["bytes_freed"] > 4 << 20
    after = sum(f.stat().st_size for f in (store / "objects").rglob("*") if f.is_file())
    assert before - after > 4 << 20
    assert cli("verify").returncode == 0  # nothing a kept generation needs is gone
    assert cli("status").returncode == 0
    gens = [g["ref"] for g in json.loads(cli("generations", "--json").stdout)]
    assert gens == ["web@1", "web@2", "web@3", "web@6"]
    r = cli("show", "web@4")
    assert r.returncode == 3 and "removed by gc" in r.stderr
    assert cli("checkout", "web@1", tmp_path / "co").returncode == 0
    assert (tmp_path / "co/etc/motd").read_text() == "gen 1\n"
    assert json.loads(cli("rollback", "--json").stdout)["to_ref"] == "web@2"
    # Numbers are never reused.
    tree = tmp_path / "chroot"
    (tree / "etc/motd").write_text("gen 7\n")
    assert json.loads(cli("commit", tree, "-p", "web", "--json").stdout)["generation"]["ref"] == "web@7"


def test_gc_removes_trees_and_tftp_files_of_removed_generations(tmp_path: Path, cli: Cli) -> None:
    store = _store_with_history(tmp_path, cli, 3)
    assert cli("rollout", "web@1").returncode == 0
    assert cli("rollout", "web@2").returncode == 0
    assert cli("rollout", "web@3").returncode == 0
    g1 = json.loads(cli("show", "web@1", "--json").stdout)
    assert (store / f"{g1['gen_id']}-web-rootfs").is_dir()
    assert cli("gc", "--keep", "0").returncode == 0
    assert not (store / f"{g1['gen_id']}-web-rootfs").exists()
    assert not (store / "tftpboot/imgstore/web" / g1["gen_id"]).exists()
    assert cli("status").returncode == 0 and cli("verify").returncode == 0


def test_gc_older_than(tmp_path: Path, cli: Cli) -> None:
    _store_with_history(tmp_path, cli, 3)
    r = cli("gc", "--keep", "0", "--older-than", "30d", "--json")
    assert json.loads(r.stdout)["removed"] == []
    r = cli("gc", "--older-than", "soon")
    assert r.returncode == 2 and "duration" in r.stderr


def test_gc_refuses_store_with_missing_objects(tmp_path: Path, cli: Cli) -> None:
    store = _store_with_history(tmp_path, cli, 3)
    victim = next(p for p in (store / "objects").rglob("*") if p.is_file())
    victim.unlink()
    r = cli("gc", "--keep", "0")
    assert r.returncode == 6 and "gc --force" in r.stderr
    assert cli("gc", "--keep", "0", "--force").returncode == 0
