"""VACUUM, ANALYZE and REINDEX CONCURRENTLY jobs, run directly and through MaintenanceService.

Direct runs construct `Operations` from the module server's parts with a recording
progress; the RPC tests start jobs over the channel and watch them end. A role
that does not own the tables runs the same code through an owner pool of its own
and must fail with INSUFFICIENT_PRIVILEGE, never succeed on PostgreSQL's mere warning.
Autovacuum is off for the test tables so only the jobs change their statistics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from asyncpg.transaction import Transaction
from conftest import start_server
from job_helpers import RecordingProgress
from pg_activity import wait_for_statement_lock_wait
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.connections import Database
from raptorflow.data.server.errors import Code, ServiceError
from raptorflow.data.server.maintenance.operations import Operations
from raptorflow.data.v1 import job_pb2, maintenance_service_pb2, maintenance_service_pb2_grpc
from statuses import rpc_error

pb = maintenance_service_pb2

VACUUMED = "ops_vacuumed"
ANALYZED = "ops_analyzed"
REINDEXED = "ops_reindexed"
EXPIRING = "ops_expiring"
TABLES = (VACUUMED, ANALYZED, REINDEXED, EXPIRING)
RULES = [{"table": EXPIRING, "column": "created_at", "max_age_seconds": 3600, "batch_size": 100}]
ROWS = 2000
# A long transaction of another database on this cluster (parallel test sessions) holds
# back the xmin of any snapshot taken here meanwhile, and VACUUM may then not remove dead
# rows yet: that run reports dead_rows_after == dead_rows_before, truthfully. Tests that
# need the rows removed run the vacuum again until PostgreSQL lets them go.
REMOVAL_WITHIN = 20.0

CLEAR_SNAPSHOT = "SELECT pg_stat_clear_snapshot()"
STATS = """
SELECT n_dead_tup, last_vacuum, last_analyze, vacuum_count, analyze_count
FROM pg_stat_user_tables WHERE relname = $1
"""
INDEXES = """
SELECT c.relname AS name, i.indexrelid AS oid, i.indisvalid AS valid
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE i.indrelid = $1::regclass ORDER BY c.relname
"""


@pytest.fixture(scope="module")
async def tables(database_url: str) -> AsyncIterator[None]:
    """The module's exposed tables, created before its server starts and dropped after."""
    conn = await asyncpg.connect(database_url)
    try:
        for name in TABLES:
            await conn.execute(
                f"""CREATE TABLE {name} (
                    id bigserial PRIMARY KEY,
                    workspace_id uuid NOT NULL,
                    n integer NOT NULL,
                    note text,
                    created_at timestamptz NOT NULL DEFAULT now()
                ) WITH (autovacuum_enabled = false)"""
            )
            await conn.execute(f"CREATE INDEX ON {name} (workspace_id, n)")
        yield
    finally:
        for name in TABLES:
            await conn.execute(f"DROP TABLE IF EXISTS {name}")
        await conn.close()


@pytest.fixture(scope="module")
async def server(settings: Settings, tables: None) -> AsyncIterator[RunningServer]:
    """This module's server: the conftest one with a retention rule (for the privilege test)."""
    running = await start_server(settings, retention_rules=json.dumps(RULES))
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


@pytest.fixture
def operations(server: RunningServer) -> Operations:
    return Operations(server.settings, server.database, server.catalog)


async def fill(database_url: str, table: str, rows: int = ROWS) -> None:
    """Fresh rows on a connection of its own, closed at the end so its statistics are flushed."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"TRUNCATE {table}")
        await conn.execute(
            f"INSERT INTO {table} (workspace_id, n, note) "
            "SELECT $1, g, 'row ' || g FROM generate_series(1, $2) g",
            uuid.uuid4(),
            rows,
        )
    finally:
        await conn.close()


async def make_dead_rows(database_url: str, table: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"UPDATE {table} SET n = n + 1")
        await conn.execute(f"DELETE FROM {table} WHERE n % 2 = 0")
    finally:
        await conn.close()


async def stats(db: asyncpg.Connection, table: str) -> asyncpg.Record:
    await db.execute(CLEAR_SNAPSHOT)
    row = await db.fetchrow(STATS, table)
    assert row is not None
    return row


async def wait_for_dead_rows(db: asyncpg.Connection, table: str, at_least: int) -> int:
    """n_dead_tup once the writers' statistics arrived (flushed when their backends exit)."""
    started = time.monotonic()
    while True:
        dead = int((await stats(db, table))["n_dead_tup"])
        if dead >= at_least:
            return dead
        assert time.monotonic() - started < 10, f"n_dead_tup of {table} stayed at {dead}"
        await asyncio.sleep(0.05)


