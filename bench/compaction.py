"""Benchmark: request size of follow-up jobs, ``resume`` (the previous conversation as it is) against
``compact`` (a fresh conversation carrying the session brief), on real traffic.

Run by hand (as root, with the Docker engine up and the sandbox image built):

    .venv/bin/python bench/compaction.py [--sessions 10] [--jobs 6] [--budget-cpus 3] [--json out.json]

The corpus: a real Python project (the pure-Python ``tenacity`` package copied from this virtualenv, plus a
``tests/test_core.py`` of real tests), one copy per session and mode. Each session is ``--jobs`` jobs
run one after the other through the real executor (spool, overlay, real Claude Code CLI in the sandbox,
test gate ``python3 -m pytest -q``). The scripted agent of each job Reads real source files (the module
it will change and the test file), runs the suite through Bash (real output), Reads two more modules
for context, Edits the module (a new helper before an existing top-level definition), Writes a test for
it, runs ``python3 -m pytest -q`` again and ends with a message (some name open items). Some jobs write a failing test: the gate rolls
them back. Jobs name skills (``policies/skills/*.md``). The very same scripts run in both modes.

Each session's agent traffic goes to its own ``ScriptedAPI`` (a runner per session), which records every
request with its size. The small model of ``compact`` is a scripted Messages API too (through the real
``anthropic`` SDK path of ``executor.compaction``) that writes extractive summaries (a module's docstring
and top-level names, a job's request, files and test outcome); its token counts are bytes / 4 like the
agent's, its cost is priced as Haiku 4.5 ($1 / $5 per MTok); its latency is local, not Haiku's.

Reported per session and overall: mean agent request size in bytes and estimated tokens (bytes / 4, the
same measure for both modes), over all requests and over the follow-up jobs' requests; the saving; the
small model's cost and latency per follow-up job; and the retention checks (``compaction.
retention_problems``: the brief names every file the session changed and read, the test command and
its last outcome, every skill in use, the last job's open items). Nothing here asserts on timing.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import docker  # noqa: E402

from executor.intake.spool import Spool  # noqa: E402
from executor.scheduling.service import Executor  # noqa: E402
from executor.session import brief as session_brief  # noqa: E402
from executor.session import history as session_history  # noqa: E402
from executor.session.summarizer import estimate_tokens  # noqa: E402
from executor.settings import Settings  # noqa: E402
from executor.store import TERMINAL  # noqa: E402
from tests.scripted_api import ScriptedAPI, Turn  # noqa: E402

IMAGE = "executor-sandbox:latest"
MODEL = "claude-sonnet-4-5"
SMALL = "claude-haiku-4-5"
TOKEN_VAR = "BENCH_RUNNER_TOKEN"
SMALL_VAR = "BENCH_SMALL_TOKEN"
UID = 1000
PYTEST = "PYTHONDONTWRITEBYTECODE=1 python3 -m pytest -q -p no:cacheprovider"
EDIT_TARGETS = ["wait.py", "stop.py", "retry.py", "_utils.py", "before_sleep.py", "after.py", "nap.py"]
CONTEXT = ["__init__.py", "retry.py", "stop.py", "wait.py", "before.py", "_utils.py"]
SKILLS = {
    "testing": ("---\ndescription: How tests are written and run in this repository\n---\n# Testing\n"
                "Every change comes with a test under tests/, named test_<topic>.py. Run the whole suite with "
                "`python3 -m pytest -q` before you finish; never leave a failing test behind. Tests must not "
                "sleep: use wait_fixed(0) or a fake sleep. Prefer one behaviour per test function, plain "
                "asserts, pytest.raises for errors. A helper that is not exported is imported from its module.\n"),
    "style": ("---\ndescription: Code style of the tenacity package\n---\n# Style\nFollow the surrounding code: "
              "type hints on public functions, docstrings in the imperative, 4-space indentation, no "
              "trailing whitespace, line length 120. New helpers go before the first class that uses them. "
              "Keep modules import-light: no new third-party imports.\n"),
    "release": ("---\ndescription: How a change is prepared for release (changelog, version)\n---\n# Release\n"
                "Each user-visible change gets a line in the changelog under 'Unreleased'. Do not bump the "
                "version yourself; the maintainers do at release time. Mention new public names in the "
                "module's __all__ when it has one.\n"),
}

TEST_CORE = '''"""Behaviour of tenacity that the project relies on."""
import pytest

from tenacity import RetryError, retry, retry_if_exception_type, stop_after_attempt, wait_fixed
from tenacity.wait import wait_exponential


def test_retries_until_success():
    calls = []

    @retry(stop=stop_after_attempt(5), wait=wait_fixed(0))
    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ValueError("not yet")
        return "ok"

    assert flaky() == "ok" and len(calls) == 3


def test_gives_up_after_the_last_attempt():
    @retry(stop=stop_after_attempt(2), wait=wait_fixed(0))
    def always():
        raise ValueError("no")

    with pytest.raises(RetryError):
        always()


def test_only_retries_the_named_error():
    @retry(retry=retry_if_exception_type(KeyError), stop=stop_after_attempt(3), wait=wait_fixed(0))
    def wrong():
        raise ValueError("not retried")

    with pytest.raises(ValueError):
        wrong()


def test_exponential_wait_is_capped():
    class State:
        attempt_number = 10

    assert wait_exponential(multiplier=1, max=5)(State()) == 5
'''


# ------------------------------------------------------------------------------------------- corpus


def make_project(path: Path) -> None:
    import tenacity

    source = Path(tenacity.__file__).parent
    shutil.copytree(source, path / "tenacity", ignore=shutil.ignore_patterns("__pycache__", "tornadoweb.py"))
    (path / "tests").mkdir(parents=True)
    (path / "tests" / "test_core.py").write_text(TEST_CORE)
    (path / "README.md").write_text("# retry-kit\nA vendored copy of tenacity with project tests.\n")


def anchor_of(text: str) -> str:
    """The last top-level ``def``/``class`` line that occurs once: a new helper goes before it."""
    lines = [ln for ln in text.splitlines() if re.match(r"^(class|def) \w+", ln)]
    for line in reversed(lines):
        if text.count(line) == 1:
            return line
    raise ValueError("no unique top-level definition")


def job_plan(project: Path, s: int, k: int, jobs: int) -> dict:
    target = EDIT_TARGETS[(s + k) % len(EDIT_TARGETS)]
    others = [c for c in CONTEXT if c != target]
    context, context2 = others[(s * 2 + k) % len(others)], others[(s * 2 + k + 3) % len(others)]
    name = f"bench_helper_s{s}_j{k}"
    factor = s + k + 2
    fails = (s % 3 == 0 and k == 2)
    anchor = anchor_of((project / "tenacity" / target).read_text())
    module = target[:-3]
    helper = (f'def {name}(delay: float) -> float:\n    """Scale a delay by {factor} (job {k} of session {s})."""\n'
              f"    return delay * {factor}\n\n\n")
    expected = factor * 2 + (1 if fails else 0)
    test = (f"from tenacity.{module} import {name}\n\n\ndef test_{name}():\n    assert {name}(2) == {expected}\n")
    test_path = f"tests/test_s{s}_j{k}.py"
    final = (f"Added `{name}` to tenacity/{target} (scales a delay by {factor}) and {test_path}. "
             + ("The new test fails: the expected value is off by one." if fails else "The suite passes."))
    if k == jobs - 1 or k == 1:
        final += (f"\nOpen items:\n- export {name} from tenacity/__init__.py\n"
                  f"- TODO: document {name} in README.md")
    skills = {0: ["testing"], 1: ["style"], 2: ["testing", "style"], 3: ["release"], 4: ["testing"]}[k % 5]
    turns = [
        Turn.tools(("Read", {"file_path": f"/workspace/tenacity/{target}"}),
                   ("Read", {"file_path": "/workspace/tests/test_core.py"})),
        Turn.tool("Bash", {"command": PYTEST, "description": "run the tests before the change"},
                  text="First, the state of the suite before any change."),
        Turn.tools(("Read", {"file_path": f"/workspace/tenacity/{context}"}),
                   ("Read", {"file_path": f"/workspace/tenacity/{context2}"})),
        Turn.tool("Edit", {"file_path": f"/workspace/tenacity/{target}", "old_string": anchor,
                           "new_string": helper + anchor}),
        Turn.tool("Write", {"file_path": f"/workspace/{test_path}", "content": test}),
        Turn.tool("Bash", {"command": PYTEST, "description": "run the tests"}),
        Turn.text(final),
    ]
    prompt = (f"Session {s}, task {k}: add a helper `{name}(delay)` to tenacity/{target} that scales a delay "
              f"by {factor}, with a test in {test_path}; run the tests.")
    return {"id": f"s{s}-j{k}", "prompt": prompt, "turns": turns, "skills": skills, "fails": fails}


# ------------------------------------------------------------------------------------- small model


def extractive(prompt: str) -> str:
    """What the scripted small model answers: a short extractive summary of the item it is shown."""
    if prompt.startswith("A file the session read"):
        path = prompt.splitlines()[0].split(": ", 1)[1]
        code = [re.sub(r"^\s*\d+\t", "", ln) for ln in prompt.splitlines() if re.match(r"^\s*\d+\t", ln)]
        names = [m.group(2) for ln in code for m in [re.match(r"^(class|def) (\w+)", ln)] if m]
        doc = next((ln.strip().strip('"') for ln in code if ln.strip().startswith('"""') and len(ln.strip()) > 6), "")
        task = re.search(r"Tasks of the session that read it:\n- (.*)", prompt)
        out = [f"- {path}: " + (doc or "Python source") + (f"; defines {', '.join(names[:8])}" if names else "")]
        out.append(f"- read as context for: {task.group(1)[:120] if task else 'the task'}; not changed")
        return "\n".join(out)
    request = re.search(r"request: (.*)", prompt)
    files = re.search(r"files it changed: (.*)", prompt)
    gate = re.search(r"test gate: .* -> (.*)", prompt)
    status = re.search(r"status (\w+)", prompt)
    line = (f"requested {(request.group(1) if request else '?')[:140]}, implemented it in "
            f"({files.group(1) if files else 'no files'}), tests: {gate.group(1) if gate else 'not run'}")
    if status and status.group(1) != "succeeded":
        line += f"; {status.group(1)}: the test gate failed, the change was not committed"
    return line


