"""Baseline: the store as it was before migrations (jobs, attempts, events, heartbeats, rate limits,
runner cooldowns, compaction rows).

Revision 0001 (the first). On a new database it creates the tables. A SQLite database made before
migrations existed (by ``create_all``, with "add the missing nullable columns" on each start) is adopted:
missing tables are created and missing columns added, and nothing is dropped.

Must never: change once a released executor has run it; a further change is a new revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def _tables() -> list[tuple[str, list[sa.Column], list]]:
    """(name, columns, constraints) of every table, in creation order; fresh objects each call."""
    return [
        ("job", [
            sa.Column("id", sa.String(), primary_key=True),
            sa.Column("session_id", sa.String(), nullable=False),
            sa.Column("runner", sa.String(), nullable=False),
            sa.Column("model_requested", sa.String(), nullable=False),
            sa.Column("workspace", sa.String(), nullable=False),
            sa.Column("prompt", sa.String(), nullable=False),
            sa.Column("policy_name", sa.String(), nullable=False),
            sa.Column("policy", sa.JSON()),
            sa.Column("test_command", sa.String()),
            sa.Column("priority", sa.Integer(), nullable=False),
            sa.Column("status", sa.String(32), nullable=False),
            sa.Column("reason", sa.String()),
            sa.Column("error", sa.String()),
            sa.Column("spool_name", sa.String()),
            sa.Column("created_at", TS, nullable=False),
            sa.Column("started_at", TS),
            sa.Column("finished_at", TS),
            sa.Column("start_ns", sa.BigInteger()),
            sa.Column("repo_uid", sa.Integer()),
            sa.Column("repo_gid", sa.Integer()),
            sa.Column("workspace_dev", sa.BigInteger()),
            sa.Column("workspace_ino", sa.BigInteger()),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("cancel_requested", sa.Boolean(), nullable=False),
            sa.Column("models_seen", sa.JSON()),
            sa.Column("changed_files", sa.JSON()),
            sa.Column("test_exit_code", sa.Integer()),
            sa.Column("test_output", sa.String()),
            sa.Column("final_text", sa.String()),
            sa.Column("retry_at", TS),
            sa.Column("resume_session", sa.String()),
            sa.Column("limited_attempts", sa.Integer(), nullable=False),
            sa.Column("review_reasons", sa.JSON()),
            sa.Column("review_since", TS),
            sa.Column("reviewed_at", TS),
            sa.Column("reviewed_by", sa.String()),
            sa.Column("review_note", sa.String()),
            sa.Column("review_files", sa.JSON()),
            sa.Column("skills", sa.JSON()),
            sa.Column("context", sa.String()),
            sa.Column("compaction", sa.String()),
        ], [sa.UniqueConstraint("spool_name")]),
        ("ratelimitevent", [
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("runner", sa.String(), nullable=False),
            sa.Column("job_id", sa.String(), nullable=False),
            sa.Column("attempt", sa.Integer(), nullable=False),
            sa.Column("ts", TS, nullable=False),
            sa.Column("kind", sa.String(), nullable=False),
            sa.Column("status_code", sa.Integer()),
            sa.Column("retry_delay", sa.Float()),
            sa.Column("message", sa.String(), nullable=False),
        ], []),
        ("runnerstate", [
            sa.Column("name", sa.String(), primary_key=True),
            sa.Column("cooldown_until", TS),
            sa.Column("reason", sa.String()),
        ], []),
        ("attempt", [
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("job_id", sa.String(), nullable=False),
            sa.Column("number", sa.Integer(), nullable=False),
            sa.Column("started_at", TS, nullable=False),
            sa.Column("finished_at", TS),
            sa.Column("outcome", sa.String()),
            sa.Column("exit_code", sa.Integer()),
            sa.Column("claude_session_id", sa.String()),
            sa.Column("models_seen", sa.JSON()),
            sa.Column("cost_usd", sa.Float()),
            sa.Column("input_tokens", sa.Integer()),
            sa.Column("output_tokens", sa.Integer()),
        ], [sa.ForeignKeyConstraint(["job_id"], ["job.id"])]),
        ("compaction", [
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("session_id", sa.String(), nullable=False),
            sa.Column("job_id", sa.String(), nullable=False),
            sa.Column("ts", TS, nullable=False),
            sa.Column("kind", sa.String(), nullable=False),
            sa.Column("subject", sa.String(), nullable=False),
            sa.Column("event_ids", sa.JSON()),
            sa.Column("source_size", sa.Integer(), nullable=False),
            sa.Column("summary_size", sa.Integer(), nullable=False),
            sa.Column("summary", sa.String(), nullable=False),
            sa.Column("model", sa.String()),
            sa.Column("input_tokens", sa.Integer()),
            sa.Column("output_tokens", sa.Integer()),
            sa.Column("cost_usd", sa.Float()),
            sa.Column("latency", sa.Float()),
            sa.Column("reused_from", sa.Integer()),
        ], []),
        ("heartbeat", [
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("job_id", sa.String(), nullable=False),
            sa.Column("attempt", sa.Integer(), nullable=False),
            sa.Column("ts", TS, nullable=False),
            sa.Column("state", sa.String(), nullable=False),
            sa.Column("new_lines", sa.Integer(), nullable=False),
            sa.Column("cpu_cores", sa.Float()),
            sa.Column("memory", sa.BigInteger()),
            sa.Column("pids", sa.Integer()),
            sa.Column("idle_for", sa.Float(), nullable=False),
            sa.Column("last_activity", sa.String(), nullable=False),
            sa.Column("disk", sa.BigInteger()),
        ], []),
        ("event", [
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("job_id", sa.String(), nullable=False),
            sa.Column("session_id", sa.String(), nullable=False),
            sa.Column("attempt", sa.Integer(), nullable=False),
            sa.Column("line", sa.Integer()),
            sa.Column("ts", TS, nullable=False),
            sa.Column("kind", sa.String(), nullable=False),
            sa.Column("data", sa.JSON()),
        ], []),
    ]


INDEXES = [("job", "session_id"), ("job", "status"), ("ratelimitevent", "runner"), ("ratelimitevent", "job_id"),
           ("ratelimitevent", "ts"), ("attempt", "job_id"), ("compaction", "session_id"), ("compaction", "job_id"),
           ("heartbeat", "job_id"), ("event", "job_id"), ("event", "session_id")]


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    have = set(inspector.get_table_names())
    for name, columns, constraints in _tables():
        if name not in have:
            op.create_table(name, *columns, *constraints)
            continue
        # Made before migrations: add what that version lacked (nullable columns only, as it did itself).
        present = {c["name"] for c in inspector.get_columns(name)}
        for column in columns:
            if column.name not in present and column.nullable and not column.primary_key:
                with op.batch_alter_table(name) as batch:
                    batch.add_column(column)
    for table, column in INDEXES:
        index = f"ix_{table}_{column}"
        if table not in have or index not in {i["name"] for i in inspector.get_indexes(table)}:
            op.create_index(index, table, [column])


def downgrade() -> None:
    for name, _columns, _constraints in reversed(_tables()):
        op.drop_table(name)
