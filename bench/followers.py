"""Many idle following sync streams on one server: pool connections, backends, memory, fan-out.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench.followers
    python -m bench.followers --followers 1000 --workspaces 10 --writes 20 --cycles 2

One run: a fresh database on DATABASE_URL's server with `bench_items` holding
`--rows` rows in each of `--workspaces` workspaces, change capture installed as
`migrate --sync-tables` does, and the service started as a process of its own
(`raptorflow-data serve`, defaults: query pool of 10). This process then, on
`--channels` channels (one HTTP/2 connection each), opens `--followers`
following Sync streams of `bench_items` spread evenly over the workspaces, each
with a token of its own (a `memory` token of its workspace, as each agent's
memory system would have; `--one-token` sends one admin token on every stream
instead, and raises the server's per-caller stream limit through
RAPTORFLOW_MAX_STREAMS_PER_CALLER).

Per cycle (`--cycles`, default 2, so memory kept by a leak shows as growth from
one cycle to the next rather than as the allocator keeping its high-water
mark):

1. `before`: the server idle, nothing open.
2. `open`: every stream has received SNAPSHOT_DONE (all opened at once, or
   `--open-batch` at a time), then left idle for `--settle` seconds.
3. `written`: `--writes` rounds, each one transaction inserting one row into
   every workspace (so one commit reaches every follower), the next round once
   every follower has its row. Commit-to-delivery is measured per follower and
   row: from the commit returning in this process to the message arriving
   here. Both ends share this process and its CPU with 1,000 streams to read,
   so the figure includes the client's own time to read 1,000 messages. Also
   the server's CPU per delivered row over the writing (from /proc), which
   does not depend on how busy the machine is; `--profile PATH` samples the
   server with py-spy meanwhile (first cycle; `bench/profile.py` sums it).
4. `closed`: every stream cancelled, then `--settle` seconds idle.

At each point, sampled every 100 ms over the settle time: the query pool as
MonitoringService.GetStatus reports it (connections in use now, most in use
seen, callers waiting), the service's backends in pg_stat_activity (its
application_name, by state), and the server's resident memory (VmRSS of
/proc/PID/status), open file descriptors and threads. The pass condition of
issue 6: idle followers hold no pool connection (in use stays at 0 to 1, the
background poll's short read), the backends stay at the pool's size plus the
server's own few, RSS stays where it is while the followers sit and receive
writes, and after closing comes back to about where the previous cycle's close
left it. (It does not drop back to `before`: CPython and malloc keep the freed
memory for the next streams rather than return it to the system.) Prints a
table; `--output` also writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import uvloop
from raptorflow.data.server.auth.tokens import mint
from raptorflow.data.server.config import Settings
from raptorflow.data.v1 import (
    memory_sync_service_pb2,
    memory_sync_service_pb2_grpc,
    monitoring_service_pb2,
    monitoring_service_pb2_grpc,
)

from bench import database, processes, profile
from bench.sync import install, percentile

pb = memory_sync_service_pb2
APPLICATION_NAME = "raptorflow-data"
# Rows the writes insert have ids from here up, clear of the filled rows.
WRITE_IDS = 100_000_000
SERVICE_BACKENDS = """
SELECT coalesce(state, '?') AS state, count(*) AS n FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1
GROUP BY 1
"""


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB, and Threads, from /proc/PID/status; plus open descriptors."""
    wanted = {"VmRSS", "VmHWM", "Threads"}
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def rss_kib(pid: int) -> int:
    return proc_status(pid)["VmRSS"]


@dataclass
class Sample:
    """The server's figures at one point of a cycle, over its settle time."""

    cycle: int
    point: str
    rss_kib: int
    hwm_kib: int
    threads: int
    fds: int
    pool_size: int
    pool_in_use_now: int
    pool_in_use_max: int
    pool_waiting_max: int
    pool_max_size: int
    backends: int
    backends_max: int
    backends_by_state: dict[str, int]
    open_streams: int


