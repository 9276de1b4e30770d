"""Retention cleanup: rules from configuration, checked against the catalog, deleting in batches.

The rules' shape is refused at start-up; a rule whose table or column does not
fit the catalog is refused when a job checks it. A run deletes exactly the rows
older than the cutoff taken at its start, in batches of their own transactions,
and a cancelled run keeps its finished batches and rolls back the one in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from conftest import start_server
from job_helpers import RecordingProgress
from pg_activity import wait_for_lock_waits, wait_for_statement_lock_wait
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.server.errors import Code, ServiceError
from raptorflow.data.server.maintenance.operations import Operations
from raptorflow.data.server.maintenance.retention import RetentionRule, parse_retention_rules
from raptorflow.data.v1 import job_pb2, maintenance_service_pb2, maintenance_service_pb2_grpc
from statuses import rpc_error
from tokens import authorized_channel

pb = maintenance_service_pb2
ROWS = job_pb2.PROGRESS_UNIT_ROWS

EVENTS = "ret_events"
DAYS = "ret_days"
LOCAL = "ret_local"
BLOCKED = "ret_blocked"
OTHER = "ret_other"
TEXTUAL = "ret_textual"
PARTED = "ret_parted"
LATE = "ret_late"
DAY = 86400

GOOD_RULES: list[dict[str, Any]] = [
    {"table": EVENTS, "column": "created_at", "max_age_seconds": DAY, "batch_size": 1000},
    {"table": DAYS, "column": "born_on", "max_age_seconds": 2 * DAY},
    {"table": LOCAL, "column": "happened_at", "max_age_seconds": DAY, "batch_size": 7},
    {"table": BLOCKED, "column": "created_at", "max_age_seconds": DAY, "batch_size": 1000},
    {"table": PARTED, "column": "created_at", "max_age_seconds": DAY, "batch_size": 50},
]
BAD_RULES: list[dict[str, Any]] = [
    {"table": TEXTUAL, "column": "note", "max_age_seconds": DAY},
    {"table": LATE, "column": "created_at", "max_age_seconds": DAY},
]

SCHEMA = f"""
CREATE TABLE {EVENTS} (id bigserial PRIMARY KEY, workspace_id uuid NOT NULL,
                       created_at timestamptz NOT NULL, n integer);
CREATE INDEX ON {EVENTS} (created_at);
CREATE TABLE {DAYS} (id bigserial PRIMARY KEY, workspace_id uuid NOT NULL, born_on date);
CREATE TABLE {LOCAL} (workspace_id uuid NOT NULL, happened_at timestamp NOT NULL);
CREATE TABLE {BLOCKED} (id bigserial PRIMARY KEY, workspace_id uuid NOT NULL,
                        created_at timestamptz NOT NULL);
CREATE TABLE {OTHER} (id bigserial PRIMARY KEY, workspace_id uuid NOT NULL,
                      created_at timestamptz NOT NULL);
CREATE TABLE {TEXTUAL} (id bigserial PRIMARY KEY, workspace_id uuid NOT NULL, note text);
CREATE TABLE {PARTED} (workspace_id uuid NOT NULL, kind text NOT NULL,
                       created_at timestamptz NOT NULL) PARTITION BY LIST (kind);
