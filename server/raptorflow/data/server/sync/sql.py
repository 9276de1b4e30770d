"""Every SQL statement of sync streams, in one place: fixed text, and builders per table.

Identifiers come from the catalog and are quoted; values are bound. Snapshots
(`pg_snapshot`) travel as text and are cast in SQL, so the driver needs no codec.
"""

from __future__ import annotations

from collections.abc import Sequence

from raptorflow.data.server.db import values
from raptorflow.data.server.db.catalog import Column, Table
from raptorflow.data.server.db.compiler import select_expr as select_expression
from raptorflow.data.server.sync.tokens import Position
from raptorflow.data.v1 import value_pb2

CHANNEL = "raptorflow_data_changes"

# For the transaction they run in. The change log grows from empty, so its
# statistics are often missing or stale, and the plans cached or chosen from
# them were slow by orders of magnitude (a page of a large epoch took a second,
# sorting or bitmap-scanning the whole epoch, instead of a millisecond). Custom
# plans see the real parameters; without bitmap scans and sorts the page reads
# below can only walk their index in order and stop at the page's end. A sort
# that is needed all the same then costs "disabled" in the plan, which must not
# make PostgreSQL compile the query (JIT took 35 ms per page).
CUSTOM_PLANS = "SET LOCAL plan_cache_mode = force_custom_plan"
PAGE_PLANS = (
    "SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL jit = off; "
    "SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off"
)

# Inside REPEATABLE READ as the first statement, this is the transaction's own
# snapshot; elsewhere, the statement's.
CURRENT_SNAPSHOT = "SELECT pg_current_snapshot()::text"

# An epoch's target: a snapshot, and the sequence's value read after it was
# taken (sequences are not transactional: this is the latest value handed out),
# which no entry visible in the snapshot exceeds.
EPOCH = """
SELECT pg_current_snapshot()::text AS cur,
       (SELECT last_value FROM raptorflow_data.change_seq) AS high
"""

# True when an entry this position may still need was pruned; NULL when nothing was.
PRUNED = """
SELECT max_xid >= pg_snapshot_xmin($2::text::pg_snapshot)
FROM raptorflow_data.change_log_pruned WHERE workspace_id = $1
"""

# Registers a consumer or records its progress. A NULL position means "now".
UPSERT_CONSUMER = """
WITH p AS (SELECT COALESCE($4::text, pg_current_snapshot()::text) AS position)
INSERT INTO raptorflow_data.sync_consumers AS s
    (workspace_id, consumer_id, tables, position, position_xmin, acknowledged_at)
SELECT $1, $2, $3::text[], p.position, pg_snapshot_xmin(p.position::pg_snapshot), now() FROM p
ON CONFLICT (workspace_id, consumer_id) DO UPDATE
SET tables = COALESCE(EXCLUDED.tables, s.tables),
    position = EXCLUDED.position,
    position_xmin = EXCLUDED.position_xmin,
    acknowledged_at = EXCLUDED.acknowledged_at
"""

# The fallback poll: which of these workspaces have entries committed since the
# previous poll's snapshot ($2; NULL on the first poll, which wakes nobody).
# One statement, so the entries and the snapshot returned agree.
POLL = """
SELECT pg_current_snapshot()::text AS cur,
       ARRAY(
           SELECT w FROM unnest($1::text[]) AS w
           WHERE EXISTS (
               SELECT 1 FROM raptorflow_data.change_log AS c
               WHERE c.workspace_id = w
                 AND c.xid >= pg_snapshot_xmin($2::text::pg_snapshot)
                 AND NOT pg_visible_in_snapshot(c.xid, $2::text::pg_snapshot))
       ) AS woken
"""

