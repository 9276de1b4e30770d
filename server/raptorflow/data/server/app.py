"""Builds the gRPC server and owns its lifecycle: start in order, stop in reverse.

Start: owner pool up, migrations applied, catalog read, query pool and session
connection up, server listening, first database check, then health SERVING.
Stop (SIGTERM/SIGINT): health NOT_SERVING, optional drain wait for load
balancers, open streams ended with UNAVAILABLE, unary calls given the grace
period, then the pools close last.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from raptorflow.data.server.auth import tls
from raptorflow.data.server.auth.interceptor import Authorization
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db import migrations, row_security
from raptorflow.data.server.db.catalog import Catalog, CatalogCache, load_catalog
from raptorflow.data.server.db.connections import Database
from raptorflow.data.server.db.page_tokens import PageTokenCodec
from raptorflow.data.server.health import DatabaseHealth, HealthServicer
from raptorflow.data.server.health_listener import HealthListener
from raptorflow.data.server.maintenance.backup import Backups
from raptorflow.data.server.maintenance.executor import JobExecutor
from raptorflow.data.server.maintenance.jobs import Jobs
from raptorflow.data.server.maintenance.operations import Operations
from raptorflow.data.server.maintenance.schedules import Scheduler
from raptorflow.data.server.memory.store import MemoryStore
from raptorflow.data.server.observability.monitoring import Monitoring
from raptorflow.data.server.services.maintenance import MaintenanceServicer
from raptorflow.data.server.services.memory_sync import MemorySyncServicer
from raptorflow.data.server.services.monitoring import MonitoringServicer
from raptorflow.data.server.services.requests import RequestDecoding
from raptorflow.data.server.services.workspace import WorkspaceServicer
from raptorflow.data.server.sync.streams import SyncStreams
from raptorflow.data.server.tasks import cancel_and_wait
from raptorflow.data.v1 import (
    maintenance_service_pb2,
    maintenance_service_pb2_grpc,
    memory_sync_service_pb2,
    memory_sync_service_pb2_grpc,
    monitoring_service_pb2,
    monitoring_service_pb2_grpc,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)

log = logging.getLogger(__name__)

WORKSPACE_SERVICE = workspace_service_pb2.DESCRIPTOR.services_by_name["WorkspaceService"].full_name
MEMORY_SYNC_SERVICE = memory_sync_service_pb2.DESCRIPTOR.services_by_name[
    "MemorySyncService"
].full_name
MAINTENANCE_SERVICE = maintenance_service_pb2.DESCRIPTOR.services_by_name[
    "MaintenanceService"
].full_name
MONITORING_SERVICE = monitoring_service_pb2.DESCRIPTOR.services_by_name[
    "MonitoringService"
].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVED_SERVICES = (WORKSPACE_SERVICE, MEMORY_SYNC_SERVICE, MAINTENANCE_SERVICE, MONITORING_SERVICE)


@dataclass
class RunningServer:
    """A started server and everything it owns; `stop()` tears it down in order."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    database: Database
    health: HealthServicer
    database_health: DatabaseHealth
    catalog: CatalogCache
    sync_streams: SyncStreams
    memory_store: MemoryStore
    maintenance: Maintenance
    monitoring: Monitoring
    health_listener: HealthListener | None = None
    """The plaintext health-only port (settings.health_listen), when there is one."""
    background: list[asyncio.Task[None]] = field(default_factory=list)
    _stopped: bool = False

    @property
    def address(self) -> str:
        host = self.settings.listen.rsplit(":", 1)[0] or "127.0.0.1"
        return f"{host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        log.info("shutting down: not serving, then %.1f s grace", grace)
        await self.health.enter_graceful_shutdown()
        if self.settings.shutdown_drain_seconds > 0:
            await asyncio.sleep(self.settings.shutdown_drain_seconds)
        # Watchers were notified of NOT_SERVING above; give them a tick to send it.
        await asyncio.sleep(0.05)
        await self.health.close_streams()
        await self.sync_streams.close()
        self.maintenance.jobs.end_watches()
        await self.maintenance.scheduler.close()
        await self.server.stop(grace)
        # Probes on the health-only port saw NOT_SERVING all through the grace period.
        if self.health_listener is not None:
            await self.health_listener.stop()
        await self.maintenance.jobs.close()
        await self.monitoring.close()
        await cancel_and_wait(self.background)
        await self.database.close()
        log.info("stopped")


