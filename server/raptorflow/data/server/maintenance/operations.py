"""VACUUM, ANALYZE, REINDEX CONCURRENTLY and retention cleanup of exposed tables.

Everything runs on the OWNER pool. PostgreSQL 15 lets a role that does not own a
table run VACUUM or ANALYZE on it and merely answers with a WARNING ("skipping
... only table or database owner can vacuum it"), so a statement that returned
is not proof of work done: the warnings of each statement are captured and a
skip fails the job (FAILED_PRECONDITION, reason INSUFFICIENT_PRIVILEGE). As a
second guard, independent of client_min_messages, the table's vacuum/analyze
counter in pg_stat_all_tables must have moved.

Timeouts: the owner pool's connections carry `statement_timeout` (30 s by
default), which a VACUUM or REINDEX of a big table can exceed. Those statements
therefore run with the session's statement_timeout set to 0 and no client-side
timeout; the session value is reset right after (a connection whose reset fails
is terminated rather than returned to the pool without its cap). They are
bounded instead by cancellation: CancelJob cancels the job's task, and asyncpg
then cancels the statement in PostgreSQL. Retention batches are short by
construction and keep the pool's statement_timeout.

An interrupted REINDEX CONCURRENTLY (cancelled, failed) leaves invalid `_ccnew`
or `_ccold` indexes that PostgreSQL keeps updating on every write; the job drops
the ones it created (DROP INDEX CONCURRENTLY) before it ends. Some indexes cannot
be rebuilt concurrently at all (an exclusion constraint's, one left invalid by an
earlier failed CREATE INDEX CONCURRENTLY): PostgreSQL warns and skips just those
and rebuilds the rest, so the table's report lists the warning (`notices`) and the
job goes on. Only a skip for want of ownership or privileges fails a job.

Statistics: dead rows come from pg_stat_all_tables.n_dead_tup. PostgreSQL 15
updates it asynchronously for ordinary writes (each backend flushes its counts
at most once a second), but VACUUM writes its own result synchronously, so the
figure after a vacuum is current and the figure before may lag writes of the last
second or so. Partitioned parents have no statistics of their own (their
partitions do); their figures read 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.catalog import CatalogCache, Table, named_twice, quote_ident
from raptorflow.data.server.db.connections import Connection, Database
from raptorflow.data.server.errors import Code, ServiceError, combine, invalid_argument
from raptorflow.data.server.maintenance import retention
from raptorflow.data.server.maintenance.progress import Progress
from raptorflow.data.v1 import job_pb2

log = logging.getLogger(__name__)

INSUFFICIENT_PRIVILEGE = "INSUFFICIENT_PRIVILEGE"
# PostgreSQL's notices a table's report carries (TableReport.notices): what it said about
# the work beyond success. INFO, LOG and DEBUG are chatter.
_REPORTED_SEVERITIES = frozenset({"WARNING", "NOTICE"})
# REINDEX CONCURRENTLY leaving out one index it cannot rebuild that way, for example
# 'cannot reindex exclusion constraint index "public.x_excl" concurrently, skipping' or
# 'cannot reindex invalid index "public.x_idx" concurrently, skipping'.
_ONE_INDEX_SKIPPED = re.compile(r'cannot reindex .*\bindex ".+" concurrently, skipping', re.I)

_STATS_SQL = """
SELECT pg_total_relation_size(c.oid) AS size_bytes,
       coalesce(s.n_dead_tup, 0) AS dead_rows,
       coalesce(s.vacuum_count, 0) AS vacuum_count,
       coalesce(s.analyze_count, 0) AS analyze_count,
       c.relkind = 'r' AND current_setting('track_counts')::bool AS counted
FROM pg_catalog.pg_class c
LEFT JOIN pg_catalog.pg_stat_all_tables s ON s.relid = c.oid
WHERE c.oid = $1::regclass
"""
# Invalid indexes of the table, of its partitions and of their TOAST tables: REINDEX TABLE
# CONCURRENTLY rebuilds all of those, so an interrupted one can leave a `_ccnew` on each.
_INVALID_INDEXES_SQL = """
WITH tables AS (
    SELECT t.oid, t.reltoastrelid FROM pg_catalog.pg_class t
    WHERE t.oid = $1::regclass
       OR t.oid IN (SELECT relid FROM pg_catalog.pg_partition_tree($1::regclass))
)
SELECT i.indexrelid AS oid, n.nspname AS schema, c.relname AS name
FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE NOT i.indisvalid
  AND (i.indrelid IN (SELECT oid FROM tables) OR i.indrelid IN (SELECT reltoastrelid FROM tables))
