"""What a failure under a call means to the caller: exceptions mapped to `ServiceError`.

asyncpg errors are mapped by SQLSTATE (the `_BY_SQLSTATE` table, falling back
to the SQLSTATE class); an unreachable database is UNAVAILABLE; anything else
is INTERNAL and logged. No SQL text or DETAIL line (which repeats row values)
reaches the message. Free of gRPC, so the job runner records failures in the
same terms as the servicer edge (`services/status.py`) reports them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import asyncpg
from raptorflow.data.server.db.connections import UNREACHABLE_ERRORS, connection_lost
from raptorflow.data.server.errors import Code, FieldViolation, ServiceError

log = logging.getLogger(__name__)

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
    # wrong_object_type: a statement met an object of another kind than it works on (a
    # table replaced by a view since the catalog was read, say): the database's state,
    # not the request, is at fault.
    "42809": (Code.FAILED_PRECONDITION, "WRONG_OBJECT_TYPE"),
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
    if sqlstate == "42501" and "row-level security" in str(exc.args[0] if exc.args else ""):
        return _row_security_violation(str(exc.args[0]))
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
        # The primary message only: str(exc) would add the DETAIL line's row values.
        log.error("unmapped database error %s: %s", sqlstate, primary)
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
    if connection_lost(exc) or _broken_by_the_server(exc):
        return ServiceError(
            Code.UNAVAILABLE, "DATABASE_UNAVAILABLE", "the database cannot be reached"
        )
    if isinstance(exc, asyncpg.InterfaceError) and "released back to the pool" in str(exc):
        # The leak watchdog took the connection back from a call that held it too long.
        return ServiceError(
            Code.ABORTED,
            "CONNECTION_RECLAIMED",
            "the call held its database connection past the leak limit and lost it",
        )
    if isinstance(exc, asyncpg.exceptions.DataError):
        # Raised by asyncpg before sending when a bound value does not encode.
        return ServiceError(
            Code.INVALID_ARGUMENT, "INVALID_VALUE", "a value does not fit its column"
        )
    log.exception("unexpected error in a call", exc_info=exc)
    return ServiceError(Code.INTERNAL, "INTERNAL", "the service failed unexpectedly")


def _broken_by_the_server(exc: BaseException) -> bool:
    """A statement refused before it was sent because the connection is in the middle of
    an error: the server ended the session (pg_terminate_backend, a shutdown) while it was
    idle, and asyncpg has read the FATAL message but not yet the end of the connection.

    asyncpg then says "cannot switch to state N; another operation (M) is in progress".
    Nothing was sent and the session's transaction is gone: UNAVAILABLE, nothing written.
    """
    return isinstance(exc, asyncpg.InternalClientError) and "cannot switch to state" in str(exc)


def _row_security_violation(message: str) -> ServiceError:
    """A statement the row-level security net stopped (db/row_security.py).

    "(USING expression)": an upsert met, on its conflict key, a row of another
    workspace, which it may neither see nor update; a plain insert of that key
    would fail with a unique violation, so this one reads the same. Otherwise a
    write would have put a row into another workspace, which the compiler
    refuses before any statement runs: the net caught what it is there for.
    """
    if "(USING expression)" in message:
        return ServiceError(
            Code.ALREADY_EXISTS,
            "UNIQUE_VIOLATION",
            "a row of another workspace holds the conflict key",
        )
    return ServiceError(
        Code.PERMISSION_DENIED, "ROW_SECURITY", "the row is outside the request's workspace"
    )
