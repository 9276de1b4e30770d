"""The memory system's calls: follow a workspace's rows by sync stream, store and search records.

A memory controller keeps its vector store in step with a workspace like this::

    saved = load_token()  # None the first time
    while True:
        try:
            async for batch in client.memory.sync(
                workspace, tables=["notes"], resume_token=saved, consumer_id="memory"
            ):
                await apply(batch)  # idempotently: upsert rows, delete DELETE rows
                saved = batch.resume_token
                store_token(saved)  # only once the batch is applied
        except ResnapshotRequired:
            saved = None  # the changes after the token are gone: snapshot again
        except (Unavailable, Cancelled, DeadlineExceeded):
            await asyncio.sleep(1)  # resume after the last applied batch

A stream resumed with the token of the last applied batch continues right
after it, on any replica, so no change is skipped and none is applied twice.
`acknowledge()` tells the server that the consumer got that far, so the change
log before it can be pruned.

Policies worth knowing:

- `Sync` has no gRPC retry policy in service_config.json and never gets one:
  a retried stream would start again from the request's token and repeat
  every batch already delivered. The caller resumes with its own token, as
  above. Its default `timeout` is None (no deadline), since a following stream
  is meant to stay open; pass seconds to bound a catch-up read instead.
- SearchMemoryRecords, AcknowledgeSync and DeleteMemoryRecords (idempotent)
  retry UNAVAILABLE and ABORTED; UpsertMemoryRecords (client streaming,
  idempotent by record id) retries ABORTED only, like the other writes.
"""

# `timeout` is the gRPC deadline sent along with each call (the server cancels the
# statement when it passes), which asyncio.timeout around the await cannot express.

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from functools import cached_property
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, Self, TypeAlias, TypeVar
from uuid import UUID

import grpc.aio
from google.protobuf import struct_pb2
from raptorflow.data.client._columns import from_column_batch, rows_from_columns
from raptorflow.data.client._config import (
    USE_CLIENT_DEFAULT,
    MetadataLike,
    MetadataValue,
    Timeout,
)
from raptorflow.data.client._errors import DeadlineExceeded, from_rpc_error
from raptorflow.data.client._values import (
    JsonValue,
    PyValue,
    Row,
    canonical_workspace_id,
    json_text,
)
from raptorflow.data.v1 import memory_sync_service_pb2, memory_sync_service_pb2_grpc

if TYPE_CHECKING:
    from raptorflow.data.client._client import DataClient

_Enum = TypeVar("_Enum", bound=enum.IntEnum)

_SyncCall: TypeAlias = grpc.aio.UnaryStreamCall[
    memory_sync_service_pb2.SyncRequest, memory_sync_service_pb2.SyncResponse
]

# Seconds a failed upload waits for its call's final status (it is normally there at once).
_ENDED_STATUS_WAIT = 5.0
_UpsertCall: TypeAlias = grpc.aio.StreamUnaryCall[
    memory_sync_service_pb2.UpsertMemoryRecordsRequest,
    memory_sync_service_pb2.UpsertMemoryRecordsResponse,
]

# The contract's limits, checked here so a mistake fails at the line that made
# it instead of after a round trip.
_MAX_SYNC_BATCH_SIZE = 10_000
_MAX_UPSERT_BATCH_SIZE = 1_000
_MAX_TOP_K = 1_000
_MAX_DELETE_SELECTORS = 1_000
# Struct numbers are doubles: integers beyond 2**53 would silently change.
_MAX_EXACT_DOUBLE_INT = 2**53

# --------------------------------------------------------------------------
# Sync


class SyncEvent(enum.IntEnum):
    """What a sync batch carries (`SyncEvent` of the proto, same numbers)."""

    SNAPSHOT_ROWS = memory_sync_service_pb2.SYNC_EVENT_SNAPSHOT_ROWS
    """Rows of the initial snapshot: upsert them."""
    SNAPSHOT_DONE = memory_sync_service_pb2.SYNC_EVENT_SNAPSHOT_DONE
    """The snapshot is complete; changes follow. No rows. After a re-snapshot,
    records of rows the snapshot did not send can be dropped now."""
    CHANGES = memory_sync_service_pb2.SYNC_EVENT_CHANGES
    """Committed changes of one table, with an operation and a sequence per row."""
    CHECKPOINT = memory_sync_service_pb2.SYNC_EVENT_CHECKPOINT
    """No rows: the position advanced, so the token can be stored and acknowledged."""


