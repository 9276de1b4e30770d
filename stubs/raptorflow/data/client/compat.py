"""The old integration layer's names, for RaptorFlow code written before the data service.

RaptorFlow's jobs, health checks and memory sync call ``get_database_service()``,
``check_database_health()``, ``DatabaseConnection()``... of ``backend/core``. This
module keeps those names and their shapes (plain dicts) on top of `DataClient`, so
such code moves by changing its imports. Each docstring says what to call instead:

- ``get_database_service()``: a `DataClient`, ``.maintenance`` and ``.monitoring``;
- ``get_database_integration().get_system_status()``, ``get_database_monitor()
  .get_current_status()`` and ``check_database_health()``:
  ``client.monitoring.get_status()``;
- ``DatabaseConnection().table(t).select("*")``: ``client.workspace(ws).table(t).select()``;
- ``sync_database_to_memory(ws, controller)``: ``client.memory.sync(ws, tables=...)``;
- ``backup_database()``: ``client.maintenance.backup_to_file()``, then ``wait_job()``.

Configuration. The old code calls these without arguments, so they read the
environment at each call (or what `configure()` set):

- ``RAPTORFLOW_DATA_TARGET``: the server, "host:port" or any gRPC target
  (default "127.0.0.1:50051", the server's default address);
- ``RAPTORFLOW_DATA_TIMEOUT``: seconds per call (default 10; above 0, at most
  100 years);
- ``RAPTORFLOW_DATA_TOKEN``: the bearer token (a JWT) sent on every call. It is
  fixed: a job waited for (``backup_database()``, ``vacuum_database()``...)
  that outlives it raises `Unauthenticated` (TOKEN_EXPIRED), although the job
  goes on. ``configure(ClientConfig(target, token=function))`` instead fetches
  a fresh token for every call, and waits then outlive any one token;
- ``RAPTORFLOW_DATA_TLS_CA_FILE``, ``RAPTORFLOW_DATA_TLS_CERT_FILE``,
  ``RAPTORFLOW_DATA_TLS_KEY_FILE``, ``RAPTORFLOW_DATA_TLS_SERVER_NAME``: TLS (any
  of them turns it on), with a client certificate for mutual TLS;
- ``RAPTORFLOW_WORKSPACE_ID``: the workspace of a `DatabaseConnection()` created
  without one.

Connections. Every call opens its own channel and closes it before returning
(a `DatabaseConnection` keeps one for its ``async with`` block). grpc.aio binds
a channel to the event loop it was created on, so a channel kept in a
module-level singleton would break the first time the code ran under another
loop (each test, each ``asyncio.run``). The singletons (`get_database_service()`
and the others) therefore hold only configuration. The cost is a new
connection per call, which health checks and jobs can afford; hot paths should
keep a `DataClient` of their own.

Errors. The health calls (`check_database_health`, ``get_system_status``,
``get_current_status``, ``health_check``) never raise for an unreachable or
failing service, nor for a configuration they cannot use (a bad
``RAPTORFLOW_DATA_TIMEOUT``, a TLS file missing or unreadable): they report it
as "unhealthy" (or "critical"), as the old ones did. Calls that move data or
run maintenance raise `DataError` subclasses, and `JobFailed` for a job that
did not succeed, instead of the old ``{"error": ...}`` dicts, so a failed
backup cannot pass for a good one.
Timestamps are ISO 8601 strings in UTC, so every dict is JSON-ready.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import json
import os
from collections.abc import AsyncIterator, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, Final, Protocol, Self
from uuid import UUID

from google.protobuf import timestamp_pb2
from raptorflow.data.client._client import DataClient
from raptorflow.data.client._config import MAX_TIMEOUT_SECONDS, ClientConfig
from raptorflow.data.client._errors import DataError, FailedPrecondition
from raptorflow.data.client._maintenance import JobState, job_state
from raptorflow.data.client._memory import SyncEvent
from raptorflow.data.client._query import TableQuery
from raptorflow.data.client._tls import tls_credentials
from raptorflow.data.client._values import JsonValue, PyValue, Row, canonical_workspace_id
from raptorflow.data.v1 import job_pb2, monitoring_service_pb2

__all__ = [
    "DEFAULT_TARGET",
    "TARGET_ENV",
    "TIMEOUT_ENV",
    "TLS_CA_FILE_ENV",
    "TLS_CERT_FILE_ENV",
    "TLS_KEY_FILE_ENV",
    "TLS_SERVER_NAME_ENV",
    "TOKEN_ENV",
    "WORKSPACE_ENV",
    "DatabaseConnection",
    "DatabaseIntegration",
    "DatabaseMonitor",
    "DatabaseService",
    "MemoryController",
    "backup_database",
    "check_database_health",
    "client_config",
    "configure",
    "get_database_integration",
    "get_database_monitor",
    "get_database_service",
    "sync_database_to_memory",
]

TARGET_ENV: Final = "RAPTORFLOW_DATA_TARGET"
"""The environment variable with the server's address."""
TIMEOUT_ENV: Final = "RAPTORFLOW_DATA_TIMEOUT"
"""The environment variable with the seconds each call may take."""
TOKEN_ENV: Final = "RAPTORFLOW_DATA_TOKEN"
"""The environment variable with the bearer token sent on every call."""
TLS_CA_FILE_ENV: Final = "RAPTORFLOW_DATA_TLS_CA_FILE"
"""The environment variable with the PEM CA bundle the server must chain to (any
``RAPTORFLOW_DATA_TLS_*`` turns TLS on)."""
TLS_CERT_FILE_ENV: Final = "RAPTORFLOW_DATA_TLS_CERT_FILE"
"""The environment variable with the PEM client certificate chain, for mutual TLS."""
TLS_KEY_FILE_ENV: Final = "RAPTORFLOW_DATA_TLS_KEY_FILE"
"""The environment variable with the PEM private key of the client certificate."""
TLS_SERVER_NAME_ENV: Final = "RAPTORFLOW_DATA_TLS_SERVER_NAME"
"""The environment variable with the name the server's certificate is checked against."""
WORKSPACE_ENV: Final = "RAPTORFLOW_WORKSPACE_ID"
"""The environment variable with the workspace of `DatabaseConnection()`."""
DEFAULT_TARGET: Final = "127.0.0.1:50051"
"""The server's own default address, used when ``RAPTORFLOW_DATA_TARGET`` is unset."""

