"""imgstore log: every change is recorded with who, where, the command line and the result."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import Cli
from test_deploy import PROFILE, _chroot


def test_log_records_changes_with_filters(tmp_path: Path, cli: Cli) -> None:
    assert cli("init").returncode == 0
    (tmp_path / "store/profiles/web.toml").write_text(PROFILE)
    tree = _chroot(tmp_path / "chroot", "one")
    assert cli("commit", tree, "-p", "web", "-m", "first").returncode == 0
    (tree / "etc/motd").write_text("two")
    assert cli("commit", tree, "-p", "web").returncode == 0
    assert cli("node", "add", "www3", "--mac", "52:54:00:12:34:56", "-p", "web").returncode == 0
    assert cli("rollout", "web@1").returncode == 0
    assert cli("rollout", "--canary", "www3").returncode == 0
    assert cli("rollout", "--dry-run").returncode == 0  # a dry run changes nothing: not logged
    assert cli("rollback", "--node", "www3").returncode == 0
    assert cli("rollout", "web@9").returncode == 3  # bad input changes nothing, not even the log
    import os

    victim = next(p for p in (tmp_path / "store/objects").rglob("*") if p.is_file())
    os.rename(victim, tmp_path / "saved-object")
    assert cli("checkout", "web@1", tmp_path / "co").returncode == 6  # a failure of the work itself is logged
    os.rename(tmp_path / "saved-object", victim)
    assert cli("generations").returncode == 0  # read-only: not logged
    assert cli("gc", "--keep", "5").returncode == 0
    rows = json.loads(cli("log", "--json").stdout)
    assert rows[0]["command"] == "init"
    rows = rows[1:]
    assert [r["command"] for r in rows] == ["commit", "commit", "node add", "rollout", "rollout", "rollback",
                                           "checkout", "gc"]
    assert rows[0]["profile"] == "web" and rows[0]["generation"] == "web@1" and rows[0]["result"] == "ok"
    assert rows[4]["node"] == "www3" and rows[4]["generation"] == "web@2"
    assert rows[6]["result"] == "error 6" and "missing" in rows[6]["detail"]
    assert rows[3]["argv"] == "imgstore rollout web@1" and rows[3]["user"] and rows[3]["host"]
    node_rows = json.loads(cli("log", "--node", "www3", "--json").stdout)
    assert [r["command"] for r in node_rows] == ["node add", "rollout", "rollback"]
    assert json.loads(cli("log", "--since", "1h", "--json").stdout)[1:] == rows
    assert json.loads(cli("log", "--until", "2000-01-01", "--json").stdout) == []
    assert len(json.loads(cli("log", "--limit", "2", "--json").stdout)) == 2
    r = cli("log", "--since", "yesterday-ish")
    assert r.returncode == 2 and "--since" in r.stderr
    assert "rollout" in cli("log", "-p", "web").stdout
