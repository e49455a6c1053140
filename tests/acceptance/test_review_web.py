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
from executor.settings import COMPACTION_MODEL
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


def decision_banner(browser, kind: str):
    """The banner saying how the review ended, once the page shows it (None before)."""
    found = browser.find_elements(By.CSS_SELECTOR, f"#decision.{kind}")
    return found[0] if found else None


def assert_diff(browser) -> None:
    """web-ok's and web-no's change, coloured: ``return 1`` removed, ``return 42`` added, in app.py."""
    added = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "table.diff tr.add")]
    removed = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "table.diff tr.del")]
    assert any("return 42" in row for row in added), added
    assert any("return 1" in row for row in removed), removed
    keyword = browser.find_elements(By.CSS_SELECTOR, "table.diff tr.add td.code span.k")
    assert any(k.text == "return" for k in keyword)  # Python colouring, not plain text
    assert "app.py" in browser.find_element(By.CSS_SELECTOR, ".file-head").text


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

            # the job's page: the decision first (Approve, Reject, Request changes side by side), then the
            # coloured diff, then the agent's final message, tests and the rest
            browser.find_element(By.LINK_TEXT, "web-ok").click()
            assert browser.current_url.endswith("/jobs/web-ok")
            assert "the answer is load-bearing" in browser.find_element(By.ID, "reasons").text
            buttons = [browser.find_element(By.ID, name) for name in ("approve", "reject", "request-changes")]
            assert len({b.location["y"] for b in buttons}) == 1, [b.location for b in buttons]  # one row
            assert buttons[0].location["x"] < buttons[1].location["x"] < buttons[2].location["x"]
            diff = browser.find_element(By.CSS_SELECTOR, "table.diff")
            final = browser.find_element(By.ID, "final")
            assert buttons[0].location["y"] < diff.location["y"] < final.location["y"]
            assert "Changed the answer." in final.text
            assert_diff(browser)
            assert browser.find_element(By.ID, "events").text  # the event log

            browser.find_element(By.ID, "approve").click()
            banner = wait_for(lambda: decision_banner(browser, "approved"), 30, "the approval banner")
            assert "Approved by web (127.0.0.1) with token sha256:" in banner.text
            assert "The change is in the repository" in banner.text
            assert browser.find_element(By.ID, "status").text == "succeeded"
            assert_diff(browser)  # the diff the decision was made on stays on the page
            assert not browser.find_elements(By.ID, "approve")
            assert (repo / "app.py").read_text() == app.replace("return 1", "return 42")
            assert store.get("web-ok").status == Status.succeeded
            assert store.get("web-ok").reviewed_by.startswith("web (127.0.0.1) with token sha256:")

            browser.get(base + "/jobs/web-no")
            browser.find_element(By.ID, "note").send_keys("no, keep 1")
            browser.find_element(By.ID, "reject").click()
            banner = wait_for(lambda: decision_banner(browser, "rejected"), 30, "the rejection banner")
            assert "Rejected by web (127.0.0.1)" in banner.text and "no, keep 1" in banner.text
            assert "approved" not in banner.get_attribute("class")
            assert browser.find_element(By.ID, "reason").text == "rejected"  # next to the status, in red
            assert_diff(browser)
            job = store.get("web-no")
            assert job.status == Status.rolled_back and job.reason == "rejected" and job.review_note == "no, keep 1"
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