# The old monitor's rules: more slow queries than this in the window is a warning.
_SLOW_QUERY_WARNING_COUNT: Final = 5
# The users' target for scheduled jobs' success rate.
_SUCCESS_RATE_TARGET: Final = 0.95
_SEVERITY: Final = {"healthy": 0, "warning": 1, "critical": 2}
# get_system_status and check_database_health speak the integration layer's
# words; get_current_status and health_check the monitor's.
_HEALTH_WORD: Final = {"healthy": "healthy", "warning": "degraded", "critical": "unhealthy"}
# Tables a default (all-tables) memory sync leaves out rather than failing on.
_UNSYNCABLE_REASONS: Final = frozenset({"SYNC_NOT_INSTALLED", "PRIMARY_KEY_REQUIRED"})


@dataclass
class _Configured:
    config: ClientConfig | None = None


# A holder rather than a global statement: configure() changes what it holds.
_configured = _Configured()


# --------------------------------------------------------------------------
# Configuration


def configure(config: ClientConfig | str | None) -> None:
    """Sets the configuration every call of this module uses; None returns to the environment.

    For applications that build their `ClientConfig` themselves (TLS, metadata).
    """
    _configured.config = ClientConfig(config) if isinstance(config, str) else config


def client_config() -> ClientConfig:
    """The configuration in effect: `configure()`'s, else the environment's.

    Raises ValueError if ``RAPTORFLOW_DATA_TIMEOUT`` is not a number of seconds above 0
    and at most 100 years (`MAX_TIMEOUT_SECONDS`: "inf" would make every call fail at
    once), and OSError (or ValueError) if a ``RAPTORFLOW_DATA_TLS_*`` file cannot be read
    (or used).
    """
    if _configured.config is not None:
        return _configured.config
    target = os.environ.get(TARGET_ENV) or DEFAULT_TARGET
    token = os.environ.get(TOKEN_ENV) or None
    tls = _tls_from_environment()
    timeout_text = os.environ.get(TIMEOUT_ENV)
    if not timeout_text:
        return ClientConfig(target, token=token, **tls)
    try:
        # ClientConfig checks the range: the one place that knows what gRPC can send.
        return ClientConfig(target, token=token, timeout=float(timeout_text), **tls)
    except ValueError as err:  # not a number, or out of range
        raise ValueError(
            f"{TIMEOUT_ENV}={timeout_text!r} is not a number of seconds above 0 and at most"
            f" {MAX_TIMEOUT_SECONDS:.0f} (100 years)"
        ) from err


def _tls_from_environment() -> dict[str, Any]:
    ca, cert, key, name = (
        os.environ.get(env) or None
        for env in (TLS_CA_FILE_ENV, TLS_CERT_FILE_ENV, TLS_KEY_FILE_ENV, TLS_SERVER_NAME_ENV)
    )
    if not (ca or cert or key or name):
        return {}
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return {"channel_credentials": tls_credentials(ca, cert, key), "channel_options": options}


