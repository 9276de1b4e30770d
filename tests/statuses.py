"""A failed call's rich status: the google.rpc.Status a grpc.aio error carries in its
`grpc-status-details-bin` trailer, and the AIP-193 details (ErrorInfo, BadRequest) in it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable

import grpc
import pytest
from conftest import SECRET
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"
DOMAIN = "data.raptorflow.dev"
# What the SQL the service runs looks like; none of it may reach a client.
SQL_FRAGMENTS = ("SELECT ", "INSERT INTO", 'UPDATE "', "DELETE FROM", "$1", "RETURNING", "unnest(")


@dataclasses.dataclass
class Failure:
    """A failed call's status and its AIP-193 details."""

    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    metadata: dict[str, str]
    fields: list[str]


def _statuses(error: grpc.aio.AioRpcError) -> list[status_pb2.Status]:
    raw = [value for key, value in (error.trailing_metadata() or ()) if key == DETAILS_KEY]
    assert all(isinstance(value, bytes) for value in raw)
    return [status_pb2.Status.FromString(value) for value in raw]


def _details(
    status: status_pb2.Status,
) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.BadRequest]:
    info = error_details_pb2.ErrorInfo()
    bad = error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            detail.Unpack(bad)
    return info, bad


async def rpc_error(call: Awaitable[object], *, echoed: str = "") -> Failure:
    """Awaits a call that must fail with a status of the service's own making: exactly one
    rich status that agrees with the gRPC one, an ErrorInfo of the service's domain, never
    UNKNOWN or INTERNAL, and no SQL or secret data in what the client sees.

    `echoed` is a name of the request that the message may quote back (a hostile table name
    can itself hold SQL); only the rest of the message is checked for SQL."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    statuses = _statuses(error)
    assert len(statuses) == 1, f"the status carries no single {DETAILS_KEY}"
    (status,) = statuses
    message = error.details() or ""
    assert status.code == error.code().value[0]
    assert status.message == error.details()
    info, bad = _details(status)
    assert info.domain == DOMAIN
    assert error.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), message
    own_words = message.replace(echoed, "") if echoed else message
    for fragment in SQL_FRAGMENTS:
        assert fragment not in own_words, message
    assert SECRET not in message
    assert SECRET not in str(status)
    return Failure(
        error.code(),
        message,
        info.reason,
        info.domain,
        dict(info.metadata),
        [violation.field for violation in bad.field_violations],
    )


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed call; "" when it carries none (a deadline the client
    enforced, a call cancelled)."""
    for status in _statuses(error):
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info.reason
    return ""


async def how_it_ended(call: Awaitable[object]) -> str:
    """ "OK", "CANCELLED" (cancelled by the client) or the status code's name of a call."""
    try:
        await call
    except asyncio.CancelledError:
        return "CANCELLED"
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"
