"""The authorization matrix: every RPC the server serves, called with every kind of credential.

Each row of `CASES` is one request of one method (some methods have several: a
batch naming a second workspace, a backup of every workspace) with the roles
that may send it, the workspaces it names and the status the servicer gives it
when it is let through. Each column of `CREDENTIALS` is one way of calling: no
token, tokens wrong in every way the verifier knows, malformed headers, and a
token of each role for the request's workspace, for another workspace and for
every workspace. The expected status of a cell is worked out here from the row
and the column, never read from the server's policy: the test restates the
access rules, so a change to them has to change both.

`test_every_method_has_a_row_and_a_rule` ties the rows to the generated service
descriptors, so a new RPC fails here until someone writes its rows (and its
rule in the server's policy).
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import pkgutil
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import grpc
import jwt
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from messages import eq, row, v
from raptorflow.data import v1 as generated
from raptorflow.data.server import cli
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.auth.policy import RULES
from raptorflow.data.v1 import (
    job_pb2,
    maintenance_service_pb2,
    maintenance_service_pb2_grpc,
    memory_sync_service_pb2,
    memory_sync_service_pb2_grpc,
    monitoring_service_pb2,
    workspace_service_pb2,
)
from statuses import rpc_error
from tokens import ADMIN_TOKEN, bearer, mint

ws = workspace_service_pb2
mem = memory_sync_service_pb2
mnt = maintenance_service_pb2
Code = grpc.StatusCode

HOME = str(uuid.uuid4())
"""The workspace every workspace-scoped request names."""
OTHER = str(uuid.uuid4())
"""A second workspace: granted by some tokens, named by a few requests."""
BACKUP_TABLE = "campaign_events"
"""A table nothing here writes to in HOME, so restoring HOME's (empty) backup always works."""
SYNC_TABLES = ("campaigns", "campaign_events")
TIMEOUT = 10.0

WORKSPACE = "WorkspaceService"
MEMORY = "MemorySyncService"
MAINTENANCE = "MaintenanceService"
MONITORING = "MonitoringService"
PACKAGE = "raptorflow.data.v1"

ROLES = ("agent", "memory", "job", "admin")
ANY_ROLE = frozenset(ROLES)
AGENTS = frozenset({"agent", "admin"})
MEMORY_ROLES = frozenset({"memory", "admin"})
SEARCHERS = frozenset({"memory", "agent", "admin"})
OPERATORS = frozenset({"job", "admin"})

ALL = "all"
"""A request whose scope is every workspace (needs a token for ["*"])."""
Named = frozenset[str] | str | None
"""The workspaces a request names: a set of them, ALL, or None (it reaches no workspace)."""

Outcome = tuple[grpc.StatusCode, str]
"""A call's status code and ErrorInfo reason ("" for OK)."""
OK: Outcome = (Code.OK, "")


# ---------------------------------------------------------------------------
# What the matrix needs before it runs


@dataclasses.dataclass
class Prepared:
    """Things allowed calls need, made once per module with an admin token."""

    ack_token: str = ""
    """A resume token of HOME's campaigns sync, for AcknowledgeSync."""
    backup: list[mnt.ExportBackupResponse] = dataclasses.field(default_factory=list)
    """An export of HOME's (empty) BACKUP_TABLE, for RestoreBackup."""


PREPARED = Prepared()


@pytest.fixture(scope="module")
def captured(database_url: str) -> None:
    """Change capture on the sync tables, as `migrate --sync-tables` installs it (idempotent)."""
    code = cli.main(
        ["migrate", "--database-url", database_url, "--sync-tables", ",".join(SYNC_TABLES)]
    )
    assert code == 0


