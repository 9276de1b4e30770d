"""The row-level security net below the service: each protected table lets a statement reach
only the rows of the workspace its transaction names.

Every compiled statement already carries `workspace_id = $1`; the net is for the
day one does not. With the `row_security` setting on, each protected table (the
exposed tables and `raptorflow_data.memory_records`) gets

- `raptorflow_workspace`, for every role and command: a row is visible, and may
  be written, only when its workspace_id equals the transaction-local setting
  `raptorflow.workspace_id`. Query connections set it per transaction
  (`Database.workspace_connection`), so an unscoped statement sees nothing,
  and an INSERT or UPDATE that would put a row into another workspace fails.
  The setting is compared after a cast to the column's own type, so the policy
  is an indexable `workspace_id = <stable expression>`;
- `raptorflow_all_workspaces`, for the role that provisions (the owner pool's
  user) only: every row, but only while `raptorflow.all_workspaces` is 'on',
  which owner-pool connections set for their whole session at connect time
  (`connections.py`). Backups, retention, pruning and the capture triggers
  therefore keep working under FORCE, and the owner's own connections elsewhere
  (a psql session, or the query pool when queries run as the owner) do not
  see every workspace by accident. The app role could set that placeholder
  too, but the policy does not apply to it: only to the owner;
- ENABLE and FORCE ROW LEVEL SECURITY: without FORCE, the owner would bypass
  the policies, and the query pool runs as the owner when `app_role` is empty.

The query role must not be a superuser or have BYPASSRLS (`provision_app_role`
creates it NOBYPASSRLS); superusers ignore every policy, so does a superuser
owner, for whom the all-workspaces policy changes nothing.

What the net costs and does not cover. A scoped call runs in a transaction:
one round trip more to open it (BEGIN and the setting go together) and one to
commit; see bench/row_security.py for the measured cost. PostgreSQL evaluates
the policies before the statement's own conditions, so a condition with a
function that is not leakproof (LIKE, jsonb containment) can no longer serve
as an index condition ahead of the workspace. An upsert whose conflict target
is a key that another workspace's row already holds fails (insufficient
privilege: the existing row is outside the policy) where it used to skip the
row. `COPY ... FROM` refuses any table whose policies apply to the user, so a
restore by an owner that is neither a superuser nor BYPASSRLS needs another
path. The change log, its consumers and pruning marks are not protected: the
shared fan-out poll reads the change log across workspaces by design.

Provisioning is idempotent and runs on the owner's connection wherever the
tables are granted: the exposed tables at every catalog load, so a table
created, re-created or altered by hand since is brought back in line at the
next reload, and `memory_records` after migrations. It reads the state first and
only changes what differs, so a restart takes no lock. Changes run in one
transaction under the migrations' advisory lock, with a short lock timeout: a
table busy for longer is left as it is until the next catalog reload.

Turning `row_security` off removes the net the same way: the policies named
`raptorflow_*` are dropped, and where no other policy remains RLS is disabled
and unforced again (a table with policies of its own keeps RLS on), so that
the off replica's unscoped statements see every row. Every replica on one
database must therefore use the same value; a replica with the other value
undoes the net at its next catalog reload.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
from raptorflow.data.server.db.catalog import WORKSPACE_COLUMN, quote_ident
from raptorflow.data.server.db.connections import ALL_WORKSPACES_SETTING, WORKSPACE_SETTING
from raptorflow.data.server.db.migrations import MIGRATION_LOCK_KEY

if TYPE_CHECKING:
    from raptorflow.data.server.db.catalog import Table
    from raptorflow.data.server.db.connections import Connection

log = logging.getLogger(__name__)

WORKSPACE_POLICY = "raptorflow_workspace"
ALL_WORKSPACES_POLICY = "raptorflow_all_workspaces"
# Policies with this prefix are the service's: kept in line, or dropped when stale or off.
POLICY_PREFIX = "raptorflow_"
_POLICIES = frozenset((WORKSPACE_POLICY, ALL_WORKSPACES_POLICY))

# How long provisioning waits for a table's lock: ALTER TABLE and CREATE POLICY take
# ACCESS EXCLUSIVE, and every reader of the table would queue behind a waiting one.
LOCK_TIMEOUT = "5s"


@dataclass(frozen=True)
class ProtectedTable:
    """A table the net covers: its quoted name, and its workspace column's type."""

    qualified: str
    """`"schema"."table"`, quoted."""
    workspace_type: str
    """The workspace column's type without modifier (`uuid`, `text`), which the setting is
    cast to: the column is then compared with a value of its own type, through its index."""

    @classmethod
    def of(cls, table: Table) -> ProtectedTable:
        return cls(table.qualified, table.workspace_column.bind_type)