@dataclass
class Follower:
    """One following stream as this process sees it."""

    index: int
    workspace: str
    metadata: tuple[tuple[str, str], ...]
    snapshot_done: asyncio.Event = field(default_factory=asyncio.Event)
    arrivals: dict[int, float] = field(default_factory=dict)
    """Written row id -> perf_counter time its change arrived."""
    failure: str = ""


class Deliveries:
    """Counts the followers that still lack each written row; wakes the writer when none do."""

    def __init__(self) -> None:
        self.missing = 0
        self.all_arrived = asyncio.Event()

    def expect(self, count: int) -> None:
        self.missing = count
        self.all_arrived.clear()

    def arrived(self) -> None:
        self.missing -= 1
        if self.missing <= 0:
            self.all_arrived.set()


class Monitor:
    """Reads the server's pool (GetStatus), its backends (pg_stat_activity) and its memory."""

    def __init__(self, pid: int, channel: grpc.aio.Channel, db: asyncpg.Connection) -> None:
        self.pid = pid
        self._status = monitoring_service_pb2_grpc.MonitoringServiceStub(channel)
        self._db = db
        self._metadata = processes.auth_metadata()

    async def pool(self) -> monitoring_service_pb2.PoolStatus:
        response = await self._status.GetStatus(
            monitoring_service_pb2.GetStatusRequest(), metadata=self._metadata, timeout=10.0
        )
        return response.pool

    async def backends(self) -> dict[str, int]:
        rows = await self._db.fetch(SERVICE_BACKENDS, APPLICATION_NAME)
        return {r["state"]: int(r["n"]) for r in rows}

    async def sample(self, cycle: int, point: str, seconds: float, open_streams: int) -> Sample:
        """Polls every 100 ms for `seconds`; maxima over the polls, the rest at the end."""
        in_use_max = waiting_max = backends_max = 0
        deadline = time.monotonic() + seconds
        while True:
            pool = await self.pool()
            by_state = await self.backends()
            in_use_max = max(in_use_max, pool.in_use)
            waiting_max = max(waiting_max, pool.waiting)
            backends_max = max(backends_max, sum(by_state.values()))
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        status = proc_status(self.pid)
        return Sample(
            cycle=cycle,
            point=point,
            rss_kib=status["VmRSS"],
            hwm_kib=status["VmHWM"],
            threads=status["Threads"],
            fds=status["fds"],
            pool_size=pool.size,
            pool_in_use_now=pool.in_use,
            pool_in_use_max=in_use_max,
            pool_waiting_max=waiting_max,
            pool_max_size=pool.max_size,
            backends=sum(by_state.values()),
            backends_max=backends_max,
            backends_by_state=by_state,
            open_streams=open_streams,
        )


class PeakWatch:
    """Polls the pool in the background (during opening and writing): the most in use seen."""

    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor
        self.in_use = 0
        self.waiting = 0
        self.size = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                pool = await self._monitor.pool()
                self.in_use = max(self.in_use, pool.in_use)
                self.waiting = max(self.waiting, pool.waiting)
                self.size = max(self.size, pool.size)
            await asyncio.sleep(0.05)

    def __enter__(self) -> PeakWatch:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()


def follower_metadata(
    count: int, workspaces: Sequence[str], one_token: bool
) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """Each follower's workspace and call metadata."""
    settings = Settings(jwt_secret=processes.BENCH_JWT_SECRET)
    shared = processes.auth_metadata()
    out = []
    for i in range(count):
        workspace = workspaces[i % len(workspaces)]
        if one_token:
            out.append((workspace, shared))
            continue
        token = mint(
            settings,
            subject=f"bench-follower-{i}",
            roles=["memory"],
            workspaces=[workspace],
            ttl_seconds=24 * 3600,
        )
        out.append((workspace, (("authorization", f"Bearer {token}"),)))
    return out


