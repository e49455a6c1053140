"""Where a job's change landed in git.

Revision 0008 (after 0007): ``job.git`` (JSON): for a policy with ``land = "commit"`` or ``"branch"``, where
HEAD was as the job started (its branch and commit), then the branch and commit its change landed as, and,
for a branch landed later with ``executor land``, that landing. Jobs before it landed as files: NULL.

Must never: change once a released executor has run it; a further change is a new revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "git" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("job")}:
        op.add_column("job", sa.Column("git", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.drop_column("git")
