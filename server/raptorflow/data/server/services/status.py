"""The one place errors become gRPC statuses (AIP-193 rich errors).

Servicer methods are wrapped with `@rpc_errors`. A `ServiceError` keeps its code,
reason and field violations; asyncpg errors are mapped by SQLSTATE (the
`_BY_SQLSTATE` table, falling back to the SQLSTATE class); an unreachable
database is UNAVAILABLE; anything else is INTERNAL and logged. No SQL text,
detail line or stack trace reaches the caller, and nothing is UNKNOWN.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import asyncpg
import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from raptorflow.data.server.db.connections import UNREACHABLE_ERRORS
from raptorflow.data.server.errors import ERROR_DOMAIN, Code, FieldViolation, ServiceError

log = logging.getLogger(__name__)

_GRPC_CODES: Mapping[Code, grpc.StatusCode] = {code: grpc.StatusCode[code.value] for code in Code}

# SQLSTATE -> (code, reason). Exact codes first; `_BY_CLASS` covers the rest of a class.
_BY_SQLSTATE: Mapping[str, tuple[Code, str]] = {
    "23505": (Code.ALREADY_EXISTS, "UNIQUE_VIOLATION"),
    "23P01": (Code.ALREADY_EXISTS, "EXCLUSION_VIOLATION"),
    "23502": (Code.INVALID_ARGUMENT, "NOT_NULL_VIOLATION"),
    "23514": (Code.INVALID_ARGUMENT, "CHECK_VIOLATION"),
    "23503": (Code.FAILED_PRECONDITION, "FOREIGN_KEY_VIOLATION"),
    "40001": (Code.ABORTED, "SERIALIZATION_FAILURE"),
    "40P01": (Code.ABORTED, "DEADLOCK_DETECTED"),
    "55P03": (Code.ABORTED, "LOCK_NOT_AVAILABLE"),
    "57014": (Code.DEADLINE_EXCEEDED, "STATEMENT_TIMEOUT"),
    "21000": (Code.INVALID_ARGUMENT, "ROW_AFFECTED_TWICE"),
    "22003": (Code.OUT_OF_RANGE, "NUMERIC_OUT_OF_RANGE"),
    "22008": (Code.OUT_OF_RANGE, "DATETIME_OUT_OF_RANGE"),
    "42501": (Code.FAILED_PRECONDITION, "INSUFFICIENT_PRIVILEGE"),
    "42P01": (Code.FAILED_PRECONDITION, "TABLE_CHANGED"),
    "42703": (Code.FAILED_PRECONDITION, "TABLE_CHANGED"),
    "42P10": (Code.INVALID_ARGUMENT, "NOT_A_UNIQUE_KEY"),
    "42883": (Code.INVALID_ARGUMENT, "UNSUPPORTED_OPERATION"),
    "42804": (Code.INVALID_ARGUMENT, "INVALID_VALUE"),
    "25006": (Code.FAILED_PRECONDITION, "READ_ONLY_DATABASE"),
    "53300": (Code.RESOURCE_EXHAUSTED, "TOO_MANY_CONNECTIONS"),
    "0A000": (Code.FAILED_PRECONDITION, "FEATURE_NOT_SUPPORTED"),
}
_BY_CLASS: Mapping[str, tuple[Code, str]] = {
    "08": (Code.UNAVAILABLE, "DATABASE_UNAVAILABLE"),
    "22": (Code.INVALID_ARGUMENT, "INVALID_VALUE"),
    "23": (Code.FAILED_PRECONDITION, "INTEGRITY_VIOLATION"),
    "40": (Code.ABORTED, "TRANSACTION_ROLLBACK"),
    "53": (Code.RESOURCE_EXHAUSTED, "DATABASE_RESOURCES_EXHAUSTED"),
    "57": (Code.UNAVAILABLE, "DATABASE_UNAVAILABLE"),
}


def _from_postgres(exc: asyncpg.PostgresError) -> ServiceError:
    sqlstate: str = getattr(exc, "sqlstate", "") or ""
    code, reason = _BY_SQLSTATE.get(sqlstate) or _BY_CLASS.get(
        sqlstate[:2], (Code.INTERNAL, "DATABASE_ERROR")
    )
    if sqlstate == "57014" and "statement timeout" not in str(exc):
        # Cancelled by an operator (pg_cancel_backend): rolled back, safe to retry.
        code, reason = Code.ABORTED, "QUERY_CANCELED"
    # Only the primary message, which names tables, columns and constraints but no SQL:
    # str(exc) would append asyncpg's DETAIL line, which repeats row values ("Key
    # (workspace_id, name)=(...) already exists", "Failing row contains (...)").
    primary = str(exc.args[0]) if exc.args else "the database refused the statement"
    metadata = {"sqlstate": sqlstate}
    violations: tuple[FieldViolation, ...] = ()
    column = getattr(exc, "column_name", None)
    constraint = getattr(exc, "constraint_name", None)
    table = getattr(exc, "table_name", None)
    for key, value in (("column", column), ("constraint", constraint), ("table", table)):
        if value:
            metadata[key] = value
    if code is Code.INVALID_ARGUMENT:
        # The field is the column (not-null) or the constraint (check) that refused the value.
        violations = (FieldViolation(column or constraint or "", primary),)
    if code is Code.INTERNAL:
        log.error("unmapped database error %s: %s", sqlstate, exc)
        return ServiceError(code, reason, "the database reported an unexpected error", (), metadata)
    return ServiceError(code, reason, primary, violations, metadata)


def to_service_error(exc: BaseException) -> ServiceError:
    """Maps any exception raised under a servicer method to a defined status."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, UNREACHABLE_ERRORS):
        return _from_postgres(exc)
    if isinstance(exc, TimeoutError):
        # asyncpg's per-statement timeout: the query was cancelled in PostgreSQL.
        return ServiceError(
            Code.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "the call's deadline passed"
        )
    if isinstance(exc, UNREACHABLE_ERRORS) or (
        isinstance(exc, asyncpg.InterfaceError)
        and ("connection" in str(exc) and "closed" in str(exc))
    ):
        return ServiceError(
            Code.UNAVAILABLE, "DATABASE_UNAVAILABLE", "the database cannot be reached"
        )
    if isinstance(exc, asyncpg.exceptions.DataError):
        # Raised by asyncpg before sending when a bound value does not encode.
        return ServiceError(
            Code.INVALID_ARGUMENT, "INVALID_VALUE", "a value does not fit its column"
        )
    log.exception("unexpected error in a call", exc_info=exc)
    return ServiceError(Code.INTERNAL, "INTERNAL", "the service failed unexpectedly")


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
