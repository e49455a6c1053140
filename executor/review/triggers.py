"""Review triggers: which tested changes wait for a person before they are committed.

Owns the policy's ``review`` mode, the ``review_paths`` and ``protected_paths`` globs (``globs.py``),
``review_max_changed_lines``, and the model's own
``REVIEW: <reason>`` line, with the instruction that asks the model for it.

Must never: read the repository or the upper dir; it judges a ``Change`` and the agent's final text.
"""

from __future__ import annotations

import re

from ..globs import matching
from ..policy import Policy
from ..transaction.upper import Change, listed

#: Appended to the agent's system prompt when the policy's review is not ``never``.
REVIEW_INSTRUCTION = (
    "A person can review your change before it is committed. If you are unsure your change is right, or it "
    "is sensitive (security, credentials, data migrations, deployment or CI configuration, deleting data, "
    "changing the tests themselves), end your final message with one line of the form\n"
    "REVIEW: <one-sentence reason>\n"
    "Your change then waits for that person. Otherwise do not write such a line."
)

_REVIEW_LINE = re.compile(r"^[\s>*_`#-]*REVIEW\s*:[\s*_`]*(?P<reason>.*?)[\s*_`]*$")


def model_review_line(final_text: str | None) -> str | None:
    """The reason of the last ``REVIEW: <reason>`` line of the agent's final message, if any."""
    found = None
    for line in (final_text or "").splitlines():
        match = _REVIEW_LINE.match(line)
        if match:
            found = match.group("reason").strip() or "the model asked for a review without saying why"
    return found


def review_reasons(policy: Policy, change: Change, final_text: str | None,
                   changed_lines: int | None = None) -> list[dict]:
    """Why a person must look at this (tested) change before it is committed; empty: commit it.

    ``changed_lines`` is needed only when the policy sets ``review_max_changed_lines``.
    """
    if policy.review == "never" or not change.changed_files:
        return []  # nothing would be applied: nothing to review
    reasons: list[dict] = []
    if policy.review == "always":
        reasons.append({"trigger": "always", "message": "the policy reviews every change (review = always)"})
    paths = change.changed_files
    for trigger, patterns, what in (
        ("review_paths", policy.review_paths, "changes paths that need a person"),
        ("protected_paths", policy.protected_paths, "changes the tests it is judged by (protected paths)"),
    ):
        hits = [p for p in paths if matching(p, patterns)]
        if hits:
            used = sorted({g for p in hits for g in matching(p, patterns)})
            reasons.append({"trigger": trigger, "paths": hits,
                            "message": f"{what} ({', '.join(used)}): {listed(hits)}"})
    limit = policy.review_max_changed_lines
    if limit is not None and changed_lines is not None and changed_lines > limit:
        reasons.append({"trigger": "changed_lines", "lines": changed_lines,
                        "message": f"{changed_lines} changed lines, more than review_max_changed_lines ({limit})"})
    asked = model_review_line(final_text)
    if asked is not None:
        reasons.append({"trigger": "model", "message": f"the model asked for a review: {asked}"})
    return reasons


def reason_text(reasons: list[dict] | None) -> str:
    return "; ".join(str(r.get("message", r)) if isinstance(r, dict) else str(r) for r in reasons or [])
