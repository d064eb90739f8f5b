"""Opening the generations database: SQLite in the store by default, PostgreSQL by URL.

The schema is created and upgraded only through Alembic (migrations/). Opening checks the schema
revision with one query and runs Alembic only when the store is behind, so everyday commands do not
pay for importing it; a database migrated by a newer imgstore is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DatabaseError, OperationalError, ProgrammingError

from .errors import ImgstoreError, NoSpace, StoreError
from .schema import HEAD


def migrations_dir() -> Path:
    import imgstore._migrations as m

    return Path(os.path.dirname(m.__file__ or ""))


def known_revisions() -> list[str]:
    return sorted(p.name.split("_")[0] for p in (migrations_dir() / "versions").glob("[0-9]*_*.py"))


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed row survives power loss before the visible switch that follows it.
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
    except (OperationalError, ProgrammingError) as exc:
        msg = str(exc.orig).lower()
        if "no such table" in msg or "does not exist" in msg or "undefinedtable" in msg:
            return None
        raise database_error(engine, exc) from None
    except DatabaseError as exc:
        raise database_error(engine, exc) from None
    return row[0] if row else None


def database_error(engine: Engine, exc: Exception) -> ImgstoreError:
    reason = str(getattr(exc, "orig", exc)).splitlines()[0]
    full = is_disk_full(engine, reason)
    if full is not None:
        return full
    return StoreError(
        f"the database {engine.url.render_as_string(hide_password=True)} cannot be used: {reason}",
        "restore it from a backup, or see docs/troubleshooting.md (imgstore verify checks the objects)",
    )


def upgrade(engine: Engine) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", os.fspath(migrations_dir()))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def check(engine: Engine, allow_upgrade: bool) -> None:
    """Make sure the schema is at HEAD: upgrade when behind (if allowed), refuse when ahead."""
    rev = current_revision(engine)
    if rev == HEAD:
        return
    if rev is not None and rev not in known_revisions():
        raise StoreError(
            f"the database was migrated by a newer imgstore (schema revision {rev}, this one knows up to {HEAD})",
            "upgrade imgstore on this machine",
        )
    if rev is None and not allow_upgrade:
        raise StoreError(
            f"the database {engine.url.render_as_string(hide_password=True)} has no imgstore schema",
            "run: imgstore init (or restore the database from a backup)",
        )
    upgrade(engine)


def is_disk_full(engine: Engine, reason: str) -> NoSpace | None:
    """SQLite says "database or disk is full", or "disk I/O error" when its journal cannot grow: on a full
    disk, both mean no space, and the advice must not be to restore a backup."""
    db = engine.url.database
    if not engine.url.get_backend_name().startswith("sqlite") or not db:
        return None
    folder = os.path.dirname(os.path.abspath(db))
    try:
        free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    except OSError:
        free = 0
    if "full" in reason or ("disk I/O error" in reason and free < (4 << 20)):
        from .durable import no_space

        return no_space(db)
    return None