class ChangeOperation(enum.IntEnum):
    """What happened to a changed row (`ChangeOperation` of the proto, same numbers)."""

    INSERT = memory_sync_service_pb2.CHANGE_OPERATION_INSERT
    """The row was inserted; `rows` holds it as written."""
    UPDATE = memory_sync_service_pb2.CHANGE_OPERATION_UPDATE
    """The row was updated; `rows` holds it as written."""
    DELETE = memory_sync_service_pb2.CHANGE_OPERATION_DELETE
    """The row was deleted; `rows` holds it as it was."""


def _enum_member(enum_class: type[_Enum], number: int) -> _Enum:
    try:
        return enum_class(number)
    except ValueError:
        # Skipping what it cannot read would make the consumer miss changes,
        # so a message from a newer server stops the stream instead.
        raise ValueError(
            f"the server sent {enum_class.__name__} {number}, which this client does not know;"
            " upgrade raptorflow-data-stubs"
        ) from None


@dataclass(frozen=True)
class SyncBatch:
    """One message of a sync stream, decoded.

    Apply it, then store `resume_token`: a stream started with that token
    continues right after this batch. Rows are decoded column by column;
    `columns` gives them that way, `rows` as one dict per row.
    """

    event: SyncEvent
    """What the batch carries."""
    table: str
    """The table of the rows; "" for a batch without rows."""
    columns: dict[str, list[PyValue]]
    """The rows column by column, in the table's column order, NULL as None."""
    row_count: int
    """The number of rows."""
    operations: list[ChangeOperation]
    """For CHANGES, the operation of each row; empty for the other events."""
    sequences: list[int]
    """For CHANGES, the change-log sequence number of each row, increasing within
    a stream; empty for the other events."""
    resume_token: str
    """The opaque token that resumes a stream right after this batch."""

    @cached_property
    def rows(self) -> list[Row]:
        """The rows as dicts keyed by column name, values typed as `from_value` types them.

        Built from `columns` on first access, so consumers of `columns` never pay for it.
        """
        return rows_from_columns(self.columns, self.row_count)

    def __repr__(self) -> str:
        # The rows of a batch can be thousands of values; a log line wants its shape.
        return (
            f"SyncBatch(event={self.event.name}, table={self.table!r},"
            f" row_count={self.row_count}, resume_token={self.resume_token!r})"
        )


def _sync_batch(response: memory_sync_service_pb2.SyncResponse) -> SyncBatch:
    event = _enum_member(SyncEvent, response.event)
    row_count = response.rows.row_count
    operations = [_enum_member(ChangeOperation, number) for number in response.operations]
    sequences = list(response.sequences)
    if event is SyncEvent.CHANGES and not (len(operations) == len(sequences) == row_count):
        # Zipping misaligned lists would attach operations to the wrong rows.
        raise ValueError(
            f"a CHANGES message of {response.rows.table!r} has {row_count} rows,"
            f" {len(operations)} operations and {len(sequences)} sequences"
        )
    return SyncBatch(
        event=event,
        table=response.rows.table,
        columns=from_column_batch(response.rows),
        row_count=row_count,
        operations=operations,
        sequences=sequences,
        resume_token=response.resume_token,
    )


