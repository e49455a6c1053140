"""Tests for executor.store: the job status machine, durability settings and the event log. The store's
contract is tested on both engines, a real SQLite file and a real PostgreSQL 15 database (``db_url``);
SQLite's durability settings on SQLite alone."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import text

from executor.errors import IllegalTransition, InvalidJob
from executor.store import TERMINAL, TRANSITIONS, Job, Status, Store
from executor.store.engine import make_engine

LEGAL = sorted(((src, dst) for src, dsts in TRANSITIONS.items() for dst in dsts), key=lambda p: (p[0].value, p[1].value))
ILLEGAL = sorted(((src, dst) for src in Status for dst in Status if dst not in TRANSITIONS.get(src, frozenset())),
                 key=lambda p: (p[0].value, p[1].value))


def make_job(job_id: str = "j1", **fields) -> Job:
    values = dict(id=job_id, session_id=fields.pop("session_id", job_id), runner="scripted",
                  model_requested="claude-sonnet-4-5", workspace="/repos/app", prompt="do it",
                  policy_name="default", policy={"cpus": 1.0})
    values.update(fields)
    return Job(**values)


@pytest.fixture
def db(db_url: str) -> str:
    """The store's URL: each test runs on SQLite and on PostgreSQL."""
    return db_url


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "executor.db"


@pytest.fixture
def store(db: str):
    s = Store(db)
    yield s
    s.close()


def _sql(db: str, statement: str, **params) -> list[tuple]:
    """A statement on a connection of its own (no ORM, no cache, no pool shared with the store)."""
    engine = make_engine(db)
    try:
        with engine.begin() as con:
            result = con.execute(text(statement), params)
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def raw_row(db: str, job_id: str) -> tuple:
    """The job's row straight from the database."""
    rows = _sql(db, "SELECT * FROM job WHERE id = :id", id=job_id)
    return rows[0] if rows else None


def force_status(db: str, job_id: str, status: Status) -> None:
    """Put a job in any status directly (set-up for a transition test)."""
    _sql(db, "UPDATE job SET status = :status WHERE id = :id", status=status.name, id=job_id)


# ---------------------------------------------------------------------------------------------
# the status machine


def test_transition_table_is_what_the_pipeline_relies_on():
    assert {Status.succeeded, Status.rolled_back, Status.failed, Status.cancelled} <= TERMINAL
    assert all(st.terminal == (st in TERMINAL) for st in Status)
    assert not any(st in TRANSITIONS for st in TERMINAL)  # nothing leaves a terminal status
    assert Status.queued in TRANSITIONS[Status.running] and Status.queued in TRANSITIONS[Status.testing]
    assert TRANSITIONS[Status.committing] == {Status.succeeded, Status.failed}


def test_new_job_is_queued(store):
    store.add_job(make_job())
    job = store.get("j1")
    assert job.status == Status.queued and job.attempts == 0 and not job.cancel_requested
    assert job.policy == {"cpus": 1.0}


@pytest.mark.parametrize("src,dst", LEGAL, ids=[f"{s.value}->{d.value}" for s, d in LEGAL])
def test_every_legal_move(store, db, src, dst):
    store.add_job(make_job())
    force_status(db, "j1", src)
    moved = store.transition("j1", src, dst, reason="why", error="because")
    assert moved.status == dst and moved.reason == "why" and moved.error == "because"
    again = Store(db)
    try:
        stored = again.get("j1")
    finally:
        again.close()
    assert stored.status == dst and stored.reason == "why"
    assert (stored.finished_at is not None) == dst.terminal


@pytest.mark.parametrize("src,dst", ILLEGAL, ids=[f"{s.value}->{d.value}" for s, d in ILLEGAL])
def test_illegal_moves_are_refused_and_change_nothing(store, db, src, dst):
    store.add_job(make_job())
    force_status(db, "j1", src)
    before = raw_row(db, "j1")
    with pytest.raises(IllegalTransition):
        store.transition("j1", src, dst, reason="should not be written")
    assert raw_row(db, "j1") == before
    assert store.get("j1").status == src


