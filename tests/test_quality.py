"""Strict typing and lint, run as tests; and the schema revision matches the migrations."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_mypy_strict() -> None:
    if shutil.which("mypy") is None:
        pytest.fail("mypy is not installed: pip install -e '.[test]'")
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "imgstore"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:]


def test_ruff() -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "imgstore", "tests", "benchmarks"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:]


def test_schema_head_matches_migrations() -> None:
    from imgstore.db import known_revisions
    from imgstore.schema import HEAD

    assert known_revisions()[-1] == HEAD


def test_migrations_create_exactly_the_schema(tmp_path: Path) -> None:
    """The Alembic migrations and schema.py describe the same tables and columns."""
    from sqlalchemy import create_engine, inspect

    from imgstore import db
    from imgstore.schema import metadata

    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    db.upgrade(engine)
    insp = inspect(engine)
    for table in metadata.sorted_tables:
        cols = {c["name"] for c in insp.get_columns(table.name)}
        assert cols == {c.name for c in table.columns}, table.name


def test_old_store_is_upgraded_on_open(tmp_path: Path) -> None:
    """A database created by an older imgstore (revision 0001) is migrated forward, keeping its rows."""
    import os

    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    from imgstore import db
    from imgstore.schema import HEAD

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
    assert db.current_revision(engine) == "0001"
    db.check(engine, allow_upgrade=True)
    assert db.current_revision(engine) == HEAD
    with engine.connect() as conn:
        assert conn.execute(text("SELECT message, deleted FROM generations")).one() == ("old", None)