def spec_of(kind: str, names: list[str]) -> job_pb2.JobSpec:
    if kind == "vacuum":
        return job_pb2.JobSpec(vacuum=job_pb2.VacuumJob(tables=names, analyze=True))
    if kind == "analyze":
        return job_pb2.JobSpec(analyze=job_pb2.AnalyzeJob(tables=names))
    if kind == "reindex":
        return job_pb2.JobSpec(reindex=job_pb2.ReindexJob(tables=names))
    return job_pb2.JobSpec(retention_cleanup=job_pb2.RetentionCleanupJob(tables=names))


# -- direct runs --------------------------------------------------------------------


async def test_vacuum_removes_dead_rows_and_reports_them(
    operations: Operations, db: asyncpg.Connection, database_url: str
) -> None:
    await fill(database_url, VACUUMED)
    await make_dead_rows(database_url, VACUUMED)
    dead = await wait_for_dead_rows(db, VACUUMED, ROWS)
    progress = RecordingProgress()

    result = await operations.run(spec_of("vacuum", [VACUUMED]), progress)

    (report,) = result.tables
    assert report.table == VACUUMED
    assert report.action == "VACUUM (ANALYZE)"
    assert report.dead_rows_before >= dead
    assert report.size_bytes_before > 0
    assert report.size_bytes_after > 0
    assert report.duration_ms > 0
    assert report.rows == 0
    tables_unit = job_pb2.PROGRESS_UNIT_TABLES
    assert progress.reports == [
        (f"vacuum public.{VACUUMED}", 0, 1, tables_unit),
        ("vacuum", 1, 1, tables_unit),
    ]
    started = time.monotonic()
    while report.dead_rows_after >= report.dead_rows_before:
        assert time.monotonic() - started < REMOVAL_WITHIN, "VACUUM never removed dead rows"
        await asyncio.sleep(0.2)
        (report,) = (await operations.run(spec_of("vacuum", [VACUUMED]), progress)).tables
    after = await stats(db, VACUUMED)
    assert after["last_vacuum"] is not None
    assert after["last_analyze"] is not None
    assert after["n_dead_tup"] == report.dead_rows_after


async def test_plain_vacuum_of_several_tables_in_order(
    operations: Operations, db: asyncpg.Connection, database_url: str
) -> None:
    await fill(database_url, VACUUMED, 100)
    await fill(database_url, ANALYZED, 100)
    progress = RecordingProgress()
    spec = job_pb2.JobSpec(vacuum=job_pb2.VacuumJob(tables=[ANALYZED, VACUUMED]))

    result = await operations.run(spec, progress)

    assert [(r.table, r.action) for r in result.tables] == [
        (ANALYZED, "VACUUM"),
        (VACUUMED, "VACUUM"),
    ]
    assert [(phase, done, total) for phase, done, total, _ in progress.reports] == [
        (f"vacuum public.{ANALYZED}", 0, 2),
        (f"vacuum public.{VACUUMED}", 1, 2),
        ("vacuum", 2, 2),
    ]


async def test_vacuum_of_every_exposed_table(operations: Operations, server: RunningServer) -> None:
    result = await operations.run(spec_of("vacuum", []), RecordingProgress())
    assert [r.table for r in result.tables] == sorted(server.catalog.current.tables)


