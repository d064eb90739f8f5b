"""The generations database schema (SQLAlchemy Core, engine-neutral: SQLite and PostgreSQL).

The schema is created and upgraded only by the Alembic migrations in migrations/; this module
describes it for queries. Times are UNIX seconds (float) so both engines store them alike.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

HEAD = "0002"  # the newest migration; tests check it matches migrations/versions

metadata = MetaData()

generations = Table(
    "generations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("profile", String(64), nullable=False),
    Column("number", Integer, nullable=False),
    Column("gen_id", String(64), nullable=False),
    Column("manifest", String(64), nullable=False),
    Column("kernel", String(64)),
    Column("kernel_name", Text),
    Column("initrd", String(64)),
    Column("initrd_name", Text),
    Column("append", Text, nullable=False, default=""),
    Column("created", Float, nullable=False),
    Column("message", Text, nullable=False, default=""),
    Column("user", String(64), nullable=False, default=""),
    Column("host", String(255), nullable=False, default=""),
    Column("source", Text, nullable=False, default=""),
    Column("files", Integer, nullable=False, default=0),
    Column("size", BigInteger, nullable=False, default=0),
    Column("new_bytes", BigInteger, nullable=False, default=0),
    Column("meta", Text, nullable=False, default="{}"),
    Column("deleted", Float),  # set by gc: the row stays for history and so numbers are never reused
    UniqueConstraint("profile", "number", name="uq_generations_profile_number"),
    Index("ix_generations_gen_id", "gen_id"),
)

profile_state = Table(
    "profile_state",
    metadata,
    Column("profile", String(64), primary_key=True),
    Column("active", Integer, ForeignKey("generations.id")),
    Column("updated", Float, nullable=False),
)

nodes = Table(
    "nodes",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("mac", String(17), nullable=False, unique=True),
    Column("ip", String(64)),
    Column("profile", String(64), nullable=False),
    Column("pinned", Integer, ForeignKey("generations.id")),
    Column("created", Float, nullable=False),
)

activations = Table(
    "activations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("profile", String(64), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("node", String(63)),
    Column("from_gen", Integer, ForeignKey("generations.id")),
    Column("to_gen", Integer, ForeignKey("generations.id")),
    Column("user", String(64), nullable=False, default=""),
    Column("host", String(255), nullable=False, default=""),
    Column("nodes", Text, nullable=False, default="[]"),
)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("user", String(64), nullable=False, default=""),
    Column("host", String(255), nullable=False, default=""),
    Column("command", String(32), nullable=False),
    Column("argv", Text, nullable=False, default=""),
    Column("profile", String(64)),
    Column("node", String(63)),
    Column("generation", String(64)),
    Column("result", String(16), nullable=False),
    Column("detail", Text, nullable=False, default=""),
    Index("ix_events_at", "at"),
)
