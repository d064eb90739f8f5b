"""initial schema: generations, profile state, nodes, activations, audit events

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "generations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("gen_id", sa.String(64), nullable=False),
        sa.Column("manifest", sa.String(64), nullable=False),
        sa.Column("kernel", sa.String(64)),
        sa.Column("kernel_name", sa.Text),
        sa.Column("initrd", sa.String(64)),
        sa.Column("initrd_name", sa.Text),
        sa.Column("append", sa.Text, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("files", sa.Integer, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("new_bytes", sa.BigInteger, nullable=False),
        sa.Column("meta", sa.Text, nullable=False),
        sa.UniqueConstraint("profile", "number", name="uq_generations_profile_number"),
    )
    op.create_index("ix_generations_gen_id", "generations", ["gen_id"])
    op.create_table(
        "profile_state",
        sa.Column("profile", sa.String(64), primary_key=True),
        sa.Column("active", sa.Integer, sa.ForeignKey("generations.id")),
        sa.Column("updated", sa.Float, nullable=False),
    )
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("mac", sa.String(17), nullable=False, unique=True),
        sa.Column("ip", sa.String(64)),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("pinned", sa.Integer, sa.ForeignKey("generations.id")),
        sa.Column("created", sa.Float, nullable=False),
    )
    op.create_table(
        "activations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("node", sa.String(63)),
        sa.Column("from_gen", sa.Integer, sa.ForeignKey("generations.id")),
        sa.Column("to_gen", sa.Integer, sa.ForeignKey("generations.id")),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("nodes", sa.Text, nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("command", sa.String(32), nullable=False),
        sa.Column("argv", sa.Text, nullable=False),
        sa.Column("profile", sa.String(64)),
        sa.Column("node", sa.String(63)),
        sa.Column("generation", sa.String(64)),
        sa.Column("result", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
    )
    op.create_index("ix_events_at", "events", ["at"])


def downgrade() -> None:
    op.drop_index("ix_events_at", "events")
    op.drop_table("events")
    op.drop_table("activations")
    op.drop_table("nodes")
    op.drop_table("profile_state")
    op.drop_index("ix_generations_gen_id", "generations")
    op.drop_table("generations")