async def test_analyze_updates_statistics(
    operations: Operations, db: asyncpg.Connection, database_url: str
) -> None:
    await fill(database_url, ANALYZED)
    before = await stats(db, ANALYZED)
    progress = RecordingProgress()

    result = await operations.run(spec_of("analyze", [ANALYZED]), progress)

    (report,) = result.tables
    assert report.table == ANALYZED
    assert report.action == "ANALYZE"
    assert report.size_bytes_before > 0
    after = await stats(db, ANALYZED)
    assert after["analyze_count"] == before["analyze_count"] + 1
    assert after["last_analyze"] is not None
    assert after["last_analyze"] != before["last_analyze"]
    # The planner now knows the row count.
    assert await db.fetchval("SELECT reltuples FROM pg_class WHERE relname = $1", ANALYZED) == ROWS
    assert progress.reports[0] == (f"analyze public.{ANALYZED}", 0, 1, job_pb2.PROGRESS_UNIT_TABLES)


async def test_reindex_rebuilds_every_index_and_reports_sizes(
    operations: Operations, db: asyncpg.Connection, database_url: str
) -> None:
    await fill(database_url, REINDEXED)
    await make_dead_rows(database_url, REINDEXED)  # bloats the indexes
    before = await db.fetch(INDEXES, REINDEXED)

    result = await operations.run(spec_of("reindex", [REINDEXED]), RecordingProgress())

    (report,) = result.tables
    assert report.action == "REINDEX TABLE CONCURRENTLY"
    assert report.size_bytes_before > 0
    assert report.size_bytes_after > 0
    # The rebuilt indexes are smaller than the bloated ones.
    assert report.size_bytes_after < report.size_bytes_before
    after = await db.fetch(INDEXES, REINDEXED)
    assert [r["name"] for r in after] == [r["name"] for r in before]
    assert all(r["valid"] for r in after)
    assert {r["oid"] for r in after}.isdisjoint({r["oid"] for r in before})


@contextlib.asynccontextmanager
async def reindex_behind_a_writer(
    operations: Operations, db: asyncpg.Connection, database_url: str
) -> AsyncIterator[tuple[asyncpg.Connection, Transaction, asyncio.Task[job_pb2.JobResult]]]:
    """A writer whose open transaction has inserted into REINDEXED, and a REINDEX job started
    after it, now waiting for that transaction: yields the writer, its transaction and the job.
    The writer closes at the end."""
    writer = await asyncpg.connect(database_url)
    try:
        transaction = writer.transaction()
        await transaction.start()
        await writer.execute(
            f"INSERT INTO {REINDEXED} (workspace_id, n) VALUES ($1, 1)", uuid.uuid4()
        )
        job = asyncio.create_task(
            operations.run(spec_of("reindex", [REINDEXED]), RecordingProgress())
        )
        await wait_for_statement_lock_wait(db, "REINDEX TABLE CONCURRENTLY")
        yield writer, transaction, job
    finally:
        await writer.close()


async def test_reindex_runs_concurrently_with_writes(
    operations: Operations, db: asyncpg.Connection, database_url: str
) -> None:
    """While REINDEX waits for an open writing transaction, that transaction keeps writing;
    a plain REINDEX would have locked the writes out."""
    await fill(database_url, REINDEXED, 200)
    async with reindex_behind_a_writer(operations, db, database_url) as (writer, transaction, job):
        async with asyncio.timeout(5):
            await writer.execute(
                f"INSERT INTO {REINDEXED} (workspace_id, n) VALUES ($1, 2)", uuid.uuid4()
            )
        assert not job.done()
        await transaction.commit()
        result = await asyncio.wait_for(job, 20)
    assert result.tables[0].action == "REINDEX TABLE CONCURRENTLY"
    assert all(r["valid"] for r in await db.fetch(INDEXES, REINDEXED))
    assert await db.fetchval(f"SELECT count(*) FROM {REINDEXED}") == 202


