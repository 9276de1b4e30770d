"""`serve --workers N`: one supervisor, N server processes on one port (workers.py).

Each worker is a replica of its own, so GetStatus over a fresh connection tells
which worker the kernel handed that connection to: its replica id names its pid.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from pg_activity import service_backends
from raptorflow.data.server.config import Settings
from raptorflow.data.server.workers import connection_budget
from raptorflow.data.v1 import monitoring_service_pb2, monitoring_service_pb2_grpc
from server_process import (
    COMMAND,
    QUICK_RECONNECT,
    free_port,
    run_command,
    spawn_serve,
    wait_until_serving,
)
from tokens import authorized_channel

pb = monitoring_service_pb2
# One connection per channel: channels with equal arguments share one otherwise.
OWN_CONNECTION = [*QUICK_RECONNECT, ("grpc.use_local_subchannel_pool", 1)]
FLAGS = ("--health-interval", "0.2", "--shutdown-grace-seconds", "2")
LISTENING_ON = re.compile(rb"(\d+) workers on ([\d.]+:\d+)")


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name; None when there is no such pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid` now (the workers, multiprocessing's tracker)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and fields[1] == str(pid):
            found.add(int(entry.name))
    return found


def running(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped has ended)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


async def wait_until_gone(pids: set[int], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while left := {pid for pid in pids if running(pid)}:
        assert time.monotonic() < deadline, f"processes left running: {left}"
        await asyncio.sleep(0.1)


def worker_pid(replica: str) -> int:
    # HOSTNAME-PID-RANDOM, and the host name may hold hyphens itself.
    return int(replica.rsplit("-", 2)[1])


async def statuses_by_replica(
    address: str, count: int, within: float = 30.0
) -> dict[str, pb.GetStatusResponse]:
    """GetStatus over fresh connections until `count` replicas (workers) have answered."""
    seen: dict[str, pb.GetStatusResponse] = {}
    deadline = time.monotonic() + within
    while len(seen) < count:
        assert time.monotonic() < deadline, f"only {sorted(seen)} answered on {address}"
        async with authorized_channel(address, options=OWN_CONNECTION) as channel:
            monitor = monitoring_service_pb2_grpc.MonitoringServiceStub(channel)
            with_status = await monitor.GetStatus(pb.GetStatusRequest(), timeout=5.0)
        seen[with_status.replica] = with_status
    return seen


async def read_address(process: asyncio.subprocess.Process) -> str:
    """The HOST:PORT the supervisor logs that its workers listen on."""
    assert process.stderr is not None
    async with asyncio.timeout(20.0):
        while line := await process.stderr.readline():
            if found := LISTENING_ON.search(line):
                return found.group(2).decode()
    raise AssertionError("the supervisor never said where its workers listen")


@pytest.fixture
async def two_workers(database_url: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`serve --workers 2` on port 0, serving; killed (with its workers) if a test leaves it."""
    process = await spawn_serve(
        "127.0.0.1:0",
        database_url,
        "--workers",
        "2",
        "--pool-min-size",
        "4",
        "--pool-max-size",
        "4",
        *FLAGS,
    )
    workers: set[int] = set()
    try:
        address = await read_address(process)
        await wait_until_serving(process, address)
        workers = children(process.pid)
        yield process, address
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


async def test_workers_share_one_port_split_the_pool_and_stop_on_sigterm(
    two_workers: tuple[asyncio.subprocess.Process, str], db: asyncpg.Connection
) -> None:
    process, address = two_workers
    started = children(process.pid)
    statuses = await statuses_by_replica(address, 2)

    # Two processes of the supervisor answer on the one port, each with half the pool.
    pids = {worker_pid(replica) for replica in statuses}
    assert len(pids) == 2
    assert pids <= started
    assert sorted(s.pool.max_size for s in statuses.values()) == [2, 2]
    assert sum(s.pool.size for s in statuses.values()) == 4
    budget = connection_budget(Settings(workers=2, pool_min_size=4, pool_max_size=4))
    assert len(await service_backends(db)) <= budget

    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(15.0):
        _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert stderr.decode().count("raptorflow.data.server.app: stopped") == 2, stderr.decode()
    await wait_until_gone(started)


async def test_a_worker_that_dies_stops_the_replica_with_status_1(
    two_workers: tuple[asyncio.subprocess.Process, str],
) -> None:
    process, address = two_workers
    statuses = await statuses_by_replica(address, 2)
    killed, other = (worker_pid(replica) for replica in statuses)

    os.kill(killed, signal.SIGKILL)
    async with asyncio.timeout(15.0):
        _, stderr = await process.communicate()
    assert process.returncode == 1, stderr.decode()
    assert f"(pid {killed}) ended unexpectedly (signal SIGKILL)" in stderr.decode()
    # The other one was stopped gracefully, not left behind.
    assert f"(pid {other}) stopped" in stderr.decode()
    await wait_until_gone({other})


async def test_workers_stop_when_their_supervisor_is_killed(
    two_workers: tuple[asyncio.subprocess.Process, str],
) -> None:
    process, address = two_workers
    pids = {worker_pid(replica) for replica in await statuses_by_replica(address, 2)}

    process.kill()
    await process.communicate()
    await wait_until_gone(pids)


async def test_pool_smaller_than_the_workers_is_refused(database_url: str) -> None:
    refused = await run_command(
        *COMMAND,
        "serve",
        "--database-url",
        database_url,
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--workers",
        "3",
        "--pool-max-size",
        "2",
    )
    assert refused.returncode == 1, refused
    assert "RAPTORFLOW_POOL_MAX_SIZE" in refused.stderr


async def test_a_port_in_use_is_refused_not_shared(database_url: str) -> None:
    # Even a listener that allows sharing (as another supervisor's workers do) is a stranger.
    with socket.socket() as stranger:
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        refused = await run_command(
            *COMMAND,
            "serve",
            "--database-url",
            database_url,
            "--listen",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
        )
    assert refused.returncode == 1, refused
    assert "the port is in use" in refused.stderr


async def test_workers_below_one_are_refused(database_url: str) -> None:
    refused = await run_command(*COMMAND, "serve", "--database-url", database_url, "--workers", "0")
    assert refused.returncode == 1, refused
    assert "RAPTORFLOW_WORKERS" in refused.stderr


async def test_a_channel_stays_with_one_worker(
    two_workers: tuple[asyncio.subprocess.Process, str],
) -> None:
    _, address = two_workers
    async with authorized_channel(address, options=OWN_CONNECTION) as channel:
        monitor = monitoring_service_pb2_grpc.MonitoringServiceStub(channel)
        replicas = {
            (await monitor.GetStatus(pb.GetStatusRequest(), timeout=5.0)).replica for _ in range(20)
        }
    assert len(replicas) == 1
