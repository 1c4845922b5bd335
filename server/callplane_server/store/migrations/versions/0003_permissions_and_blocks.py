"""per-call permission overrides and blocked users

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "call_permission_overrides",
        sa.Column("call_cid", sa.String(length=129), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("granted", JSON, nullable=False),
        sa.Column("revoked", JSON, nullable=False),
        sa.PrimaryKeyConstraint("call_cid", "user_id", name=op.f("pk_call_permission_overrides")),
    )
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("blocked_user_ids", JSON, nullable=False, server_default=sa.text("'[]'"))
        )


def downgrade() -> None:
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.drop_column("blocked_user_ids")
    op.drop_table("call_permission_overrides")
