"""The evaluation gate's record of a job, and the jobs made from jobs (a retry's or a revision's origin).

Revision 0004 (after 0003): ``job.evaluation`` (JSON), ``job.follows`` (indexed: a job page lists the jobs
made from it) and ``job.builds_on`` (the reviewed job whose kept change a revision continues). A SQLite
database made before migrations by a version that had them already has them: they are made only where
missing.

Must never: change once a released executor has run it; a further change is a new revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    have = {c["name"] for c in inspector.get_columns("job")}
    for name, kind in (("evaluation", sa.JSON()), ("follows", sa.String()), ("builds_on", sa.String())):
        if name not in have:
            op.add_column("job", sa.Column(name, kind, nullable=True))
    if "ix_job_follows" not in {i["name"] for i in sa.inspect(op.get_bind()).get_indexes("job")}:
        op.create_index("ix_job_follows", "job", ["follows"])


def downgrade() -> None:
    op.drop_index("ix_job_follows")
    with op.batch_alter_table("job") as batch:
        for name in ("builds_on", "follows", "evaluation"):
            batch.drop_column(name)
