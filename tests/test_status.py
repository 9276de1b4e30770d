"""MonitoringService.GetStatus: its figures move as connections are held, released and leaked.

Connections are held straight from the server's own `Database` (as a call
would hold them), so the pool's figures are known exactly; the latency,
slow-query and database figures come from real calls and real statements.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import asyncpg
import grpc
import pytest
from conftest import start_server
from messages import update_request
from pg_activity import CLEAR_SNAPSHOT, insert_row, lock_row, wait_for_lock_waits
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.activity import current_caller
from raptorflow.data.server.db.connections import Deadline
from raptorflow.data.v1 import (
    monitoring_service_pb2,
    monitoring_service_pb2_grpc,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)
from tokens import authorized_channel

from harness.tcp_proxy import TcpProxy

pb = monitoring_service_pb2
ws = workspace_service_pb2
Monitor = monitoring_service_pb2_grpc.MonitoringServiceStub
Workspaces = workspace_service_pb2_grpc.WorkspaceServiceStub

SELECT = "/raptorflow.data.v1.WorkspaceService/Select"
COUNT = "/raptorflow.data.v1.WorkspaceService/Count"
UPDATE = "/raptorflow.data.v1.WorkspaceService/Update"
SLOW_SECONDS = 0.2
LEAK_SECONDS = 1.5
WITHIN = 10.0
DIVIDE_AFTER_SLEEP = "SELECT 1 / (length(pg_sleep($1)::text) + $2)"


@pytest.fixture(scope="module")
async def running(settings: Settings) -> AsyncIterator[RunningServer]:
    """A server with a short slow-query threshold (and the default leak limit)."""
    server = await start_server(settings, slow_query_seconds=SLOW_SECONDS)
    try:
        yield server
    finally:
        await server.stop(grace=1.0)


@pytest.fixture(scope="module")
async def channel(running: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with authorized_channel(running.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def monitor(channel: grpc.aio.Channel) -> Monitor:
    return Monitor(channel)


@pytest.fixture(scope="module")
def workspaces(channel: grpc.aio.Channel) -> Workspaces:
    return Workspaces(channel)


async def status(monitor: Monitor) -> pb.GetStatusResponse:
    return await monitor.GetStatus(pb.GetStatusRequest(), timeout=5.0)


async def eventually(
    monitor: Monitor, want: Callable[[pb.GetStatusResponse], bool], what: str
) -> pb.GetStatusResponse:
    """The first status for which `want` holds; fails after WITHIN seconds."""
    started = time.monotonic()
    while True:
        got = await status(monitor)
        if want(got):
            return got
        assert time.monotonic() - started < WITHIN, f"not {what} within {WITHIN} s:\n{got}"
        await asyncio.sleep(0.05)


def method(response: pb.GetStatusResponse, name: str) -> pb.MethodLatency:
    found = [m for m in response.methods if m.method == name]
    return found[0] if found else pb.MethodLatency(method=name)


async def hold(stack: AsyncExitStack, running: RunningServer, count: int) -> None:
    for _ in range(count):
        await stack.enter_async_context(running.database.connection(Deadline(None)))


async def test_identifies_the_replica_and_the_time(
    monitor: Monitor, running: RunningServer
) -> None:
    got = await status(monitor)
    assert got.replica == running.monitoring.replica_id != ""
    assert abs(got.status_time.ToDatetime().timestamp() - time.time()) < 5


async def test_pool_figures_follow_connections_held_and_released(
    monitor: Monitor, running: RunningServer
) -> None:
    idle = await eventually(monitor, lambda s: s.pool.in_use == 0, "idle")
    assert idle.pool.max_size == running.settings.pool_max_size == 4
    assert idle.pool.utilization == 0
    assert idle.pool.utilization_target == pytest.approx(0.8)
    async with AsyncExitStack() as stack:
        await hold(stack, running, 3)
        held = await status(monitor)
        # A background statement (the sync poll) may hold one more for a moment.
        assert held.pool.in_use in (3, 4)
        assert held.pool.size >= held.pool.in_use
        assert held.pool.idle == held.pool.size - held.pool.in_use
        assert held.pool.utilization == pytest.approx(held.pool.in_use / 4)
        assert held.pool.peak_utilization >= held.pool.utilization
        assert held.held_connections == []  # not past the leak limit
    released = await eventually(monitor, lambda s: s.pool.in_use == 0, "released")
    assert released.pool.utilization == 0
    # The peak is over the window, so it remembers the three.
    assert released.pool.peak_utilization >= 0.75


async def test_waiting_counts_calls_queued_for_an_exhausted_pool(
    monitor: Monitor, running: RunningServer, workspaces: Workspaces, workspace: str
) -> None:
    await eventually(monitor, lambda s: s.pool.in_use == 0, "idle")
    async with AsyncExitStack() as stack:
        await hold(stack, running, 4)
        counts = [
            asyncio.ensure_future(
                workspaces.Count(ws.CountRequest(workspace_id=workspace, table="campaigns"))
            )
            for _ in range(2)
        ]
        full = await eventually(monitor, lambda s: s.pool.waiting >= 2, "two waiting")
        assert full.pool.in_use == full.pool.max_size == 4
        assert full.pool.utilization == 1.0
        assert full.pool.peak_utilization == 1.0
    # Released: the waiting calls get their connections and finish.
    for response in await asyncio.gather(*counts):
        assert response.count == 0
    done = await status(monitor)
    assert done.pool.waiting == 0


async def test_latency_per_method_counts_calls_and_errors(
    monitor: Monitor, workspaces: Workspaces, workspace: str
) -> None:
    before = await status(monitor)
    for _ in range(5):
        await workspaces.Select(
            ws.SelectRequest(workspace_id=workspace, table="campaigns", columns=["name"])
        )
    for _ in range(3):
        await workspaces.Count(ws.CountRequest(workspace_id=workspace, table="campaigns"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await workspaces.Select(ws.SelectRequest(workspace_id="not-a-uuid", table="campaigns"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = await status(monitor)
    select, count = method(after, SELECT), method(after, COUNT)
    assert select.count - method(before, SELECT).count == 6
    assert select.error_count - method(before, SELECT).error_count == 1
    assert count.count - method(before, COUNT).count == 3
    assert count.error_count == method(before, COUNT).error_count
    for latency in (select, count):
        assert 0 < latency.p50_ms <= latency.p90_ms <= latency.p99_ms <= latency.max_ms
        assert latency.max_ms < 10_000
        assert latency.window_seconds == running_window()
    # GetStatus measures itself too.
    assert method(after, "/raptorflow.data.v1.MonitoringService/GetStatus").count >= 1


def running_window() -> float:
    return Settings().latency_window_seconds


async def test_slow_statement_is_listed_by_its_shape_without_its_values(
    monitor: Monitor, running: RunningServer
) -> None:
    seconds = 0.3
    marker = 424242  # a value that must not appear anywhere in the statement

    async def slow_call() -> None:
        # As a call would run it: the interceptor names the method in current_caller.
        current_caller.set("/test.Monitoring/SlowSleep")
        async with running.database.connection(Deadline(None)) as conn:
            await conn.fetchval("SELECT pg_sleep($1), $2::int", seconds, marker)
            # Fails after the sleep (pg_sleep is volatile: nothing is folded at planning).
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.fetchval(DIVIDE_AFTER_SLEEP, seconds, 0)
            await conn.fetchval("SELECT $1::int", marker)  # fast: not listed

    await asyncio.create_task(slow_call())
    got = await eventually(
        monitor,
        lambda s: sum("pg_sleep" in q.statement for q in s.slow_queries) >= 2,
        "listed as slow",
    )
    sleeps = [q for q in got.slow_queries if "pg_sleep" in q.statement]
    assert {q.statement for q in sleeps} == {
        "SELECT pg_sleep($1), $2::int",
        DIVIDE_AFTER_SLEEP,
    }
    for q in sleeps:
        assert q.method == "/test.Monitoring/SlowSleep"
        assert q.duration_ms >= seconds * 1000 * 0.9
        assert abs(q.end_time.ToDatetime().timestamp() - time.time()) < 30
    failed = next(q for q in sleeps if q.statement == DIVIDE_AFTER_SLEEP)
    assert failed.sqlstate == "22012"
    assert next(q for q in sleeps if q is not failed).sqlstate == ""
    durations = [q.duration_ms for q in got.slow_queries]
    assert durations == sorted(durations, reverse=True)
    assert all(str(marker) not in q.statement for q in got.slow_queries)
    assert all(len(q.statement) <= 1000 for q in got.slow_queries)


async def test_a_slow_begin_script_is_listed_without_its_workspace_id(
    monitor: Monitor, running: RunningServer, workspace: str
) -> None:
    # A workspace transaction's BEGIN script carries the workspace id in its text (a
    # simple-protocol script binds no parameter). When the BEGIN itself is slow (PgBouncer
    # queueing it, a stalled network), the list must show its shape, never which tenant.
    seconds = 0.3
    marker = f"/test.Monitoring/SlowBegin/{uuid.uuid4().hex}"

    async def slow_begin() -> None:
        current_caller.set(marker)
        async with running.database.workspace_connection(
            Deadline(None), uuid.UUID(workspace), prelude=f"SELECT pg_sleep({seconds})"
        ):
            pass

    await asyncio.create_task(slow_begin())
    got = await eventually(
        monitor, lambda s: any(q.method == marker for q in s.slow_queries), "listed as slow"
    )
    (begin,) = [q for q in got.slow_queries if q.method == marker]
    assert begin.statement == (
        "BEGIN; SET LOCAL raptorflow.workspace_id = $workspace; SELECT pg_sleep(0.3)"
    )
    assert all(workspace not in q.statement for q in got.slow_queries)


async def test_slow_statement_of_an_rpc_names_its_method(
    monitor: Monitor, workspaces: Workspaces, db: asyncpg.Connection, workspace: str
) -> None:
    secret_status = f"status-{uuid.uuid4().hex}"
    row_id = await insert_row(db, workspace, "slow-update")
    async with db.transaction():
        await lock_row(db, row_id)
        update = asyncio.ensure_future(
            workspaces.Update(update_request(workspace, row_id, secret_status), timeout=10.0)
        )
        await wait_for_lock_waits(db)
        await asyncio.sleep(SLOW_SECONDS + 0.1)
    await update
    got = await eventually(
        monitor, lambda s: any(q.method == UPDATE for q in s.slow_queries), "listed"
    )
    slow = next(q for q in got.slow_queries if q.method == UPDATE)
    assert "UPDATE" in slow.statement
    assert "$1" in slow.statement
    assert secret_status not in slow.statement
    assert workspace not in slow.statement
    assert slow.duration_ms >= SLOW_SECONDS * 1000


async def test_database_is_reachable_with_its_version(
    monitor: Monitor, db: asyncpg.Connection, running: RunningServer
) -> None:
    got = await status(monitor)
    assert got.database.reachable
    assert got.database.server_version == await db.fetchval("SHOW server_version")
    assert 0 < got.database.check_latency_ms < 5000
    age = time.time() - got.database.check_time.ToDatetime().timestamp()
    assert -1 < age < running.settings.health_interval + 5


async def test_schedules_are_empty_without_configured_schedules(monitor: Monitor) -> None:
    assert list((await status(monitor)).schedules) == []


# -- leaks ---------------------------------------------------------------------


@pytest.fixture(scope="module")
async def leaky(settings: Settings) -> AsyncIterator[RunningServer]:
    """A server with a pool of two and a short leak limit."""
    server = await start_server(
        settings, pool_min_size=1, pool_max_size=2, leak_seconds=LEAK_SECONDS
    )
    try:
        yield server
    finally:
        await server.stop(grace=1.0)


async def test_leaked_connections_are_listed_then_reclaimed(
    leaky: RunningServer, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    async with authorized_channel(leaky.address) as ch:
        monitor, workspaces = Monitor(ch), Workspaces(ch)
        pids: dict[str, int] = {}
        give_back = asyncio.Event()

        async def idle_holder() -> None:
            # Holds a connection without a statement running, then gives it back late.
            async with leaky.database.connection(Deadline(None)) as conn:
                pids["idle"] = await conn.fetchval("SELECT pg_backend_pid()")
                await give_back.wait()

        async def sleeping_holder() -> None:
            async with leaky.database.connection(Deadline(None)) as conn:
                pids["sleeping"] = await conn.fetchval("SELECT pg_backend_pid()")
                await conn.fetchval("SELECT pg_sleep($1)", 60)

        before = (await status(monitor)).reclaimed_connection_count
        tasks = [
            asyncio.create_task(idle_holder(), name="test-idle-holder"),
            asyncio.create_task(sleeping_holder(), name="test-sleeping-holder"),
        ]
        with caplog.at_level("WARNING", logger="raptorflow.data.server.observability.leaks"):
            listed = await eventually(
                monitor, lambda s: len(s.held_connections) == 2, "both listed as held"
            )
            by_holder = {h.holder: h for h in listed.held_connections}
            assert set(by_holder) == {"test-idle-holder", "test-sleeping-holder"}
            assert by_holder["test-idle-holder"].backend_pid == pids["idle"]
            assert by_holder["test-sleeping-holder"].backend_pid == pids["sleeping"]
            for held in listed.held_connections:
                assert held.held_seconds >= LEAK_SECONDS
                assert time.time() - held.acquire_time.ToDatetime().timestamp() >= LEAK_SECONDS
            assert listed.pool.in_use == 2
            assert listed.pool.utilization == 1.0

            reclaimed = await eventually(
                monitor,
                lambda s: s.reclaimed_connection_count == before + 2,
                "reclaimed",
            )
        assert list(reclaimed.held_connections) == []
        # Both slots are free again (a background poll may hold one for a moment).
        await eventually(monitor, lambda s: s.pool.in_use == 0, "both slots free")
        warnings = [r.getMessage() for r in caplog.records if "reclaimed" in r.getMessage()]
        assert len(warnings) == 2
        assert any("test-sleeping-holder" in w for w in warnings)
        assert any("test-idle-holder" in w for w in warnings)

        # The sleeping holder's statement failed (its connection is gone) ...
        with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
            await tasks[1]
        # ... and the idle holder's own release, later, is harmless.
        give_back.set()
        await tasks[0]

        # Both backends ended: the sleep was cancelled, not left running.
        started = time.monotonic()
        while True:
            await db.execute(CLEAR_SNAPSHOT)
            alive = await db.fetch(
                "SELECT pid, state FROM pg_stat_activity WHERE pid = any($1::int[])",
                list(pids.values()),
            )
            if all(r["state"] == "idle" for r in alive):
                break
            assert time.monotonic() - started < WITHIN, [dict(r) for r in alive]
            await asyncio.sleep(0.05)

        # The slots are back: both connections of the pool serve calls again.
        workspace = str(uuid.uuid4())
        counts = await asyncio.gather(
            *(
                workspaces.Count(
                    ws.CountRequest(workspace_id=workspace, table="campaigns"), timeout=5.0
                )
                for _ in range(4)
            )
        )
        assert [c.count for c in counts] == [0] * 4
        final = await status(monitor)
        assert final.reclaimed_connection_count == before + 2


async def test_long_lived_holds_are_never_reclaimed(leaky: RunningServer) -> None:
    before = leaky.monitoring.watchdog.reclaimed
    async with leaky.database.connection(Deadline(None), long_lived=True) as conn:
        await asyncio.sleep(LEAK_SECONDS * 2)
        assert leaky.database.holds_over(LEAK_SECONDS) == []
        assert await conn.fetchval("SELECT 1") == 1
    assert leaky.monitoring.watchdog.reclaimed == before


# -- database down -------------------------------------------------------------


async def test_status_answers_while_the_database_is_down(
    settings: Settings, database_url: str
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(TcpProxy.for_database(database_url))
        server = await start_server(settings, database_url=proxy.database_url(database_url))
        stack.push_async_callback(server.stop, 1.0)
        channel = await stack.enter_async_context(authorized_channel(server.address))
        monitor = Monitor(channel)
        up = await status(monitor)
        assert up.database.reachable
        version = up.database.server_version
        await proxy.cut()
        down = await eventually(monitor, lambda s: not s.database.reachable, "unreachable")
        assert down.replica == up.replica
        assert down.database.check_time.ToDatetime() >= up.database.check_time.ToDatetime()
        assert down.pool.max_size == settings.pool_max_size
        await proxy.restore()
        back = await eventually(monitor, lambda s: s.database.reachable, "reachable again")
        assert back.database.server_version == version
