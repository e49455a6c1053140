"""The Gemini CLI behind the agent seam (``agent.py``)."""
