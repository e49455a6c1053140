"""Which storage a job's workspace lies on, and which storage each host's roots are.

Revision 0006 (after 0005): ``job.storage`` (the identity of the storage its workspace lies on, recorded at
intake: only hosts that see the same storage claim it) and ``host.storage`` (JSON: each of the host's
workspace roots with its storage's identity). Both stay NULL for what was there before: a job without a
storage is claimed by its path alone, as before, until its spool's host stamps it at its next start.

Must never: change once a released executor has run it; a further change is a new revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if "storage" not in {c["name"] for c in inspector.get_columns("job")}:
        op.add_column("job", sa.Column("storage", sa.String(), nullable=True))
    if "storage" not in {c["name"] for c in inspector.get_columns("host")}:
        op.add_column("host", sa.Column("storage", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("host") as batch:
        batch.drop_column("storage")
    with op.batch_alter_table("job") as batch:
        batch.drop_column("storage")