@pytest.fixture(scope="module")
async def channel(captured: None, server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    """A channel without a token of its own: each call brings its credential's metadata."""
    async with grpc.aio.insecure_channel(server.address) as plain:
        admin = bearer(ADMIN_TOKEN)
        sync = memory_sync_service_pb2_grpc.MemorySyncServiceStub(plain)
        async for message in sync.Sync(
            mem.SyncRequest(workspace_id=HOME, tables=["campaigns"]), metadata=admin
        ):
            PREPARED.ack_token = message.resume_token
        assert PREPARED.ack_token
        maintenance = maintenance_service_pb2_grpc.MaintenanceServiceStub(plain)
        scope = job_pb2.BackupScope(workspace_id=HOME, tables=[BACKUP_TABLE])
        PREPARED.backup = [
            message
            async for message in maintenance.ExportBackup(
                mnt.ExportBackupRequest(scope=scope), metadata=admin, timeout=TIMEOUT
            )
        ]
        assert PREPARED.backup[0].WhichOneof("part") == "header"
        yield plain


# ---------------------------------------------------------------------------
# The rows: one request of one method each


Requests = Callable[[str], list[Message]]
"""A case's request messages, made anew for each call from a unique tag (names of rows)."""
Written = Callable[[asyncpg.Connection, str], Awaitable[int]]
"""How many rows (or records) the call with that tag wrote."""


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    method: str
    """"Service/Method" in the raptorflow.data.v1 package."""
    requests: Requests
    roles: frozenset[str]
    """The roles that may send this request."""
    named: Named
    allowed: Outcome = OK
    """The status the servicer gives the request once it is let through."""
    written: Written | None = None
    """For writes: what the call wrote (one row when allowed, none when refused)."""

    @property
    def path(self) -> str:
        return f"/{PACKAGE}.{self.method}"


def one(message: Message) -> Requests:
    return lambda _tag: [message]


def restore_requests(header_scope: str | None) -> list[Message]:
    """HOME's backup as a restore stream; its header's scope replaced unless None."""
    requests = []
    for message in PREPARED.backup:
        part = message.WhichOneof("part")
        request = mnt.RestoreBackupRequest(**{part: getattr(message, part)})
        requests.append(request)
    if header_scope is not None:
        requests[0].header.scope.workspace_id = header_scope
    return requests


def all_workspace_restore(_tag: str) -> list[Message]:
    # A header of every workspace that lists no table: refused as malformed once the
    # caller may restore every workspace, before anything is read or written.
    header = mnt.RestoreBackupRequest(header=PREPARED.backup[0].header)
    header.header.scope.workspace_id = ""
    del header.header.tables[:]
    return [header, mnt.RestoreBackupRequest(manifest=PREPARED.backup[-1].manifest)]


def memory_batch(workspace: str, record_id: str) -> mem.UpsertMemoryRecordsRequest:
    return mem.UpsertMemoryRecordsRequest(
        workspace_id=workspace,
        records=[mem.MemoryRecord(id=record_id, kind="fact", embedding=[1.0, 0.5, 0.25])],
    )


async def campaigns_named(db: asyncpg.Connection, tag: str) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM campaigns WHERE name = $1", tag)
    return count


async def memory_records_named(db: asyncpg.Connection, tag: str) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM raptorflow_data.memory_records WHERE id = $1", tag
    )
    return count


def analyze(*tables: str) -> job_pb2.JobSpec:
    return job_pb2.JobSpec(analyze=job_pb2.AnalyzeJob(tables=list(tables)))


def backup_to_file(workspace: str) -> job_pb2.JobSpec:
    scope = job_pb2.BackupScope(workspace_id=workspace, tables=[BACKUP_TABLE])
    return job_pb2.JobSpec(backup_to_file=job_pb2.BackupToFileJob(scope=scope, path="x.bak"))


NO_ROW = eq("id", -1)
HOME_ONLY = frozenset({HOME})
HOME_AND_OTHER = frozenset({HOME, OTHER})
NO_BACKUP_DIR: Outcome = (Code.FAILED_PRECONDITION, "BACKUP_DIR_NOT_SET")
UNKNOWN_JOB = str(uuid.uuid4())