MEMORY_RECORDS = ProtectedTable(
    f"{quote_ident('raptorflow_data')}.{quote_ident('memory_records')}", "uuid"
)
SERVICE_TABLES = (MEMORY_RECORDS,)
"""The service's own tables whose every access is for one workspace."""


def workspace_condition(table: ProtectedTable) -> str:
    """The workspace policy's condition. After a transaction that set it, the setting reads
    '' (not NULL) for the rest of the session: NULLIF makes that "no workspace" too."""
    setting = f"NULLIF(current_setting('{WORKSPACE_SETTING}', true), '')"
    return f"{quote_ident(WORKSPACE_COLUMN)} = CAST({setting} AS {table.workspace_type})"


ALL_WORKSPACES_CONDITION = f"current_setting('{ALL_WORKSPACES_SETTING}', true) = 'on'"

_STATE_SQL = """
SELECT t.name,
       c.relrowsecurity AS enabled,
       c.relforcerowsecurity AS forced,
       ARRAY(SELECT p.polname::text FROM pg_catalog.pg_policy AS p
             WHERE p.polrelid = c.oid ORDER BY 1) AS policies,
       COALESCE((SELECT p.polroles = ARRAY[r.oid]
                 FROM pg_catalog.pg_policy AS p, pg_catalog.pg_roles AS r
                 WHERE p.polrelid = c.oid AND p.polname = $2 AND r.rolname = current_user),
                false) AS owner_policy_current
FROM unnest($1::text[]) AS t(name)
JOIN pg_catalog.pg_class AS c ON c.oid = to_regclass(t.name)
"""


@dataclass(frozen=True)
class _State:
    enabled: bool
    forced: bool
    ours: frozenset[str]
    others: frozenset[str]
    owner_policy_current: bool


async def _states(conn: Connection, tables: Sequence[ProtectedTable]) -> dict[str, _State]:
    rows = await conn.fetch(_STATE_SQL, [t.qualified for t in tables], ALL_WORKSPACES_POLICY)
    states = {}
    for row in rows:
        names = frozenset(row["policies"])
        ours = frozenset(n for n in names if n.startswith(POLICY_PREFIX))
        states[row["name"]] = _State(
            row["enabled"], row["forced"], ours, names - ours, row["owner_policy_current"]
        )
    return states