async def test_cancelled_reindex_leaves_no_invalid_index(
    operations: Operations, db: asyncpg.Connection, database_url: str, server: RunningServer
) -> None:
    await fill(database_url, REINDEXED, 200)
    before = await db.fetch(INDEXES, REINDEXED)
    async with reindex_behind_a_writer(operations, db, database_url) as (_, transaction, job):
        # The half-built copies exist now (invalid, named *_ccnew).
        assert len(await db.fetch(INDEXES, REINDEXED)) > len(before)
        job.cancel()
        await asyncio.sleep(0.2)
        # The clean-up's DROP INDEX CONCURRENTLY waits for this transaction too.
        await transaction.rollback()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(job, 20)
    after = await db.fetch(INDEXES, REINDEXED)
    assert [(r["name"], r["oid"]) for r in after] == [(r["name"], r["oid"]) for r in before]
    assert all(r["valid"] for r in after)
    # Nor on its TOAST table, whose index REINDEX TABLE rebuilds too (the owner here is a
    # superuser, who may name pg_toast's indexes).
    toast = await db.fetchval(
        "SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = $1::regclass", REINDEXED
    )
    assert all(r["valid"] for r in await db.fetch(INDEXES, toast))
    # The owner connection went back to the pool with its statement timeout.
    async with server.database.owner_pool.acquire() as conn:
        assert await conn.fetchval("SHOW statement_timeout") == "10s"


async def test_owner_connections_keep_their_statement_timeout(
    operations: Operations, server: RunningServer
) -> None:
    await operations.run(spec_of("analyze", [ANALYZED]), RecordingProgress())
    pool = server.database.owner_pool
    connections = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        for conn in connections:
            assert await conn.fetchval("SHOW statement_timeout") == "10s"
    finally:
        for conn in connections:
            await pool.release(conn)


EXCLUDING = "ops_excluding"
LEFTOVER = "ops_leftover"


@pytest.fixture
async def partly_reindexable(db: asyncpg.Connection, server: RunningServer) -> AsyncIterator[None]:
    """Two exposed tables with an index REINDEX CONCURRENTLY must skip: an exclusion
    constraint's, and one left invalid by a failed CREATE UNIQUE INDEX CONCURRENTLY."""
    await db.execute(
        f"""CREATE TABLE {EXCLUDING} (id bigint PRIMARY KEY, workspace_id uuid NOT NULL,
                room int NOT NULL, EXCLUDE USING btree (room WITH =));
            CREATE TABLE {LEFTOVER} (id bigint PRIMARY KEY, workspace_id uuid NOT NULL, v int);
            INSERT INTO {EXCLUDING} SELECT g, gen_random_uuid(), g FROM generate_series(1, 50) g;
            INSERT INTO {LEFTOVER} SELECT g, gen_random_uuid(), 1 FROM generate_series(1, 50) g;"""
    )
    with contextlib.suppress(asyncpg.UniqueViolationError):
        await db.execute(f"CREATE UNIQUE INDEX CONCURRENTLY {LEFTOVER}_v ON {LEFTOVER} (v)")
    await server.catalog.reload()
    try:
        yield
    finally:
        await db.execute(f"DROP TABLE {EXCLUDING}, {LEFTOVER}")
        await server.catalog.reload()


async def test_reindex_reports_indexes_it_cannot_rebuild_concurrently_and_goes_on(
    operations: Operations,
    db: asyncpg.Connection,
    database_url: str,
    partly_reindexable: None,
) -> None:
    """PostgreSQL rebuilds a table's other indexes and only warns about those it cannot
    rebuild concurrently: the job used to fail there ("did not run") and leave every
    later table alone."""
    await fill(database_url, REINDEXED, 100)
    tables = [EXCLUDING, LEFTOVER, REINDEXED]
    before = {table: {r["name"]: r for r in await db.fetch(INDEXES, table)} for table in tables}
    assert not before[LEFTOVER][f"{LEFTOVER}_v"]["valid"]

    result = await operations.run(spec_of("reindex", tables), RecordingProgress())

    assert [(r.table, r.action) for r in result.tables] == [
        (table, "REINDEX TABLE CONCURRENTLY") for table in tables
    ]
    excluding, leftover, reindexed = result.tables
    assert [n for n in excluding.notices if "skipping" in n] == [
        f'cannot reindex exclusion constraint index "public.{EXCLUDING}_room_excl" '
        "concurrently, skipping"
    ]
    assert [n for n in leftover.notices if "skipping" in n] == [
        f'cannot reindex invalid index "public.{LEFTOVER}_v" concurrently, skipping'
    ]
    assert list(reindexed.notices) == []
    after = {table: {r["name"]: r for r in await db.fetch(INDEXES, table)} for table in tables}
    skipped = {f"{EXCLUDING}_room_excl", f"{LEFTOVER}_v"}
    for table in tables:
        # The same indexes (the skipped ones as they were, the invalid one still invalid
        # and still there: not the job's to drop), every other one rebuilt.
        assert after[table].keys() == before[table].keys()
        for name, index in after[table].items():
            assert (index["oid"] == before[table][name]["oid"]) == (name in skipped), name
            assert index["valid"] == (name != f"{LEFTOVER}_v"), name


