"""Readiness follows the database: a real TCP proxy between server and PostgreSQL is cut.

While the proxy is cut, readiness and the service's own name report NOT_SERVING,
liveness stays SERVING, and calls fail at once with UNAVAILABLE. After the proxy
is restored the same server process becomes SERVING and serves calls again.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from conftest import start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from raptorflow.data.server.app import SERVED_SERVICES, RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.v1 import (
    query_pb2,
    value_pb2,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)
from statuses import error_reason
from tokens import authorized_channel

from harness.tcp_proxy import TcpProxy

pb = workspace_service_pb2
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WORKSPACE_SERVICE = pb.DESCRIPTOR.services_by_name["WorkspaceService"].full_name
FOLLOWS_DATABASE = ("readiness", WORKSPACE_SERVICE)

# Health is checked every 0.2 s with a 1 s timeout (conftest settings); a few
# seconds is generous, and far below the 10 s statement timeout a hang would hit.
NOTICE_WITHIN = 3.0
# A call refused for an unreachable database must not wait out its deadline.
FAIL_FAST_WITHIN = 1.5
CALL_TIMEOUT = 10.0


@pytest.fixture(scope="module")
async def proxy(database_url: str) -> AsyncIterator[TcpProxy]:
    async with TcpProxy.for_database(database_url) as running:
        yield running


@pytest.fixture(scope="module")
async def proxied(settings: Settings, proxy: TcpProxy) -> AsyncIterator[RunningServer]:
    """A server whose every database connection goes through the proxy."""
    running = await start_server(settings, database_url=proxy.database_url(settings.database_url))
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


@pytest.fixture(scope="module")
async def proxied_channel(proxied: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with authorized_channel(proxied.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def health(proxied_channel: grpc.aio.Channel) -> health_pb2_grpc.HealthStub:
    return health_pb2_grpc.HealthStub(proxied_channel)


@pytest.fixture(scope="module")
def workspaces(
    proxied_channel: grpc.aio.Channel,
) -> workspace_service_pb2_grpc.WorkspaceServiceStub:
    return workspace_service_pb2_grpc.WorkspaceServiceStub(proxied_channel)


@pytest.fixture
async def restored(proxy: TcpProxy, health: health_pb2_grpc.HealthStub) -> AsyncIterator[None]:
    """Whatever a test cuts, the next test starts with the proxy up and readiness SERVING."""
    yield
    await proxy.restore()
    await wait_for_status(health, "readiness", SERVING)


async def status_of(health: health_pb2_grpc.HealthStub, service: str) -> int:
    response = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
    return response.status


async def wait_for_status(
    health: health_pb2_grpc.HealthStub, service: str, want: int, within: float = NOTICE_WITHIN
) -> float:
    """Seconds until `service` reports `want`; fails after `within` seconds."""
    started = time.monotonic()
    while (got := await status_of(health, service)) != want:
        elapsed = time.monotonic() - started
        assert elapsed < within, (
            f"{service!r} still {health_pb2.HealthCheckResponse.ServingStatus.Name(got)} "
            f"after {elapsed:.1f} s"
        )
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def insert_request(workspace: str, name: str) -> pb.InsertRequest:
    return pb.InsertRequest(
        workspace_id=workspace,
        table="campaigns",
        columns=["name"],
        rows=[value_pb2.Row(values=[value_pb2.Value(string_value=name)])],
    )


def select_request(workspace: str) -> pb.SelectRequest:
    return pb.SelectRequest(workspace_id=workspace, table="campaigns", columns=["name"])


async def assert_unavailable_fast(stub: workspace_service_pb2_grpc.WorkspaceServiceStub) -> None:
    """Every kind of call is refused with UNAVAILABLE well before its deadline."""
    workspace = str(uuid.uuid4())
    calls = {
        "Select": stub.Select(select_request(workspace), timeout=CALL_TIMEOUT),
        "Insert": stub.Insert(insert_request(workspace, "lost"), timeout=CALL_TIMEOUT),
        "Count": stub.Count(
            pb.CountRequest(workspace_id=workspace, table="campaigns"), timeout=CALL_TIMEOUT
        ),
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
        elapsed = time.monotonic() - started
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, (name, failed.value)
        assert error_reason(failed.value) == "DATABASE_UNAVAILABLE", name
        assert elapsed < FAIL_FAST_WITHIN, f"{name} took {elapsed:.2f} s to fail"


async def test_check_unknown_service_is_not_found(health: health_pb2_grpc.HealthStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=2.0)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_returns_every_status(health: health_pb2_grpc.HealthStub) -> None:
    response = await health.List(health_pb2.HealthListRequest(), timeout=2.0)
    assert {name: s.status for name, s in response.statuses.items()} == {
        "": SERVING,
        "readiness": SERVING,
        **dict.fromkeys(SERVED_SERVICES, SERVING),
    }


@pytest.mark.usefixtures("restored")
async def test_cut_database_goes_not_serving_and_back_without_restart(
    proxy: TcpProxy,
    proxied: RunningServer,
    health: health_pb2_grpc.HealthStub,
    workspaces: workspace_service_pb2_grpc.WorkspaceServiceStub,
    workspace: str,
) -> None:
    await workspaces.Insert(insert_request(workspace, "before"), timeout=CALL_TIMEOUT)
    watch = health.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=30.0)
    async with asyncio.timeout(NOTICE_WITHIN):
        assert (await watch.read()).status == SERVING

    await proxy.cut()
    # Before the health check has noticed, a call already fails fast on its own.
    await assert_unavailable_fast(workspaces)

    for service in FOLLOWS_DATABASE:
        await wait_for_status(health, service, NOT_SERVING)
    assert await status_of(health, "") == SERVING, "liveness must not follow the database"
    async with asyncio.timeout(NOTICE_WITHIN):
        assert (await watch.read()).status == NOT_SERVING

    # Still cut, and still failing fast: nothing waits for the deadline.
    for _ in range(3):
        await assert_unavailable_fast(workspaces)
        await asyncio.sleep(0.2)
    assert await status_of(health, "readiness") == NOT_SERVING

    accepted_before = proxy.accepted
    await proxy.restore()
    for service in FOLLOWS_DATABASE:
        await wait_for_status(health, service, SERVING)
    async with asyncio.timeout(NOTICE_WITHIN):
        assert (await watch.read()).status == SERVING
    watch.cancel()

    inserted = await workspaces.Insert(insert_request(workspace, "after"), timeout=CALL_TIMEOUT)
    assert inserted.affected_count == 1
    page = await workspaces.Select(select_request(workspace), timeout=CALL_TIMEOUT)
    assert sorted(r.values[0].string_value for r in page.rows) == ["after", "before"]
    # The same server process reconnected through the proxy.
    assert proxy.accepted > accepted_before
    assert proxied.database_health.serving


@pytest.mark.usefixtures("restored")
async def test_blip_shorter_than_health_interval_leaves_no_broken_connection(
    proxy: TcpProxy,
    health: health_pb2_grpc.HealthStub,
    workspaces: workspace_service_pb2_grpc.WorkspaceServiceStub,
    workspace: str,
) -> None:
    # Put connections in the pool, then break every one of them.
    await asyncio.gather(
        *(workspaces.Select(select_request(workspace), timeout=CALL_TIMEOUT) for _ in range(8))
    )
    await proxy.cut()
    await asyncio.sleep(0.05)
    await proxy.restore()
    # Pooled connections that died are replaced, not handed to calls.
    for _ in range(8):
        page = await workspaces.Select(select_request(workspace), timeout=CALL_TIMEOUT)
        assert list(page.rows) == []
    # The health check may have seen the blip too; if so, it recovers on its own.
    await wait_for_status(health, "readiness", SERVING)


@pytest.mark.usefixtures("restored")
async def test_query_in_flight_when_cut_fails_fast_with_unavailable(
    proxy: TcpProxy,
    db: asyncpg.Connection,
    workspaces: workspace_service_pb2_grpc.WorkspaceServiceStub,
    workspace: str,
) -> None:
    row_id = await db.fetchval(
        "INSERT INTO campaigns (workspace_id, name) VALUES ($1, 'held') RETURNING id",
        uuid.UUID(workspace),
    )
    update = pb.UpdateRequest(
        workspace_id=workspace,
        table="campaigns",
        values={"status": value_pb2.Value(string_value="changed")},
        filter=query_pb2.Filter(
            condition=query_pb2.Condition(
                column="id",
                operator=query_pb2.OPERATOR_EQ,
                value=value_pb2.Value(int64_value=row_id),
            )
        ),
    )
    async with db.transaction():
        await db.execute("SELECT 1 FROM campaigns WHERE id = $1 FOR UPDATE", row_id)
        call = workspaces.Update(update, timeout=CALL_TIMEOUT)
        async with asyncio.timeout(5.0):
            while True:
                # pg_stat_activity is one snapshot per transaction: drop it to see new backends.
                await db.execute("SELECT pg_stat_clear_snapshot()")
                if await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name = 'raptorflow-data' AND wait_event_type = 'Lock'"
                ):
                    break
                await asyncio.sleep(0.02)
        await proxy.cut()
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
        elapsed = time.monotonic() - started
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
        assert elapsed < FAIL_FAST_WITHIN


async def test_watches_cancelled_by_clients_leave_no_tasks_behind(
    health: health_pb2_grpc.HealthStub,
) -> None:
    """Clients that watch and go away (as grpc's client-side health checking does) cost nothing."""

    async def watch_then_cancel() -> None:
        watch = health.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=10.0)
        async with asyncio.timeout(2.0):
            assert (await watch.read()).status == SERVING
        watch.cancel()

    await watch_then_cancel()
    await asyncio.sleep(0.2)
    before = len(asyncio.all_tasks())
    for _ in range(50):
        await watch_then_cancel()
    await asyncio.sleep(0.3)
    after = len(asyncio.all_tasks())
    assert after <= before + 10, f"{after - before} more tasks after 50 cancelled watches"
