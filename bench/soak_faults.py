"""The soak's replicas, the faults it injects into them, and the checks that each healed.

A replica is a `raptorflow-data serve` process on a fixed port (a restart comes
back on the same address, so the client's round_robin channel finds it again)
whose database connections go through a TCP proxy of its own (`bench/tcp_proxy.py`,
a process of its own). Faults, in rotation:

    cut        both proxies cut: the database is gone for every replica, then back
    terminate  pg_terminate_backend of every backend of the service, mid-query
    restart    one replica SIGTERMed (it must exit 0), then started again
    cancel     a burst of calls cancelled or timed out at random moments

After each: every replica's readiness is SERVING again (the time that took is
the fault's time to heal), then, with the load held and nothing in flight, no
query of the service runs in pg_stat_activity, every pool connection is idle
and no connection is held past the leak limit or was reclaimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench import processes
from bench.soak_load import Ledger, Load

READINESS = "readiness"
APPLICATION_NAME = "raptorflow-data"
QUICK_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
SETTLE_SECONDS = 10.0
"""After a fault, with the load held, how long the service may take until no query runs
and every pool connection is idle (the heal check keeps polling for 30 s to measure it)."""
DRAIN_SECONDS = 0.5
GRACE_SECONDS = 5.0
# Service backends doing something other than waiting for their next statement.
BUSY_BACKENDS = """
SELECT pid, state, backend_type, now() - query_start AS running, left(query, 160) AS query
FROM pg_stat_activity
WHERE datname = $1 AND application_name = $2 AND pid <> pg_backend_pid()
  AND state IS DISTINCT FROM 'idle'