def test_transition_from_a_status_the_job_is_not_in(store, db):
    """The expected status is checked against the row: a stale caller is refused, not obeyed."""
    store.add_job(make_job())
    force_status(db, "j1", Status.testing)
    before = raw_row(db, "j1")
    with pytest.raises(IllegalTransition) as info:
        store.transition("j1", Status.queued, Status.running, attempts=1)
    assert "testing" in str(info.value)
    assert raw_row(db, "j1") == before


def test_transition_with_several_expected_statuses(store, db):
    store.add_job(make_job())
    force_status(db, "j1", Status.testing)
    job = store.transition("j1", [Status.running, Status.testing], Status.rolled_back, reason="tests_failed")
    assert job.status == Status.rolled_back


def test_transition_of_a_missing_job(store):
    with pytest.raises(IllegalTransition, match="missing"):
        store.transition("ghost", Status.queued, Status.running)


@pytest.mark.parametrize("terminal", sorted(TERMINAL, key=lambda s: s.value))
def test_terminal_status_never_changes(store, db, terminal):
    store.add_job(make_job())
    force_status(db, "j1", terminal)
    before = raw_row(db, "j1")
    for new in Status:
        with pytest.raises(IllegalTransition):
            store.transition("j1", terminal, new)
        # even a caller that wrongly believes the job is still active cannot move it
        sources = [st for st in TRANSITIONS if new in TRANSITIONS[st]]
        if sources:
            with pytest.raises(IllegalTransition):
                store.transition("j1", sources, new)
    assert raw_row(db, "j1") == before
    # a cancel request on a finished job changes nothing either
    assert store.request_cancel("j1").status == terminal
    assert raw_row(db, "j1") == before


def test_update_job_cannot_change_status(store):
    store.add_job(make_job())
    with pytest.raises(ValueError):
        store.update_job("j1", status=Status.succeeded)
    store.update_job("j1", changed_files=["a.txt"], test_exit_code=0)
    job = store.get("j1")
    assert job.status == Status.queued and job.changed_files == ["a.txt"] and job.test_exit_code == 0


