"""The operator's report: what the executor did over a window of time, computed from the store.

Owns the report's figures and their definitions (``build_report``) and its text rendering
(``render_text``): jobs by outcome, completion rate, rollbacks, stalls, timeouts, rate limits (per 24 h,
and in busy 24 h windows), jobs per runner with the models that answered, tokens and cost from the CLI's
result lines, p50/p95 job duration and queue wait, and the executor's measured footprint against its
budget (from the ``status.json`` the serving loop writes every tick).

Definitions:
  * finished: a job in a terminal status (succeeded, rolled_back, failed, cancelled, stalled) whose
    ``finished_at`` lies in the window; completion rate = succeeded / finished. Job files rejected at
    intake never ran: they are counted apart (``rejected_at_intake``).
  * duration = finished_at - started_at; queue wait = started_at - created_at (the first start).
  * rollbacks: ``tests_failed`` counts every rollback by the test gate (tests failed, timed out or ran out
    of memory; the graded gate's regression, weak_tests and no_coverage_gain), ``agent_error`` those where
    the agent did not succeed; ``by_reason`` has the exact reasons.
  * stalls: the state changes recorded with reason ``stalled`` (settled as stalled or re-queued).
  * rate-limit events per 24 h = events in the window / window length in days; busy windows are the 24 h
    windows (counted back from ``now``) in which more than 50 jobs finished.
  * tokens and cost: sums over the attempts started in the window, from the CLI's result lines.
  * API usage: sums over the requests sealed jobs' gateways forwarded in the window, as the API itself
    reported them (input, output, cache-creation and cache-read tokens; statuses).
  * egress: the sealed jobs' egress decisions in the window, allowed and denied (by destination).
  * network: finished jobs by their policy's network; bridge and host are the unsealed opt-ins.
  * review: of the finished jobs whose tests passed (succeeded, or sent to review) plus the jobs awaiting
    review now, the share that waited for a person; the mean wait is reviewed_at - review_since over the
    decided ones.
  * evaluation (the graded gate), over the same jobs: defined in ``evaluation/figures.py`` (share of jobs
    that wrote tests, their proof rate, weak-test rejections, regressions caught, flaky tests).
  * hosts: every host sharing the store with its budget, what it holds and when it was last seen (as
    ``executor status`` shows them), and the finished jobs each ran (the host of the job's last claim).

Must never: write to the store or any file, start or signal anything, or print a credential (it reads
only counts, times, names of runners and models, and the status snapshot's figures).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlmodel import col, select

from ..clock import aware, utcnow
from ..evaluation.figures import evaluation_stats
from ..review.decisions import review_stats
from ..scheduling import snapshot as status_file
from ..store import TERMINAL, ApiRequest, Attempt, Event, Job, RateLimitEvent, Status, Store
from .seal_view import UNSEALED

DAY = timedelta(days=1)
#: The endings of jobs that ran (a job file rejected at intake never did: it is counted apart).
RAN = TERMINAL - {Status.rejected}
BUSY_WINDOW_JOBS = 50  # a 24 h window with more finished jobs than this is "busy"
TEST_GATE_REASONS = frozenset({"tests_failed", "tests_timeout", "tests_out_of_memory", "regression", "weak_tests",
                               "no_coverage_gain"})
TIMEOUT_REASONS = frozenset({"timeout", "tests_timeout"})
#: status.json older than this means the executor is not running (its loop ticks every poll interval)
STATUS_FRESH_SECONDS = 10.0


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def _summary(values: list[float]) -> dict[str, Any]:
    return {"count": len(values),
            "p50": _round(percentile(values, 50)), "p95": _round(percentile(values, 95)),
            "mean": _round(sum(values) / len(values)) if values else None,
            "max": _round(max(values)) if values else None}


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def read_footprint(status_path: Path, fresh: float = STATUS_FRESH_SECONDS, now: float | None = None) -> dict:
    """The serving loop's last status snapshot, or ``{}`` when there is none (never ran)."""
    snapshot = status_file.read(status_path, now)
    if snapshot is None:
        return {}
    return {**snapshot, "fresh": snapshot["age_seconds"] < fresh}