"""
SERVICE_BACKENDS = """
SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2
"""
TERMINATE = """
SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = $1 AND application_name = $2 AND pid <> pg_backend_pid()
"""


class ProxyProcess:
    """`python -m bench.tcp_proxy`: one proxy per replica, driven over stdin."""

    def __init__(self, process: asyncio.subprocess.Process, ports: list[int]) -> None:
        self._process = process
        self.ports = ports
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, database_url: str, count: int, log: Path) -> ProxyProcess:
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.tcp_proxy",
                "--database-url",
                database_url,
                "--count",
                str(count),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30.0)
        if not line:
            text = await asyncio.to_thread(log.read_text)
            raise RuntimeError(f"the TCP proxy did not start:\n{text}")
        return cls(process, json.loads(line)["ports"])

    async def command(self, text: str) -> dict[str, Any]:
        async with self._lock:
            assert self._process.stdin is not None
            assert self._process.stdout is not None
            self._process.stdin.write(text.encode() + b"\n")
            await self._process.stdin.drain()
            line = await asyncio.wait_for(self._process.stdout.readline(), 30.0)
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"proxy command {text!r}: {answer}")
        return answer

    def url(self, database_url: str, index: int) -> str:
        """`database_url` pointed at proxy `index` (same user, database and options)."""
        parts = urllib.parse.urlsplit(database_url)
        userinfo = parts.netloc.rpartition("@")[0]
        host = f"127.0.0.1:{self.ports[index]}"
        query = [
            (k, v)
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            if k not in {"host", "port"}
        ]
        return urllib.parse.urlunsplit(
            parts._replace(
                netloc=f"{userinfo}@{host}" if userinfo else host,
                query=urllib.parse.urlencode(query),
            )
        )

    async def stop(self) -> None:
        if self._process.returncode is None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            try:
                await asyncio.wait_for(self._process.wait(), 10.0)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()


@dataclass
class Instance:
    """One process of a replica (a restart makes a new one)."""

    replica: int
    pid: int
    started_at: float
    rss_start_mib: float = 0.0
    rss_max_mib: float = 0.0
    rss_end_mib: float = 0.0
    exit_status: int | None = None
    stop_seconds: float | None = None
    server_statuses: dict[str, int] = field(default_factory=dict)
    """RPCs ended, by status code, from its metrics (last scrape)."""
    reclaimed: int = 0
    held_over_limit_max: int = 0


@dataclass
class Metrics:
    pool_size: int = 0
    pool_in_use: int = 0
    pool_idle: int = 0
    pool_waiting: int = 0
    held_over_limit: int = 0
    reclaimed: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


class Replica:
    """One replica: its address, metrics port and proxy, and its current process."""

    def __init__(
        self, index: int, database_url: str, token_key: str, log_dir: Path, extra: Sequence[str]
    ) -> None:
        self.index = index
        self.address = f"127.0.0.1:{processes.free_port()}"
        self.metrics_port = processes.free_port()
        self.database_url = database_url
        self.token_key = token_key
        self.log_dir = log_dir
        self.extra = list(extra)
        self.server: processes.ServerProcess | None = None
        self.instances: list[Instance] = []
        self._channel = grpc.aio.insecure_channel(self.address, options=QUICK_RECONNECT)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def instance(self) -> Instance:
        return self.instances[-1]

    async def start(self) -> None:
        command = processes.serve_command(
            self.address,
            self.database_url,
            [
                "--token-key",
                self.token_key,
                "--metrics-listen",
                f"127.0.0.1:{self.metrics_port}",
                "--health-interval",
                "1.0",
                "--shutdown-drain-seconds",
                str(DRAIN_SECONDS),
                "--shutdown-grace-seconds",
                str(GRACE_SECONDS),
                "--max-streams-per-caller",
                "1000",
                *self.extra,
            ],
        )
        environment = {
            k: v
            for k, v in os.environ.items()
            if k != "DATABASE_URL" and not k.startswith("RAPTORFLOW_")
        }
        log = self.log_dir / f"replica-{self.index}-{len(self.instances)}.log"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.DEVNULL, stderr=stderr, env=environment
            )
        self.server = processes.ServerProcess(
            f"replica-{self.index}", process, log, self.address, command
        )
        self.instances.append(Instance(self.index, process.pid, time.monotonic()))
        await processes.wait_serving(self.server, processes.WORKSPACE_SERVICE)
        rss = self.rss_mib()
        self.instance.rss_start_mib = self.instance.rss_max_mib = rss

    async def stop(self, *, within: float = DRAIN_SECONDS + GRACE_SECONDS + 30.0) -> int | None:
        """SIGTERM; waits for the exit; its status (None if it had to be killed)."""
        if self.server is None:
            return None
        process = self.server.process
        with contextlib.suppress(Exception):
            await self.scrape()
        self.instance.rss_end_mib = self.rss_mib() or self.instance.rss_end_mib
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            status: int | None = await asyncio.wait_for(process.wait(), within)
        except TimeoutError:
            process.kill()
            await process.wait()
            status = None
        self.instance.exit_status = status
        self.instance.stop_seconds = time.monotonic() - started
        self.server = None
        return status

    def rss_mib(self) -> float:
        if self.server is None or self.server.process.returncode is not None:
            return 0.0
        try:
            return psutil.Process(self.server.pid).memory_info().rss / 2**20
        except psutil.Error:
            return 0.0

    def sample_rss(self) -> None:
        rss = self.rss_mib()
        if rss:
            self.instance.rss_max_mib = max(self.instance.rss_max_mib, rss)
            self.instance.rss_end_mib = rss

    async def readiness(self, within: float = 1.0) -> int:
        """The readiness status (a HealthCheckResponse.ServingStatus), or -1 if no answer."""
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=READINESS), timeout=within
            )
            return int(response.status)
        except grpc.aio.AioRpcError:
            return -1

    async def scrape(self) -> Metrics:
        """Its Prometheus metrics now; also keeps the instance's counters up to date."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"

        def fetch() -> str:
            with urllib.request.urlopen(url, timeout=10.0) as response:
                return str(response.read().decode())

        text = await asyncio.to_thread(fetch)
        metrics = Metrics()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name, value = sample.name, sample.value
                if name == "raptorflow_rpc_total":
                    code = sample.labels["code"]
                    metrics.statuses[code] = metrics.statuses.get(code, 0) + int(value)
                elif name == "raptorflow_pool_reclaimed_connections_total":
                    metrics.reclaimed = int(value)
                elif name.startswith("raptorflow_pool_") and hasattr(
                    metrics, name.removeprefix("raptorflow_")
                ):
                    setattr(metrics, name.removeprefix("raptorflow_"), int(value))
        instance = self.instance
        instance.server_statuses = metrics.statuses
        instance.reclaimed = metrics.reclaimed
        instance.held_over_limit_max = max(instance.held_over_limit_max, metrics.held_over_limit)
        return metrics

    async def close(self) -> None:
        await self._channel.close()