CASES = [
    # -- WorkspaceService ----------------------------------------------------------
    Case(
        "DescribeTables",
        f"{WORKSPACE}/DescribeTables",
        one(ws.DescribeTablesRequest(tables=["campaigns"])),
        ANY_ROLE,
        None,
    ),
    Case(
        "Select",
        f"{WORKSPACE}/Select",
        one(ws.SelectRequest(workspace_id=HOME, table="campaigns")),
        AGENTS,
        HOME_ONLY,
    ),
    Case(
        "Count",
        f"{WORKSPACE}/Count",
        one(ws.CountRequest(workspace_id=HOME, table="campaigns")),
        AGENTS,
        HOME_ONLY,
    ),
    Case(
        "Insert",
        f"{WORKSPACE}/Insert",
        lambda tag: [
            ws.InsertRequest(
                workspace_id=HOME, table="campaigns", columns=["name"], rows=[row(tag)]
            )
        ],
        AGENTS,
        HOME_ONLY,
        written=campaigns_named,
    ),
    Case(
        "Upsert",
        f"{WORKSPACE}/Upsert",
        lambda tag: [
            ws.UpsertRequest(
                workspace_id=HOME,
                table="campaigns",
                columns=["name"],
                rows=[row(tag)],
                conflict_columns=["name"],
                on_conflict=ws.CONFLICT_ACTION_IGNORE,
            )
        ],
        AGENTS,
        HOME_ONLY,
        written=campaigns_named,
    ),
    Case(
        "Update",
        f"{WORKSPACE}/Update",
        one(
            ws.UpdateRequest(
                workspace_id=HOME,
                table="campaigns",
                values={"status": v("x")},
                filter=NO_ROW,
            )
        ),
        AGENTS,
        HOME_ONLY,
    ),
    Case(
        "Delete",
        f"{WORKSPACE}/Delete",
        one(ws.DeleteRequest(workspace_id=HOME, table="campaigns", filter=NO_ROW)),
        AGENTS,
        HOME_ONLY,
    ),
    Case(
        "ExecuteBatch",
        f"{WORKSPACE}/ExecuteBatch",
        lambda tag: [
            ws.ExecuteBatchRequest(
                workspace_id=HOME,
                operations=[
                    ws.BatchOperation(
                        insert=ws.InsertRequest(
                            table="campaigns", columns=["name"], rows=[row(tag)]
                        )
                    ),
                    ws.BatchOperation(delete=ws.DeleteRequest(table="campaigns", filter=NO_ROW)),
                ],
            )
        ],
        AGENTS,
        HOME_ONLY,
        written=campaigns_named,
    ),
    Case(
        # An operation naming another workspace: the token must grant both; a token for
        # every workspace gets past authorization, and the servicer refuses the mismatch.
        "ExecuteBatch-operation-of-another-workspace",
        f"{WORKSPACE}/ExecuteBatch",
        lambda tag: [
            ws.ExecuteBatchRequest(
                workspace_id=HOME,
                operations=[
                    ws.BatchOperation(
                        insert=ws.InsertRequest(
                            workspace_id=OTHER, table="campaigns", columns=["name"], rows=[row(tag)]
                        )
                    )
                ],
            )
        ],
        AGENTS,
        HOME_AND_OTHER,
        allowed=(Code.INVALID_ARGUMENT, "WORKSPACE_MISMATCH"),
        written=campaigns_named,
    ),
    # -- MemorySyncService ---------------------------------------------------------
    Case(
        "Sync",
        f"{MEMORY}/Sync",
        one(mem.SyncRequest(workspace_id=HOME, tables=["campaigns"])),
        MEMORY_ROLES,
        HOME_ONLY,
    ),
    Case(
        "AcknowledgeSync",
        f"{MEMORY}/AcknowledgeSync",
        lambda _tag: [
            mem.AcknowledgeSyncRequest(
                workspace_id=HOME,
                consumer_id="authorization-matrix",
                resume_token=PREPARED.ack_token,
            )
        ],
        MEMORY_ROLES,
        HOME_ONLY,
    ),
    Case(
        "UpsertMemoryRecords",
        f"{MEMORY}/UpsertMemoryRecords",
        lambda tag: [memory_batch(HOME, tag)],
        MEMORY_ROLES,
        HOME_ONLY,
        written=memory_records_named,
    ),
    Case(
        # The second message of the stream names another workspace: checked per message.
        "UpsertMemoryRecords-second-batch-of-another-workspace",
        f"{MEMORY}/UpsertMemoryRecords",
        lambda tag: [memory_batch(HOME, f"{tag}-first"), memory_batch(OTHER, tag)],
        MEMORY_ROLES,
        HOME_AND_OTHER,
        allowed=(Code.INVALID_ARGUMENT, "WORKSPACE_MISMATCH"),
        written=memory_records_named,
    ),
    Case(
        "DeleteMemoryRecords",
        f"{MEMORY}/DeleteMemoryRecords",
        one(mem.DeleteMemoryRecordsRequest(workspace_id=HOME, ids=[str(uuid.uuid4())])),
        MEMORY_ROLES,
        HOME_ONLY,
    ),
    Case(
        "SearchMemoryRecords",
        f"{MEMORY}/SearchMemoryRecords",
        one(mem.SearchMemoryRecordsRequest(workspace_id=HOME, embedding=[1.0, 0.0, 0.0], top_k=1)),
        SEARCHERS,
        HOME_ONLY,
    ),
    # -- MaintenanceService --------------------------------------------------------
    Case(
        "ExportBackup",
        f"{MAINTENANCE}/ExportBackup",
        one(mnt.ExportBackupRequest(scope=job_pb2.BackupScope(workspace_id=HOME))),
        OPERATORS,
        HOME_ONLY,
    ),
    Case(
        "ExportBackup-every-workspace",
        f"{MAINTENANCE}/ExportBackup",
        one(mnt.ExportBackupRequest(scope=job_pb2.BackupScope(tables=[BACKUP_TABLE]))),
        OPERATORS,
        ALL,
    ),
    Case(
        "RestoreBackup",
        f"{MAINTENANCE}/RestoreBackup",
        lambda _tag: restore_requests(None),
        OPERATORS,
        HOME_ONLY,
    ),
    Case(
        # The same stream with a header naming OTHER: the header decides, not the rows.
        "RestoreBackup-header-of-another-workspace",
        f"{MAINTENANCE}/RestoreBackup",
        lambda _tag: restore_requests(OTHER),
        OPERATORS,
        frozenset({OTHER}),
    ),
    Case(
        "RestoreBackup-every-workspace",
        f"{MAINTENANCE}/RestoreBackup",
        all_workspace_restore,
        OPERATORS,
        ALL,
        allowed=(Code.INVALID_ARGUMENT, "MALFORMED_BACKUP"),
    ),
    Case(
        "StartJob",
        f"{MAINTENANCE}/StartJob",
        one(mnt.StartJobRequest(spec=analyze("campaigns"))),
        OPERATORS,
        None,
    ),
    Case(
        "StartJob-backup-of-a-workspace",
        f"{MAINTENANCE}/StartJob",
        one(mnt.StartJobRequest(spec=backup_to_file(HOME))),
        OPERATORS,
        HOME_ONLY,
        allowed=NO_BACKUP_DIR,
    ),
    Case(
        "StartJob-backup-of-every-workspace",
        f"{MAINTENANCE}/StartJob",
        one(mnt.StartJobRequest(spec=backup_to_file(""))),
        OPERATORS,
        ALL,
        allowed=NO_BACKUP_DIR,
    ),
    Case(
        "StartJob-restore-from-file",
        f"{MAINTENANCE}/StartJob",
        one(
            mnt.StartJobRequest(
                spec=job_pb2.JobSpec(restore_from_file=job_pb2.RestoreFromFileJob(path="x.bak"))
            )
        ),
        OPERATORS,
        ALL,
        allowed=NO_BACKUP_DIR,
    ),
    Case(
        "GetJob",
        f"{MAINTENANCE}/GetJob",
        one(mnt.GetJobRequest(job_id=UNKNOWN_JOB)),
        OPERATORS,
        None,
        allowed=(Code.NOT_FOUND, "JOB_NOT_FOUND"),
    ),
    Case(
        "ListJobs",
        f"{MAINTENANCE}/ListJobs",
        one(mnt.ListJobsRequest(page_size=1)),
        OPERATORS,
        None,
    ),
    Case(
        "WatchJob",
        f"{MAINTENANCE}/WatchJob",
        one(mnt.WatchJobRequest(job_id=UNKNOWN_JOB)),
        OPERATORS,
        None,
        allowed=(Code.NOT_FOUND, "JOB_NOT_FOUND"),
    ),
    Case(
        "CancelJob",
        f"{MAINTENANCE}/CancelJob",
        one(mnt.CancelJobRequest(job_id=UNKNOWN_JOB)),
        OPERATORS,
        None,
        allowed=(Code.NOT_FOUND, "JOB_NOT_FOUND"),
    ),
    Case(
        "ListSchedules",
        f"{MAINTENANCE}/ListSchedules",
        one(mnt.ListSchedulesRequest()),
        OPERATORS,
        None,
    ),
    # -- MonitoringService ---------------------------------------------------------
    Case(
        "GetStatus",
        f"{MONITORING}/GetStatus",
        one(monitoring_service_pb2.GetStatusRequest()),
        OPERATORS,
        None,
    ),
]


