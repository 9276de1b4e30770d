"""The typed async client of the RaptorFlow Data service, with a Supabase-style query builder.

A first query::

    from raptorflow.data.client import DataClient

    async with DataClient("localhost:50051") as client:
        result = await (
            client.workspace(workspace_id)
            .table("campaigns")
            .select("id", "name")
            .eq("status", "active")
            .order("created_at", desc=True)
            .limit(20)
            .execute()
        )
        for row in result.data:
            print(row["id"], row["name"])

`client.memory` follows a workspace's rows for the memory system (snapshot,
then changes, resumable by token) and stores and searches memory records::

    async for batch in client.memory.sync(workspace_id, tables=["notes"], resume_token=saved):
        apply(batch.event, batch.operations, batch.rows)
        saved = batch.resume_token
"""

from raptorflow.data.client._client import DataClient
from raptorflow.data.client._columns import from_column_batch
from raptorflow.data.client._config import (
    USE_CLIENT_DEFAULT,
    ClientConfig,
    MetadataLike,
    Timeout,
    UseClientDefault,
)
from raptorflow.data.client._errors import (
    ERROR_DOMAIN,
    Aborted,
    AlreadyExists,
    Cancelled,
    DataError,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InternalError,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResnapshotRequired,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    UnknownError,
    from_rpc_error,
)
from raptorflow.data.client._memory import (
    ChangeOperation,
    Memory,
    MemoryRecord,
    MemoryRecordLike,
    ScoredMemoryRecord,
    SyncBatch,
    SyncEvent,
    SyncStream,
    UpsertCounts,
)
from raptorflow.data.client._query import (
    CountQuery,
    DeleteQuery,
    InsertQuery,
    Mutation,
    MutationResult,
    SelectQuery,
    SelectResult,
    TableQuery,
    UpdateQuery,
    UpsertQuery,
    Workspace,
    all_of,
    any_of,
    contains,
    eq,
    gt,
    gte,
    ilike,
    in_,
    is_not_null,
    is_null,
    like,
    lt,
    lte,
    neq,
    not_,
)
from raptorflow.data.client._values import (
    Json,
    JsonValue,
    PyValue,
    Row,
    ValueLike,
    Vector,
    from_value,
    to_value,
)

__all__ = [
    "ERROR_DOMAIN",
    "USE_CLIENT_DEFAULT",
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "ChangeOperation",
    "ClientConfig",
    "CountQuery",
    "DataClient",
    "DataError",
    "DataLoss",
    "DeadlineExceeded",
    "DeleteQuery",
    "FailedPrecondition",
    "FieldViolation",
    "InsertQuery",
    "InternalError",
    "InvalidArgument",
    "Json",
    "JsonValue",
    "Memory",
    "MemoryRecord",
    "MemoryRecordLike",
    "MetadataLike",
    "Mutation",
    "MutationResult",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "PyValue",
    "ResnapshotRequired",
    "ResourceExhausted",
    "Row",
    "ScoredMemoryRecord",
    "SelectQuery",
    "SelectResult",
    "SyncBatch",
    "SyncEvent",
    "SyncStream",
    "TableQuery",
    "Timeout",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UnknownError",
    "UpdateQuery",
    "UpsertCounts",
    "UpsertQuery",
    "UseClientDefault",
    "ValueLike",
    "Vector",
    "Workspace",
    "all_of",
    "any_of",
    "contains",
    "eq",
    "from_column_batch",
    "from_rpc_error",
    "from_value",
    "gt",
    "gte",
    "ilike",
    "in_",
    "is_not_null",
    "is_null",
    "like",
    "lt",
    "lte",
    "neq",
    "not_",
    "to_value",
]