@contextlib.asynccontextmanager
async def _client(config: ClientConfig | None) -> AsyncIterator[DataClient]:
    # A channel per call: see "Connections" in the module docstring.
    async with DataClient(config or client_config()) as client:
        yield client


# --------------------------------------------------------------------------
# Status dicts


def _iso(moment: timestamp_pb2.Timestamp) -> str | None:
    if not moment.seconds and not moment.nanos:
        return None
    return moment.ToDatetime(tzinfo=UTC).isoformat()


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _pool(pool: monitoring_service_pb2.PoolStatus) -> dict[str, Any]:
    return {
        "size": pool.size,
        "in_use": pool.in_use,
        "idle": pool.idle,
        "waiting": pool.waiting,
        "max_size": pool.max_size,
        "utilization": pool.utilization,
        "utilization_target": pool.utilization_target,
        "peak_utilization": pool.peak_utilization,
    }


def _database(database: monitoring_service_pb2.DatabaseStatus) -> dict[str, Any]:
    return {
        "reachable": database.reachable,
        "server_version": database.server_version,
        "check_latency_ms": database.check_latency_ms,
        "check_time": _iso(database.check_time),
    }


def _check(alerts: list[str], failing: str = "warning") -> dict[str, Any]:
    return {"status": failing if alerts else "healthy", "alerts": alerts}


def _database_check(status: monitoring_service_pb2.GetStatusResponse) -> dict[str, Any]:
    alerts = [] if status.database.reachable else ["the database cannot be reached"]
    return _check(alerts, "critical") | _database(status.database)


def _pool_check(status: monitoring_service_pb2.GetStatusResponse) -> dict[str, Any]:
    pool = status.pool
    alerts = []
    if pool.utilization > pool.utilization_target:
        alerts.append(
            f"connection pool utilization {pool.utilization:.0%} is over its"
            f" {pool.utilization_target:.0%} target"
        )
    if pool.waiting:
        alerts.append(f"{pool.waiting} calls are waiting for a pool connection")
    # "available" and "total" are the old monitor's names.
    old_names = {"available": pool.max_size - pool.in_use, "total": pool.size}
    return _check(alerts) | old_names | _pool(pool)


def _query_check(status: monitoring_service_pb2.GetStatusResponse) -> dict[str, Any]:
    slow = status.slow_queries
    alerts = []
    if len(slow) > _SLOW_QUERY_WARNING_COUNT:
        alerts.append(f"{len(slow)} slow queries in the recent window")
    return _check(alerts) | {
        "slow_queries": len(slow),
        "slow_queries_list": [
            {
                "statement": query.statement,
                "method": query.method,
                "duration_ms": query.duration_ms,
                "end_time": _iso(query.end_time),
                "sqlstate": query.sqlstate,
            }
            for query in slow[:5]
        ],
        "methods": {
            method.method: {
                "count": method.count,
                "error_count": method.error_count,
                "p50_ms": method.p50_ms,
                "p90_ms": method.p90_ms,
                "p99_ms": method.p99_ms,
                "max_ms": method.max_ms,
                "window_seconds": method.window_seconds,
            }
            for method in status.methods
        },
    }


def _held_check(status: monitoring_service_pb2.GetStatusResponse) -> dict[str, Any]:
    held = status.held_connections
    alerts = [f"{len(held)} pool connections held past the leak limit"] if held else []
    return _check(alerts) | {
        "count": len(held),
        "reclaimed_connection_count": status.reclaimed_connection_count,
        "connections": [
            {
                "holder": connection.holder,
                "held_seconds": connection.held_seconds,
                "acquire_time": _iso(connection.acquire_time),
                "backend_pid": connection.backend_pid,
            }
            for connection in held
        ],
    }


def _schedule_check(status: monitoring_service_pb2.GetStatusResponse) -> dict[str, Any]:
    alerts = [
        f"schedule {schedule.name!r} succeeded in {schedule.success_rate:.0%} of its runs"
        for schedule in status.schedules
        if schedule.run_count and schedule.success_rate < _SUCCESS_RATE_TARGET
    ]
    return _check(alerts) | {
        "schedules": {
            schedule.name: {
                "run_count": schedule.run_count,
                "success_count": schedule.success_count,
                "success_rate": schedule.success_rate,
                "next_run_time": _iso(schedule.next_run_time),
                "last_state": (
                    job_state(schedule.last_job).name if schedule.HasField("last_job") else None
                ),
                "last_result": (
                    job_state(schedule.last_finished_job).name
                    if schedule.HasField("last_finished_job")
                    else None
                ),
            }
            for schedule in status.schedules
        }
    }