# -- checks -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vacuum", "analyze", "reindex"])
async def test_check_refuses_unknown_and_repeated_tables(operations: Operations, kind: str) -> None:
    await operations.check(spec_of(kind, [VACUUMED, ANALYZED]))
    with pytest.raises(ServiceError) as caught:
        await operations.check(spec_of(kind, [VACUUMED, "internal_secrets", VACUUMED, "nope"]))
    error = caught.value
    assert error.code is Code.INVALID_ARGUMENT
    assert [v.field for v in error.violations] == [
        f"spec.{kind}.tables[1]",
        f"spec.{kind}.tables[2]",
        f"spec.{kind}.tables[3]",
    ]


async def test_run_refuses_a_table_dropped_since_the_check(
    operations: Operations, db: asyncpg.Connection, server: RunningServer
) -> None:
    await db.execute("CREATE TABLE ops_dropped (id int PRIMARY KEY, workspace_id uuid)")
    try:
        await server.catalog.reload()
        spec = spec_of("vacuum", ["ops_dropped"])
        await operations.check(spec)
    finally:
        await db.execute("DROP TABLE ops_dropped")
    await server.catalog.reload()
    with pytest.raises(ServiceError) as caught:
        await operations.run(spec, RecordingProgress())
    assert caught.value.code is Code.FAILED_PRECONDITION
    assert caught.value.reason == "TABLE_CHANGED"


# -- a role that does not own the tables --------------------------------------------


