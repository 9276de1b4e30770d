"""Builds the gRPC server and owns its lifecycle: start in order, stop in reverse.

Start: owner pool up, migrations applied, catalog read, query pool and session
connection up, server listening, first database check, then health SERVING.
Stop (SIGTERM/SIGINT): health NOT_SERVING, optional drain wait for load
balancers, open streams ended with UNAVAILABLE, unary calls given the grace
period, then the pools close last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db import migrations
from raptorflow.data.server.db.catalog import Catalog, CatalogCache, load_catalog
from raptorflow.data.server.db.connections import Database
from raptorflow.data.server.db.page_tokens import PageTokenCodec
from raptorflow.data.server.health import DatabaseHealth, HealthServicer
from raptorflow.data.server.memory.store import MemoryStore
from raptorflow.data.server.services.memory_sync import MemorySyncServicer
from raptorflow.data.server.services.workspace import WorkspaceServicer
from raptorflow.data.server.sync.streams import SyncStreams
from raptorflow.data.v1 import (
    memory_sync_service_pb2,
    memory_sync_service_pb2_grpc,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)

log = logging.getLogger(__name__)

WORKSPACE_SERVICE = workspace_service_pb2.DESCRIPTOR.services_by_name["WorkspaceService"].full_name
MEMORY_SYNC_SERVICE = memory_sync_service_pb2.DESCRIPTOR.services_by_name[
    "MemorySyncService"
].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVED_SERVICES = (WORKSPACE_SERVICE, MEMORY_SYNC_SERVICE)


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
        await self.server.stop(grace)
        for task in self.background:
            task.cancel()
        for task in self.background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.database.close()
        log.info("stopped")


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

    async def load() -> Catalog:
        async with database.owner_pool.acquire() as conn:
            catalog = await load_catalog(conn, settings.schema, settings.tables)
            fresh = set(catalog.tables) - provisioned
            if settings.query_role and fresh:
                await migrations.grant_tables(
                    conn, settings.query_role, settings.schema, sorted(fresh)
                )
                provisioned.update(fresh)
        return catalog

    return load


async def run_migrations(settings: Settings, database: Database) -> list[int]:
    async with database.owner_pool.acquire() as conn:
        applied = await migrations.apply_migrations(conn, migrations.bundled_migrations())
        if settings.query_role:
            await migrations.provision_app_role(conn, settings.query_role, settings.schema)
    return applied


def build_server(
    settings: Settings,
    database: Database,
    catalog: CatalogCache,
    health: HealthServicer,
    sync_streams: SyncStreams,
    memory_store: MemoryStore,
) -> grpc.aio.Server:
    """The grpc.aio server with every servicer, health and reflection added (not started)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # Never share a port silently with another process.
            ("grpc.so_reuseport", 0),
        ]
    )
    workspace_service_pb2_grpc.add_WorkspaceServiceServicer_to_server(
        WorkspaceServicer(settings, database, catalog, _token_codec(settings)), server
    )
    memory_sync_service_pb2_grpc.add_MemorySyncServiceServicer_to_server(
        MemorySyncServicer(sync_streams, memory_store), server
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
    try:
        await memory_store.prepare()
        await sync_streams.start()
    except BaseException:
        await sync_streams.close()
        await database.close()
        raise
    server = build_server(settings, database, catalog, health, sync_streams, memory_store)
    port = server.add_insecure_port(settings.listen)
    await server.start()
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
    )
    await database_health.check_once()
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
