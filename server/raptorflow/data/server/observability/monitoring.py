"""The status view of one replica: pool, latency window, slow queries, held connections.

`Monitoring` gathers what GetStatus answers and what the metrics endpoint
exports: the RPC interceptor's per-method figures (`interceptor.py`), the
query pool's figures and holds (`Database`), the slow statements, the leak
watchdog's count, the latest database check and the schedules. It owns the
watchdog task and, when `metrics_listen` is set, the Prometheus endpoint.
GetStatus reads figures already in memory (the database check runs in the
background), so it answers even while the database is down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import grpc
from prometheus_client import CollectorRegistry
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.connections import Database
from raptorflow.data.server.observability.interceptor import LogPolicy, RpcLog, RpcObserver
from raptorflow.data.server.observability.latency import SliceClock, WindowedPeak
from raptorflow.data.server.observability.leaks import LeakWatchdog, check_interval
from raptorflow.data.server.observability.metrics import (
    LoopCollector,
    MetricsEndpoint,
    MetricsSnapshot,
    RpcSeries,
)
from raptorflow.data.server.observability.slow_queries import SlowQueries
from raptorflow.data.server.tasks import cancel_and_wait
from raptorflow.data.v1 import job_pb2, monitoring_service_pb2

log = logging.getLogger(__name__)

UTILIZATION_TARGET = 0.8
_FINAL_STATES = ("succeeded", "failed", "cancelled")


class Monitoring:
    """Collects what GetStatus and the metrics endpoint report; owns the leak watchdog."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        replica_id: str,
        schedules: Callable[[], Awaitable[list[job_pb2.Schedule]]],
    ) -> None:
        self._settings = settings
        self._database = database
        self.replica_id = replica_id
        self._schedules = schedules
        clock = SliceClock(settings.latency_window_seconds)
        self._clock = clock
        self.rpcs = RpcObserver(
            clock, LogPolicy(RpcLog(settings.rpc_log), settings.slow_query_seconds)
        )
        """The interceptor that measures every call; `build_server` installs it."""
        self.slow_queries = SlowQueries(settings.latency_window_seconds)
        self.watchdog = LeakWatchdog(database, settings.leak_seconds)
        self._peak_in_use = WindowedPeak(clock)
        self._jobs: dict[tuple[str, str], int] = {}
        self._scheduled_jobs: dict[tuple[str, str], int] = {}
        self.health: Callable[[], dict[str, bool]] = dict
        """Whether each health name is SERVING now; `app.start` points it at the health
        servicer."""
        self.registry = CollectorRegistry(auto_describe=False)
        """This replica's own metrics (never the process-wide default registry)."""
        self._endpoint: MetricsEndpoint | None = None
        self._watching: asyncio.Task[None] | None = None

    @property
    def interceptor(self) -> grpc.aio.ServerInterceptor:  # type: ignore[type-arg]
        return self.rpcs

    @property
    def metrics_port(self) -> int | None:
        """The bound port of the metrics endpoint; None when metrics are off."""
        return self._endpoint.port if self._endpoint is not None else None

    async def start(self) -> None:
        """Starts the watchdog (and the metrics endpoint when configured)."""
        self._database.on_slow_query = self.slow_queries.add
        self._watching = asyncio.create_task(self._watch_forever(), name="leak-watchdog")
        if self._settings.metrics_listen:
            self.registry.register(LoopCollector(asyncio.get_running_loop(), self.metrics_snapshot))
            self._endpoint = MetricsEndpoint.start(self._settings.metrics_listen, self.registry)
            log.info("metrics on http://%s:%d/metrics", *self._metrics_host_port())

    async def close(self) -> None:
        """Stops the watchdog and the metrics endpoint."""
        watching, self._watching = self._watching, None
        await cancel_and_wait([watching])
        if self._endpoint is not None:
            await self._endpoint.stop()
            self._endpoint = None
        self._database.on_slow_query = None

    def record_job(self, kind: str, state: str | int) -> None:
        """Counts one job that ended (for raptorflow_jobs_total{kind,state}).

        `kind` is the JobSpec's `kind` oneof case ("vacuum", "backup_to_file"...);
        `state` its final JobState, as the enum value or its name.
        """
        key = (kind, _state_label(state))
        self._jobs[key] = self._jobs.get(key, 0) + 1

    def expect_schedules(self, names: Iterable[str]) -> None:
        """Exports raptorflow_scheduled_jobs_total at 0 for each configured schedule and final
        state from the start: Prometheus' increase() cannot see a series' first increment,
        so a schedule whose first run fails would otherwise never lower the success ratio."""
        for name in names:
            for state in _FINAL_STATES:
                self._scheduled_jobs.setdefault((name, state), 0)

    def record_scheduled_job(self, schedule: str, state: str | int) -> None:
        """Counts one job a schedule started that ended (raptorflow_scheduled_jobs_total)."""
        key = (schedule, _state_label(state))
        self._scheduled_jobs[key] = self._scheduled_jobs.get(key, 0) + 1

    def _metrics_host_port(self) -> tuple[str, int]:
        host = self._settings.metrics_listen.rpartition(":")[0] or "0.0.0.0"
        return host, self.metrics_port or 0

    async def _watch_forever(self) -> None:
        # Also samples the pool's peak, often enough for each slice of the window.
        interval = min(check_interval(self._settings.leak_seconds), self._clock.slice_seconds)
        interval = max(interval, 0.2)
        while True:
            await asyncio.sleep(interval)
            self._sample_peak()
            try:
                await self.watchdog.reclaim_once()
            except Exception as exc:  # the watchdog must outlive any one failure
                log.warning("leak watchdog failed: %s", exc or type(exc).__name__)

    def _sample_peak(self) -> float:
        """The window's highest pool utilization, counting the peak since the last sample."""
        now = time.perf_counter()
        self._peak_in_use.add(self._database.take_peak_in_use(), now)
        return self._peak_in_use.peak(now)

    async def status(self) -> monitoring_service_pb2.GetStatusResponse:
        pb = monitoring_service_pb2
        response = pb.GetStatusResponse(
            replica=self.replica_id, reclaimed_connection_count=self.watchdog.reclaimed
        )
        response.status_time.GetCurrentTime()
        self._pool_status(response.pool)
        now = time.perf_counter()
        window = self._settings.latency_window_seconds
        for method, calls in sorted(self.rpcs.methods.items()):
            summary = calls.window.summary(now)
            if summary is not None:
                response.methods.append(
                    pb.MethodLatency(
                        method=method,
                        count=summary.count,
                        error_count=summary.errors,
                        p50_ms=summary.p50 * 1000,
                        p90_ms=summary.p90 * 1000,
                        p99_ms=summary.p99 * 1000,
                        max_ms=summary.max * 1000,
                        window_seconds=window,
                    )
                )
        for slow in self.slow_queries.slowest():
            entry = response.slow_queries.add(
                statement=slow.statement,
                method=slow.caller,
                duration_ms=slow.seconds * 1000,
                sqlstate=slow.sqlstate,
            )
            entry.end_time.FromNanoseconds(int(slow.end_time * 1e9))
        for hold in self._database.holds_over(self._settings.leak_seconds):
            held = response.held_connections.add(
                holder=hold.holder, held_seconds=hold.held_seconds(), backend_pid=hold.backend_pid()
            )
            held.acquire_time.FromNanoseconds(int(hold.acquire_time() * 1e9))
        check = self._database.last_check
        if check is not None:
            response.database.reachable = check.reachable
            response.database.server_version = check.server_version
            response.database.check_latency_ms = check.seconds * 1000
            response.database.check_time.FromNanoseconds(int(check.check_time * 1e9))
        response.schedules.extend(await self._schedule_status())
        return response

    def _pool_status(self, pool: monitoring_service_pb2.PoolStatus) -> None:
        pool.utilization_target = UTILIZATION_TARGET
        snapshot = self._database.pool_snapshot()
        peak_in_use = self._sample_peak()
        if snapshot is None:
            return
        pool.size = snapshot.size
        pool.in_use = snapshot.in_use
        pool.idle = snapshot.idle
        pool.waiting = snapshot.waiting
        pool.max_size = snapshot.max_size
        if snapshot.max_size:
            pool.utilization = snapshot.in_use / snapshot.max_size
            pool.peak_utilization = max(peak_in_use / snapshot.max_size, pool.utilization)

    async def _schedule_status(self) -> list[job_pb2.Schedule]:
        # The schedules come from the job table: bounded, and never a reason to fail.
        try:
            async with asyncio.timeout(self._settings.health_timeout):
                return await self._schedules()
        except Exception as exc:
            log.warning("status without schedules: %s", exc or type(exc).__name__)
            return []

    def metrics_snapshot(self) -> MetricsSnapshot:
        """Every exported figure now (run on the event loop)."""
        rpcs = [
            RpcSeries(method, code.name, tuple(counts.buckets), counts.seconds)
            for method, calls in self.rpcs.methods.items()
            for code, counts in calls.by_code.items()
        ]
        return MetricsSnapshot(
            rpcs=rpcs,
            pool=self._database.pool_snapshot(),
            held_over_limit=len(self._database.holds_over(self._settings.leak_seconds)),
            reclaimed=self.watchdog.reclaimed,
            slow_queries=self.slow_queries.total,
            check=self._database.last_check,
            jobs=dict(self._jobs),
            scheduled_jobs=dict(self._scheduled_jobs),
            health=self.health(),
        )


def _state_label(state: str | int) -> str:
    """A JobState (the enum value or its name) as a label value: "succeeded", "failed"..."""
    name = job_pb2.JobState.Name(state) if isinstance(state, int) else state  # type: ignore[arg-type]
    return name.removeprefix("JOB_STATE_").lower()
