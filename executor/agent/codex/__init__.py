"""The Codex CLI behind the agent seam (``agent.py``)."""