"""


@dataclass(frozen=True)
class Statement:
    """One maintenance statement kind: how it is spelt, reported and verified."""

    verb: str
    """Lower-case word for progress phases and messages: vacuum, analyze, reindex."""
    action: str
    """The statement before the table name, also TableReport.action."""
    counter: str = ""
    """The pg_stat_all_tables counter a successful run increments; '' when none."""
    reports_dead_rows: bool = False

    def sql(self, table: Table) -> str:
        return f"{self.action} {table.qualified}"


VACUUM = Statement("vacuum", "VACUUM", "vacuum_count", reports_dead_rows=True)
VACUUM_ANALYZE = Statement("vacuum", "VACUUM (ANALYZE)", "vacuum_count", reports_dead_rows=True)
ANALYZE = Statement("analyze", "ANALYZE", "analyze_count")
REINDEX = Statement("reindex", "REINDEX TABLE CONCURRENTLY")


def insufficient_privilege(statement: Statement, table: Table, said: str) -> ServiceError:
    return ServiceError(
        Code.FAILED_PRECONDITION,
        INSUFFICIENT_PRIVILEGE,
        f"{statement.action} of table {table.name!r} did not run: {said} "
        "(maintenance needs the tables' owner: set the owner connection string)",
        metadata={"table": table.name[:200]},
    )


def _skip_error(
    statement: Statement, table: Table, message: asyncpg.PostgresLogMessage
) -> ServiceError | None:
    """The error a notice means, if it says PostgreSQL skipped the table.

    Lacking ownership or privileges is INSUFFICIENT_PRIVILEGE; any other skip of the
    whole table is TABLE_SKIPPED. A REINDEX CONCURRENTLY that leaves out single
    indexes rebuilt the others: that notice is no error, only reported.
    """
    text = message.message or ""
    lowered = text.lower()
    if (
        message.sqlstate == "42501"
        or "permission denied" in lowered
        or ("skipping" in lowered and "owner" in lowered)
    ):
        return insufficient_privilege(statement, table, text)
    if "skipping" in lowered and not _ONE_INDEX_SKIPPED.search(text):
        return ServiceError(
            Code.FAILED_PRECONDITION,
            "TABLE_SKIPPED",
            f"{statement.action} of table {table.name!r} did not run: {text}",
            metadata={"table": table.name[:200]},
        )
    return None


async def _reset_statement_timeout(conn: Connection) -> None:
    try:
        await conn.execute("RESET statement_timeout")
    except BaseException:
        # Never hand an uncapped session back to the pool.
        conn.terminate()
        raise


@contextlib.asynccontextmanager
async def without_statement_timeout(conn: Connection) -> AsyncIterator[None]:
    """Lifts the session's statement_timeout for one maintenance statement, then restores it."""
    await conn.execute("SET statement_timeout = 0")
    try:
        yield
    except BaseException:
        # The original failure (or cancellation) is what the caller must see.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await _reset_statement_timeout(conn)
        raise
    await _reset_statement_timeout(conn)


async def _run_watched(conn: Connection, statement: Statement, table: Table) -> list[str]:
    """Runs the statement with its notices captured; a skip of the table becomes a
    ServiceError. Returns the WARNING and NOTICE messages that did not fail it."""
    notices: list[asyncpg.PostgresLogMessage] = []

    def collect(
        _conn: asyncpg.Connection[asyncpg.Record]
        | asyncpg.pool.PoolConnectionProxy[asyncpg.Record],
        message: asyncpg.PostgresLogMessage,
    ) -> None:
        notices.append(message)

    conn.add_log_listener(collect)
    try:
        async with without_statement_timeout(conn):
            await conn.execute(statement.sql(table), timeout=None)
        # asyncpg delivers notices with loop.call_soon; let any still queued run.
        await asyncio.sleep(0)
    except asyncpg.InsufficientPrivilegeError as exc:
        raise insufficient_privilege(statement, table, str(exc.args[0])) from None
    finally:
        conn.remove_log_listener(collect)
    reported: list[str] = []
    for notice in notices:
        error = _skip_error(statement, table, notice)
        if error is not None:
            raise error
        severity = notice.severity_en or notice.severity or ""
        if severity.upper() in _REPORTED_SEVERITIES and notice.message:
            reported.append(notice.message)
            log.warning("%s %s: %s", statement.action, table.name, notice.message)
        else:
            log.info("%s %s: %s", statement.action, table.name, notice.message)
    return reported


