"""Strict typing and lint, run as tests; and the schema revision matches the migrations."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Cli

REPO = Path(__file__).resolve().parent.parent


def test_mypy_strict() -> None:
    if importlib.util.find_spec("mypy") is None:  # run as `python -m mypy`: the venv's bin need not be on PATH
        pytest.fail("mypy is not installed: pip install -e '.[test]'")
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "imgstore"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:]


def test_ruff() -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "imgstore", "tests", "benchmarks"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:]


def test_schema_head_matches_migrations() -> None:
    from imgstore.db import HEAD, known_revisions

    assert known_revisions()[-1] == HEAD


def test_sqlite_store_commands_do_not_import_sqlalchemy(tmp_path: Path, cli: Cli) -> None:
    """SQLAlchemy's import alone is over half of a fast command's time: a SQLite store reads and writes
    through sqlite3 (imgstore/db.py); only init and a schema upgrade need SQLAlchemy and Alembic."""
    assert cli("init").returncode == 0
    trace = {"PYTHONPROFILEIMPORTTIME": "1"}
    for args in (("node", "add", "www1", "--mac", "52:54:00:12:34:56", "-p", "web"), ("generations",),
                 ("history",)):
        r = cli(*args, env=trace)
        assert r.returncode == 0, r.stderr
        assert "sqlalchemy" not in r.stderr and "alembic" not in r.stderr, args


def test_old_store_is_upgraded_on_open(tmp_path: Path) -> None:
    """A database created by an older imgstore (revision 0001) is migrated forward, keeping its rows."""
    import os

    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    from imgstore import db

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", os.fspath(db.migrations_dir()))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text(
            "INSERT INTO generations (profile, number, gen_id, manifest, append, created, message, user, host, "
            "source, files, size, new_bytes, meta) VALUES ('web', 1, 'ab', 'cd', '', 0, 'old', 'u', 'h', 's', 0, 0, 0, "
            "'{}')"))
    engine.dispose()
    database = db.make_engine(url)
    assert db.current_revision(database) == "0001"
    db.check(database, allow_upgrade=True)
    assert db.current_revision(database) == db.HEAD
    with database.connect() as c:
        row = c.execute("SELECT message, deleted FROM generations").first()
        assert row is not None and tuple(row) == ("old", None)
    database.dispose()