async def follow(
    follower: Follower,
    stub: memory_sync_service_pb2_grpc.MemorySyncServiceStub,
    deliveries: Deliveries,
) -> None:
    """Reads one following stream until it is cancelled; records when written rows arrive."""
    request = pb.SyncRequest(workspace_id=follower.workspace, tables=[database.TABLE], follow=True)
    call = stub.Sync(request, metadata=follower.metadata)
    try:
        async for message in call:
            if message.event == pb.SYNC_EVENT_CHANGES:
                arrived = time.perf_counter()
                for column in message.rows.columns:
                    if column.name == "id":
                        for row_id in column.int64_values.values:
                            if row_id >= WRITE_IDS:
                                follower.arrivals[row_id] = arrived
                                deliveries.arrived()
            elif message.event == pb.SYNC_EVENT_SNAPSHOT_DONE:
                follower.snapshot_done.set()
        follower.failure = "the stream ended"
    except asyncio.CancelledError:
        call.cancel()
        raise
    except grpc.aio.AioRpcError as exc:
        follower.failure = f"{exc.code().name}: {exc.details()}"
    finally:
        follower.snapshot_done.set()  # a failed stream must not hold up the others


async def open_followers(
    followers: list[Follower],
    stubs: list[memory_sync_service_pb2_grpc.MemorySyncServiceStub],
    deliveries: Deliveries,
    batch: int,
) -> list[asyncio.Task[None]]:
    """Starts every stream, `batch` at a time (0: all at once); returns once all have their
    snapshot (or failed)."""
    tasks: list[asyncio.Task[None]] = []
    step = batch or len(followers)
    for start in range(0, len(followers), step):
        chunk = followers[start : start + step]
        for f in chunk:
            tasks.append(asyncio.create_task(follow(f, stubs[f.index % len(stubs)], deliveries)))
        await asyncio.gather(*(f.snapshot_done.wait() for f in chunk))
    return tasks


async def write_rounds(
    url: str,
    followers: list[Follower],
    workspaces: Sequence[str],
    deliveries: Deliveries,
    rounds: int,
    ids: Iterator[int],
    gap: float,
    until: asyncio.Future[Any] | None = None,
) -> tuple[list[float], list[float], int, int]:
    """`rounds` transactions of one row per workspace (more until `until` is done, when
    given); the delays, the slowest follower of each round, rows that never arrived, and
    the rounds written."""
    conn = await asyncpg.connect(url)
    delays: list[float] = []
    slowest: list[float] = []
    lost = 0
    live = [f for f in followers if not f.failure]
    try:
        r = 0
        while r < rounds or (until is not None and not until.done()):
            written = {w: next(ids) for w in workspaces}
            deliveries.expect(len(live))
            async with conn.transaction():
                await conn.executemany(
                    f"INSERT INTO {database.TABLE} (id, workspace_id, name) VALUES ($1, $2, 'w')",
                    [(row_id, uuid.UUID(w)) for w, row_id in written.items()],
                )
            committed = time.perf_counter()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(deliveries.all_arrived.wait(), 30.0)
            this_round = []
            for f in live:
                arrived = f.arrivals.get(written[f.workspace])
                if arrived is None:
                    lost += 1
                else:
                    this_round.append(arrived - committed)
            delays.extend(this_round)
            if this_round:
                slowest.append(max(this_round))
            await asyncio.sleep(gap)
            r += 1
    finally:
        await conn.close()
    return delays, slowest, lost, r


