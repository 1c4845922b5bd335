"""Alembic environment: always handed a live connection by the runner (or by tests)."""

from __future__ import annotations

from alembic import context

from callplane_server.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - the CLI path is not used
    raise RuntimeError("run migrations through callplane_server.store.migrations.runner")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
