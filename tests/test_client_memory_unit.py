"""Tests of the client's memory calls (`client.memory`) that need no RaptorFlow server.

ColumnBatch decoding is checked on hand-built messages; sync, acknowledge,
upsert and search against a scripted in-process MemorySyncService servicer on
a real grpc.aio server, so streaming, cancellation, deadlines, retries and
errors go over the wire.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import grpc
import grpc.aio
import pytest
from fake_grpc import Failure, Received, fail, received, serve
from google.protobuf import any_pb2, struct_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from hypothesis import given
from hypothesis import strategies as st
from raptorflow.data import client as rf
from raptorflow.data.client import _memory
from raptorflow.data.v1 import (
    column_batch_pb2,
    memory_sync_service_pb2,
    memory_sync_service_pb2_grpc,
    value_pb2,
)

WS = "0a700930-722d-4b2c-b5c1-1b2d7cdb954e"
SERVICE = memory_sync_service_pb2.DESCRIPTOR.services_by_name["MemorySyncService"]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MICROSECOND = timedelta(microseconds=1)
K = value_pb2  # ValueKind constants

# --------------------------------------------------------------------------
# ColumnBatch decoding


def _micros(moment: datetime) -> int:
    # Integer arithmetic, independent of the decoder under test.
    return (moment - EPOCH) // ONE_MICROSECOND


def _days(day: date) -> int:
    return (day - date(1970, 1, 1)).days


def _column(
    name: str, kind: int, null_rows: list[int] | None = None, **values: Any
) -> column_batch_pb2.ColumnValues:
    return column_batch_pb2.ColumnValues(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        null_rows=null_rows or [],
        **values,
    )


def _decoded(batch: column_batch_pb2.ColumnBatch) -> dict[str, list[rf.PyValue]]:
    # Through the wire format, so nothing depends on Python-side state.
    return rf.from_column_batch(column_batch_pb2.ColumnBatch.FromString(batch.SerializeToString()))


UUID_A = UUID("123e4567-e89b-12d3-a456-426614174000")
UUID_B = UUID("00000000-0000-0000-0000-000000000001")
MOMENTS = [
    datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),  # -1 microsecond
    datetime(1, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    datetime(2024, 2, 29, 12, 30, 0, 123_456, tzinfo=UTC),
    datetime(1900, 3, 1, 0, 0, 0, 1, tzinfo=UTC),
]
DAYS = [date(1969, 12, 31), date(1, 1, 1), date(9999, 12, 31), date(2024, 2, 29), date(1970, 1, 1)]
DECIMALS = [
    Decimal("123456789012345678901234567890.000000000000000001"),
    Decimal("-1E-3"),
    Decimal("12.50"),
    Decimal("NaN"),
]


def _every_kind_batch() -> column_batch_pb2.ColumnBatch:
    """Five rows of every column kind; each column has NULLs somewhere else."""
    return column_batch_pb2.ColumnBatch(
        table="notes",
        row_count=5,
        columns=[
            _column(
                "id",
                K.VALUE_KIND_INT64,
                int64_values=column_batch_pb2.Int64List(values=[2**63 - 1, -(2**63), 0, 1, -1]),
            ),
            _column(
                "active",
                K.VALUE_KIND_BOOL,
                [1, 4],
                bool_values=column_batch_pb2.BoolList(values=[True, False, False, True, False]),
            ),
            _column(
                "score",
                K.VALUE_KIND_DOUBLE,
                [2],
                double_values=column_batch_pb2.DoubleList(values=[1.5, -0.0, 0.0, math.inf, 0.1]),
            ),
            _column(
                "title",
                K.VALUE_KIND_STRING,
                [0],
                string_values=column_batch_pb2.StringList(
                    values=["", "héllo ✓", "", "multi\nline", "x"]
                ),
            ),
            _column(
                "external_id",
                K.VALUE_KIND_UUID,
                [1, 2],
                string_values=column_batch_pb2.StringList(
                    values=[str(UUID_A), "", "", str(UUID_B), str(UUID_A)]
                ),
            ),
            _column(
                "budget",
                K.VALUE_KIND_DECIMAL,
                [3],
                string_values=column_batch_pb2.StringList(
                    values=[str(DECIMALS[0]), str(DECIMALS[1]), str(DECIMALS[2]), "", "NaN"]
                ),
            ),
            _column(
                "meta",
                K.VALUE_KIND_JSON,
                [4],
                string_values=column_batch_pb2.StringList(
                    values=['{"a":[1,2.5,null,true],"é":"ü"}', "[]", '"text"', "null", ""]
                ),
            ),
            _column(
                "payload",
                K.VALUE_KIND_BYTES,
                [0],
                bytes_values=column_batch_pb2.BytesList(
                    values=[b"", b"\x00\xff", b"", b"abc", b"\x10"]
                ),
            ),
            _column(
                "created_at",
                K.VALUE_KIND_TIMESTAMP,
                [],
                timestamp_micros=column_batch_pb2.Int64List(values=[_micros(m) for m in MOMENTS]),
            ),
            _column(
                "updated_at",
                K.VALUE_KIND_TIMESTAMP,
                [0, 4],
                timestamp_micros=column_batch_pb2.Int64List(
                    values=[0, _micros(MOMENTS[0]), _micros(MOMENTS[3]), -1, 0]
                ),
            ),
            _column(
                "starts_on",
                K.VALUE_KIND_DATE,
                [2],
                date_days=column_batch_pb2.Int64List(
                    values=[_days(DAYS[0]), _days(DAYS[1]), 0, _days(DAYS[2]), _days(DAYS[3])]
                ),
            ),
            _column(
                "tags",
                K.VALUE_KIND_ARRAY,
                [1],
                other_values=column_batch_pb2.ValueList(
                    values=[
                        rf.to_value(["a", None, "c"]),
                        value_pb2.Value(null_value=struct_pb2.NULL_VALUE),
                        rf.to_value([]),
                        rf.to_value([MOMENTS[0], MOMENTS[1]]),
                        rf.to_value([Decimal("1.10"), None]),
                    ]
                ),
            ),
            _column(
                "embedding",
                K.VALUE_KIND_VECTOR,
                [3],
                other_values=column_batch_pb2.ValueList(
                    values=[
                        rf.to_value(rf.Vector([0.5, -1.25, 3.0])),
                        rf.to_value(rf.Vector([])),
                        rf.to_value(rf.Vector([0.1])),
                        value_pb2.Value(null_value=struct_pb2.NULL_VALUE),
                        rf.to_value(rf.Vector([2.0**-149])),
                    ]
                ),
            ),
        ],
    )


def test_every_column_kind_decodes_exactly() -> None:
    columns = _decoded(_every_kind_batch())
    float32_tenth = value_pb2.FloatVector(values=[0.1]).values[0]
    assert float32_tenth != 0.1  # the vector really is float32
    expected: dict[str, list[Any]] = {
        "id": [2**63 - 1, -(2**63), 0, 1, -1],
        "active": [True, None, False, True, None],
        "score": [1.5, -0.0, None, math.inf, 0.1],
        "title": [None, "héllo ✓", "", "multi\nline", "x"],
        "external_id": [UUID_A, None, None, UUID_B, UUID_A],
        "budget": [DECIMALS[0], DECIMALS[1], DECIMALS[2], None, DECIMALS[3]],
        "meta": [{"a": [1, 2.5, None, True], "é": "ü"}, [], "text", None, None],
        "payload": [None, b"\x00\xff", b"", b"abc", b"\x10"],
        "created_at": MOMENTS,
        "updated_at": [None, MOMENTS[0], MOMENTS[3], MOMENTS[0], None],
        "starts_on": [DAYS[0], DAYS[1], None, DAYS[2], DAYS[3]],
        "tags": [["a", None, "c"], None, [], [MOMENTS[0], MOMENTS[1]], [Decimal("1.10"), None]],
        "embedding": [[0.5, -1.25, 3.0], [], [float32_tenth], None, [2.0**-149]],
    }
    assert list(columns) == list(expected)  # column order kept
    budget = columns.pop("budget")
    expected_budget = expected.pop("budget")
    assert budget[:4] == expected_budget[:4]
    assert isinstance(budget[4], Decimal)
    assert budget[4].is_nan()
    assert columns == expected
    # Exact types and digits, not just equality (1 == 1.0 == True in Python).
    assert [type(v) for v in columns["external_id"]] == [UUID, type(None), type(None), UUID, UUID]
    assert str(budget[0]) == "123456789012345678901234567890.000000000000000001"
    assert str(budget[2]) == "12.50"
    assert math.copysign(1.0, columns["score"][1]) == -1.0  # type: ignore[arg-type]
    for moment in columns["created_at"]:
        assert isinstance(moment, datetime)
        assert moment.tzinfo is UTC
    assert columns["created_at"][0] == datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    assert type(columns["starts_on"][0]) is date
    assert type(columns["id"][2]) is int
    assert type(columns["active"][2]) is bool


def test_decoding_agrees_with_from_value() -> None:
    # A row from a sync stream equals the same row read by select().
    batch = _every_kind_batch()
    columns = _decoded(batch)
    for name, values in columns.items():
        if name == "budget":
            continue  # NaN != NaN
        for value in values:
            if value is None or name in {"meta", "tags", "embedding"}:
                continue
            assert rf.from_value(rf.to_value(value)) == value


@given(st.integers(min_value=_micros(MOMENTS[1]), max_value=_micros(MOMENTS[2])))
def test_every_timestamp_in_range_round_trips(micros: int) -> None:
    batch = column_batch_pb2.ColumnBatch(
        table="t",
        row_count=1,
        columns=[
            _column(
                "at",
                K.VALUE_KIND_TIMESTAMP,
                timestamp_micros=column_batch_pb2.Int64List(values=[micros]),
            )
        ],
    )
    (moment,) = rf.from_column_batch(batch)["at"]
    assert isinstance(moment, datetime)
    assert _micros(moment) == micros
    # The same instant as the Value form (google.protobuf.Timestamp) gives.
    assert rf.from_value(rf.to_value(moment)) == moment


def test_rows_are_zipped_from_columns() -> None:
    batch = _every_kind_batch()
    response = memory_sync_service_pb2.SyncResponse(
        event=memory_sync_service_pb2.SYNC_EVENT_SNAPSHOT_ROWS, rows=batch, resume_token="t1"
    )
    sync_batch = _sync_batch_of(response)
    assert len(sync_batch.rows) == 5
    assert sync_batch.rows is sync_batch.rows  # built once
    for index, row in enumerate(sync_batch.rows):
        assert list(row) == list(sync_batch.columns)
        for name, values in sync_batch.columns.items():
            assert row[name] is values[index]


def _sync_batch_of(response: memory_sync_service_pb2.SyncResponse) -> rf.SyncBatch:
    return _memory._sync_batch(response)


def test_empty_and_all_null_columns() -> None:
    empty = column_batch_pb2.ColumnBatch(
        table="t",
        row_count=0,
        columns=[
            _column("a", K.VALUE_KIND_UUID, string_values=column_batch_pb2.StringList()),
            _column("b", K.VALUE_KIND_INT64),  # no list set at all
        ],
    )
    assert _decoded(empty) == {"a": [], "b": []}
    all_null = column_batch_pb2.ColumnBatch(
        table="t",
        row_count=2,
        columns=[
            _column("a", K.VALUE_KIND_JSON, [0, 1]),
            _column(
                "b",
                K.VALUE_KIND_DECIMAL,
                [0, 1],
                string_values=column_batch_pb2.StringList(values=["", ""]),
            ),
        ],
    )
    assert _decoded(all_null) == {"a": [None, None], "b": [None, None]}
    assert rf.from_column_batch(column_batch_pb2.ColumnBatch()) == {}


@pytest.mark.parametrize(
    ("column", "row_count", "match"),
    [
        (
            _column("n", K.VALUE_KIND_INT64, int64_values=column_batch_pb2.Int64List(values=[1])),
            2,
            "1 values for 2 rows",
        ),
        (
            _column(
                "n", K.VALUE_KIND_INT64, int64_values=column_batch_pb2.Int64List(values=[1, 2, 3])
            ),
            2,
            "3 values for 2 rows",
        ),
        (
            _column(
                "n", K.VALUE_KIND_INT64, [2], int64_values=column_batch_pb2.Int64List(values=[1, 2])
            ),
            2,
            "outside",
        ),
        (
            _column(
                "n",
                K.VALUE_KIND_INT64,
                [-1],
                int64_values=column_batch_pb2.Int64List(values=[1, 2]),
            ),
            2,
            "outside",
        ),
        (_column("n", K.VALUE_KIND_INT64, [0]), 2, "not every row is NULL"),
        (
            _column(
                "u", K.VALUE_KIND_UUID, string_values=column_batch_pb2.StringList(values=["nope"])
            ),
            1,
            "column 'u' of table 't'",
        ),
        (
            _column(
                "d", K.VALUE_KIND_DECIMAL, string_values=column_batch_pb2.StringList(values=["1,5"])
            ),
            1,
            "column 'd'",
        ),
        (
            _column(
                "j", K.VALUE_KIND_JSON, string_values=column_batch_pb2.StringList(values=["{"])
            ),
            1,
            "column 'j'",
        ),
        (
            _column(
                "t",
                K.VALUE_KIND_TIMESTAMP,
                timestamp_micros=column_batch_pb2.Int64List(values=[2**62]),
            ),
            1,
            "column 't'",
        ),
    ],
    ids=[
        "short",
        "long",
        "null-index-high",
        "null-index-negative",
        "no-list",
        "uuid",
        "decimal",
        "json",
        "timestamp-range",
    ],
)
def test_inconsistent_batches_are_refused(
    column: column_batch_pb2.ColumnValues, row_count: int, match: str
) -> None:
    batch = column_batch_pb2.ColumnBatch(table="t", row_count=row_count, columns=[column])
    with pytest.raises(ValueError, match=match):
        rf.from_column_batch(batch)


def test_repeated_column_name_is_refused() -> None:
    column = _column("a", K.VALUE_KIND_BOOL, bool_values=column_batch_pb2.BoolList(values=[True]))
    with pytest.raises(ValueError, match="twice"):
        rf.from_column_batch(
            column_batch_pb2.ColumnBatch(table="t", row_count=1, columns=[column, column])
        )


def test_text_of_unknown_kind_stays_text() -> None:
    # String-form columns of types the API does not model (inet, interval...).
    column = _column(
        "addr", K.VALUE_KIND_STRING, string_values=column_batch_pb2.StringList(values=["10.0.0.1"])
    )
    assert _decoded(column_batch_pb2.ColumnBatch(row_count=1, columns=[column])) == {
        "addr": ["10.0.0.1"]
    }


# --------------------------------------------------------------------------
# Errors and config


def _packed(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _status(
    code: grpc.StatusCode, message: str, reason: str = "", field_path: str = ""
) -> status_pb2.Status:
    details = [_packed(error_details_pb2.ErrorInfo(reason=reason, domain=rf.ERROR_DOMAIN))]
    if field_path:
        details.append(
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=field_path, description=message
                        )
                    ]
                )
            )
        )
    return status_pb2.Status(code=code.value[0], message=message, details=details)


def _rpc_error(status: status_pb2.Status, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString())),
        status.message,
        "debug",
    )


def test_resnapshot_required_is_its_own_failed_precondition() -> None:
    code = grpc.StatusCode.FAILED_PRECONDITION
    error = rf.from_rpc_error(_rpc_error(_status(code, "pruned", "RESNAPSHOT_REQUIRED"), code))
    assert type(error) is rf.ResnapshotRequired
    assert isinstance(error, rf.FailedPrecondition)
    assert error.reason == rf.ResnapshotRequired.REASON == "RESNAPSHOT_REQUIRED"
    other = rf.from_rpc_error(_rpc_error(_status(code, "no trigger", "SYNC_NOT_INSTALLED"), code))
    assert type(other) is rf.FailedPrecondition
    # The reason alone, under another code, does not make it one.
    aborted = grpc.StatusCode.ABORTED
    assert (
        type(rf.from_rpc_error(_rpc_error(_status(aborted, "x", "RESNAPSHOT_REQUIRED"), aborted)))
        is rf.Aborted
    )


def test_service_config_policies_of_the_memory_service() -> None:
    config = json.loads(
        dict(rf.ClientConfig("localhost:1").channel_arguments())["grpc.service_config"]
    )
    retried: dict[str, set[str]] = {}
    for method_config in config["methodConfig"]:
        for name in method_config["name"]:
            if name["service"] == SERVICE.full_name:
                retried[name["method"]] = set(method_config["retryPolicy"]["retryableStatusCodes"])
    assert retried == {
        "SearchMemoryRecords": {"UNAVAILABLE", "ABORTED"},
        "AcknowledgeSync": {"UNAVAILABLE", "ABORTED"},
        "DeleteMemoryRecords": {"UNAVAILABLE", "ABORTED"},
        "UpsertMemoryRecords": {"ABORTED"},
    }
    # Sync is deliberately absent: a retried stream would replay from the
    # request's token; the caller resumes with its own.
    assert {method.name for method in SERVICE.methods} - set(retried) == {"Sync"}


# --------------------------------------------------------------------------
# Calls, against a scripted in-process servicer


@dataclass
class _SyncScript:
    """One Sync call: these responses, then a failure, the end, or waiting forever."""

    responses: list[memory_sync_service_pb2.SyncResponse] = field(default_factory=list)
    failure: Failure | None = None
    hang: bool = False


class _FakeMemoryService(memory_sync_service_pb2_grpc.MemorySyncServiceServicer):
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.sync_scripts: list[_SyncScript] = []
        self.failures: dict[str, list[Failure]] = {}
        self.search_results: list[memory_sync_service_pb2.ScoredMemoryRecord] = []
        self.store: dict[str, memory_sync_service_pb2.MemoryRecord] = {}
        self.sync_cancelled = asyncio.Event()

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def _record(self, method: str, request: Any, context: Any) -> None:
        self.received.append(received(method, request, context))

    async def _maybe_fail(self, method: str, context: Any) -> None:
        failures = self.failures.get(method)
        if failures:
            await fail(context, failures.pop(0))

    async def Sync(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self._record("Sync", request, context)
        await self._maybe_fail("Sync", context)
        script = self.sync_scripts.pop(0)
        # A call cancelled while this generator waits at a yield (its message not sent yet)
        # never raises here: grpc.aio leaves the generator suspended. The call's end does.
        context.add_done_callback(
            lambda call: self.sync_cancelled.set() if call.cancelled() else None
        )
        try:
            for response in script.responses:
                yield response
            if script.failure is not None:
                await fail(context, script.failure)
            if script.hang:
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.sync_cancelled.set()
            raise

    async def AcknowledgeSync(self, request: Any, context: Any) -> Any:
        self._record("AcknowledgeSync", request, context)
        await self._maybe_fail("AcknowledgeSync", context)
        return memory_sync_service_pb2.AcknowledgeSyncResponse()

    async def UpsertMemoryRecords(self, request_iterator: Any, context: Any) -> Any:
        requests = [request async for request in request_iterator]
        self._record("UpsertMemoryRecords", requests, context)
        await self._maybe_fail("UpsertMemoryRecords", context)
        inserted = updated = 0
        for request in requests:
            for record in request.records:
                if record.id in self.store:
                    updated += 1
                else:
                    inserted += 1
                self.store[record.id] = record
        return memory_sync_service_pb2.UpsertMemoryRecordsResponse(
            inserted_count=inserted, updated_count=updated, batch_count=len(requests)
        )

    async def DeleteMemoryRecords(self, request: Any, context: Any) -> Any:
        self._record("DeleteMemoryRecords", request, context)
        await self._maybe_fail("DeleteMemoryRecords", context)
        doomed = set(request.ids) | {
            record_id
            for record_id, record in self.store.items()
            if record.source_table == request.source_table
            and record.source_row_id in request.source_row_ids
        }
        deleted = [self.store.pop(record_id) for record_id in doomed if record_id in self.store]
        return memory_sync_service_pb2.DeleteMemoryRecordsResponse(deleted_count=len(deleted))

    async def SearchMemoryRecords(self, request: Any, context: Any) -> Any:
        self._record("SearchMemoryRecords", request, context)
        await self._maybe_fail("SearchMemoryRecords", context)
        return memory_sync_service_pb2.SearchMemoryRecordsResponse(results=self.search_results)


@dataclass
class _Fake:
    service: _FakeMemoryService
    target: str

    def client(self, **overrides: Any) -> rf.DataClient:
        defaults: dict[str, Any] = {"timeout": 5.0, "metadata": {"authorization": "Bearer cfg"}}
        return rf.DataClient(rf.ClientConfig(self.target, **(defaults | overrides)))


@pytest.fixture(scope="module")
async def fake_server() -> AsyncIterator[_Fake]:
    service = _FakeMemoryService()
    async with serve(
        lambda server: memory_sync_service_pb2_grpc.add_MemorySyncServiceServicer_to_server(
            service, server
        )
    ) as target:
        yield _Fake(service, target)


@pytest.fixture
def fake(fake_server: _Fake) -> _Fake:
    fake_server.service.reset()
    return fake_server


def _notes(ids: list[int], titles: list[str | None]) -> column_batch_pb2.ColumnBatch:
    null_titles = [index for index, title in enumerate(titles) if title is None]
    return column_batch_pb2.ColumnBatch(
        table="notes",
        row_count=len(ids),
        columns=[
            _column("id", K.VALUE_KIND_INT64, int64_values=column_batch_pb2.Int64List(values=ids)),
            _column(
                "title",
                K.VALUE_KIND_STRING,
                null_titles,
                string_values=column_batch_pb2.StringList(values=[t or "" for t in titles]),
            ),
        ],
    )


def _response(
    event: int,
    token: str,
    rows: column_batch_pb2.ColumnBatch | None = None,
    operations: list[int] | None = None,
    sequences: list[int] | None = None,
) -> memory_sync_service_pb2.SyncResponse:
    return memory_sync_service_pb2.SyncResponse(
        event=event,  # type: ignore[arg-type]
        rows=rows,
        operations=operations or [],  # type: ignore[arg-type]
        sequences=sequences or [],
        resume_token=token,
    )


M = memory_sync_service_pb2
FULL_STREAM = [
    _response(M.SYNC_EVENT_SNAPSHOT_ROWS, "t1", _notes([1, 2], ["a", None])),
    _response(M.SYNC_EVENT_SNAPSHOT_ROWS, "t2", _notes([3], ["c"])),
    _response(M.SYNC_EVENT_SNAPSHOT_DONE, "t3"),
    _response(
        M.SYNC_EVENT_CHANGES,
        "t4",
        _notes([4, 1, 2], ["d", "a2", "b"]),
        [M.CHANGE_OPERATION_INSERT, M.CHANGE_OPERATION_UPDATE, M.CHANGE_OPERATION_DELETE],
        [10, 11, 12],
    ),
    _response(M.SYNC_EVENT_CHECKPOINT, "t5"),
]


async def _drain(stream: rf.SyncStream, into: list[rf.SyncBatch]) -> None:
    async for batch in stream:
        into.append(batch)


async def test_sync_yields_typed_batches(fake: _Fake) -> None:
    fake.service.sync_scripts.append(_SyncScript(FULL_STREAM))
    async with fake.client() as client:
        batches = [
            batch
            async for batch in client.memory.sync(
                UUID(WS), tables=["notes"], follow=False, consumer_id="memory", batch_size=2
            )
        ]
    assert [batch.event for batch in batches] == [
        rf.SyncEvent.SNAPSHOT_ROWS,
        rf.SyncEvent.SNAPSHOT_ROWS,
        rf.SyncEvent.SNAPSHOT_DONE,
        rf.SyncEvent.CHANGES,
        rf.SyncEvent.CHECKPOINT,
    ]
    assert [batch.resume_token for batch in batches] == ["t1", "t2", "t3", "t4", "t5"]
    first, _, done, changes, checkpoint = batches
    assert first.table == "notes"
    assert first.rows == [{"id": 1, "title": "a"}, {"id": 2, "title": None}]
    assert first.columns == {"id": [1, 2], "title": ["a", None]}
    assert (first.operations, first.sequences) == ([], [])
    assert (done.table, done.rows, done.columns, done.row_count) == ("", [], {}, 0)
    assert changes.operations == [
        rf.ChangeOperation.INSERT,
        rf.ChangeOperation.UPDATE,
        rf.ChangeOperation.DELETE,
    ]
    assert all(type(op) is rf.ChangeOperation for op in changes.operations)
    assert changes.sequences == [10, 11, 12]
    assert list(zip(changes.operations, changes.rows, strict=True))[2] == (
        rf.ChangeOperation.DELETE,
        {"id": 2, "title": "b"},
    )
    assert checkpoint.rows == []
    assert "row_count=3" in repr(changes)
    (received,) = fake.service.received
    assert received.request == memory_sync_service_pb2.SyncRequest(
        workspace_id=WS, tables=["notes"], consumer_id="memory", follow=False, batch_size=2
    )
    # No deadline by default: a following stream is meant to stay open.
    assert received.time_remaining is None
    assert received.metadata["authorization"] == "Bearer cfg"


async def test_sync_sends_resume_token_and_an_explicit_deadline(fake: _Fake) -> None:
    fake.service.sync_scripts.append(_SyncScript([FULL_STREAM[-1]]))
    async with fake.client() as client:
        stream = client.memory.sync(
            WS.upper(),
            tables=["notes", "tasks"],
            resume_token="saved",
            timeout=3.0,
            metadata={"x-k": "v"},
        )
        assert stream.request.resume_token == "saved"
        batches = [batch async for batch in stream]
        # Iterating again after the end stays ended.
        assert [batch async for batch in stream] == []
    assert [batch.event for batch in batches] == [rf.SyncEvent.CHECKPOINT]
    (received,) = fake.service.received
    assert received.request.workspace_id == WS
    assert list(received.request.tables) == ["notes", "tasks"]
    assert received.request.resume_token == "saved"
    assert received.request.follow is True
    assert received.metadata["x-k"] == "v"
    assert received.time_remaining is not None
    assert 1.0 < received.time_remaining < 4.0


async def test_error_mid_stream_comes_after_the_batches_before_it(fake: _Fake) -> None:
    fake.service.sync_scripts.append(
        _SyncScript(
            FULL_STREAM[:2],
            failure=_status(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the changes after the resume token were pruned",
                "RESNAPSHOT_REQUIRED",
            ),
        )
    )
    got: list[rf.SyncBatch] = []
    async with fake.client() as client:
        stream = client.memory.sync(WS, tables=["notes"], resume_token="old")
        with pytest.raises(rf.ResnapshotRequired) as caught:
            await _drain(stream, got)
    assert [batch.resume_token for batch in got] == ["t1", "t2"]
    assert caught.value.reason == "RESNAPSHOT_REQUIRED"
    assert isinstance(caught.value, rf.FailedPrecondition)
    assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)


async def test_sync_is_never_retried_by_grpc(fake: _Fake) -> None:
    # UNAVAILABLE before the first message and after one: both reach the
    # caller, who resumes with its own token; gRPC must not replay the stream.
    fake.service.failures["Sync"] = [grpc.StatusCode.UNAVAILABLE]
    fake.service.sync_scripts.append(
        _SyncScript(FULL_STREAM[:1], failure=grpc.StatusCode.UNAVAILABLE)
    )
    async with fake.client() as client:
        with pytest.raises(rf.Unavailable):
            async for _ in client.memory.sync(WS, tables=["notes"]):
                pass
        assert len(fake.service.received) == 1
        got: list[rf.SyncBatch] = []
        with pytest.raises(rf.Unavailable, match="scripted UNAVAILABLE"):
            await _drain(client.memory.sync(WS, tables=["notes"]), got)
    assert [batch.resume_token for batch in got] == ["t1"]
    assert len(fake.service.received) == 2


async def test_breaking_out_cancels_the_server_side_stream(fake: _Fake) -> None:
    fake.service.sync_scripts.append(_SyncScript(FULL_STREAM[:2], hang=True))
    async with fake.client() as client:
        async for batch in client.memory.sync(WS, tables=["notes"]):
            assert batch.resume_token == "t1"
            break
        # Not at client close: right after the loop.
        await asyncio.wait_for(fake.service.sync_cancelled.wait(), 5)


async def test_async_with_and_aclose_cancel_the_stream(fake: _Fake) -> None:
    fake.service.sync_scripts.append(_SyncScript(FULL_STREAM[:1], hang=True))
    async with fake.client() as client:
        async with client.memory.sync(WS, tables=["notes"]) as stream:
            first = await anext(stream)
            assert first.resume_token == "t1"
        await asyncio.wait_for(fake.service.sync_cancelled.wait(), 5)
        assert [batch async for batch in stream] == []

        # aclose() from another task ends a reader that is waiting.
        fake.service.sync_cancelled.clear()
        fake.service.sync_scripts.append(_SyncScript(FULL_STREAM[:1], hang=True))
        stream = client.memory.sync(WS, tables=["notes"])

        async def read_all() -> list[str]:
            return [batch.resume_token async for batch in stream]

        reader = asyncio.create_task(read_all())
        await asyncio.sleep(0.2)
        await stream.aclose()
        assert await asyncio.wait_for(reader, 5) == ["t1"]
        await asyncio.wait_for(fake.service.sync_cancelled.wait(), 5)


async def test_cancelling_the_consumer_task_cancels_the_stream(fake: _Fake) -> None:
    fake.service.sync_scripts.append(_SyncScript([], hang=True))
    async with fake.client() as client:
        stream = client.memory.sync(WS, tables=["notes"])
        consumer = asyncio.create_task(anext(stream))
        await asyncio.sleep(0.2)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        await asyncio.wait_for(fake.service.sync_cancelled.wait(), 5)


async def test_undecodable_message_stops_the_stream(fake: _Fake) -> None:
    bad_changes = _response(
        M.SYNC_EVENT_CHANGES, "t9", _notes([1, 2], ["a", "b"]), [M.CHANGE_OPERATION_INSERT], [1]
    )
    fake.service.sync_scripts.append(_SyncScript([bad_changes], hang=True))
    async with fake.client() as client:
        with pytest.raises(ValueError, match="2 rows, 1 operations and 1 sequences"):
            async for _ in client.memory.sync(WS, tables=["notes"]):
                pass
        await asyncio.wait_for(fake.service.sync_cancelled.wait(), 5)

    fake.service.sync_scripts.append(_SyncScript([_response(9, "t")]))
    async with fake.client() as client:
        with pytest.raises(ValueError, match="SyncEvent 9"):
            async for _ in client.memory.sync(WS, tables=["notes"]):
                pass


async def test_deadline_exceeded_on_a_bounded_stream(fake: _Fake) -> None:
    fake.service.sync_scripts.append(_SyncScript(FULL_STREAM[:1], hang=True))
    got: list[rf.SyncBatch] = []
    async with fake.client() as client:
        with pytest.raises(rf.DeadlineExceeded):
            await _drain(client.memory.sync(WS, tables=["notes"], timeout=0.5), got)
    assert [batch.resume_token for batch in got] == ["t1"]


async def test_sync_arguments_are_checked_before_sending(fake: _Fake) -> None:
    async with fake.client() as client:
        memory = client.memory
        with pytest.raises(TypeError, match="list of table names"):
            memory.sync(WS, tables="notes")
        with pytest.raises(ValueError, match="at least one table"):
            memory.sync(WS, tables=[])
        with pytest.raises(ValueError, match="repeats"):
            memory.sync(WS, tables=["a", "a"])
        with pytest.raises(ValueError, match="batch_size"):
            memory.sync(WS, tables=["a"], batch_size=10_001)
        with pytest.raises(ValueError, match="not a UUID"):
            memory.sync("ws-1", tables=["a"])
        assert "not started" in repr(memory.sync(WS, tables=["a"]))
    assert fake.service.received == []


async def test_acknowledge(fake: _Fake) -> None:
    fake.service.failures["AcknowledgeSync"] = [grpc.StatusCode.UNAVAILABLE]
    async with fake.client() as client:
        assert isinstance(client.memory, rf.Memory)
        assert isinstance(client.memory.stub, memory_sync_service_pb2_grpc.MemorySyncServiceStub)
        await client.memory.acknowledge(WS, "memory", "t5", timeout=2.0)
        with pytest.raises(ValueError, match="consumer_id"):
            await client.memory.acknowledge(WS, "", "t5")
    # UNAVAILABLE was retried: acknowledging twice is harmless.
    first, second = fake.service.received
    assert second.request == memory_sync_service_pb2.AcknowledgeSyncRequest(
        workspace_id=WS, consumer_id="memory", resume_token="t5"
    )
    assert first.request == second.request
    assert second.time_remaining is not None
    assert second.time_remaining < 2.5


def _records(count: int, prefix: str = "r") -> Iterator[rf.MemoryRecord]:
    for index in range(count):
        yield rf.MemoryRecord(
            f"{prefix}{index}", "fact", embedding=[float(index), 1.0], content=f"text {index}"
        )


async def test_upsert_records_in_batches_of_500(fake: _Fake) -> None:
    fake.service.store["r3"] = memory_sync_service_pb2.MemoryRecord(id="r3")
    async with fake.client() as client:
        counts = await client.memory.upsert_records(WS, _records(1_250))
    assert counts == rf.UpsertCounts(inserted=1_249, updated=1, batches=3)
    (received,) = fake.service.received
    assert [len(request.records) for request in received.request] == [500, 500, 250]
    assert {request.workspace_id for request in received.request} == {WS}
    assert [record.id for request in received.request for record in request.records] == [
        f"r{index}" for index in range(1_250)
    ]
    assert received.request[0].records[1] == memory_sync_service_pb2.MemoryRecord(
        id="r1", kind="fact", content="text 1", embedding=[1.0, 1.0]
    )
    assert received.time_remaining is not None  # the config's default timeout applies


async def test_upsert_records_from_an_async_iterable_of_dicts(fake: _Fake) -> None:
    async def produce() -> AsyncIterator[dict[str, Any]]:
        for index in range(5):
            yield {
                "id": f"d{index % 3}",  # d0, d1 and d2, then d0 and d1 again
                "kind": "summary",
                "embedding": [0.5],
                "metadata": {"page": index, "tags": ["x", None, True], "nested": {"f": 1.5}},
                "source_table": "notes",
                "source_row_id": str(index),
            }
            await asyncio.sleep(0)

    async with fake.client() as client:
        counts = await client.memory.upsert_records(WS, produce(), batch_size=10)
    # A repeated id starts a new batch, so no batch names an id twice and the
    # later record wins.
    assert counts == rf.UpsertCounts(inserted=3, updated=2, batches=2)
    (received,) = fake.service.received
    assert [[r.id for r in request.records] for request in received.request] == [
        ["d0", "d1", "d2"],
        ["d0", "d1"],
    ]
    record = received.request[1].records[0]
    assert (record.source_table, record.source_row_id) == ("notes", "3")
    expected = struct_pb2.Struct()
    expected.update({"page": 3, "tags": ["x", None, True], "nested": {"f": 1.5}})
    assert record.metadata == expected


async def test_upsert_records_with_nothing_to_write_makes_no_call(fake: _Fake) -> None:
    async with fake.client() as client:
        assert await client.memory.upsert_records(WS, []) == rf.UpsertCounts(0, 0, 0)
    assert fake.service.received == []


@pytest.mark.parametrize(
    ("record", "error", "match"),
    [
        ({"id": "a", "kind": "k", "embedding": [1.0], "colour": "red"}, TypeError, "record 0:"),
        ("not a record", TypeError, "not a MemoryRecord"),
        (
            rf.MemoryRecord("a", "k", embedding=[1.0], metadata={"big": 2**60}),
            ValueError,
            r"record 0\.metadata\.big.*string",
        ),
        (
            rf.MemoryRecord("a", "k", embedding=[1.0], metadata={"x": [math.nan]}),
            ValueError,
            r"metadata\.x\[0\]",
        ),
        (
            rf.MemoryRecord("a", "k", embedding=[1.0], metadata={"x": b"raw"}),
            TypeError,
            "bytes is not a JSON value",
        ),
    ],
)
async def test_bad_records_fail_before_sending(
    fake: _Fake, record: Any, error: type[Exception], match: str
) -> None:
    async with fake.client() as client:
        with pytest.raises(error, match=match):
            await client.memory.upsert_records(WS, [record])
        with pytest.raises(ValueError, match="batch_size"):
            await client.memory.upsert_records(WS, [], batch_size=1_001)
    assert fake.service.received == []


async def test_upsert_errors_and_retries(fake: _Fake) -> None:
    fake.service.failures["UpsertMemoryRecords"] = [
        grpc.StatusCode.ABORTED,
        _status(
            grpc.StatusCode.INVALID_ARGUMENT,
            "the embedding is empty",
            "INVALID_VALUE",
            "batches[1].records[0].embedding",
        ),
    ]
    async with fake.client() as client:
        # ABORTED is retried with the buffered batches; the retry then fails.
        with pytest.raises(rf.InvalidArgument) as caught:
            await client.memory.upsert_records(WS, _records(3), batch_size=2)
    assert caught.value.field_violations[0].field == "batches[1].records[0].embedding"
    assert [len(received.request) for received in fake.service.received] == [2, 2]

    fake.service.reset()
    fake.service.failures["UpsertMemoryRecords"] = [grpc.StatusCode.UNAVAILABLE]
    async with fake.client() as client:
        # UNAVAILABLE is not retried: the batches may have been written.
        with pytest.raises(rf.Unavailable):
            await client.memory.upsert_records(WS, _records(1))
    assert len(fake.service.received) == 1


async def test_delete_records_sends_the_selectors_and_is_retried(fake: _Fake) -> None:
    for record_id, row_id in (("m1", "1"), ("m2", "1"), ("m3", "2")):
        fake.service.store[record_id] = memory_sync_service_pb2.MemoryRecord(
            id=record_id, source_table="notes", source_row_id=row_id
        )
    fake.service.failures["DeleteMemoryRecords"] = [grpc.StatusCode.UNAVAILABLE]
    async with fake.client() as client:
        deleted = await client.memory.delete_records(
            UUID(WS), ids=("m3", "absent"), source_table="notes", source_row_ids=iter(["1"])
        )
    assert deleted == 3
    # UNAVAILABLE was retried, as for reads: deleting twice is harmless.
    first, second = fake.service.received
    assert second.request == memory_sync_service_pb2.DeleteMemoryRecordsRequest(
        workspace_id=WS, ids=["m3", "absent"], source_table="notes", source_row_ids=["1"]
    )
    assert first.request == second.request
    assert second.time_remaining is not None  # the config's default timeout applies
    assert second.metadata["authorization"] == "Bearer cfg"


async def test_delete_records_without_rows_drops_the_table(fake: _Fake) -> None:
    async with fake.client() as client:
        # A table without rows selects nothing; ids alone are sent.
        assert await client.memory.delete_records(WS, ids=["a"], source_table="notes") == 0
        # Nothing selected at all: no call.
        assert await client.memory.delete_records(WS) == 0
        assert await client.memory.delete_records(WS, source_table="notes") == 0
    (received,) = fake.service.received
    assert received.request == memory_sync_service_pb2.DeleteMemoryRecordsRequest(
        workspace_id=WS, ids=["a"]
    )


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"ids": "m1"}, TypeError, "ids takes a list of strings"),
        ({"source_table": "t", "source_row_ids": "12"}, TypeError, "source_row_ids takes a list"),
        ({"source_table": "t", "source_row_ids": [1, 2]}, TypeError, r"source_row_ids\[0\] is"),
        ({"ids": [None]}, TypeError, r"ids\[0\] is a NoneType"),
        ({"source_row_ids": ["1"]}, ValueError, "needs the source_table"),
        ({"ids": [str(i) for i in range(1_001)]}, ValueError, "at most 1,000 ids"),
        (
            {"source_table": "t", "source_row_ids": [str(i) for i in range(1_001)]},
            ValueError,
            "at most 1,000 source_row_ids",
        ),
    ],
)
async def test_delete_records_arguments_are_checked_before_sending(
    fake: _Fake, arguments: dict[str, Any], error: type[Exception], match: str
) -> None:
    async with fake.client() as client:
        with pytest.raises(error, match=match):
            await client.memory.delete_records(WS, **arguments)
        with pytest.raises(ValueError, match="not a UUID"):
            await client.memory.delete_records("nope")
    assert fake.service.received == []


async def test_delete_records_error_is_converted(fake: _Fake) -> None:
    fake.service.failures["DeleteMemoryRecords"] = [
        grpc.StatusCode.ABORTED,
        _status(grpc.StatusCode.INVALID_ARGUMENT, "ids[0]: too long", "INVALID_VALUE", "ids[0]"),
    ]
    async with fake.client() as client:
        with pytest.raises(rf.InvalidArgument) as caught:
            await client.memory.delete_records(WS, ids=["x" * 300])
    assert caught.value.field_violations[0].field == "ids[0]"
    # ABORTED (rolled back) was retried first.
    assert len(fake.service.received) == 2


async def test_search_returns_typed_records(fake: _Fake) -> None:
    metadata = struct_pb2.Struct()
    metadata.update({"page": 3, "ratio": 0.25, "tags": ["a", 2], "nested": {"ok": True, "n": None}})
    fake.service.search_results = [
        memory_sync_service_pb2.ScoredMemoryRecord(
            record=memory_sync_service_pb2.MemoryRecord(
                id="m1",
                kind="fact",
                content="the sky is blue",
                metadata=metadata,
                source_table="notes",
                source_row_id="42",
                embedding=[0.5, 0.25],
            ),
            similarity=0.9375,
        ),
        memory_sync_service_pb2.ScoredMemoryRecord(
            record=memory_sync_service_pb2.MemoryRecord(id="m2", kind="summary", embedding=[1.0]),
            similarity=-0.5,
        ),
    ]
    fake.service.failures["SearchMemoryRecords"] = [grpc.StatusCode.UNAVAILABLE]
    async with fake.client() as client:
        results = await client.memory.search(
            WS,
            [0.5, 0.25],
            top_k=5,
            kinds=["fact", "summary"],
            source_table="notes",
            metadata_contains={"tags": ["a"], "é": 1},
        )
    assert results == [
        rf.ScoredMemoryRecord(
            rf.MemoryRecord(
                "m1",
                "fact",
                embedding=[0.5, 0.25],
                content="the sky is blue",
                metadata={
                    "page": 3,
                    "ratio": 0.25,
                    "tags": ["a", 2],
                    "nested": {"ok": True, "n": None},
                },
                source_table="notes",
                source_row_id="42",
            ),
            0.9375,
        ),
        rf.ScoredMemoryRecord(rf.MemoryRecord("m2", "summary", embedding=[1.0]), -0.5),
    ]
    record, similarity = results[0]
    assert type(record.metadata["page"]) is int  # Struct's double 3.0 read back as 3
    assert type(record.metadata["ratio"]) is float
    assert similarity == results[0].similarity
    assert results[1].record.source_table is None
    # UNAVAILABLE was retried, as for reads.
    first, second = fake.service.received
    assert second.request == memory_sync_service_pb2.SearchMemoryRecordsRequest(
        workspace_id=WS,
        embedding=[0.5, 0.25],
        top_k=5,
        kinds=["fact", "summary"],
        source_table="notes",
        metadata_contains='{"tags":["a"],"é":1}',
    )
    assert first.request == second.request


async def test_search_arguments_are_checked_before_sending(fake: _Fake) -> None:
    async with fake.client() as client:
        memory = client.memory
        with pytest.raises(ValueError, match="top_k"):
            await memory.search(WS, [1.0], top_k=0)
        with pytest.raises(ValueError, match="top_k"):
            await memory.search(WS, [1.0], top_k=1_001)
        with pytest.raises(ValueError, match="non-empty embedding"):
            await memory.search(WS, [], top_k=1)
        with pytest.raises(TypeError, match="list of kinds"):
            await memory.search(WS, [1.0], top_k=1, kinds="fact")
    assert fake.service.received == []


async def test_search_error_is_converted(fake: _Fake) -> None:
    fake.service.failures["SearchMemoryRecords"] = [
        _status(grpc.StatusCode.INVALID_ARGUMENT, "top_k too large", "INVALID_VALUE", "top_k")
    ]
    async with fake.client() as client:
        with pytest.raises(rf.InvalidArgument, match="top_k too large") as caught:
            await client.memory.search(WS, [1.0], top_k=3)
    assert caught.value.reason == "INVALID_VALUE"


def test_memory_record_defaults() -> None:
    record = rf.MemoryRecord("id", "fact", embedding=[1.0])
    assert (record.content, record.metadata, record.source_table, record.source_row_id) == (
        "",
        {},
        None,
        None,
    )
    with pytest.raises(AttributeError):
        record.kind = "other"  # type: ignore[misc]