def _footprint_view(footprint: dict | None) -> dict[str, Any]:
    if not footprint:
        return {"executor": "not running", "note": "no status snapshot: the executor has not run here"}
    running = bool(footprint.get("fresh", True))
    budget = footprint.get("budget") or {}
    reserved = footprint.get("reserved") or {}
    measured = footprint.get("measured") or {}
    executor_use = measured.get("executor") or {}
    jobs_use = measured.get("jobs") or {}
    view: dict[str, Any] = {
        "executor": "running" if running else "not running",
        "snapshot_age_seconds": footprint.get("age_seconds"),
        "budget": budget,
        "reserved": reserved,
        "executor_rss": executor_use.get("rss"),
        "executor_cpu_percent": executor_use.get("cpu_percent"),
        "executor_reserve_memory": budget.get("reserve_memory"),
        "jobs_cpu_cores": jobs_use.get("cpu_cores"),
        "jobs_memory": jobs_use.get("memory"),
        "running_jobs": len(footprint.get("running") or []),
        "queue_length": footprint.get("queue_length"),
    }
    if executor_use.get("rss") is not None and budget.get("reserve_memory"):
        view["executor_rss_of_reserve"] = round(executor_use["rss"] / budget["reserve_memory"], 4)
    if jobs_use.get("cpu_cores") is not None and budget.get("cpus"):
        view["jobs_cpu_of_budget"] = round(jobs_use["cpu_cores"] / budget["cpus"], 4)
    if jobs_use.get("memory") is not None and budget.get("memory"):
        view["jobs_memory_of_budget"] = round(jobs_use["memory"] / budget["memory"], 4)
    if not running:
        view["note"] = (f"the last status snapshot is {footprint.get('age_seconds')} s old: the executor is not "
                        "running; these are its last measured figures")
    return view


