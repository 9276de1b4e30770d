"""Who may call which method: one `Rule` per RPC, and the check of a request against it.

A rule names the roles that may call the method and, for methods that reach
workspace data, where the request names its workspaces. The caller needs one of
the roles and a grant of every workspace the request names; a scope left empty
where the contract says "every workspace" (a backup of all workspaces) needs the
token's ["*"]. Methods of `OPEN_SERVICES` (health, reflection) need no token;
a method with no rule here is refused to everyone, so a new RPC is closed until
someone writes its rule.

| Methods                                           | Roles               | Workspaces       |
|---------------------------------------------------|---------------------|------------------|
| WorkspaceService.DescribeTables                   | any role            | none (schema)    |
| WorkspaceService, other methods                   | agent, admin        | workspace_id     |
| MemorySyncService (Sync, Ack, Upsert, Delete)     | memory, admin       | workspace_id     |
| MemorySyncService.SearchMemoryRecords             | memory, agent, admin| workspace_id     |
| MaintenanceService.ExportBackup / RestoreBackup   | job, admin          | the backup scope |
| MaintenanceService.StartJob (file backup/restore) | job, admin          | the backup scope |
| MaintenanceService, other methods and jobs        | job, admin          | none             |
| MonitoringService.GetStatus                       | job, admin          | none             |
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from raptorflow.data.server.auth.principal import Principal, Role
from raptorflow.data.server.errors import Code, ServiceError, invalid_argument
from raptorflow.data.v1 import (
    maintenance_service_pb2,
    memory_sync_service_pb2,
    monitoring_service_pb2,
    workspace_service_pb2,
)

OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
"""Services every caller may use without a token (Kubernetes probes, grpcurl)."""

ALL = None
"""A scope's workspace meaning "every workspace" (an empty BackupScope.workspace_id)."""

Scope = Callable[[Any], Iterator[tuple[str, str | None]]]
"""The (field path, workspace text) pairs a request (or one message of a request stream)
names; ALL for an all-workspace scope, "" for a missing workspace."""


@dataclass(frozen=True)
class Rule:
    """Who may call one method."""

    roles: frozenset[Role]
    """The caller needs at least one of these."""
    scope: Scope | None = None
    """Where a request names its workspaces; None: the method reaches no workspace's rows."""
    message_path: str = ""
    """For request streams: how the servicer names the n-th message in field paths
    ("batches" gives "batches[n].workspace_id"), so both report a field alike."""


def _workspace_id(request: Any) -> Iterator[tuple[str, str | None]]:
    yield "workspace_id", request.workspace_id


def _batch(request: workspace_service_pb2.ExecuteBatchRequest) -> Iterator[tuple[str, str | None]]:
    yield "workspace_id", request.workspace_id
    for i, operation in enumerate(request.operations):
        kind = operation.WhichOneof("operation")
        if kind is not None:
            inner = getattr(operation, kind).workspace_id
            if inner:  # empty inherits the batch's workspace
                yield f"operations[{i}].{kind}.workspace_id", inner


def _export(
    request: maintenance_service_pb2.ExportBackupRequest,
) -> Iterator[tuple[str, str | None]]:
    yield "scope.workspace_id", request.scope.workspace_id or ALL


def _restore(
    message: maintenance_service_pb2.RestoreBackupRequest,
) -> Iterator[tuple[str, str | None]]:
    # The header (the first message) says whose rows the backup holds, and so
    # where the restore writes; chunks and the manifest name no workspace.
    if message.WhichOneof("part") == "header":
        yield "header.scope.workspace_id", message.header.scope.workspace_id or ALL


def _start_job(
    request: maintenance_service_pb2.StartJobRequest,
) -> Iterator[tuple[str, str | None]]:
    kind = request.spec.WhichOneof("kind")
    if kind == "backup_to_file":
        scope = request.spec.backup_to_file.scope
        yield "spec.backup_to_file.scope.workspace_id", scope.workspace_id or ALL
    elif kind == "restore_from_file":
        # Whose rows the file holds is known only once the job reads it.
        yield "spec.restore_from_file", ALL


_ANY_ROLE = frozenset(Role)
_AGENTS = frozenset({Role.AGENT, Role.ADMIN})
_MEMORY = frozenset({Role.MEMORY, Role.ADMIN})
_SEARCH = frozenset({Role.MEMORY, Role.AGENT, Role.ADMIN})
_OPERATORS = frozenset({Role.JOB, Role.ADMIN})


