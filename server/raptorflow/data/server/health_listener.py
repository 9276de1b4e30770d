"""The optional plaintext port that serves only grpc.health.v1, for Kubernetes' gRPC probes.

Kubernetes' built-in gRPC probes speak neither TLS nor bearer tokens, so they
cannot check a TLS port, and an exec probe costs a process per check. With
`health_listen` set, a second grpc.aio server listens there in plaintext and
serves the health service and nothing else: every other method answers
UNIMPLEMENTED, so this port never exposes data, whatever reaches it. It shares
the main server's `HealthServicer`, so both ports report the same statuses,
NOT_SERVING during shutdown included.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2_grpc
from raptorflow.data.server.health import HealthServicer
from raptorflow.data.server.services.requests import RequestDecoding

log = logging.getLogger(__name__)

SETTING = "RAPTORFLOW_HEALTH_LISTEN (--health-listen)"

# Health requests hold one service name; anything much larger is not a probe.
_MAX_MESSAGE_BYTES = 64 * 1024


class HealthListener:
    """A started plaintext health-only server; `stop()` closes it."""

    def __init__(self, server: grpc.aio.Server, host: str, port: int) -> None:
        self.server = server
        self.port = port
        """The bound port (the one picked, when the setting asked for port 0)."""
        self._host = host

    @property
    def address(self) -> str:
        """HOST:PORT to probe, with the port actually bound."""
        return f"{self._host}:{self.port}"

    @classmethod
    async def start(cls, listen: str, health: HealthServicer) -> HealthListener:
        """Binds `listen` (HOST:PORT; port 0 picks a free one) and serves `health` there.

        Raises SystemExit naming the setting when `listen` is not HOST:PORT or cannot be
        bound, leaving nothing running.
        """
        host, separator, port_text = listen.rpartition(":")
        if not separator or not port_text.isdigit():
            raise SystemExit(f"invalid {SETTING} {listen!r}: expected HOST:PORT")
        server = grpc.aio.server(
            # No authentication here: probes carry no token, and health is open anyway.
            # Still, a request that does not decode gets INVALID_ARGUMENT, not UNKNOWN.
            interceptors=[RequestDecoding()],
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        try:
            port = server.add_insecure_port(listen)
        except RuntimeError as exc:
            await server.stop(None)
            raise SystemExit(f"cannot listen on {SETTING} {listen!r}: {exc}") from exc
        await server.start()
        log.info("health-only plaintext port on %s:%d", host or "0.0.0.0", port)
        return cls(server, host or "127.0.0.1", port)

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stops serving; health calls in flight get `grace` seconds (they take
        microseconds, and open Watch streams are ended by `HealthServicer.close_streams`)."""
        await self.server.stop(grace)
