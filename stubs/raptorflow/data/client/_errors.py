"""The client's exceptions: one class per gRPC status code, with the AIP-193 details unpacked.

Every failed call raises a `DataError` subclass chosen by the status code::

    DataError
     ├── Cancelled            CANCELLED
     ├── UnknownError         UNKNOWN
     ├── InvalidArgument      INVALID_ARGUMENT     bad table, column, value, filter or page token
     ├── DeadlineExceeded     DEADLINE_EXCEEDED    the statement was cancelled in PostgreSQL
     ├── NotFound             NOT_FOUND
     ├── AlreadyExists        ALREADY_EXISTS       unique violation
     ├── PermissionDenied     PERMISSION_DENIED
     ├── ResourceExhausted    RESOURCE_EXHAUSTED   no database connection freed up in time
     ├── FailedPrecondition   FAILED_PRECONDITION  foreign-key violation; sync not installed
     │    └── ResnapshotRequired   reason RESNAPSHOT_REQUIRED: a resume token's changes pruned
     ├── Aborted              ABORTED              serialization failure or deadlock, rolled back
     ├── OutOfRange           OUT_OF_RANGE         a value does not fit its column
     ├── Unimplemented        UNIMPLEMENTED
     ├── InternalError        INTERNAL
     ├── Unavailable          UNAVAILABLE          the server or its database cannot be reached
     │    └── CommitOutcomeUnknown  reason COMMIT_OUTCOME_UNKNOWN: the write may have applied
     ├── DataLoss             DATA_LOSS
     └── Unauthenticated      UNAUTHENTICATED

The server's google.rpc.ErrorInfo gives `reason` (UNKNOWN_TABLE, UNKNOWN_COLUMN,
INVALID_VALUE, UNIQUE_VIOLATION...), `domain` ("data.raptorflow.dev") and
`metadata`; its google.rpc.BadRequest gives `field_violations`, whose paths name
the offending request field ("filter.condition.column"). The original
`grpc.aio.AioRpcError` stays reachable as `__cause__`.

A few reasons that call for their own handling get a subclass of their status
code's class, chosen by `reason`: `ResnapshotRequired` is the
FAILED_PRECONDITION with reason RESNAPSHOT_REQUIRED, so a sync consumer can
catch exactly it and start again without a resume token; `CommitOutcomeUnknown`
is the UNAVAILABLE of a write whose connection died after COMMIT was sent, so a
writer knows to read back (or write idempotently) before it tries again, while
any other `Unavailable` of a write means nothing was written.
"""

from collections.abc import Iterable, Mapping
from typing import ClassVar, Final, NamedTuple, cast

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN: Final = "data.raptorflow.dev"
"""The ErrorInfo domain of errors raised by the RaptorFlow Data server itself."""

_STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"


class FieldViolation(NamedTuple):
    """One bad request field, from google.rpc.BadRequest."""

    field: str
    """The path of the offending request field, such as "rows[2].values[0]"."""
    description: str
    """Why the field is bad, for humans."""
    reason: str = ""
    """A machine-readable reason, when the server gives one."""


class DataError(Exception):
    """A call to the RaptorFlow Data service failed. Subclasses name the status code."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    """The gRPC status code."""

    message: str
    """The status message, for humans."""
    reason: str
    """ErrorInfo.reason, a stable UPPER_SNAKE_CASE cause; "" when the status has none."""
    domain: str
    """ErrorInfo.domain, "data.raptorflow.dev" for the server's own errors."""
    metadata: dict[str, str]
    """ErrorInfo.metadata, such as the table or column concerned."""
    field_violations: tuple[FieldViolation, ...]
    """BadRequest.field_violations, the request fields that were rejected."""
    status: status_pb2.Status | None
    """The whole google.rpc.Status, for details this class does not unpack."""

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[FieldViolation] = (),
        status: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.field_violations = tuple(field_violations)
        self.status = status

    def __str__(self) -> str:
        # Agents often log only str(err), so everything needed to act on the
        # error goes into it, not just the message.
        text = f"{self.code.name}: {self.message}"
        if self.reason:
            text += f" [{self.reason}]"
        for violation in self.field_violations:
            line = f"{violation.field}: {violation.description}"
            if line != self.message:  # the server often puts a lone violation in the message
                text += f"\n  {line}"
        return text


