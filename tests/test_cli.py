"""The `raptorflow-data` command, run as a real subprocess: health exit codes, migrate, serve.

`python -m raptorflow.data.server` is the same entry point as the installed
script. Every subprocess is an asyncio one, so the test's own servers keep
serving while the command talks to them.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from conftest import start_server, with_database
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.migrations import bundled_migrations
from raptorflow.data.v1 import workspace_service_pb2, workspace_service_pb2_grpc
from server_process import (
    COMMAND,
    Exited,
    free_port,
    run_command,
    spawn_serve,
    wait_until_serving,
)
from tokens import authorized_channel


async def raptorflow_data(*args: str, within: float = 20.0) -> Exited:
    return await run_command(*COMMAND, *args, within=within)


# -- health ---------------------------------------------------------------------


async def test_health_exits_0_when_serving(server: RunningServer) -> None:
    for service in ("", "readiness", "raptorflow.data.v1.WorkspaceService"):
        probed = await raptorflow_data("health", "--address", server.address, "--service", service)
        assert probed.returncode == 0, probed
        assert probed.stdout.strip() == "status: SERVING"


@pytest.fixture
async def shutting_down(settings: Settings) -> AsyncIterator[RunningServer]:
    """A server that has entered graceful shutdown but still answers health checks."""
    running = await start_server(settings)
    try:
        await running.health.enter_graceful_shutdown()
        yield running
    finally:
        await running.stop(grace=0)


async def test_health_exits_4_when_not_serving(shutting_down: RunningServer) -> None:
    for service in ("", "readiness"):
        probed = await raptorflow_data(
            "health", "--address", shutting_down.address, "--service", service
        )
        assert probed.returncode == 4, probed
        assert "NOT_SERVING" in probed.stderr


async def test_health_exits_2_when_nothing_listens() -> None:
    started = time.monotonic()
    probed = await raptorflow_data(
        "health", "--address", f"127.0.0.1:{free_port()}", "--timeout", "0.5"
    )
    assert probed.returncode == 2, probed
    assert "failed to connect" in probed.stderr
    assert time.monotonic() - started < 10.0


async def test_health_exits_3_for_an_unknown_service(server: RunningServer) -> None:
    probed = await raptorflow_data(
        "health", "--address", server.address, "--service", "no.such.Service"
    )
    assert probed.returncode == 3, probed
    assert "NOT_FOUND" in probed.stderr


# -- migrate --------------------------------------------------------------------


@pytest.fixture
async def empty_database(db: asyncpg.Connection, database_url: str) -> AsyncIterator[str]:
    """A database of its own, so migrate starts from nothing."""
    name = f"raptorflow_cli_{uuid.uuid4().hex[:12]}"
    await db.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(database_url, name)
    finally:
        await db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_migrate_applies_once_and_is_idempotent(empty_database: str) -> None:
    bundled = bundled_migrations()
    assert bundled[0].version == 1
    first = await raptorflow_data("migrate", "--database-url", empty_database)
    assert first.returncode == 0, first
    assert first.stdout.strip() == f"applied migrations: {[m.version for m in bundled]}"
    again = await raptorflow_data("migrate", "--database-url", empty_database)
    assert again.returncode == 0, again
    assert again.stdout.strip() == "schema is up to date"

    conn = await asyncpg.connect(empty_database)
    try:
        ledger = await conn.fetch(
            "SELECT version, name FROM raptorflow_data.schema_migrations ORDER BY version"
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in ledger] == [(m.version, m.name) for m in bundled]


async def test_migrate_without_database_url_exits_2() -> None:
    refused = await raptorflow_data("migrate")
    assert refused.returncode == 2, refused
    assert "DATABASE_URL" in refused.stderr


# -- serve ----------------------------------------------------------------------


async def test_serve_becomes_serving_and_exits_0_on_sigterm(database_url: str) -> None:
    address = f"127.0.0.1:{free_port()}"
    process = await spawn_serve(
        address, database_url, "--health-interval", "0.2", "--shutdown-grace-seconds", "2"
    )
    try:
        await wait_until_serving(process, address)
        async with authorized_channel(address) as channel:
            counted = await workspace_service_pb2_grpc.WorkspaceServiceStub(channel).Count(
                workspace_service_pb2.CountRequest(
                    workspace_id=str(uuid.uuid4()), table="campaigns"
                ),
                timeout=5.0,
            )
            assert counted.count == 0

        probed = await raptorflow_data("health", "--address", address, "--service", "readiness")
        assert probed.returncode == 0, probed

        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        async with asyncio.timeout(10.0):
            _, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
        # Nothing is in flight, so the 2 s grace is not waited out.
        assert time.monotonic() - signalled < 2.0
        assert "stopped" in stderr.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