def _current_status(status: monitoring_service_pb2.GetStatusResponse) -> dict[str, Any]:
    """The old monitor's dict: overall_status healthy, warning or critical, checks, alerts."""
    checks = {
        "database": _database_check(status),
        "connection_pool": _pool_check(status),
        "query_performance": _query_check(status),
        "held_connections": _held_check(status),
        "schedules": _schedule_check(status),
    }
    return _monitor_dict(_iso(status.status_time) or _now(), checks, status.replica)


def _monitor_dict(
    timestamp: str, checks: dict[str, dict[str, Any]], replica: str
) -> dict[str, Any]:
    overall = max((check["status"] for check in checks.values()), key=_SEVERITY.__getitem__)
    return {
        "timestamp": timestamp,
        "overall_status": overall,
        "replica": replica,
        "checks": checks,
        "alerts": [
            {"timestamp": timestamp, "check": name, "severity": check["status"], "message": alert}
            for name, check in checks.items()
            for alert in check["alerts"]
        ],
    }


def _unreachable_status(err: Exception) -> dict[str, Any]:
    check = {"status": "critical", "error": str(err), "alerts": [f"data service: {err}"]}
    return _monitor_dict(_now(), {"service": check}, "") | {"error": str(err)}


def _system_status(current: Mapping[str, Any]) -> dict[str, Any]:
    """The old integration's dict (with status, database and pool at the top) from the
    monitor's."""
    checks = current["checks"]
    health = _HEALTH_WORD[current["overall_status"]]
    pool = checks.get("connection_pool", {})
    status: dict[str, Any] = {
        "status": health,
        "overall_health": health,
        "timestamp": current["timestamp"],
        "initialized": "error" not in current,
        "replica": current["replica"],
        "database": {
            key: value
            for key, value in checks.get("database", {"reachable": False}).items()
            if key not in ("status", "alerts")
        },
        "pool": {key: value for key, value in pool.items() if key not in ("status", "alerts")},
        "components": {"connection_pool": pool, "monitoring": current},
        "alerts": current["alerts"],
    }
    if "error" in current:
        status["error"] = current["error"]
    return status


async def _fetch_current_status(config: ClientConfig | None) -> dict[str, Any]:
    try:
        # A configuration that cannot be built is unhealthy too: a bad
        # RAPTORFLOW_DATA_TIMEOUT (ValueError), a TLS file not mounted or not
        # readable (OSError), a certificate that does not match its key (ValueError).
        config = config or client_config()
    except (OSError, ValueError) as err:
        return _unreachable_status(err)
    try:
        async with _client(config) as client:
            return _current_status(await client.monitoring.get_status())
    except (DataError, ValueError) as err:
        # ValueError: a job state this client does not know (a newer server).
        return _unreachable_status(err)


# --------------------------------------------------------------------------
# Jobs as dicts


def _job_summary(job: job_pb2.Job) -> dict[str, Any]:
    state = job_state(job)
    duration = None
    if job.HasField("start_time") and job.HasField("end_time"):
        duration = (job.end_time.ToDatetime() - job.start_time.ToDatetime()).total_seconds()
    summary: dict[str, Any] = {
        "status": "success" if state is JobState.SUCCEEDED else state.name.lower(),
        "job_id": job.job_id,
        "state": state.name,
        "tables": [
            {
                "table": report.table,
                "action": report.action,
                "rows": report.rows,
                "dead_rows_before": report.dead_rows_before,
                "dead_rows_after": report.dead_rows_after,
                "size_bytes_before": report.size_bytes_before,
                "size_bytes_after": report.size_bytes_after,
                "duration_ms": report.duration_ms,
                "notices": list(report.notices),
            }
            for report in job.result.tables
        ],
        "started_at": _iso(job.start_time),
        "finished_at": _iso(job.end_time),
        "processing_time_seconds": duration,
        "timestamp": _iso(job.end_time) or _now(),
    }
    if job.HasField("error"):
        summary["error"] = {
            "code": job.error.code,
            "reason": job.error.reason,
            "message": job.error.message,
        }
    return summary


async def _run_job(spec: job_pb2.JobSpec, config: ClientConfig | None) -> job_pb2.Job:
    async with _client(config) as client:
        job = await client.maintenance.start_job(spec)
        return await client.maintenance.wait_job(job.job_id)


def _backup_path() -> str:
    # Microseconds, so that two backups started in the same second do not collide.
    return f"raptorflow-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}.rfbackup"


# --------------------------------------------------------------------------
# get_database_service()


