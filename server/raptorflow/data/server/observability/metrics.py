"""Prometheus metrics of one replica on an HTTP port (prometheus-client), collected when scraped.

Off unless `metrics_listen` is set. Alert rules are written against these
names and labels; change them only together with the rules.

    raptorflow_rpc_total{method,code}               counter
        RPCs ended, by full method name ("/raptorflow.data.v1.WorkspaceService/Select")
        and status code name ("OK", "INVALID_ARGUMENT", ...)
    raptorflow_rpc_duration_seconds{method,code}    histogram
        their durations in seconds (a stream's: until it ends)
    raptorflow_pool_size, raptorflow_pool_in_use, raptorflow_pool_idle,
    raptorflow_pool_waiting, raptorflow_pool_max_size    gauges
        query-pool connections open, handed out, not handed out; calls waiting
        for one; the most the pool opens
    raptorflow_pool_utilization                     gauge
        in_use / max_size, 0 to 1 (target: under 0.8)
    raptorflow_pool_held_over_limit                 gauge
        connections held longer than leak_seconds now (target: 0)
    raptorflow_pool_reclaimed_connections_total     counter
        connections the leak watchdog reclaimed
    raptorflow_slow_queries_total                   counter
        statements that ran at least slow_query_seconds
    raptorflow_database_up                          gauge
        1 if the latest database check succeeded, else 0
    raptorflow_database_check_latency_seconds       gauge
        how long the latest database check took
    raptorflow_jobs_total{kind,state}               counter
        maintenance jobs ended, by kind ("vacuum", "backup_to_file", ...) and final
        state ("succeeded", "failed", "cancelled")
    raptorflow_scheduled_jobs_total{schedule,state} counter
        the jobs of those that a schedule started, by schedule name and final state
        (manual StartJob runs are not in it; target: over 0.95 succeeded)
    raptorflow_health_serving{service}              gauge
        1 while the grpc.health.v1 name ("", "readiness", each service's) is SERVING,
        else 0

The registry is one per server (tests run several in one process). Figures are
read on the event loop thread (the HTTP server runs in a thread of its own), so
a scrape never sees a half-updated figure; a scrape of a loop that does not
answer within `SNAPSHOT_TIMEOUT` gets no samples.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from raptorflow.data.server.db.activity import DatabaseCheck, PoolSnapshot
from raptorflow.data.server.observability.interceptor import DURATION_BOUNDS

log = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT = 5.0


@dataclass(frozen=True)
class RpcSeries:
    """One method and status code: bucket counts (not cumulative, +Inf last) and their sum."""

    method: str
    code: str
    buckets: tuple[int, ...]
    seconds: float


@dataclass(frozen=True)
class MetricsSnapshot:
    """Every figure of one scrape, taken at once on the event loop."""

    rpcs: list[RpcSeries] = field(default_factory=list)
    pool: PoolSnapshot | None = None
    held_over_limit: int = 0
    reclaimed: int = 0
    slow_queries: int = 0
    check: DatabaseCheck | None = None
    jobs: dict[tuple[str, str], int] = field(default_factory=dict)
    scheduled_jobs: dict[tuple[str, str], int] = field(default_factory=dict)
    """Ended jobs started by a schedule, by (schedule name, final state)."""
    health: dict[str, bool] = field(default_factory=dict)
    """Whether each health name is SERVING."""


def families(snapshot: MetricsSnapshot) -> list[Metric]:
    """The metric families of one snapshot."""
    rpc_total = CounterMetricFamily(
        "raptorflow_rpc", "RPCs ended, by method and status code.", labels=["method", "code"]
    )
    rpc_duration = HistogramMetricFamily(
        "raptorflow_rpc_duration_seconds",
        "RPC durations in seconds (streams: until they end), by method and status code.",
        labels=["method", "code"],
    )
    edges = [*(repr(b) for b in DURATION_BOUNDS), "+Inf"]
    for series in snapshot.rpcs:
        cumulative, running = [], 0
        for edge, count in zip(edges, series.buckets, strict=True):
            running += count
            cumulative.append((edge, float(running)))
        labels = [series.method, series.code]
        rpc_total.add_metric(labels, float(running))
        rpc_duration.add_metric(labels, cumulative, series.seconds)
    metrics: list[Metric] = [rpc_total, rpc_duration]
    pool = snapshot.pool
    if pool is not None:
        for name, value, text in (
            ("size", pool.size, "Query-pool connections open."),
            ("in_use", pool.in_use, "Query-pool connections handed out to calls."),
            ("idle", pool.idle, "Query-pool connections open and not handed out."),
            ("waiting", pool.waiting, "Calls waiting for a query-pool connection."),
            ("max_size", pool.max_size, "The most connections the query pool opens."),
        ):
            metrics.append(GaugeMetricFamily(f"raptorflow_pool_{name}", text, value=value))
        metrics.append(
            GaugeMetricFamily(
                "raptorflow_pool_utilization",
                "Query-pool connections in use over the pool's maximum size (target: under 0.8).",
                value=pool.in_use / pool.max_size if pool.max_size else 0.0,
            )
        )
    metrics += [
        GaugeMetricFamily(
            "raptorflow_pool_held_over_limit",
            "Query-pool connections held longer than the leak limit now (target: 0).",
            value=snapshot.held_over_limit,
        ),
        CounterMetricFamily(
            "raptorflow_pool_reclaimed_connections",
            "Query-pool connections the leak watchdog reclaimed.",
            value=snapshot.reclaimed,
        ),
        CounterMetricFamily(
            "raptorflow_slow_queries",
            "Statements that ran at least the slow-query threshold.",
            value=snapshot.slow_queries,
        ),
    ]
    check = snapshot.check
    if check is not None:
        metrics += [
            GaugeMetricFamily(
                "raptorflow_database_up",
                "1 if the latest database check succeeded, else 0.",
                value=1.0 if check.reachable else 0.0,
            ),
            GaugeMetricFamily(
                "raptorflow_database_check_latency_seconds",
                "How long the latest database check took, in seconds.",
                value=check.seconds,
            ),
        ]
    jobs = CounterMetricFamily(
        "raptorflow_jobs", "Maintenance jobs ended, by kind and state.", labels=["kind", "state"]
    )
    for (kind, state), count in sorted(snapshot.jobs.items()):
        jobs.add_metric([kind, state], float(count))
    metrics.append(jobs)
    scheduled = CounterMetricFamily(
        "raptorflow_scheduled_jobs",
        "Maintenance jobs started by a schedule that ended, by schedule and state.",
        labels=["schedule", "state"],
    )
    for (schedule, state), count in sorted(snapshot.scheduled_jobs.items()):
        scheduled.add_metric([schedule, state], float(count))
    metrics.append(scheduled)
    health = GaugeMetricFamily(
        "raptorflow_health_serving",
        "1 while the grpc.health.v1 service name is SERVING, else 0.",
        labels=["service"],
    )
    for service, serving in sorted(snapshot.health.items()):
        health.add_metric([service], 1.0 if serving else 0.0)
    metrics.append(health)
    return metrics


class LoopCollector:
    """A prometheus-client collector that takes its snapshot on the event loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, take: Callable[[], MetricsSnapshot]
    ) -> None:
        self._loop = loop
        self._take = take

    def collect(self) -> Iterable[Metric]:
        future: concurrent.futures.Future[MetricsSnapshot] = concurrent.futures.Future()

        def take() -> None:
            try:
                future.set_result(self._take())
            except Exception as exc:
                future.set_exception(exc)

        try:
            self._loop.call_soon_threadsafe(take)
            snapshot = future.result(timeout=SNAPSHOT_TIMEOUT)
        except (RuntimeError, TimeoutError) as exc:  # the loop is closed or does not answer
            log.warning("metrics scrape without figures: %s", exc or type(exc).__name__)
            return []
        return families(snapshot)


class MetricsEndpoint:
    """The HTTP endpoint serving one registry, in a thread of its own."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_port

    @classmethod
    def start(cls, listen: str, registry: CollectorRegistry) -> MetricsEndpoint:
        """Binds HOST:PORT (port 0 picks a free port) and serves /metrics."""
        host, separator, port = listen.rpartition(":")
        if not separator or not port.isdigit():
            raise SystemExit(f"invalid RAPTORFLOW_METRICS_LISTEN {listen!r}: expected HOST:PORT")
        server, thread = start_http_server(
            int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry
        )
        return cls(server, thread)

    async def stop(self) -> None:
        # shutdown() waits for serve_forever's poll (up to 0.5 s): off the loop.
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)
