"""tests/unit/test_store.py on PostgreSQL: the same tests, each store a new database of the session's cluster."""

import pytest

from executor.store import Job, Status, Store
from tests.unit.test_store import *  # noqa: F403 - collected again, with the fixtures below


@pytest.fixture
def db_url(pg_url: str) -> str:
    return pg_url


@pytest.fixture
def empty_db_url(pg_empty_url: str) -> str:
    return pg_empty_url


def test_plain_reads_on_libpq_give_what_psycopg_gives_and_send_values_apart(pg_url):
    """``executor jobs``/``show``/``status`` read PostgreSQL on libpq itself (store/libpq.py, no psycopg
    import): every column type decodes as psycopg decodes it, and a value is never SQL."""
    from executor.clock import utcnow
    from executor.store import ApiRequest, Host, libpq, reads

    store = Store(pg_url)
    try:
        store.add_job(Job(id="p1", session_id="s", runner="r", model_requested="m", workspace="/w/it's %s $1",
                          prompt="p", policy_name="default", policy={"cpus": 1.5, "x": [1, None]},
                          changed_files=["a.py"], priority=3, cancel_requested=True, storage=None))
        store.transition("p1", Status.queued, Status.running, started_at=utcnow())
        store.start_attempt("p1", 1)
        store.add_event(store.get("p1"), 1, "egress", {"decision": "denied"})
        store.add_api_request(ApiRequest(job_id="p1", attempt=1, runner="r", path="/v1/messages", status=200,
                                         latency=0.1, duration=0.2))
        store.register_host(Host(id="h1", version="t", budget_cpus=2.5, budget_memory=2**34, reserve_memory=2**28,
                                 workspace_roots=["/w"], storage={"/w": "abc"}))
    finally:
        store.close()
    fast = reads.connect(pg_url)
    assert isinstance(fast.conn, libpq.Connection)
    slow = reads._Postgres.__new__(reads._Postgres)
    slow.conn = reads._psycopg(pg_url)
    try:
        for read in (lambda c: reads.job(c, "p1"), lambda c: reads.attempts(c, "p1"), reads.counts,
                     lambda c: reads.events(c, "p1", ["egress"]), lambda c: reads.api_requests(c, "p1"),
                     lambda c: reads.recent_jobs(c, [Status.running], runner="r"), lambda c: reads.followers(c, "p1")):
            assert read(fast) == read(slow)
        job = reads.job(fast, "p1")
        assert (job.priority, job.cancel_requested, job.policy, job.storage) == (3, True, {"cpus": 1.5, "x": [1, None]},
                                                                                 None)
        assert job.started_at.tzinfo is not None and job.workspace == "/w/it's %s $1"
        now = utcnow()
        assert reads.hosts(fast, now=now) == reads.hosts(slow, now=now)
        assert [(h["storage"], h["budget"]["cpus"]) for h in reads.hosts(fast, now=now)] == [({"/w": "abc"}, 2.5)]
        assert reads.recent_jobs(fast, runner="r' OR '1'='1") == []  # a value, never SQL
        with pytest.raises(libpq.LibpqError, match="read-only"):
            fast.execute("DELETE FROM job WHERE id = ?", ("p1",))
    finally:
        fast.close()
        slow.close()
    with pytest.raises(libpq.LibpqError):
        libpq.Connection(pg_url.rsplit("/", 1)[0] + "/no_such_database")
