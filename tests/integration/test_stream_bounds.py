"""What an agent writes to its container's stdout cannot size the executor (real engine, image and CLI).

The agent can write anything into the stream the executor reads (``/proc/1/fd/1`` is the container's
stdout): a line of 200 MiB without an end, 100,000 nested brackets, a flood of lines that each make an
event. The executor's memory stays bounded (the line is cut to a note of its size, the queue of read lines
is bounded in bytes), the stored events stop at their cap with one event counting the rest, the job goes on
to its end, and the engine keeps no more of the container's output than its log limit.
"""

from __future__ import annotations

import json
import re
import threading

import psutil

from executor.sandbox.runtime import MAX_LINE, STREAM_EVENT_CAP
from executor.store import Status
from tests.conftest import wait_for, wait_status
from tests.scripted_api import ScriptedAPI, Turn

LINE = 200 * 2**20
NOTE = re.compile(rf"^\[executor: a stream line of (\d+) bytes was cut: longer than {MAX_LINE} bytes\]$")
FLOOD = STREAM_EVENT_CAP + 10_000
HOSTILE = f"""python3 - <<'EOF'
import os
fd = os.open('/proc/1/fd/1', os.O_WRONLY)
chunk = b'x' * (1 << 20)
for _ in range({LINE // 2**20}):
    os.write(fd, chunk)
os.write(fd, b'\\n' + b'[' * 100000 + b']' * 100000 + b'\\n')
os.write(fd, b'{{"type": "zz_flood"}}\\n' * {FLOOD})
print('wrote it all')
EOF"""


class PeakRss:
    """The test process's (the executor's) resident memory, sampled until stopped: its peak above the start."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def growth(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak - self.start


def test_a_hostile_stream_is_cut_capped_and_bounded(world, run_executor, docker_client):
    repo = world.repo("streamer", {"a.txt": "a\n"})
    with ScriptedAPI({"streamer": [Turn.tool("Bash", {"command": HOSTILE, "description": "write"}),
                                   Turn.text("Done.")]}) as api:
        world.write_runners(api.base_url)
        world.write_policy(timeout="10m", stall_after="5m")
        running = run_executor(world.settings())
        store = running.executor.store
        rss = PeakRss()
        world.submit(id="streamer", workspace=str(repo), prompt="streamer: write")
        agent = wait_for(lambda: next(iter(docker_client.containers.list(
            filters={"label": ["io.executor.job=streamer", "io.executor.role=agent"]})), None), 120, "the agent")
        log_config = agent.attrs["HostConfig"]["LogConfig"]
        job = wait_status(store, "streamer", {Status.succeeded, Status.failed, Status.rolled_back}, timeout=600)
        growth = rss.growth()
    # The engine keeps at most two files of 256 MiB of the container's output (outside the job's disk cap).
    assert log_config == {"Type": "json-file", "Config": {"max-size": "256m", "max-file": "2"}}
    assert job.status == Status.succeeded, (job.reason, job.error)
    # The 200 MiB line was never held: what grew is far below even one copy of it.
    assert growth < LINE // 2, f"the executor grew by {growth / 2**20:.0f} MiB while the stream passed"
    events = store.events(job_id="streamer")
    texts = [e.data.get("text", "") for e in events if e.kind == "agent_text"]
    # Cut to notes of its size. The CLI's own lines share that stdout: one it writes meanwhile can land inside
    # the long line and end it early, so the line may come as a few pieces (a short one kept as text).
    cut = [int(m.group(1)) for t in texts if (m := NOTE.search(t))]
    assert cut and all(size > MAX_LINE for size in cut), texts[:5]
    assert LINE - 8 * MAX_LINE <= sum(cut) <= LINE + 64 * 1024, cut
    assert any(t.startswith("[[[[") for t in texts)  # the nested line is text, clipped; it ended nothing
    capped = [e.data for e in events if e.kind == "events_capped"]
    assert len(capped) == 1 and capped[0]["not_stored"] > 0 and capped[0]["cap"] == STREAM_EVENT_CAP
    stream_events = [e for e in events if e.kind not in ("state", "agent_end", "tests", "session_home")]
    assert len(stream_events) <= STREAM_EVENT_CAP + 50  # the cap, and the few events the executor adds itself
    # The command ran to its end and the CLI went on (its tool result reached the model; past the cap its events
    # are counted, not stored)
    assert any("wrote it all" in json.dumps(r.body) for r in api.requests)
