"""The aggregate reads of the report and the metrics: the rows of a window of time, and the store's counters.

Owns the queries behind ``executor report`` (``report_rows``: the jobs that finished in a window, the jobs
active and awaiting review now, rate-limit events, attempts' usage, stall events, the sealed jobs' API
requests and egress decisions) and behind the Prometheus endpoint (``metric_counters``: one statement, five
aggregates), on either engine: the JSON fields of an event are read with each engine's own operator. The
surfaces turn these rows into figures; no table name or SQL dialect is theirs.

Must never: write, or read anything but counts, times, statuses, reasons, names of runners and models, and
the destinations of egress decisions (no prompt, output or credential).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, text
from sqlmodel import col, select

from .models import ApiRequest, Attempt, Event, Job, RateLimitEvent
from .status import TERMINAL, Status

#: The API's token counts a gateway records per request, in the order ``report_rows`` sums them.
API_TOKENS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


@dataclass
class ReportRows:
    """What the report reads for a window ``[lo, hi]``."""

    finished: list[Job]  # reached a terminal status other than rejected in the window
    refused: int  # job files rejected at intake in the window
    active: dict[str, int]  # non-terminal jobs now, by status
    awaiting: list[Job]  # awaiting review now
    limits: list[RateLimitEvent]  # rate-limit events in the window, oldest first
    attempts: list[tuple]  # (job_id, input_tokens, output_tokens, cost_usd, runner) of attempts started in it
    stall_events: int  # state changes with reason "stalled" in it
    api: list[tuple]  # (runner, status, requests, *API_TOKENS sums) of gateway requests in it
    egress: list[tuple]  # (decision, host, port, count) of egress decisions in it


#: One statement, five aggregates (a scan of each table, no per-job work in Python). The first branch types
#: its NULLs (PostgreSQL matches a UNION's column types from it); ``{decision}`` is the engine's JSON access.
COUNTERS = """
    SELECT 'job' AS kind, status AS a, COALESCE(reason, '') AS b, runner AS c, COUNT(*) AS n,
           CAST(NULL AS DOUBLE PRECISION) AS x, CAST(NULL AS DOUBLE PRECISION) AS y,
           CAST(NULL AS DOUBLE PRECISION) AS z, CAST(NULL AS DOUBLE PRECISION) AS w
      FROM job GROUP BY status, reason, runner
    UNION ALL
    SELECT 'rate_limit', runner, kind, NULL, COUNT(*), SUM(COALESCE(retry_delay, 0)), NULL, NULL, NULL
      FROM ratelimitevent GROUP BY runner, kind
    UNION ALL
    SELECT 'usage', NULL, NULL, NULL, COUNT(*), SUM(COALESCE(input_tokens, 0)),
           SUM(COALESCE(output_tokens, 0)), SUM(COALESCE(cost_usd, 0)), NULL
      FROM attempt
    UNION ALL
    SELECT 'api', runner, CAST(status AS TEXT), NULL, COUNT(*), SUM(COALESCE(input_tokens, 0)),
           SUM(COALESCE(output_tokens, 0)), SUM(COALESCE(cache_read_input_tokens, 0)),
           SUM(COALESCE(cache_creation_input_tokens, 0))
      FROM apirequest GROUP BY runner, status
    UNION ALL
    SELECT 'egress', {decision}, NULL, NULL, SUM(COALESCE({count}, 1)), NULL, NULL, NULL, NULL
      FROM event WHERE kind = 'egress' GROUP BY {decision}