class SmallModelAPI(ScriptedAPI):
    def _next_turn(self, body: dict):  # type: ignore[override]
        text = "\n".join(str(m.get("content")) for m in body.get("messages") or [] if m.get("role") == "user")
        return False, "", Turn.text(extractive(text))


# ---------------------------------------------------------------------------------------------- run


def run_mode(mode: str, base: Path, template: Path, plans: list[list[dict]], args) -> dict:
    home, policies, repos = base / "home", base / "policies", base / "repos"
    for d in (home, policies / "skills", repos):
        d.mkdir(parents=True)
    for name, text in SKILLS.items():
        (policies / "skills" / f"{name}.md").write_text(text)
    (policies / "default.toml").write_text(
        f'cpus = 1.0\nmemory = "1g"\npids = 512\ntimeout = "10m"\nnetwork = "host"\n'
        f'test_command = "{PYTEST}"\ntest_timeout = "5m"\ncontext = "{mode}"\nreview = "never"\n')
    apis = []
    runners = ""
    for s, plan in enumerate(plans):
        api = ScriptedAPI([turn for job in plan for turn in job["turns"]]).start()
        apis.append(api)
        runners += f'[runners.s{s}]\nmodel = "{MODEL}"\nauth_env = "{TOKEN_VAR}"\nbase_url = "{api.base_url}"\n'
        shutil.copytree(template, repos / f"s{s}")
    (policies / "runners.toml").write_text(runners)
    for path in [repos, *repos.rglob("*")]:
        import os
        os.lchown(path, UID, UID)
    small = SmallModelAPI(side_filter=lambda b: False).start()
    settings = Settings(home=home, policies=policies, workspace_roots=[repos], sandbox_image=IMAGE,
                        poll_interval=0.2, result_grace=5.0, budget_cpus=args.budget_cpus, budget_memory="12g",
                        compaction_model=SMALL, compaction_auth_env=SMALL_VAR, compaction_base_url=small.base_url)
    executor = Executor(settings, {TOKEN_VAR: "sk-fake", SMALL_VAR: "sk-fake-small"}, docker.from_env(timeout=120))
    stop = threading.Event()
    server = threading.Thread(target=executor.serve, args=(stop,), daemon=True)
    server.start()
    spans: dict[str, tuple[int, int]] = {}
    started = time.monotonic()

    def session(s: int) -> None:
        api = apis[s]
        for job in plans[s]:
            before = len(api.requests)
            spec = {"id": f"{mode}-{job['id']}", "session_id": f"{mode}-s{s}", "runner": f"s{s}",
                    "workspace": str(repos / f"s{s}"), "prompt": job["prompt"], "skills": job["skills"]}
            Spool(home / "spool").write(json.dumps(spec).encode())
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                row = executor.store.get(spec["id"])
                if row is not None and row.status in TERMINAL:
                    break
                time.sleep(0.3)
            spans[spec["id"]] = (before, len(api.requests))

    threads = [threading.Thread(target=session, args=(s,)) for s in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    stop.set()
    server.join(timeout=120)
    store = executor.store
    result = {"mode": mode, "wall": wall, "sessions": []}
    for s, plan in enumerate(plans):
        requests = [r for r in apis[s].requests if r.is_messages]
        jobs = []
        for job in plan:
            job_id = f"{mode}-{job['id']}"
            row = store.get(job_id)
            a, b = spans[job_id]
            sizes = [r.size for r in apis[s].requests[a:b] if r.is_messages]
            rows = store.compactions(job_id=job_id)
            event = next((e.data for e in store.events(job_id=job_id) if e.kind == "compaction"), None)
            retention = None
            if mode == "compact" and event and event.get("brief") and row.session_id:
                earlier = session_history.earlier_jobs(store, row, row.session_id)
                h = session_history.history(store, row.session_id, earlier, row.skills or [])
                retention = session_brief.retention_problems(event["brief"], h)
                retention += [f"skill {n} not in full" for n in row.skills or []
                              if f"### Skill {n} (in full)" not in event["brief"]]
            jobs.append({"id": job_id, "status": row.status.value, "reason": row.reason, "sizes": sizes,
                         "compaction": row.compaction, "brief_size": (event or {}).get("brief_size"),
                         "small_cost": sum(r.cost_usd or 0 for r in rows),
                         "small_tokens": sum((r.input_tokens or 0) + (r.output_tokens or 0) for r in rows),
                         "small_calls": sum(1 for r in rows if r.model and not r.reused_from),
                         "small_latency": (event or {}).get("latency"), "retention": retention})
        result["sessions"].append({"session": s, "requests": len(requests), "jobs": jobs})
    for api in apis:
        api.stop()
    result["small_requests"] = len([r for r in small.requests if r.is_messages])
    result["small_bytes"] = sum(r.size for r in small.requests if r.is_messages)
    small.stop()
    store.close()
    return result


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def report(resume: dict, compact: dict) -> dict:
    tok = estimate_tokens
    rows = []
    print(f"{'session':8} {'jobs':>5} {'resume B':>10} {'compact B':>10} {'resume tok':>10} {'compact tok':>11} "
          f"{'saving':>7} {'f-up saving':>11} {'$/job':>8} {'lat/job':>8} {'retention':>9}  statuses")
    all_r, all_c, fu_r, fu_c, costs, lats, retained, checked = [], [], [], [], [], [], 0, 0
    for sr, sc in zip(resume["sessions"], compact["sessions"]):
        r = [x for j in sr["jobs"] for x in j["sizes"]]
        c = [x for j in sc["jobs"] for x in j["sizes"]]
        fr = [x for j in sr["jobs"][1:] for x in j["sizes"]]
        fc = [x for j in sc["jobs"][1:] for x in j["sizes"]]
        followups = sc["jobs"][1:]
        cost = mean([j["small_cost"] for j in followups])
        lat = mean([j["small_latency"] or 0 for j in followups])
        ok = sum(1 for j in followups if j["retention"] == [])
        retained += ok
        checked += len(followups)
        all_r += r
        all_c += c
        fu_r += fr
        fu_c += fc
        costs += [j["small_cost"] for j in followups]
        lats += [j["small_latency"] or 0 for j in followups]
        saving = 1 - mean(c) / mean(r) if r else 0
        fsaving = 1 - mean(fc) / mean(fr) if fr else 0
        statuses = "".join({"succeeded": "S", "rolled_back": "R"}.get(j["status"], "F") for j in sr["jobs"]) + "/" + \
            "".join({"succeeded": "S", "rolled_back": "R"}.get(j["status"], "F") for j in sc["jobs"])
        print(f"{sr['session']:<8} {len(sr['jobs']):>5} {mean(r):>10.0f} {mean(c):>10.0f} {tok(mean(r)):>10} "
              f"{tok(mean(c)):>11} {saving:>7.1%} {fsaving:>11.1%} {cost:>8.5f} {lat:>7.3f}s {ok:>4}/{len(followups):<4}  {statuses}")
        rows.append({"session": sr["session"], "resume_mean_bytes": mean(r), "compact_mean_bytes": mean(c),
                     "saving": saving, "followup_saving": fsaving, "small_cost_per_job": cost,
                     "small_latency_per_job": lat, "retention_ok": ok, "retention_checked": len(followups)})
    overall = {
        "requests_resume": len(all_r), "requests_compact": len(all_c),
        "resume_mean_bytes": mean(all_r), "compact_mean_bytes": mean(all_c),
        "resume_mean_tokens": tok(mean(all_r)), "compact_mean_tokens": tok(mean(all_c)),
        "saving": 1 - mean(all_c) / mean(all_r),
        "followup_resume_mean_tokens": tok(mean(fu_r)), "followup_compact_mean_tokens": tok(mean(fu_c)),
        "followup_saving": 1 - mean(fu_c) / mean(fu_r),
        "small_cost_per_followup_job": mean(costs), "small_latency_per_followup_job": mean(lats),
        "small_requests": compact["small_requests"], "small_request_bytes": compact["small_bytes"],
        "retention_ok": retained, "retention_checked": checked,
        "wall_resume": resume["wall"], "wall_compact": compact["wall"],
    }
    agent_requests_followup = len(fu_c)
    overall["small_cost_per_agent_request"] = sum(costs) / agent_requests_followup if agent_requests_followup else 0
    print(f"{'overall':8} {'':>5} {mean(all_r):>10.0f} {mean(all_c):>10.0f} {tok(mean(all_r)):>10} "
          f"{tok(mean(all_c)):>11} {overall['saving']:>7.1%} {overall['followup_saving']:>11.1%} "
          f"{mean(costs):>8.5f} {mean(lats):>7.3f}s {retained:>4}/{checked:<4}")
    print(json.dumps(overall, indent=2))
    problems = [(j["id"], j["retention"]) for s in compact["sessions"] for j in s["jobs"] if j["retention"]]
    for job_id, missing in problems:
        print(f"retention: {job_id}: {missing}")
    return {"overall": overall, "sessions": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--budget-cpus", type=float, default=3.0)
    parser.add_argument("--dir", default=None, help="Where the throwaway worlds go (default: a temp dir).")
    parser.add_argument("--json", default=None, help="Write the figures here too.")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = Path(tempfile.mkdtemp(prefix="bench-compaction-", dir=args.dir))
    try:
        template = base / "template"
        make_project(template)
        plans = [[job_plan(template, s, k, args.jobs) for k in range(args.jobs)] for s in range(args.sessions)]
        results = {}
        for mode in ("resume", "compact"):
            print(f"-- {mode}: {args.sessions} sessions x {args.jobs} jobs", flush=True)
            results[mode] = run_mode(mode, base / mode, template, plans, args)
            print(f"   {results[mode]['wall']:.0f} s", flush=True)
        figures = report(results["resume"], results["compact"])
        if args.json:
            Path(args.json).write_text(json.dumps({"figures": figures, "raw": results}, indent=2, default=str))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
