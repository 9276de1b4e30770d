"""The service through a real PgBouncer 1.18 in transaction pooling mode (`--pgbouncer`).

PgBouncer runs on loopback with a server-side pool of POOL_SIZE connections, fewer
than the service's query pool, so calls really share server connections and
every transaction may land on another one. The first tests show why the mode
exists; the rest run a smoke subset of the service, the sync, fault and replica
tests through it, and check that nothing leaks: no statement left running in
PostgreSQL, every pool connection idle, PgBouncer's pools quiet.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from conftest import start_server, with_database
from messages import eq, row, update_request, v
from pg_activity import CLEAR_SNAPSHOT, insert_row, lock_row
from raptorflow.data.server import cli
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.connections import Deadline
from raptorflow.data.v1 import (
    job_pb2,
    maintenance_service_pb2,
    maintenance_service_pb2_grpc,
    memory_sync_service_pb2,
    memory_sync_service_pb2_grpc,
    query_pb2,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)
from server_process import QUICK_RECONNECT, free_port, spawn_serve, wait_until_serving
from statuses import how_it_ended
from test_sync import Replica, at_least, follow_until
from test_sync import request as sync_request
from tokens import authorized_channel

from harness.pgbouncer import PgBouncer, PgBouncerUnavailable, running_pgbouncer

pb = workspace_service_pb2
Stub = workspace_service_pb2_grpc.WorkspaceServiceStub
mpb = memory_sync_service_pb2
SyncStub = memory_sync_service_pb2_grpc.MemorySyncServiceStub
jpb = maintenance_service_pb2
# PgBouncer's server connections per (database, user): fewer than the query pool's.
POOL_SIZE = 3
QUERY_POOL = 8
# How long cleanup (cancel round trips, PgBouncer handing servers back) may take.
QUIET_WITHIN = 10.0

# Statements on the test tables still running (or a transaction left open) in
# PostgreSQL, from any backend but the asking one: through PgBouncer the backends
# are PgBouncer's server connections, whatever their application_name.
BUSY_BACKENDS = """
SELECT pid, state, wait_event_type, left(query, 120) AS query FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND backend_type = 'client backend' AND state <> 'idle'
  AND (query LIKE '%campaigns%' OR query LIKE '%memory_records%')