def _statements_on(table: ProtectedTable, state: _State) -> list[str]:
    """What brings one table's net in line with the current policies; nothing when it is."""
    name = table.qualified
    statements = [f"DROP POLICY {quote_ident(p)} ON {name}" for p in sorted(state.ours - _POLICIES)]
    if WORKSPACE_POLICY not in state.ours:
        condition = workspace_condition(table)
        statements.append(
            f"CREATE POLICY {WORKSPACE_POLICY} ON {name} FOR ALL TO PUBLIC"
            f" USING ({condition}) WITH CHECK ({condition})"
        )
    if ALL_WORKSPACES_POLICY not in state.ours:
        statements.append(
            f"CREATE POLICY {ALL_WORKSPACES_POLICY} ON {name} FOR ALL TO CURRENT_USER"
            f" USING ({ALL_WORKSPACES_CONDITION}) WITH CHECK ({ALL_WORKSPACES_CONDITION})"
        )
    elif not state.owner_policy_current:
        # Another owner-pool user provisioned it: the policy follows whoever runs maintenance.
        statements.append(f"ALTER POLICY {ALL_WORKSPACES_POLICY} ON {name} TO CURRENT_USER")
    if not (state.enabled and state.forced):
        statements.append(f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY")
    return statements


def _statements_off(table: ProtectedTable, state: _State) -> list[str]:
    """What removes the service's net from one table; nothing when it has none."""
    if not state.ours:
        return []
    name = table.qualified
    statements = [f"DROP POLICY {quote_ident(p)} ON {name}" for p in sorted(state.ours)]
    if not state.others:
        statements.append(
            f"ALTER TABLE {name} NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY"
        )
    else:
        log.warning(
            "row security: %s keeps RLS enabled for its own policies (%s)",
            name,
            ", ".join(sorted(state.others)),
        )
    return statements


def _plan(
    tables: Sequence[ProtectedTable], states: dict[str, _State], enabled: bool
) -> list[tuple[ProtectedTable, list[str]]]:
    plan = []
    for table in tables:
        state = states.get(table.qualified)
        if state is None:  # dropped since the catalog read it
            continue
        statements = _statements_on(table, state) if enabled else _statements_off(table, state)
        if statements:
            plan.append((table, statements))
    return plan


async def provision(
    conn: Connection, tables: Iterable[ProtectedTable], *, enabled: bool
) -> list[str]:
    """Brings the net on `tables` in line with `enabled`; the tables it changed.

    Runs on an owner connection (the tables' owner, or a superuser): reads the
    state, and only when something differs takes the migrations' advisory lock,
    reads again and changes it, in one transaction. A table whose lock is not
    granted within LOCK_TIMEOUT is left for the next call (logged); any other
    failure raises: not owning a table as RuntimeError naming it, which stops
    start-up, and keeps a table that appears later out of the catalog.
    """
    wanted = list(tables)
    if not wanted or not _plan(wanted, await _states(conn, wanted), enabled):
        return []
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            # Again under the lock: another replica may have done it meanwhile.
            plan = _plan(wanted, await _states(conn, wanted), enabled)
            for table, statements in plan:
                try:
                    for statement in statements:
                        await conn.execute(statement)
                except asyncpg.InsufficientPrivilegeError as exc:
                    raise RuntimeError(
                        f"row security: cannot change {table.qualified} ({exc}); the owner "
                        "connection must own the tables it serves, or set row_security off"
                    ) from exc
    except asyncpg.LockNotAvailableError:
        log.warning(
            "row security: a table stayed locked for %s; its policies are set at the next "
            "catalog reload",
            LOCK_TIMEOUT,
        )
        return []
    changed = [table.qualified for table, _ in plan]
    if changed:
        log.info("row security %s on %s", "installed" if enabled else "removed", ", ".join(changed))
    return changed


# Foreign keys of the given tables whose columns leave out workspace_id.
_CROSS_WORKSPACE_KEYS_SQL = """
SELECT c.conname, src.relname AS table_name, dst_ns.nspname AS referenced_schema,
       dst.relname AS referenced_table
FROM pg_catalog.pg_constraint c
JOIN pg_catalog.pg_class src ON src.oid = c.conrelid
JOIN pg_catalog.pg_namespace src_ns ON src_ns.oid = src.relnamespace
JOIN pg_catalog.pg_class dst ON dst.oid = c.confrelid
JOIN pg_catalog.pg_namespace dst_ns ON dst_ns.oid = dst.relnamespace
WHERE c.contype = 'f' AND src_ns.nspname = $1 AND src.relname = ANY($2::text[])
  AND NOT EXISTS (
    SELECT 1 FROM unnest(c.conkey) AS key(attnum)
    JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = key.attnum
    WHERE a.attname = 'workspace_id'
  )
ORDER BY src.relname, c.conname
"""


async def cross_workspace_keys(
    conn: Connection, schema: str, tables: Sequence[str]
) -> list[tuple[str, str, str]]:
    """(constraint, table, referenced table) of each foreign key of `tables` that leaves
    workspace_id out of its columns.

    Such a key lets a row of one workspace reference a row of another (and so learn
    that its key exists), and its referential actions (ON DELETE CASCADE, SET NULL)
    reach across workspaces: PostgreSQL runs them without row-level security. Only
    the schema can close that, by declaring the key on (workspace_id, ...).
    """
    rows = await conn.fetch(_CROSS_WORKSPACE_KEYS_SQL, schema, list(tables))
    return [
        (
            row["conname"],
            row["table_name"],
            f"{row['referenced_schema']}.{row['referenced_table']}",
        )
        for row in rows
    ]