@dataclass
class DatabaseService:
    """The old ``DatabaseService`` (``backend/core/database.py``), on the data service.

    Instead: a `DataClient`, with ``client.monitoring.get_status()`` for health
    and statistics and ``client.maintenance`` for backups and jobs.

    Awaiting it returns it, so both ``get_database_service()`` and
    ``await get_database_service()`` (as the old maintenance jobs spell it)
    work. Maintenance methods start a job and wait for it; they raise
    `JobFailed` if it fails and `DataError` if a call does.
    """

    config: ClientConfig | None = None
    """The client configuration; None uses `client_config()` at each call."""

    def __await__(self) -> Generator[Any, None, Self]:
        return self._itself().__await__()

    async def _itself(self) -> Self:
        return self

    async def health_check(self) -> dict[str, Any]:
        """{"status": "healthy" | "warning" | "critical", "checks", "alerts", "timestamp"}.
        Never raises. Instead: ``client.monitoring.get_status()``."""
        current = await _fetch_current_status(self.config)
        return {
            "status": current["overall_status"],
            "checks": current["checks"],
            "alerts": current["alerts"],
            "timestamp": current["timestamp"],
        }

    async def get_database_statistics(self) -> dict[str, Any]:
        """{"connection_pool", "monitoring", "overall_health", "timestamp"}. Never raises.
        Instead: ``client.monitoring.get_status()``."""
        status = _system_status(await _fetch_current_status(self.config))
        return {
            "connection_pool": status["components"]["connection_pool"],
            "monitoring": status["components"]["monitoring"],
            "overall_health": status["overall_health"],
            "timestamp": status["timestamp"],
        }

    async def create_backup(self) -> dict[str, Any]:
        """The same as `backup_database()`; see there. Instead:
        ``client.maintenance.backup_to_file()`` and ``wait_job()``."""
        return await backup_database(config=self.config)

    async def get_table_list(self) -> list[str]:
        """The exposed tables' names. Instead: ``client.describe_tables()``."""
        async with _client(self.config) as client:
            return [table.name for table in await client.describe_tables()]

    async def vacuum_database(self) -> dict[str, Any]:
        """VACUUM (ANALYZE) of every exposed table, waited for; a job summary dict
        (status, job_id, tables with dead rows and sizes before and after). Instead:
        ``client.maintenance.vacuum()`` and ``wait_job()``."""
        spec = job_pb2.JobSpec(vacuum=job_pb2.VacuumJob(analyze=True))
        return _job_summary(await _run_job(spec, self.config))

    async def optimize_table(self, table_name: str) -> dict[str, Any]:
        """VACUUM (ANALYZE) of one table, waited for; the old {"status", "table",
        "optimization_type", "timestamp"} plus the job summary. Instead:
        ``client.maintenance.vacuum([table_name])`` and ``wait_job()``."""
        spec = job_pb2.JobSpec(vacuum=job_pb2.VacuumJob(tables=[table_name], analyze=True))
        summary = _job_summary(await _run_job(spec, self.config))
        return summary | {"table": table_name, "optimization_type": "vacuum_analyze"}

    async def update_table_statistics(self, table_name: str) -> dict[str, Any]:
        """ANALYZE of one table, waited for; a job summary dict. Instead:
        ``client.maintenance.analyze([table_name])`` and ``wait_job()``."""
        spec = job_pb2.JobSpec(analyze=job_pb2.AnalyzeJob(tables=[table_name]))
        return _job_summary(await _run_job(spec, self.config)) | {"table": table_name}

    async def get_index_list(self) -> list[str]:
        """The names `rebuild_index` takes: the exposed tables, since the service
        rebuilds indexes a table at a time (REINDEX TABLE CONCURRENTLY)."""
        return await self.get_table_list()

    async def rebuild_index(self, table_name: str) -> dict[str, Any]:
        """REINDEX TABLE CONCURRENTLY of one table (a name from `get_index_list`),
        waited for; a job summary dict. Instead: ``client.maintenance.reindex([table])``
        and ``wait_job()``."""
        spec = job_pb2.JobSpec(reindex=job_pb2.ReindexJob(tables=[table_name]))
        return _job_summary(await _run_job(spec, self.config)) | {"table": table_name}


_service = DatabaseService()


def get_database_service() -> DatabaseService:
    """The module's `DatabaseService` (configured by `configure()` or the environment).

    Instead: a `DataClient` of your own.
    """
    return _service


# --------------------------------------------------------------------------
# get_database_integration(), get_database_monitor(), check_database_health()