"""


# CI sets it: there a PgBouncer that cannot run fails the module instead of skipping it.
REQUIRE_ENV = "RAPTORFLOW_REQUIRE_PGBOUNCER"


@pytest.fixture(scope="module")
async def bouncer(database_url: str) -> AsyncIterator[PgBouncer]:
    try:
        async with running_pgbouncer(database_url, pool_size=POOL_SIZE) as running:
            yield running
    except PgBouncerUnavailable as unavailable:
        if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
            pytest.fail(f"{REQUIRE_ENV} is set but {unavailable}")
        pytest.skip(str(unavailable))


@pytest.fixture(scope="module")
def pgb_settings(settings: Settings, bouncer: PgBouncer, database_url: str) -> Settings:
    """Queries through PgBouncer; LISTEN, migrations and maintenance straight to PostgreSQL."""
    return dataclasses.replace(
        settings,
        database_url=bouncer.url,
        direct_database_url=database_url,
        pgbouncer=True,
        pool_min_size=1,
        pool_max_size=QUERY_POOL,
        acquire_timeout=10.0,
        health_interval=0.5,
        # Live changes must come through NOTIFY on the direct LISTEN connection: the
        # fallback poll would only come after the tests' waits.
        sync_poll_seconds=60.0,
    )


@pytest.fixture(scope="module")
def captured(database_url: str) -> None:
    """Change capture on campaigns, installed as operators do (directly, not through PgBouncer)."""
    assert cli.main(["migrate", "--database-url", database_url, "--sync-tables", "campaigns"]) == 0


@pytest.fixture(scope="module")
async def pgb_server(pgb_settings: Settings, captured: None) -> AsyncIterator[RunningServer]:
    running = await start_server(pgb_settings)
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


@pytest.fixture(scope="module")
async def pgb_channel(pgb_server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with authorized_channel(pgb_server.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def pgb_stub(pgb_channel: grpc.aio.Channel) -> Stub:
    return Stub(pgb_channel)


async def busy_backends(db: asyncpg.Connection) -> list[dict[str, object]]:
    await db.execute(CLEAR_SNAPSHOT)
    return [dict(r) for r in await db.fetch(BUSY_BACKENDS)]


async def assert_quiet(db: asyncpg.Connection, server: RunningServer, bouncer: PgBouncer) -> None:
    """Nothing of the service runs in PostgreSQL, every query-pool connection is idle, and
    PgBouncer has no waiting client and no active server connection on the test database."""
    database = await db.fetchval("SELECT current_database()")
    started = time.monotonic()
    while True:
        busy = await busy_backends(db)
        stats = server.database.pool_stats()
        pools = [p for p in await bouncer.show("POOLS") if p["database"] == database]
        loud = [p for p in pools if int(p["cl_waiting"]) or int(p["sv_active"])]
        if not busy and stats["in_use"] == 0 and not loud:
            break
        assert time.monotonic() - started < QUIET_WITHIN, (
            f"after {QUIET_WITHIN} s: running in PostgreSQL {busy}, pool {dict(stats)}, "
            f"PgBouncer pools {loud}"
        )
        await asyncio.sleep(0.1)
    servers = [s for s in await bouncer.show("SERVERS") if s["database"] == database]
    assert len(servers) <= POOL_SIZE, servers
    assert stats["size"] <= stats["max"]


def select_names(workspace: str, **fields: object) -> pb.SelectRequest:
    return pb.SelectRequest(
        workspace_id=workspace,
        table="campaigns",
        columns=["name"],
        order_by=[query_pb2.OrderBy(column="name")],
        **fields,  # type: ignore[arg-type]
    )


def insert_names(workspace: str, *names: str) -> pb.InsertRequest:
    return pb.InsertRequest(
        workspace_id=workspace,
        table="campaigns",
        columns=["name", "status"],
        rows=[row(name, "new") for name in names],
    )


# -- why the mode exists ------------------------------------------------------------------


async def test_a_prepared_statement_is_gone_on_the_next_server_connection(
    bouncer: PgBouncer, database_url: str
) -> None:
    """asyncpg's statement cache prepares named statements outside a transaction; the next
    call may run on another server connection, where that statement does not exist.

    Deterministic: the test finds the server connection the statement was prepared on
    (pg_stat_activity shows the PARSE), holds it in another client's transaction, and
    runs the statement. The `postgres` database has a PgBouncer pool of its own that
    nothing else uses."""
    url = with_database(bouncer.url, "postgres")
    direct = await asyncpg.connect(with_database(database_url, "postgres"))
    cached = await asyncpg.connect(url)  # asyncpg's defaults: a statement cache
    holders = [await asyncpg.connect(url, statement_cache_size=0) for _ in range(POOL_SIZE)]
    try:
        # Every server connection of the pool opened: all clients in a transaction at once.
        for holder in holders:
            await holder.execute("BEGIN")
        for holder in holders:
            await holder.execute("ROLLBACK")
        marker = f"SELECT 1 AS prepared_{uuid.uuid4().hex}"
        # Parse, describe and flush, then bind, execute and sync: one unit, one server
        # connection; the statement stays prepared there and named in asyncpg's cache.
        assert await cached.fetchval(marker) == 1
        await direct.execute(CLEAR_SNAPSHOT)
        prepared_on = await direct.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE query = $1", marker
        )
        assert prepared_on is not None
        held: list[asyncpg.Connection] = []
        for holder in holders:
            await holder.execute("BEGIN")
            held.append(holder)
            if await holder.fetchval("SELECT pg_backend_pid()") == prepared_on:
                break
        else:
            raise AssertionError("no client got the server connection the statement is on")
        for holder in held[:-1]:  # free the others; the statement's own stays held
            await holder.execute("ROLLBACK")
        with pytest.raises(asyncpg.InvalidSQLStatementNameError, match="does not exist"):
            await cached.fetchval(marker)
        await held[-1].execute("ROLLBACK")
    finally:
        for conn in (direct, cached, *holders):
            await conn.close()


async def test_unnamed_statements_outside_a_transaction_keep_to_one_server_connection(
    bouncer: PgBouncer,
) -> None:
    """Without a statement cache, asyncpg 0.32 sends parse, describe and flush, then bind,
    execute and sync: PgBouncer hands a server connection back only at the sync's
    ReadyForQuery, so both halves of a statement run on one server connection, even with
    many more clients than server connections. (The mode still runs every statement in a
    transaction: the role, statement_timeout and workspace are set per transaction.)"""
    url = with_database(bouncer.url, "postgres")
    clients = [await asyncpg.connect(url, statement_cache_size=0) for _ in range(4 * POOL_SIZE)]
    try:

        async def calls(i: int) -> None:
            for j in range(150):
                assert await clients[i].fetchval("SELECT $1::int * 1000 + $2::int", i, j) == (
                    i * 1000 + j
                )

        await asyncio.gather(*(calls(i) for i in range(len(clients))))
    finally:
        for client in clients:
            await client.close()


async def test_without_the_mode_the_server_does_not_start_through_pgbouncer(
    pgb_settings: Settings,
) -> None:
    """The normal mode sends statement_timeout and role as startup parameters, which
    PgBouncer 1.18 refuses."""
    starting = start_server(pgb_settings, pgbouncer=False)
    with pytest.raises(asyncpg.ProtocolViolationError, match="unsupported startup parameter"):
        await starting


def test_which_url_carries_what() -> None:
    """Owner (migrations, maintenance) and LISTEN connections never use a PgBouncer URL."""
    both = Settings(database_url="pgb", direct_database_url="direct", pgbouncer=True)
    assert (both.effective_owner_url, both.listen_url) == ("direct", "direct")
    owner = Settings(database_url="pgb", owner_database_url="owner", pgbouncer=True)
    assert (owner.effective_owner_url, owner.listen_url) == ("owner", "owner")
    three = Settings(database_url="pgb", owner_database_url="owner", direct_database_url="direct")
    assert (three.effective_owner_url, three.listen_url) == ("owner", "direct")
    plain = Settings(database_url="db")
    assert (plain.effective_owner_url, plain.listen_url) == ("db", "db")
    assert Settings(database_url="pgb", pgbouncer=True).listen_url == ""


def test_the_mode_needs_a_direct_url(pgb_settings: Settings) -> None:
    from raptorflow.data.server.db.connections import Database

    with pytest.raises(SystemExit, match="RAPTORFLOW_DIRECT_DATABASE_URL"):
        Database(dataclasses.replace(pgb_settings, direct_database_url=""))


# -- the service through PgBouncer -------------------------------------------------------------


async def test_workspace_calls(
    pgb_stub: Stub, pgb_server: RunningServer, bouncer: PgBouncer, db: asyncpg.Connection
) -> None:
    workspace = str(uuid.uuid4())
    described = await pgb_stub.DescribeTables(pb.DescribeTablesRequest())
    assert "campaigns" in {t.name for t in described.tables}
    names = [f"c{i:02d}" for i in range(25)]
    inserted = await pgb_stub.Insert(insert_names(workspace, *names))
    assert inserted.affected_count == 25
    # Pages of 10 follow signed page tokens.
    seen: list[str] = []
    token = ""
    while True:
        page = await pgb_stub.Select(select_names(workspace, page_size=10, page_token=token))
        seen += [r.values[0].string_value for r in page.rows]
        token = page.next_page_token
        if not token:
            break
    assert seen == names
    updated = await pgb_stub.Update(
        pb.UpdateRequest(
            workspace_id=workspace,
            table="campaigns",
            values={"status": v("old")},
            filter=eq("name", "c00"),
        )
    )
    assert updated.affected_count == 1
    deleted = await pgb_stub.Delete(
        pb.DeleteRequest(workspace_id=workspace, table="campaigns", filter=eq("name", "c01"))
    )
    assert deleted.affected_count == 1
    batch = await pgb_stub.ExecuteBatch(
        pb.ExecuteBatchRequest(
            workspace_id=workspace,
            operations=[
                pb.BatchOperation(insert=insert_names(workspace, "batch")),
                pb.BatchOperation(
                    update=pb.UpdateRequest(
                        workspace_id=workspace,
                        table="campaigns",
                        values={"status": v("batched")},
                        filter=eq("name", "c02"),
                    )
                ),
            ],
        )
    )
    assert batch.results[0].insert.affected_count == 1
    assert batch.results[1].update.affected_count == 1
    counted = await pgb_stub.Count(pb.CountRequest(workspace_id=workspace, table="campaigns"))
    assert counted.count == 25
    statuses = dict(
        await db.fetch(
            "SELECT name, status FROM campaigns WHERE workspace_id = $1", uuid.UUID(workspace)
        )
    )
    assert (statuses["c00"], statuses["c02"], statuses["batch"]) == ("old", "batched", "new")
    assert "c01" not in statuses
    await assert_quiet(db, pgb_server, bouncer)


async def test_memory_upsert_and_search(pgb_channel: grpc.aio.Channel) -> None:
    memory = SyncStub(pgb_channel)
    workspace = str(uuid.uuid4())
    records = [
        mpb.MemoryRecord(id=f"r{i}", kind="fact", content=f"record {i}", embedding=[1.0, i, 0.5])
        for i in range(5)
    ]
    first = await memory.UpsertMemoryRecords(
        iter([mpb.UpsertMemoryRecordsRequest(workspace_id=workspace, records=records)])
    )
    again = await memory.UpsertMemoryRecords(
        iter([mpb.UpsertMemoryRecordsRequest(workspace_id=workspace, records=records[:2])])
    )
    assert (first.inserted_count, again.updated_count) == (5, 2)
    found = await memory.SearchMemoryRecords(
        mpb.SearchMemoryRecordsRequest(workspace_id=workspace, embedding=[1.0, 4.0, 0.5], top_k=2)
    )
    assert [r.record.id for r in found.results] == ["r4", "r3"]
    other = await memory.SearchMemoryRecords(
        mpb.SearchMemoryRecordsRequest(
            workspace_id=str(uuid.uuid4()), embedding=[1.0, 4.0, 0.5], top_k=2
        )
    )
    assert list(other.results) == []


async def test_sync_snapshot_then_live_changes(
    pgb_channel: grpc.aio.Channel, pgb_stub: Stub
) -> None:
    """The snapshot reads through PgBouncer; the live changes are woken by the LISTEN
    connection, which goes straight to PostgreSQL."""
    workspace = str(uuid.uuid4())
    await pgb_stub.Insert(insert_names(workspace, "before-1", "before-2"))
    replica = Replica()
    call = SyncStub(pgb_channel).Sync(sync_request(workspace, follow=True))
    try:
        await follow_until(call, replica, lambda r: r.snapshot_done, within=10.0)
        assert sorted(replica.names().values()) == ["before-1", "before-2"]
        await pgb_stub.Insert(insert_names(workspace, "live"))
        await pgb_stub.Update(
            pb.UpdateRequest(
                workspace_id=workspace,
                table="campaigns",
                values={"name": v("before-1b")},
                filter=eq("name", "before-1"),
            )
        )
        await follow_until(call, replica, at_least(2), within=10.0)
    finally:
        call.cancel()
    assert sorted(replica.names().values()) == ["before-1b", "before-2", "live"]


async def test_row_security_binds_through_pgbouncer(
    pgb_server: RunningServer, pgb_stub: Stub
) -> None:
    """Statements on the service's own query connections, with no workspace condition,
    see their workspace's rows only: the role and the workspace are set per transaction."""
    a, b = uuid.uuid4(), uuid.uuid4()
    await pgb_stub.Insert(insert_names(str(a), "a1", "a2"))
    await pgb_stub.Insert(insert_names(str(b), "b1"))
    database = pgb_server.database
    async with database.workspace_connection(Deadline(None), a) as conn:
        user = await conn.fetchval("SELECT current_user")
        names = [r[0] for r in await conn.fetch("SELECT name FROM campaigns ORDER BY name")]
        timeout = await conn.fetchval("SHOW statement_timeout")
    assert user == "raptorflow_app"
    assert names == ["a1", "a2"]
    assert timeout == "10s"  # the settings' statement_timeout, set locally
    async with database.connection(Deadline(None)) as conn:
        assert await conn.fetchval("SELECT count(*) FROM campaigns") == 0
        assert await conn.fetchval("SELECT current_user") == "raptorflow_app"
    # Nothing of it outlives the transaction on PgBouncer's server connections.
    bare = await asyncpg.connect(pgb_server.settings.database_url, statement_cache_size=0)
    try:
        settings = await bare.fetchrow(
            "SELECT current_user AS who, current_setting('raptorflow.workspace_id', true) AS ws"
        )
    finally:
        await bare.close()
    assert settings["who"] == "postgres"
    assert not settings["ws"]