class SyncStream:
    """The batches of one sync stream, as an async iterator; returned by `Memory.sync`.

    The call starts with the first iteration. Leaving an ``async for`` early
    (break, return, an exception) cancels it: CPython drops the stream at once
    and that cancels the call; ``async with`` or `aclose()` make it explicit.
    Errors are raised as `DataError` subclasses after the batches that came
    before them.
    """

    def __init__(
        self,
        memory: Memory,
        request: memory_sync_service_pb2.SyncRequest,
        deadline: float | None,
        metadata: list[tuple[str, MetadataValue]],
    ) -> None:
        self._memory = memory
        self._request = request
        self._deadline = deadline
        self._metadata = metadata
        self._call: _SyncCall | None = None
        self._finished = False

    @property
    def request(self) -> memory_sync_service_pb2.SyncRequest:
        """The request this stream sends (a copy)."""
        copy = memory_sync_service_pb2.SyncRequest()
        copy.CopyFrom(self._request)
        return copy

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> SyncBatch:
        if self._finished:
            raise StopAsyncIteration
        if self._call is None:
            self._call = self._memory.stub.Sync(
                self._request, timeout=self._deadline, metadata=self._metadata
            )
        try:
            response = await self._call.read()
        except grpc.aio.AioRpcError as err:
            self._finished = True
            raise from_rpc_error(err) from err
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._finished and task is not None and not task.cancelling():
                # aclose() from another task cancelled the call, not this task:
                # for the reader that is the end of the stream.
                raise StopAsyncIteration from None
            self._cancel()
            raise
        if not isinstance(response, memory_sync_service_pb2.SyncResponse):
            # grpc.aio.EOF: the server ended the stream (follow=False).
            self._finished = True
            raise StopAsyncIteration
        try:
            return _sync_batch(response)
        except BaseException:
            # Better no batch than one decoded wrongly; the server can stop.
            self._cancel()
            raise

    def _cancel(self) -> None:
        self._finished = True
        if self._call is not None:
            self._call.cancel()

    async def aclose(self) -> None:
        """Cancels the call if it is still open. Iterating afterwards ends at once."""
        self._cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._cancel()

    def __del__(self) -> None:
        # An `async for` left early drops its iterator without telling it; on
        # CPython this runs right then, so the server stops streaming at once
        # rather than whenever grpc.aio's own call object is collected.
        call = getattr(self, "_call", None)
        if call is not None and not call.done():
            call.cancel()

    def __repr__(self) -> str:
        state = "finished" if self._finished else "open" if self._call else "not started"
        return (
            f"SyncStream(workspace_id={self._request.workspace_id!r},"
            f" tables={list(self._request.tables)!r}, {state})"
        )


# --------------------------------------------------------------------------
# Memory records


@dataclass(frozen=True)
class MemoryRecord:
    """One record of the memory system: an embedding with its text and where it came from."""

    id: str
    """Unique within the workspace; writing an existing id replaces the record. 1 to 256
    characters."""
    kind: str
    """What kind of memory this is ("fact", "summary"...), 1 to 64 characters."""
    _: KW_ONLY
    embedding: list[float]
    """1 to 16,000 components, stored as 32-bit floats (so read back rounded to float32)."""
    content: str = ""
    """The text the embedding was made from."""
    metadata: dict[str, JsonValue] = field(default_factory=dict)
    """Free-form JSON metadata. Numbers travel as doubles (google.protobuf.Struct):
    integers must stay within ±2**53 and come back as int."""
    source_table: str | None = None
    """The exposed table the record was derived from."""
    source_row_id: str | None = None
    """The source row's primary key, in text form."""


MemoryRecordLike: TypeAlias = MemoryRecord | Mapping[str, Any]
"""A `MemoryRecord`, or a dict with its field names as keys."""


class ScoredMemoryRecord(NamedTuple):
    """A search result: a record and its cosine similarity to the query, most similar first."""

    record: MemoryRecord
    """The record."""
    similarity: float
    """Cosine similarity to the query embedding, from -1 to 1."""


@dataclass(frozen=True)
class UpsertCounts:
    """What `Memory.upsert_records` wrote."""

    inserted: int
    """Records that did not exist before."""
    updated: int
    """Records that replaced an existing record."""
    batches: int
    """Batches the server received."""


def _struct_value(obj: object, path: str) -> struct_pb2.Value:
    # bool before int: True is an int to Python but a boolean to JSON.
    if obj is None:
        return struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)
    if isinstance(obj, bool):
        return struct_pb2.Value(bool_value=obj)
    if isinstance(obj, int):
        if abs(obj) > _MAX_EXACT_DOUBLE_INT:
            raise ValueError(
                f"{path}: integer {obj} would lose digits as a Struct number (a double);"
                " send it as a string"
            )
        return struct_pb2.Value(number_value=obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"{path}: {obj} is not a JSON number")
        return struct_pb2.Value(number_value=obj)
    if isinstance(obj, str):
        return struct_pb2.Value(string_value=obj)
    if isinstance(obj, Mapping):
        return struct_pb2.Value(struct_value=_struct(obj, path))
    if isinstance(obj, Sequence) and not isinstance(obj, bytes | bytearray):
        values = [_struct_value(item, f"{path}[{index}]") for index, item in enumerate(obj)]
        return struct_pb2.Value(list_value=struct_pb2.ListValue(values=values))
    raise TypeError(f"{path}: {type(obj).__name__} is not a JSON value")