@dataclass
class DatabaseIntegration:
    """The old ``DatabaseIntegration`` (``backend/core/database_integration.py``).

    Instead: ``client.monitoring.get_status()``. There is nothing to start or
    stop: the server runs its pool, monitoring and schedules itself.
    """

    config: ClientConfig | None = None
    """The client configuration; None uses `client_config()` at each call."""

    async def get_system_status(self) -> dict[str, Any]:
        """The status of the data service's database layer, as one dict. Never raises.

        ``{"status": "healthy" | "degraded" | "unhealthy", "overall_health": (the
        same), "timestamp", "initialized", "replica", "database": {"reachable",
        "server_version", "check_latency_ms", "check_time"}, "pool": {"size",
        "in_use", "idle", "waiting", "max_size", "utilization",
        "utilization_target", "peak_utilization"}, "components":
        {"connection_pool", "monitoring"}, "alerts"}``, plus "error" when the
        service could not be asked. Unhealthy: the database or the service
        cannot be reached. Degraded: pool over its 80 % target or with calls
        waiting, connections held past the leak limit, more than five slow
        queries in the window, or a schedule under 95 % success.
        Instead: ``client.monitoring.get_status()``.
        """
        return _system_status(await _fetch_current_status(self.config))

    async def initialize(self) -> dict[str, Any]:
        """Checks that the service answers: {"status": "success" | "failed", "components",
        "errors"}. Never raises. Instead: ``DataClient.connect()``."""
        status = await self.get_system_status()
        errors = [status["error"]] if "error" in status else []
        return {
            "status": "failed" if errors else "success",
            "components": status["components"],
            "errors": errors,
        }

    async def shutdown(self) -> None:
        """Does nothing: this module keeps no connection open between calls."""


_integration = DatabaseIntegration()


def get_database_integration() -> DatabaseIntegration:
    """The module's `DatabaseIntegration`. Instead: ``client.monitoring``."""
    return _integration


@dataclass
class DatabaseMonitor:
    """The old ``DatabaseMonitor`` (``backend/core/database_monitoring.py``).

    Instead: ``client.monitoring.get_status()``; the server monitors itself,
    so starting and stopping do nothing.
    """

    config: ClientConfig | None = None
    """The client configuration; None uses `client_config()` at each call."""

    async def get_current_status(self) -> dict[str, Any]:
        """The old monitor's dict, fresh at each call. Never raises.

        ``{"timestamp", "overall_status": "healthy" | "warning" | "critical",
        "replica", "checks": {"database", "connection_pool",
        "query_performance", "held_connections", "schedules"}, "alerts":
        [{"timestamp", "check", "severity", "message"}]}``; each check has a
        "status" and "alerts" and its figures (the pool's also under the old
        names "available" and "total"). When the service cannot be asked,
        the only check is "service", critical, and "error" says why.
        Instead: ``client.monitoring.get_status()``.
        """
        return await _fetch_current_status(self.config)

    async def start_monitoring(self) -> None:
        """Does nothing: the server watches its own pool and queries."""

    async def stop_monitoring(self) -> None:
        """Does nothing."""


_monitor = DatabaseMonitor()


def get_database_monitor() -> DatabaseMonitor:
    """The module's `DatabaseMonitor`. Instead: ``client.monitoring``."""
    return _monitor


async def check_database_health() -> dict[str, Any]:
    """The old health check's dict. Never raises.

    ``{"status": "healthy" | "degraded" | "unhealthy", "details": <get_system_status()>}``,
    or ``{"status": "unhealthy", "reason": "..."}`` when the service cannot be
    asked. A dict rather than a bool, as ``backend/core/connections.py``
    returned: callers compare ``result["status"] == "healthy"``.
    Instead: ``client.monitoring.get_status()``.
    """
    status = await _integration.get_system_status()
    if "error" in status:
        return {"status": "unhealthy", "reason": status["error"]}
    return {"status": status["status"], "details": status}


# --------------------------------------------------------------------------
# DatabaseConnection