async def test_more_callers_than_server_connections(
    pgb_stub: Stub, pgb_server: RunningServer, bouncer: PgBouncer, db: asyncpg.Connection
) -> None:
    workspace = str(uuid.uuid4())

    async def caller(i: int) -> int:
        await pgb_stub.Insert(insert_names(workspace, f"n{i}"), timeout=30.0)
        page = await pgb_stub.Select(select_names(workspace), timeout=30.0)
        return len(page.rows)

    seen = await asyncio.gather(*(caller(i) for i in range(64)))
    assert all(n >= 1 for n in seen)
    counted = await pgb_stub.Count(pb.CountRequest(workspace_id=workspace, table="campaigns"))
    assert counted.count == 64
    await assert_quiet(db, pgb_server, bouncer)


async def test_a_deadline_in_a_lock_wait_is_cancelled_in_postgresql(
    pgb_stub: Stub, pgb_server: RunningServer, bouncer: PgBouncer, db: asyncpg.Connection
) -> None:
    """asyncpg's cancel request goes to PgBouncer, which forwards it to the server
    connection running the statement."""
    workspace = str(uuid.uuid4())
    row_id = await insert_row(db, workspace, "locked")
    async with db.transaction():
        await lock_row(db, row_id)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await pgb_stub.Update(update_request(workspace, row_id, "late"), timeout=0.5)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, failed.value
        # Checked while the lock is still held: an abandoned statement would still wait.
        await assert_quiet(db, pgb_server, bouncer)
    await asyncio.sleep(0.2)
    assert await db.fetchval("SELECT status FROM campaigns WHERE id = $1", row_id) == "original"