CREATE TABLE {PARTED}_a PARTITION OF {PARTED} FOR VALUES IN ('a');
CREATE TABLE {PARTED}_b PARTITION OF {PARTED} FOR VALUES IN ('b');
"""


@pytest.fixture(scope="module")
async def tables(database_url: str) -> AsyncIterator[None]:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(SCHEMA)
        yield
    finally:
        for name in (EVENTS, DAYS, LOCAL, BLOCKED, OTHER, TEXTUAL, LATE, PARTED):
            await conn.execute(f"DROP TABLE IF EXISTS {name}")
        await conn.close()


@pytest.fixture(scope="module")
async def server(settings: Settings, tables: None) -> AsyncIterator[RunningServer]:
    """A server configured with every rule of this module, good and bad."""
    running = await start_server(settings, retention_rules=json.dumps(GOOD_RULES + BAD_RULES))
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


def operations_with(server: RunningServer, rules: list[dict[str, Any]]) -> Operations:
    settings = dataclasses.replace(server.settings, retention_rules=json.dumps(rules))
    return Operations(settings, server.database, server.catalog)


@pytest.fixture
def operations(server: RunningServer) -> Operations:
    """Operations with the good rules only, so 'every rule' can run."""
    return operations_with(server, GOOD_RULES)


def cleanup(*names: str) -> job_pb2.JobSpec:
    return job_pb2.JobSpec(retention_cleanup=job_pb2.RetentionCleanupJob(tables=names))


async def fill_events(db: asyncpg.Connection, table: str, old: int, new: int) -> None:
    """`old` rows two days old and older (ageing with their id), then `new` rows an hour old."""
    await db.execute(f"TRUNCATE {table}")
    workspace = uuid.uuid4()
    await db.execute(
        f"INSERT INTO {table} (workspace_id, created_at) "
        "SELECT $1, now() - interval '2 days' - g * interval '1 second' "
        "FROM generate_series(1, $2) g",
        workspace,
        old,
    )
    await db.execute(
        f"INSERT INTO {table} (workspace_id, created_at) "
        "SELECT $1, now() - interval '1 hour' FROM generate_series(1, $2)",
        workspace,
        new,
    )


# -- rules from configuration ------------------------------------------------------


def test_rules_parse_with_defaults(tmp_path: Path) -> None:
    text = json.dumps(
        [
            {"table": "a", "column": "at", "max_age_seconds": 60},
            {"table": "b", "column": "on", "max_age_seconds": 0.5, "batch_size": 100_000},
        ]
    )
    expected = (
        RetentionRule("a", "at", 60.0, 1000),
        RetentionRule("b", "on", 0.5, 100_000),
    )
    assert parse_retention_rules(text) == expected
    path = tmp_path / "rules.json"
    path.write_text(text)
    assert parse_retention_rules(f"@{path}") == expected
    assert parse_retention_rules("") == ()
    assert parse_retention_rules("[]") == ()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{", "not valid JSON"),
        ('{"table": "a"}', "JSON array"),
        ('["a"]', "rule [0] must be a JSON object"),
        ('[{"table": "a", "column": "c", "max_age_seconds": 1, "batch": 5}]', "'batch'"),
        ('[{"table": "", "column": "c", "max_age_seconds": 1}]', "'table'"),
        ('[{"table": "a", "column": 3, "max_age_seconds": 1}]', "'column'"),
        ('[{"table": "a", "column": "c"}]', "'max_age_seconds'"),
        ('[{"table": "a", "column": "c", "max_age_seconds": 0}]', "> 0"),
        ('[{"table": "a", "column": "c", "max_age_seconds": -5}]', "> 0"),
        ('[{"table": "a", "column": "c", "max_age_seconds": true}]', "number"),
        ('[{"table": "a", "column": "c", "max_age_seconds": "1d"}]', "number"),
        ('[{"table": "a", "column": "c", "max_age_seconds": Infinity}]', "> 0"),
        ('[{"table": "a", "column": "c", "max_age_seconds": 1e12}]', "at most"),
        ('[{"table": "a", "column": "c", "max_age_seconds": 1, "batch_size": 0}]', "from 1"),
        (
            '[{"table": "a", "column": "c", "max_age_seconds": 1, "batch_size": 100001}]',
            "to 100000",
        ),
        ('[{"table": "a", "column": "c", "max_age_seconds": 1, "batch_size": 2.5}]', "integer"),
        (
            '[{"table": "a", "column": "c", "max_age_seconds": 1},'
            ' {"table": "a", "column": "d", "max_age_seconds": 2}]',
            "rule [1]: table 'a' already has a rule",
        ),
        ("@/nonexistent/rules.json", "cannot read"),
    ],
)
def test_bad_rules_stop_start_up(text: str, says: str) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_retention_rules(text)
    message = str(caught.value)
    assert message.startswith("invalid RAPTORFLOW_RETENTION_RULES: ")
    assert says in message


async def test_operations_refuse_bad_rules_when_constructed(server: RunningServer) -> None:
    with pytest.raises(SystemExit, match="max_age_seconds"):
        operations_with(server, [{"table": EVENTS, "column": "created_at", "max_age_seconds": 0}])


# -- checks ---------------------------------------------------------------------------


async def test_a_server_without_rules_refuses_cleanup(server: RunningServer) -> None:
    operations = operations_with(server, [])
    for spec in (cleanup(), cleanup(EVENTS)):
        with pytest.raises(ServiceError) as caught:
            await operations.check(spec)
        assert caught.value.code is Code.FAILED_PRECONDITION
        assert caught.value.reason == "NO_RETENTION_RULES"


async def test_check_refuses_tables_without_rules_and_repeats(operations: Operations) -> None:
    await operations.check(cleanup())
    await operations.check(cleanup(DAYS, EVENTS))
    with pytest.raises(ServiceError) as caught:
        await operations.check(cleanup(EVENTS, OTHER, EVENTS, "campaigns"))
    error = caught.value
    assert error.code is Code.INVALID_ARGUMENT
    assert error.reason == "NO_RETENTION_RULE"
    assert [v.field for v in error.violations] == [
        "spec.retention_cleanup.tables[1]",
        "spec.retention_cleanup.tables[2]",
        "spec.retention_cleanup.tables[3]",
    ]


async def test_rules_that_do_not_fit_the_catalog_are_refused(server: RunningServer) -> None:
    operations = operations_with(server, GOOD_RULES + BAD_RULES)
    for spec, table in ((cleanup(TEXTUAL), TEXTUAL), (cleanup(LATE), LATE), (cleanup(), TEXTUAL)):
        with pytest.raises(ServiceError) as caught:
            await operations.check(spec)
        assert caught.value.code is Code.FAILED_PRECONDITION
        assert caught.value.reason == "RETENTION_RULE_INVALID"
        assert caught.value.metadata["table"] == table
    with pytest.raises(ServiceError, match="not a timestamp"):
        await operations.check(cleanup(TEXTUAL))
    with pytest.raises(ServiceError) as caught:
        await operations.run(cleanup(LATE), RecordingProgress())
    assert caught.value.reason == "RETENTION_RULE_INVALID"


async def test_a_rule_for_a_table_created_after_start_up_works_once_it_exists(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    operations = operations_with(server, BAD_RULES)
    await db.execute(
        f"CREATE TABLE {LATE} (workspace_id uuid NOT NULL, created_at timestamptz NOT NULL)"
    )
    try:
        await server.catalog.reload()
        await operations.check(cleanup(LATE))
        await db.execute(
            f"INSERT INTO {LATE} VALUES ($1, now() - interval '3 days'), ($1, now())",
            uuid.uuid4(),
        )
        result = await operations.run(cleanup(LATE), RecordingProgress())
        assert result.tables[0].rows == 1
    finally:
        await db.execute(f"DROP TABLE {LATE}")
        await server.catalog.reload()


# -- runs -----------------------------------------------------------------------------


async def test_cleanup_deletes_exactly_the_old_rows_in_batches(
    operations: Operations, db: asyncpg.Connection
) -> None:
    await fill_events(db, EVENTS, old=2500, new=300)
    await fill_events(db, OTHER, old=500, new=0)
    progress = RecordingProgress()

    result = await operations.run(cleanup(EVENTS), progress)

    (report,) = result.tables
    assert report.table == EVENTS
    assert report.action == "DELETE (retention)"
    assert report.rows == 2500
    assert report.size_bytes_before > 0
    assert report.duration_ms > 0
    phase = f"retention public.{EVENTS}"
    assert progress.reports == [
        (phase, 0, 2500, ROWS),
        (phase, 1000, 2500, ROWS),
        (phase, 2000, 2500, ROWS),
        (phase, 2500, 2500, ROWS),
    ]
    remaining = await db.fetchrow(
        f"SELECT count(*) AS rows, min(created_at) > now() - interval '1 day' AS all_new "
        f"FROM {EVENTS}"
    )
    assert remaining is not None
    assert remaining["rows"] == 300
    assert remaining["all_new"]
    # Another table, with old rows but not named, is left alone.
    assert await db.fetchval(f"SELECT count(*) FROM {OTHER}") == 500
    # Nothing left to delete: a second run deletes nothing in one batch.
    again = await operations.run(cleanup(EVENTS), RecordingProgress())
    assert again.tables[0].rows == 0


async def test_every_rule_runs_with_date_and_timestamp_columns(
    operations: Operations, db: asyncpg.Connection
) -> None:
    workspace = uuid.uuid4()
    await fill_events(db, EVENTS, old=5, new=5)
    await fill_events(db, BLOCKED, old=0, new=3)
    await db.execute(f"TRUNCATE {DAYS}, {LOCAL}")
    # Rule: older than two days. Ten days and three days go; yesterday and today stay.
    await db.execute(
        f"INSERT INTO {DAYS} (workspace_id, born_on) SELECT $1, current_date - d "
        "FROM unnest(ARRAY[10, 3, 1, 0]) d",
        workspace,
    )
    # A timestamp without time zone compares in the session's time zone.
    await db.execute(
        f"INSERT INTO {LOCAL} SELECT $1, localtimestamp - g * interval '1 hour' "
        "FROM generate_series(1, 20) g",
        workspace,
    )
    await db.execute(
        f"INSERT INTO {LOCAL} SELECT $1, localtimestamp - interval '2 days' "
        "FROM generate_series(1, 20)",
        workspace,
    )
    progress = RecordingProgress()

    result = await operations.run(cleanup(), progress)

    assert [(r.table, r.rows) for r in result.tables] == [
        (EVENTS, 5),
        (DAYS, 2),
        (LOCAL, 20),
        (BLOCKED, 0),
        (PARTED, 0),
    ]
    assert await db.fetchval(f"SELECT count(*) FROM {DAYS}") == 2
    assert await db.fetchval(f"SELECT count(*) FROM {LOCAL}") == 20
    # Batches of 7: the 20 expired rows go in three batches (7, 7, 6), each reported.
    local = [done for phase, done, _, _ in progress.reports if phase.endswith(LOCAL)]
    assert local == [0, 7, 14, 20]


async def test_partitioned_tables_lose_only_their_expired_rows(
    operations: Operations, db: asyncpg.Connection
) -> None:
    """Rows of two partitions share ctids; only the expired partition's rows go."""
    workspace = uuid.uuid4()
    await db.execute(f"TRUNCATE {PARTED}")
    for kind, age in (("a", datetime.timedelta(days=3)), ("b", datetime.timedelta(hours=1))):
        await db.execute(
            f"INSERT INTO {PARTED} SELECT $1, $2, now() - $3::interval "
            "FROM generate_series(1, 120)",
            workspace,
            kind,
            age,
        )
    assert (
        await db.fetchval(f"SELECT count(*) FROM {PARTED}_a a JOIN {PARTED}_b b ON a.ctid = b.ctid")
        == 120
    )

    result = await operations.run(cleanup(PARTED), RecordingProgress())

    assert result.tables[0].rows == 120
    counts = await db.fetch(f"SELECT kind, count(*) FROM {PARTED} GROUP BY kind ORDER BY kind")
    assert [tuple(r) for r in counts] == [("b", 120)]


