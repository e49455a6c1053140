"""The review web page as a person uses it: a real headless Chromium (selenium, Debian's chromium and
chromium-driver) against ``Executor.serve``'s page, real jobs (the real engine, sandbox image and Claude Code
CLI against a scripted Messages API), and notifications received by a tiny webhook on loopback."""

from __future__ import annotations

import http.server
import json
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from executor.intake.spool import Spool
from executor.store import Status
from executor.surfaces.web import page_token
from tests.conftest import tree_digest, wait_for, wait_status
from tests.scripted_api import ScriptedAPI, Turn

SETTLED = {Status.succeeded, Status.rolled_back, Status.failed, Status.cancelled, Status.awaiting_review}


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


class Webhook:
    """Receives the executor's notifications on 127.0.0.1 (the first one is answered 503: it must be retried)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.hits = 0
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                hook.hits += 1
                self.send_response(503 if hook.hits == 1 else 200)
                self.end_headers()
                if hook.hits > 1:
                    hook.bodies.append(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/executor"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[tuple[str, str]]:
        return [(b["event"], b["job"]) for b in self.bodies]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def submit(world, job_id: str, repo: Path, policy: str) -> None:
    Spool(world.home / "spool").write(json.dumps({"id": job_id, "runner": "scripted", "workspace": str(repo),
                                                  "prompt": f"{job_id}: do it", "policy": policy}).encode())


def body_text(browser) -> str:
    """The page's text, or "" while a navigation replaces the page."""
    try:
        return browser.find_element(By.TAG_NAME, "body").text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def page_url(runner) -> str:
    web = wait_for(lambda: runner.executor.web, 60, "the web page to start")
    return f"http://127.0.0.1:{web.port}"


