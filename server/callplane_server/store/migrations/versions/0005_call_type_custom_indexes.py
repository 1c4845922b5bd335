"""custom-data indexes declared by call types, with their build state shared by every replica

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "custom_indexes",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), server_default="", nullable=False),
        sa.Column("server_declared", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("claimed_by", sa.String(length=64), nullable=True),
        sa.Column("claimed_until", sa.Float(), nullable=True),
        sa.Column("build_seconds", sa.Float(), nullable=True),
        sa.Column("writes_blocked_seconds", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_custom_indexes")),
    )
    op.create_table(
        "call_type_custom_indexes",
        sa.Column("call_type", sa.String(length=64), nullable=False),
        sa.Column("index_name", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["call_type"],
            ["call_types.name"],
            name=op.f("fk_call_type_custom_indexes_call_type_call_types"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["index_name"],
            ["custom_indexes.name"],
            name=op.f("fk_call_type_custom_indexes_index_name_custom_indexes"),
        ),
        sa.PrimaryKeyConstraint("call_type", "index_name", name=op.f("pk_call_type_custom_indexes")),
    )
    op.create_index(
        op.f("ix_call_type_custom_indexes_index_name"),
        "call_type_custom_indexes",
        ["index_name"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_call_type_custom_indexes_index_name"), table_name="call_type_custom_indexes")
    op.drop_table("call_type_custom_indexes")
    op.drop_table("custom_indexes")