async def test_cancelled_cleanup_keeps_finished_batches_only(
    operations: Operations, db: asyncpg.Connection, database_url: str, server: RunningServer
) -> None:
    await fill_events(db, BLOCKED, old=2500, new=10)
    last_old = await db.fetchval(
        f"SELECT max(id) FROM {BLOCKED} WHERE created_at < now() - interval '1 day'"
    )
    locker = await asyncpg.connect(database_url)
    progress = RecordingProgress()
    try:
        transaction = locker.transaction()
        await transaction.start()
        # The third batch reaches this row and waits for the lock.
        await locker.execute(f"SELECT 1 FROM {BLOCKED} WHERE id = $1 FOR UPDATE", last_old)
        job = asyncio.create_task(operations.run(cleanup(BLOCKED), progress))
        await wait_for_statement_lock_wait(db, f'SELECT ctid FROM "public"."{BLOCKED}"')
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(job, 10)
        await transaction.rollback()
    finally:
        await locker.close()
    assert progress.reports[-1][1] == 2000
    old = await db.fetchval(
        f"SELECT count(*) FROM {BLOCKED} WHERE created_at < now() - interval '1 day'"
    )
    assert old == 500
    assert await db.fetchval(f"SELECT count(*) FROM {BLOCKED}") == 510
    pool = server.database.owner_pool
    assert pool.get_idle_size() == pool.get_size()


