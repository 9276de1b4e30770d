"""Requests that do not decode: every method of every service answers INVALID_ARGUMENT.

grpc.aio by itself answers them UNKNOWN ("Unexpected DecodeError") before any
handler runs; `services/requests.py` turns them into the service's own rich error.
Raw bytes go through generic multicallables, so nothing on the client encodes them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator

import asyncpg
import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from pg_activity import service_backends
from raptorflow.data.server.app import RunningServer
from raptorflow.data.v1 import (
    maintenance_service_pb2,
    memory_sync_service_pb2,
    monitoring_service_pb2,
    workspace_service_pb2,
)
from statuses import rpc_error

MALFORMED_REQUEST = "MALFORMED_REQUEST"
SERVICE_FILES = (
    workspace_service_pb2,
    memory_sync_service_pb2,
    maintenance_service_pb2,
    monitoring_service_pb2,
    health_pb2,
    reflection_pb2,
)
# Bytes no request message decodes: an invalid tag, a varint cut short, a length
# past the end, a field number 0.
GARBAGE = {
    "invalid-tag": b"\xff\xff\xff",
    "truncated-varint": b"\x08\x80",
    "length-past-end": b"\x0a\x05ab",
    "field-zero": b"\x00",
}
# Field 1 as a string holding invalid UTF-8: only for messages whose field 1 is a string.
INVALID_UTF8 = b"\x0a\x02\xc3\x28"


def methods() -> Iterator[MethodDescriptor]:
    for file in SERVICE_FILES:
        for service in file.DESCRIPTOR.services_by_name.values():
            yield from service.methods


def cases() -> Iterator[object]:
    for method in methods():
        payloads = dict(GARBAGE)
        first = method.input_type.fields_by_number.get(1)
        if first is not None and first.type == FieldDescriptor.TYPE_STRING:
            payloads["invalid-utf8"] = INVALID_UTF8
        message_class = message_factory.GetMessageClass(method.input_type)
        for name, payload in payloads.items():
            # Checked here, so the cases stay honest as protobuf's decoder changes.
            with pytest.raises(Exception):  # noqa: B017, PT011 (DecodeError, per implementation)
                message_class.FromString(payload)
            yield pytest.param(method, payload, id=f"{method.full_name}-{name}")


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


async def drain(responses: AsyncIterator[bytes]) -> None:
    async for _ in responses:
        pass


def raw_call(
    channel: grpc.aio.Channel, method: MethodDescriptor, requests: list[bytes]
) -> Awaitable[object]:
    """Sends `requests` as they are (the first only, to a unary method); the call to await."""
    name = path(method)
    if method.client_streaming and method.server_streaming:
        return drain(channel.stream_stream(name)(iter(requests), timeout=10))
    if method.client_streaming:
        return channel.stream_unary(name)(iter(requests), timeout=10)
    if method.server_streaming:
        return drain(channel.unary_stream(name)(requests[0], timeout=10))
    return channel.unary_unary(name)(requests[0], timeout=10)


@pytest.mark.parametrize(("method", "payload"), list(cases()))
async def test_a_request_that_does_not_decode_is_invalid_argument(
    channel: grpc.aio.Channel, method: MethodDescriptor, payload: bytes
) -> None:
    failure = await rpc_error(raw_call(channel, method, [payload]))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, failure.message
    assert failure.reason == MALFORMED_REQUEST
    assert failure.message == f"the request does not decode as {method.input_type.full_name}"


async def test_a_stream_fails_at_its_first_malformed_message(channel: grpc.aio.Channel) -> None:
    """A good batch, then one that does not decode: the call ends INVALID_ARGUMENT, not with
    whatever the handler would make of the error."""
    method = memory_sync_service_pb2.DESCRIPTOR.services_by_name["MemorySyncService"]
    upsert = method.methods_by_name["UpsertMemoryRecords"]
    good = memory_sync_service_pb2.UpsertMemoryRecordsRequest(
        workspace_id=str(uuid.uuid4()),
        records=[memory_sync_service_pb2.MemoryRecord(id="a", kind="fact", embedding=[1.0, 0.0])],
    )
    failure = await rpc_error(
        raw_call(channel, upsert, [good.SerializeToString(), GARBAGE["invalid-tag"]])
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, failure.message
    assert failure.reason == MALFORMED_REQUEST


async def test_the_measuring_interceptor_records_them(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    name = "/raptorflow.data.v1.WorkspaceService/Select"
    select = workspace_service_pb2.DESCRIPTOR.services_by_name["WorkspaceService"]
    await rpc_error(raw_call(channel, select.methods_by_name["Select"], [INVALID_UTF8]))
    calls = server.monitoring.rpcs.methods[name]
    assert grpc.StatusCode.INVALID_ARGUMENT in calls.by_code
    assert grpc.StatusCode.UNKNOWN not in calls.by_code


async def test_the_server_still_serves_and_holds_no_connection(
    channel: grpc.aio.Channel, db: asyncpg.Connection
) -> None:
    for method in methods():
        await rpc_error(raw_call(channel, method, [GARBAGE["truncated-varint"]]))
    health = health_pb2_grpc.HealthStub(channel)
    response = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    started = time.monotonic()
    while True:
        busy = [
            (r["state"], r["query"])
            for r in (await service_backends(db)).values()
            if r["state"] != "idle" and not r["query"].startswith("SELECT pg_stat")
        ]
        if not busy:
            break
        assert time.monotonic() - started < 5, f"service backends still busy: {busy}"
        await asyncio.sleep(0.05)
