"""A real in-process grpc.aio server for scripted servicers, for client tests without the server.

The client's unit tests talk to hand-written servicers over a real channel, so
streaming, deadlines, retries and status details go over the wire:

    async with serve(lambda server: add_FooServicer_to_server(fake, server)) as target:
        async with DataClient(target) as client:
            ...
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

Failure: TypeAlias = grpc.StatusCode | status_pb2.Status
"""What a scripted call fails with: a bare status code, or a status with details."""


@dataclass
class Received:
    """One call as the fake servicer saw it."""

    method: str
    request: Any
    metadata: dict[str, str | bytes]
    time_remaining: float | None


def received(method: str, request: Any, context: Any) -> Received:
    return Received(method, request, dict(context.invocation_metadata()), context.time_remaining())


async def fail(context: Any, failure: Failure) -> None:
    """Ends the call with `failure` (both forms raise, as context.abort does)."""
    if isinstance(failure, status_pb2.Status):
        await context.abort_with_status(rpc_status.to_status(failure))
    else:
        await context.abort(failure, f"scripted {failure.name}")


def error_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: Mapping[str, str] | None = None,
) -> status_pb2.Status:
    """A google.rpc.Status with the server's ErrorInfo, as services/status.py sends it."""
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason=reason, domain="data.raptorflow.dev", metadata=dict(metadata or {})
        )
    )
    return status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[info])


@contextlib.asynccontextmanager
async def serve(register: Callable[[grpc.aio.Server], None]) -> AsyncIterator[str]:
    """A grpc.aio server on 127.0.0.1:0 with the servicers `register` adds; yields its target."""
    server = grpc.aio.server()
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