@pytest.mark.parametrize("ending", ["update", "delete", "rollback"])
async def test_rows_changed_while_a_batch_waits_for_them_still_go(
    server: RunningServer, db: asyncpg.Connection, database_url: str, ending: str
) -> None:
    """The application holds the expired rows while the first batch reaches them, then
    updates (new ctids), deletes or leaves them. Every expired row still goes: a batch
    that came up short used to read as "nothing left", and the job ended SUCCEEDED
    after one batch with most expired rows kept."""
    rules = [{"table": EVENTS, "column": "created_at", "max_age_seconds": DAY, "batch_size": 10}]
    operations = operations_with(server, rules)
    await fill_events(db, EVENTS, old=100, new=5)
    application = await asyncpg.connect(database_url)
    try:
        transaction = application.transaction()
        await transaction.start()
        # Every expired row: whichever rows the first batch picks, it meets them.
        changed = await application.execute(
            f"{'UPDATE' if ending != 'delete' else 'DELETE FROM'} {EVENTS} "
            f"{'SET n = 1 ' if ending != 'delete' else ''}"
            "WHERE created_at < now() - interval '1 day' AND id % 2 = 0"
        )
        assert changed.endswith(" 50")
        job = asyncio.create_task(operations.run(cleanup(EVENTS), RecordingProgress()))
        await wait_for_lock_waits(db)
        if ending == "rollback":
            await transaction.rollback()
        else:
            await transaction.commit()
        result = await asyncio.wait_for(job, 20)
    finally:
        await application.close()
    assert result.tables[0].rows == (50 if ending == "delete" else 100)
    remaining = await db.fetchrow(
        f"SELECT count(*) AS rows, min(created_at) > now() - interval '1 day' AS all_new "
        f"FROM {EVENTS}"
    )
    assert remaining is not None
    assert (remaining["rows"], remaining["all_new"]) == (5, True)


