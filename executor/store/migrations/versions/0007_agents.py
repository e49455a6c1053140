"""Any coding agent: the job names its runner's agent, and an attempt's session is the agent's own.

Revision 0007 (after 0006): ``job.agent`` (the runner's agent when the job was accepted; every earlier job ran
Claude Code, the only agent there was, so existing rows get ``claude-code``) and ``attempt.claude_session_id``
renamed ``agent_session_id`` (the session id as the job's agent's stream gave it: Claude Code's, Codex's
thread, Gemini CLI's session).

Must never: change once a released executor has run it; a further change is a new revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if "agent" not in {c["name"] for c in inspector.get_columns("job")}:
        op.add_column("job", sa.Column("agent", sa.String(), nullable=False, server_default="claude-code"))
    if "claude_session_id" in {c["name"] for c in inspector.get_columns("attempt")}:
        with op.batch_alter_table("attempt") as batch:
            batch.alter_column("claude_session_id", new_column_name="agent_session_id",
                               existing_type=sa.String(), existing_nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("attempt") as batch:
        batch.alter_column("agent_session_id", new_column_name="claude_session_id",
                           existing_type=sa.String(), existing_nullable=True)
    with op.batch_alter_table("job") as batch:
        batch.drop_column("agent")
