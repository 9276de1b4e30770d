"""The `raptorflow-data serve` command as a subprocess of a test: spawned with only its
flags for settings, on a free port, and waited for until its readiness is SERVING."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokens import TEST_JWT_SECRET, authorized_channel

# `python -m raptorflow.data.server` is the same entry point as the installed script.
COMMAND = (sys.executable, "-m", "raptorflow.data.server")
# Reconnect quickly: by default a refused channel backs off for a second or more.
QUICK_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 200),
]
log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def command_environment() -> dict[str, str]:
    """The test's environment without settings, so only the flags given count."""
    return {
        key: value
        for key, value in os.environ.items()
        if key != "DATABASE_URL" and not key.startswith("RAPTORFLOW_")
    }


async def spawn_serve(
    address: str, database_url: str, *flags: str, stdout: int = asyncio.subprocess.PIPE
) -> asyncio.subprocess.Process:
    """`serve --listen address --database-url database_url --jwt-secret <the tests'> *flags`,
    stderr piped."""
    return await asyncio.create_subprocess_exec(
        *COMMAND,
        "serve",
        "--listen",
        address,
        "--database-url",
        database_url,
        "--jwt-secret",
        TEST_JWT_SECRET.decode(),
        *flags,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        env=command_environment(),
    )


async def wait_until_serving(
    process: asyncio.subprocess.Process, address: str, within: float = 20.0
) -> None:
    """Polls the readiness health check until SERVING; fails if the process exits first."""
    async with authorized_channel(address, options=QUICK_RECONNECT) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        started = time.monotonic()
        while True:
            assert process.returncode is None, "serve exited before serving"
            assert time.monotonic() - started < within, "serve never became SERVING"
            try:
                checked = await health.Check(
                    health_pb2.HealthCheckRequest(service="readiness"), timeout=0.5
                )
                if checked.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def serving(
    database_url: str, *flags: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """A `serve` subprocess on a free port with `flags`, SERVING: the process and its address.
    Killed at the end if still running; its stderr goes to the test's log."""
    address = f"127.0.0.1:{free_port()}"
    process = await spawn_serve(address, database_url, *flags, stdout=asyncio.subprocess.DEVNULL)
    try:
        await wait_until_serving(process, address)
        yield process, address
    finally:
        if process.returncode is None:
            process.kill()
        _, stderr = await process.communicate()
        if stderr:
            log.info("serve stderr:\n%s", stderr.decode(errors="replace"))


@dataclass(frozen=True)
class Exited:
    """How a command run to its end went."""

    returncode: int
    stdout: str
    stderr: str


async def run_command(
    *args: str, env: dict[str, str] | None = None, within: float = 20.0
) -> Exited:
    """Runs `args` to its end (killed past `within` seconds) in `env` (default: the test's
    environment without settings)."""
    process = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else command_environment(),
    )
    try:
        async with asyncio.timeout(within):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Exited(process.returncode, stdout.decode(), stderr.decode())
