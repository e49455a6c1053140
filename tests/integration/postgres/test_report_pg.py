"""tests/unit/test_report.py on PostgreSQL: the same tests, each store a new database of the session's cluster."""

import pytest

from tests.unit.test_report import *  # noqa: F403 - collected again, with the fixtures below


@pytest.fixture
def db_url(pg_url: str) -> str:
    return pg_url


@pytest.fixture
def empty_db_url(pg_empty_url: str) -> str:
    return pg_empty_url
