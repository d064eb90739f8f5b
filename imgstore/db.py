"""Opening the generations database: SQLite in the store by default, PostgreSQL by URL.

Every query is plain SQL with named parameters (`:name`), written once and run by both engines: SQLite
through the standard library's sqlite3, anything else (PostgreSQL) through SQLAlchemy's `text()`.
Importing SQLAlchemy costs about 0.19 s, more than half of a whole 1,000-node `imgstore rollback`, so a
SQLite store never imports it on an ordinary command.

The schema is created and upgraded only through Alembic (migrations/), the one place that needs
SQLAlchemy on SQLite too. Opening checks the schema revision with one query and runs Alembic only when
the store is behind; a database migrated by a newer imgstore is refused.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ImgstoreError, NoSpace, StoreError

if TYPE_CHECKING:
    from sqlalchemy import Engine

HEAD = "0002"  # the newest migration; tests check it matches migrations/versions

Params = Mapping[str, Any]
# Every SQLite connection, whichever library opens it. synchronous=FULL: a committed row survives power loss
# before the visible switch that follows it.
SQLITE_PRAGMAS = ("foreign_keys=ON", "journal_mode=WAL", "synchronous=FULL")


class Row(Protocol):
    """A result row: by position (row[0]) or by column name (row["name"])."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def keys(self) -> list[str]: ...


class Result:
    """The rows of one statement: iterate them, or take first(), scalar() or all()."""

    def __init__(self, rows: Iterator[Row], close: Callable[[], object]) -> None:
        self._rows, self._close = rows, close

    def __iter__(self) -> Iterator[Row]:
        return self._rows

    def first(self) -> Row | None:
        try:
            return next(self._rows, None)
        finally:
            self._close()  # a statement left open would hold SQLite's COMMIT back (INSERT ... RETURNING)

    def scalar(self) -> Any:
        row = self.first()
        return None if row is None else row[0]

    def all(self) -> list[Row]:
        return list(self._rows)


class Connection:
    """A connection lent by Database.connect() (reads) or Database.begin() (one transaction)."""

    def execute(self, sql: str, params: Params | None = None) -> Result:
        raise NotImplementedError