class DatabaseConnection:
    """The old pooled connection with a Supabase-style ``table()``, for one workspace.

    ::

        async with DatabaseConnection(workspace_id) as connection:
            result = await connection.table("campaigns").select("*").execute()
            rows = result.data  # list of dicts, this workspace's rows only

    ``table(name)`` is the client's `TableQuery`, so filters, ``order``,
    ``limit``, inserts and updates work as in `DataClient`. ``execute()``
    reads one page (up to the server's 1,000 rows, like Supabase's default
    row limit); ``stream()`` reads them all.

    The workspace is the argument, else ``RAPTORFLOW_WORKSPACE_ID``; ValueError
    if neither gives a UUID. Instead: ``client.workspace(ws).table(name)`` on a
    `DataClient` kept open.
    """

    def __init__(
        self, workspace_id: str | UUID | None = None, *, config: ClientConfig | str | None = None
    ) -> None:
        workspace = workspace_id if workspace_id is not None else os.environ.get(WORKSPACE_ENV)
        if not workspace:
            raise ValueError(
                f"DatabaseConnection needs a workspace id: pass one or set {WORKSPACE_ENV}"
            )
        self._workspace_id = canonical_workspace_id(workspace)
        self._config = ClientConfig(config) if isinstance(config, str) else config
        self._client: DataClient | None = None

    @property
    def workspace_id(self) -> str:
        """The workspace every table of this connection reads and writes."""
        return self._workspace_id

    @property
    def client(self) -> DataClient:
        """The `DataClient` of the ``async with`` block. RuntimeError outside it."""
        if self._client is None:
            raise RuntimeError("use DatabaseConnection as `async with DatabaseConnection() as c:`")
        return self._client

    def table(self, name: str) -> TableQuery:
        """One exposed table of the workspace. Instead: ``client.workspace(ws).table(name)``."""
        return self.client.workspace(self._workspace_id).table(name)

    def from_(self, name: str) -> TableQuery:
        """The same as `table()`, as Supabase spells it."""
        return self.table(name)

    async def __aenter__(self) -> Self:
        if self._client is not None:
            raise RuntimeError("this DatabaseConnection is already open")
        # Created here, inside the loop that will use it: see the module docstring.
        self._client = DataClient(self._config or client_config())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def __repr__(self) -> str:
        state = "open" if self._client is not None else "closed"
        return f"DatabaseConnection({self._workspace_id!r}, {state})"


# --------------------------------------------------------------------------
# sync_database_to_memory


class MemoryController(Protocol):
    """What `sync_database_to_memory` hands rows to: the old memory controller's method.

    RaptorFlow's ``SimpleMemoryController`` fits as it is. `store_memory` may
    be a coroutine function or a plain one; returning False (as the old
    controller does when it could not store) counts the row as failed.
    Raising stops the sync.
    """

    def store_memory(self, key: str, value: dict[str, JsonValue], /) -> object:
        """Stores one row under `key` ("<workspace>:<table>:<primary key>").

        `value` is ``{"workspace_id", "table", "key", "row"}``: `key` is the
        primary key in text form, `row` the row with JSON values: timestamps
        and dates in ISO 8601, UUIDs and decimals as strings, bytes in base64,
        JSON columns parsed. A one-column key is its value's text ("42"); a
        key of several columns is a JSON array of their values, in key order
        (``[7,"a,b"]``), so no two keys of a table share a text form (values
        joined by "," would: ("a,b", "c") and ("a", "b,c")).
        """
        ...


def _json_safe(value: PyValue) -> JsonValue:
    # bool, int, float and str are JSON already; the rest get their text forms.
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, UUID | Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Mapping):
        # A json/jsonb column, parsed: JSON already.
        return dict(value)
    return [_json_safe(item) for item in value]


def _key_text(values: Sequence[PyValue]) -> str:
    """A primary key in text form, as `MemoryController.store_memory` documents it."""
    if len(values) == 1:
        return str(values[0])
    return json.dumps(
        [_json_safe(value) for value in values], ensure_ascii=False, separators=(",", ":")
    )


@dataclass
class _TableCount:
    rows: int = 0
    failed: int = 0


@dataclass
class _SyncRun:
    workspace_id: str
    controller: MemoryController
    primary_keys: dict[str, list[str]]
    counts: dict[str, _TableCount] = field(default_factory=dict)
    resume_token: str = ""
    delivered: bool = False

    async def store(self, table: str, rows: Iterable[Row]) -> None:
        count = self.counts.setdefault(table, _TableCount())
        key_columns = self.primary_keys[table]
        for row in rows:
            key = _key_text([row[column] for column in key_columns])
            value: dict[str, JsonValue] = {
                "workspace_id": self.workspace_id,
                "table": table,
                "key": key,
                "row": {column: _json_safe(cell) for column, cell in row.items()},
            }
            self.delivered = True
            result = self.controller.store_memory(f"{self.workspace_id}:{table}:{key}", value)
            if inspect.isawaitable(result):
                result = await result
            count.rows += 1
            if result is False:
                count.failed += 1


async def _snapshot(
    client: DataClient, run: _SyncRun, tables: Sequence[str], batch_size: int | None
) -> None:
    stream = client.memory.sync(
        run.workspace_id, tables=tables, follow=False, batch_size=batch_size
    )
    async with stream:
        async for batch in stream:
            if batch.event is SyncEvent.SNAPSHOT_ROWS:
                await run.store(batch.table, batch.rows)
            run.resume_token = batch.resume_token
            if batch.event is SyncEvent.SNAPSHOT_DONE:
                # A consistent snapshot is complete; changes after it are for
                # a following client.memory.sync(resume_token=...).
                return