async def test_random_cancels_leave_nothing_running(
    pgb_stub: Stub, pgb_server: RunningServer, bouncer: PgBouncer, db: asyncpg.Connection
) -> None:
    rng = random.Random(7_2026)
    workspace = str(uuid.uuid4())
    row_id = await insert_row(db, workspace, "locked")
    outcomes: Counter[str] = Counter()
    gate = asyncio.Semaphore(40)

    async def one(i: int) -> None:
        async with gate:
            timeout = rng.uniform(0.005, 0.3)
            kind = rng.choice(["update", "select", "count"])
            if kind == "update":
                call = pgb_stub.Update(update_request(workspace, row_id, f"r{i}"), timeout=timeout)
            elif kind == "select":
                call = pgb_stub.Select(select_names(workspace), timeout=timeout)
            else:
                call = pgb_stub.Count(
                    pb.CountRequest(workspace_id=workspace, table="campaigns"), timeout=timeout
                )
            if rng.random() < 0.5:
                await asyncio.sleep(rng.uniform(0, timeout))
                call.cancel()
            outcomes[f"{kind} {await how_it_ended(call)}"] += 1

    async with db.transaction():
        await lock_row(db, row_id)  # updates wait in PostgreSQL until cancelled
        await asyncio.gather(*(one(i) for i in range(300)))
        await assert_quiet(db, pgb_server, bouncer)
    unexpected = {
        k: n
        for k, n in outcomes.items()
        if k.split()[1] not in {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}
    }
    assert not unexpected, outcomes
    assert outcomes["update OK"] == 0, outcomes  # the lock held every update until its end
    page = await pgb_stub.Select(select_names(workspace), timeout=10.0)
    assert [r.values[0].string_value for r in page.rows] == ["locked"]


