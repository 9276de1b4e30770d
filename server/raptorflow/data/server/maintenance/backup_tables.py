"""Which rows and columns a backup copies, in which order, and the SQL a restore runs
around its COPY (locks, emptiness, foreign keys, sequences).

Table and column names come from the catalog and are quoted; the workspace id
is bound as a parameter everywhere except in COPY's WHERE condition, which
cannot take one (`Scope.copy_filter`).

The columns a backup or restore copies are read from pg_attribute inside its own
transaction, after its tables are locked (`copy_shapes`), never from the server's
cached catalog: that one is reloaded on a timer, and a column added or dropped
since the last reload would otherwise be silently left out of a backup, or fail
it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg
from raptorflow.data.server.db.catalog import Table, quote_ident
from raptorflow.data.server.db.connections import Connection
from raptorflow.data.server.errors import Code, ServiceError
from raptorflow.data.server.maintenance.backup_stream import Report
from raptorflow.data.v1 import maintenance_service_pb2

pb = maintenance_service_pb2
log = logging.getLogger(__name__)

# The columns each table has now, as its COPY data holds them, in the table's order.
# Generated columns are computed on insert and COPY refuses them, so a backup leaves them
# out. (Identity columns are kept: COPY FROM writes their values as given.) Only tables
# and partitioned tables: a table replaced by a view since the catalog was read is gone.
_COLUMNS_SQL = """
SELECT c.relname AS table_name, a.attname AS column_name,
    pg_catalog.format_type(a.atttypid, a.atttypmod) AS database_type
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
WHERE n.nspname = $1 AND c.relname = ANY($2::text[]) AND c.relkind IN ('r', 'p')
  AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
ORDER BY c.relname, a.attnum
"""
# Foreign keys between the tables of a backup: referenced tables are copied first, so a
# restore never loads a row before the row it references. conparentid = 0: a partitioned
# table's key once, not again per partition.
_REFERENCES_SQL = """
SELECT child.relname AS child, parent.relname AS parent, k.conname AS constraint_name,
    k.condeferrable AS deferrable,
    (SELECT bool_or(NOT a.attnotnull) FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = k.conrelid AND a.attnum = ANY(k.conkey)) AS nullable
FROM pg_catalog.pg_constraint k
JOIN pg_catalog.pg_class child ON child.oid = k.conrelid
JOIN pg_catalog.pg_namespace cn ON cn.oid = child.relnamespace
JOIN pg_catalog.pg_class parent ON parent.oid = k.confrelid
JOIN pg_catalog.pg_namespace pn ON pn.oid = parent.relnamespace
WHERE k.contype = 'f' AND k.conparentid = 0 AND cn.nspname = $1 AND pn.nspname = $1
  AND child.relname = ANY($2::text[]) AND parent.relname = ANY($2::text[])
  AND child.oid <> parent.oid
ORDER BY child.relname, k.conname
"""
# A restore checks DEFERRABLE keys at COMMIT, once every table is loaded (and, replacing,
# emptied first): rows of two tables that reference each other then load in either order.
# Keys that are not DEFERRABLE stay checked at the end of each statement.
_DEFER_CONSTRAINTS_SQL = "SET CONSTRAINTS ALL DEFERRED"
# Columns fed by a sequence (serial, identity): a restore moves the sequence past the
# values it loaded, as pg_dump does, so the next insert does not collide with them.
_SEQUENCES_SQL = """
SELECT c.relname AS table_name, a.attname AS column_name, s.sequence
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL (
    SELECT pg_catalog.pg_get_serial_sequence(format('%I.%I', n.nspname, c.relname), a.attname)
        AS sequence) s
WHERE n.nspname = $1 AND c.relname = ANY($2::text[])
  AND a.attnum > 0 AND NOT a.attisdropped AND s.sequence IS NOT NULL
"""
# nextval before setval: the sequence only ever moves forward, even with inserts meanwhile.
# Sequences are not transactional; a restore rolled back later leaves at most a gap.
_ADVANCE_SEQUENCE_SQL = """
SELECT CASE WHEN $2::bigint > nextval($1::regclass) THEN setval($1::regclass, $2::bigint) END
"""
# Foreign keys into a backup's tables from tables outside it whose ON DELETE changes the
# referencing rows (CASCADE, SET NULL, SET DEFAULT; exposed tables or not, any schema): a
# replacing restore's DELETE would reach rows the backup does not hold and cannot give
# back. (NO ACTION and RESTRICT need no look: PostgreSQL fails the DELETE itself.)
# conparentid = 0: a partitioned table's key once, not again per partition.
_OUTSIDE_REFERENCES_SQL = """
SELECT k.conname AS constraint_name, k.confdeltype::text AS action,
    cn.nspname AS child_schema, child.relname AS child, parent.relname AS parent,
    array_agg(ca.attname ORDER BY cols.ord) AS child_columns,
    array_agg(pa.attname ORDER BY cols.ord) AS parent_columns
