"""Several hosts share one store: the host table, who claimed each job and attempt, the policy's limits as
columns (a claim picks what fits), and the workspace and session locks that no two hosts can both hold.

Revision 0002 (after 0001). Existing jobs get their limits from their policy; jobs that hold their
workspace now (running, testing, committing, waiting to retry) get their locks.

Must never: change once a released executor has run it; a further change is a new revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
HOLDING = ("running", "testing", "committing", "waiting_retry")
DEFAULT_CPUS, DEFAULT_MEMORY = 1.0, 2 * 1024**3  # policy.Policy's defaults when a policy names none


def upgrade() -> None:
    op.create_table(
        "host",
        sa.Column("id", sa.String(), primary_key=True),
        sa.Column("version", sa.String(), nullable=False),
        sa.Column("machine", sa.String()),
        sa.Column("pid", sa.Integer()),
        sa.Column("budget_cpus", sa.Float(), nullable=False),
        sa.Column("budget_memory", sa.BigInteger(), nullable=False),
        sa.Column("reserve_memory", sa.BigInteger(), nullable=False),
        sa.Column("workspace_roots", sa.JSON()),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("last_seen", TS, nullable=False),
        sa.Column("stopped_at", TS),
        sa.Column("lost_at", TS),
        sa.Column("reserved_cpus", sa.Float(), nullable=False),
        sa.Column("reserved_memory", sa.BigInteger(), nullable=False),
        sa.Column("running", sa.Integer(), nullable=False),
        sa.Column("waiting", sa.String()),
    )
    with op.batch_alter_table("job") as batch:
        batch.add_column(sa.Column("cpus", sa.Float()))
        batch.add_column(sa.Column("memory", sa.BigInteger()))
        batch.add_column(sa.Column("host_id", sa.String()))
        batch.add_column(sa.Column("spool_host", sa.String()))
        batch.add_column(sa.Column("workspace_lock", sa.String()))
        batch.add_column(sa.Column("session_lock", sa.String()))
        batch.add_column(sa.Column("interrupted_at", TS))
    with op.batch_alter_table("attempt") as batch:
        batch.add_column(sa.Column("host_id", sa.String()))
    _backfill()
    op.create_index("ix_job_host_id", "job", ["host_id"])
    op.create_index("ix_job_queue", "job", ["status", sa.text("priority DESC"), "created_at", "id"])
    op.create_index("ux_job_workspace_lock", "job", ["workspace_lock"], unique=True)
    op.create_index("ux_job_session_lock", "job", ["session_lock"], unique=True)
    op.create_index("ix_attempt_host_id", "attempt", ["host_id"])


def _backfill() -> None:
    bind = op.get_bind()
    job = sa.table("job", sa.column("id"), sa.column("policy", sa.JSON()), sa.column("status"),
                   sa.column("workspace"), sa.column("session_id"), sa.column("cpus"), sa.column("memory"),
                   sa.column("workspace_lock"), sa.column("session_lock"))
    held: set[tuple[str, str]] = set()
    rows = bind.execute(sa.select(job.c.id, job.c.policy, job.c.status, job.c.workspace, job.c.session_id)
                        .order_by(job.c.id)).all()
    for job_id, policy, status, workspace, session in rows:
        policy = policy or {}
        values = {"cpus": float(policy.get("cpus") or DEFAULT_CPUS),
                  "memory": int(policy.get("memory") or DEFAULT_MEMORY)}
        if status in HOLDING:
            if ("w", workspace) not in held:
                values["workspace_lock"] = workspace
                held.add(("w", workspace))
            if ("s", session) not in held:
                values["session_lock"] = session
                held.add(("s", session))
        bind.execute(job.update().where(job.c.id == job_id).values(**values))


def downgrade() -> None:
    for index in ("ix_attempt_host_id", "ux_job_session_lock", "ux_job_workspace_lock", "ix_job_queue",
                  "ix_job_host_id"):
        op.drop_index(index)
    with op.batch_alter_table("attempt") as batch:
        batch.drop_column("host_id")
    with op.batch_alter_table("job") as batch:
        for column in ("interrupted_at", "session_lock", "workspace_lock", "spool_host", "host_id", "memory",
                       "cpus"):
            batch.drop_column(column)
    op.drop_table("host")