async def close_followers(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def print_samples(samples: list[Sample]) -> None:
    print(
        f"{'cycle':>5} {'point':8} {'streams':>7} {'RSS MiB':>8} {'HWM MiB':>8} "
        f"{'threads':>7} {'fds':>5} {'pool in use now/max':>19} {'waiting':>7} "
        f"{'pool size':>9} {'backends':>8}  by state"
    )
    for s in samples:
        states = ", ".join(f"{k} {v}" for k, v in sorted(s.backends_by_state.items()))
        print(
            f"{s.cycle:>5} {s.point:8} {s.open_streams:>7} {s.rss_kib / 1024:>8.1f} "
            f"{s.hwm_kib / 1024:>8.1f} {s.threads:>7} {s.fds:>5} "
            f"{s.pool_in_use_now:>9}/{s.pool_in_use_max:<9} {s.pool_waiting_max:>7} "
            f"{s.pool_size:>5}/{s.pool_max_size:<3} {s.backends:>8}  {states}"
        )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server_url = os.environ.get("DATABASE_URL")
    if not server_url:
        raise SystemExit("set DATABASE_URL to a PostgreSQL server (a database is created there)")
    workspaces = [str(uuid.uuid4()) for _ in range(args.workspaces)]
    bench_db = await database.create(server_url, 0)
    server = None
    result: dict[str, Any] = {"settings": vars(args).copy()}
    try:
        conn = await asyncpg.connect(bench_db.url)
        try:
            for n, workspace in enumerate(workspaces):
                await conn.execute(
                    f"INSERT INTO {database.TABLE} (id, workspace_id, name, score, created_at) "
                    "SELECT $1 + g, $2, 'item-' || g, g, now() FROM generate_series(1, $3) AS g",
                    n * args.rows,
                    uuid.UUID(workspace),
                    args.rows,
                )
        finally:
            await conn.close()
        await install(bench_db.url)
        if args.one_token:
            # The server is spawned with this process's environment.
            os.environ["RAPTORFLOW_MAX_STREAMS_PER_CALLER"] = str(args.followers + 100)
        plan = follower_metadata(args.followers, workspaces, args.one_token)
        with tempfile.TemporaryDirectory(prefix="raptorflow-bench-followers-") as logs:
            server = await processes.start_data_server(bench_db.url, Path(logs))
            result["server_command"] = server.command
            # A local subchannel pool gives each channel its own HTTP/2 connection.
            channels = [
                grpc.aio.insecure_channel(
                    server.address, options=[("grpc.use_local_subchannel_pool", 1)]
                )
                for _ in range(args.channels)
            ]
            watch = await asyncpg.connect(
                bench_db.url, server_settings={"application_name": "raptorflow-bench"}
            )
            try:
                monitor = Monitor(server.pid, channels[0], watch)
                stubs = [memory_sync_service_pb2_grpc.MemorySyncServiceStub(c) for c in channels]
                samples: list[Sample] = []
                cycles: list[dict[str, Any]] = []
                ids = itertools.count(WRITE_IDS)
                for cycle in range(1, args.cycles + 1):
                    cycles.append(
                        await one_cycle(
                            args,
                            cycle,
                            bench_db.url,
                            workspaces,
                            plan,
                            stubs,
                            monitor,
                            samples,
                            ids,
                        )
                    )
                    server.check_alive()
                result["samples"] = [asdict(s) for s in samples]
                result["cycles"] = cycles
            finally:
                await watch.close()
                for channel in channels:
                    await channel.close(None)
            print_samples(samples)
            print_cycles(cycles, args)
    finally:
        if server is not None:
            await server.stop()
        await database.drop(bench_db)
    return result


async def one_cycle(
    args: argparse.Namespace,
    cycle: int,
    url: str,
    workspaces: list[str],
    plan: list[tuple[str, tuple[tuple[str, str], ...]]],
    stubs: list[memory_sync_service_pb2_grpc.MemorySyncServiceStub],
    monitor: Monitor,
    samples: list[Sample],
    ids: Iterator[int],
) -> dict[str, Any]:
    samples.append(await monitor.sample(cycle, "before", args.settle, 0))
    followers = [Follower(i, w, m) for i, (w, m) in enumerate(plan)]
    deliveries = Deliveries()
    started = time.perf_counter()
    with PeakWatch(monitor) as opening:
        tasks = await open_followers(followers, stubs, deliveries, args.open_batch)
    open_seconds = time.perf_counter() - started
    failed = [f.failure for f in followers if f.failure]
    live = len(followers) - len(failed)
    samples.append(await monitor.sample(cycle, "open", args.settle, live))
    server_cpu = processes.cpu_seconds(monitor.pid)
    client_cpu = time.process_time()
    profiling = None
    if args.profile is not None and cycle == 1:
        profiling = asyncio.ensure_future(
            profile.record(monitor.pid, args.profile, args.profile_seconds)
        )
    with PeakWatch(monitor) as writing:
        delays, slowest, lost, rounds = await write_rounds(
            url,
            followers,
            workspaces,
            deliveries,
            args.writes,
            ids,
            args.write_gap,
            profiling,
        )
    if profiling is not None:
        problem = await profiling
        print(problem or profile.summarize_file(args.profile))
    server_cpu = processes.cpu_seconds(monitor.pid) - server_cpu
    client_cpu = time.process_time() - client_cpu
    failed = [f.failure for f in followers if f.failure]
    samples.append(
        await monitor.sample(cycle, "written", args.settle, len(followers) - len(failed))
    )
    await close_followers(tasks)
    samples.append(await monitor.sample(cycle, "closed", args.settle, 0))
    return {
        "cycle": cycle,
        "open_seconds": open_seconds,
        "failed_streams": len(failed),
        "first_failures": sorted(set(failed))[:5],
        "opening_pool_in_use_max": opening.in_use,
        "opening_pool_waiting_max": opening.waiting,
        "writing_pool_in_use_max": writing.in_use,
        "commits": rounds,
        "deliveries": len(delays),
        # Per delivered row, while writing (the background pool watch included).
        "server_cpu_us_per_delivery": server_cpu / max(1, len(delays)) * 1e6,
        "client_cpu_us_per_delivery": client_cpu / max(1, len(delays)) * 1e6,
        "lost": lost,
        "delay_ms": summary_ms(delays),
        "round_slowest_ms": summary_ms(slowest),
    }


def summary_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "p50": statistics.median(values) * 1000,
        "p99": percentile(values, 0.99) * 1000,
        "max": max(values) * 1000,
    }