FROM pg_catalog.pg_constraint k
JOIN pg_catalog.pg_class child ON child.oid = k.conrelid
JOIN pg_catalog.pg_namespace cn ON cn.oid = child.relnamespace
JOIN pg_catalog.pg_class parent ON parent.oid = k.confrelid
JOIN pg_catalog.pg_namespace pn ON pn.oid = parent.relnamespace
CROSS JOIN LATERAL unnest(k.conkey, k.confkey) WITH ORDINALITY AS cols(child_key, parent_key, ord)
JOIN pg_catalog.pg_attribute ca ON ca.attrelid = k.conrelid AND ca.attnum = cols.child_key
JOIN pg_catalog.pg_attribute pa ON pa.attrelid = k.confrelid AND pa.attnum = cols.parent_key
WHERE k.contype = 'f' AND k.confdeltype IN ('c', 'n', 'd') AND k.conparentid = 0
  AND pn.nspname = $1 AND parent.relname = ANY($2::text[])
  AND NOT (cn.nspname = $1 AND child.relname = ANY($2::text[]))
GROUP BY k.oid, k.conname, k.confdeltype, cn.nspname, child.relname, parent.relname
ORDER BY child.relname, k.conname
"""
# confdeltype: (the clause, what it does to the referencing rows)
_DELETE_ACTIONS = {
    "c": ("CASCADE", "delete"),
    "n": ("SET NULL", "set their keys to NULL"),
    "d": ("SET DEFAULT", "set their keys to their defaults"),
}
# Restores of one workspace wait for each other (a transaction-level advisory lock keyed
# by the workspace), so two of them cannot both find it empty and both load it.
_LOCK_WORKSPACE_SQL = "SELECT pg_advisory_xact_lock($1::bigint)"


@dataclass(frozen=True)
class Scope:
    """The rows a backup holds: one workspace's (or every workspace's) rows of some tables."""

    workspace: uuid.UUID | None
    tables: tuple[Table, ...]

    @property
    def workspace_text(self) -> str:
        return "" if self.workspace is None else str(self.workspace)

    def copy_filter(self, table: Table) -> str | None:
        """The COPY's WHERE condition, or None for every workspace.

        The one place a value is spliced into SQL: COPY cannot bind parameters. The
        text is that of a parsed UUID, never the caller's.
        """
        if self.workspace is None:
            return None
        assert isinstance(self.workspace, uuid.UUID)
        return f"{table.workspace_column.quoted} = '{self.workspace}'"


@dataclass(frozen=True)
class CopyColumn:
    """A column as a backup copies it: its name and its type as PostgreSQL formats it."""

    name: str
    database_type: str

    @functools.cached_property
    def quoted(self) -> str:
        return quote_ident(self.name)


@dataclass(frozen=True)
class CopyShape:
    """A table as its COPY data holds it: the columns that are copied, in order."""

    table: Table
    columns: tuple[CopyColumn, ...]

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def header(self) -> pb.BackupTable:
        return pb.BackupTable(
            name=self.table.name,
            columns=self.column_names,
            column_types=[c.database_type for c in self.columns],
        )


async def copy_shapes(conn: Connection, tables: Sequence[Table]) -> list[CopyShape]:
    """How each table is copied: its columns as they are in this transaction, without the
    generated ones. FAILED_PRECONDITION (TABLE_CHANGED) for a table that is gone."""
    if not tables:
        return []
    names = [t.name for t in tables]
    columns: dict[str, list[CopyColumn]] = {}
    for row in await conn.fetch(_COLUMNS_SQL, tables[0].schema, names):
        columns.setdefault(row["table_name"], []).append(
            CopyColumn(row["column_name"], row["database_type"])
        )
    for table in tables:
        if table.name not in columns:
            raise ServiceError(
                Code.FAILED_PRECONDITION,
                "TABLE_CHANGED",
                f"table {table.name!r} is gone: dropped, or replaced by another kind of relation",
                metadata={"table": table.name},
            )
    return [CopyShape(t, tuple(columns[t.name])) for t in tables]


async def lock_tables(conn: Connection, tables: Sequence[Table], mode: str) -> None:
    """Locks `tables` in `mode` until the transaction ends.

    Run before a transaction's first query, this also keeps a REPEATABLE READ
    snapshot consistent with the tables' definitions: no ALTER TABLE can commit
    between the snapshot and the end (one that rewrites a table would otherwise
    make it look empty to the snapshot).
    """
    if tables:
        names = ", ".join(t.qualified for t in tables)
        await conn.execute(f"LOCK TABLE {names} IN {mode} MODE")


@dataclass(frozen=True)
class ForeignKey:
    """A foreign key between two tables of a backup."""

    child: str
    parent: str
    name: str
    deferrable: bool
    nullable: bool
    """A column of the key may be NULL: a row with a NULL there references nothing."""


async def foreign_keys(conn: Connection, tables: Sequence[Table]) -> list[ForeignKey]:
    """The foreign keys between different tables of `tables`."""
    if not tables:
        return []
    rows = await conn.fetch(_REFERENCES_SQL, tables[0].schema, [t.name for t in tables])
    return [
        ForeignKey(
            r["child"], r["parent"], r["constraint_name"], r["deferrable"], bool(r["nullable"])
        )
        for r in rows
    ]


def _parents(keys: Iterable[ForeignKey]) -> dict[str, set[str]]:
    parents: dict[str, set[str]] = {}
    for key in keys:
        parents.setdefault(key.child, set()).add(key.parent)
    return parents


def referenced_first(tables: Sequence[Table], keys: Sequence[ForeignKey]) -> list[Table]:
    """`tables` with every table after the tables it references, otherwise in the given order.

    A cycle of references cannot be ordered. Inside one, the next table is the first
    whose references to tables not placed yet are all DEFERRABLE (a restore checks
    those at COMMIT); failing that, the first whose references to tables not placed
    yet can all be NULL (its rows that leave them NULL load in that order); failing
    that, the first in the given order.
    """
    levels = [
        _parents(keys),
        _parents(k for k in keys if not k.deferrable),
        _parents(k for k in keys if not k.deferrable and not k.nullable),
    ]
    remaining = list(tables)
    placed: set[str] = set()
    ordered: list[Table] = []
    while remaining:
        ready = remaining[0]
        for parents in levels:
            found = next((t for t in remaining if parents.get(t.name, set()) <= placed), None)
            if found is not None:
                ready = found
                break
        remaining.remove(ready)
        placed.add(ready.name)
        ordered.append(ready)
    return ordered


def immediate_cycles(keys: Sequence[ForeignKey]) -> list[ForeignKey]:
    """The keys that are not DEFERRABLE and lie on a cycle of such keys between tables.

    Rows of those tables that reference each other around the cycle cannot be loaded
    table by table: whichever goes first, its rows reference rows not loaded yet.
    """
    immediate = [k for k in keys if not k.deferrable]
    parents = _parents(immediate)

    def reaches(start: str, goal: str) -> bool:
        seen: set[str] = set()
        stack = [start]
        while stack:
            table = stack.pop()
            if table == goal:
                return True
            if table not in seen:
                seen.add(table)
                stack.extend(parents.get(table, ()))
        return False

    # child -> parent lies on a cycle when the parent references its way back to the child.
    return [k for k in immediate if reaches(k.parent, k.child)]


async def dependency_order(conn: Connection, tables: Sequence[Table]) -> list[Table]:
    """`tables` in the order a backup copies them: tables others reference first."""
    keys = await foreign_keys(conn, tables)
    cycle = immediate_cycles(keys)
    if cycle:
        log.warning(
            "tables %s reference each other through foreign keys that are not DEFERRABLE "
            "(%s): a backup of rows that reference each other around that cycle cannot be "
            "restored; declare those keys DEFERRABLE",
            ", ".join(sorted({k.child for k in cycle})),
            ", ".join(k.name for k in cycle),
        )
    return referenced_first(tables, keys)


async def defer_constraints(conn: Connection) -> None:
    """Checks the transaction's DEFERRABLE constraints at COMMIT."""
    await conn.execute(_DEFER_CONSTRAINTS_SQL)


