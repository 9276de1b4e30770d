"""The standard grpc.health.v1 service, driven by a background database check.

The empty service name is liveness: SERVING for as long as the process serves,
so a database outage does not get every pod restarted. `readiness` and each
raptorflow service's own name follow the database: NOT_SERVING while it cannot
be reached, SERVING again when it returns. The check runs on the dedicated
session connection, never waiting behind a busy pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health_pb2
from raptorflow.data.server.db.connections import Database

log = logging.getLogger(__name__)

READINESS = "readiness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
Status: TypeAlias = "health_pb2.HealthCheckResponse.ServingStatus"


class HealthServicer:
    """grpc.health.v1.Health (Check, List and Watch) for grpc.aio, ending Watch streams at shutdown.

    Behaves as grpc's reference aio servicer (a status per name, watchers woken
    on every change). It is written out here because the reference class is
    untyped, and because a Watch stream must end with UNAVAILABLE when the server
    stops: otherwise it holds `server.stop(grace)` open for the whole grace
    period instead of telling the client to reconnect elsewhere at once.
    """

    def __init__(self) -> None:
        self._status: dict[str, Status] = {"": SERVING}
        # Replaced on every change: a watcher waits on the event it saw last.
        self._changed = asyncio.Event()
        self._shutting_down = False
        self._closing = asyncio.Event()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown service {request.service[:200]!r}"
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._status.items()
            }
        )

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        last = None
        closing = asyncio.ensure_future(self._closing.wait())
        waiting: asyncio.Future[Any] | None = None
        try:
            while not self._closing.is_set():
                changed = self._changed
                status = self._status.get(
                    request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                )
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                waiting = asyncio.ensure_future(changed.wait())
                await asyncio.wait({waiting, closing}, return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
        finally:
            # A Watch cancelled by its client must not leave its waiters pending.
            closing.cancel()
            if waiting is not None:
                waiting.cancel()
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

    def serving(self) -> dict[str, bool]:
        """Whether each known name is SERVING now (for the metrics)."""
        return {name: status == SERVING for name, status in self._status.items()}

    async def set(self, service: str, status: Status) -> None:
        """Sets one name's status; ignored once shutdown has begun."""
        if not self._shutting_down:
            self._set(service, status)

    def _set(self, service: str, status: Status) -> None:
        self._status[service] = status
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def enter_graceful_shutdown(self) -> None:
        """Permanently sets every name NOT_SERVING."""
        if self._shutting_down:
            return
        self._shutting_down = True
        for service in list(self._status):
            self._set(service, NOT_SERVING)

    async def close_streams(self) -> None:
        """Ends every open Watch with UNAVAILABLE (after they have seen NOT_SERVING)."""
        self._closing.set()


class DatabaseHealth:
    """Checks the database every few seconds and sets the health statuses to match."""

    def __init__(
        self,
        servicer: HealthServicer,
        database: Database,
        services: Iterable[str],
        *,
        interval: float,
    ) -> None:
        self._servicer = servicer
        self._database = database
        self._names = (READINESS, *services)
        self._interval = interval
        self._serving: bool | None = None
        self._outage = False

    @property
    def serving(self) -> bool:
        return bool(self._serving)

    async def set_all(self, serving: bool) -> None:
        for name in self._names:
            await self._servicer.set(name, SERVING if serving else NOT_SERVING)
        self._serving = serving

    async def check_once(self) -> bool:
        healthy = await self._database.check()
        if healthy != self._serving:
            if healthy and self._outage:
                # Connections pooled before the outage are broken; replace them lazily.
                await self._database.expire_pooled_connections()
            self._outage = not healthy
            log.log(
                logging.INFO if healthy else logging.WARNING,
                "database %s",
                "reachable: serving" if healthy else "unreachable: not serving",
            )
            await self.set_all(healthy)
        return healthy

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check_once()