async def maintain_table(
    conn: Connection, statement: Statement, table: Table
) -> job_pb2.TableReport:
    """Runs one maintenance statement on `conn` and reports it; fails if PostgreSQL skipped it.

    A role that may not maintain the table gets a WARNING (VACUUM, ANALYZE) or an
    error (REINDEX); both become INSUFFICIENT_PRIVILEGE. The counter check catches a
    skip whose warning never reached us (client_min_messages above WARNING). Other
    warnings (a REINDEX CONCURRENTLY that skipped single indexes) are in the report's
    `notices`.
    """
    before = await conn.fetchrow(_STATS_SQL, table.qualified)
    invalid_before: set[int] = set()
    if statement is REINDEX:
        invalid_before = {row["oid"] for row in await _invalid_indexes(conn, table)}
    started = time.perf_counter()
    try:
        notices = await _run_watched(conn, statement, table)
    except BaseException:
        if statement is REINDEX:
            await drop_new_invalid_indexes(conn, table, invalid_before)
        raise
    duration_ms = (time.perf_counter() - started) * 1000.0
    after = await conn.fetchrow(_STATS_SQL, table.qualified)
    if before is None or after is None:
        # $1::regclass resolved, so the table existed; it was dropped in between.
        raise ServiceError(
            Code.FAILED_PRECONDITION, "TABLE_CHANGED", f"table {table.name!r} was dropped"
        )
    if (
        statement.counter
        and before["counted"]
        and after[statement.counter] <= before[statement.counter]
    ):
        raise insufficient_privilege(
            statement, table, f"pg_stat_all_tables.{statement.counter} did not move"
        )
    log.info("%s %s took %.0f ms", statement.action, table.name, duration_ms)
    report = job_pb2.TableReport(
        table=table.name,
        action=statement.action,
        size_bytes_before=before["size_bytes"],
        size_bytes_after=after["size_bytes"],
        duration_ms=duration_ms,
        notices=notices,
    )
    if statement.reports_dead_rows:
        report.dead_rows_before = before["dead_rows"]
        report.dead_rows_after = after["dead_rows"]
    return report


async def _invalid_indexes(conn: Connection, table: Table) -> list[asyncpg.Record]:
    return list(await conn.fetch(_INVALID_INDEXES_SQL, table.qualified))


async def drop_new_invalid_indexes(conn: Connection, table: Table, before: set[int]) -> None:
    """Drops the invalid `_ccnew`/`_ccold` indexes an interrupted REINDEX CONCURRENTLY left.

    PostgreSQL keeps maintaining such an index on every write until it is dropped.
    Only indexes that were not invalid before this job are touched; names come
    from the catalog and are quoted. Never raises: a failure is logged. (A TOAST
    table's leftover needs a superuser: other roles may not name the pg_toast
    schema. A later reindex then reports it in its notices.)
    """
    try:
        for row in await _invalid_indexes(conn, table):
            if row["oid"] in before:
                continue
            name = f"{quote_ident(row['schema'])}.{quote_ident(row['name'])}"
            try:
                await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            except asyncpg.PostgresError as exc:  # this one stays; the others still go
                log.warning("could not drop index %s left invalid by a reindex: %s", name, exc)
                continue
            log.warning("dropped index %s left invalid by an interrupted reindex", name)
    except (Exception, asyncio.CancelledError) as exc:
        log.warning(
            "could not drop invalid indexes of %s after an interrupted reindex: %s",
            table.name,
            exc or type(exc).__name__,
        )