async def sync_database_to_memory(
    workspace_id: str | UUID,
    memory_controller: MemoryController,
    *,
    tables: Sequence[str] | None = None,
    batch_size: int | None = None,
    config: ClientConfig | str | None = None,
) -> dict[str, Any]:
    """Hands every row of the workspace's tables to ``memory_controller.store_memory``.

    Reads one consistent snapshot (a non-following ``client.memory.sync``) of
    `tables`, by default every exposed table; tables the server cannot sync
    (no change capture installed, no primary key) are then left out and
    reported as skipped. Named tables must all sync (`FailedPrecondition`
    otherwise). See `MemoryController` for what each call receives.

    Returns ``{"status": "success" | "partial", "workspace_id", "tables":
    {name: {"status": "synced", "rows", "failed"} or {"status": "skipped",
    "reason"}}, "rows_synced", "rows_failed", "resume_token", "sync_tables",
    "timestamp"}``; "partial" when the controller returned False for some
    rows. The resume token continues with the changes after the snapshot:
    ``client.memory.sync(ws, tables=summary["sync_tables"],
    resume_token=summary["resume_token"])``. Raises `DataError` if a call fails.
    Instead: ``client.memory.sync()`` and ``client.memory.upsert_records()``.
    """
    workspace = canonical_workspace_id(workspace_id)
    if isinstance(tables, str):
        raise TypeError(f"tables takes a list of table names, not the str {tables!r}")
    named = None if tables is None else list(tables)
    client_cfg = ClientConfig(config) if isinstance(config, str) else config
    skipped: dict[str, str] = {}
    async with _client(client_cfg) as client:
        described = await client.describe_tables(*(named or ()))
        run = _SyncRun(
            workspace, memory_controller, {t.name: list(t.primary_key) for t in described}
        )
        names = named if named is not None else list(run.primary_keys)
        while names:
            try:
                await _snapshot(client, run, names, batch_size)
                break
            except FailedPrecondition as err:
                table = err.metadata.get("table", "")
                if (
                    named is not None
                    or run.delivered
                    or err.reason not in _UNSYNCABLE_REASONS
                    or table not in names
                ):
                    raise
                skipped[table] = err.reason
                names = [name for name in names if name != table]
    summary_tables: dict[str, Any] = {
        name: {"status": "synced", "rows": count.rows, "failed": count.failed}
        for name in names
        for count in [run.counts.get(name, _TableCount())]
    }
    summary_tables |= {
        name: {"status": "skipped", "reason": reason} for name, reason in skipped.items()
    }
    failed = sum(count.failed for count in run.counts.values())
    return {
        "status": "partial" if failed else "success",
        "workspace_id": workspace,
        "tables": summary_tables,
        "rows_synced": sum(count.rows - count.failed for count in run.counts.values()),
        "rows_failed": failed,
        "resume_token": run.resume_token,
        "sync_tables": names,
        "timestamp": _now(),
    }


# --------------------------------------------------------------------------
# backup_database


async def backup_database(
    *,
    workspace_id: str | UUID | None = None,
    tables: Sequence[str] = (),
    path: str | None = None,
    timeout: float | None = None,
    config: ClientConfig | str | None = None,
) -> dict[str, Any]:
    """Backs up the exposed tables into a file under the server's backup directory.

    Runs a backup-to-file job and waits for it (up to `timeout` seconds, None
    for as long as it takes), so the backup is a job in the history like the
    scheduled ones, and the file lands where the server's backups are kept
    (the server needs ``--backup-dir``: `FailedPrecondition` with reason
    BACKUP_DIR_NOT_SET otherwise). By default every workspace and every
    exposed table, into "raptorflow-<UTC time>.rfbackup"; `path` is relative
    to the backup directory.

    Returns ``{"status": "success", "backup_id" (the job id), "job_id", "path",
    "bytes", "sha256", "tables": {name: rows}, "row_count", "created_at",
    "type": "automated"}``. Raises `JobFailed` if the job fails and
    `DataError` if a call does. Instead: ``client.maintenance.backup_to_file()``
    then ``client.maintenance.wait_job()``; restore with
    ``restore_from_file(path)``.
    """
    client_cfg = ClientConfig(config) if isinstance(config, str) else config
    async with _client(client_cfg) as client:
        job = await client.maintenance.backup_to_file(
            path or _backup_path(), workspace_id=workspace_id, tables=tables
        )
        job = await client.maintenance.wait_job(job.job_id, timeout=timeout)
    result = job.result
    table_rows = {report.table: report.rows for report in result.tables}
    return {
        "status": "success",
        "backup_id": job.job_id,
        "job_id": job.job_id,
        "path": result.backup_path,
        "bytes": result.backup_bytes,
        "sha256": result.backup_sha256,
        "tables": table_rows,
        "row_count": sum(table_rows.values()),
        "created_at": _iso(job.end_time) or _now(),
        "type": "automated",
    }