def _struct(obj: Mapping[Any, object], path: str) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    for key, item in obj.items():
        if not isinstance(key, str):
            raise TypeError(f"{path}: key {key!r} is not a string")
        struct.fields[key].CopyFrom(_struct_value(item, f"{path}.{key}"))
    return struct


def _json_value(value: struct_pb2.Value) -> JsonValue:
    match value.WhichOneof("kind"):
        case "number_value":
            number = value.number_value
            # Struct has only doubles; JSON metadata such as {"page": 3} is
            # meant as an integer, and any integer written came back exactly.
            if number.is_integer() and abs(number) <= _MAX_EXACT_DOUBLE_INT:
                return int(number)
            return number
        case "string_value":
            return value.string_value
        case "bool_value":
            return value.bool_value
        case "struct_value":
            return _json_object(value.struct_value)
        case "list_value":
            return [_json_value(item) for item in value.list_value.values]
        case _:
            return None


def _json_object(struct: struct_pb2.Struct) -> dict[str, JsonValue]:
    return {key: _json_value(item) for key, item in struct.fields.items()}


def _record_message(record: MemoryRecordLike, what: str) -> memory_sync_service_pb2.MemoryRecord:
    if not isinstance(record, MemoryRecord):
        if not isinstance(record, Mapping):
            raise TypeError(f"{what} is a {type(record).__name__}, not a MemoryRecord or a dict")
        try:
            record = MemoryRecord(**record)
        except TypeError as err:
            raise TypeError(f"{what}: {err}") from err
    message = memory_sync_service_pb2.MemoryRecord(
        id=record.id,
        kind=record.kind,
        content=record.content,
        source_table=record.source_table or "",
        source_row_id=record.source_row_id or "",
        embedding=record.embedding,
    )
    if record.metadata:
        message.metadata.CopyFrom(_struct(record.metadata, f"{what}.metadata"))
    return message


def _strings(values: Iterable[str], name: str, hint: str = "") -> list[str]:
    """A list of str from an iterable of them; a str alone or other items are TypeErrors."""
    if isinstance(values, str):
        # A str is an Iterable of its characters.
        raise TypeError(f"{name} takes a list of strings, not the str {values!r}")
    found = list(values)
    for index, value in enumerate(found):
        if not isinstance(value, str):
            raise TypeError(f"{name}[{index}] is a {type(value).__name__}, not a str{hint}")
    return found


def _memory_record(message: memory_sync_service_pb2.MemoryRecord) -> MemoryRecord:
    return MemoryRecord(
        message.id,
        message.kind,
        embedding=list(message.embedding),
        content=message.content,
        metadata=_json_object(message.metadata),
        source_table=message.source_table or None,
        source_row_id=message.source_row_id or None,
    )


async def _each(
    records: Iterable[MemoryRecordLike] | AsyncIterable[MemoryRecordLike],
) -> AsyncIterator[MemoryRecordLike]:
    if isinstance(records, AsyncIterable):
        async for record in records:
            yield record
    else:
        for record in records:
            yield record