def build_report(store: Store, since: timedelta, now: datetime | None = None,
                 footprint: dict | None = None, hosts: list[dict] | None = None) -> dict[str, Any]:
    """Every figure of ``executor report`` over the window ``[now - since, now]``, as plain JSON data."""
    now = aware(now) if now is not None else utcnow()
    start = now - since
    days = since.total_seconds() / 86400.0
    lo, hi = start, now

    with store.session() as s:
        finished = list(s.exec(select(Job).where(
            col(Job.status).in_([st.value for st in RAN]),
            col(Job.finished_at) >= lo, col(Job.finished_at) <= hi)))
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
        api_rows = list(s.exec(select(ApiRequest.runner, ApiRequest.status, func.count(),
                                      *(func.sum(func.coalesce(getattr(ApiRequest, k), 0)) for k in API_TOKENS))
                               .where(col(ApiRequest.ts) >= lo, col(ApiRequest.ts) <= hi)
                               .group_by(ApiRequest.runner, ApiRequest.status)))
        where = [col(Event.data)[key].as_string() for key in ("decision", "host", "port")]  # both engines
        counted = func.sum(func.coalesce(col(Event.data)["count"].as_integer(), 1))  # one event: count decisions
        egress_rows = list(s.exec(select(*where, counted)
                                  .where(Event.kind == "egress", col(Event.ts) >= lo, col(Event.ts) <= hi)
                                  .group_by(*where)))

    by_status = Counter(job.status.value for job in finished)
    n_finished = len(finished)
    succeeded = by_status.get(Status.succeeded.value, 0)
    rolled = [job for job in finished if job.status == Status.rolled_back]
    rollback_reasons = Counter(job.reason or "unknown" for job in rolled)
    reasons = Counter(job.reason or "unknown" for job in finished)

    durations, waits = [], []
    for job in finished:
        if job.started_at is not None and job.finished_at is not None:
            durations.append((aware(job.finished_at) - aware(job.started_at)).total_seconds())
            waits.append(max(0.0, (aware(job.started_at) - aware(job.created_at)).total_seconds()))

    # Rate limits: overall per 24 h, and in the busy 24 h windows (counted back from now).
    n_windows = max(1, math.ceil(since / DAY))

    def window_of(moment: datetime) -> int:
        return min(n_windows - 1, int((now - aware(moment)) / DAY))

    jobs_per_window = Counter(window_of(job.finished_at) for job in finished)
    limits_per_window = Counter(window_of(e.ts) for e in limits)
    busy = sorted(w for w, n in jobs_per_window.items() if n > BUSY_WINDOW_JOBS)
    busy_windows = [{"start": (now - (w + 1) * DAY).isoformat(), "end": (now - w * DAY).isoformat(),
                     "jobs": jobs_per_window[w], "rate_limit_events": limits_per_window.get(w, 0)} for w in busy]
    busy_limits = sum(win["rate_limit_events"] for win in busy_windows)
    delays = [e.retry_delay for e in limits if e.retry_delay is not None]

    # Runners: finished jobs by status, the models that answered them, their rate limits and usage.
    runners: dict[str, dict[str, Any]] = defaultdict(lambda: {
        "jobs": 0, "by_status": Counter(), "models": set(), "rate_limit_events": 0,
        "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0})
    for job in finished:
        r = runners[job.runner]
        r["jobs"] += 1
        r["by_status"][job.status.value] += 1
        r["models"].update(job.models_seen or [])
    for e in limits:
        runners[e.runner]["rate_limit_events"] += 1
    input_tokens = output_tokens = 0
    cost = 0.0
    for _job_id, tin, tout, usd, runner in attempts:
        input_tokens += tin or 0
        output_tokens += tout or 0
        cost += usd or 0.0
        runners[runner]["input_tokens"] += tin or 0
        runners[runner]["output_tokens"] += tout or 0
        runners[runner]["cost_usd"] += usd or 0.0

    return {
        "window": {"since": start.isoformat(), "until": now.isoformat(), "days": round(days, 4)},
        "jobs": {
            "finished": n_finished,
            "by_status": {st.value: by_status.get(st.value, 0) for st in Status if st in RAN},
            "rejected_at_intake": refused,
            "by_reason": dict(sorted(reasons.items())),
            "active": {Status(st).value: n for st, n in sorted(active.items())},
        },
        "completion_rate": round(succeeded / n_finished, 4) if n_finished else None,
        "rollbacks": {
            "total": len(rolled),
            "tests_failed": sum(n for reason, n in rollback_reasons.items() if reason in TEST_GATE_REASONS),
            "agent_error": rollback_reasons.get("agent_error", 0),
            "by_reason": dict(sorted(rollback_reasons.items())),
        },
        "stalls": {"events": int(stall_events or 0), "jobs_stalled": by_status.get(Status.stalled.value, 0)},
        "timeouts": {"agent": reasons.get("timeout", 0), "tests": reasons.get("tests_timeout", 0),
                     "total": sum(n for reason, n in reasons.items() if reason in TIMEOUT_REASONS)},
        "rate_limits": {
            "events": len(limits),
            "by_kind": dict(sorted(Counter(e.kind for e in limits).items())),
            "per_24h": round(len(limits) / days, 3) if days > 0 else None,
            "busy_window_jobs": BUSY_WINDOW_JOBS,
            "busy_windows": busy_windows,
            "per_24h_in_busy_windows": round(busy_limits / len(busy_windows), 3) if busy_windows else None,
            "mean_wait_seconds": _round(sum(delays) / len(delays)) if delays else None,
            "waits_recorded": len(delays),
        },
        "runners": {
            name: {**r, "by_status": dict(sorted(r["by_status"].items())), "models": sorted(r["models"]),
                   "cost_usd": round(r["cost_usd"], 6)}
            for name, r in sorted(runners.items())
        },
        "usage": {"attempts": len(attempts), "input_tokens": input_tokens, "output_tokens": output_tokens,
                  "cost_usd": round(cost, 6)},
        "api": _api_view(api_rows),
        "egress": _egress_view(egress_rows),
        "network": dict(sorted(Counter((job.policy or {}).get("network", "sealed") for job in finished).items())),
        "unsealed_jobs": sum(1 for job in finished if (job.policy or {}).get("network") in UNSEALED),
        "review": review_stats(finished + awaiting),
        "evaluation": evaluation_stats(finished + awaiting),
        "duration_seconds": _summary(durations),
        "queue_wait_seconds": _summary(waits),
        "footprint": _footprint_view(footprint),
        "hosts": _hosts_view(hosts or [], finished),
    }


def _hosts_view(hosts: list[dict], finished: list[Job]) -> list[dict[str, Any]]:
    ran = Counter(job.host_id for job in finished)
    view = [{**h, "finished": ran.pop(h["host"], 0)} for h in hosts]
    view += [{"host": name, "state": "unknown", "finished": n} for name, n in sorted(ran.items(), key=str) if name]
    return view


API_TOKENS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _api_view(rows: list) -> dict[str, Any]:
    """Per-request figures of the sealed jobs' gateways, summed (overall and by runner)."""
    view: dict[str, Any] = {"requests": 0, "by_status": Counter(), **{k: 0 for k in API_TOKENS}, "runners": {}}
    for runner, status, n, *tokens in rows:
        per = view["runners"].setdefault(runner, {"requests": 0, **{k: 0 for k in API_TOKENS}})
        for target in (view, per):
            target["requests"] += n
            for key, value in zip(API_TOKENS, tokens, strict=True):
                target[key] += int(value or 0)
        view["by_status"][str(status)] += n
    view["by_status"] = dict(sorted(view["by_status"].items()))
    return view


def _egress_view(rows: list) -> dict[str, Any]:
    counts: Counter = Counter()
    denied: Counter = Counter()
    for decision, host, port, n in rows:
        counts[decision] += n
        if decision == "denied":
            denied[f"{host}:{port}"] += n
    return {"allowed": counts.get("allowed", 0), "denied": counts.get("denied", 0),
            "denied_by_destination": dict(denied.most_common(20))}


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.1f}s"
    if value < 7200:
        return f"{value / 60:.1f}m"
    return f"{value / 3600:.1f}h"


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_text(report: dict[str, Any]) -> str:
    """The report for a terminal."""
    w, jobs, rl = report["window"], report["jobs"], report["rate_limits"]
    lines = [f"window       {w['since'][:19]}Z .. {w['until'][:19]}Z ({w['days']:g} days)"]
    outcomes = ", ".join(f"{n} {st}" for st, n in jobs["by_status"].items() if n) or "none"
    lines.append(f"finished     {jobs['finished']} jobs: {outcomes}")
    if jobs["active"]:
        lines.append("active now   " + ", ".join(f"{n} {st}" for st, n in jobs["active"].items()))
    rate = report["completion_rate"]
    done = jobs["by_status"].get("succeeded", 0)
    lines.append(f"completion   {_pct(rate)} ({done}/{jobs['finished']} succeeded)")
    rb = report["rollbacks"]
    lines.append(f"rollbacks    {rb['total']}: {rb['tests_failed']} tests failed, {rb['agent_error']} agent error")
    st, to = report["stalls"], report["timeouts"]
    lines.append(f"stalls       {st['events']} ({st['jobs_stalled']} jobs ended stalled)")
    lines.append(f"timeouts     {to['total']} ({to['agent']} agent, {to['tests']} tests)")
    per_day = "-" if rl["per_24h"] is None else f"{rl['per_24h']:g}"
    lines.append(f"rate limits  {rl['events']} events, {per_day} per 24 h; mean wait {_secs(rl['mean_wait_seconds'])}")
    if rl["busy_windows"]:
        lines.append(f"             {rl['per_24h_in_busy_windows']:g} per 24 h in {len(rl['busy_windows'])} "
                     f"windows with more than {rl['busy_window_jobs']} jobs")
    else:
        lines.append(f"             no 24 h window had more than {rl['busy_window_jobs']} jobs")
    rv = report.get("review") or {}
    if rv.get("tests_passed"):
        lines.append(f"review       {rv['reviewed']} of {rv['tests_passed']} jobs whose tests passed waited for a "
                     f"person ({_pct(rv['review_share'])}); mean wait {_secs(rv['mean_review_wait_seconds'])}; "
                     f"{rv['awaiting_review']} awaiting now")
    ev = report.get("evaluation") or {}
    if ev.get("graded"):
        lines.append(f"evaluation   {ev['graded']} graded: {ev['test_writing']} wrote tests "
                     f"({_pct(ev['test_writing_share'])}, {ev['hardening']} only tests), proof rate "
                     f"{_pct(ev['proof_rate'])}; {ev['weak_test_rejections']} weak-test rejections, "
                     f"{ev['regressions_caught']} regressions caught, {ev['flaky_tests']} flaky tests")
    d, q = report["duration_seconds"], report["queue_wait_seconds"]
    lines.append(f"duration     p50 {_secs(d['p50'])}, p95 {_secs(d['p95'])} ({d['count']} jobs)")
    lines.append(f"queue wait   p50 {_secs(q['p50'])}, p95 {_secs(q['p95'])}")
    u = report["usage"]
    lines.append(f"usage        {u['input_tokens']} input + {u['output_tokens']} output tokens, "
                 f"${u['cost_usd']:.4f} over {u['attempts']} attempts")
    api, eg = report["api"], report["egress"]
    if api["requests"]:
        lines.append(f"api usage    {api['requests']} requests of sealed jobs, as the API reported them: "
                     f"{api['input_tokens']} input + {api['output_tokens']} output tokens, "
                     f"{api['cache_read_input_tokens']} cache-read, {api['cache_creation_input_tokens']} cache-write; "
                     + ", ".join(f"{n}x {st}" for st, n in api["by_status"].items()))
    if eg["allowed"] or eg["denied"]:
        top = ", ".join(f"{dest} x{n}" for dest, n in list(eg["denied_by_destination"].items())[:5])
        lines.append(f"egress       {eg['allowed']} allowed, {eg['denied']} denied" + (f" ({top})" if top else ""))
    if report["network"]:
        unsealed = report["unsealed_jobs"]
        lines.append("network      " + ", ".join(f"{n} {net}" for net, n in report["network"].items())
                     + (f"; {unsealed} UNSEALED (bridge/host opt-in)" if unsealed else ""))
    for name, r in report["runners"].items():
        statuses = ", ".join(f"{n} {s}" for s, n in r["by_status"].items()) or "no finished jobs"
        lines.append(f"runner       {name}: {r['jobs']} jobs ({statuses}); models {', '.join(r['models']) or '-'}; "
                     f"{r['rate_limit_events']} rate limits; ${r['cost_usd']:.4f}")
    for h in report.get("hosts") or []:
        if h["state"] == "unknown":
            lines.append(f"host         {h['host']}: {h['finished']} jobs finished (no host row)")
            continue
        lines.append(f"host         {h['host']} {h['state']}, last seen {_secs(h['last_seen_seconds'])} ago: "
                     f"{h['finished']} jobs finished, {h['running']} running; {h['reserved']['cpus']:g} of "
                     f"{h['budget']['cpus']:g} cpus, {_mib(h['reserved']['memory'])} of {_mib(h['budget']['memory'])}")
    f = report["footprint"]
    if f.get("budget"):
        b = f["budget"]
        lines.append(f"footprint    executor {f['executor']}: rss {_mib(f.get('executor_rss'))} of "
                     f"{_mib(b.get('reserve_memory'))} reserved, cpu {f.get('executor_cpu_percent') or 0:.1f}%")
        lines.append(f"             jobs {f.get('jobs_cpu_cores') or 0:.2f} of {b.get('cpus', 0):g} cpus, "
                     f"{_mib(f.get('jobs_memory'))} of {_mib(b.get('memory'))}; "
                     f"{f.get('running_jobs', 0)} running, {f.get('queue_length') or 0} queued")
    else:
        lines.append(f"footprint    executor {f['executor']}")
    if f.get("note"):
        lines.append(f"             {f['note']}")
    return "\n".join(lines)