# Pruning, in bounded batches: each statement deletes at most $2 entries and
# raises the pruned mark of their workspaces in the same transaction, so a
# reader that sees an entry gone also sees the mark.
_PRUNE_TAIL = """
deleted AS (
    DELETE FROM raptorflow_data.change_log AS c USING doomed AS d
    WHERE c.seq = d.seq
    RETURNING c.workspace_id, c.xid
),
marked AS (
    INSERT INTO raptorflow_data.change_log_pruned AS p (workspace_id, max_xid)
    SELECT workspace_id, max(xid) FROM deleted GROUP BY workspace_id
    ON CONFLICT (workspace_id) DO UPDATE SET max_xid = GREATEST(p.max_xid, EXCLUDED.max_xid)
)
SELECT count(*) FROM deleted
"""
PRUNE_EXPIRED = (
    """
WITH doomed AS (
    SELECT seq FROM raptorflow_data.change_log
    WHERE logged_at < now() - make_interval(secs => $1)
    ORDER BY logged_at
    LIMIT $2
),"""
    + _PRUNE_TAIL
)
# Entries every live consumer of their workspace has acknowledged (older than the
# oldest snapshot any of them still reads from).
PRUNE_ACKNOWLEDGED = (
    """
WITH live AS (
    SELECT workspace_id, min(position_xmin) AS xmin FROM raptorflow_data.sync_consumers
    WHERE acknowledged_at > now() - make_interval(secs => $1)
    GROUP BY workspace_id
),
doomed AS (
    SELECT c.seq FROM live AS l
    CROSS JOIN LATERAL (
        SELECT seq FROM raptorflow_data.change_log
        WHERE workspace_id = l.workspace_id AND xid < l.xmin
        LIMIT $2
    ) AS c
    LIMIT $2
),"""
    + _PRUNE_TAIL
)
# Consumers silent for far longer than they could matter.
FORGET_CONSUMERS = """
DELETE FROM raptorflow_data.sync_consumers
WHERE acknowledged_at < now() - make_interval(secs => $1)
"""


def _typed(placeholder: str, column: Column) -> str:
    if column.as_text:
        return f"CAST({placeholder}::text AS {column.bind_type})"
    return f"{placeholder}::{column.bind_type}"


def _key_list(columns: Sequence[Column], prefix: str = "") -> str:
    return ", ".join(prefix + c.quoted for c in columns)


class Params:
    """Collects bound values and hands out `$n` placeholders."""

    def __init__(self, *initial: object) -> None:
        self.values: list[object] = list(initial)

    def add(self, value: object) -> str:
        self.values.append(value)
        return f"${len(self.values)}"

    def key(self, columns: Sequence[Column], key: Sequence[value_pb2.Value]) -> str:
        """A row of typed placeholders for primary-key values taken from a token."""
        return ", ".join(
            _typed(self.add(values.to_db(column, value, "resume_token")), column)
            for column, value in zip(columns, key, strict=True)
        )


def key_columns(table: Table) -> tuple[Column, ...]:
    return tuple(table.by_name[name] for name in table.primary_key)


def snapshot_rows(table: Table, params: Params, after: Sequence[value_pb2.Value]) -> str:
    """The workspace's rows ($1) of one table in primary-key order, after a key if given."""
    keys = key_columns(table)
    where = f"{table.workspace_column.quoted} = $1"
    if after:
        where += f" AND ({_key_list(keys)}) > ({params.key(keys, after)})"
    return (
        f"SELECT {', '.join(select_expression(c) for c in table.columns)} "
        f"FROM {table.qualified} WHERE {where} ORDER BY {_key_list(keys)}"
    )


def change_rows(table: Table) -> str:
    """Entries by sequence value ($1, an array): sequence value, operation, workspace,
    then the row decoded as the table's row.

    `jsonb_populate_record` turns the logged JSON back into the table's row type,
    so each column reaches the driver with its own type and codec, exactly as a
    snapshot reads it. The subquery keeps the table's column names from meeting
    the change log's. Only the primary key is asked for, so the only plan is
    one lookup per entry, in order; the caller checks the workspace.
    """
    return (
        "SELECT c.seq, c.operation::text, c.workspace_id, x.* "
        "FROM raptorflow_data.change_log AS c "
        "CROSS JOIN LATERAL (SELECT "
        f"{', '.join(select_expression(c) for c in table.columns)} "
        f"FROM jsonb_populate_record(NULL::{table.qualified}, c.row_data)) AS x "
        "WHERE c.seq = ANY($1::bigint[]) ORDER BY c.seq"
    )


