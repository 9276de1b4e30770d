"""The one place errors become gRPC statuses (AIP-193 rich errors).

Servicer methods are wrapped with `@rpc_errors`. A `ServiceError` keeps its code,
reason and field violations; any other exception is first mapped to one by
`db/failures.py` (asyncpg errors by SQLSTATE, an unreachable database as
UNAVAILABLE, anything else INTERNAL). No SQL text, detail line or stack trace
reaches the caller, and nothing is UNKNOWN.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from raptorflow.data.server.db.failures import to_service_error
from raptorflow.data.server.errors import ERROR_DOMAIN, Code, ServiceError

_GRPC_CODES: Mapping[Code, grpc.StatusCode] = {code: grpc.StatusCode[code.value] for code in Code}


def to_status(error: ServiceError) -> status_pb2.Status:
    """A google.rpc.Status with one ErrorInfo and, for bad input, a BadRequest."""
    grpc_code = _GRPC_CODES[error.code]
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=dict(error.metadata)
    )
    details: list[Message] = [info]
    if error.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in error.violations
                ]
            )
        )
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return status_pb2.Status(
        code=getattr(code_pb2, grpc_code.name), message=error.message, details=packed
    )


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: ServiceError) -> None:
    status = to_status(error)
    await context.abort(
        _GRPC_CODES[error.code],
        error.message,
        trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
    )


Request = TypeVar("Request")
Response = TypeVar("Response")
Servicer = TypeVar("Servicer")


def rpc_errors(
    method: Callable[
        [Servicer, Request, grpc.aio.ServicerContext[Request, Response]], Awaitable[Response]
    ],
) -> Callable[
    [Servicer, Request, grpc.aio.ServicerContext[Request, Response]], Awaitable[Response]
]:
    """Wraps a unary servicer method so every failure leaves as a defined status."""

    @functools.wraps(method)
    async def wrapper(
        self: Servicer, request: Request, context: grpc.aio.ServicerContext[Request, Response]
    ) -> Response:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, to_service_error(exc))
            raise AssertionError("abort returned") from exc

    return wrapper


def stream_errors(
    method: Callable[
        [Servicer, Request, grpc.aio.ServicerContext[Request, Response]], AsyncIterator[Response]
    ],
) -> Callable[
    [Servicer, Request, grpc.aio.ServicerContext[Request, Response]], AsyncIterator[Response]
]:
    """Wraps a server-streaming servicer method (an async generator) like `rpc_errors`.

    Messages already sent stay sent; the failure ends the stream with its status.
    """

    @functools.wraps(method)
    async def wrapper(
        self: Servicer, request: Request, context: grpc.aio.ServicerContext[Request, Response]
    ) -> AsyncIterator[Response]:
        try:
            async for response in method(self, request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, to_service_error(exc))

    return wrapper
