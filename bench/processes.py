"""Starting, watching and stopping the benchmark's subprocesses: servers and load workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from raptorflow.data.server.auth.tokens import mint
from raptorflow.data.server.config import Settings
from raptorflow.data.v1 import workspace_service_pb2

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The benchmarks run the service as deployed, authentication on: servers verify
# HS256 tokens with this secret, and load generators send one admin token.
BENCH_JWT_SECRET = b"raptorflow-bench-jwt-secret-32-bytes-or-more"


def bench_token() -> str:
    """An admin token of every workspace that the bench servers accept."""
    return mint(
        Settings(jwt_secret=BENCH_JWT_SECRET),
        subject="bench",
        roles=["admin"],
        workspaces=["*"],
        ttl_seconds=24 * 3600,
    )


def auth_metadata() -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `bench_token()`."""
    return (("authorization", f"Bearer {bench_token()}"),)


WORKSPACE_SERVICE = workspace_service_pb2.DESCRIPTOR.services_by_name["WorkspaceService"].full_name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process and of its descendants (the workers of
    `serve --workers N`), all their threads, in seconds."""
    total = stat_cpu_seconds(Path(f"/proc/{pid}/stat"))
    for child in descendants(pid):
        with contextlib.suppress(OSError):  # it ended meanwhile
            total += stat_cpu_seconds(Path(f"/proc/{child}/stat"))
    return total


def descendants(pid: int) -> list[int]:
    """The processes below `pid` now: its children, theirs, and so on."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    queue = [pid]
    while queue:
        below = children.get(queue.pop(), [])
        found.extend(below)
        queue.extend(below)
    return found


def stat_cpu_seconds(stat: Path) -> float:
    """User plus system CPU seconds from a /proc/.../stat file (a process or one thread)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14, stime 15 (1-based, man proc).
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def database_backends(database: str) -> list[int]:
    """PostgreSQL backends serving `database` on this machine (by their process titles)."""
    marker = f" {database} ".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"postgres:") and marker in title:
                pids.append(int(entry.name))
    return pids


def total_cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds of several processes; ones that have ended count as 0."""
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            continue
    return total


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of `pid`, keyed `name:tid`."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            out[f"{name}:{task.name}"] = stat_cpu_seconds(task / "stat")
        except OSError:  # the thread ended meanwhile
            continue
    return out


@dataclass
class ServerProcess:
    """A server subprocess, its address and its log file."""

    name: str
    process: asyncio.subprocess.Process
    log: Path
    address: str = ""
    command: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            raise RuntimeError(
                f"{self.name} exited with status {self.process.returncode}:\n{self.log_tail()}"
            )

    async def stop(self, grace_seconds: float = 15.0) -> None:
        if self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), grace_seconds)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


async def _spawn(name: str, command: list[str], log_dir: Path, **kwargs: Any) -> ServerProcess:
    log = log_dir / f"{name}.log"
    with log.open("wb") as stderr:
        # A worker's answer carries every latency on one line: allow long lines.
        process = await asyncio.create_subprocess_exec(
            *command, stderr=stderr, limit=2**28, **kwargs
        )
    return ServerProcess(name, process, log, command=command)


def serve_command(address: str, database_url: str, extra_args: Sequence[str] = ()) -> list[str]:
    """The command line of `raptorflow-data serve` on `address`, verifying the bench's tokens."""
    return [
        sys.executable,
        "-m",
        "raptorflow.data.server",
        "serve",
        "--listen",
        address,
        "--database-url",
        database_url,
        "--jwt-secret",
        BENCH_JWT_SECRET.decode(),
        *extra_args,
    ]


async def start_data_server(
    database_url: str,
    log_dir: Path,
    *,
    extra_args: Sequence[str] = (),
    name: str = "data-server",
) -> ServerProcess:
    """`raptorflow-data serve` (uvloop, as the CLI runs) on a free port; waits for SERVING.

    `extra_args` are more `serve` flags (`--max-streams-per-caller 1000`); `name`
    names the process and its log file in `log_dir`.
    """
    address = f"127.0.0.1:{free_port()}"
    command = serve_command(address, database_url, extra_args)
    server = await _spawn(name, command, log_dir, stdout=asyncio.subprocess.DEVNULL)
    server.address = address
    await wait_serving(server, WORKSPACE_SERVICE)
    return server


async def wait_serving(server: ServerProcess, service: str, within: float = 60.0) -> None:
    """Polls grpc.health.v1 Check until `service` is SERVING."""
    deadline = time.monotonic() + within
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            server.check_alive()
            try:
                response = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=1.0
                )
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{server.name} not SERVING after {within:g} s:\n{server.log_tail()}"
                )
            await asyncio.sleep(0.2)


async def start_echo_server(
    response_file: Path, log_dir: Path, *, method: str = "", name: str = "echo-server"
) -> ServerProcess:
    """`python -m bench.echo` on a free port; waits for its `ready` line.

    `method` is the path it answers (default: its own, WorkspaceService/Select).
    """
    command = [
        sys.executable,
        "-m",
        "bench.echo",
        "--listen",
        "127.0.0.1:0",
        "--response-file",
        str(response_file),
        *(["--method", method] if method else []),
    ]
    server = await _spawn(name, command, log_dir, stdout=asyncio.subprocess.PIPE)
    assert server.process.stdout is not None
    try:
        line = await asyncio.wait_for(server.process.stdout.readline(), 30.0)
    except TimeoutError:
        line = b""
    if not line.startswith(b"ready "):
        await server.stop()
        raise RuntimeError(f"echo server did not start:\n{server.log_tail()}")
    server.address = line.decode().split()[1]
    return server


class LoadWorker:
    """A `python -m bench.load` process: one JSON command in, one JSON answer out."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server

    @classmethod
    async def start(cls, index: int, log_dir: Path) -> LoadWorker:
        command = [sys.executable, "-m", "bench.load"]
        server = await _spawn(
            f"load-{index}",
            command,
            log_dir,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(server)

    @property
    def pid(self) -> int:
        return self.server.pid

    async def send(self, command: dict[str, Any]) -> None:
        stdin = self.server.process.stdin
        assert stdin is not None
        stdin.write((json.dumps(command) + "\n").encode())
        await stdin.drain()

    async def receive(self, within: float) -> dict[str, Any]:
        stdout = self.server.process.stdout
        assert stdout is not None
        try:
            line = await asyncio.wait_for(stdout.readline(), within)
        except TimeoutError:
            line = b""
        if not line:
            self.server.check_alive()
            raise RuntimeError(f"{self.server.name} did not answer:\n{self.server.log_tail()}")
        answer: dict[str, Any] = json.loads(line)
        if "failed" in answer:
            raise RuntimeError(f"{self.server.name}: {answer['failed']}")
        return answer

    async def stop(self) -> None:
        if self.server.process.returncode is None:
            with contextlib.suppress(ConnectionError):
                await self.send({"target": "exit"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.process.wait(), 10.0)
        await self.server.stop()