def cycle_violation(
    error: asyncpg.ForeignKeyViolationError, cycle: Sequence[ForeignKey]
) -> ServiceError | None:
    """FAILED_PRECONDITION (FOREIGN_KEY_CYCLE) when `error` broke a key of `cycle`."""
    # A partitioned table's key reports the partition as its table, under the key's name.
    key = next((k for k in cycle if k.name == error.constraint_name), None)
    if key is None:
        return None
    tables = ", ".join(repr(t) for t in sorted({k.child for k in cycle}))
    keys = ", ".join(f"{k.child}.{k.name}" for k in cycle)
    return ServiceError(
        Code.FAILED_PRECONDITION,
        "FOREIGN_KEY_CYCLE",
        f"foreign key {key.name!r} of table {key.child!r} refused a row of the backup: "
        f"tables {tables} reference each other through keys that are not DEFERRABLE "
        f"({keys}), which PostgreSQL checks statement by statement, so rows that reference "
        "each other around that cycle load in no table order. Declare those keys "
        "DEFERRABLE (ALTER TABLE ... ALTER CONSTRAINT ... DEFERRABLE) and restore again; "
        "nothing was written",
        metadata={"table": key.child, "constraint": key.name},
    )


def check_columns(header: pb.BackupHeader, shapes: Sequence[CopyShape]) -> None:
    """FAILED_PRECONDITION (TABLE_CHANGED) unless each table still has the backup's columns,
    in the same order and of the same types: binary COPY data only fits those."""
    for backup, shape in zip(header.tables, shapes, strict=True):
        now = dict(zip(shape.column_names, (c.database_type for c in shape.columns), strict=True))
        then = dict(zip(backup.columns, backup.column_types, strict=True))
        if list(backup.columns) == shape.column_names and then == now:
            continue
        differences = [f"{name!r} is not in the table" for name in then if name not in now]
        differences += [f"{name!r} is not in the backup" for name in now if name not in then]
        differences += [
            f"{name!r} is {now[name]}, the backup's {then[name]}"
            for name in then
            if name in now and now[name] != then[name]
        ]
        detail = "; ".join(differences[:5]) or "the columns are in another order"
        raise ServiceError(
            Code.FAILED_PRECONDITION,
            "TABLE_CHANGED",
            f"table {shape.table.name!r} differs from the backup: {detail}",
            metadata={"table": shape.table.name},
        )