class Database:
    """What `Store.engine` is: connect() for reads, begin() for a transaction that commits on success
    and rolls back on an exception."""

    url: str
    path: str | None = None  # the SQLite file
    errors: tuple[type[Exception], ...] = ()  # what this engine raises for a database failure

    def connect(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def begin(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def dispose(self) -> None:
        raise NotImplementedError

    @property
    def display(self) -> str:
        """The URL as error messages show it (no password)."""
        return self.url


# -- SQLite: the standard library -----------------------------------------------------------------
class _SqliteConnection(Connection):
    def __init__(self, raw: sqlite3.Connection) -> None:
        self._raw = raw

    def execute(self, sql: str, params: Params | None = None) -> Result:
        cur = self._raw.execute(sql, params or {})
        return Result(cur, cur.close)


class SqliteDatabase(Database):
    errors = (sqlite3.Error,)

    def __init__(self, url: str, path: str) -> None:
        self.url, self.path = url, path
        self._idle: list[sqlite3.Connection] = []  # a nested connect() or begin() gets its own connection

    def _open(self) -> sqlite3.Connection:
        path = self.path or ""
        # isolation_level=None: sqlite3 issues no BEGIN of its own; begin() below does.
        raw = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        try:
            raw.row_factory = sqlite3.Row
            for pragma in SQLITE_PRAGMAS:
                raw.execute(f"PRAGMA {pragma}")
        except BaseException:
            raw.close()
            raise
        return raw

    @contextmanager
    def _lease(self) -> Iterator[sqlite3.Connection]:
        raw = self._idle.pop() if self._idle else self._open()
        try:
            yield raw
        finally:
            if raw.in_transaction:  # a ROLLBACK that failed: do not lend it out again
                raw.close()
            else:
                self._idle.append(raw)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with self._lease() as raw:
            yield _SqliteConnection(raw)

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        with self._lease() as raw:
            # IMMEDIATE: take the write lock now (waiting up to the timeout), so a transaction that reads
            # and then writes cannot fail with "database is locked" halfway through.
            raw.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteConnection(raw)
                raw.execute("COMMIT")
            finally:
                if raw.in_transaction:
                    try:
                        raw.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # SQLite may have rolled back itself (a full disk); the first error is the one to see

    def dispose(self) -> None:
        while self._idle:
            self._idle.pop().close()


# -- everything else: SQLAlchemy --------------------------------------------------------------------
class _SqlAlchemyRow:
    __slots__ = ("_row",)

    def __init__(self, row: Any) -> None:
        self._row = row

    def __getitem__(self, key: int | str, /) -> Any:
        return self._row._mapping[key] if isinstance(key, str) else self._row[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._row)

    def __len__(self) -> int:
        return len(self._row)

    def keys(self) -> list[str]:
        return list(self._row._fields)


class _SqlAlchemyConnection(Connection):
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Params | None = None) -> Result:
        from sqlalchemy import text

        res = self._conn.execute(text(sql), dict(params or {}))
        if not res.returns_rows:
            return Result(iter(()), res.close)
        return Result((_SqlAlchemyRow(r) for r in res), res.close)


class SqlAlchemyDatabase(Database):
    def __init__(self, url: str) -> None:
        from sqlalchemy.exc import DBAPIError

        self.url = url
        self.engine = sqlalchemy_engine(url)
        self.errors = (DBAPIError,)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield _SqlAlchemyConnection(conn)

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield _SqlAlchemyConnection(conn)

    def dispose(self) -> None:
        self.engine.dispose()

    @property
    def display(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)


def sqlalchemy_engine(url: str) -> Engine:
    from sqlalchemy import create_engine, event

    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        for pragma in SQLITE_PRAGMAS:
            dbapi_conn.execute(f"PRAGMA {pragma}")

    return engine


# -- opening --------------------------------------------------------------------------------------
def make_engine(url: str) -> Database:
    """The database at `url`; nothing is opened until the first connect() or begin()."""
    scheme, sep, rest = url.partition("://")
    if sep and (scheme == "sqlite" or scheme.startswith("sqlite+")):
        return SqliteDatabase(url, rest[1:])  # sqlite:///rel.db, sqlite:////abs/path.db, as SQLAlchemy reads them
    return SqlAlchemyDatabase(url)


def where(*conditions: str | None) -> str:
    """" WHERE a AND b" for the conditions given (None skipped), "" for none."""
    given = [c for c in conditions if c]
    return " WHERE " + " AND ".join(given) if given else ""


def migrations_dir() -> Path:
    import imgstore._migrations as m

    return Path(os.path.dirname(m.__file__ or ""))


def known_revisions() -> list[str]:
    return sorted(p.name.split("_")[0] for p in (migrations_dir() / "versions").glob("[0-9]*_*.py"))


def current_revision(database: Database) -> str | None:
    try:
        with database.connect() as conn:
            row = conn.execute("SELECT version_num FROM alembic_version").first()
    except database.errors as exc:
        msg = _reason(exc).lower()
        if "no such table" in msg or "does not exist" in msg or "undefinedtable" in msg:
            return None
        raise database_error(database, exc) from None
    return row[0] if row else None


def _reason(exc: Exception) -> str:
    return (str(getattr(exc, "orig", exc)).splitlines() or [type(exc).__name__])[0]


def database_error(database: Database, exc: Exception) -> ImgstoreError:
    reason = _reason(exc)
    full = is_disk_full(database, reason)
    if full is not None:
        return full
    return StoreError(
        f"the database {database.display} cannot be used: {reason}",
        "restore it from a backup, or see docs/troubleshooting.md (imgstore verify checks the objects)",
    )


def upgrade(database: Database) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", os.fspath(migrations_dir()))
    engine = database.engine if isinstance(database, SqlAlchemyDatabase) else sqlalchemy_engine(database.url)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    finally:
        if engine is not getattr(database, "engine", None):
            engine.dispose()


def check(database: Database, allow_upgrade: bool) -> None:
    """Make sure the schema is at HEAD: upgrade when behind (if allowed), refuse when ahead."""
    rev = current_revision(database)
    if rev == HEAD:
        return
    if rev is not None and rev not in known_revisions():
        raise StoreError(
            f"the database was migrated by a newer imgstore (schema revision {rev}, this one knows up to {HEAD})",
            "upgrade imgstore on this machine",
        )
    if rev is None and not allow_upgrade:
        raise StoreError(
            f"the database {database.display} has no imgstore schema",
            "run: imgstore init (or restore the database from a backup)",
        )
    upgrade(database)


def is_disk_full(database: Database, reason: str) -> NoSpace | None:
    """SQLite says "database or disk is full", or "disk I/O error" when its journal cannot grow: on a full
    disk, both mean no space, and the advice must not be to restore a backup."""
    db = database.path
    if not db:
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
