"""Retention rules from configuration, and the batched delete of rows older than a rule allows.

Rules come only from the server's configuration (`retention_rules`), never from
callers: a job names at most which configured rules run. Their shape (JSON, field
types, ranges) is checked at start-up and a bad rule stops the server there. Whether
a rule's table and column exist is checked against the catalog each time a job
checks or runs it, because exposed tables can appear (and change) after start-up:
such a rule makes the job FAILED_PRECONDITION (reason RETENTION_RULE_INVALID).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from raptorflow.data.server.config import setting_document
from raptorflow.data.server.db.catalog import CatalogCache, Column, Table
from raptorflow.data.server.errors import Code, ServiceError
from raptorflow.data.server.maintenance.progress import Progress
from raptorflow.data.v1 import job_pb2

SETTING = "RAPTORFLOW_RETENTION_RULES"
DEFAULT_BATCH_SIZE = 1000
MAX_BATCH_SIZE = 100_000
MAX_AGE_LIMIT_SECONDS = 100 * 365 * 86400
"""Ages beyond a century would push the cutoff towards PostgreSQL's timestamp range."""
TIMESTAMP_TYPES = frozenset({"timestamptz", "timestamp", "date"})
ACTION = "DELETE (retention)"

_FIELDS = frozenset({"table", "column", "max_age_seconds", "batch_size"})

# Cutoff from the database's clock, so replicas with skewed clocks agree.
_CUTOFF_SQL = "SELECT now() - make_interval(secs => $1::float8)"
# A custom plan for each batch: the cutoff's selectivity decides between an index
# range scan and a sequential scan; a cached generic plan would guess.
_CUSTOM_PLANS = "SET LOCAL plan_cache_mode = force_custom_plan"
_SIZE_SQL = "SELECT pg_total_relation_size($1::regclass)"


@dataclass(frozen=True)
class RetentionRule:
    """Rows of `table` whose `column` is older than `max_age_seconds` are deleted, in batches."""

    table: str
    column: str
    max_age_seconds: float
    batch_size: int = DEFAULT_BATCH_SIZE


def _refuse(problem: str) -> SystemExit:
    return SystemExit(f"invalid {SETTING}: {problem}")


