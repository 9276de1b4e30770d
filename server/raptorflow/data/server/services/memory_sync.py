"""MemorySyncService: sync streams for the memory system, and its memory records, kept thin.

Sync and AcknowledgeSync hand over to `sync.streams.SyncStreams` (snapshot,
change log, resume tokens, the shared change reader); UpsertMemoryRecords,
DeleteMemoryRecords and SearchMemoryRecords to `memory.store.MemoryStore`. This module only checks
what every call shares, counts, and shapes responses; errors are mapped by
`@rpc_errors` / `@stream_errors`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from raptorflow.data.server.db.connections import Deadline
from raptorflow.data.server.db.values import parse_uuid
from raptorflow.data.server.errors import invalid_argument
from raptorflow.data.server.memory.store import MemoryStore
from raptorflow.data.server.services.status import rpc_errors, stream_errors
from raptorflow.data.server.sync.streams import SyncStreams
from raptorflow.data.v1 import memory_sync_service_pb2, memory_sync_service_pb2_grpc

pb = memory_sync_service_pb2
Context = grpc.aio.ServicerContext[Any, Any]


class MemorySyncServicer(memory_sync_service_pb2_grpc.MemorySyncServiceServicer):
    """Serves raptorflow.data.v1.MemorySyncService."""

    def __init__(self, streams: SyncStreams, store: MemoryStore) -> None:
        self._streams = streams
        self._store = store

    @stream_errors
    async def Sync(
        self, request: pb.SyncRequest, context: Context
    ) -> AsyncIterator[pb.SyncResponse]:
        async for response in self._streams.open(request):
            yield response

    @rpc_errors
    async def AcknowledgeSync(
        self, request: pb.AcknowledgeSyncRequest, context: Context
    ) -> pb.AcknowledgeSyncResponse:
        await self._streams.acknowledge(request, Deadline.after(context.time_remaining()))
        return pb.AcknowledgeSyncResponse()

    @rpc_errors
    async def UpsertMemoryRecords(
        self, request_iterator: AsyncIterator[pb.UpsertMemoryRecordsRequest], context: Context
    ) -> pb.UpsertMemoryRecordsResponse:
        response = pb.UpsertMemoryRecordsResponse()
        workspace_id = ""
        async for batch in request_iterator:
            prefix = f"batches[{response.batch_count}]"
            if not workspace_id:
                workspace_id = batch.workspace_id
                parse_uuid(workspace_id, f"{prefix}.workspace_id")
            elif batch.workspace_id != workspace_id:
                raise invalid_argument(
                    f"{prefix}.workspace_id",
                    "every batch of a stream names the same workspace",
                    reason="WORKSPACE_MISMATCH",
                )
            # Each batch commits on its own: a failure later in the stream keeps
            # what was acknowledged by count so far, and ids make a retry idempotent.
            inserted, updated = await self._store.upsert(
                batch, prefix, Deadline.after(context.time_remaining())
            )
            response.inserted_count += inserted
            response.updated_count += updated
            response.batch_count += 1
        return response

    @rpc_errors
    async def DeleteMemoryRecords(
        self, request: pb.DeleteMemoryRecordsRequest, context: Context
    ) -> pb.DeleteMemoryRecordsResponse:
        deleted = await self._store.delete(request, Deadline.after(context.time_remaining()))
        return pb.DeleteMemoryRecordsResponse(deleted_count=deleted)

    @rpc_errors
    async def SearchMemoryRecords(
        self, request: pb.SearchMemoryRecordsRequest, context: Context
    ) -> pb.SearchMemoryRecordsResponse:
        results = await self._store.search(request, Deadline.after(context.time_remaining()))
        return pb.SearchMemoryRecordsResponse(results=results)
