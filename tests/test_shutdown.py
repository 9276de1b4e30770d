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
from messages import update_request
from pg_activity import insert_row, lock_row, service_backends, wait_for_lock_waits
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.v1 import (
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)
from tokens import authorized_channel

pb = workspace_service_pb2
Stub = workspace_service_pb2_grpc.WorkspaceServiceStub
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def assert_backends_gone(db: asyncpg.Connection, before: set[int]) -> None:
    """Every connection the server opened has left PostgreSQL (backends exit asynchronously)."""
    started = time.monotonic()
    while left := {
        pid: dict(r) for pid, r in (await service_backends(db)).items() if pid not in before
    }:
        assert time.monotonic() - started < 3.0, f"server connections left open: {left}"
        await asyncio.sleep(0.05)


async def assert_refused(address: str) -> None:
    async with authorized_channel(address) as channel:
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
        async with authorized_channel(running.address) as channel:
            stub = Stub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            row_id = await insert_row(db, workspace, "draining")
            lock = db.transaction()
            await lock.start()
            try:
                await lock_row(db, row_id)
                in_flight = stub.Update(update_request(workspace, row_id, "drained"), timeout=30.0)
                await wait_for_lock_waits(db)
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
        async with authorized_channel(running.address) as channel:
            stub = Stub(channel)
            row_id = await insert_row(db, workspace, "draining")
            async with db.transaction():
                await lock_row(db, row_id)
                in_flight = stub.Update(update_request(workspace, row_id, "too late"), timeout=30.0)
                await wait_for_lock_waits(db)
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
