"""Only the tests that reach a store through ``db_url`` or ``empty_db_url`` run here: the others (SQLite files
by hand, pure functions) ran in the unit tier already and would only run twice."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    kept, dropped = [], []
    for item in items:
        on_pg = Path(str(item.fspath)).parent == HERE
        uses_store = {"db_url", "empty_db_url"} & set(getattr(item, "fixturenames", ()))
        (dropped if on_pg and not uses_store else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
