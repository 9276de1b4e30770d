"""Limits that keep one caller from hurting others: each is a clear error, not a crash or a
stalled server.

Covered here: message size (requests and responses, unary and streamed), filter depth
(the compiler's, and protobuf's own decoding limit beyond it), IN list size, operations
per batch, rows per upsert, and the size of an error itself (a status that echoes a
huge request field must still fit gRPC's metadata limit). Tested elsewhere: rows per
insert and per batch (test_mutations.test_too_many_rows), memory records per batch,
ids per delete, embedding dimensions and top_k (test_memory_records), page size
(test_select), streams per caller (test_stream_auth).

Each limit is probed at the limit (accepted) and one past it (refused with
INVALID_ARGUMENT or RESOURCE_EXHAUSTED and the field at fault), and the server
answers a plain call afterwards.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from conftest import start_server
from fuzz_strategies import deep_bytes, length_delimited
from grpc_health.v1 import health_pb2, health_pb2_grpc
from messages import Row, Value, all_of, cond, eq, negate, row, v
from pg_activity import service_backends
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.compiler import MAX_FILTER_DEPTH, MAX_IN_VALUES
from raptorflow.data.server.services.workspace import MAX_BATCH_OPERATIONS
from raptorflow.data.v1 import (
    job_pb2,
    maintenance_service_pb2,
    maintenance_service_pb2_grpc,
    memory_sync_service_pb2,
    memory_sync_service_pb2_grpc,
    query_pb2,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)
from statuses import rpc_error
from tokens import authorized_channel

pb = workspace_service_pb2
q = query_pb2
Stub = workspace_service_pb2_grpc.WorkspaceServiceStub

# Small enough that a test builds messages past it in a moment.
SMALL_MESSAGE_BYTES = 64 * 1024


async def seed(stub: Stub, workspace: str, count: int) -> list[int]:
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "priority"],
            rows=[row(f"r{i}", i) for i in range(count)],
            returning=["id"],
        ),
        timeout=30,
    )
    return [r.values[0].int64_value for r in inserted.returning.rows]


async def seed_large(db: asyncpg.Connection, workspace: str, count: int, size: int) -> None:
    """Rows with a `size`-byte payload each, written directly: together past the limit."""
    await db.executemany(
        "INSERT INTO campaigns (workspace_id, name, payload) VALUES ($1, $2, $3)",
        [(uuid.UUID(workspace), f"large{i}", bytes([i]) * size) for i in range(count)],
    )


async def still_serves(channel: grpc.aio.Channel, workspace: str) -> None:
    """The server answers health checks and a plain count after the refusal."""
    health = health_pb2_grpc.HealthStub(channel)
    checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert checked.status == health_pb2.HealthCheckResponse.SERVING
    await Stub(channel).Count(
        pb.CountRequest(workspace_id=workspace, table="campaigns"), timeout=10
    )


async def service_idle(db: asyncpg.Connection, within: float = 10.0) -> None:
    """Waits until no connection of the service is busy or idle in a transaction."""
    started = time.monotonic()
    while True:
        busy = [r for r in (await service_backends(db)).values() if r["state"] != "idle"]
        if not busy:
            return
        assert time.monotonic() - started < within, f"service backends still busy: {busy}"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------
# Message size


@pytest.fixture(scope="module")
async def small_messages(settings: Settings) -> AsyncIterator[RunningServer]:
    running = await start_server(settings, max_message_bytes=SMALL_MESSAGE_BYTES)
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


@pytest.fixture(scope="module")
async def small_channel(small_messages: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with authorized_channel(small_messages.address) as channel:
        yield channel


async def test_a_request_over_the_message_limit_is_resource_exhausted(
    small_channel: grpc.aio.Channel, db: asyncpg.Connection, workspace: str
) -> None:
    stub = Stub(small_channel)
    # Just under the limit: accepted.
    fits = pb.InsertRequest(workspace_id=workspace, table="campaigns", columns=["name", "payload"])
    fits.rows.append(Row(values=[v("fits"), Value(bytes_value=b"")]))
    fits.rows[0].values[1].bytes_value = b"x" * (SMALL_MESSAGE_BYTES - fits.ByteSize() - 16)
    assert fits.ByteSize() <= SMALL_MESSAGE_BYTES
    await stub.Insert(fits, timeout=10)
    too_big = pb.InsertRequest(
        workspace_id=workspace,
        table="campaigns",
        columns=["name", "payload"],
        rows=[Row(values=[v("too big"), Value(bytes_value=b"x" * SMALL_MESSAGE_BYTES)])],
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Insert(too_big, timeout=10)
    # gRPC itself refuses it, before any handler runs: no rich status to expect.
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
    names = await db.fetch("SELECT name FROM campaigns WHERE workspace_id = $1", workspace)
    assert [r["name"] for r in names] == ["fits"]
    await still_serves(small_channel, workspace)


async def test_a_request_stream_message_over_the_limit_is_resource_exhausted(
    small_channel: grpc.aio.Channel, db: asyncpg.Connection, workspace: str
) -> None:
    """The call ends at the oversized message: the batch before it may have committed (each
    batch commits on its own, if the handler got to it first), nothing after it did."""
    memory = memory_sync_service_pb2_grpc.MemorySyncServiceStub(small_channel)

    async def batches() -> AsyncIterator[memory_sync_service_pb2.UpsertMemoryRecordsRequest]:
        yield memory_sync_service_pb2.UpsertMemoryRecordsRequest(
            workspace_id=workspace,
            records=[memory_sync_service_pb2.MemoryRecord(id="a", kind="k", embedding=[1.0])],
        )
        yield memory_sync_service_pb2.UpsertMemoryRecordsRequest(
            workspace_id=workspace,
            records=[
                memory_sync_service_pb2.MemoryRecord(
                    id="b", kind="k", content="x" * SMALL_MESSAGE_BYTES, embedding=[1.0]
                )
            ],
        )

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await memory.UpsertMemoryRecords(batches(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
    stored = await db.fetch(
        "SELECT id FROM raptorflow_data.memory_records WHERE workspace_id = $1",
        uuid.UUID(workspace),
    )
    assert [r["id"] for r in stored] in (["a"], [])
    await service_idle(db)
    await still_serves(small_channel, workspace)


async def test_a_response_over_the_message_limit_is_a_clear_error(
    small_channel: grpc.aio.Channel, db: asyncpg.Connection, workspace: str
) -> None:
    """Rows that together outgrow the limit: the page does not reach the caller, the call
    fails with a defined status, and a smaller page of the same rows still works."""
    stub = Stub(small_channel)
    await seed_large(db, workspace, 8, SMALL_MESSAGE_BYTES // 4)
    request = pb.SelectRequest(workspace_id=workspace, table="campaigns", columns=["payload"])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Select(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
    assert "larger than max" in (refused.value.details() or "")
    request.page_size = 2
    page = await stub.Select(request, timeout=10)
    assert len(page.rows) == 2
    await still_serves(small_channel, workspace)


async def test_an_export_asking_for_chunks_over_the_message_limit_gets_smaller_ones(
    small_channel: grpc.aio.Channel, db: asyncpg.Connection, workspace: str
) -> None:
    """Backup chunks larger than a message may be are cut to fit: the export completes, every
    message within the limit, and its connection goes back."""
    await seed_large(db, workspace, 8, SMALL_MESSAGE_BYTES // 4)
    maintenance = maintenance_service_pb2_grpc.MaintenanceServiceStub(small_channel)
    scope = job_pb2.BackupScope(workspace_id=workspace, tables=["campaigns"])
    call = maintenance.ExportBackup(
        maintenance_service_pb2.ExportBackupRequest(scope=scope, chunk_bytes=1 << 20), timeout=30
    )
    messages = [message async for message in call]
    assert messages[-1].WhichOneof("part") == "manifest"
    assert messages[-1].manifest.tables[0].row_count == 8
    assert all(m.ByteSize() <= SMALL_MESSAGE_BYTES for m in messages)
    assert sum(m.WhichOneof("part") == "chunk" for m in messages) > 1
    await service_idle(db)
    await still_serves(small_channel, workspace)


# ---------------------------------------------------------------------------
# Filter depth


def nested(depth: int) -> q.Filter:
    """A filter `depth` levels deep (the outermost filter is level 1): groups and
    negations in turn around one condition."""
    f = cond("priority", q.OPERATOR_IS_NOT_NULL)
    for level in range(depth - 1):
        f = all_of(f) if level % 2 else negate(f)
    return f


def test_nested_counts_levels_as_the_compiler_does() -> None:
    depth = 0
    f: q.Filter | None = nested(5)
    while f is not None:
        depth += 1
        which = f.WhichOneof("kind")
        if which == "group":
            f = f.group.filters[0]
        elif which == "negation":
            f = f.negation.filter
        else:
            f = None
    assert depth == 5


async def test_filters_nest_at_most_max_filter_depth_levels(
    stub: Stub, db: asyncpg.Connection, workspace: str
) -> None:
    await seed(stub, workspace, 3)
    deepest = nested(MAX_FILTER_DEPTH)
    counted = await stub.Count(
        pb.CountRequest(workspace_id=workspace, table="campaigns", filter=deepest)
    )
    assert counted.count in (0, 3)
    too_deep = nested(MAX_FILTER_DEPTH + 1)
    requests = {
        "select": stub.Select(
            pb.SelectRequest(workspace_id=workspace, table="campaigns", filter=too_deep)
        ),
        "count": stub.Count(
            pb.CountRequest(workspace_id=workspace, table="campaigns", filter=too_deep)
        ),
        "update": stub.Update(
            pb.UpdateRequest(
                workspace_id=workspace,
                table="campaigns",
                values={"status": v("deep")},
                filter=too_deep,
            )
        ),
        "delete": stub.Delete(
            pb.DeleteRequest(workspace_id=workspace, table="campaigns", filter=too_deep)
        ),
    }
    for name, call in requests.items():
        failure = await rpc_error(call)
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, name
        assert "nest at most" in failure.message, (name, failure.message)
        # The field path names the level past the limit.
        assert len(failure.fields) == 1, name
        assert failure.fields[0].startswith("filter."), name
        assert failure.fields[0].count("filter") == MAX_FILTER_DEPTH + 1, failure.fields
    statuses = await db.fetch(
        "SELECT DISTINCT status FROM campaigns WHERE workspace_id = $1", workspace
    )
    assert [r["status"] for r in statuses] == [None]
    assert (
        await db.fetchval("SELECT count(*) FROM campaigns WHERE workspace_id = $1", workspace) == 3
    )


async def test_a_too_deep_filter_in_a_batch_names_its_operation(stub: Stub, workspace: str) -> None:
    failure = await rpc_error(
        stub.ExecuteBatch(
            pb.ExecuteBatchRequest(
                workspace_id=workspace,
                operations=[
                    pb.BatchOperation(
                        delete=pb.DeleteRequest(table="campaigns", filter=eq("name", "x"))
                    ),
                    pb.BatchOperation(
                        delete=pb.DeleteRequest(
                            table="campaigns", filter=nested(MAX_FILTER_DEPTH + 1)
                        )
                    ),
                ],
            )
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.fields[0].startswith("operations[1].delete.filter."), failure.fields


async def test_a_filter_deeper_than_protobuf_decodes_is_invalid_argument(
    channel: grpc.aio.Channel, workspace: str
) -> None:
    """Far past the compiler's limit, protobuf's own recursion limit refuses the request
    before any handler runs: still INVALID_ARGUMENT, not the UNKNOWN grpc.aio would send."""
    request = pb.SelectRequest(workspace_id=workspace, table="campaigns").SerializeToString()
    filter_field = pb.SelectRequest.DESCRIPTOR.fields_by_name["filter"].number
    deep = deep_bytes(q.Filter.DESCRIPTOR, 200)
    assert deep is not None
    select = channel.unary_unary("/raptorflow.data.v1.WorkspaceService/Select")
    failure = await rpc_error(select(request + length_delimited(filter_field, deep), timeout=10))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "MALFORMED_REQUEST"
    await still_serves(channel, workspace)


# ---------------------------------------------------------------------------
# IN lists


async def test_in_lists_take_at_most_max_in_values(stub: Stub, workspace: str) -> None:
    ids = await seed(stub, workspace, 2)
    largest = [v(i) for i in range(-MAX_IN_VALUES + 2, 0)] + [v(i) for i in ids]
    assert len(largest) == MAX_IN_VALUES
    counted = await stub.Count(
        pb.CountRequest(
            workspace_id=workspace,
            table="campaigns",
            filter=cond("id", q.OPERATOR_IN, values=largest),
        ),
        timeout=30,
    )
    assert counted.count == 2
    failure = await rpc_error(
        stub.Count(
            pb.CountRequest(
                workspace_id=workspace,
                table="campaigns",
                filter=cond("id", q.OPERATOR_IN, values=[*largest, v(0)]),
            ),
            timeout=30,
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.fields == ["filter.condition.values"]
    assert f"at most {MAX_IN_VALUES}" in failure.message


# ---------------------------------------------------------------------------
# Batches and rows


def _insert_operation(name: str) -> pb.BatchOperation:
    return pb.BatchOperation(
        insert=pb.InsertRequest(table="campaigns", columns=["name"], rows=[row(name)])
    )


async def test_a_batch_takes_at_most_max_batch_operations(
    stub: Stub, db: asyncpg.Connection, workspace: str
) -> None:
    full = [_insert_operation(f"op{i}") for i in range(MAX_BATCH_OPERATIONS)]
    done = await stub.ExecuteBatch(pb.ExecuteBatchRequest(workspace_id=workspace, operations=full))
    assert len(done.results) == MAX_BATCH_OPERATIONS
    failure = await rpc_error(
        stub.ExecuteBatch(
            pb.ExecuteBatchRequest(
                workspace_id=workspace, operations=[*full, _insert_operation("one too many")]
            )
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.fields == ["operations"]
    empty = await rpc_error(stub.ExecuteBatch(pb.ExecuteBatchRequest(workspace_id=workspace)))
    assert (empty.code, empty.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["operations"])
    count = await db.fetchval("SELECT count(*) FROM campaigns WHERE workspace_id = $1", workspace)
    assert count == MAX_BATCH_OPERATIONS


async def test_an_upsert_takes_at_most_max_rows_per_request(
    settings: Settings, db: asyncpg.Connection, workspace: str
) -> None:
    running = await start_server(settings, max_rows_per_request=3)
    try:
        async with authorized_channel(running.address) as channel:
            small = Stub(channel)

            def upsert(count: int) -> pb.UpsertRequest:
                return pb.UpsertRequest(
                    workspace_id=workspace,
                    table="campaigns",
                    columns=["name"],
                    rows=[row(f"u{i}") for i in range(count)],
                    conflict_columns=["name"],
                    on_conflict=pb.CONFLICT_ACTION_IGNORE,
                )

            await small.Upsert(upsert(3), timeout=10)
            failure = await rpc_error(small.Upsert(upsert(4), timeout=10))
            assert (failure.code, failure.reason, failure.fields) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "TOO_MANY_ROWS",
                ["rows"],
            )
            batch = await rpc_error(
                small.ExecuteBatch(
                    pb.ExecuteBatchRequest(
                        workspace_id=workspace,
                        operations=[
                            pb.BatchOperation(upsert=upsert(2)),
                            pb.BatchOperation(upsert=upsert(2)),
                        ],
                    ),
                    timeout=10,
                )
            )
            assert (batch.code, batch.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_ROWS")
            await still_serves(channel, workspace)
    finally:
        await running.stop(grace=0.5)
    names = await db.fetch(
        "SELECT name FROM campaigns WHERE workspace_id = $1 ORDER BY name", workspace
    )
    assert [r["name"] for r in names] == ["u0", "u1", "u2"]


# ---------------------------------------------------------------------------
# Error size


@pytest.mark.parametrize(
    "name", ["x" * 100_000, "😀" * 5_000, "'" * 20_000], ids=["ascii", "emoji", "quotes"]
)
async def test_an_error_echoing_a_huge_name_still_reaches_the_caller(
    stub: Stub, workspace: str, name: str
) -> None:
    """A client refuses trailers over 8 KiB (gRPC's default): an error that quoted the
    name whole would reach the caller as its channel's RESOURCE_EXHAUSTED instead. Found
    by the fuzzer (a 10,000-character table name)."""
    described = await rpc_error(stub.DescribeTables(pb.DescribeTablesRequest(tables=[name])))
    assert (described.code, described.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_TABLE")
    assert len(described.message.encode()) <= 512
    assert described.message.endswith("…")
    selected = await rpc_error(
        stub.Select(
            pb.SelectRequest(workspace_id=workspace, table="campaigns", columns=["id", name])
        )
    )
    assert selected.code == grpc.StatusCode.INVALID_ARGUMENT
    assert selected.fields == ["columns[1]"]


@pytest.mark.parametrize("name", ["no_such_table_{0:05d}" * 4, "t{0}"], ids=["long", "short"])
async def test_an_error_with_thousands_of_violations_still_reaches_the_caller(
    maintenance: maintenance_service_pb2_grpc.MaintenanceServiceStub, workspace: str, name: str
) -> None:
    """Every unknown table of a backup scope is a field violation: the first ones that fit
    are sent."""
    scope = job_pb2.BackupScope(
        workspace_id=workspace, tables=[name.format(i) for i in range(3_000)]
    )
    call = maintenance.ExportBackup(maintenance_service_pb2.ExportBackupRequest(scope=scope))

    async def drain() -> None:
        async for _ in call:
            pass

    failure = await rpc_error(drain())
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert 0 < len(failure.fields) < 3_000
    assert failure.fields[0] == "scope.tables[0]"
    trailer = sum(len(k) + len(v) for k, v in await call.trailing_metadata())
    assert trailer < 8 * 1024
