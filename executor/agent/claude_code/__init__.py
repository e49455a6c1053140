"""Claude Code (``agent = "claude-code"``, the default): the CLI, its stream, its transcripts, the Messages API."""
