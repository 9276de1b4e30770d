"""The one place errors become gRPC statuses (AIP-193 rich errors).

Servicer methods are wrapped with `@rpc_errors`. A `ServiceError` keeps its code,
reason and field violations; any other exception is first mapped to one by
`db/failures.py` (asyncpg errors by SQLSTATE, an unreachable database as
UNAVAILABLE, anything else INTERNAL). No SQL text, detail line or stack trace
reaches the caller, and nothing is UNKNOWN. A status echoing a huge request field is
cut to fit gRPC's metadata limit (`bounded`), or the caller would get RESOURCE_EXHAUSTED
from its own channel instead of the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from raptorflow.data.server.db.failures import to_service_error
from raptorflow.data.server.errors import ERROR_DOMAIN, Code, FieldViolation, ServiceError

_GRPC_CODES: Mapping[Code, grpc.StatusCode] = {code: grpc.StatusCode[code.value] for code in Code}

# A client drops a response whose metadata passes 8 KiB (gRPC's default soft limit; 16 KiB
# hard) and reports RESOURCE_EXHAUSTED ("Stream removed") instead of the error. Messages
# and details echo request fields (a table name, a value) of any size, so a status is cut
# to fit: its message goes out twice (grpc-message, percent-encoded at up to three bytes a
# byte, and in the details), the details once, base64-encoded. At these bounds the whole
# trailer stays under about 7 KiB.
MAX_MESSAGE_BYTES = 512
MAX_FIELD_BYTES = 512
MAX_DESCRIPTION_BYTES = 256
MAX_VIOLATIONS_BYTES = 2048
MAX_METADATA_BYTES = 1024
MAX_METADATA_VALUE_BYTES = 128
# What protobuf adds around each field violation or metadata entry (tags and lengths),
# counted against the budgets so that thousands of tiny ones cannot pass them either.
_ENTRY_OVERHEAD = 8
_ELLIPSIS = "…"


def _cut(text: str, limit: int) -> str:
    """`text` in at most `limit` UTF-8 bytes, ending in an ellipsis when it was cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    # errors="ignore" drops a character the cut split in two.
    return data[: limit - len(_ELLIPSIS.encode())].decode(errors="ignore") + _ELLIPSIS


def bounded(error: ServiceError) -> ServiceError:
    """`error` cut to fit gRPC's metadata limit: message, field violations (the first ones
    that fit) and ErrorInfo metadata each within a byte budget. Small errors come back as
    they are."""
    violations: list[FieldViolation] = []
    budget = MAX_VIOLATIONS_BYTES
    for violation in error.violations:
        field_path = _cut(violation.field, MAX_FIELD_BYTES)
        description = _cut(violation.description, MAX_DESCRIPTION_BYTES)
        size = len(field_path.encode()) + len(description.encode()) + _ENTRY_OVERHEAD
        if size > budget:
            break
        budget -= size
        violations.append(FieldViolation(field_path, description))
    metadata: dict[str, str] = {}
    budget = MAX_METADATA_BYTES
    for name, text in error.metadata.items():
        key, value = _cut(name, MAX_METADATA_VALUE_BYTES), _cut(text, MAX_METADATA_VALUE_BYTES)
        size = len(key.encode()) + len(value.encode()) + _ENTRY_OVERHEAD
        if size > budget:
            break
        budget -= size
        metadata[key] = value
    message = _cut(error.message, MAX_MESSAGE_BYTES)
    if (
        message is error.message
        and violations == list(error.violations)
        and metadata == dict(error.metadata)
    ):
        return error
    return ServiceError(error.code, error.reason, message, tuple(violations), metadata)


def to_status(error: ServiceError) -> status_pb2.Status:
    """A google.rpc.Status with one ErrorInfo and, for bad input, a BadRequest (of `error`
    as it is: `abort_with` bounds it first)."""
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
    """Ends the call with `error` (cut to fit the metadata limit) as its status and details."""
    error = bounded(error)
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
        stream = method(self, request, context)
        if isinstance(stream, AsyncGenerator):
            # grpc-stubs types the callback as its nominal DoneCallback class; any
            # callable taking the context is what grpc.aio calls.
            context.add_done_callback(
                functools.partial(_close_when_done, stream)  # type: ignore[arg-type]
            )
        try:
            async for response in stream:
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, to_service_error(exc))

    return wrapper


# Streams being closed after their call ended; kept so the tasks are not collected early.
_closing: set[asyncio.Task[None]] = set()


def _close_when_done(stream: AsyncGenerator[Any, None], _context: object) -> None:
    """Closes a streaming handler's generator once its call ended.

    grpc.aio leaves a handler's generator suspended, unclosed, when the call is
    cancelled while a message waits to be sent, and only garbage collection
    closes it later. Until then its `finally` and `async with` blocks have not
    run: a backup's COPY kept its owner connection idle in a transaction, a
    snapshot its pool connection. Closing it when the call ends runs them at once.
    """
    task = asyncio.get_running_loop().create_task(_close(stream))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


async def _close(stream: AsyncGenerator[Any, None]) -> None:
    # A generator still running is unwinding by itself (the cancel reached it).
    with contextlib.suppress(RuntimeError):
        await stream.aclose()
