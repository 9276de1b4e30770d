"""Which rows and columns a backup copies, in which order, and the SQL a restore runs
around its COPY (locks, emptiness, sequences).

Table and column names come from the catalog and are quoted; the workspace id
is bound as a parameter everywhere except in COPY's WHERE condition, which
cannot take one (`Scope.copy_filter`).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from raptorflow.data.server.db.catalog import Column, Table, quote_ident
from raptorflow.data.server.db.connections import Connection
from raptorflow.data.server.errors import Code, ServiceError
from raptorflow.data.server.maintenance.backup_stream import Report
from raptorflow.data.v1 import maintenance_service_pb2

pb = maintenance_service_pb2

# Local to the transaction: the connection goes back to the pool with its own timeout.
_SET_TIMEOUT_SQL = "SELECT set_config('statement_timeout', $1, true)"
# Generated columns are computed on insert and COPY refuses them, so a backup leaves them
# out. (Identity columns are kept: COPY FROM writes their values as given.)
_GENERATED_SQL = """
SELECT c.relname AS table_name, a.attname AS column_name
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = ANY($2::text[])
  AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated <> ''
"""
# Foreign keys between the tables of a backup: referenced tables are copied first, so a
# restore never loads a row before the row it references.
_REFERENCES_SQL = """
SELECT child.relname AS child, parent.relname AS parent
FROM pg_catalog.pg_constraint k
JOIN pg_catalog.pg_class child ON child.oid = k.conrelid
JOIN pg_catalog.pg_namespace cn ON cn.oid = child.relnamespace
JOIN pg_catalog.pg_class parent ON parent.oid = k.confrelid
JOIN pg_catalog.pg_namespace pn ON pn.oid = parent.relnamespace
WHERE k.contype = 'f' AND cn.nspname = $1 AND pn.nspname = $1
  AND child.relname = ANY($2::text[]) AND parent.relname = ANY($2::text[])
  AND child.oid <> parent.oid
"""
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
class CopyShape:
    """A table as its COPY data holds it: the columns that are copied, in order."""

    table: Table
    columns: tuple[Column, ...]

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
    """How each table is copied: the catalog's columns without the generated ones."""
    if not tables:
        return []
    names = [t.name for t in tables]
    generated = {
        (r["table_name"], r["column_name"])
        for r in await conn.fetch(_GENERATED_SQL, tables[0].schema, names)
    }
    return [
        CopyShape(t, tuple(c for c in t.columns if (t.name, c.name) not in generated))
        for t in tables
    ]


def referenced_first(tables: Sequence[Table], parents: dict[str, set[str]]) -> list[Table]:
    """`tables` with every table after the tables it references, otherwise in the given order.

    A cycle of references cannot be ordered; its tables keep the given order.
    """
    remaining = list(tables)
    placed: set[str] = set()
    ordered: list[Table] = []
    while remaining:
        ready = next((t for t in remaining if parents.get(t.name, set()) <= placed), remaining[0])
        remaining.remove(ready)
        placed.add(ready.name)
        ordered.append(ready)
    return ordered


async def dependency_order(conn: Connection, tables: Sequence[Table]) -> list[Table]:
    """`tables` in the order a backup copies them: tables others reference first."""
    parents: dict[str, set[str]] = {}
    rows = await conn.fetch(_REFERENCES_SQL, tables[0].schema, [t.name for t in tables])
    for row in rows:
        parents.setdefault(row["child"], set()).add(row["parent"])
    return referenced_first(tables, parents)


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


async def lock_scope(conn: Connection, scope: Scope, shapes: Sequence[CopyShape]) -> None:
    """Keeps other restores (and, for every workspace, all writers) out of the scope."""
    if scope.workspace is not None:
        digest = hashlib.sha256(b"raptorflow-restore:" + scope.workspace.bytes).digest()
        await conn.execute(_LOCK_WORKSPACE_SQL, int.from_bytes(digest[:8], "big", signed=True))
        return
    # A restore of every workspace replaces whole tables: nobody writes to them meanwhile
    # (reads go on), so the check that they are empty still holds when the rows go in.
    for shape in shapes:
        await conn.execute(f"LOCK TABLE {shape.table.qualified} IN SHARE ROW EXCLUSIVE MODE")


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
    """Bounds every statement of the transaction (its COPYs included) by `budget` seconds."""
    await conn.execute(_SET_TIMEOUT_SQL, str(max(1, int(budget * 1000))))
