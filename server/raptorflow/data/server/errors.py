"""Errors the service reports to callers, independent of gRPC.

The database edge and the query compiler raise these; the servicer edge
(`services/status.py`) is the only place that turns them into gRPC statuses.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

ERROR_DOMAIN = "data.raptorflow.dev"


class Code(enum.Enum):
    """The subset of canonical status codes this service reports."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    ABORTED = "ABORTED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    DATA_LOSS = "DATA_LOSS"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field: a path such as `filter.condition.column`."""

    field: str
    description: str

    def prefixed(self, prefix: str) -> FieldViolation:
        return FieldViolation(f"{prefix}.{self.field}" if self.field else prefix, self.description)


@dataclass
class ServiceError(Exception):
    """A failure with a defined status, reason and (for bad input) field violations."""

    code: Code
    reason: str
    message: str
    violations: tuple[FieldViolation, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def prefixed(self, prefix: str) -> ServiceError:
        """The same error with every field path put under `prefix` (batch operations)."""
        return ServiceError(
            self.code,
            self.reason,
            self.message,
            tuple(v.prefixed(prefix) for v in self.violations),
            self.metadata,
        )


def invalid_argument(
    field_path: str,
    description: str,
    *,
    reason: str = "INVALID_ARGUMENT",
    code: Code = Code.INVALID_ARGUMENT,
    metadata: Mapping[str, str] | None = None,
) -> ServiceError:
    """A bad request field; the message repeats the description for plain clients."""
    return ServiceError(
        code,
        reason,
        f"{field_path}: {description}" if field_path else description,
        (FieldViolation(field_path, description),),
        dict(metadata or {}),
    )


def combine(errors: Iterable[ServiceError]) -> ServiceError | None:
    """Several field errors as one INVALID_ARGUMENT, so a caller sees them all at once."""
    collected = list(errors)
    if not collected:
        return None
    if len(collected) == 1:
        return collected[0]
    first = collected[0]
    violations = tuple(v for e in collected for v in e.violations)
    return ServiceError(
        first.code, first.reason, "; ".join(e.message for e in collected), violations
    )