# -- through MaintenanceService -------------------------------------------------------


async def test_cleanup_job_over_rpc(
    maintenance: maintenance_service_pb2_grpc.MaintenanceServiceStub, db: asyncpg.Connection
) -> None:
    await fill_events(db, EVENTS, old=2500, new=300)
    started = await maintenance.StartJob(pb.StartJobRequest(spec=cleanup(EVENTS)))
    seen = []
    async with asyncio.timeout(30):
        async for response in maintenance.WatchJob(pb.WatchJobRequest(job_id=started.job.job_id)):
            seen.append(response.job)
    job = seen[-1]
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.error
    assert [(r.table, r.action, r.rows) for r in job.result.tables] == [
        (EVENTS, "DELETE (retention)", 2500)
    ]
    assert job.progress.unit == ROWS
    assert job.progress.done == job.progress.total == 2500
    assert await db.fetchval(f"SELECT count(*) FROM {EVENTS}") == 300


async def test_start_job_refuses_bad_cleanups(
    maintenance: maintenance_service_pb2_grpc.MaintenanceServiceStub,
) -> None:
    failure = await rpc_error(
        maintenance.StartJob(pb.StartJobRequest(spec=cleanup(EVENTS, OTHER))), echoed=OTHER
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "NO_RETENTION_RULE"
    assert failure.fields == ["spec.retention_cleanup.tables[1]"]
    failure = await rpc_error(maintenance.StartJob(pb.StartJobRequest(spec=cleanup(TEXTUAL))))
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "RETENTION_RULE_INVALID"


async def test_start_job_on_a_server_without_rules(settings: Settings, tables: None) -> None:
    running = await start_server(settings)
    try:
        async with authorized_channel(running.address) as channel:
            stub = maintenance_service_pb2_grpc.MaintenanceServiceStub(channel)
            failure = await rpc_error(stub.StartJob(pb.StartJobRequest(spec=cleanup())))
    finally:
        await running.stop(grace=1.0)
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "NO_RETENTION_RULES"
