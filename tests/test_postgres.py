"""The same store on PostgreSQL (the multi-server option): init, commit, deploy, status, verify, refusal
of a newer schema. Needs IMGSTORE_TEST_PG_URL (scripts/test.sh starts a server and sets it)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Cli

pytestmark = pytest.mark.postgres

PG = os.environ.get("IMGSTORE_TEST_PG_URL")


@pytest.fixture
def pg_url() -> Iterator[str]:
    if not PG:
        if os.geteuid() == 0:
            pytest.fail("IMGSTORE_TEST_PG_URL is not set: run the suite through scripts/test.sh")
        pytest.skip("IMGSTORE_TEST_PG_URL is not set (scripts/test.sh starts PostgreSQL as root)")
    from sqlalchemy import create_engine, text

    name = f"imgstore_test_{secrets.token_hex(4)}"
    admin = create_engine(PG, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG.rsplit("/", 1)[0] + "/" + name
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def test_full_story_on_postgres(pg_url: str, tmp_path: Path, cli: Cli) -> None:
    r = cli("init", "--database", pg_url)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "store/imgstore.db").exists()
    (tmp_path / "store/profiles/web.toml").write_text(
        '[deploy]\ntftp_root = "tftpboot"\nroot_link = "netboot/root"\nserve_default = true\n')
    tree = tmp_path / "chroot"
    (tree / "boot").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "boot/vmlinuz-6.1.0-1-amd64").write_bytes(b"K" * 100)
    (tree / "etc/motd").write_text("one")
    assert cli("commit", tree, "-p", "web", "-m", "one").returncode == 0
    (tree / "etc/motd").write_text("two")
    assert cli("commit", tree, "-p", "web", "-m", "two").returncode == 0
    assert "nothing changed" in cli("commit", tree, "-p", "web").stdout
    gens = json.loads(cli("generations", "--json").stdout)
    assert [g["ref"] for g in gens] == ["web@1", "web@2"]
    assert json.loads(cli("show", gens[1]["gen_id"][:8], "--json").stdout)["number"] == 2
    assert cli("node", "add", "www3", "--mac", "52:54:00:12:34:56", "-p", "web").returncode == 0
    r = cli("node", "add", "www4", "--mac", "52:54:00:12:34:56", "-p", "web")
    assert r.returncode == 8
    assert cli("rollout", "web@1").returncode == 0
    assert cli("rollout", "--canary", "www3").returncode == 0
    assert cli("rollout").returncode == 0
    assert json.loads(cli("rollback", "--json").stdout)["to_ref"] == "web@1"
    assert [h["kind"] for h in json.loads(cli("history", "--json").stdout)] == [
        "rollout", "canary", "rollout", "rollback"]
    assert cli("status").returncode == 0
    assert cli("verify").returncode == 0


def test_newer_schema_refused_on_postgres(pg_url: str, tmp_path: Path, cli: Cli) -> None:
    assert cli("init", "--database", pg_url).returncode == 0
    from sqlalchemy import create_engine, text

    e = create_engine(pg_url)
    with e.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    e.dispose()
    r = cli("generations")
    assert r.returncode == 5 and "newer imgstore" in r.stderr


def test_unreachable_database_is_a_clean_error(tmp_path: Path, cli: Cli) -> None:
    assert cli("init").returncode == 0
    cfg = tmp_path / "store/imgstore.toml"
    cfg.write_text(cfg.read_text() + 'database = "postgresql+psycopg://nobody:x@127.0.0.1:1/none"\n')
    r = cli("generations")
    assert r.returncode == 5 and "cannot be used" in r.stderr and "Traceback" not in r.stderr
