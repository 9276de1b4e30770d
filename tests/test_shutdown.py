"""Graceful shutdown of a server of the test's own: drain, refuse, close the pools.

`RunningServer.stop()` is what SIGTERM runs: health NOT_SERVING, Watch streams
ended with UNAVAILABLE, in-flight unary calls given the grace period, new calls
refused, and last every database connection closed.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import grpc
import pytest
from conftest import start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.v1 import (
    query_pb2,
    value_pb2,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)

pb = workspace_service_pb2
Stub = workspace_service_pb2_grpc.WorkspaceServiceStub
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# pg_stat_activity is one snapshot per transaction; the lock-holding connection drops it.
CLEAR_SNAPSHOT = "SELECT pg_stat_clear_snapshot()"
SERVICE_BACKENDS = """
SELECT pid, state, wait_event_type, left(query, 120) AS query FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'raptorflow-data'
"""


async def service_backends(db: asyncpg.Connection) -> dict[int, asyncpg.Record]:
    await db.execute(CLEAR_SNAPSHOT)
    return {r["pid"]: r for r in await db.fetch(SERVICE_BACKENDS)}


async def wait_for_lock_wait(db: asyncpg.Connection) -> None:
    async with asyncio.timeout(5.0):
        while True:
            backends = await service_backends(db)
            if any(r["wait_event_type"] == "Lock" for r in backends.values()):
                return
            await asyncio.sleep(0.02)


async def assert_backends_gone(db: asyncpg.Connection, before: set[int]) -> None:
    """Every connection the server opened has left PostgreSQL (backends exit asynchronously)."""
    started = time.monotonic()
    while left := {
        pid: dict(r) for pid, r in (await service_backends(db)).items() if pid not in before
    }:
        assert time.monotonic() - started < 3.0, f"server connections left open: {left}"
        await asyncio.sleep(0.05)


async def insert_row(db: asyncpg.Connection, workspace: str) -> int:
    row_id: int = await db.fetchval(
        "INSERT INTO campaigns (workspace_id, name, status) VALUES ($1, 'draining', 'original')"
        " RETURNING id",
        uuid.UUID(workspace),
    )
    return row_id


async def lock_row(db: asyncpg.Connection, row_id: int) -> None:
    """Locks the row until the caller's transaction ends, so an Update of it waits."""
    await db.execute("SELECT 1 FROM campaigns WHERE id = $1 FOR UPDATE", row_id)


def update_request(workspace: str, row_id: int, status: str) -> pb.UpdateRequest:
    return pb.UpdateRequest(
        workspace_id=workspace,
        table="campaigns",
        values={"status": value_pb2.Value(string_value=status)},
        filter=query_pb2.Filter(
            condition=query_pb2.Condition(
                column="id",
                operator=query_pb2.OPERATOR_EQ,
                value=value_pb2.Value(int64_value=row_id),
            )
        ),
    )


async def assert_refused(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await Stub(channel).Count(
                pb.CountRequest(workspace_id=str(uuid.uuid4()), table="campaigns"), timeout=2.0
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value


async def test_stop_drains_in_flight_call_and_ends_watch_at_once(
    settings: Settings, db: asyncpg.Connection, workspace: str
) -> None:
    grace = 5.0
    release_after = 1.5
    before = set(await service_backends(db))
    running: RunningServer = await start_server(settings, shutdown_grace_seconds=grace)
    stop_task: asyncio.Task[None] | None = None
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = Stub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            row_id = await insert_row(db, workspace)
            lock = db.transaction()
            await lock.start()
            try:
                await lock_row(db, row_id)
                in_flight = stub.Update(update_request(workspace, row_id, "drained"), timeout=30.0)
                await wait_for_lock_wait(db)
                watch = health.Watch(health_pb2.HealthCheckRequest(service="readiness"))
                async with asyncio.timeout(2.0):
                    assert (await watch.read()).status == SERVING

                stop_task = asyncio.create_task(running.stop())
                stop_began = time.monotonic()
                async with asyncio.timeout(2.0):
                    assert (await watch.read()).status == NOT_SERVING
                    with pytest.raises(grpc.aio.AioRpcError) as ended:
                        await watch.read()
                watch_ended = time.monotonic() - stop_began
                assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
                assert watch_ended < 1.0, f"Watch held on for {watch_ended:.2f} s of the grace"
                assert not in_flight.done()

                # The server is stopping: new calls are refused, on this channel and a new one.
                await asyncio.sleep(0.2)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Count(
                        pb.CountRequest(workspace_id=workspace, table="campaigns"), timeout=2.0
                    )
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
                await assert_refused(running.address)
                assert not in_flight.done()

                await asyncio.sleep(max(0.0, stop_began + release_after - time.monotonic()))
            finally:
                await lock.rollback()

            response = await in_flight
            assert response.affected_count == 1
            async with asyncio.timeout(grace):
                await stop_task
            stopped_after = time.monotonic() - stop_began
            assert stopped_after < grace, "stop() waited out the grace with nothing in flight"
        status = await db.fetchval("SELECT status FROM campaigns WHERE id = $1", row_id)
        assert status == "drained"
        await assert_refused(running.address)
        await assert_backends_gone(db, before)
    finally:
        if stop_task is None:
            await running.stop(grace=0)
        else:
            await stop_task


async def test_call_outliving_grace_is_cancelled_in_postgres_too(
    settings: Settings, db: asyncpg.Connection, workspace: str
) -> None:
    grace = 0.5
    before = set(await service_backends(db))
    running: RunningServer = await start_server(settings, shutdown_grace_seconds=grace)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = Stub(channel)
            row_id = await insert_row(db, workspace)
            async with db.transaction():
                await lock_row(db, row_id)
                in_flight = stub.Update(update_request(workspace, row_id, "too late"), timeout=30.0)
                await wait_for_lock_wait(db)
                stop_began = time.monotonic()
                async with asyncio.timeout(grace + 5.0):
                    await running.stop()
                stopped_after = time.monotonic() - stop_began
                with pytest.raises(grpc.aio.AioRpcError) as cut_off:
                    await in_flight
                # grpc cancels what outlives the grace with UNAVAILABLE: safe to retry elsewhere.
                assert cut_off.value.code() == grpc.StatusCode.UNAVAILABLE, cut_off.value
                assert stopped_after < grace + 2.0, f"stop() took {stopped_after:.2f} s"
                # Still holding the lock: the query must be gone, not waiting behind it.
                await assert_backends_gone(db, before)
        await asyncio.sleep(0.2)
        status = await db.fetchval("SELECT status FROM campaigns WHERE id = $1", row_id)
        assert status == "original"
    finally:
        await running.stop(grace=0)
