"""Each attempt's own status, and why it ended.

Revision 0005 (after 0004): ``attempt.status`` (running, testing, committing, awaiting_review while the
attempt lasts; then how it ended: the job's ending, ``waiting_retry`` or ``interrupted``) and
``attempt.reason``. Until now an attempt that ended before its agent's end was recorded (a container that
could not start, a workspace that changed) looked ``running`` for good. The backfill is exact: an attempt
that is not its job's last one ended when its job waited for a retry (a rate limit or an overload was its
agent's outcome) or went back to the queue; a job's last attempt has the job's status (``queued``: the
attempt was interrupted) and the job's reason.

Must never: change once a released executor has run it; a further change is a new revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_JOB = "(SELECT {column} FROM job WHERE job.id = attempt.job_id)"
_EARLIER = f"attempt.number < {_JOB.format(column='attempts')}"
_LAST_REASON = ("CASE WHEN job.status = 'queued' THEN 'interrupted' WHEN job.status IN "
                "('running', 'testing', 'committing', 'awaiting_review') THEN NULL ELSE job.reason END")
BACKFILL = f"""
    UPDATE attempt SET
      status = CASE
        WHEN {_EARLIER} THEN
          CASE WHEN attempt.outcome IN ('rate_limited', 'overloaded') THEN 'waiting_retry' ELSE 'interrupted' END
        ELSE {_JOB.format(column="CASE job.status WHEN 'queued' THEN 'interrupted' ELSE job.status END")}
      END,
      reason = CASE
        WHEN {_EARLIER} THEN attempt.outcome
        ELSE {_JOB.format(column=_LAST_REASON)}
      END
    WHERE attempt.status IS NULL
"""


def upgrade() -> None:
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("attempt")}
    for name in ("status", "reason"):
        if name not in have:
            op.add_column("attempt", sa.Column(name, sa.String(), nullable=True))
    op.execute(BACKFILL)


def downgrade() -> None:
    with op.batch_alter_table("attempt") as batch:
        for name in ("reason", "status"):
            batch.drop_column(name)