def _not_applied(
    tables: Sequence[Table], index: int, position: Position, params: Params, prev: str
) -> str:
    """For an entry of tables[index]: true when the consumer has not applied it yet.

    Without boundaries that is "not visible in prev". A boundary says that rows
    up to it (in stream order: table index, then primary key) were read under
    its older snapshot, so for those rows "not visible in that snapshot".
    """
    table = tables[index]
    keys = key_columns(table)
    branches = []
    whole_table = prev
    for boundary in position.boundaries:
        if boundary.table_index > index:
            whole_table = params.add(boundary.snapshot)
            break
        if boundary.table_index == index and boundary.key:
            row = (
                f"(SELECT ({_key_list(keys, 'r.')}) <= ({params.key(keys, boundary.key)}) "
                f"FROM jsonb_populate_record(NULL::{table.qualified}, c.row_data) AS r)"
            )
            snapshot = params.add(boundary.snapshot)
            branches.append(
                f"WHEN {row} THEN NOT pg_visible_in_snapshot(c.xid, {snapshot}::text::pg_snapshot)"
            )
    fallback = f"NOT pg_visible_in_snapshot(c.xid, {whole_table}::text::pg_snapshot)"
    if not branches:
        return fallback
    return f"CASE {' '.join(branches)} ELSE {fallback} END"


def change_page(
    workspace: str, tables: Sequence[Table], position: Position, limit: int
) -> tuple[str, list[object]]:
    """The next entries of an epoch: (sequence value, table name), in sequence order.

    Entries of the workspace and tables that are visible in `cur`, not yet
    applied at `position`, and after `last_seq`. An epoch's first page finds
    its entries by the (workspace_id, xid) index: transactions older than
    `xmin(lowest)` are visible in every snapshot the position holds, so only
    later ones can have entries to send. Later pages walk the (workspace_id,
    seq) index from `last_seq` to `high` and stop after `limit` entries, so
    every page of a large epoch costs about the same (run under `PAGE_PLANS`).
    """
    params = Params(workspace, [t.name for t in tables], position.cur)
    prev = params.add(position.snapshot)
    if position.boundaries:
        cases = " ".join(
            f"WHEN {params.add(t.name)} THEN {_not_applied(tables, i, position, params, prev)}"
            for i, t in enumerate(tables)
        )
        not_applied = f"CASE c.table_name {cases} ELSE false END"
    else:
        not_applied = f"NOT pg_visible_in_snapshot(c.xid, {prev}::text::pg_snapshot)"
    wanted = (
        "c.workspace_id = $1 AND c.table_name = ANY($2::text[]) "
        f"AND pg_visible_in_snapshot(c.xid, $3::text::pg_snapshot) AND {not_applied}"
    )
    if position.last_seq:
        sql = (
            "SELECT c.seq, c.table_name FROM raptorflow_data.change_log AS c "
            f"WHERE {wanted} AND c.seq > {params.add(position.last_seq)} "
            f"AND c.seq <= {params.add(position.high)} "
            f"ORDER BY c.seq LIMIT {params.add(limit)}"
        )
    else:
        # Materialized, so that the candidates are found by the xid range alone
        # (walking the seq index instead would read the workspace's whole log).
        lowest = params.add(position.lowest)
        sql = (
            "WITH epoch AS MATERIALIZED ("
            "SELECT c.seq, c.table_name FROM raptorflow_data.change_log AS c "
            f"WHERE {wanted} AND c.xid >= pg_snapshot_xmin({lowest}::text::pg_snapshot)) "
            f"SELECT seq, table_name FROM epoch ORDER BY seq LIMIT {params.add(limit)}"
        )
    return sql, params.values
