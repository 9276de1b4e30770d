"""Several `raptorflow-data serve` processes on one database, as a test's replicas: started
on ports of their own with one token key and the tests' JWT secret, waited for until
SERVING, stopped by signal, and their own PostgreSQL backends told apart from the others'.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from pg_activity import service_backends
from server_process import COMMAND, command_environment, wait_until_serving
from tokens import TEST_JWT_SECRET

# Replicas share it: a page or resume token one signs, every other accepts.
TOKEN_KEY = "test-replica-token-key"
SERVING_ON = re.compile(r"serving on (\S+:\d+) ")
# Short health checks, and small pools: several replicas of several test sessions share
# one PostgreSQL's max_connections. A test's own flags come later and win.
BASE_FLAGS = (
    "--health-interval",
    "0.2",
    "--connect-timeout",
    "2",
    "--sync-poll-seconds",
    "1",
    "--pool-min-size",
    "1",
    "--pool-max-size",
    "4",
    "--max-running-jobs",
    "1",
)


@dataclass
class Replica:
    """One `serve` process; its log (stderr and stdout) goes to a file, never a full pipe."""

    process: asyncio.subprocess.Process
    log_path: Path
    address: str = ""
    signalled_at: float | None = None
    """time.monotonic() of the last signal sent by `signal()`."""
    exited_at: float | None = None
    own_backends: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.signalled_at = time.monotonic()
        self.process.send_signal(signum)

    async def wait(self, within: float) -> int:
        """Waits for the process to exit (fails past `within` seconds); its return code."""
        try:
            async with asyncio.timeout(within):
                code = await self.process.wait()
        except TimeoutError:
            raise AssertionError(
                f"replica {self.address} still running after {within} s:\n{self.log()[-3000:]}"
            ) from None
        if self.exited_at is None:
            self.exited_at = time.monotonic()
        return code

    async def backends(self, db: asyncpg.Connection) -> set[int]:
        """The backend pids of this process's own connections to the test database."""
        return backends_of(self.pid, await service_backends(db))


async def start_replica(database_url: str, *flags: str, within: float = 30.0) -> Replica:
    """`serve --listen 127.0.0.1:0` with the shared token key and `flags`, serving."""
    handle, name = tempfile.mkstemp(prefix="raptorflow-replica-", suffix=".log")
    process = await asyncio.create_subprocess_exec(
        *COMMAND,
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        database_url,
        "--jwt-secret",
        TEST_JWT_SECRET.decode(),
        "--token-key",
        TOKEN_KEY,
        *BASE_FLAGS,
        *flags,
        stdout=handle,
        stderr=handle,
        env=command_environment(),
    )
    os.close(handle)
    replica = Replica(process, Path(name))
    try:
        started = time.monotonic()
        # The port 0 picked is in the log line that says the server is up.
        while not (found := SERVING_ON.search(replica.log())):
            assert replica.running, f"serve exited before serving:\n{replica.log()[-3000:]}"
            assert time.monotonic() - started < within, f"serve never listened:\n{replica.log()}"
            await asyncio.sleep(0.05)
        replica.address = found.group(1)
        await wait_until_serving(process, replica.address, within=within)
    except BaseException:
        await stop(replica)
        raise
    return replica


async def stop(replica: Replica, within: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it is still running after `within` seconds; removes the log."""
    if replica.running:
        replica.signal(signal.SIGTERM)
        try:
            await replica.wait(within)
        except AssertionError:
            replica.signal(signal.SIGKILL)
            await replica.process.wait()
    with contextlib.suppress(OSError):
        replica.log_path.unlink()


@contextlib.asynccontextmanager
async def replicas(database_url: str, count: int, *flags: str) -> AsyncIterator[list[Replica]]:
    """`count` replicas with the same flags, started side by side; stopped on exit."""
    started = await asyncio.gather(
        *(start_replica(database_url, *flags) for _ in range(count)), return_exceptions=True
    )
    running = [r for r in started if isinstance(r, Replica)]
    try:
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        yield running
    finally:
        await asyncio.gather(*(stop(r) for r in running))


def round_robin_target(members: Sequence[Replica]) -> str:
    """One gRPC target naming every replica, for a client balancing calls across them."""
    return "ipv4:" + ",".join(r.address for r in members)


# -- telling one process's PostgreSQL backends from the others' ----------------------


def _socket_owners() -> dict[int, set[int]]:
    """Socket inode -> the pids holding it, over every process this user may inspect."""
    owners: dict[int, set[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        owners.setdefault(int(target[8:-1]), set()).add(int(proc.name))
    return owners


def _tcp_port_owners() -> dict[int, set[int]]:
    """Local TCP port (IPv4 and IPv6) -> the pids holding a socket bound to it."""
    by_inode = _socket_owners()
    ports: dict[int, set[int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                port = int(fields[1].rsplit(":", 1)[1], 16)
                ports.setdefault(port, set()).update(by_inode.get(int(fields[9]), set()))
    return ports


def _unix_peer_owners() -> dict[int, set[int]]:
    """pid -> the pids at the other end of its Unix-socket connections (`ss -xp`)."""
    listing = subprocess.run(
        ["ss", "-xpn"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    owners: dict[int, set[int]] = {}
    peer_of: dict[int, int] = {}
    for line in listing.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or not fields[5].isdigit() or not fields[7].isdigit():
            continue
        inode = int(fields[5])
        peer_of[inode] = int(fields[7])
        owners[inode] = {int(p) for p in re.findall(r"pid=(\d+)", line)}
    peers: dict[int, set[int]] = {}
    for inode, peer in peer_of.items():
        for pid in owners.get(inode, set()):
            peers.setdefault(pid, set()).update(owners.get(peer, set()))
    return peers


def backend_clients(backends: dict[int, asyncpg.Record]) -> dict[int, set[int]]:
    """Backend pid -> the pids of the client processes at the other end of its connection
    (empty when none is alive: an orphan). Over TCP by client port, over a Unix socket by
    socket peer."""
    clients: dict[int, set[int]] = {pid: set() for pid in backends}
    tcp = {b for b, r in backends.items() if r["client_port"] is not None and r["client_port"] > 0}
    if tcp:
        ports = _tcp_port_owners()
        for backend in tcp:
            clients[backend] = ports.get(backends[backend]["client_port"], set()) - {backend}
    if set(backends) - tcp:
        peers = _unix_peer_owners()
        for backend in set(backends) - tcp:
            clients[backend] = peers.get(backend, set()) - {backend}
    return clients


def backends_of(pid: int, backends: dict[int, asyncpg.Record]) -> set[int]:
    """Which of the service's `backends` (pg_stat_activity rows by pid) serve process `pid`."""
    return {b for b, clients in backend_clients(backends).items() if pid in clients}