def print_cycles(cycles: list[dict[str, Any]], args: argparse.Namespace) -> None:
    for c in cycles:
        print(
            f"cycle {c['cycle']}: {args.followers:,} followers over {args.workspaces} workspaces "
            f"opened in {c['open_seconds']:.2f} s ({c['failed_streams']} failed"
            + (f": {'; '.join(c['first_failures'])}" if c["first_failures"] else "")
            + f"); pool in use at most {c['opening_pool_in_use_max']} while opening "
            f"({c['opening_pool_waiting_max']} waiting), {c['writing_pool_in_use_max']} while "
            "writing"
        )
        d, s = c["delay_ms"], c["round_slowest_ms"]
        if d:
            print(
                f"  commit to delivery, {c['deliveries']:,} deliveries of {c['commits']} commits: "
                f"p50 {d['p50']:.1f} ms, p99 {d['p99']:.1f} ms, max {d['max']:.1f} ms; "
                f"last follower of a commit: p50 {s['p50']:.1f} ms, max {s['max']:.1f} ms; "
                f"{c['lost']} not delivered"
            )
            print(
                "  CPU per delivery while writing: "
                f"server {c['server_cpu_us_per_delivery']:.0f} us, "
                f"this process (reading every stream) {c['client_cpu_us_per_delivery']:.0f} us"
            )


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.followers", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--followers", type=int, default=1000)
    parser.add_argument("--workspaces", type=int, default=10)
    parser.add_argument("--rows", type=int, default=10, help="snapshot rows per workspace (10)")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--writes", type=int, default=20, help="write rounds per cycle (20)")
    parser.add_argument("--write-gap", type=float, default=0.05, help="seconds between rounds")
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument(
        "--open-batch", type=int, default=0, help="streams opened at a time (0: all at once)"
    )
    parser.add_argument(
        "--settle", type=float, default=3.5, help="seconds of sampling at each point (3.5)"
    )
    parser.add_argument(
        "--one-token",
        action="store_true",
        help="one admin token for every stream (raises the server's per-caller limit)",
    )
    parser.add_argument("--quick", action="store_true", help="200 followers, 5 writes, 1 s settle")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy the server during the first cycle's writes (collapsed stacks to PATH)",
    )
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument("--output", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.followers, args.writes, args.settle = 200, 5, 1.0
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run(args))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