def test_request_changes_in_the_browser_queues_a_revision_of_the_kept_change(world, run_executor, browser):
    world.write_policy("always", review="always")
    app = "def answer():\n    return 1\n"
    repo = world.repo("web-rc", {"app.py": app})
    first = [Turn.tool("Bash", {"command": "sed -i 's/return 1/return 42/' app.py", "description": "edit"}),
             Turn.text("Changed the answer.")]
    revise = [Turn.tool("Bash", {"command": "grep -q 'return 42' app.py && sed -i 's/return 42/return 43/' app.py",
                                 "description": "revise"}),
              Turn.text("Made it 43.")]
    with ScriptedAPI({"web-rc-note": revise, "web-rc": first}, models={COMPACTION_MODEL: Turn.text("summary")}) as api:
        world.write_runners(api.base_url)
        runner = run_executor(world.settings(ui_port=0))
        store = runner.executor.store
        base = page_url(runner)
        submit(world, "web-rc", repo, "always")
        assert wait_status(store, "web-rc", SETTLED, timeout=180).status == Status.awaiting_review
        browser.get(base + f"/jobs/web-rc?token={page_token(runner.executor.settings)}")

        browser.find_element(By.ID, "request-changes").click()  # without a note: refused, nothing changes
        assert "say what should change" in wait_for(lambda: browser.find_elements(By.ID, "error"), 30,
                                                    "the refusal")[0].text
        assert store.get("web-rc").status == Status.awaiting_review
        browser.find_element(By.ID, "note").send_keys("web-rc-note: 43, please")
        browser.find_element(By.ID, "request-changes").click()
        banner = wait_for(lambda: decision_banner(browser, "sent-back"), 30, "the changes-requested banner")
        assert "Changes requested by web (127.0.0.1)" in banner.text and "43, please" in banner.text
        [follow] = store.followers("web-rc")
        assert follow.prompt == "web-rc-note: 43, please" and follow.builds_on == "web-rc"
        assert follow.session_id == store.get("web-rc").session_id
        assert (repo / "app.py").read_text() == app  # nothing applied

        banner.find_element(By.CSS_SELECTOR, "a.follow-up").click()
        assert browser.current_url.endswith(f"/jobs/{follow.id}")
        assert "Revises the change of job web-rc" in browser.find_element(By.ID, "origin").text
        again = wait_status(store, follow.id, SETTLED, timeout=180)
        assert again.status == Status.awaiting_review, (again.reason, again.error)
        browser.get(base + f"/jobs/{follow.id}")
        added = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "table.diff tr.add")]
        assert any("return 43" in row for row in added), added  # the whole change, against the repository
        browser.find_element(By.ID, "approve").click()
        wait_for(lambda: decision_banner(browser, "approved"), 30, "the approval banner")
    assert (repo / "app.py").read_text() == app.replace("return 1", "return 43")


def test_a_failed_follow_up_shows_failed_on_the_reviewed_jobs_page_and_cancel_stands_apart(world, run_executor,
                                                                                           browser):
    """The banner of a job sent back follows its follow-up's real status, live (here: the follow-up's API
    refuses its key, so it fails); Cancel is not offered beside the decision; the recent jobs name their host."""
    world.write_policy("always", review="always", cli_max_retries=0)
    app = "def answer():\n    return 1\n"
    repo = world.repo("web-rcf", {"app.py": app})
    first = [Turn.tool("Bash", {"command": "sed -i 's/return 1/return 42/' app.py", "description": "edit"}),
             Turn.text("Changed the answer.")]
    refused = [Turn.error(401, "authentication_error", "invalid x-api-key")] * 4
    script = {"web-rcf-note": refused, "web-rcf": first}  # the note's key first: the revision also names the task
    with ScriptedAPI(script, models={COMPACTION_MODEL: Turn.text("summary")}) as api:
        world.write_runners(api.base_url)
        runner = run_executor(world.settings(ui_port=0))
        store = runner.executor.store
        base = page_url(runner)
        submit(world, "web-rcf", repo, "always")
        assert wait_status(store, "web-rcf", SETTLED, timeout=180).status == Status.awaiting_review
        browser.get(base + f"/jobs/web-rcf?token={page_token(runner.executor.settings)}")

        # Cancel ends the job without a decision: it is not among the decision's buttons, but below the change
        cancel = browser.find_element(By.ID, "cancel")
        assert not browser.find_element(By.ID, "decide").find_elements(By.ID, "cancel")
        diff = browser.find_element(By.CSS_SELECTOR, "table.diff")
        assert browser.find_element(By.ID, "request-changes").location["y"] < diff.location["y"] < cancel.location["y"]

        browser.find_element(By.ID, "note").send_keys("web-rcf-note: make it 43")
        browser.find_element(By.ID, "request-changes").click()
        wait_for(lambda: decision_banner(browser, "sent-back"), 30, "the changes-requested banner")
        [follow] = store.followers("web-rcf")
        browser.execute_script("window.notReloaded = true;")
        ended = wait_status(store, follow.id, SETTLED, timeout=180)
        assert ended.status == Status.failed, (ended.reason, ended.error)
        shown = wait_for(lambda: _follower_status(browser, "failed"), 60, "the follow-up's status on the banner")
        assert shown == "failed"
        assert browser.execute_script("return window.notReloaded === true;")  # followed live, not reloaded
        browser.get(base + "/jobs/web-rcf")
        assert f"{follow.id} (failed)" in browser.find_element(By.ID, "decision").text

        # the recent jobs name the host each ran on
        browser.get(base + "/")
        recent = browser.find_element(By.ID, "recent")
        assert [th.text for th in recent.find_elements(By.TAG_NAME, "th")][:4] == ["job", "status", "reason", "host"]
        [row] = [r for r in recent.find_elements(By.TAG_NAME, "tr") if follow.id in r.text]
        assert row.find_element(By.CSS_SELECTOR, "td.host").text == runner.executor.settings.host_id