async def wait_readiness(
    replicas: Sequence[Replica], wanted: int, within: float
) -> dict[int, float | None]:
    """Seconds until each replica's readiness is `wanted` (polled every 50 ms), None if not
    within `within`."""
    started = time.monotonic()
    reached: dict[int, float | None] = {r.index: None for r in replicas}
    while time.monotonic() - started < within:
        pending = [r for r in replicas if reached[r.index] is None]
        if not pending:
            break
        statuses = await asyncio.gather(*(r.readiness() for r in pending))
        for replica, status in zip(pending, statuses, strict=True):
            if status == wanted:
                reached[replica.index] = time.monotonic() - started
        await asyncio.sleep(0.05)
    return reached


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class HealCheck:
    """What the check after a fault found, with the load held."""

    quiesced: bool = False
    quiesce_seconds: float = 0.0
    clean_after_seconds: float | None = None
    """Seconds until no query ran and every pool was idle; None if that never happened."""
    busy_backends: list[str] = field(default_factory=list)
    """What was still running when the check gave up."""
    first_seen: list[str] = field(default_factory=list)
    """What kept the check from passing at once: busy backends, pools not idle."""
    pools: dict[int, dict[str, int]] = field(default_factory=dict)
    backends: int = 0


async def heal_check(
    ledger: Ledger,
    replicas: Sequence[Replica],
    admin: asyncpg.Connection,
    database: str,
    within: float = 30.0,
) -> HealCheck:
    """Holds the load, waits for calls in flight, then polls until no query of the service
    runs and every pool connection is idle; resumes the load."""
    result = HealCheck()
    started = time.monotonic()
    try:
        result.quiesced = await ledger.quiesce(60.0)
        result.quiesce_seconds = time.monotonic() - started
        polling = time.monotonic()
        while True:
            busy = await admin.fetch(BUSY_BACKENDS, database, APPLICATION_NAME)
            pools = {r.index: await r.scrape() for r in replicas}
            idle = all(
                m.pool_in_use == 0
                and m.pool_waiting == 0
                and m.pool_idle == m.pool_size
                and m.held_over_limit == 0
                for m in pools.values()
            )
            result.pools = {
                i: {
                    "size": m.pool_size,
                    "in_use": m.pool_in_use,
                    "idle": m.pool_idle,
                    "waiting": m.pool_waiting,
                    "held_over_limit": m.held_over_limit,
                    "reclaimed": m.reclaimed,
                }
                for i, m in pools.items()
            }
            if not busy and idle:
                result.clean_after_seconds = time.monotonic() - polling
                break
            if not result.first_seen:
                result.first_seen = [
                    f"pid {r['pid']} {r['state']} for {r['running']}: {r['query']}" for r in busy
                ] + [f"replica {i}: pool {p}" for i, p in result.pools.items()]
            if time.monotonic() - polling > within:
                result.busy_backends = [
                    f"pid {r['pid']} {r['state']} for {r['running']}: {r['query']}" for r in busy
                ]
                break
            await asyncio.sleep(0.1)
        result.backends = int(await admin.fetchval(SERVICE_BACKENDS, database, APPLICATION_NAME))
    finally:
        ledger.resume()
    return result


@dataclass
class FaultRecord:
    kind: str
    at_seconds: float
    """When it started, seconds into the run."""
    target: str = "all"
    outage_seconds: float = 0.0
    """How long the fault itself lasted (the cut, the stop and restart, the burst)."""
    not_serving_after: dict[int, float | None] = field(default_factory=dict)
    """Seconds from the cut until each replica's readiness said NOT_SERVING."""
    serving_after: dict[int, float | None] = field(default_factory=dict)
    """Seconds from the fault's end until each replica's readiness was SERVING again."""
    heal_seconds: float | None = None
    """The time to heal: from the fault's end (the database back, the burst over) until
    every replica was SERVING; for a restart, from the SIGTERM."""
    detail: dict[str, Any] = field(default_factory=dict)
    check: HealCheck | None = None
    ended_at_seconds: float = 0.0

    @property
    def healed(self) -> bool:
        check = self.check
        return (
            self.heal_seconds is not None
            and check is not None
            and check.quiesced
            and check.clean_after_seconds is not None
            and check.clean_after_seconds <= SETTLE_SECONDS
        )