def _service(descriptor: ServiceDescriptor, rules: Mapping[str, Rule]) -> dict[str, Rule]:
    names = {method.name for method in descriptor.methods}
    if set(rules) != names:
        raise AssertionError(f"{descriptor.full_name}: rules for {sorted(rules)}, not {names}")
    return {f"/{descriptor.full_name}/{name}": rule for name, rule in rules.items()}


RULES: Mapping[str, Rule] = {
    **_service(
        workspace_service_pb2.DESCRIPTOR.services_by_name["WorkspaceService"],
        {
            "DescribeTables": Rule(_ANY_ROLE),
            "Select": Rule(_AGENTS, _workspace_id),
            "Count": Rule(_AGENTS, _workspace_id),
            "Insert": Rule(_AGENTS, _workspace_id),
            "Upsert": Rule(_AGENTS, _workspace_id),
            "Update": Rule(_AGENTS, _workspace_id),
            "Delete": Rule(_AGENTS, _workspace_id),
            "ExecuteBatch": Rule(_AGENTS, _batch),
        },
    ),
    **_service(
        memory_sync_service_pb2.DESCRIPTOR.services_by_name["MemorySyncService"],
        {
            "Sync": Rule(_MEMORY, _workspace_id),
            "AcknowledgeSync": Rule(_MEMORY, _workspace_id),
            "UpsertMemoryRecords": Rule(_MEMORY, _workspace_id, message_path="batches"),
            "DeleteMemoryRecords": Rule(_MEMORY, _workspace_id),
            "SearchMemoryRecords": Rule(_SEARCH, _workspace_id),
        },
    ),
    **_service(
        maintenance_service_pb2.DESCRIPTOR.services_by_name["MaintenanceService"],
        {
            "ExportBackup": Rule(_OPERATORS, _export),
            "RestoreBackup": Rule(_OPERATORS, _restore),
            "StartJob": Rule(_OPERATORS, _start_job),
            "GetJob": Rule(_OPERATORS),
            "ListJobs": Rule(_OPERATORS),
            "WatchJob": Rule(_OPERATORS),
            "CancelJob": Rule(_OPERATORS),
            "ListSchedules": Rule(_OPERATORS),
        },
    ),
    **_service(
        monitoring_service_pb2.DESCRIPTOR.services_by_name["MonitoringService"],
        {"GetStatus": Rule(_OPERATORS)},
    ),
}
"""The rule of every served method, by full method name ("/package.Service/Method")."""


def is_open(method: str) -> bool:
    """Whether `method` ("/package.Service/Method") is served without a token."""
    return method.split("/")[1] in OPEN_SERVICES if method.count("/") == 2 else False


def permission_denied(reason: str, message: str) -> ServiceError:
    return ServiceError(Code.PERMISSION_DENIED, reason, message)


def check_role(principal: Principal, rule: Rule, method: str) -> None:
    """PERMISSION_DENIED unless the principal has one of the rule's roles."""
    if not principal.has_role(rule.roles):
        raise permission_denied(
            "ROLE_NOT_ALLOWED",
            f"{method.rsplit('/', 1)[-1]} needs the role "
            + " or ".join(sorted(role.value for role in rule.roles)),
        )


def check_workspaces(principal: Principal, scope: Scope, message: Any, prefix: str = "") -> None:
    """PERMISSION_DENIED unless the token grants every workspace the message names;
    INVALID_ARGUMENT for a workspace that is not a UUID. `prefix` goes before field paths."""
    for field_path, text in scope(message):
        path = f"{prefix}.{field_path}" if prefix else field_path
        if text is ALL:
            if not principal.all_workspaces:
                raise permission_denied(
                    "ALL_WORKSPACES_NOT_GRANTED",
                    f"{path}: an operation on every workspace needs a token for all workspaces",
                )
            continue
        if not text:
            # Never "every workspace": the servicer would refuse it too.
            raise invalid_argument(path, "a workspace UUID is required", reason="INVALID_UUID")
        try:
            workspace = uuid.UUID(text)
        except ValueError:
            raise invalid_argument(
                path, f"not a workspace UUID: {text[:64]!r}", reason="INVALID_UUID"
            ) from None
        if not principal.grants(workspace):
            raise permission_denied(
                "WORKSPACE_NOT_GRANTED",
                f"{path}: the bearer token does not grant this workspace",
            )
