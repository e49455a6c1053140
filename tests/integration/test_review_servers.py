"""Review notifications and the review page over real loopback servers: the webhook a notifier posts to, and
the page's own HTTP server (moved from the unit tier, which starts no server)."""

from __future__ import annotations

import http.server
import json
import stat
import threading
import urllib.error
import urllib.request
from pathlib import Path


from executor.settings import Settings
from executor.store import Job, Status, Store
from executor.surfaces.notify import Notifier, payload
from tests.conftest import wait_for
from tests.unit.upper_tree import OWNER, require_root, write



# -------------------------------------------------------------------------------------- notifications


class Hook:
    """A webhook on loopback that fails its first ``fail`` requests with 500."""

    def __init__(self, fail: int = 0) -> None:
        self.bodies: list[dict] = []
        self.hits = 0
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.hits += 1
                if hook.hits <= fail:
                    self.send_response(500)
                    self.end_headers()
                    return
                hook.bodies.append(json.loads(body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?topic=executor"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _job(status: Status, **fields) -> Job:
    return Job(id="n1", session_id="n1", runner="r", model_requested="m", workspace="/w", prompt="p",
               policy_name="default", status=status, **fields)


def test_notification_is_retried_after_a_failure():
    hook = Hook(fail=2)
    try:
        notifier = Notifier(hook.url, backoff=0.05, ui_url="http://127.0.0.1:8765")
        notifier.job_event(_job(Status.awaiting_review, review_reasons=[{"message": "changes tests/**"}]))
        wait_for(lambda: hook.bodies, 10, "the notification to arrive", interval=0.05)
        notifier.close()
    finally:
        hook.close()
    assert hook.hits == 3 and notifier.delivered == 1
    [body] = hook.bodies
    assert body["event"] == "awaiting_review" and body["job"] == "n1" and body["reasons"] == ["changes tests/**"]
    assert body["topic"] == "executor" and body["url"] == "http://127.0.0.1:8765/jobs/n1"
    for key in ("title", "message", "text", "content"):
        assert "n1" in body[key]


def test_an_unreachable_webhook_never_blocks():
    """Every job_event returns while the webhook holds the first delivery unanswered: the serving loop's
    callers never wait on a notification (asserted by order: the hook answers only after they all returned)."""
    held, answer = threading.Event(), threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            held.set()
            answer.wait(30)
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    notifier = Notifier(f"http://127.0.0.1:{server.server_address[1]}/hook", attempts=1, backoff=0.05)
    try:
        notifier.job_event(_job(Status.failed, reason="timeout", error="too slow"))
        wait_for(held.is_set, 10, "the first delivery to reach the webhook", interval=0.01)
        for _ in range(4):
            notifier.job_event(_job(Status.failed, reason="timeout", error="too slow"))
        assert not answer.is_set() and notifier.failed == 0  # all five returned; the first is still held
    finally:
        answer.set()
        notifier.close(timeout=10)
        server.shutdown()
        server.server_close()
    assert notifier.failed == 5 and notifier.delivered == 0
    body = payload(_job(Status.failed, reason="timeout", error="too slow"))
    assert body["event"] == "failed" and "timeout" in body["message"]


# ------------------------------------------------------------------------------------ the web page


def _get(url: str, headers: dict | None = None, data: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _web(tmp_path: Path, **settings):
    from executor.surfaces.web import serve_web

    s = Settings(home=tmp_path / "home", policies=tmp_path / "p", ui_port=0, **settings)
    store = Store(s.db_path)
    server = serve_web(s, store)
    return server, store, f"http://127.0.0.1:{server.port}"


def test_web_on_loopback_serves_and_checks_host_and_csrf(tmp_path):
    from executor.surfaces.web import page_token

    server, store, base = _web(tmp_path)
    auth = {"Authorization": f"Bearer {page_token(Settings(home=tmp_path / 'home'))}"}
    try:
        status, body = _get(base + "/", headers=auth)
        assert status == 200 and "Review queue" in body
        status, _ = _get(base + "/", headers={"Host": "evil.example:80", **auth})
        assert status == 403  # DNS rebinding
        status, body = _get(base + "/jobs/x/approve", data=b"csrf=wrong", headers=auth)
        assert status == 403 and "CSRF" in body
    finally:
        server.close()
        store.close()


def test_web_needs_its_token_on_loopback_too_and_makes_one_at_first_start(tmp_path):
    """A job sharing the host's loopback must not reach a decision: no request passes without the token, and
    the token the executor made for itself is a root-only file in the state root."""
    server, store, base = _web(tmp_path)
    try:
        for path in ("/", "/healthz", "/jobs/x"):
            status, body = _get(base + path)
            assert status == 403 and "token is required" in body and "executor review url" in body
        status, _ = _get(base + "/jobs/x/approve", data=b"csrf=anything")
        assert status == 403
        token_file = tmp_path / "home" / "ui-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and token_file.stat().st_uid == 0
        token = token_file.read_text().strip()
        assert len(token) >= 32
        assert _get(base + "/", headers={"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        server.close()
        store.close()


def test_web_with_a_token_requires_it(tmp_path):
    server, store, base = _web(tmp_path, ui_host="0.0.0.0", ui_token="s3cret-token-value")
    try:
        assert _get(base + "/")[0] == 403
        assert _get(base + "/", headers={"Authorization": "Bearer nope"})[0] == 403
        status, body = _get(base + "/", headers={"Authorization": "Bearer s3cret-token-value"})
        assert status == 200 and "Review queue" in body
        status, _ = _get(base + "/?token=s3cret-token-value")
        assert status == 303  # the token moves into a cookie
        assert _get(base + "/", headers={"Cookie": "executor_ui_token=s3cret-token-value"})[0] == 200
    finally:
        server.close()
        store.close()


def test_notifications_come_for_every_unsuccessful_end_and_review_naming_runner_and_reason():
    from executor.surfaces.notify import kind_of

    endings = {
        "tests_failed": _job(Status.rolled_back, reason="tests_failed", error="the tests failed (exit 1): make"),
        "rolled_back": _job(Status.rolled_back, reason="agent_error", error="the agent did not succeed"),
        "timeout": _job(Status.failed, reason="timeout", error="ran longer than 30m"),
        "failed": _job(Status.failed, reason="rate_limited", error="r failed: rate limited after 4 attempts"),
        "stalled": _job(Status.stalled, reason="stalled", error="no progress for 300s"),
        "review": _job(Status.awaiting_review, review_reasons=[{"message": "changes tests/**"}]),
        "succeeded": _job(Status.succeeded, reason="committed"),
    }
    assert {kind: kind_of(job) for kind, job in endings.items()} == {k: k for k in endings}
    hook = Hook()
    try:
        notifier = Notifier(hook.url, backoff=0.05)
        for job in endings.values():
            notifier.job_event(job)
        wait_for(lambda: len(hook.bodies) >= 6, 10, "six notifications", interval=0.05)
        notifier.close()
        picky = Notifier(hook.url, backoff=0.05, kinds=["succeeded"])
        picky.job_event(endings["succeeded"])
        picky.job_event(endings["stalled"])
        wait_for(lambda: len(hook.bodies) >= 7, 10, "the succeeded notification", interval=0.05)
        picky.close()
    finally:
        hook.close()
    kinds = [b["kind"] for b in hook.bodies]
    assert sorted(kinds[:6]) == sorted(k for k in endings if k != "succeeded") and kinds[6:] == ["succeeded"]
    for body in hook.bodies[:6]:
        assert "runner r" in body["title"] and "runner r" in body["message"]
        if body["kind"] != "review":
            assert body["reason"] in body["title"]


# ------------------------------------------------------------------------------------------ the review page


def test_the_review_page_shows_the_evaluation_above_the_diff(tmp_path: Path):
    require_root()
    from executor.clock import utcnow
    from executor.store import Job, Status
    from executor.surfaces.web import page_token
    
    server, store, base = _web(tmp_path, workspace_roots=[tmp_path])
    try:
        repo = tmp_path / "repo"
        write(repo / "calc.py", "old\n")
        store.add_job(Job(id="ev", session_id="ev", runner="r", model_requested="m", workspace=str(repo),
                          prompt="p", policy_name="default", repo_uid=OWNER, repo_gid=OWNER))
        store.transition("ev", Status.queued, Status.running, attempts=1, start_ns=0, started_at=utcnow())
        store.transition("ev", Status.running, Status.testing)
        write(tmp_path / "home/jobs/ev/upper/calc.py", "new\n")
        record = {"kind": "tests_and_code", "verdict": "weak_tests", "proved": False, "fail_to_pass": [],
                  "broken": [], "flaky": ["tests.test_f::test_<script>flip"], "weak": ["tests.test_sub::test_sub"],
                  "runs": [{"run": "after", "exit_code": 0}, {"run": "before", "cached": True}]}
        store.transition("ev", Status.testing, Status.awaiting_review, reason="review", review_since=utcnow(),
                         evaluation=record, review_reasons=[{"trigger": "weak_tests", "message": "weak tests"}])
        auth = {"Authorization": f"Bearer {page_token(Settings(home=tmp_path / 'home'))}"}
        status, body = _get(base + "/jobs/ev", headers=auth)
    finally:
        server.close()
        store.close()
    assert status == 200
    assert 'id="evaluation"' in body and body.index('id="evaluation"') < body.index("Change (against")
    assert "tests.test_sub::test_sub" in body and "weak_tests" in body and "before (cached)" in body
    assert "test_&lt;script&gt;flip" in body and "<script>flip" not in body  # a test's name is the agent's text
