"""Change capture on exposed tables: installs the row triggers, and checks they are there.

`raptorflow-data migrate --sync-tables all|t1,t2` calls `install`. Each table
gets two triggers calling the functions of migration 0002: a row trigger
(after insert, update, delete) and a statement trigger before truncate. The
row trigger's arguments are the table's name and its primary-key columns, so a
sync stream can tell that the capture still matches the table (`check`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.catalog import Table, load_catalog
from raptorflow.data.server.db.connections import Connection, Database
from raptorflow.data.server.db.migrations import MIGRATION_LOCK_KEY
from raptorflow.data.server.errors import Code, ServiceError

log = logging.getLogger(__name__)

ROW_TRIGGER = "raptorflow_data_capture"
TRUNCATE_TRIGGER = "raptorflow_data_capture_truncate"
ALL_TABLES = "all"

_TRIGGERS_SQL = """
SELECT c.relname AS table_name, t.tgname AS trigger_name, t.tgargs AS args
FROM pg_catalog.pg_trigger t
JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = ANY($2::text[])
  AND t.tgname IN ('raptorflow_data_capture', 'raptorflow_data_capture_truncate')
  AND t.tgenabled <> 'D'
"""


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def trigger_arguments(table: Table) -> tuple[str, ...]:
    """What the row trigger is given: the table's name, then its primary-key columns."""
    return (table.name, *table.primary_key)


def install_statements(table: Table) -> list[str]:
    """The DDL that (re)creates the capture triggers of one table; idempotent."""
    args = ", ".join(_literal(a) for a in trigger_arguments(table))
    return [
        f"CREATE OR REPLACE TRIGGER {ROW_TRIGGER} AFTER INSERT OR UPDATE OR DELETE "
        f"ON {table.qualified} FOR EACH ROW "
        f"EXECUTE FUNCTION raptorflow_data.capture_change({args})",
        f"CREATE OR REPLACE TRIGGER {TRUNCATE_TRIGGER} BEFORE TRUNCATE "
        f"ON {table.qualified} FOR EACH STATEMENT "
        f"EXECUTE FUNCTION raptorflow_data.capture_truncate({_literal(table.name)})",
    ]


def _select(tables: Mapping[str, Table], spec: str) -> list[Table]:
    if spec.strip() == ALL_TABLES:
        chosen = []
        for name in sorted(tables):
            if tables[name].primary_key:
                chosen.append(tables[name])
            else:
                log.warning("table %s has no primary key: no change capture for it", name)
        return chosen
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise SystemExit("--sync-tables takes 'all' or a comma-separated list of tables")
    chosen = []
    for name in names:
        table = tables.get(name)
        if table is None:
            raise SystemExit(f"--sync-tables: {name!r} is not an exposed table")
        if not table.primary_key:
            raise SystemExit(f"--sync-tables: table {name!r} has no primary key")
        chosen.append(table)
    return chosen


async def install(database: Database, settings: Settings, spec: str) -> list[str]:
    """Installs capture on the tables `spec` names ('all' or 't1,t2'); their names.

    Runs on the owner pool in one transaction under the migrations' advisory
    lock, so replicas running it together do the work once, and a failure
    leaves no table half captured.
    """
    async with database.owner_pool.acquire() as conn:
        catalog = await load_catalog(conn, settings.schema, settings.tables)
        tables = _select(catalog.tables, spec)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            for table in tables:
                for statement in install_statements(table):
                    await conn.execute(statement)
    names = [t.name for t in tables]
    log.info("change capture installed on %s", ", ".join(names) or "no table")
    return names


def _split_args(raw: bytes) -> tuple[str, ...]:
    # pg_trigger.tgargs: each argument NUL-terminated.
    return tuple(part.decode() for part in raw.split(b"\x00")[:-1])


async def check(conn: Connection, schema: str, tables: Sequence[Table]) -> None:
    """Raises FAILED_PRECONDITION unless every table has a primary key and current capture."""
    for table in tables:
        if not table.primary_key:
            raise ServiceError(
                Code.FAILED_PRECONDITION,
                "PRIMARY_KEY_REQUIRED",
                f"table {table.name!r} has no primary key, so its rows have no stable order "
                "to sync in",
                metadata={"table": table.name},
            )
    found: dict[str, dict[str, tuple[str, ...]]] = {}
    for row in await conn.fetch(_TRIGGERS_SQL, schema, [t.name for t in tables]):
        found.setdefault(row["table_name"], {})[row["trigger_name"]] = _split_args(row["args"])
    for table in tables:
        triggers = found.get(table.name, {})
        current = triggers.get(ROW_TRIGGER) == trigger_arguments(table) and triggers.get(
            TRUNCATE_TRIGGER
        ) == (table.name,)
        if not current:
            raise ServiceError(
                Code.FAILED_PRECONDITION,
                "SYNC_NOT_INSTALLED",
                f"table {table.name!r} has no current change capture; run "
                f"`raptorflow-data migrate --sync-tables {table.name}`",
                metadata={"table": table.name},
            )
