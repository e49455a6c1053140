"""Review: jobs whose tests passed and that wait for a person; what the person sees, and the decisions."""

from ..globs import matching
from ..transaction.upper import select
from . import kept
from .decisions import Pending, approve, pending, queue, reject, request_changes, review_stats, since
from .diff import MAX_DIFF_BYTES, FileDiff, changed_lines, diff_change, render_unified
from .triggers import REVIEW_INSTRUCTION, model_review_line, reason_text, review_reasons

__all__ = ["MAX_DIFF_BYTES", "REVIEW_INSTRUCTION", "FileDiff", "Pending", "approve", "changed_lines", "diff_change",
           "kept", "matching", "model_review_line", "pending", "queue", "reason_text", "reject", "render_unified",
           "request_changes",
           "review_reasons", "review_stats", "select", "since"]