@dataclass
class Maintenance:
    """The maintenance side of one server: backups, the job runner and the scheduler."""

    backups: Backups
    executor: JobExecutor
    jobs: Jobs
    scheduler: Scheduler

    @classmethod
    def build(
        cls, settings: Settings, database: Database, catalog: CatalogCache, replica_id: str
    ) -> Maintenance:
        backups = Backups(settings, database, catalog)
        executor = JobExecutor(Operations(settings, database, catalog), backups)
        jobs = Jobs(settings, database, executor, replica_id)
        return cls(backups, executor, jobs, Scheduler(settings, jobs))


def _token_codec(settings: Settings) -> PageTokenCodec:
    if settings.token_key:
        return PageTokenCodec(settings.token_key)
    log.warning(
        "RAPTORFLOW_TOKEN_KEY is not set: page tokens are signed with a random key and "
        "other replicas (or this one after a restart) will refuse them"
    )
    return PageTokenCodec(secrets.token_bytes(32))


def _catalog_loader(settings: Settings, database: Database) -> Callable[[], Awaitable[Catalog]]:
    provisioned: set[str] = set()
    warned: set[tuple[str, str, str]] = set()

    async def load() -> Catalog:
        async with database.owner_pool.acquire() as conn:
            catalog = await load_catalog(conn, settings.schema, settings.tables)
            fresh = set(catalog.tables) - provisioned
            if settings.query_role and fresh:
                await migrations.grant_tables(
                    conn, settings.query_role, settings.schema, sorted(fresh)
                )
                provisioned.update(fresh)
            # Every table at every load (one catalog read when nothing differs), so a
            # table re-created or altered by hand gets its policies back.
            await row_security.provision(
                conn,
                [row_security.ProtectedTable.of(t) for t in catalog.tables.values()],
                enabled=settings.row_security,
            )
            for key in await row_security.cross_workspace_keys(
                conn, settings.schema, sorted(catalog.tables)
            ):
                if key not in warned:
                    warned.add(key)
                    log.warning(
                        "foreign key %s of %s references %s without workspace_id: a workspace "
                        "can point at (and so learn of) another workspace's rows, and its "
                        "cascades cross workspaces; declare it on (workspace_id, ...)",
                        *key,
                    )
        return catalog

    return load


async def run_migrations(settings: Settings, database: Database) -> list[int]:
    async with database.owner_pool.acquire() as conn:
        applied = await migrations.apply_migrations(conn, migrations.bundled_migrations())
        if settings.query_role:
            await migrations.provision_app_role(conn, settings.query_role, settings.schema)
        await row_security.provision(
            conn, row_security.SERVICE_TABLES, enabled=settings.row_security
        )
    return applied


def build_server(
    settings: Settings,
    database: Database,
    catalog: CatalogCache,
    health: HealthServicer,
    sync_streams: SyncStreams,
    memory_store: MemoryStore,
    maintenance: Maintenance,
    monitoring: Monitoring,
    authorization: Authorization,
) -> grpc.aio.Server:
    """The grpc.aio server with every servicer, health and reflection added (not started)."""
    server = grpc.aio.server(
        # The first measures every call (latency window, metrics, one log line each),
        # also those the others refuse: calls without a valid token or grant, then
        # requests that do not decode (INVALID_ARGUMENT, only for authenticated callers).
        interceptors=[monitoring.interceptor, authorization, RequestDecoding()],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # Never share a port silently with another process; only the workers of one
            # supervisor (settings.workers, workers.py) share theirs, on purpose.
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ],
    )
    workspace_service_pb2_grpc.add_WorkspaceServiceServicer_to_server(
        WorkspaceServicer(settings, database, catalog, _token_codec(settings)), server
    )
    memory_sync_service_pb2_grpc.add_MemorySyncServiceServicer_to_server(
        MemorySyncServicer(sync_streams, memory_store), server
    )
    maintenance_service_pb2_grpc.add_MaintenanceServiceServicer_to_server(
        MaintenanceServicer(
            maintenance.backups, maintenance.executor, maintenance.jobs, maintenance.scheduler
        ),
        server,
    )
    monitoring_service_pb2_grpc.add_MonitoringServiceServicer_to_server(
        MonitoringServicer(monitoring), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (*SERVED_SERVICES, HEALTH_SERVICE, reflection.SERVICE_NAME), server
        )
    return server