def test_review_in_the_browser_approve_and_reject(world, run_executor, browser):
    world.write_policy("always", review="always")
    world.write_policy("short", timeout="2s")
    app = "def answer():\n    return 1\n\n\nprint(answer())\n"
    repo = world.repo("web-ok", {"app.py": app, "README.md": "readme\n"})
    other = world.repo("web-no", {"app.py": app})
    slow = world.repo("web-fail", {"app.py": app})
    other_before = tree_digest(other)
    edit = [Turn.tool("Bash", {"command": "sed -i 's/return 1/return 42/' app.py", "description": "edit"}),
            Turn.text("Changed the answer.\nREVIEW: the answer is load-bearing")]
    hook = Webhook()
    try:
        with ScriptedAPI({"web-ok": edit, "web-no": edit, "web-fail": [Turn.hang()]}) as api:
            world.write_runners(api.base_url)
            runner = run_executor(world.settings(ui_port=0, notify_url=hook.url))
            store = runner.executor.store
            base = page_url(runner)
            submit(world, "web-ok", repo, "always")
            submit(world, "web-no", other, "always")
            submit(world, "web-fail", slow, "short")
            for job_id, status in (("web-ok", Status.awaiting_review), ("web-no", Status.awaiting_review),
                                   ("web-fail", Status.failed)):
                job = wait_status(store, job_id, SETTLED, timeout=180)
                assert job.status == status, (job_id, job.reason, job.error)

            # the queue lists both waiting jobs; the failed one is among the recent jobs (the address with
            # the page's token, as `executor review url` prints it, opened once: a cookie keeps it)
            browser.get(base + f"/?token={page_token(runner.executor.settings)}")
            queue = browser.find_element(By.ID, "queue").text
            assert "web-ok" in queue and "web-no" in queue
            assert "the policy reviews every change" in queue and "the answer is load-bearing" in queue
            recent = browser.find_element(By.ID, "recent").text
            assert "web-fail" in recent and "failed" in recent and "timeout" in recent

            # the job's page: reasons, final message, tests, and the coloured diff with the changed line
            browser.find_element(By.LINK_TEXT, "web-ok").click()
            assert browser.current_url.endswith("/jobs/web-ok")
            assert "the answer is load-bearing" in browser.find_element(By.ID, "reasons").text
            assert "Changed the answer." in browser.find_element(By.ID, "final").text
            added = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "table.diff tr.add")]
            removed = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "table.diff tr.del")]
            assert any("return 42" in row for row in added), added
            assert any("return 1" in row for row in removed), removed
            keyword = browser.find_elements(By.CSS_SELECTOR, "table.diff tr.add td.code span.k")
            assert any(k.text == "return" for k in keyword)  # Python colouring, not plain text
            assert "app.py" in browser.find_element(By.CSS_SELECTOR, ".file-head").text
            assert browser.find_element(By.ID, "events").text  # the event log

            browser.find_element(By.ID, "approve").click()
            wait_for(lambda: "The job was approved" in body_text(browser), 30, "the approve page")
            assert browser.find_element(By.ID, "status").text == "succeeded"
            assert (repo / "app.py").read_text() == app.replace("return 1", "return 42")
            assert store.get("web-ok").status == Status.succeeded
            assert store.get("web-ok").reviewed_by.startswith("web (127.0.0.1) with token sha256:")

            browser.get(base + "/jobs/web-no")
            browser.find_element(By.CSS_SELECTOR, "#reject-form textarea").send_keys("no, keep 1")
            browser.find_element(By.ID, "reject").click()
            wait_for(lambda: "The job was rejected" in body_text(browser), 30, "the reject page")
            job = store.get("web-no")
            assert job.status == Status.rolled_back and job.review_note == "no, keep 1"
            assert tree_digest(other) == other_before

            browser.get(base + "/")
            assert "No job waits for review" in browser.find_element(By.TAG_NAME, "body").text

            wanted = {("awaiting_review", "web-ok"), ("awaiting_review", "web-no"), ("failed", "web-fail")}
            wait_for(lambda: wanted <= set(hook.events()), 60, f"notifications (got {hook.events()})")
    finally:
        hook.close()
    assert hook.hits >= 4  # the first POST was refused and retried
    body = next(b for b in hook.bodies if b["job"] == "web-ok")
    assert "the answer is load-bearing" in " ".join(body["reasons"])
    assert body["url"].endswith("/jobs/web-ok") and "web-ok" in body["text"] and "web-ok" in body["content"]


def _status(url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_without_its_token_the_page_refuses_and_review_url_gives_it(world, run_executor, browser):
    import subprocess
    import sys

    runner = run_executor(world.settings(ui_port=0))
    base = page_url(runner)
    browser.delete_all_cookies()
    browser.get(base + "/")
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "refused" in text and "executor review url" in text
    assert "Review queue" not in browser.page_source
    assert _status(base + "/") == 403 and _status(base + "/jobs/anything") == 403
    env = {**world.env(), "EXECUTOR_UI_PORT": base.rsplit(":", 1)[1]}
    url = subprocess.run([str(Path(sys.executable).parent / "executor"), "review", "url"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert url.returncode == 0, url.stderr
    browser.get(url.stdout.strip())
    assert "Review queue" in browser.find_element(By.TAG_NAME, "h1").text


def test_bound_beyond_loopback_with_a_token_the_page_needs_it(world, run_executor, browser):
    token = "review-token-4f1d8c2a"
    runner = run_executor(world.settings(ui_port=0, ui_host="0.0.0.0", ui_token=token))
    base = page_url(runner)
    browser.delete_all_cookies()
    browser.get(base + "/")
    assert "token is required" in browser.find_element(By.TAG_NAME, "body").text
    browser.get(base + f"/?token={token}")  # once: the browser keeps it in a cookie
    assert "Review queue" in browser.find_element(By.TAG_NAME, "h1").text
    assert token not in browser.current_url
    browser.get(base + "/")
    assert "Review queue" in browser.find_element(By.TAG_NAME, "h1").text
    assert _status(base + "/") == 403
