"""Benchmark: the same trivial job per agent (Claude Code, Codex, Gemini CLI), spool to committed, against the same two
containers run by hand.

Run by hand (as root, with the Docker engine up and the sandbox image built):

    EXECUTOR_SANDBOX_IMAGE=executor-sandbox:agents .venv/bin/python bench/agents.py [--pairs 5] [--sealed]

Per agent: a scripted provider on 127.0.0.1 (``tests/scripted_api.py``'s Messages API for Claude Code,
``tests/scripted_responses.py``'s Responses API for Codex, ``tests/scripted_gemini.py`` for Gemini) plays the
model: one tool call that writes ``hello.txt`` (Claude Code's Write, a shell command for the others), then a
message. Through the executor: from the job
file landing in the spool to the job committed (the agent on an overlay of the repository, the test gate
``test -f hello.txt`` in a fresh container, the change applied). By hand: the same two containers through the
same engine calls (``workspace.create``, the agent's own launch, ``run_tests``), without the control plane.
Unsealed (``network = "host"``) by default, as by hand; ``--sealed`` runs the executor's jobs sealed (the
gateway and egress proxy in the path; by hand stays unsealed) and so shows what sealing adds. Paired runs,
medians. Nothing here asserts on timing; it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.latency import UID, GID, IMAGE, _status, log, serve, world  # noqa: E402

MODELS = {"claude-code": "claude-sonnet-4-5", "codex": "gpt-5-codex", "gemini": "gemini-2.5-pro"}


def _provider(agent: str, keys: list[str]):
    if agent == "gemini":
        from tests.scripted_gemini import GTurn, ScriptedGemini

        return ScriptedGemini({k: [GTurn.shell("echo hi > hello.txt"), GTurn.text("Done.")] for k in keys})
    if agent == "codex":
        from tests.scripted_responses import RTurn, ScriptedResponses

        return ScriptedResponses({k: [RTurn.shell("echo hi > hello.txt"), RTurn.text("Done.")] for k in keys})
    from tests.scripted_api import ScriptedAPI, Turn

    answer = [Turn.tool("Write", {"file_path": "/workspace/hello.txt", "content": "hi\n"}), Turn.text("Done.")]
    return ScriptedAPI({k: list(answer) for k in keys})


def trivial_jobs(base: Path, agent: str, pairs: int, sealed: bool) -> tuple[list[float], list[float]]:
    import docker

    from executor.agent.registry import agent_for
    from executor.agent.seam import LaunchRequest
    from executor.intake.spool import Spool
    from executor.policy import Policy, Runner
    from executor.sandbox.deployment import Sandbox
    from executor.sandbox.runtime import agent_spec, run_tests
    from executor.settings import Settings
    from executor.store import TERMINAL
    from executor.transaction import workspace
    from executor.transaction.workspace import Workspace

    home, policies, repos = world(base)
    keys = [f"e{i}" for i in range(pairs)] + [f"h{i}" for i in range(pairs)]
    with _provider(agent, keys) as api:
        (policies / "runners.toml").write_text(f'[runners.r]\nagent = "{agent}"\nmodel = "{MODELS[agent]}"\n'
                                               f'auth_env = "T"\nbase_url = "{api.base_url}"\n')
        network = "sealed" if sealed else "host"
        (policies / "default.toml").write_text(f'network = "{network}"\ntest_command = "test -f hello.txt"\n'
                                               'review = "never"\n')
        settings = Settings(home=home, policies=policies, workspace_roots=[repos], sandbox_image=IMAGE,
                            result_grace=5.0)
        executor, stop, thread = serve(settings, {"T": "sk-bench-0000"})
        sandbox = Sandbox(docker.from_env(timeout=120), IMAGE, f"bench-{agent}")
        runner = Runner(name="r", agent=agent, model=MODELS[agent], auth_env="T", base_url=api.base_url)
        policy = Policy(network="host", test_command="test -f hello.txt")
        spool = Spool(home / "spool")
        watch = sqlite3.connect(settings.db_path, isolation_level=None)
        terminal = {status.value for status in TERMINAL}
        by_executor, by_hand = [], []
        try:
            for i in range(pairs):
                for kind in ("hand", "exec"):
                    repo = repos / f"{kind}{i}"
                    repo.mkdir()
                    (repo / "README.md").write_text("r\n")
                    for p in (repo, repo / "README.md"):
                        os.chown(p, UID, GID)
                time.sleep(0.05)
                ws = Workspace(job_id=f"hand{i}", attempt=1, repo=repos / f"hand{i}", root=base / "hand" / str(i),
                               uid=UID, gid=GID, home=base / "hand-sessions" / str(i))
                started = time.perf_counter()
                workspace.create(sandbox, ws)
                launch = agent_for(runner).launch(LaunchRequest(f"h{i}: write hello.txt", runner, policy,
                                                                {"T": "sk-bench-0000"}, sealed=False))
                config = workspace.write_agent_config(ws, launch.files)  # Gemini's settings file
                container = sandbox.start(agent_spec(ws, policy, launch, config=str(config) if config else None))
                container.wait()
                sandbox.remove(container)
                workspace.create_test_view(sandbox, ws)
                tests = run_tests(sandbox, ws, "test -f hello.txt", policy, should_stop=lambda: None)
                workspace.discard_test_view(sandbox, ws)
                workspace.discard(sandbox, ws)
                by_hand.append(time.perf_counter() - started)
                if tests.exit_code != 0:
                    raise RuntimeError(f"{agent} by hand: the tests failed: {tests.output_tail}")
                started = time.perf_counter()
                spool.write(json.dumps({"id": f"e{i}", "runner": "r", "workspace": str(repos / f"exec{i}"),
                                        "prompt": f"e{i}: write hello.txt"}).encode())
                while _status(watch, f"e{i}") not in terminal:
                    time.sleep(0.005)
                by_executor.append(time.perf_counter() - started)
                job = executor.store.get(f"e{i}")
                if job.status.value != "succeeded":
                    raise RuntimeError(f"{agent} e{i} {job.status.value}: {job.error}")
        finally:
            stop.set()
            thread.join(timeout=120)
    return by_executor, by_hand


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--sealed", action="store_true")
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    from executor.transaction.safefs import remove_tree

    results = {}
    for agent in MODELS:
        base = Path(tempfile.mkdtemp(prefix=f"bench-agents-{agent}-", dir=args.dir))
        try:
            log(f"{agent}: {args.pairs} paired trivial jobs")
            results[agent] = trivial_jobs(base, agent, args.pairs, args.sealed)
        finally:
            remove_tree(base)
    print(f"\na trivial job per agent ({args.pairs} pairs, executor {'sealed' if args.sealed else 'unsealed'}):")
    for agent, (by_executor, by_hand) in results.items():
        ex, hand = statistics.median(by_executor), statistics.median(by_hand)
        print(f"  {agent:12} spool to committed median {ex:.2f} s; by hand median {hand:.2f} s; "
              f"{ex / hand:.2f}x of the floor")
        print("    by hand:  " + " ".join(f"{t:.2f}" for t in by_hand))
        print("    executor: " + " ".join(f"{t:.2f}" for t in by_executor))
    return 0


if __name__ == "__main__":
    sys.exit(main())