def _follower_status(browser, wanted: str) -> str | None:
    found = browser.find_elements(By.CSS_SELECTOR, "#decision .follow-status")
    return found[0].text if found and found[0].text == wanted else None


def test_the_job_page_follows_a_running_job_says_why_a_queued_one_waits_cancels_and_retries(world, run_executor,
                                                                                           browser):
    world.write_policy("slow", timeout="10m")
    repo = world.repo("web-live", {"app.py": "x = 1\n"})
    script = {"web-live": [Turn.tool("Bash", {"command": "sleep 2; echo one", "description": "first"}),
                           Turn.tool("Bash", {"command": "sleep 2; echo two", "description": "second"}),
                           Turn.hang()],
              "web-next": [Turn.text("Done.")]}
    # The retry is a follow-up of the session: its brief's small model must not take the agent's turns.
    with ScriptedAPI(script, models={COMPACTION_MODEL: Turn.text("summary")}) as api:
        world.write_runners(api.base_url)
        runner = run_executor(world.settings(ui_port=0))
        store = runner.executor.store
        base = page_url(runner)
        submit(world, "web-live", repo, "slow")
        submit(world, "web-next", repo, "slow")  # the same workspace: it waits for web-live
        wait_status(store, "web-live", {Status.running}, timeout=120)

        browser.get(base + f"/jobs/web-next?token={page_token(runner.executor.settings)}")
        waiting = wait_for(lambda: _reloaded_text(browser, base + "/jobs/web-next", "waiting", "holds the workspace"),
                           60, "the queued job's reason")
        assert "job web-live holds the workspace" in waiting

        # the running job's log grows on the page without a reload; the stream's raw rows are collapsed
        browser.get(base + "/jobs/web-live")
        assert browser.find_element(By.ID, "live-flag").text == "live"
        browser.execute_script("window.notReloaded = true;")
        wait_for(lambda: "echo two" in browser.find_element(By.ID, "events").text, 120, "a live row")
        assert browser.execute_script("return window.notReloaded === true;")
        raw = browser.find_elements(By.CSS_SELECTOR, "#events tr.raw")
        assert raw and not any(r.is_displayed() for r in raw)
        browser.find_element(By.ID, "show-raw").click()
        assert all(r.is_displayed() for r in raw)

        # Cancel: the job stops, the page reloads by itself and offers Retry; the waiting job then runs
        browser.find_element(By.ID, "cancel").click()
        assert wait_status(store, "web-live", {Status.cancelled}, timeout=60).status == Status.cancelled
        wait_for(lambda: browser.find_elements(By.ID, "retry"), 60, "the Retry button")
        assert browser.find_element(By.ID, "status").text == "cancelled"
        assert wait_status(store, "web-next", {Status.succeeded}, timeout=180).status == Status.succeeded

        browser.find_element(By.ID, "retry").click()
        origin = wait_for(lambda: _text(browser, "origin"), 30, "the retry's page")
        assert "Retry of job web-live" in origin
        new_id = browser.current_url.rsplit("/", 1)[1]
        made = store.get(new_id)
        assert made.follows == "web-live" and made.prompt == "web-live: do it"
        assert made.session_id == store.get("web-live").session_id
        store.request_cancel(new_id)  # its script is spent; it need not run
        wait_status(store, new_id, {Status.cancelled, Status.succeeded, Status.rolled_back}, timeout=120)


def _text(browser, element_id: str) -> str | None:
    """The element's text, or None while it is absent or the page reloads under us (a new job's page follows
    its job and reloads itself when the status changes)."""
    try:
        found = browser.find_elements(By.ID, element_id)
        return found[0].text if found else None
    except StaleElementReferenceException:
        return None


def _reloaded_text(browser, url: str, element_id: str, wanted: str) -> str | None:
    """The element's text once it holds ``wanted`` (reloading the page until it does)."""
    found = browser.find_elements(By.ID, element_id)
    if found and wanted in found[0].text:
        return found[0].text
    browser.get(url)
    return None