async def lock_scope(conn: Connection, scope: Scope) -> None:
    """Keeps other restores (and, for every workspace, all writers) out of the scope, and
    changes to its tables' columns out until the restore ends.

    Taken before the restore reads the tables' columns, so the columns it checks the
    backup against are the ones its COPY meets.
    """
    if scope.workspace is not None:
        digest = hashlib.sha256(b"raptorflow-restore:" + scope.workspace.bytes).digest()
        await conn.execute(_LOCK_WORKSPACE_SQL, int.from_bytes(digest[:8], "big", signed=True))
        # What the restore's DELETE and COPY take anyway, all at once and up front.
        await lock_tables(conn, scope.tables, "ROW EXCLUSIVE")
        return
    # A restore of every workspace replaces whole tables: nobody writes to them meanwhile
    # (reads go on), so the check that they are empty still holds when the rows go in.
    await lock_tables(conn, scope.tables, "SHARE ROW EXCLUSIVE")


async def advance_sequences(conn: Connection, shapes: Sequence[CopyShape]) -> None:
    """Moves each sequence that feeds a copied column past the column's largest value."""
    if not shapes:
        return
    copied = {(s.table.name, c.name): (s.table, c) for s in shapes for c in s.columns}
    names = [s.table.name for s in shapes]
    for row in await conn.fetch(_SEQUENCES_SQL, shapes[0].table.schema, names):
        found = copied.get((row["table_name"], row["column_name"]))
        if found is None:
            continue
        table, column = found
        top = await conn.fetchval(f"SELECT max({column.quoted}) FROM {table.qualified}")
        if top is not None:
            await conn.fetchval(_ADVANCE_SEQUENCE_SQL, row["sequence"], top)


