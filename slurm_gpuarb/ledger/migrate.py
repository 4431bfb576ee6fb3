"""Schema revisions: reading the ledger's revision and running the Alembic migrations.

Alembic is configured in code (no alembic.ini): the migrations live in ``migrations/`` next to
this module and always run on a connection the caller has already opened, inside the
transaction (and lock) the caller chose. Alembic is imported only when a migration runs, so
opening an up-to-date ledger (every hook does) never pays for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
VERSION_TABLE = "alembic_version"
COMPAT_TABLE = "schema_compat"


def table_names(conn: sa.Connection) -> set[str]:
    """Tables in the ledger's schema (SQLite: the file; PostgreSQL: ``current_schema()``)."""
    if conn.dialect.name == "sqlite":
        sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    else:
        sql = "SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = current_schema()"
    return {row[0] for row in conn.exec_driver_sql(sql)}


def read_revision(conn: sa.Connection, tables: set[str] | None = None) -> str | None:
    """The revision recorded in the database, or None when it has none (empty or not a ledger)."""
    if VERSION_TABLE not in (table_names(conn) if tables is None else tables):
        return None
    row = conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").first()
    return None if row is None else str(row[0])


def read_min_reader(conn: sa.Connection, tables: set[str] | None = None) -> str | None:
    """The oldest revision whose gpuarb can use this schema (``schema_compat``, from 0005), or None."""
    if COMPAT_TABLE not in (table_names(conn) if tables is None else tables):
        return None
    row = conn.exec_driver_sql(f"SELECT min_reader FROM {COMPAT_TABLE}").first()
    return None if row is None else str(row[0])


def alembic_config(conn: sa.Connection | None = None) -> Config:
    """An Alembic config for the ledger's migrations, bound to ``conn`` when given."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


def script_revisions() -> list[str]:
    """The revisions the migration scripts define, oldest first (tests compare them to schema.REVISIONS)."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config())
    return [s.revision for s in reversed(list(scripts.walk_revisions()))]


def run_upgrade(conn: sa.Connection, revision: str) -> None:
    """Migrate to ``revision`` on ``conn``, inside the caller's transaction."""
    from alembic import command

    command.upgrade(alembic_config(conn), revision)
