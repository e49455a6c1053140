"""``executor db``: the store's schema: which revision it is at, upgrading it, and writing a new revision.

Owns the three subcommands. ``upgrade`` brings the database ``EXECUTOR_DATABASE_URL`` names (or the state
root's SQLite file) to this executor's revision (``executor serve`` does the same when it starts, as does
every command that opens the store); ``current`` says where it is; ``revision`` (from a checkout) writes
the next migration by comparing ``models.py`` with a scratch SQLite database at the current head.

Must never: print the database's password, or migrate past the code (``SchemaTooNew``).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import click

from .cli_common import load_settings


@click.group()
def db() -> None:
    """The store's schema (Alembic migrations)."""


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