async def clear_scope(
    conn: Connection,
    scope: Scope,
    shapes: Sequence[CopyShape],
    replace_existing: bool,
    report: Report,
) -> int:
    """Deletes the scope's rows (replace_existing) or refuses a scope that has rows."""
    replaced = 0
    if replace_existing:
        await refuse_dependent_rows(conn, scope, shapes)
    # Referencing tables first: their rows go before the rows they reference.
    for shape in reversed(shapes):
        table = shape.table
        condition, args = "", []
        if scope.workspace is not None:
            condition, args = f" WHERE {table.workspace_column.quoted} = $1", [scope.workspace]
        if replace_existing:
            await report.start(table.name)
            status = await conn.execute(f"DELETE FROM {table.qualified}{condition}", *args)
            rows = copied_rows(status)
            report.finish(table.name, "DELETE (replace)", rows)
            replaced += rows
        elif await conn.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {table.qualified}{condition})", *args
        ):
            holder = f"workspace {scope.workspace} has rows in" if scope.workspace else "rows in"
            raise ServiceError(
                Code.FAILED_PRECONDITION,
                "WORKSPACE_NOT_EMPTY",
                f"{holder} table {table.name!r}; set replace_existing to replace them",
                metadata={"table": table.name},
            )
    return replaced


async def refuse_dependent_rows(
    conn: Connection, scope: Scope, shapes: Sequence[CopyShape]
) -> None:
    """FAILED_PRECONDITION (DEPENDENT_ROWS_OUTSIDE_BACKUP) if deleting the scope's rows would
    cascade to (or null, or default) rows of a table the backup does not hold.

    Runs before anything is deleted. The scope's rows of each referenced table are
    locked first (FOR UPDATE, as the DELETE would), so a row that starts to reference
    them meanwhile waits for the restore instead of slipping in after the look.
    """
    if not shapes:
        return
    tables = {s.table.name: s.table for s in shapes}
    keys = await conn.fetch(_OUTSIDE_REFERENCES_SQL, shapes[0].table.schema, list(tables))
    locked: set[str] = set()
    for key in keys:
        parent = tables[key["parent"]]
        condition, args = "", []
        if scope.workspace is not None:
            condition, args = f" WHERE p.{parent.workspace_column.quoted} = $1", [scope.workspace]
        if parent.name not in locked:
            locked.add(parent.name)
            await conn.execute(
                f"SELECT count(*) FROM (SELECT 1 FROM {parent.qualified} p{condition} "
                "FOR UPDATE) locked",
                *args,
            )
        # Names from pg_catalog, quoted; the join is the key's own match (a NULL in any of
        # its columns references nothing).
        child = f"{quote_ident(key['child_schema'])}.{quote_ident(key['child'])}"
        join = " AND ".join(
            f"c.{quote_ident(c)} = p.{quote_ident(p)}"
            for c, p in zip(key["child_columns"], key["parent_columns"], strict=True)
        )
        found = await conn.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {child} c JOIN {parent.qualified} p ON {join}"
            f"{condition})",
            *args,
        )
        if found:
            named = key["child"]
            if key["child_schema"] != parent.schema:
                named = f"{key['child_schema']}.{named}"
            raise _dependent_rows(scope, parent, named, key["constraint_name"], key["action"])


def _dependent_rows(
    scope: Scope, parent: Table, child: str, constraint: str, action: str
) -> ServiceError:
    clause, effect = _DELETE_ACTIONS[action]
    whose = f"workspace {scope.workspace}'s" if scope.workspace else "the"
    return ServiceError(
        Code.FAILED_PRECONDITION,
        "DEPENDENT_ROWS_OUTSIDE_BACKUP",
        f"table {child!r}, which the backup does not hold, has rows that reference {whose} "
        f"rows of {parent.name!r}: replacing those would {effect} (foreign key "
        f"{constraint!r}, ON DELETE {clause}). Restore a backup that also holds {child!r}, or "
        "remove those rows first; nothing was written",
        metadata={"table": child, "referenced_table": parent.name},
    )


def copied_rows(status: str) -> int:
    # "COPY 123" / "DELETE 123"
    return int(status.rsplit(" ", 1)[-1])


async def limit_statements(conn: Connection, budget: float) -> None:
    """Bounds every statement of the transaction (its COPYs included) by `budget` seconds.

    SET LOCAL, not set_config(): a SET takes no snapshot, so it may precede a
    REPEATABLE READ transaction's LOCK TABLE (`lock_tables`). Local to the
    transaction: the connection goes back to the pool with its own timeout.
    """
    await conn.execute(f"SET LOCAL statement_timeout = {max(1, int(budget * 1000))}")