@contextlib.asynccontextmanager
async def non_owner(
    settings: Settings, db: asyncpg.Connection, *role_settings: str
) -> AsyncIterator[Database]:
    """A Database whose owner pool logs in as a fresh role that owns nothing here."""
    role = f"rf_ops_{uuid.uuid4().hex[:10]}"
    await db.execute(f"CREATE ROLE {role} LOGIN")
    for setting in role_settings:
        await db.execute(f"ALTER ROLE {role} SET {setting}")
    parts = urllib.parse.urlsplit(settings.database_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    url = urllib.parse.urlunsplit(parts._replace(netloc=f"{role}@{host}"))
    database = Database(dataclasses.replace(settings, database_url=url, owner_database_url=url))
    try:
        await database.open_owner()
        async with database.owner_pool.acquire() as conn:
            assert await conn.fetchval("SELECT current_user") == role
        yield database
    finally:
        await database.close()
        await db.execute(f"DROP OWNED BY {role}")
        await db.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize("kind", ["vacuum", "analyze", "reindex", "retention_cleanup"])
async def test_a_non_owner_run_fails_instead_of_skipping(
    server: RunningServer, db: asyncpg.Connection, database_url: str, kind: str
) -> None:
    table = EXPIRING if kind == "retention_cleanup" else VACUUMED
    await fill(database_url, table, 100)
    before = await stats(db, table)
    async with non_owner(server.settings, db) as database:
        operations = Operations(server.settings, database, server.catalog)
        await operations.check(spec_of(kind, [table]))
        with pytest.raises(ServiceError) as caught:
            await operations.run(spec_of(kind, [table]), RecordingProgress())
    assert caught.value.code is Code.FAILED_PRECONDITION
    assert caught.value.reason == "INSUFFICIENT_PRIVILEGE"
    assert table in caught.value.message
    after = await stats(db, table)
    assert after["vacuum_count"] == before["vacuum_count"]
    assert after["analyze_count"] == before["analyze_count"]
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 100


async def test_a_non_owner_run_fails_even_when_warnings_are_not_sent(
    server: RunningServer, db: asyncpg.Connection, database_url: str
) -> None:
    """With client_min_messages above WARNING the skip is silent; the statistics counter
    that did not move still fails the job."""
    await fill(database_url, VACUUMED, 100)
    async with non_owner(server.settings, db, "client_min_messages = error") as database:
        operations = Operations(server.settings, database, server.catalog)
        with pytest.raises(ServiceError) as caught:
            await operations.run(spec_of("vacuum", [VACUUMED]), RecordingProgress())
    assert caught.value.reason == "INSUFFICIENT_PRIVILEGE"
    assert "did not move" in caught.value.message


# -- through MaintenanceService -----------------------------------------------------


async def finished(
    maintenance: maintenance_service_pb2_grpc.MaintenanceServiceStub, job_id: str
) -> list[job_pb2.Job]:
    """Every state WatchJob streams until the job ends."""
    seen = []
    async with asyncio.timeout(30):
        async for response in maintenance.WatchJob(pb.WatchJobRequest(job_id=job_id)):
            seen.append(response.job)
    assert seen[-1].state in (
        job_pb2.JOB_STATE_SUCCEEDED,
        job_pb2.JOB_STATE_FAILED,
        job_pb2.JOB_STATE_CANCELLED,
    )
    return seen


async def test_vacuum_job_over_rpc(
    maintenance: maintenance_service_pb2_grpc.MaintenanceServiceStub,
    db: asyncpg.Connection,
    database_url: str,
) -> None:
    await fill(database_url, VACUUMED)
    await make_dead_rows(database_url, VACUUMED)
    await wait_for_dead_rows(db, VACUUMED, ROWS)
    started = time.monotonic()
    while True:
        response = await maintenance.StartJob(
            pb.StartJobRequest(spec=spec_of("vacuum", [VACUUMED]))
        )
        assert response.job.job_id
        job = (await finished(maintenance, response.job.job_id))[-1]
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error
        (report,) = job.result.tables
        assert report.action == "VACUUM (ANALYZE)"
        if report.dead_rows_after < report.dead_rows_before:
            break
        assert time.monotonic() - started < REMOVAL_WITHIN, "VACUUM never removed dead rows"
        await asyncio.sleep(0.2)
    assert report.dead_rows_before >= ROWS
    assert job.progress.unit == job_pb2.PROGRESS_UNIT_TABLES
    assert job.progress.done == job.progress.total == 1
    fetched = await maintenance.GetJob(pb.GetJobRequest(job_id=job.job_id))
    assert fetched.job.result == job.result


async def test_analyze_and_reindex_jobs_over_rpc(
    maintenance: maintenance_service_pb2_grpc.MaintenanceServiceStub, database_url: str
) -> None:
    await fill(database_url, ANALYZED, 100)
    for kind, action in (("analyze", "ANALYZE"), ("reindex", "REINDEX TABLE CONCURRENTLY")):
        started = await maintenance.StartJob(pb.StartJobRequest(spec=spec_of(kind, [ANALYZED])))
        job = (await finished(maintenance, started.job.job_id))[-1]
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error
        assert [(r.table, r.action) for r in job.result.tables] == [(ANALYZED, action)]


async def test_a_reindex_job_that_skips_an_index_succeeds_and_says_so(
    maintenance: maintenance_service_pb2_grpc.MaintenanceServiceStub,
    database_url: str,
    partly_reindexable: None,
) -> None:
    await fill(database_url, ANALYZED, 100)
    started = await maintenance.StartJob(
        pb.StartJobRequest(spec=spec_of("reindex", [EXCLUDING, ANALYZED]))
    )
    job = (await finished(maintenance, started.job.job_id))[-1]
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error
    assert [r.table for r in job.result.tables] == [EXCLUDING, ANALYZED]
    assert any(f"{EXCLUDING}_room_excl" in n for n in job.result.tables[0].notices)
    fetched = await maintenance.GetJob(pb.GetJobRequest(job_id=job.job_id))
    assert fetched.job.result == job.result


async def test_start_job_refuses_unknown_tables(
    maintenance: maintenance_service_pb2_grpc.MaintenanceServiceStub,
) -> None:
    failure = await rpc_error(
        maintenance.StartJob(pb.StartJobRequest(spec=spec_of("reindex", [VACUUMED, "nope"]))),
        echoed="nope",
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "UNKNOWN_TABLE"
    assert failure.fields == ["spec.reindex.tables[1]"]
