"""A sealed attempt as the job sees it: its gateway and egress proxy opened before the container starts and
closed when the agent ends, and what they report turned into rows, events, cooldowns and liveness.

Owns: the attempt's upstream (the runner's model, endpoint and real credential, and the API protocol of the
runner's agent), its egress rules and its ``SealLimits`` (from the settings), and the hooks the sealer calls:
each batch of what the sockets reported becomes rows in one transaction: every API request an ``ApiRequest``
row (usage and rate-limit headers as the API answered them); identical refusals one ``gateway_refused`` event
and identical egress decisions one ``egress`` event, each with its ``count`` (updated as it grows), up to the
cap, then a ``sealed_events_capped`` event with the counts left unrecorded (``sandbox/journal.py``). An
answer the protocol calls weather (a 429, an overload) cools the runner down at once and is a rate-limit row
(the pipeline completes it with the wait it decides); a refused model, or an answer from another model than
the runner's (read from the answers, for agents whose stream never names it), stops the agent (the stop check
reads ``refused``); every chunk of an answer is progress for the liveness watchdog.

Must never: let the credential reach the container or the store, write to the store on the event loop
thread (the sealer runs these hooks on its recorder thread, ``activity`` excepted), or keep a socket open
after the attempt's agent ended.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from ..agent.launch import runner_credential
from ..agent.registry import agent_for
from ..agent.seam import Agent
from ..clock import utcnow
from ..egress_rules import parse_egress
from ..errors import ConfigError, SandboxError
from ..policy import Policy, Runner
from ..sandbox.egress import EgressEvent
from ..sandbox.gateway import Refusal, RequestRecord, Upstream
from ..sandbox.journal import EGRESS, REFUSED, Batch, Entry
from ..sandbox.liveness import Watchdog
from ..sandbox.seal import Hooks, Sealed, SealLimits
from ..store import ApiRequest, Job, RateLimitEvent
from ..transaction.workspace import Workspace
from .context import Context

log = logging.getLogger(__name__)


class SealedAttempt:
    """One attempt's sockets and what they report."""

    def __init__(self, ctx: Context, job: Job, ws: Workspace, runner: Runner, policy: Policy, agent: Agent) -> None:
        self.ctx, self.job, self.attempt, self.runner, self.policy = ctx, job, ws.attempt, runner, policy
        self.agent = agent
        self.models: list[str] = []  # the models that answered, as the gateway read them (a few, distinct)
        self.directory = ws.sockets
        self.watchdog: Watchdog | None = None  # set once the agent is watched; gateway activity feeds it
        self.sealed: Sealed | None = None

    @classmethod
    def open(cls, ctx: Context, job: Job, ws: Workspace, runner: Runner, policy: Policy,
             agent: Agent | None = None) -> SealedAttempt | None:
        """Serve the attempt's sockets (before its container starts, or again when it is adopted); None for an
        unsealed policy. ``agent``: the runner's, unless given."""
        if not policy.sealed:
            return None
        if ctx.sealer is None:
            raise ConfigError("a sealed job needs the executor's sealed-sandbox threads, which are not running")
        agent = agent or agent_for(runner)
        attempt = cls(ctx, job, ws, runner, policy, agent)
        upstream = Upstream(model=runner.model, credential=runner_credential(runner, ctx.secrets),
                            auth_type=runner.auth_type, base_url=runner.base_url or "", protocol=agent.protocol)
        hooks = Hooks(write=attempt._write, activity=attempt._activity)
        settings = ctx.settings
        limits = SealLimits(settings.gateway_connections, settings.egress_connections, settings.gateway_parse_memory,
                            settings.sealed_event_cap)
        try:
            attempt.sealed = ctx.sealer.open(job.id, attempt.directory, upstream, parse_egress(policy.egress),
                                             ws.uid, ws.gid, hooks, limits, spool=ws.root / "bodies")
        except OSError as exc:
            raise SandboxError(f"cannot serve the job's sockets in {attempt.directory}: {exc}") from None
        return attempt

    def close(self) -> None:
        """Cut the sockets and wait until everything they reported is in the store (idempotent)."""
        if self.sealed is not None and self.ctx.sealer is not None:
            self.ctx.sealer.close(self.job.id)

    def refused(self) -> bool:
        return self.sealed is not None and self.sealed.refused()

    @property
    def refused_models(self) -> list[str]:
        """Models the agent asked for that the gateway refused."""
        return list(dict.fromkeys(self.sealed.refused_models)) if self.sealed else []

    @property
    def answered_models(self) -> list[str]:
        """Models other than the runner's that answered (the gateway read them from the answers)."""
        return list(dict.fromkeys(self.sealed.answered_models)) if self.sealed else []

    # -- hooks (recorder thread, but activity) ------------------------------------------------------------

    def _activity(self) -> None:
        watchdog = self.watchdog
        if watchdog is not None:
            watchdog.saw_activity()

    def _write(self, batch: Batch) -> list[int]:
        """One batch of the sockets' reports, in one transaction; then a 429 / 529's cooldown."""
        rows = [self._row(record) for record in batch.requests]
        ids = self.ctx.store.add_sandbox_batch(
            self.job, self.attempt, rows, [(entry.kind, _data(entry)) for entry in batch.new()],
            [(entry.event_id, _data(entry)) for entry in batch.entries if entry.event_id is not None])
        for record in batch.requests:
            if record.weather is not None:
                self._limited(record)
            if not self.agent.names_models and record.status < 400 and record.model:
                if record.model not in self.models and len(self.models) < 8:
                    self.models.append(record.model)
                if record.model != self.runner.model and self.sealed is not None:
                    self.sealed.answered_by(record.model)  # the stream never names it: the answer is the evidence
        return ids

    def _row(self, record: RequestRecord) -> ApiRequest:
        usage = record.usage
        return ApiRequest(
            job_id=self.job.id, attempt=self.attempt, runner=self.runner.name, method=record.method,
            path=record.path, status=record.status, model=record.model, latency=round(record.latency, 6),
            duration=round(record.duration, 6), request_bytes=record.request_bytes,
            response_bytes=record.response_bytes, input_tokens=usage.get("input_tokens"),
            output_tokens=usage.get("output_tokens"),
            cache_creation_input_tokens=usage.get("cache_creation_input_tokens"),
            cache_read_input_tokens=usage.get("cache_read_input_tokens"), rate_limits=record.rate_limits,
            request_id=record.request_id, error=record.error or record.message)

    def _limited(self, record: RequestRecord) -> None:
        kind = record.weather or "rate_limited"
        retry_after = record.reading.retry_after
        rest = max(retry_after or 0.0, self.policy.backoff_initial)
        message = record.message or f"HTTP {record.status}"
        self.ctx.store.add_rate_limit(RateLimitEvent(
            runner=self.runner.name, job_id=self.job.id, attempt=self.attempt, kind=kind,
            status_code=record.status, message=message[:500]))
        label = kind.replace("_", " ")
        self.ctx.store.cool_down(self.runner.name, utcnow() + timedelta(seconds=rest),
                                 f"{label} (seen at the gateway): {message[:200]}")
        log.info("runner cooling down", extra={"action": "cool_down", "job": self.job.id, "runner": self.runner.name,
                                               "status": record.status, "seconds": rest})


def _data(entry: Entry) -> dict:
    """An aggregate's event data: its first report's fields and how many reports it stands for."""
    if entry.kind == REFUSED:
        refusal: Refusal = entry.first
        return {"kind": refusal.kind, "method": refusal.method, "path": refusal.path, "status": refusal.status,
                "reason": refusal.reason, "requested_model": refusal.requested_model,
                "expected_model": refusal.expected_model, "count": entry.count}
    if entry.kind == EGRESS:
        event: EgressEvent = entry.first
        return {"decision": "allowed" if event.allowed else "denied", "method": event.method, "host": event.host,
                "port": event.port, "status": event.status, "reason": event.reason, "address": event.address,
                "bytes_up": entry.bytes_up, "bytes_down": entry.bytes_down, "duration": round(entry.duration, 3),
                "count": entry.count}
    # the cap's own aggregate (journal.CAPPED)
    return {"reason": "this job's sandbox reported more kinds of refusals and egress decisions than are recorded "
                      "per attempt (EXECUTOR_SEALED_EVENT_CAP): these were counted only",
            "unrecorded": entry.unrecorded, "count": entry.count}