class Operations:
    """Runs vacuum, analyze, reindex and retention-cleanup job specs with the owner pool."""

    def __init__(self, settings: Settings, database: Database, catalog: CatalogCache) -> None:
        self._settings = settings
        self._database = database
        self._catalog = catalog
        # Constructed during start-up: a bad rule stops the server here (SystemExit).
        self.retention_rules = retention.parse_retention_rules(settings.retention_rules)
        for rule in self.retention_rules:
            problem = retention.rule_problem(rule, catalog.current.tables.get(rule.table))
            if problem:
                # Not fatal: the table may be created later; jobs refuse the rule until then.
                log.warning("%s (jobs refuse this rule until it matches)", problem)

    # -- check ------------------------------------------------------------------

    async def check(self, spec: job_pb2.JobSpec) -> None:
        """Raises ServiceError (INVALID_ARGUMENT) if the spec names tables it cannot run on.

        Retention: FAILED_PRECONDITION (reason NO_RETENTION_RULES) on a server
        without rules, INVALID_ARGUMENT for a named table without a rule, and
        FAILED_PRECONDITION (reason RETENTION_RULE_INVALID) for a rule whose table
        or column is not (or no longer) in the catalog.
        """
        kind = spec.WhichOneof("kind")
        if kind == "vacuum":
            await self._tables(spec.vacuum.tables, "spec.vacuum.tables")
        elif kind == "analyze":
            await self._tables(spec.analyze.tables, "spec.analyze.tables")
        elif kind == "reindex":
            await self._tables(spec.reindex.tables, "spec.reindex.tables")
        elif kind == "retention_cleanup":
            for rule in self._rules(spec.retention_cleanup.tables):
                await retention.resolve(self._catalog, rule)
        else:
            raise invalid_argument("spec", f"not a maintenance operation: {kind}")

    async def _tables(self, names: Sequence[str], field_path: str) -> list[Table]:
        """The named exposed tables (all, by name, when none are named); all errors at once."""
        if not names:
            return [
                self._catalog.current.tables[name] for name in sorted(self._catalog.current.tables)
            ]
        errors: list[ServiceError] = []
        tables = await self._catalog.tables(names, field_path, errors)
        error = combine(errors)
        if error is not None:
            raise error
        return tables

    def _rules(self, names: Sequence[str]) -> tuple[retention.RetentionRule, ...]:
        if not self.retention_rules:
            raise ServiceError(
                Code.FAILED_PRECONDITION,
                "NO_RETENTION_RULES",
                "this server has no retention rules (RAPTORFLOW_RETENTION_RULES)",
            )
        configured = {rule.table for rule in self.retention_rules}
        errors: list[ServiceError] = []
        seen: set[str] = set()
        for index, name in enumerate(names):
            path = f"spec.retention_cleanup.tables[{index}]"
            if name in seen:
                errors.append(named_twice(path, name))
            elif name not in configured:
                errors.append(
                    invalid_argument(
                        path,
                        f"no retention rule is configured for table {name!r}",
                        reason="NO_RETENTION_RULE",
                        metadata={"table": name[:200]},
                    )
                )
            seen.add(name)
        error = combine(errors)
        if error is not None:
            raise error
        return retention.select_rules(self.retention_rules, names)

    # -- run --------------------------------------------------------------------

    async def run(self, spec: job_pb2.JobSpec, progress: Progress) -> job_pb2.JobResult:
        """Runs a vacuum, analyze, reindex or retention_cleanup spec and reports per table.

        Raises ServiceError on failure and CancelledError when the job is
        cancelled; work on earlier tables (and earlier retention batches) stays done.
        """
        kind = spec.WhichOneof("kind")
        if kind == "retention_cleanup":
            return await self._retention(spec.retention_cleanup.tables, progress)
        if kind == "vacuum":
            statement = VACUUM_ANALYZE if spec.vacuum.analyze else VACUUM
            names: Sequence[str] = spec.vacuum.tables
        elif kind == "analyze":
            statement, names = ANALYZE, spec.analyze.tables
        elif kind == "reindex":
            statement, names = REINDEX, spec.reindex.tables
        else:
            raise invalid_argument("spec", f"not a maintenance operation: {kind}")
        tables = await self._tables_at_run(names, f"spec.{kind}.tables")
        result = job_pb2.JobResult()
        for done, table in enumerate(tables):
            await progress.report(
                f"{statement.verb} {table.schema}.{table.name}",
                done=done,
                total=len(tables),
                unit=job_pb2.PROGRESS_UNIT_TABLES,
            )
            result.tables.append(await self._maintain(statement, table))
        await progress.report(
            statement.verb, done=len(tables), total=len(tables), unit=job_pb2.PROGRESS_UNIT_TABLES
        )
        return result

    async def _tables_at_run(self, names: Sequence[str], field_path: str) -> list[Table]:
        if not names:
            # "Every exposed table" means those of now, not of the last timed reload.
            await self._catalog.reload()
        try:
            return await self._tables(names, field_path)
        except ServiceError as exc:
            # The spec passed its check when the job started; a table gone since is not
            # the caller's mistake.
            raise ServiceError(
                Code.FAILED_PRECONDITION, "TABLE_CHANGED", exc.message, exc.violations
            ) from None

    async def _maintain(self, statement: Statement, table: Table) -> job_pb2.TableReport:
        # No acquire timeout: a maintenance job may wait its turn for an owner connection.
        async with self._database.owner_pool.acquire() as conn:
            return await maintain_table(conn, statement, table)

    async def _retention(self, names: Sequence[str], progress: Progress) -> job_pb2.JobResult:
        result = job_pb2.JobResult()
        for rule in self._rules(names):
            table, column = await retention.resolve(self._catalog, rule)
            try:
                report = await retention.delete_expired(
                    self._database.owner_pool, table, column, rule, progress
                )
            except asyncpg.InsufficientPrivilegeError as exc:
                raise ServiceError(
                    Code.FAILED_PRECONDITION,
                    INSUFFICIENT_PRIVILEGE,
                    f"retention cleanup of table {table.name!r} did not run: {exc.args[0]}",
                    metadata={"table": table.name[:200]},
                ) from None
            result.tables.append(report)
        return result
