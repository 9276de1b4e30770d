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

`client.maintenance` backs up and restores, and runs maintenance jobs;
`client.monitoring` reports how the server's database layer is doing::

    job = await client.maintenance.vacuum(["events"])
    job = await client.maintenance.wait_job(job.job_id)  # JobFailed unless it SUCCEEDED
    await client.maintenance.backup_to_path("ws.rfbackup", workspace_id=workspace_id)
    status = await client.monitoring.get_status()

Code written against RaptorFlow's old integration layer imports
`raptorflow.data.client.compat` instead (`get_database_service()`,
`check_database_health()`, `DatabaseConnection`...).
"""

from raptorflow.data.client._auth import TokenSource, bearer_auth
from raptorflow.data.client._client import DataClient
from raptorflow.data.client._columns import from_column_batch
from raptorflow.data.client._config import (
    MAX_TIMEOUT_SECONDS,
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
    CommitOutcomeUnknown,
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
from raptorflow.data.client._maintenance import (
    BACKUP_FILE_MAGIC,
    BackupFileError,
    BackupPart,
    JobFailed,
    JobState,
    LocalBackup,
    Maintenance,
    job_state,
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
from raptorflow.data.client._monitoring import Monitoring
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
from raptorflow.data.client._tls import tls_credentials
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
    "BACKUP_FILE_MAGIC",
    "ERROR_DOMAIN",
    "MAX_TIMEOUT_SECONDS",
    "USE_CLIENT_DEFAULT",
    "Aborted",
    "AlreadyExists",
    "BackupFileError",
    "BackupPart",
    "Cancelled",
    "ChangeOperation",
    "ClientConfig",
    "CommitOutcomeUnknown",
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
    "JobFailed",
    "JobState",
    "Json",
    "JsonValue",
    "LocalBackup",
    "Maintenance",
    "Memory",
    "MemoryRecord",
    "MemoryRecordLike",
    "MetadataLike",
    "Monitoring",
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
    "TokenSource",
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
    "bearer_auth",
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
    "job_state",
    "like",
    "lt",
    "lte",
    "neq",
    "not_",
    "tls_credentials",
    "to_value",
]
