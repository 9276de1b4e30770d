"""Versioned schema migrations of the service's own tables, and the application role.

Migrations are plain numbered SQL files beside this module. All pending ones
run in one transaction under a transaction-scoped advisory lock, so replicas
starting together apply each exactly once and a failed migration leaves
nothing half done. A transaction-level lock (not a session lock) also keeps
this safe behind a transaction-pooling PgBouncer.
"""

from __future__ import annotations

import importlib.resources
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from raptorflow.data.server.db.catalog import quote_ident
from raptorflow.data.server.db.connections import Connection

log = logging.getLogger(__name__)

# An arbitrary constant: the advisory-lock key every replica agrees on.
MIGRATION_LOCK_KEY = 0x52_46_44_41_54_41  # "RFDATA"

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_LEDGER_SQL = """
CREATE SCHEMA IF NOT EXISTS raptorflow_data;
CREATE TABLE IF NOT EXISTS raptorflow_data.schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def bundled_migrations() -> list[Migration]:
    """The SQL files shipped with the package, in version order."""
    folder = importlib.resources.files("raptorflow.data.server.db").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


async def apply_migrations(conn: Connection, migrations: Iterable[Migration]) -> list[int]:
    """Applies pending migrations; returns the versions applied now."""
    applied_now = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(_LEDGER_SQL)
        done = {
            r["version"]
            for r in await conn.fetch("SELECT version FROM raptorflow_data.schema_migrations")
        }
        for migration in migrations:
            if migration.version in done:
                continue
            log.info("applying migration %04d_%s", migration.version, migration.name)
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO raptorflow_data.schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied_now.append(migration.version)
    return applied_now


async def provision_app_role(conn: Connection, role: str, schema: str) -> None:
    """Creates the non-owner role queries run as, and grants it the schemas it uses.

    Used when development gives only one (owner) connection string, once after
    the migrations. The role cannot log in; the query pool switches to it with
    the `role` setting at connect time, so it owns nothing and cannot bypass
    row-level security. The exposed tables are granted by `grant_tables`.
    """
    role_ident = quote_ident(role)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
        if not exists:
            await conn.execute(f"CREATE ROLE {role_ident} NOLOGIN NOSUPERUSER NOBYPASSRLS")
        await conn.execute(f"GRANT USAGE ON SCHEMA {quote_ident(schema)} TO {role_ident}")
        await conn.execute(
            f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {quote_ident(schema)} TO {role_ident}"
        )
        # The service's own tables (change log, consumers, memory records); the
        # migration ledger stays the owner's alone.
        await conn.execute(f"GRANT USAGE ON SCHEMA raptorflow_data TO {role_ident}")
        await conn.execute(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA raptorflow_data"
            f" TO {role_ident}"
        )
        await conn.execute(
            f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA raptorflow_data TO {role_ident}"
        )
        await conn.execute(f"REVOKE ALL ON raptorflow_data.schema_migrations FROM {role_ident}")
        # Only the capture triggers (SECURITY DEFINER, as the owner) and pruning
        # (owner pool) write the change log; queries only read it.
        for table in ("change_log", "change_log_pruned"):
            if await conn.fetchval("SELECT to_regclass($1)", f"raptorflow_data.{table}"):
                await conn.execute(
                    f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON raptorflow_data.{table}"
                    f" FROM {role_ident}"
                )
        # The job history and schedule claims are the owner's alone (maintenance/jobs.py).
        for table in ("jobs", "schedule_claims"):
            if await conn.fetchval("SELECT to_regclass($1)", f"raptorflow_data.{table}"):
                await conn.execute(f"REVOKE ALL ON raptorflow_data.{table} FROM {role_ident}")


async def grant_tables(conn: Connection, role: str, schema: str, tables: Iterable[str]) -> None:
    """Grants the application role the exposed tables (as the catalog finds them)."""
    role_ident = quote_ident(role)
    async with conn.transaction():
        # Concurrent GRANTs on one table can fail with "tuple concurrently updated".
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        for table in tables:
            await conn.execute(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON "
                f"{quote_ident(schema)}.{quote_ident(table)}"
                f" TO {role_ident}"
            )
