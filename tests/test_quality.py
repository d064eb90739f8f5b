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