# ---------------------------------------------------------------------------
# The columns: how the call authenticates


@dataclasses.dataclass(frozen=True)
class Credential:
    id: str
    metadata: tuple[tuple[str, str], ...]
    refused: Outcome | None = None
    """UNAUTHENTICATED and its reason, whatever the request; None for a valid token."""
    roles: frozenset[str] = frozenset()
    """The token's roles (names this service does not know included)."""
    grant: str = ""
    """HOME, OTHER or "*"."""


def token_credential(role: str | tuple[str, ...], grant: str, label: str) -> Credential:
    """A valid token; a tuple of roles goes in the `roles` claim, one role in `role`."""
    name = role if isinstance(role, str) else "+".join(role)
    token = mint(
        role if isinstance(role, str) else list(role), [grant], subject=f"m-{name}-{label}"
    )
    roles = frozenset([role] if isinstance(role, str) else role)
    return Credential(f"{name}-for-{label}", bearer(token), roles=roles, grant=grant)


def unauthenticated(reason: str) -> Outcome:
    return (Code.UNAUTHENTICATED, reason)


def unsigned_token() -> str:
    """alg "none": claims anyone can write."""
    now = time.time()
    claims = {
        "sub": "matrix-none",
        "iss": "raptorflow",
        "aud": "raptorflow-data",
        "exp": now + 3600,
        "role": "admin",
        "workspaces": ["*"],
    }
    return jwt.encode(claims, None, algorithm="none")


