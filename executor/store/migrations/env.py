"""Alembic's environment: runs the migrations on the connection ``store/schema.py`` passes in.

Owns how Alembic is configured for both engines: the models' metadata as the target (for
``executor db revision``'s comparison), batch mode on SQLite (whose ALTER TABLE is limited), and types
compared so a changed column is noticed.

Must never: open a connection of its own, or commit (the caller holds the schema lock and commits).
"""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from executor.store import models  # noqa: F401 - registers the tables on SQLModel.metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=SQLModel.metadata, compare_type=True,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
