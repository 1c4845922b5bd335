"""calls: sort indexes in QueryCalls' keyset order (time DESC, cid); deleted_at and team indexed where set

QueryCalls orders by `created_at DESC, cid ASC` (the sort and its keyset tiebreak); with an index in that
exact order a broad filter walks the index and stops after one page. `ix_calls_deleted_at` and
`ix_calls_team` keep only rows where the column is set: as full indexes they served `deleted_at IS NULL`
(every live call) and a user's `team IS NULL` (every call of no team), which SQLite's planner preferred to
the sort index when it had no statistics.

Revision ID: 0006
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Indexed only where set: queries test `IS NULL` on them for most rows (see the module docstring).
_PARTIAL = ("deleted_at", "team")


def upgrade() -> None:
    for column in ("created_at", "updated_at"):
        op.drop_index(f"ix_calls_{column}", table_name="calls")
        op.create_index(f"ix_calls_{column}_cid", "calls", [sa.text(f"{column} DESC"), "cid"])
    for column in _PARTIAL:
        present = sa.text(f"{column} IS NOT NULL")
        op.drop_index(f"ix_calls_{column}", table_name="calls")
        op.create_index(
            f"ix_calls_{column}", "calls", [column], sqlite_where=present, postgresql_where=present
        )


def downgrade() -> None:
    for column in _PARTIAL:
        op.drop_index(f"ix_calls_{column}", table_name="calls")
        op.create_index(f"ix_calls_{column}", "calls", [column])
    for column in ("created_at", "updated_at"):
        op.drop_index(f"ix_calls_{column}_cid", table_name="calls")
        op.create_index(f"ix_calls_{column}", "calls", [column])