class _RecordUpload:
    """One UpsertMemoryRecords call, opened with its first batch."""

    def __init__(
        self,
        stub: memory_sync_service_pb2_grpc.MemorySyncServiceStub,
        workspace_id: str,
        deadline: float | None,
        metadata: list[tuple[str, MetadataValue]],
    ) -> None:
        self._stub = stub
        self._workspace_id = workspace_id
        self._deadline = deadline
        self._metadata = metadata
        self._call: _UpsertCall | None = None
        self._expires_at: float | None = None

    async def send(self, records: list[memory_sync_service_pb2.MemoryRecord]) -> None:
        if self._call is None:
            if self._deadline is not None:
                self._expires_at = time.monotonic() + self._deadline
            # The writer API rather than a request iterator: grpc.aio swallows
            # an exception raised inside a request iterator and reports only a
            # cancelled call, which would hide a bad record's TypeError.
            self._call = self._stub.UpsertMemoryRecords(
                None, timeout=self._deadline, metadata=self._metadata
            )
        try:
            await self._call.write(
                memory_sync_service_pb2.UpsertMemoryRecordsRequest(
                    workspace_id=self._workspace_id, records=records
                )
            )
        except Exception as exc:
            raise await self._how_it_ended(self._call, exc) from exc

    async def finish(self) -> UpsertCounts:
        if self._call is None:
            # Nothing to write: the contract wants 1 to 1,000 records a batch,
            # so an empty upload is answered here without a call.
            return UpsertCounts(inserted=0, updated=0, batches=0)
        try:
            await self._call.done_writing()
        except Exception as exc:
            raise await self._how_it_ended(self._call, exc) from exc
        response = await self._call
        return UpsertCounts(
            inserted=response.inserted_count,
            updated=response.updated_count,
            batches=response.batch_count,
        )

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    async def _how_it_ended(self, call: _UpsertCall, failure: Exception) -> Exception:
        """The error a failed write or half-close stands for: the call's own status.

        A write that meets the end of the call (the server answered, or the
        deadline passed, while records were on their way) fails in grpc.aio 1.85
        with INTERNAL "Internal error from Core", which overwrites the call's real
        status, or with a raw cygrpc.ExecuteBatchError (grpc/grpc#36066). The
        status the call ended with is what the caller must see; when grpc has
        overwritten it and the deadline has passed, that is DEADLINE_EXCEEDED.
        """
        if isinstance(failure, grpc.aio.AioRpcError) and not _lost_status(failure):
            return from_rpc_error(failure)
        ended: grpc.aio.AioRpcError | None = None
        try:
            # The call is over or ending, so its status is there at once; the bound
            # only guards against a call grpc left open.
            async with asyncio.timeout(_ENDED_STATUS_WAIT):
                await call
        except grpc.aio.AioRpcError as err:
            ended = err
        except Exception:  # no status to be had: judge by what is known
            pass
        if ended is not None and not _lost_status(ended):
            return from_rpc_error(ended)
        if self._expires_at is not None and time.monotonic() >= self._expires_at:
            return DeadlineExceeded(
                "the deadline passed while the records were being sent; "
                "batches written before it stay written"
            )
        if isinstance(failure, grpc.aio.AioRpcError):
            return from_rpc_error(failure)
        return failure


def _lost_status(err: grpc.aio.AioRpcError) -> bool:
    """Whether grpc.aio replaced the call's status with its own INTERNAL (a write that met
    the end of the call), so the status says nothing about what the server answered."""
    return err.code() == grpc.StatusCode.INTERNAL and "Internal error from Core" in (
        err.details() or ""
    )


# --------------------------------------------------------------------------
# The handle