async def test_terminated_server_connections_give_retryable_statuses_and_heal(
    pgb_stub: Stub, pgb_server: RunningServer, bouncer: PgBouncer, db: asyncpg.Connection
) -> None:
    """pg_terminate_backend of PgBouncer's server connections in the middle of load."""
    workspace = str(uuid.uuid4())
    await pgb_stub.Insert(insert_names(workspace, "seed"))
    database = await db.fetchval("SELECT current_database()")
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()

    async def load(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                await pgb_stub.Select(select_names(workspace), timeout=10.0)
                await pgb_stub.Insert(insert_names(workspace, f"w{i}-{n}"), timeout=10.0)
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                outcomes[exc.code().name] += 1

    workers = [asyncio.create_task(load(i)) for i in range(12)]
    try:
        killed = 0
        for _ in range(3):
            await asyncio.sleep(0.3)
            await db.execute(CLEAR_SNAPSHOT)
            pids = [
                s["remote_pid"] for s in await bouncer.show("SERVERS") if s["database"] == database
            ]
            for pid in pids:
                killed += bool(await db.fetchval("SELECT pg_terminate_backend($1)", int(pid)))
        assert killed >= 3
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert set(outcomes) <= {"OK", "UNAVAILABLE", "ABORTED"}, outcomes
    assert outcomes["OK"] > 0, outcomes
    # Healed: calls succeed again, and no slot was lost.
    for _ in range(20):
        await pgb_stub.Select(select_names(workspace), timeout=10.0)
    await assert_quiet(db, pgb_server, bouncer)
    assert pgb_server.database.pool_stats()["size"] <= QUERY_POOL


async def test_an_analyze_job_runs_on_the_direct_owner_url(pgb_channel: grpc.aio.Channel) -> None:
    maintenance = maintenance_service_pb2_grpc.MaintenanceServiceStub(pgb_channel)
    spec = job_pb2.JobSpec(analyze=job_pb2.AnalyzeJob(tables=["campaigns"]))
    job = (await maintenance.StartJob(jpb.StartJobRequest(spec=spec), timeout=5.0)).job
    final = {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}
    deadline = time.monotonic() + 30.0
    while job.state not in final:
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.1)
        job = (await maintenance.GetJob(jpb.GetJobRequest(job_id=job.job_id), timeout=5.0)).job
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job