class Faults:
    """Injects the faults in rotation and records each with its heal check."""

    KINDS = ("cut", "terminate", "restart", "cancel")

    def __init__(
        self,
        replicas: Sequence[Replica],
        proxy: ProxyProcess,
        admin: asyncpg.Connection,
        database: str,
        load: Load,
        *,
        cut_seconds: float,
        heal_within: float,
        run_started: float,
    ) -> None:
        self.replicas = list(replicas)
        self.proxy = proxy
        self.admin = admin
        self.database = database
        self.load = load
        self.cut_seconds = cut_seconds
        self.heal_within = heal_within
        self.run_started = run_started
        self.records: list[FaultRecord] = []
        self.windows: list[tuple[float, float]] = []
        """(start, end) monotonic times of every fault, end after its heal check."""
        self._restarts = 0

    async def inject(self, kind: str, *, cancels: int = 0) -> FaultRecord:
        started = time.monotonic()
        record = FaultRecord(kind, started - self.run_started)
        self.records.append(record)
        try:
            if kind == "cut":
                await self._cut(record)
            elif kind == "terminate":
                await self._terminate(record)
            elif kind == "restart":
                await self._restart(record)
            elif kind == "cancel":
                await self._cancel(record, cancels)
            else:
                raise ValueError(kind)
            fault_ended = time.monotonic()
            record.outage_seconds = fault_ended - started
            record.serving_after = await wait_readiness(self.replicas, SERVING, self.heal_within)
            if all(v is not None for v in record.serving_after.values()):
                record.heal_seconds = max(v or 0.0 for v in record.serving_after.values())
                if kind == "restart":
                    # The restarted replica was down from SIGTERM until it served again.
                    record.heal_seconds += record.outage_seconds
            record.check = await heal_check(
                self.load.ledger, self.replicas, self.admin, self.database
            )
        finally:
            ended = time.monotonic()
            record.ended_at_seconds = ended - self.run_started
            self.windows.append((started, ended))
        return record

    async def _cut(self, record: FaultRecord) -> None:
        await self.proxy.command("cut all")
        try:
            record.not_serving_after = await wait_readiness(
                self.replicas, NOT_SERVING, self.cut_seconds + 10.0
            )
            remaining = self.cut_seconds - (time.monotonic() - self.run_started - record.at_seconds)
            if remaining > 0:
                await asyncio.sleep(remaining)
        finally:
            await self.proxy.command("restore all")

    async def _terminate(self, record: FaultRecord) -> None:
        killed = await self.admin.fetchval(TERMINATE, self.database, APPLICATION_NAME)
        record.detail["backends_terminated"] = int(killed)

    async def _restart(self, record: FaultRecord) -> None:
        replica = self.replicas[self._restarts % len(self.replicas)]
        self._restarts += 1
        record.target = f"replica {replica.index}"
        stopping = time.monotonic()
        status = await replica.stop()
        record.detail["exit_status"] = status
        record.detail["stop_seconds"] = round(time.monotonic() - stopping, 3)
        record.detail["connections_left_after_exit"] = await self.connections_left([replica])
        await replica.start()

    async def connections_left(self, stopped: Sequence[Replica], within: float = 10.0) -> int:
        """Connections still open through the proxies of replicas that exited (polled: the
        proxy sees a closed socket a moment later); 0 when each process closed all of its."""
        deadline = time.monotonic() + within
        while True:
            stats = await self.proxy.command("stats")
            left = sum(stats["open"][r.index] for r in stopped)
            if not left or time.monotonic() > deadline:
                return int(left)
            await asyncio.sleep(0.1)

    async def _cancel(self, record: FaultRecord, count: int) -> None:
        before = sum(self.load.ledger.cancels.values())
        outcomes_before = dict(self.load.ledger.cancels)
        await self.load.cancel_burst(count)
        record.detail["calls"] = sum(self.load.ledger.cancels.values()) - before
        record.detail["outcomes"] = {
            k: v - outcomes_before.get(k, 0)
            for k, v in self.load.ledger.cancels.items()
            if v - outcomes_before.get(k, 0)
        }