class Memory:
    """MemorySyncService: sync a workspace's rows, acknowledge progress, and keep memory records.

    Records are written by `upsert_records`, removed by `delete_records` and
    found by `search`.

    Reach it as `client.memory`. Every method takes the workspace id first (a
    UUID or its text; ValueError otherwise) and keyword-only `timeout` and
    `metadata`, as the rest of the client.
    """

    def __init__(self, client: DataClient) -> None:
        self._client = client
        self._stub = memory_sync_service_pb2_grpc.MemorySyncServiceStub(client.channel)

    @property
    def stub(self) -> memory_sync_service_pb2_grpc.MemorySyncServiceStub:
        """The generated stub on the client's channel, for calls this class does not cover.

        Calls made through it bypass the default timeout, the default metadata
        and the conversion to `DataError`.
        """
        return self._stub

    def sync(
        self,
        workspace: str | UUID,
        *,
        tables: Sequence[str],
        resume_token: str | None = None,
        follow: bool = True,
        consumer_id: str | None = None,
        batch_size: int | None = None,
        timeout: Timeout = None,
        metadata: MetadataLike | None = None,
    ) -> SyncStream:
        """Streams a consistent snapshot of the tables' rows, then every committed change.

        Use it with ``async for``; each item is a `SyncBatch`. Without
        `resume_token` the stream starts with SNAPSHOT_ROWS batches and one
        SNAPSHOT_DONE; with the token of a batch from an earlier stream (same
        workspace, same tables) it continues right after that batch. With
        `follow` (the default) the stream stays open and sends changes as they
        commit; with ``follow=False`` it ends once it has caught up.

        `consumer_id` names the consumer for `acknowledge()`. `batch_size` is
        the most rows per batch (1 to 10,000; the server's default 1,000).
        `timeout` defaults to None, no deadline, because a following stream is
        meant to stay open; the call is never retried by gRPC (resume with your
        token instead, see the module docstring).

        Raises, while iterating: `ResnapshotRequired` when the changes after
        the token were pruned (start again without a token);
        `FailedPrecondition` with reason SYNC_NOT_INSTALLED when a table has
        no change capture; `InvalidArgument` for an unknown table or a token of
        other tables; `Unavailable` when the server shuts down (resume).
        Raises ValueError and TypeError at once for arguments the contract
        rejects.
        """
        if isinstance(tables, str):
            # A str is a Sequence of its characters.
            raise TypeError(f"tables takes a list of table names, not the str {tables!r}")
        names = list(tables)
        if not names:
            raise ValueError("sync needs at least one table")
        if len(set(names)) != len(names):
            raise ValueError(f"tables repeats a name: {names!r}")
        if batch_size is not None and not 1 <= batch_size <= _MAX_SYNC_BATCH_SIZE:
            raise ValueError(f"batch_size must be from 1 to {_MAX_SYNC_BATCH_SIZE}")
        request = memory_sync_service_pb2.SyncRequest(
            workspace_id=canonical_workspace_id(workspace),
            tables=names,
            consumer_id=consumer_id or "",
            resume_token=resume_token or "",
            follow=follow,
            batch_size=batch_size or 0,
        )
        deadline, call_metadata = self._client._call_options(timeout, metadata)
        return SyncStream(self, request, deadline, call_metadata)

    async def acknowledge(
        self,
        workspace: str | UUID,
        consumer_id: str,
        resume_token: str,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> None:
        """Records that `consumer_id` applied everything up to `resume_token`.

        Lets the server prune the change log before that point; until a named
        consumer acknowledges (or its progress expires), the log is kept for
        it. Raises `InvalidArgument` for a token of another workspace.
        """
        if not consumer_id or not resume_token:
            raise ValueError("acknowledge needs a consumer_id and a resume_token")
        await self._client._call(
            self._stub.AcknowledgeSync,
            memory_sync_service_pb2.AcknowledgeSyncRequest(
                workspace_id=canonical_workspace_id(workspace),
                consumer_id=consumer_id,
                resume_token=resume_token,
            ),
            timeout=timeout,
            metadata=metadata,
        )

    async def upsert_records(
        self,
        workspace: str | UUID,
        records: Iterable[MemoryRecordLike] | AsyncIterable[MemoryRecordLike],
        *,
        batch_size: int = 500,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> UpsertCounts:
        """Writes memory records in batches over one client-streaming call; idempotent by id.

        `records` may be a list, any iterable or an async iterable, so records
        can be produced while earlier batches are on their way. A batch holds
        at most `batch_size` records (1 to 1,000) and never the same id twice:
        a repeated id starts a new batch, so the later record wins. With no
        records no call is made.

        `timeout` covers the whole stream. Raises `InvalidArgument` (the field
        path names the batch and record) for a bad record; batches before it
        stay written. Raises TypeError or ValueError, before sending the
        record's batch, for a record that cannot be converted.
        """
        if not 1 <= batch_size <= _MAX_UPSERT_BATCH_SIZE:
            raise ValueError(f"batch_size must be from 1 to {_MAX_UPSERT_BATCH_SIZE}")
        workspace_id = canonical_workspace_id(workspace)
        deadline, call_metadata = self._client._call_options(timeout, metadata)
        upload = _RecordUpload(self._stub, workspace_id, deadline, call_metadata)
        batch: list[memory_sync_service_pb2.MemoryRecord] = []
        ids: set[str] = set()
        try:
            index = 0
            async for record in _each(records):
                message = _record_message(record, f"record {index}")
                index += 1
                if len(batch) == batch_size or message.id in ids:
                    await upload.send(batch)
                    batch, ids = [], set()
                batch.append(message)
                ids.add(message.id)
            if batch:
                await upload.send(batch)
            return await upload.finish()
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from err
        except BaseException:
            # A record that would not convert, or the caller cancelled: the
            # batches sent so far stay written, the rest is abandoned.
            upload.cancel()
            raise

    async def delete_records(
        self,
        workspace: str | UUID,
        *,
        ids: Iterable[str] = (),
        source_table: str | None = None,
        source_row_ids: Iterable[str] = (),
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> int:
        """Deletes the records named by `ids` or derived from the source rows; idempotent.

        `source_row_ids` are primary keys of rows of `source_table`, in the
        text form the records were written with (`source_row_id`), such as
        ``str(row["id"])`` for the DELETE rows of a sync batch. A record that
        matches either selector is deleted; all in one transaction. Returns
        the number deleted: ids and rows without records are skipped, so a
        repeated call returns 0. With no ids and no source row ids no call is
        made and 0 is returned, so a batch without deletes can be passed as is.
        The call is retried on UNAVAILABLE and ABORTED.

        Raises ValueError, before sending, for source row ids without a
        `source_table` or more than 1,000 ids or source row ids (call once per
        1,000), and TypeError for a str where a list of strings belongs or an
        item that is not a str.
        Raises `InvalidArgument` (field paths such as ``ids[3]``) for an id
        the server refuses.
        """
        id_list = _strings(ids, "ids")
        row_id_list = _strings(
            source_row_ids, "source_row_ids", " (keys travel in text form, such as str(row['id']))"
        )
        if row_id_list and not source_table:
            raise ValueError("source_row_ids needs the source_table the rows belong to")
        for name, values in (("ids", id_list), ("source_row_ids", row_id_list)):
            if len(values) > _MAX_DELETE_SELECTORS:
                raise ValueError(
                    f"a delete names at most {_MAX_DELETE_SELECTORS:,} {name},"
                    f" not {len(values):,}: split them over several calls"
                )
        workspace_id = canonical_workspace_id(workspace)
        if not id_list and not row_id_list:
            return 0
        request = memory_sync_service_pb2.DeleteMemoryRecordsRequest(
            workspace_id=workspace_id,
            ids=id_list,
            # A table without rows selects nothing here; the server would refuse it.
            source_table=(source_table or "") if row_id_list else "",
            source_row_ids=row_id_list,
        )
        response = await self._client._call(
            self._stub.DeleteMemoryRecords, request, timeout=timeout, metadata=metadata
        )
        return response.deleted_count

    async def search(
        self,
        workspace: str | UUID,
        embedding: Sequence[float],
        *,
        top_k: int,
        kinds: Iterable[str] = (),
        source_table: str | None = None,
        metadata_contains: Mapping[str, object] | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> list[ScoredMemoryRecord]:
        """The `top_k` records nearest to `embedding` by cosine similarity, most similar first.

        Records of another dimension are skipped. Optionally only records of
        the given `kinds`, derived from `source_table`, or whose metadata
        contains the JSON object `metadata_contains` (PostgreSQL ``@>``).
        Raises ValueError for an empty embedding or `top_k` outside 1 to 1,000.
        """
        if not 1 <= top_k <= _MAX_TOP_K:
            raise ValueError(f"top_k must be from 1 to {_MAX_TOP_K}")
        if isinstance(kinds, str):
            raise TypeError(f"kinds takes a list of kinds, not the str {kinds!r}")
        request = memory_sync_service_pb2.SearchMemoryRecordsRequest(
            workspace_id=canonical_workspace_id(workspace),
            embedding=embedding,
            top_k=top_k,
            kinds=kinds,
            source_table=source_table or "",
        )
        if not request.embedding:
            raise ValueError("search needs a non-empty embedding")
        if metadata_contains is not None:
            if not isinstance(metadata_contains, Mapping):
                raise TypeError("metadata_contains takes a dict (a JSON object)")
            request.metadata_contains = json_text(metadata_contains)
        response = await self._client._call(
            self._stub.SearchMemoryRecords, request, timeout=timeout, metadata=metadata
        )
        return [
            ScoredMemoryRecord(_memory_record(result.record), result.similarity)
            for result in response.results
        ]