def test_racing_threads_exactly_one_wins(db):
    """Two actors (separate Store objects, like two processes) move the same job at once."""
    rounds = range(8)
    setup = Store(db)
    for i in rounds:
        setup.add_job(make_job(f"race{i}"))
    stores = [Store(db), Store(db)]
    try:
        for i in rounds:
            barrier = threading.Barrier(2)
            outcomes: list[str] = []
            lock = threading.Lock()

            def attempt(store: Store, who: str) -> None:
                barrier.wait()
                try:
                    store.transition(f"race{i}", Status.queued, Status.running, reason=who)
                    result = "won"
                except IllegalTransition:
                    result = "lost"
                with lock:
                    outcomes.append(result)

            threads = [threading.Thread(target=attempt, args=(s, f"t{n}")) for n, s in enumerate(stores)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert sorted(outcomes) == ["lost", "won"], outcomes
            job = setup.get(f"race{i}")
            assert job.status == Status.running and job.reason in ("t0", "t1")
    finally:
        for s in [setup, *stores]:
            s.close()


def test_racing_cancel_and_start(db):
    """A cancel of a queued job and the start of that job race: the job ends in one consistent state."""
    setup = Store(db)
    setup.add_job(make_job())
    a, b = Store(db), Store(db)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def start():
        barrier.wait()
        try:
            a.transition("j1", Status.queued, Status.running)
        except IllegalTransition:
            pass
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def cancel():
        barrier.wait()
        try:
            b.request_cancel("j1")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=start), threading.Thread(target=cancel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    job = setup.get("j1")
    # either the cancel came first (cancelled), or the start did and the cancel became a flag
    assert (job.status == Status.cancelled) or (job.status == Status.running and job.cancel_requested)
    for s in (setup, a, b):
        s.close()


# ---------------------------------------------------------------------------------------------
# adding jobs


def test_duplicate_job_id_is_invalid(store, db):
    store.add_job(make_job(prompt="first"))
    with pytest.raises(InvalidJob) as info:
        store.add_job(make_job(prompt="second"))
    assert "'j1' already exists" in str(info.value) and "queued" in str(info.value)
    assert store.get("j1").prompt == "first"
    assert _sql(db, "SELECT count(*) FROM job") == [(1,)]


def test_find_by_spool_name(store):
    store.add_job(make_job(spool_name="123.host.1.abcd.json"))
    assert store.find_by_spool_name("123.host.1.abcd.json").id == "j1"
    assert store.find_by_spool_name("other.json") is None


def test_jobs_in_priority_then_arrival_order(store):
    store.add_job(make_job("low1", priority=0))
    store.add_job(make_job("high", priority=5))
    store.add_job(make_job("low2", priority=0))
    store.add_job(make_job("neg", priority=-1))
    assert [j.id for j in store.jobs()] == ["high", "low1", "low2", "neg"]
    store.transition("high", Status.queued, Status.running)
    assert [j.id for j in store.jobs([Status.queued])] == ["low1", "low2", "neg"]
    assert [j.id for j in store.jobs([Status.running])] == ["high"]


# ---------------------------------------------------------------------------------------------
# durability


def test_wal_and_synchronous_full(sqlite_db):
    db = sqlite_db
    store = Store(db)
    store.add_job(make_job())
    with store.engine.connect() as con:
        assert con.execute(text("PRAGMA journal_mode")).scalar().lower() == "wal"
        assert con.execute(text("PRAGMA synchronous")).scalar() == 2  # 2 = FULL
        assert con.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert con.execute(text("PRAGMA busy_timeout")).scalar() >= 1000
    # WAL is a property of the file: a plain connection sees it too
    raw = sqlite3.connect(db)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    finally:
        raw.close()
    assert Path(f"{db}-wal").exists()
    store.close()


def test_each_new_connection_asks_for_wal_and_full_sync(sqlite_db):
    """SQLite's compiled-in default may already be FULL, so the value alone proves little: watch the
    statements a fresh connection runs before it is used."""
    from sqlalchemy import event

    statements: list[str] = []

    def trace(dbapi_connection, _record):
        dbapi_connection.set_trace_callback(statements.append)

    store = Store(sqlite_db)
    event.listen(store.engine, "connect", trace, insert=True)  # runs before the store's own listener
    store.engine.dispose()  # the next use opens a new connection
    store.add_job(make_job())
    upper = [" ".join(s.upper().split()) for s in statements]
    assert "PRAGMA JOURNAL_MODE=WAL" in upper
    assert "PRAGMA SYNCHRONOUS=FULL" in upper
    assert upper.index("PRAGMA SYNCHRONOUS=FULL") < next(i for i, s in enumerate(upper) if "INSERT" in s)
    store.close()


def test_every_pooled_connection_gets_the_pragmas(sqlite_db):
    """Pragmas other than journal_mode are per connection: each new one must set them."""
    store = Store(sqlite_db)
    conns = [store.engine.connect() for _ in range(3)]
    try:
        for con in conns:
            assert con.execute(text("PRAGMA synchronous")).scalar() == 2
    finally:
        for con in conns:
            con.close()
        store.close()


def test_committed_job_is_visible_to_another_connection(store, db):
    store.add_job(make_job())
    store.transition("j1", Status.queued, Status.running, attempts=1)
    row = raw_row(db, "j1")
    assert row is not None and "running" in row


# ---------------------------------------------------------------------------------------------
# cancel


def test_request_cancel_queued_cancels_at_once(store):
    store.add_job(make_job())
    job = store.request_cancel("j1")
    assert job.status == Status.cancelled
    assert job.reason == "cancelled" and job.finished_at is not None
    assert store.get("j1").status == Status.cancelled


@pytest.mark.parametrize("active", [Status.running, Status.testing, Status.committing])
def test_request_cancel_active_sets_the_flag(store, db, active):
    store.add_job(make_job())
    force_status(db, "j1", active)
    job = store.request_cancel("j1")
    assert job.status == active and job.cancel_requested is True
    stored = store.get("j1")
    assert stored.status == active and stored.cancel_requested is True


def test_request_cancel_unknown_job(store):
    with pytest.raises(InvalidJob, match="no job 'ghost'"):
        store.request_cancel("ghost")


# ---------------------------------------------------------------------------------------------
# attempts and events


def test_attempts_in_order(store):
    store.add_job(make_job())
    first = store.start_attempt("j1", 1)
    store.finish_attempt(first.id, outcome="interrupted", exit_code=137)
    store.start_attempt("j1", 2)
    attempts = store.attempts("j1")
    assert [a.number for a in attempts] == [1, 2]
    assert attempts[0].outcome == "interrupted" and attempts[0].exit_code == 137
    assert attempts[0].finished_at is not None and attempts[1].finished_at is None


def _attempt(store: Store, job_id: str, number: int = 1):
    return store.attempts(job_id)[number - 1]


def _running(store: Store, job_id: str, number: int = 1) -> None:
    """The job claimed for its ``number``-th attempt, whose row exists (as ``run_job`` makes it)."""
    store.transition(job_id, [Status.queued, Status.waiting_retry], Status.running, attempts=number)
    store.start_attempt(job_id, number, "box2")


def test_an_attempt_moves_with_its_job_and_then_says_how_it_ended(store, db):
    store.add_job(make_job("tested"))
    _running(store, "tested")
    assert (_attempt(store, "tested").status, _attempt(store, "tested").reason) == ("running", None)
    store.transition("tested", Status.running, Status.testing)
    assert _attempt(store, "tested").status == "testing"
    store.transition("tested", Status.testing, Status.rolled_back, reason="tests_failed")
    ended = _attempt(store, "tested")
    assert (ended.status, ended.reason) == ("rolled_back", "tests_failed") and ended.finished_at is not None

    # an attempt that ended before its agent's end was recorded (a container that could not start) is not
    # left running: it failed, and says why
    store.add_job(make_job("no-start", workspace="/repos/b"))
    _running(store, "no-start")
    store.transition("no-start", Status.running, Status.failed, reason="sandbox", error="cannot start container")
    failed = _attempt(store, "no-start")
    assert (failed.status, failed.reason, failed.outcome) == ("failed", "sandbox", None)
    assert failed.finished_at is not None

    # re-queued (the executor stopped): interrupted; the next attempt is a row of its own
    store.add_job(make_job("again", workspace="/repos/c"))
    _running(store, "again")
    store.transition("again", Status.running, Status.queued)
    _running(store, "again", 2)
    assert [(a.status, a.reason) for a in store.attempts("again")] == [("interrupted", "interrupted"),
                                                                        ("running", None)]

    # reviewed: the attempt waits with its job, and ends as the decision ends the job
    store.add_job(make_job("reviewed", workspace="/repos/d"))
    _running(store, "reviewed")
    for src, dst in ((Status.running, Status.testing), (Status.testing, Status.awaiting_review),
                     (Status.awaiting_review, Status.committing)):
        store.transition("reviewed", src, dst)
        assert _attempt(store, "reviewed").status == dst.value
    store.transition("reviewed", Status.committing, Status.succeeded, reason="committed")
    assert (_attempt(store, "reviewed").status, _attempt(store, "reviewed").reason) == ("succeeded", "committed")


def test_an_attempt_that_ended_never_changes_again(store, db):
    store.add_job(make_job("limited"))
    _running(store, "limited")
    store.transition("limited", Status.running, Status.waiting_retry, reason="rate_limited")
    store.transition("limited", Status.waiting_retry, Status.cancelled, reason="cancelled")
    # the cancel ended the job, not the attempt: that one ended waiting for its retry
    assert (_attempt(store, "limited").status, _attempt(store, "limited").reason) == ("waiting_retry", "rate_limited")
    store.add_job(make_job("queued-cancel", workspace="/repos/e"))
    _running(store, "queued-cancel")
    store.transition("queued-cancel", Status.running, Status.queued)
    store.request_cancel("queued-cancel")
    assert _attempt(store, "queued-cancel").status == "interrupted"


def test_events_in_order_per_job_and_per_session(store):
    a1 = store.add_job(make_job("a1", session_id="sess-a"))
    b1 = store.add_job(make_job("b1", session_id="sess-b"))
    a2 = store.add_job(make_job("a2", session_id="sess-a"))
    store.add_event(a1, 1, "state", {"n": 1})
    store.add_event(b1, 1, "state", {"n": 100})
    store.add_events(a1, 1, [("tool_call", {"n": 2}), ("tool_result", {"n": 3})])
    store.add_event(a2, 1, "state", {"n": 4})
    store.add_events(b1, 1, [("turn", {"n": 101})])
    store.add_events(a1, 2, [("result", {"n": 5})])
    store.add_events(a1, 2, [])  # nothing to add is fine

    assert [e.data["n"] for e in store.events(job_id="a1")] == [1, 2, 3, 5]
    assert [e.kind for e in store.events(job_id="a1")] == ["state", "tool_call", "tool_result", "result"]
    assert [e.attempt for e in store.events(job_id="a1")] == [1, 1, 1, 2]
    assert [e.data["n"] for e in store.events(job_id="b1")] == [100, 101]
    assert [e.data["n"] for e in store.events(session_id="sess-a")] == [1, 2, 3, 4, 5]
    assert {e.job_id for e in store.events(session_id="sess-a")} == {"a1", "a2"}
    assert [e.data["n"] for e in store.events()] == [1, 100, 2, 3, 4, 101, 5]


def test_event_data_is_stored_as_json(store, db):
    job = store.add_job(make_job())
    from datetime import datetime, timezone

    when = datetime(2024, 1, 2, tzinfo=timezone.utc)
    store.add_event(job, 1, "state", {"when": when, "path": Path("/x"), "nested": {"a": [1, 2]}})
    again = Store(db)
    try:
        (event,) = again.events(job_id="j1")
    finally:
        again.close()
    assert event.data == {"when": str(when), "path": "/x", "nested": {"a": [1, 2]}}
    assert event.session_id == "j1"


def test_the_command_lines_plain_reads_know_every_json_and_time_column():
    """store/reads.py decodes columns without the ORM: its lists must be the models' own."""
    from sqlalchemy import JSON, DateTime

    from executor.store import ApiRequest, Attempt, Event, Job
    from executor.store.reads import JSON_COLUMNS, TIME_COLUMNS

    for table, model in (("job", Job), ("attempt", Attempt), ("event", Event), ("apirequest", ApiRequest)):
        columns = model.__table__.columns
        assert JSON_COLUMNS[table] == {c.name for c in columns if isinstance(c.type, JSON)}
        assert TIME_COLUMNS[table] == {c.name for c in columns if isinstance(getattr(c.type, "impl", c.type), DateTime)}


def test_plain_reads_give_what_the_store_wrote(tmp_path):
    from executor.clock import utcnow
    from executor.store import reads

    store = Store(tmp_path / "executor.db")
    store.add_job(Job(id="r1", session_id="s", runner="r", model_requested="m", workspace="/w", prompt="p",
                      policy_name="default", policy={"cpus": 1.0}, changed_files=["a.py"]))
    store.transition("r1", Status.queued, Status.running, started_at=utcnow())
    store.start_attempt("r1", 1)
    store.add_event(store.get("r1"), 1, "egress", {"decision": "denied", "host": "example.org"})
    conn = reads.connect(tmp_path / "executor.db")
    job = reads.job(conn, "r1")
    assert job.status == Status.running and job.policy == {"cpus": 1.0} and job.changed_files == ["a.py"]
    assert job.started_at.tzinfo is not None and job.created_at <= job.started_at
    assert [a.number for a in reads.attempts(conn, "r1")] == [1]
    assert [j.id for j in reads.recent_jobs(conn, [Status.running])] == ["r1"] and reads.counts(conn) == {"running": 1}
    assert reads.job(conn, "nope") is None
    (event,) = reads.events(conn, "r1", ["egress", "gateway_refused"])
    assert event.data == {"decision": "denied", "host": "example.org"} and event.ts.tzinfo is not None
    assert reads.events(conn, "r1", ["turn"]) == [] and reads.api_requests(conn, "r1") == []
    from executor.store import ApiRequest

    store.add_api_request(ApiRequest(job_id="r1", attempt=1, runner="r", path="/v1/messages", status=200,
                                     latency=0.1, duration=0.2))
    (row,) = reads.api_requests(conn, "r1")
    assert row.status == 200  # an HTTP status, not a job's (show of a sealed job read it as one and crashed)
