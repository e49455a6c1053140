"""The API requests of sealed jobs (one row per request a job's gateway forwarded) and the index on a job's
creation time that ``executor jobs`` lists by.

Revision 0003 (after 0002). A SQLite database made before migrations by the version that added them (by
``create_all``) already has both: they are made only where missing.

Must never: change once a released executor has run it; a further change is a new revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if "apirequest" not in inspector.get_table_names():
        op.create_table(
            "apirequest",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("job_id", sa.String(), nullable=False),
            sa.Column("attempt", sa.Integer(), nullable=False),
            sa.Column("runner", sa.String(), nullable=False),
            sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
            sa.Column("method", sa.String(), nullable=False),
            sa.Column("path", sa.String(), nullable=False),
            sa.Column("status", sa.Integer(), nullable=False),
            sa.Column("model", sa.String()),
            sa.Column("latency", sa.Float(), nullable=False),
            sa.Column("duration", sa.Float(), nullable=False),
            sa.Column("request_bytes", sa.Integer(), nullable=False),
            sa.Column("response_bytes", sa.Integer(), nullable=False),
            sa.Column("input_tokens", sa.Integer()),
            sa.Column("output_tokens", sa.Integer()),
            sa.Column("cache_creation_input_tokens", sa.Integer()),
            sa.Column("cache_read_input_tokens", sa.Integer()),
            sa.Column("rate_limits", sa.JSON()),
            sa.Column("request_id", sa.String()),
            sa.Column("error", sa.String()),
        )
    have = {i["name"] for i in sa.inspect(op.get_bind()).get_indexes("apirequest")}
    for column in ("job_id", "runner", "ts"):
        if f"ix_apirequest_{column}" not in have:
            op.create_index(f"ix_apirequest_{column}", "apirequest", [column])
    if "ix_job_created_at" not in {i["name"] for i in inspector.get_indexes("job")}:
        op.create_index("ix_job_created_at", "job", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_job_created_at")
    op.drop_table("apirequest")