class Cancelled(DataError):
    """The call was cancelled, usually by the caller."""

    code = grpc.StatusCode.CANCELLED


class UnknownError(DataError):
    """The server failed in a way it could not classify."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(DataError):
    """The request was rejected as it stands: see `field_violations`."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(DataError):
    """The deadline passed before the call finished; the statement was cancelled."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(DataError):
    """Something the request names does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DataError):
    """A written row conflicts with an existing one (unique violation)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(DataError):
    """The caller may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(DataError):
    """The server is out of a resource, such as free database connections."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(DataError):
    """The database state forbids the change, such as a foreign-key violation."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResnapshotRequired(FailedPrecondition):
    """A sync stream cannot resume: the changes after its resume token were pruned.

    Start a new stream without a resume token; it begins with a fresh snapshot.
    """

    REASON: ClassVar[str] = "RESNAPSHOT_REQUIRED"
    """The ErrorInfo reason the server sends for it."""


class Aborted(DataError):
    """The transaction was rolled back (serialization failure or deadlock); safe to retry."""

    code = grpc.StatusCode.ABORTED


class OutOfRange(DataError):
    """A value does not fit its column or the API's range."""

    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(DataError):
    """The server does not implement this call."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(DataError):
    """The server broke an invariant of its own."""

    code = grpc.StatusCode.INTERNAL


class Unavailable(DataError):
    """The server or its database cannot be reached right now."""

    code = grpc.StatusCode.UNAVAILABLE


class CommitOutcomeUnknown(Unavailable):
    """The database connection died after the write's COMMIT was sent: it may or may not
    have been applied.

    Read the rows back, or retry only a write that is idempotent (an upsert on a key,
    memory records by id). The client never retries it by itself.
    """

    REASON: ClassVar[str] = "COMMIT_OUTCOME_UNKNOWN"
    """The ErrorInfo reason the server sends for it."""


class DataLoss(DataError):
    """Data was lost or corrupted."""

    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(DataError):
    """The call carries no valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


_ERROR_BY_CODE: Final[Mapping[grpc.StatusCode, type[DataError]]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        UnknownError,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        InternalError,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


# Keyed by code and reason only: reasons are the server's own UPPER_SNAKE_CASE
# names, and a proxy that rewrote the domain should not hide them.
_ERROR_BY_REASON: Final[Mapping[tuple[grpc.StatusCode, str], type[DataError]]] = {
    (ResnapshotRequired.code, ResnapshotRequired.REASON): ResnapshotRequired,
    (CommitOutcomeUnknown.code, CommitOutcomeUnknown.REASON): CommitOutcomeUnknown,
}


def error_class(code: grpc.StatusCode) -> type[DataError]:
    """The exception class for a status code; UnknownError for OK and unknown codes."""
    return _ERROR_BY_CODE.get(code, UnknownError)


def _status_details(err: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    # grpc-stubs types trailing_metadata() as objects with .key and .value, but
    # grpc.aio returns a Metadata (or None) that iterates as (key, value) pairs.
    pairs = cast("Iterable[tuple[str, str | bytes]] | None", err.trailing_metadata())
    for key, value in pairs or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                # A proxy or a foreign server sent garbage; the status code and
                # message still describe the failure.
                return None
    return None


def from_rpc_error(err: grpc.aio.AioRpcError) -> DataError:
    """Builds the `DataError` subclass for a failed call, with its details unpacked.

    The returned exception has `err` as its `__cause__`, so tracebacks keep the
    gRPC debug string.
    """
    status = _status_details(err)
    message = (status.message if status is not None else "") or err.details() or ""
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    for detail in status.details if status is not None else ():
        # Unpack returns False when the Any holds another type, so each detail
        # is tried against the kinds this class knows and others are skipped.
        info = error_details_pb2.ErrorInfo()
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Unpack(bad_request):
            violations.extend(
                FieldViolation(v.field, v.description, v.reason)
                for v in bad_request.field_violations
            )
    code = err.code()
    cls = _ERROR_BY_REASON.get((code, reason)) or error_class(code)
    error = cls(
        message,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=violations,
        status=status,
    )
    error.__cause__ = err
    return error