"""
_JSON_DECISION = {"sqlite": "json_extract(data, '$.decision')", "postgresql": "(data ->> 'decision')"}
# An egress event stands for ``count`` identical decisions (sandbox/journal.py); older ones for one.
_JSON_COUNT = {"sqlite": "json_extract(data, '$.count')", "postgresql": "CAST(data ->> 'count' AS INTEGER)"}


class AggregateQueries:
    """Mixed into ``Store``: the report's and the metrics' reads."""

    engine: Any
    session: Any

    def report_rows(self, lo: datetime, hi: datetime) -> ReportRows:
        """The rows of ``executor report`` for the window ``[lo, hi]``, read in one session."""
        ran = [st.value for st in TERMINAL - {Status.rejected}]
        with self.session() as s:
            finished = list(s.exec(select(Job).where(
                col(Job.status).in_(ran), col(Job.finished_at) >= lo, col(Job.finished_at) <= hi)))
            refused = s.exec(select(func.count()).select_from(Job).where(
                col(Job.status) == Status.rejected.value, col(Job.finished_at) >= lo, col(Job.finished_at) <= hi)).one()
            active = dict(s.exec(select(Job.status, func.count()).where(
                col(Job.status).not_in([st.value for st in TERMINAL])).group_by(Job.status)).all())
            limits = list(s.exec(select(RateLimitEvent).where(
                col(RateLimitEvent.ts) >= lo, col(RateLimitEvent.ts) <= hi).order_by(col(RateLimitEvent.id))))
            attempts = list(s.exec(select(Attempt.job_id, Attempt.input_tokens, Attempt.output_tokens,
                                          Attempt.cost_usd, Job.runner)
                                   .join(Job, col(Job.id) == col(Attempt.job_id))
                                   .where(col(Attempt.started_at) >= lo, col(Attempt.started_at) <= hi)))
            awaiting = list(s.exec(select(Job).where(col(Job.status) == Status.awaiting_review.value)))
            stall_events = s.exec(select(func.count()).select_from(Event).where(
                Event.kind == "state", col(Event.data)["reason"].as_string() == "stalled",
                col(Event.ts) >= lo, col(Event.ts) <= hi)).one()
            api = list(s.exec(select(ApiRequest.runner, ApiRequest.status, func.count(),
                                     *(func.sum(func.coalesce(getattr(ApiRequest, k), 0)) for k in API_TOKENS))
                              .where(col(ApiRequest.ts) >= lo, col(ApiRequest.ts) <= hi)
                              .group_by(ApiRequest.runner, ApiRequest.status)))
            where = [col(Event.data)[key].as_string() for key in ("decision", "host", "port")]  # both engines
            counted = func.sum(func.coalesce(col(Event.data)["count"].as_integer(), 1))  # one event: its count
            egress = list(s.exec(select(*where, counted)
                                 .where(Event.kind == "egress", col(Event.ts) >= lo, col(Event.ts) <= hi)
                                 .group_by(*where)))
        return ReportRows(finished=finished, refused=int(refused or 0),
                          active={Status(st).value: n for st, n in active.items()}, awaiting=awaiting,
                          limits=limits, attempts=[tuple(row) for row in attempts], stall_events=int(stall_events or 0),
                          api=[tuple(row) for row in api], egress=[tuple(row) for row in egress])

    def metric_counters(self) -> dict[str, Any]:
        """The store's counters for the metrics, in one statement: jobs by (status, reason, runner), rate-limit
        events by (runner, kind) with their waits, the attempts' usage, the gateways' requests by (runner,
        status) with the API's token counts, and egress decisions."""
        jobs: list[tuple[str, str, str, int]] = []
        limits: list[tuple[str, str, int, float]] = []
        usage = {"attempts": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
        api: list[tuple[str, str, int, dict[str, int]]] = []
        egress: dict[str, int] = {}
        with self.engine.connect() as conn:
            dialect = conn.dialect.name
            statement = text(COUNTERS.format(decision=_JSON_DECISION[dialect], count=_JSON_COUNT[dialect]))
            for kind, a, b, c, n, x, y, z, w in conn.execute(statement):
                if kind == "job":
                    # SQLAlchemy stores the enum by name, which is also its value
                    jobs.append((Status[a].value if a in Status.__members__ else str(a), b, c, int(n)))
                elif kind == "rate_limit":
                    limits.append((a, b, int(n), float(x or 0)))
                elif kind == "api":
                    api.append((a, b, int(n), {"input": int(x or 0), "output": int(y or 0),
                                               "cache_read": int(z or 0), "cache_creation": int(w or 0)}))
                elif kind == "egress":
                    egress[str(a)] = int(n)
                else:
                    usage = {"attempts": int(n or 0), "input_tokens": int(x or 0), "output_tokens": int(y or 0),
                             "cost_usd": float(z or 0)}
        return {"jobs": jobs, "rate_limits": limits, "usage": usage, "api": api, "egress": egress}
