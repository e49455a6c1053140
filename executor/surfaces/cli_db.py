"""``executor db``: the store's schema (which revision it is at, upgrading it, writing a new revision) and
carrying a store's history into another.

Owns the four subcommands. ``upgrade`` brings the database ``EXECUTOR_DATABASE_URL`` names (or the state
root's SQLite file) to this executor's revision (``executor serve`` does the same when it starts, as does
every command that opens the store); ``current`` says where it is; ``revision`` (from a checkout) writes
the next migration by comparing ``models.py`` with a scratch SQLite database at the current head; ``copy``
carries the state root's SQLite history (or another store's) into the store ``EXECUTOR_DATABASE_URL`` names,
which must hold no job yet (a host switching to a shared PostgreSQL store keeps its jobs).

Must never: print the database's password, migrate past the code (``SchemaTooNew``), or copy while a host
serves the store copied, or into a store that holds jobs.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

from .cli_common import load_settings

#: What to do about a SQLite history left behind by a switch to PostgreSQL (``doctor`` and ``serve`` say it).
HISTORY_FIX = ("to carry the jobs over, stop the executor and run `executor db copy` (compose: `docker compose stop "
               "executor && docker compose run --rm executor db copy`), then start it; to start afresh on purpose, "
               "nothing (the old jobs stay readable with EXECUTOR_DATABASE_URL unset)")


def history_left_behind(settings) -> int:
    """The jobs of the state root's SQLite file when the PostgreSQL store in use holds none (0 otherwise, and
    when either cannot be read: the store's own check says why)."""
    from ..store.copies import left_behind

    try:
        return left_behind(settings.db_path, settings.db_url) if settings.shared_store else 0
    except Exception:  # noqa: BLE001 - psycopg's errors, without importing them up front
        return 0


@click.group()
def db() -> None:
    """The store's schema (Alembic migrations), and carrying a store's history into another."""


@db.command()
def upgrade() -> None:
    """Bring the database to this executor's schema revision."""
    from ..errors import SchemaTooNew
    from ..store import schema
    from ..store.engine import make_engine, shown

    settings = load_settings()
    engine = make_engine(settings.db_url)
    try:
        before, after = schema.upgrade(engine)
    except SchemaTooNew as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()
    where = shown(settings.db_url)
    click.echo(f"{where}: at {after} already" if before == after else f"{where}: {before or 'empty'} -> {after}")


@db.command()
def current() -> None:
    """The database's schema revision and this executor's; exit 1 when they differ."""
    from ..store import schema
    from ..store.engine import make_engine, shown

    settings = load_settings()
    engine = make_engine(settings.db_url)
    try:
        with engine.connect() as conn:
            revision = schema.current(conn)
    finally:
        engine.dispose()
    click.echo(f"{shown(settings.db_url)}: {revision or 'empty'} (this executor: {schema.HEAD})")
    raise SystemExit(0 if revision == schema.HEAD else 1)


@db.command()
@click.argument("message")
def revision(message: str) -> None:
    """Write the next migration (versions/NNNN_message.py) from what models.py adds to the current head."""
    import tempfile  # here, not for every command: it imports shutil, random and the compression modules

    from alembic import command
    from alembic.config import Config

    from ..store import schema
    from ..store.engine import make_engine

    number = f"{int(schema.HEAD) + 1:04d}"
    slug = re.sub(r"[^a-z0-9]+", "_", message.lower()).strip("_")[:40] or "change"
    with tempfile.TemporaryDirectory() as scratch:
        engine = make_engine(f"sqlite:///{Path(scratch) / 'head.db'}")
        schema.upgrade(engine)
        with engine.begin() as conn:
            config = Config()
            config.set_main_option("script_location", str(schema.MIGRATIONS))
            config.set_main_option("file_template", f"{number}_{slug}")
            config.attributes["connection"] = conn
            script = command.revision(config, message=message, autogenerate=True, rev_id=number)
        engine.dispose()
    click.echo(f"wrote {script.path}: read it, keep what belongs to the change, then set schema.HEAD = "
               f"{number!r} in executor/store/schema.py")


@db.command(name="copy")
@click.option("--from", "source", default=None, metavar="URL",
              help="The store to copy (default: the SQLite file executor.db in the state root).")
@click.option("--json", "as_json", is_flag=True)
def copy_cmd(source: str | None, as_json: bool) -> None:
    """Carry a store's whole history (jobs, attempts, events, ...) into the store EXECUTOR_DATABASE_URL names,
    which must hold no job yet: after switching a host from its SQLite file to PostgreSQL. Stop the executor
    first (docker compose stop executor; then docker compose run --rm executor db copy)."""
    import json

    from ..store.copies import TargetNotEmpty, copy_history, serving_hosts
    from ..store.engine import shown

    settings = load_settings()
    source = source or f"sqlite:///{settings.db_path}"
    if source == settings.db_url:
        raise click.ClickException(f"the store to copy is the store EXECUTOR_DATABASE_URL names ({shown(source)}): "
                                   "set EXECUTOR_DATABASE_URL to the new store, or --from to another")
    if source.startswith("sqlite:///") and not Path(source[len("sqlite:///"):]).is_file():
        raise click.ClickException(f"no database at {source[len('sqlite:///'):]}: is EXECUTOR_HOME right?")
    serving = serving_hosts(source, settings.host_timeout)
    if serving:
        raise click.ClickException(f"host {', '.join(serving)} still serves {shown(source)}: stop it first "
                                   "(`docker compose stop executor`), so the history does not change while copied "
                                   f"(a host that stopped without saying so counts for {settings.host_timeout:g} s)")
    try:
        copied = copy_history(source, settings.db_url)
    except TargetNotEmpty as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"from": shown(source), "to": shown(settings.db_url), "rows": copied}))
        return
    click.echo(f"copied {copied.get('job', 0)} jobs ({sum(copied.values())} rows in {len(copied)} tables) from "
               f"{shown(source)} to {shown(settings.db_url)}")