def hs512_token() -> str:
    """Signed with the server's secret, but with an algorithm the server does not accept."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return mint("admin", subject="matrix-hs512", algorithm="HS512")


WRONG_SECRET = b"not-the-servers-secret-but-32-bytes-long"
BAD_CREDENTIALS = [
    Credential("no-token", (), unauthenticated("TOKEN_MISSING")),
    Credential(
        "expired",
        bearer(mint("admin", subject="matrix-expired", ttl=-3600)),
        unauthenticated("TOKEN_EXPIRED"),
    ),
    Credential(
        "wrong-signature",
        bearer(mint("admin", subject="matrix-forged", key=WRONG_SECRET)),
        unauthenticated("TOKEN_SIGNATURE_INVALID"),
    ),
    Credential(
        "wrong-audience",
        bearer(mint("admin", subject="matrix-audience", audience="another-service")),
        unauthenticated("TOKEN_AUDIENCE_INVALID"),
    ),
    Credential(
        "wrong-issuer",
        bearer(mint("admin", subject="matrix-issuer", issuer="someone-else")),
        unauthenticated("TOKEN_ISSUER_INVALID"),
    ),
    Credential(
        "not-yet-valid",
        bearer(mint("admin", subject="matrix-nbf", nbf=int(time.time()) + 3600)),
        unauthenticated("TOKEN_NOT_YET_VALID"),
    ),
    Credential(
        "no-subject",
        bearer(mint("admin", subject=None)),  # type: ignore[arg-type]
        unauthenticated("TOKEN_CLAIMS_INVALID"),
    ),
    Credential(
        "basic-scheme",
        (("authorization", "Basic x"),),
        unauthenticated("TOKEN_MALFORMED"),
    ),
    Credential(
        "bearer-without-token",
        (("authorization", "Bearer"),),
        unauthenticated("TOKEN_MALFORMED"),
    ),
    Credential(
        "garbage-token",
        (("authorization", "Bearer not.a-jwt"),),
        unauthenticated("TOKEN_MALFORMED"),
    ),
    Credential(
        "garbage-header",
        (("authorization", "garbage"),),
        unauthenticated("TOKEN_MALFORMED"),
    ),
    Credential(
        "two-headers",
        bearer(ADMIN_TOKEN) + bearer(ADMIN_TOKEN),
        unauthenticated("TOKEN_MALFORMED"),
    ),
    Credential(
        "alg-none",
        bearer(unsigned_token()),
        unauthenticated("TOKEN_KEY_UNKNOWN"),
    ),
    Credential(
        "alg-hs512",
        bearer(hs512_token()),
        unauthenticated("TOKEN_KEY_UNKNOWN"),
    ),
]
GRANTS = {"home": HOME, "other-workspace": OTHER, "every-workspace": "*"}
TOKEN_CREDENTIALS = [
    token_credential(role, grant, label)
    for role, (label, grant) in itertools.product(
        (*ROLES, "auditor"),  # "auditor": a role of some other service, no role here
        GRANTS.items(),
    )
] + [
    # A `roles` list: any one of them will do; unknown names are ignored.
    token_credential(("memory", "agent"), HOME, "home"),
    token_credential(("auditor", "job"), HOME, "home"),
]
CREDENTIALS = BAD_CREDENTIALS + TOKEN_CREDENTIALS


def permission_denied(reason: str) -> Outcome:
    return (Code.PERMISSION_DENIED, reason)


def expected(case: Case, credential: Credential) -> Outcome:
    """The status of `case` called with `credential`, from the access rules restated here."""
    if credential.refused is not None:
        return credential.refused
    if credential.roles.isdisjoint(case.roles):
        return permission_denied("ROLE_NOT_ALLOWED")
    if credential.grant != "*":
        if case.named == ALL:
            return permission_denied("ALL_WORKSPACES_NOT_GRANTED")
        if isinstance(case.named, frozenset) and not case.named <= {credential.grant}:
            return permission_denied("WORKSPACE_NOT_GRANTED")
    return case.allowed


# ---------------------------------------------------------------------------
# Calling a method by its descriptor


def generated_services() -> dict[str, MethodDescriptor]:
    """Every method of every service the generated raptorflow.data.v1 modules declare."""
    methods: dict[str, MethodDescriptor] = {}
    for module_info in pkgutil.iter_modules(generated.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"{generated.__name__}.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                methods[f"/{service.full_name}/{method.name}"] = method
    return methods


METHODS = generated_services()


LOST_STATUS_RETRIES = 5


def lost_status(error: grpc.aio.AioRpcError) -> bool:
    """grpc's client lost the status of a call: the server ended a client stream while
    the client was still writing, and the failed write's INTERNAL took the status's place.

    grpc-python's own race, not the server's: `_write` turns the failed send into
    "Internal error from Core" when it happens before the received status is
    recorded (measured here: about 1 in 300 refused client streams).
    """
    return (
        error.code() == Code.INTERNAL
        and error.details() == "Internal error from Core"
        and not error.trailing_metadata()
    )


async def call(
    channel: grpc.aio.Channel,
    case: Case,
    requests: Sequence[Message],
    metadata: tuple[tuple[str, str], ...],
) -> None:
    """Calls the case's method; returns on OK (a stream: its first message or its end),
    raises AioRpcError otherwise. A client stream whose status grpc's client lost is
    called again (only refused calls lose it, so nothing was written)."""
    client_streaming = METHODS[case.path].client_streaming
    for _ in range(LOST_STATUS_RETRIES):
        try:
            return await call_once(channel, case, requests, metadata)
        except grpc.aio.AioRpcError as error:
            if not (client_streaming and lost_status(error)):
                raise
    return await call_once(channel, case, requests, metadata)


async def call_once(
    channel: grpc.aio.Channel,
    case: Case,
    requests: Sequence[Message],
    metadata: tuple[tuple[str, str], ...],
) -> None:
    method = METHODS[case.path]
    response_class: Any = message_factory.GetMessageClass(method.output_type)
    options: dict[str, Any] = {
        "request_serializer": lambda message: message.SerializeToString(),
        "response_deserializer": response_class.FromString,
    }
    if method.client_streaming:
        assert not method.server_streaming
        await channel.stream_unary(case.path, **options)(
            iter(requests), metadata=metadata, timeout=TIMEOUT
        )
        return
    (request,) = requests
    if not method.server_streaming:
        await channel.unary_unary(case.path, **options)(request, metadata=metadata, timeout=TIMEOUT)
        return
    stream = channel.unary_stream(case.path, **options)(request, metadata=metadata, timeout=TIMEOUT)
    try:
        first = await stream.read()
        if first is grpc.aio.EOF:
            assert await stream.code() == Code.OK
    finally:
        stream.cancel()


# ---------------------------------------------------------------------------
# Tests


def test_every_method_has_a_row_and_a_rule() -> None:
    served = set(METHODS)
    assert served == set(RULES), "a method without a rule, or a rule without a method"
    assert {case.path for case in CASES} == served, "a method without a row in CASES"
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("credential", CREDENTIALS, ids=lambda c: c.id)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
async def test_matrix(
    channel: grpc.aio.Channel, db: asyncpg.Connection, case: Case, credential: Credential
) -> None:
    tag = f"authz-{uuid.uuid4().hex}"
    requests = case.requests(tag)
    want = expected(case, credential)
    if want == OK:
        await call(channel, case, requests, credential.metadata)
    else:
        failure = await rpc_error(call(channel, case, requests, credential.metadata))
        assert (failure.code, failure.reason) == want, failure.message
        if failure.code in (Code.UNAUTHENTICATED, Code.PERMISSION_DENIED):
            # A refusal names no workspace, neither the one asked for nor another.
            for workspace in (HOME, OTHER):
                assert workspace not in failure.message
                assert workspace not in failure.metadata.values()
    if case.written is not None:
        wrote = await case.written(db, tag)
        assert wrote == (1 if want == OK else 0), f"{tag} written {wrote} times"


async def test_a_second_batch_of_another_workspace_is_refused_after_the_first_went_in(
    channel: grpc.aio.Channel, db: asyncpg.Connection
) -> None:
    """Per message: the first (granted) batch commits, the second is refused before the
    servicer sees it, and nothing reaches the other workspace."""
    tag = f"authz-{uuid.uuid4().hex}"
    token = mint("memory", [HOME], subject="matrix-stream-check")
    stub = memory_sync_service_pb2_grpc.MemorySyncServiceStub(channel)

    async def upsert() -> None:
        batches = [memory_batch(HOME, tag), memory_batch(OTHER, tag), memory_batch(HOME, tag + "x")]
        for _ in range(LOST_STATUS_RETRIES):
            try:
                await stub.UpsertMemoryRecords(
                    iter(batches), metadata=bearer(token), timeout=TIMEOUT
                )
                return
            except grpc.aio.AioRpcError as error:
                if not lost_status(error):
                    raise
        raise AssertionError("the status was lost on every try")

    failure = await rpc_error(upsert())
    assert (failure.code, failure.reason) == permission_denied("WORKSPACE_NOT_GRANTED")
    rows = await db.fetch(
        "SELECT workspace_id::text AS workspace, id FROM raptorflow_data.memory_records "
        "WHERE id LIKE $1 ORDER BY id",
        tag + "%",
    )
    assert [(r["workspace"], r["id"]) for r in rows] == [(HOME, tag)]


async def test_health_and_reflection_need_no_token(channel: grpc.aio.Channel) -> None:
    for metadata in ((), BAD_CREDENTIALS[1].metadata, (("authorization", "garbage"),)):
        health = health_pb2_grpc.HealthStub(channel)
        checked = await health.Check(
            health_pb2.HealthCheckRequest(service=""), metadata=metadata, timeout=TIMEOUT
        )
        assert checked.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(
            health_pb2.HealthCheckRequest(service="readiness"), metadata=metadata, timeout=TIMEOUT
        )
        first = await watch.read()
        watch.cancel()
        assert isinstance(first, health_pb2.HealthCheckResponse)
        assert first.status == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            metadata=metadata,
            timeout=TIMEOUT,
        )
        listed = [response async for response in responses]
        assert len(listed) == 1
        names = {service.name for service in listed[0].list_services_response.service}
        served = {path.split("/")[1] for path in METHODS}
        assert served | {"grpc.health.v1.Health"} <= names