async def start(settings: Settings) -> RunningServer:
    """Starts a server; raises if the database stays unreachable past the retry budget."""
    if not settings.database_url:
        raise SystemExit("DATABASE_URL (or --database-url) is required")
    # First: bad key or TLS settings stop start-up before anything connects.
    tls.check_settings(settings)
    authorization = Authorization(settings)
    if not authorization.enabled:
        log.warning(
            "AUTHENTICATION IS OFF (RAPTORFLOW_DEV_DISABLE_AUTH): every caller that reaches "
            "%s is an admin of every workspace. Never run like this outside development.",
            settings.listen,
        )
    database = Database(settings)
    try:
        await database.open_owner()
        applied = await run_migrations(settings, database)
        if applied:
            log.info("applied migrations %s", applied)
        catalog = CatalogCache(_catalog_loader(settings, database))
        await catalog.reload()
        await database.open_queries()
    except BaseException:
        await database.close()
        raise
    health = HealthServicer()
    database_health = DatabaseHealth(
        health, database, SERVED_SERVICES, interval=settings.health_interval
    )
    # Known but NOT_SERVING until the first check passes, so a probe that comes
    # in between sees NOT_SERVING rather than NOT_FOUND.
    await database_health.set_all(False)
    sync_streams = SyncStreams(settings, database, catalog)
    memory_store = MemoryStore(settings, database)
    # Names this process in job leases, held-connection reports and the status view.
    replica_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        # Parses the schedules and retention rules: bad configuration is a SystemExit.
        maintenance = Maintenance.build(settings, database, catalog, replica_id)
    except BaseException:
        await database.close()
        raise
    monitoring = Monitoring(settings, database, replica_id, maintenance.scheduler.list)
    maintenance.jobs.on_end = monitoring.record_job
    maintenance.jobs.on_scheduled_end = monitoring.record_scheduled_job
    monitoring.expect_schedules(s.name for s in maintenance.scheduler.schedules)
    monitoring.health = health.serving
    server: grpc.aio.Server | None = None
    health_listener: HealthListener | None = None
    try:
        await memory_store.prepare()
        await sync_streams.start()
        await monitoring.start()
        await maintenance.jobs.start()
        server = build_server(
            settings,
            database,
            catalog,
            health,
            sync_streams,
            memory_store,
            maintenance,
            monitoring,
            authorization,
        )
        # Inside the try: a port already taken must not leave the job runner, the
        # watchdog and the metrics endpoint (with its port) running behind the error.
        # Plaintext, or TLS / mutual TLS: unusable certificate settings are a SystemExit.
        port = tls.bind(server, settings)
        await server.start()
        if settings.health_listen:
            health_listener = await HealthListener.start(settings.health_listen, health)
    except BaseException:
        if health_listener is not None:
            await health_listener.stop(None)
        if server is not None:
            await server.stop(None)
        await maintenance.jobs.close()
        await monitoring.close()
        await sync_streams.close()
        await database.close()
        raise
    running = RunningServer(
        settings,
        server,
        port,
        database,
        health,
        database_health,
        catalog,
        sync_streams,
        memory_store,
        maintenance,
        monitoring,
        health_listener=health_listener,
    )
    await database_health.check_once()
    # Schedules start last: a scheduled job may run at once and should find the server up.
    await maintenance.scheduler.start()
    running.background = [
        asyncio.create_task(database_health.run_forever(), name="database-health"),
        asyncio.create_task(
            catalog.refresh_forever(settings.catalog_refresh_seconds), name="catalog-refresh"
        ),
    ]
    log.info(
        "serving on %s (%d exposed tables: %s)",
        running.address,
        len(catalog.current.tables),
        ", ".join(sorted(catalog.current.tables)) or "none",
    )
    return running


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then stops gracefully."""
    running = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await running.stop()
