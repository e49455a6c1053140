"""tests/unit/test_claim.py on PostgreSQL: the same tests, each store a new database of the session's cluster."""

import pytest

from executor.store import Status, Store
from tests.unit.test_claim import *  # noqa: F403 - collected again, with the fixtures below
from tests.unit.test_claim import job


@pytest.fixture
def db_url(pg_url: str) -> str:
    return pg_url


@pytest.fixture
def empty_db_url(pg_empty_url: str) -> str:
    return pg_empty_url


def test_new_work_wakes_a_listening_host_at_once(pg_url, tmp_path):
    """PostgreSQL: intake's NOTIFY (and a settle that frees a workspace) wakes an idle host's LISTEN."""
    from executor.scheduling.hosting import Presence
    from executor.settings import Settings
    from tests.conftest import wait_for

    settings = Settings(home=tmp_path / "home", policies=tmp_path, workspace_roots=["/w"], database_url=pg_url,
                        host_id="listener")
    mine, other = Store(pg_url), Store(pg_url)
    presence = Presence(settings, mine, lambda: {})
    presence.listener.start()
    try:
        wait_for(lambda: presence.listening, 20, "the LISTEN connection")
        presence.wake.clear()
        other.add_job(job("woken"))  # another host's intake
        assert presence.wake.wait(5), "no NOTIFY for a new job"
        other.claim("host-b", ["/w"], 8, 2**34)
        presence.wake.clear()
        other.transition("woken", Status.running, Status.rolled_back, reason="agent_error")
        assert presence.wake.wait(5), "no NOTIFY for a freed workspace"
    finally:
        presence.close()
        mine.close()
        other.close()
    assert not presence.listener.is_alive()