def _read(text: str) -> str:
    try:
        return setting_document(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise _refuse(f"cannot read {text.strip()[1:]!r}: {exc}") from exc


def _name(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise _refuse(f"{where}: {key!r} must be a non-empty string")
    return value


def _max_age(entry: Mapping[str, Any], where: str) -> float:
    value = entry.get("max_age_seconds")
    # bool is an int in Python; `true` is not an age.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse(f"{where}: 'max_age_seconds' must be a number of seconds")
    if not math.isfinite(value) or not 0 < value <= MAX_AGE_LIMIT_SECONDS:
        raise _refuse(f"{where}: 'max_age_seconds' must be > 0 and at most {MAX_AGE_LIMIT_SECONDS}")
    return float(value)


def _batch_size(entry: Mapping[str, Any], where: str) -> int:
    value = entry.get("batch_size", DEFAULT_BATCH_SIZE)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(f"{where}: 'batch_size' must be an integer")
    if not 1 <= value <= MAX_BATCH_SIZE:
        raise _refuse(f"{where}: 'batch_size' must be from 1 to {MAX_BATCH_SIZE}")
    return value


def _rule(entry: object, index: int) -> RetentionRule:
    where = f"rule [{index}]"
    if not isinstance(entry, dict):
        raise _refuse(f"{where} must be a JSON object")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        # A misspelt "batch_size" would otherwise silently fall back to the default.
        raise _refuse(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")
    return RetentionRule(
        table=_name(entry, "table", where),
        column=_name(entry, "column", where),
        max_age_seconds=_max_age(entry, where),
        batch_size=_batch_size(entry, where),
    )


def parse_retention_rules(text: str) -> tuple[RetentionRule, ...]:
    """The rules of a `retention_rules` setting (JSON, or '@path' to a JSON file).

    Raises SystemExit with a message naming the setting and the bad rule, so a
    server with a bad configuration stops at start-up. Empty text means no rules.
    """
    if not text.strip():
        return ()
    raw = _read(text)
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise _refuse(f"not valid JSON: {exc}") from exc
    if not isinstance(document, list):
        raise _refuse("must be a JSON array of rules")
    rules = tuple(_rule(entry, index) for index, entry in enumerate(document))
    seen: set[str] = set()
    for index, rule in enumerate(rules):
        if rule.table in seen:
            # A job names rules by table, so a table has at most one.
            raise _refuse(f"rule [{index}]: table {rule.table!r} already has a rule")
        seen.add(rule.table)
    return rules


def rule_problem(rule: RetentionRule, table: Table | None) -> str:
    """Why `rule` cannot run against the catalog's `table` (None: not exposed); '' if it can."""
    if table is None:
        return f"retention rule for {rule.table!r}: no exposed table has that name"
    column = table.by_name.get(rule.column)
    if column is None:
        return f"retention rule for {rule.table!r}: the table has no column {rule.column!r}"
    if column.type_name not in TIMESTAMP_TYPES:
        return (
            f"retention rule for {rule.table!r}: column {rule.column!r} is "
            f"{column.database_type}, not a timestamp, timestamptz or date column"
        )
    return ""


async def resolve(catalog: CatalogCache, rule: RetentionRule) -> tuple[Table, Column]:
    """The rule's table and column from the catalog, or FAILED_PRECONDITION."""
    table = catalog.current.tables.get(rule.table)
    if table is None:
        # A table created after start-up: the cache reloads (throttled) on a miss.
        try:
            table = await catalog.table(rule.table)
        except ServiceError:
            table = None
    problem = rule_problem(rule, table)
    if problem or table is None:
        raise ServiceError(
            Code.FAILED_PRECONDITION,
            "RETENTION_RULE_INVALID",
            problem,
            metadata={"table": rule.table[:200], "column": rule.column[:200]},
        )
    return table, table.by_name[rule.column]


def pick_statement(table: Table, column: Column) -> str:
    """A batch's first statement: locks at most $2 rows with `column` before $1; their ctids.

    Locked FOR UPDATE (as a DELETE would lock them), so nobody changes them before the
    batch's DELETE (`delete_statement`) reaches them. A row another transaction updates
    or holds meanwhile is waited for, then re-checked and picked as it is now (at its new
    ctid) if it is still expired. By ctid, so tables without a primary key work too.
    """
    return (
        f"SELECT ctid FROM {table.qualified} WHERE {column.quoted} < $1::timestamptz "
        "LIMIT $2 FOR UPDATE"
    )


def delete_statement(table: Table, column: Column) -> str:
    """A batch's second statement: deletes the rows the batch picked ($2, ctids).

    A statement of its own, so its snapshot is taken after the pick's lock waits: a row
    version committed while the pick waited for it is visible to it (in one statement
    with the pick, it would not be, and the batch would come up a row short, which reads
    as "nothing left"). So a batch deletes fewer rows than it may pick only when fewer
    expired rows remain. The condition repeats the cutoff because a ctid is unique only
    within one partition: on a partitioned table a row of another partition with the same
    ctid must still be expired to go (a batch may then delete a few more rows than it
    picked, never a row it should keep). The timestamptz cast makes `timestamp` columns
    compare in the session's time zone and `date` columns from midnight; both can use an
    index.
    """
    return (
        f"DELETE FROM {table.qualified} WHERE ctid = ANY($2::tid[]) "
        f"AND {column.quoted} < $1::timestamptz"
    )


def count_statement(table: Table, column: Column) -> str:
    return f"SELECT count(*) FROM {table.qualified} WHERE {column.quoted} < $1::timestamptz"


def _deleted(status: str) -> int:
    # The command tag is "DELETE <rows>".
    return int(status.rsplit(" ", 1)[-1])


async def delete_expired(
    pool: asyncpg.Pool,
    table: Table,
    column: Column,
    rule: RetentionRule,
    progress: Progress,
) -> job_pb2.TableReport:
    """Deletes the rule's expired rows in batches, each its own short transaction.

    The cutoff is taken once, at the start, so the loop ends even while new rows
    keep ageing past the rule. A connection is taken per batch, so other users
    of the owner pool (job leases among them) get a turn between batches.
    Cancelled, the batch in flight is rolled back and earlier batches stay deleted.
    """
    phase = f"retention {table.schema}.{table.name}"
    started = time.perf_counter()
    async with pool.acquire() as conn:
        cutoff = await conn.fetchval(_CUTOFF_SQL, rule.max_age_seconds)
        size_before = int(await conn.fetchval(_SIZE_SQL, table.qualified))
        try:
            total = int(await conn.fetchval(count_statement(table, column), cutoff))
        except asyncpg.QueryCanceledError:
            total = 0  # too many rows to count within the statement timeout: "unknown"
    deleted = 0
    await progress.report(phase, done=0, total=total, unit=job_pb2.PROGRESS_UNIT_ROWS)
    pick, delete = pick_statement(table, column), delete_statement(table, column)
    while True:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(_CUSTOM_PLANS)
            picked = [row["ctid"] for row in await conn.fetch(pick, cutoff, rule.batch_size)]
            batch = _deleted(await conn.execute(delete, cutoff, picked)) if picked else 0
        deleted += batch
        await progress.report(
            phase,
            done=deleted,
            total=max(total, deleted) if total else 0,
            unit=job_pb2.PROGRESS_UNIT_ROWS,
        )
        # Short only when fewer expired rows were left than a batch may take (see
        # delete_statement). A trigger that cancels deletes also ends the loop here,
        # rather than picking the same rows for ever.
        if batch < rule.batch_size:
            break
    async with pool.acquire() as conn:
        size_after = int(await conn.fetchval(_SIZE_SQL, table.qualified))
    return job_pb2.TableReport(
        table=table.name,
        action=ACTION,
        rows=deleted,
        size_bytes_before=size_before,
        size_bytes_after=size_after,
        duration_ms=(time.perf_counter() - started) * 1000.0,
    )


def select_rules(rules: Sequence[RetentionRule], names: Sequence[str]) -> tuple[RetentionRule, ...]:
    """The rules a job runs: all (empty `names`) or those of the named tables, in that order."""
    if not names:
        return tuple(rules)
    by_table = {rule.table: rule for rule in rules}
    return tuple(by_table[name] for name in names if name in by_table)