async def test_two_servers_through_one_pgbouncer(
    bouncer: PgBouncer, database_url: str, captured: None
) -> None:
    """A write through one server process is seen by a sync stream on the other."""
    flags = (
        "--pgbouncer",
        "true",
        "--direct-database-url",
        database_url,
        "--token-key",
        "shared-test-key",
        "--pool-max-size",
        "4",
        "--health-interval",
        "0.5",
        "--sync-poll-seconds",
        "60",
    )
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    processes = [await spawn_serve(a, bouncer.url, *flags) for a in addresses]
    try:
        for process, address in zip(processes, addresses, strict=True):
            await wait_until_serving(process, address, within=30.0)
        workspace = str(uuid.uuid4())
        async with (
            authorized_channel(addresses[0], options=QUICK_RECONNECT) as writer,
            authorized_channel(addresses[1], options=QUICK_RECONNECT) as reader,
        ):
            replica = Replica()
            call = SyncStub(reader).Sync(sync_request(workspace, follow=True))
            try:
                await follow_until(call, replica, lambda r: r.snapshot_done, within=10.0)
                await Stub(writer).Insert(insert_names(workspace, "from-one"), timeout=10.0)
                await follow_until(call, replica, at_least(1), within=10.0)
            finally:
                call.cancel()
            assert list(replica.names().values()) == ["from-one"]
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
        for process in processes:
            async with asyncio.timeout(20.0):
                await process.communicate()


async def test_nothing_leaks_at_the_end(
    pgb_server: RunningServer, bouncer: PgBouncer, db: asyncpg.Connection
) -> None:
    await assert_quiet(db, pgb_server, bouncer)
    database = await db.fetchval("SELECT current_database()")
    clients = [c for c in await bouncer.show("CLIENTS") if c["database"] == database]
    # The query pool's connections and the health session; nothing else stays connected.
    assert len(clients) <= QUERY_POOL + 1, clients
