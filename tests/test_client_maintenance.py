"""Tests of `client.maintenance` and `client.monitoring`: scripted servicers, then the real server.

The first part runs against in-process MaintenanceService and MonitoringService
servicers (tests/fake_grpc.py) on a real grpc.aio server, so streams,
cancellation, deadlines, retries and status details go over the wire. The
second part runs against the real server and PostgreSQL: backups streamed and
written to local files restore value for value, jobs run, are watched and
waited for, and the status reflects the pool.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from conftest import start_server
from fake_grpc import Failure, Received, error_status, fail, received, serve
from job_helpers import analyze, create_lock_table, locked
from raptorflow.data import client as rf
from raptorflow.data.client import _maintenance
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.v1 import (
    job_pb2,
    maintenance_service_pb2,
    maintenance_service_pb2_grpc,
    monitoring_service_pb2,
    monitoring_service_pb2_grpc,
)
from tokens import ADMIN_TOKEN, mint

pb = maintenance_service_pb2
WS = "0a700930-722d-4b2c-b5c1-1b2d7cdb954e"
JOB_ID = "5f0c6b1e-9d7a-4c1e-8f61-0d3b1c2a4e55"
MAINTENANCE = pb.DESCRIPTOR.services_by_name["MaintenanceService"]
MONITORING = monitoring_service_pb2.DESCRIPTOR.services_by_name["MonitoringService"]

# --------------------------------------------------------------------------
# Backup streams built by hand


def _backup(*chunks: bytes, table: str = "notes", rows: int = 3) -> list[rf.BackupPart]:
    """A well-formed backup stream of one table: header, chunks, manifest."""
    parts = [
        pb.ExportBackupResponse(
            header=pb.BackupHeader(
                format_version=1,
                scope=job_pb2.BackupScope(workspace_id=WS, tables=[table]),
                tables=[pb.BackupTable(name=table, columns=["id"], column_types=["bigint"])],
                server_version_num=160004,
            )
        )
    ]
    digest = hashlib.sha256()
    for sequence, data in enumerate(chunks):
        parts.append(
            pb.ExportBackupResponse(
                chunk=pb.BackupChunk(
                    table=table,
                    sequence=sequence,
                    data=data,
                    sha256=hashlib.sha256(data).digest(),
                )
            )
        )
        digest.update(data)
    parts.append(
        pb.ExportBackupResponse(
            manifest=pb.BackupManifest(
                tables=[pb.BackupTableCount(table=table, row_count=rows)],
                chunk_count=len(chunks),
                data_bytes=sum(len(data) for data in chunks),
                sha256=digest.hexdigest(),
            )
        )
    )
    return parts


def _file_parts(path: Path) -> list[rf.BackupPart]:
    """Parses a backup file by the server's format, independently of the client."""
    data = path.read_bytes()
    assert data.startswith(rf.BACKUP_FILE_MAGIC)
    offset, parts = len(rf.BACKUP_FILE_MAGIC), []
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        parts.append(pb.ExportBackupResponse.FromString(data[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    assert offset == len(data)
    return parts


def _job(state: int, **fields: Any) -> job_pb2.Job:
    return job_pb2.Job(job_id=JOB_ID, state=state, **fields)  # type: ignore[arg-type]


RUNNING = job_pb2.JOB_STATE_RUNNING
SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED
FAILED = job_pb2.JOB_STATE_FAILED

# --------------------------------------------------------------------------
# The scripted servicers


@dataclass
class _Stream:
    """What one server-streaming call sends: messages, then a failure or a hang."""

    messages: list[Any] = field(default_factory=list)
    failure: Failure | None = None
    hang: bool = False


class _FakeMaintenance(maintenance_service_pb2_grpc.MaintenanceServiceServicer):
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.failures: dict[str, list[Failure]] = {}
        self.streams: dict[str, list[_Stream]] = {"ExportBackup": [], "WatchJob": []}
        self.stream_cancelled = asyncio.Event()
        self.restored: list[pb.RestoreBackupRequest] = []
        self.restore_refusal: tuple[int, Failure] | None = None
        self.restore_finished = asyncio.Event()
        self.restore_committed = False
        self.pages: dict[str, pb.ListJobsResponse] = {}

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    async def _unary(self, method: str, request: Any, context: Any) -> None:
        self.received.append(received(method, request, context))
        failures = self.failures.get(method)
        if failures:
            await fail(context, failures.pop(0))

    async def _stream(self, method: str, request: Any, context: Any) -> AsyncIterator[Any]:
        await self._unary(method, request, context)
        script = self.streams[method].pop(0)
        try:
            for message in script.messages:
                yield message
            if script.failure is not None:
                await fail(context, script.failure)
            if script.hang:
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.stream_cancelled.set()
            raise

    async def ExportBackup(self, request: Any, context: Any) -> AsyncIterator[Any]:
        async for message in self._stream("ExportBackup", request, context):
            yield message

    async def WatchJob(self, request: Any, context: Any) -> AsyncIterator[Any]:
        async for message in self._stream("WatchJob", request, context):
            yield pb.WatchJobResponse(job=message)

    async def RestoreBackup(self, request_iterator: Any, context: Any) -> Any:
        self.received.append(received("RestoreBackup", None, context))
        failures = self.failures.get("RestoreBackup")
        if failures:
            await fail(context, failures.pop(0))
        try:
            async for request in request_iterator:
                self.restored.append(request)
                if self.restore_refusal and len(self.restored) == self.restore_refusal[0]:
                    await fail(context, self.restore_refusal[1])
            if not self.restored or not self.restored[-1].HasField("manifest"):
                # The real server's rule: no manifest, nothing written.
                await fail(context, grpc.StatusCode.INVALID_ARGUMENT)
            self.restore_committed = True
            manifest = self.restored[-1].manifest
            return pb.RestoreBackupResponse(tables=manifest.tables, data_bytes=manifest.data_bytes)
        finally:
            # Cancelled, failed or done: the handler has finished.
            self.restore_finished.set()

    async def StartJob(self, request: Any, context: Any) -> Any:
        await self._unary("StartJob", request, context)
        return pb.StartJobResponse(job=_job(job_pb2.JOB_STATE_QUEUED, spec=request.spec))

    async def GetJob(self, request: Any, context: Any) -> Any:
        await self._unary("GetJob", request, context)
        return pb.GetJobResponse(job=_job(RUNNING))

    async def ListJobs(self, request: Any, context: Any) -> Any:
        await self._unary("ListJobs", request, context)
        return self.pages[request.page_token]

    async def CancelJob(self, request: Any, context: Any) -> Any:
        await self._unary("CancelJob", request, context)
        return pb.CancelJobResponse(job=_job(RUNNING, cancel_requested=True))

    async def ListSchedules(self, request: Any, context: Any) -> Any:
        await self._unary("ListSchedules", request, context)
        return pb.ListSchedulesResponse(
            schedules=[job_pb2.Schedule(name="nightly", cron="0 3 * * *", success_rate=1.0)]
        )


class _FakeMonitoring(monitoring_service_pb2_grpc.MonitoringServiceServicer):
    def __init__(self) -> None:
        self.calls = 0

    async def GetStatus(self, request: Any, context: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            await fail(context, grpc.StatusCode.UNAVAILABLE)
        return monitoring_service_pb2.GetStatusResponse(
            replica="r1",
            pool=monitoring_service_pb2.PoolStatus(size=2, in_use=1, max_size=4, utilization=0.25),
        )


@dataclass
class _Fake:
    service: _FakeMaintenance
    monitoring: _FakeMonitoring
    target: str

    def client(self, **overrides: Any) -> rf.DataClient:
        defaults: dict[str, Any] = {"timeout": 5.0, "metadata": {"authorization": "Bearer cfg"}}
        return rf.DataClient(rf.ClientConfig(self.target, **(defaults | overrides)))

    def calls(self, method: str) -> list[Received]:
        return [call for call in self.service.received if call.method == method]


@pytest.fixture(scope="module")
async def fake_server() -> AsyncIterator[_Fake]:
    service, monitoring = _FakeMaintenance(), _FakeMonitoring()

    def register(server: grpc.aio.Server) -> None:
        maintenance_service_pb2_grpc.add_MaintenanceServiceServicer_to_server(service, server)
        monitoring_service_pb2_grpc.add_MonitoringServiceServicer_to_server(monitoring, server)

    async with serve(register) as target:
        yield _Fake(service, monitoring, target)


@pytest.fixture
def fake(fake_server: _Fake) -> _Fake:
    fake_server.service.reset()
    return fake_server


# --------------------------------------------------------------------------
# Policies


def test_service_config_policies_of_maintenance_and_monitoring() -> None:
    config = json.loads(
        dict(rf.ClientConfig("localhost:1").channel_arguments())["grpc.service_config"]
    )
    retried: dict[str, set[str]] = {}
    for method_config in config["methodConfig"]:
        for name in method_config["name"]:
            if name["service"] in (MAINTENANCE.full_name, MONITORING.full_name):
                retried[name["method"]] = set(method_config["retryPolicy"]["retryableStatusCodes"])
    reads = {"UNAVAILABLE", "ABORTED"}
    assert retried == {
        "ExportBackup": reads,
        "GetJob": reads,
        "ListJobs": reads,
        "WatchJob": reads,
        "CancelJob": reads,
        "ListSchedules": reads,
        "GetStatus": reads,
        # Not idempotent: only ABORTED, after which the server rolled back.
        "StartJob": {"ABORTED"},
    }
    # RestoreBackup is deliberately absent: its request stream cannot be replayed.
    every = {m.name for m in MAINTENANCE.methods} | {m.name for m in MONITORING.methods}
    assert every - set(retried) == {"RestoreBackup"}


def test_job_state_names_the_protos_states() -> None:
    assert [state.value for state in rf.JobState] == [1, 2, 3, 4, 5]
    assert [state.is_final for state in rf.JobState] == [False, False, True, True, True]
    assert rf.job_state(_job(FAILED)) is rf.JobState.FAILED
    with pytest.raises(ValueError, match="upgrade"):
        rf.job_state(_job(99))


def test_job_failed_carries_the_job_and_says_why() -> None:
    job = _job(FAILED, error=job_pb2.JobError(code="UNAVAILABLE", reason="LEASE_EXPIRED"))
    job.error.message = "replica r2 stopped renewing its lease"
    error = rf.JobFailed(job)
    assert error.job is job
    assert (error.state, error.code, error.reason) == (
        rf.JobState.FAILED,
        "UNAVAILABLE",
        "LEASE_EXPIRED",
    )
    assert str(error) == (
        f"job {JOB_ID} FAILED: UNAVAILABLE: replica r2 stopped renewing its lease [LEASE_EXPIRED]"
    )
    assert not isinstance(error, rf.DataError)


# --------------------------------------------------------------------------
# Backups streamed


async def test_export_streams_the_parts_with_scope_defaults_and_no_deadline(fake: _Fake) -> None:
    parts = _backup(b"a" * 10, b"b" * 5)
    fake.service.streams["ExportBackup"].append(_Stream(parts))
    async with fake.client() as client:
        got = [
            part
            async for part in client.maintenance.export_backup(
                workspace_id=uuid.UUID(WS), tables=["notes"], chunk_bytes=4096
            )
        ]
    assert got == parts
    (call,) = fake.calls("ExportBackup")
    assert call.request == pb.ExportBackupRequest(
        scope=job_pb2.BackupScope(workspace_id=WS, tables=["notes"]), chunk_bytes=4096
    )
    assert call.metadata["authorization"] == "Bearer cfg"
    # A backup takes as long as it takes: no deadline unless asked for.
    assert call.time_remaining is None


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"chunk_bytes": 100}, ValueError),
        ({"chunk_bytes": 8 * 1024 * 1024}, ValueError),
        ({"tables": "notes"}, TypeError),
        ({"tables": ["a", "a"]}, ValueError),
        ({"workspace_id": "not-a-uuid"}, ValueError),
    ],
)
async def test_export_arguments_fail_at_the_call(
    fake: _Fake, arguments: dict[str, Any], error: type[Exception]
) -> None:
    async with fake.client() as client:
        with pytest.raises(error):
            client.maintenance.export_backup(**arguments)
    assert fake.service.received == []


async def test_export_error_arrives_after_the_parts_before_it(fake: _Fake) -> None:
    header = _backup()[0]
    fake.service.streams["ExportBackup"].append(
        _Stream(
            [header],
            error_status(grpc.StatusCode.INVALID_ARGUMENT, "no table 'x'", "UNKNOWN_TABLE"),
        )
    )
    got: list[rf.BackupPart] = []

    async def read(parts: AsyncIterator[rf.BackupPart]) -> None:
        async for part in parts:
            got.append(part)

    async with fake.client() as client:
        with pytest.raises(rf.InvalidArgument) as caught:
            await read(client.maintenance.export_backup(tables=["x"]))
    assert got == [header]
    assert caught.value.reason == "UNKNOWN_TABLE"


async def test_leaving_an_export_early_cancels_the_call(fake: _Fake) -> None:
    fake.service.streams["ExportBackup"].append(_Stream(_backup(b"x")[:2], hang=True))
    async with fake.client() as client:
        parts = client.maintenance.export_backup()
        async for _ in parts:
            break
        await parts.aclose()
        await asyncio.wait_for(fake.service.stream_cancelled.wait(), 5)


async def test_restore_sends_the_parts_in_order_replace_existing_first_only(fake: _Fake) -> None:
    parts = _backup(b"one", b"two")
    async with fake.client() as client:
        response = await client.maintenance.restore_backup(parts, replace_existing=True)
    assert [request.replace_existing for request in fake.service.restored] == [
        True,
        False,
        False,
        False,
    ]
    assert [request.WhichOneof("part") for request in fake.service.restored] == [
        "header",
        "chunk",
        "chunk",
        "manifest",
    ]
    assert fake.service.restored[1].chunk == parts[1].chunk
    assert response.data_bytes == 6
    assert fake.calls("RestoreBackup")[0].time_remaining is None


async def test_an_export_pipes_into_a_restore(fake: _Fake) -> None:
    parts = _backup(b"x" * 100)
    fake.service.streams["ExportBackup"].append(_Stream(parts))
    async with fake.client() as client:
        await client.maintenance.restore_backup(client.maintenance.export_backup())
    assert [request.WhichOneof("part") for request in fake.service.restored] == [
        "header",
        "chunk",
        "manifest",
    ]


async def test_a_refused_part_raises_the_servers_status(fake: _Fake) -> None:
    fake.service.restore_refusal = (
        2,
        error_status(grpc.StatusCode.DATA_LOSS, "chunk 0 is damaged", "CHECKSUM_MISMATCH"),
    )
    async with fake.client() as client:
        with pytest.raises(rf.DataLoss) as caught:
            await client.maintenance.restore_backup(_backup(b"a", b"b", b"c"))
    assert caught.value.reason == "CHECKSUM_MISMATCH"


async def test_an_error_in_the_parts_cancels_the_restore(fake: _Fake) -> None:
    parts = _backup(b"a", b"b")

    async def broken() -> AsyncIterator[rf.BackupPart]:
        yield parts[0]
        yield parts[1]
        raise RuntimeError("disk went away")

    async with fake.client() as client:
        with pytest.raises(RuntimeError, match="disk went away"):
            await client.maintenance.restore_backup(broken())
        await asyncio.wait_for(fake.service.restore_finished.wait(), 5)
    assert not fake.service.restore_committed
    assert not any(request.HasField("manifest") for request in fake.service.restored)


class _EndedCall:
    """Stands in for a grpc.aio call that ended with the server's status."""

    def __init__(self, status: Any) -> None:
        self.status = status

    def add_done_callback(self, callback: Any) -> None:
        callback(self)

    async def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.FAILED_PRECONDITION

    async def details(self) -> str:
        return self.status.message

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata(("grpc-status-details-bin", self.status.SerializeToString()))


def test_a_write_failure_does_not_mask_the_servers_status() -> None:
    # grpc/grpc#36066: a write racing with the server's status can replace it
    # with a bare INTERNAL; the status seen first is reported instead.
    status = error_status(grpc.StatusCode.FAILED_PRECONDITION, "has rows", "WORKSPACE_NOT_EMPTY")
    kept = _maintenance._FirstStatus(_EndedCall(status))  # type: ignore[arg-type]
    masked = grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        "Internal error from Core",
        'Failed "execute_batch"',
    )
    error = rf.from_rpc_error(kept.unmasked(masked))
    assert isinstance(error, rf.FailedPrecondition)
    assert error.reason == "WORKSPACE_NOT_EMPTY"
    other = grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), "a real bug", ""
    )
    assert kept.unmasked(other) is other


async def test_a_restore_is_never_retried(fake: _Fake) -> None:
    fake.service.failures["RestoreBackup"] = [grpc.StatusCode.UNAVAILABLE]
    async with fake.client() as client:
        with pytest.raises(rf.Unavailable):
            await client.maintenance.restore_backup(_backup(b"a"))
    assert len(fake.calls("RestoreBackup")) == 1


# --------------------------------------------------------------------------
# Local backup files


async def test_backup_to_path_writes_the_servers_file_format(fake: _Fake, tmp_path: Path) -> None:
    parts = _backup(b"\x00" * 5000, b"tail", rows=7)
    fake.service.streams["ExportBackup"].append(_Stream(parts))
    path = tmp_path / "ws.rfbackup"
    async with fake.client() as client:
        saved = await client.maintenance.backup_to_path(path, workspace_id=WS)
        await client.maintenance.restore_from_path(path, replace_existing=True)
    assert _file_parts(path) == parts
    data = path.read_bytes()
    assert saved == rf.LocalBackup(
        path=path,
        file_bytes=len(data),
        data_bytes=5004,
        sha256=hashlib.sha256(data).hexdigest(),
        data_sha256=parts[-1].manifest.sha256,
        row_counts={"notes": 7},
        chunk_count=2,
    )
    assert [request.WhichOneof("part") for request in fake.service.restored] == [
        part.WhichOneof("part") for part in parts
    ]
    assert fake.service.restored[0].replace_existing


async def test_backup_to_path_never_overwrites(fake: _Fake, tmp_path: Path) -> None:
    path = tmp_path / "taken.rfbackup"
    path.write_bytes(b"earlier backup")
    async with fake.client() as client:
        with pytest.raises(FileExistsError):
            await client.maintenance.backup_to_path(path)
    assert path.read_bytes() == b"earlier backup"
    assert fake.service.received == []


def _damaged_chunk() -> list[rf.BackupPart]:
    parts = _backup(b"good", b"evil")
    parts[2].chunk.data = b"EVIL"
    return parts


def _no_manifest() -> list[rf.BackupPart]:
    return _backup(b"a")[:-1]


def _wrong_manifest() -> list[rf.BackupPart]:
    parts = _backup(b"a", b"b")
    parts[-1].manifest.chunk_count = 3
    return parts


@pytest.mark.parametrize(
    ("parts", "failure", "error", "reason"),
    [
        (_damaged_chunk(), None, rf.DataLoss, "CHECKSUM_MISMATCH"),
        (_no_manifest(), None, rf.DataLoss, "TRUNCATED"),
        (_wrong_manifest(), None, rf.DataLoss, "CHECKSUM_MISMATCH"),
        (_backup(b"a")[:2], grpc.StatusCode.DEADLINE_EXCEEDED, rf.DeadlineExceeded, ""),
    ],
    ids=["damaged-chunk", "no-manifest", "wrong-manifest", "call-failed"],
)
async def test_a_bad_backup_leaves_no_file(
    fake: _Fake,
    tmp_path: Path,
    parts: list[rf.BackupPart],
    failure: Failure | None,
    error: type[rf.DataError],
    reason: str,
) -> None:
    fake.service.streams["ExportBackup"].append(_Stream(parts, failure))
    path = tmp_path / "bad.rfbackup"
    async with fake.client() as client:
        with pytest.raises(error) as caught:
            await client.maintenance.backup_to_path(path)
    assert caught.value.reason == reason
    assert not path.exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:-3],  # truncated inside the manifest
        lambda data: b"NOT A BACKUP" + data,
        lambda data: data[:30] + b"\xff\xff\xff\xff" + data[34:],  # a length of 4 GiB
    ],
    ids=["truncated", "no-magic", "huge-length"],
)
async def test_a_damaged_file_is_refused_and_nothing_restored(
    fake: _Fake, tmp_path: Path, damage: Any
) -> None:
    fake.service.streams["ExportBackup"].append(_Stream(_backup(b"a" * 20, b"b" * 20)))
    good, bad = tmp_path / "good.rfbackup", tmp_path / "bad.rfbackup"
    async with fake.client() as client:
        await client.maintenance.backup_to_path(good)
        bad.write_bytes(damage(good.read_bytes()))
        with pytest.raises(rf.BackupFileError):
            await client.maintenance.restore_from_path(bad)
    # No manifest reached the server: it was cancelled before it could load anything.
    assert not any(request.HasField("manifest") for request in fake.service.restored)


# --------------------------------------------------------------------------
# Jobs


async def test_job_shortcuts_send_their_specs(fake: _Fake) -> None:
    async with fake.client() as client:
        m = client.maintenance
        jobs = [
            await m.vacuum(),
            await m.vacuum(["a", "b"], analyze=False),
            await m.analyze(["a"]),
            await m.reindex(),
            await m.cleanup_retention(["events"]),
            await m.backup_to_file("nightly/ws.rfbackup", workspace_id=WS, tables=["a"]),
            await m.restore_from_file("nightly/ws.rfbackup", replace_existing=True),
        ]
    specs = [call.request.spec for call in fake.calls("StartJob")]
    assert specs == [
        job_pb2.JobSpec(vacuum=job_pb2.VacuumJob(analyze=True)),
        job_pb2.JobSpec(vacuum=job_pb2.VacuumJob(tables=["a", "b"], analyze=False)),
        job_pb2.JobSpec(analyze=job_pb2.AnalyzeJob(tables=["a"])),
        job_pb2.JobSpec(reindex=job_pb2.ReindexJob()),
        job_pb2.JobSpec(retention_cleanup=job_pb2.RetentionCleanupJob(tables=["events"])),
        job_pb2.JobSpec(
            backup_to_file=job_pb2.BackupToFileJob(
                scope=job_pb2.BackupScope(workspace_id=WS, tables=["a"]),
                path="nightly/ws.rfbackup",
            )
        ),
        job_pb2.JobSpec(
            restore_from_file=job_pb2.RestoreFromFileJob(
                path="nightly/ws.rfbackup", replace_existing=True
            )
        ),
    ]
    assert [job.spec for job in jobs] == specs
    assert all(call.time_remaining is not None for call in fake.calls("StartJob"))


async def test_job_arguments_fail_at_the_call(fake: _Fake, tmp_path: Path) -> None:
    async with fake.client() as client:
        m = client.maintenance
        with pytest.raises(ValueError, match="one kind"):
            await m.start_job(job_pb2.JobSpec())
        with pytest.raises(TypeError):
            await m.backup_to_file(tmp_path / "x")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await m.vacuum("events")
        with pytest.raises(ValueError, match="not a UUID"):
            await m.get_job("job-1")
        with pytest.raises(ValueError, match="not a UUID"):
            m.watch_job("job-1")
        with pytest.raises(ValueError, match="page_size"):
            m.list_jobs(page_size=5000)
    assert fake.service.received == []


async def test_start_job_retries_aborted_but_not_unavailable(fake: _Fake) -> None:
    fake.service.failures["StartJob"] = [
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNAVAILABLE,
    ]
    async with fake.client() as client:
        # ABORTED was retried; UNAVAILABLE is not, as the job may have started.
        with pytest.raises(rf.Unavailable):
            await client.maintenance.analyze()
    assert len(fake.calls("StartJob")) == 2


async def test_reads_retry_unavailable(fake: _Fake) -> None:
    fake.service.failures["GetJob"] = [grpc.StatusCode.UNAVAILABLE]
    fake.service.failures["CancelJob"] = [grpc.StatusCode.UNAVAILABLE]
    async with fake.client() as client:
        job = await client.maintenance.get_job(uuid.UUID(JOB_ID))
        cancelled = await client.maintenance.cancel_job(JOB_ID)
        (schedule,) = await client.maintenance.list_schedules()
        status = await client.monitoring.get_status()
    assert job.job_id == JOB_ID
    assert cancelled.cancel_requested
    assert schedule.name == "nightly"
    assert (status.replica, status.pool.in_use) == ("r1", 1)
    assert len(fake.calls("GetJob")) == len(fake.calls("CancelJob")) == 2


async def test_list_jobs_reads_every_page_with_its_filters(fake: _Fake) -> None:
    fake.service.pages = {
        "": pb.ListJobsResponse(jobs=[_job(FAILED), _job(FAILED)], next_page_token="p2"),
        "p2": pb.ListJobsResponse(jobs=[_job(FAILED)]),
    }
    async with fake.client() as client:
        jobs = [
            job
            async for job in client.maintenance.list_jobs(
                states=[rf.JobState.FAILED, job_pb2.JOB_STATE_CANCELLED],
                schedule="nightly",
                page_size=2,
            )
        ]
    assert len(jobs) == 3
    requests = [call.request for call in fake.calls("ListJobs")]
    assert [request.page_token for request in requests] == ["", "p2"]
    for request in requests:
        assert list(request.states) == [FAILED, job_pb2.JOB_STATE_CANCELLED]
        assert (request.schedule, request.page_size) == ("nightly", 2)


async def test_watch_streams_the_job_until_it_ends(fake: _Fake) -> None:
    progress = job_pb2.JobProgress(phase="vacuum public.notes", done=1, total=2)
    states = [_job(RUNNING), _job(RUNNING, progress=progress), _job(SUCCEEDED)]
    fake.service.streams["WatchJob"].append(_Stream(states))
    async with fake.client() as client:
        seen = [job async for job in client.maintenance.watch_job(JOB_ID)]
    assert seen == states
    assert fake.calls("WatchJob")[0].time_remaining is None


async def test_wait_job_returns_the_final_job(fake: _Fake) -> None:
    result = job_pb2.JobResult(tables=[job_pb2.TableReport(table="notes", action="ANALYZE")])
    fake.service.streams["WatchJob"].append(
        _Stream([_job(RUNNING), _job(SUCCEEDED, result=result)])
    )
    async with fake.client() as client:
        job = await client.maintenance.wait_job(JOB_ID, timeout=5)
    assert job.result == result


async def test_wait_job_raises_job_failed_unless_told_not_to(fake: _Fake) -> None:
    failed = _job(FAILED, error=job_pb2.JobError(code="FAILED_PRECONDITION", message="no"))
    fake.service.streams["WatchJob"] += [_Stream([failed]), _Stream([failed])]
    async with fake.client() as client:
        with pytest.raises(rf.JobFailed) as caught:
            await client.maintenance.wait_job(JOB_ID)
        assert caught.value.job == failed
        assert caught.value.code == "FAILED_PRECONDITION"
        assert await client.maintenance.wait_job(JOB_ID, check=False) == failed


async def test_wait_job_watches_again_when_the_stream_breaks_off(fake: _Fake) -> None:
    fake.service.streams["WatchJob"] += [
        # A replica shutting down: its stream ends with UNAVAILABLE after a message,
        # which gRPC may not retry (the call is committed) but the job goes on.
        _Stream([_job(RUNNING)], grpc.StatusCode.UNAVAILABLE),
        _Stream([_job(RUNNING)]),  # ended without a final state
        _Stream([_job(SUCCEEDED)]),
    ]
    async with fake.client() as client:
        job = await client.maintenance.wait_job(JOB_ID, timeout=10)
    assert job.state == SUCCEEDED
    assert len(fake.calls("WatchJob")) == 3


async def test_wait_job_gives_up_at_its_timeout(fake: _Fake) -> None:
    fake.service.streams["WatchJob"].append(_Stream([_job(RUNNING)], hang=True))
    async with fake.client() as client:
        with pytest.raises(rf.DeadlineExceeded):
            await client.maintenance.wait_job(JOB_ID, timeout=0.3)
    assert 0 < (fake.calls("WatchJob")[0].time_remaining or 0) <= 1.0


TOKEN_EXPIRED = error_status(
    grpc.StatusCode.UNAUTHENTICATED,
    "the bearer token expired while the stream was open",
    "TOKEN_EXPIRED",
)


class _Tokens:
    """A token function, as `ClientConfig.token` takes it: a new token at each call."""

    def __init__(self) -> None:
        self.handed_out = 0

    def __call__(self) -> str:
        self.handed_out += 1
        return f"token-{self.handed_out}"


async def test_wait_job_watches_again_with_a_fresh_token_when_one_expires(fake: _Fake) -> None:
    # The server ends a watch UNAUTHENTICATED (TOKEN_EXPIRED) when its token expires;
    # a job longer than one token's life used to make wait_job raise while it ran on.
    fake.service.streams["WatchJob"] += [
        _Stream([_job(RUNNING)], TOKEN_EXPIRED),
        _Stream([_job(RUNNING)], TOKEN_EXPIRED),
        _Stream([_job(SUCCEEDED)]),
    ]
    async with fake.client(token=_Tokens(), metadata=()) as client:
        job = await client.maintenance.wait_job(JOB_ID, timeout=10)
    assert job.state == SUCCEEDED
    sent = [call.metadata["authorization"] for call in fake.calls("WatchJob")]
    assert sent == ["Bearer token-1", "Bearer token-2", "Bearer token-3"]


@pytest.mark.parametrize(
    ("token", "metadata"),
    [
        # A fixed token: watching again would only be refused.
        (ADMIN_TOKEN, ()),
        # A token function, but the caller's own header goes out instead of its tokens.
        (_Tokens(), {"authorization": "Bearer cfg"}),
    ],
)
async def test_wait_job_raises_token_expired_without_a_token_function(
    fake: _Fake, token: Any, metadata: Any
) -> None:
    fake.service.streams["WatchJob"].append(_Stream([_job(RUNNING)], TOKEN_EXPIRED))
    async with fake.client(token=token, metadata=metadata) as client:
        with pytest.raises(rf.Unauthenticated) as caught:
            await client.maintenance.wait_job(JOB_ID, timeout=10)
    assert caught.value.reason == "TOKEN_EXPIRED"
    assert len(fake.calls("WatchJob")) == 1


async def test_wait_job_raises_when_a_fresh_token_is_refused_at_once(fake: _Fake) -> None:
    # A token function handing out tokens that are expired already: no watch gets a
    # message, and waiting on would be a loop of refusals.
    fake.service.streams["WatchJob"] += [
        _Stream([_job(RUNNING)], TOKEN_EXPIRED),
        _Stream([], TOKEN_EXPIRED),
    ]
    async with fake.client(token=_Tokens(), metadata=()) as client:
        with pytest.raises(rf.Unauthenticated):
            await client.maintenance.wait_job(JOB_ID, timeout=10)
    assert len(fake.calls("WatchJob")) == 2


async def test_wait_job_refuses_a_timeout_grpc_cannot_send(fake: _Fake) -> None:
    async with fake.client() as client:
        for timeout in (1e10, float("inf"), float("nan")):
            with pytest.raises(ValueError, match="None sets no deadline"):
                await client.maintenance.wait_job(JOB_ID, timeout=timeout)
    assert fake.calls("WatchJob") == []


async def test_client_exposes_maintenance_and_monitoring_stubs(fake: _Fake) -> None:
    async with fake.client() as client:
        assert isinstance(client.maintenance, rf.Maintenance)
        assert isinstance(client.monitoring, rf.Monitoring)
        assert isinstance(
            client.maintenance.stub, maintenance_service_pb2_grpc.MaintenanceServiceStub
        )
        assert isinstance(client.monitoring.stub, monitoring_service_pb2_grpc.MonitoringServiceStub)


# --------------------------------------------------------------------------
# Against the real server

TABLE = "maint_client_notes"
ROWS = 1_200

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id bigserial PRIMARY KEY,
    workspace_id uuid NOT NULL,
    title text,
    body text,
    amount numeric(14, 4),
    happened_at timestamptz,
    tags text[],
    payload bytea,
    meta jsonb
);
"""


@pytest.fixture(scope="module")
async def real(
    settings: Settings, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[RunningServer, Path]]:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(SCHEMA)
    finally:
        await conn.close()
    backup_dir = tmp_path_factory.mktemp("server-backups")
    running = await start_server(settings, backup_dir=str(backup_dir))
    try:
        yield running, backup_dir
    finally:
        await running.stop(grace=1.0)


@pytest.fixture(scope="module")
async def client(real: tuple[RunningServer, Path]) -> AsyncIterator[rf.DataClient]:
    async with rf.DataClient(rf.ClientConfig(real[0].address, token=ADMIN_TOKEN)) as data_client:
        yield data_client


async def _fill(db: asyncpg.Connection, workspace: str, rows: int = ROWS) -> None:
    await db.execute(
        f"""
        INSERT INTO {TABLE} (workspace_id, title, body, amount, happened_at, tags, payload, meta)
        SELECT $1::uuid, 'title ' || i, CASE WHEN i % 7 = 0 THEN NULL ELSE repeat('x', i % 50) END,
               i * 1.2345, now() - i * interval '1 minute', ARRAY['t' || (i % 3), NULL],
               decode(lpad(to_hex(i), 8, '0'), 'hex'), jsonb_build_object('i', i, 'odd', i % 2 = 1)
        FROM generate_series(1, $2) AS i
        """,
        uuid.UUID(workspace),
        rows,
    )


async def _rows(db: asyncpg.Connection, workspace: str) -> list[asyncpg.Record]:
    return await db.fetch(
        f"SELECT * FROM {TABLE} WHERE workspace_id = $1 ORDER BY id", uuid.UUID(workspace)
    )


async def test_real_backup_to_path_and_restore_are_identical(
    client: rf.DataClient, db: asyncpg.Connection, workspace: str, tmp_path: Path
) -> None:
    await _fill(db, workspace)
    before = await _rows(db, workspace)
    path = tmp_path / "ws.rfbackup"
    saved = await client.maintenance.backup_to_path(
        path, workspace_id=workspace, tables=[TABLE], chunk_bytes=4096
    )
    assert saved.row_counts == {TABLE: ROWS}
    assert saved.chunk_count > 1
    assert path.stat().st_size == saved.file_bytes
    # Refused while the workspace has its rows; then replaced; then into an empty workspace.
    with pytest.raises(rf.FailedPrecondition) as caught:
        await client.maintenance.restore_from_path(path)
    assert caught.value.reason == "WORKSPACE_NOT_EMPTY"
    restored = await client.maintenance.restore_from_path(path, replace_existing=True)
    assert restored.replaced_row_count == ROWS
    await db.execute(f"DELETE FROM {TABLE} WHERE workspace_id = $1", uuid.UUID(workspace))
    restored = await client.maintenance.restore_from_path(path)
    assert [(t.table, t.row_count) for t in restored.tables] == [(TABLE, ROWS)]
    assert await _rows(db, workspace) == before


async def test_real_export_pipes_into_restore(
    client: rf.DataClient, db: asyncpg.Connection, workspace: str
) -> None:
    await _fill(db, workspace, 50)
    before = await _rows(db, workspace)
    parts = [p async for p in client.maintenance.export_backup(workspace_id=workspace)]
    assert parts[0].header.format_version == 1
    assert TABLE in [t.name for t in parts[0].header.tables]
    await db.execute(f"DELETE FROM {TABLE} WHERE workspace_id = $1", uuid.UUID(workspace))
    await client.maintenance.restore_backup(parts)
    assert await _rows(db, workspace) == before


async def test_real_damaged_backup_is_refused_and_nothing_written(
    client: rf.DataClient, db: asyncpg.Connection, workspace: str
) -> None:
    await _fill(db, workspace, 100)
    parts = [
        p async for p in client.maintenance.export_backup(workspace_id=workspace, tables=[TABLE])
    ]
    await db.execute(f"DELETE FROM {TABLE} WHERE workspace_id = $1", uuid.UUID(workspace))
    chunk = next(p for p in parts if p.HasField("chunk"))
    chunk.chunk.data = chunk.chunk.data[:-1] + bytes([chunk.chunk.data[-1] ^ 1])
    with pytest.raises(rf.DataLoss):
        await client.maintenance.restore_backup(parts)
    assert await _rows(db, workspace) == []


async def test_real_jobs_run_are_watched_listed_and_waited_for(
    client: rf.DataClient, db: asyncpg.Connection, workspace: str
) -> None:
    await _fill(db, workspace, 200)
    await db.execute(
        f"DELETE FROM {TABLE} WHERE workspace_id = $1 AND id % 2 = 0", uuid.UUID(workspace)
    )
    job = await client.maintenance.vacuum([TABLE])
    assert rf.job_state(job) in (rf.JobState.QUEUED, rf.JobState.RUNNING)
    seen = [j async for j in client.maintenance.watch_job(job.job_id, timeout=30)]
    assert rf.job_state(seen[-1]) is rf.JobState.SUCCEEDED
    done = await client.maintenance.wait_job(job.job_id, timeout=30)
    (report,) = done.result.tables
    # Dead-row figures come from pg_stat, which other backends flush lazily: not compared.
    assert (report.table, report.action) == (TABLE, "VACUUM (ANALYZE)")
    assert (await client.maintenance.get_job(job.job_id)).state == job_pb2.JOB_STATE_SUCCEEDED
    listed = [j.job_id async for j in client.maintenance.list_jobs(states=[rf.JobState.SUCCEEDED])]
    assert job.job_id in listed
    again = await client.maintenance.cancel_job(job.job_id)  # already ended: unchanged
    assert again.state == job_pb2.JOB_STATE_SUCCEEDED
    with pytest.raises(rf.NotFound):
        await client.maintenance.get_job(uuid.uuid4())
    assert isinstance(await client.maintenance.list_schedules(), list)


async def test_real_cancel_through_the_client(client: rf.DataClient) -> None:
    job = await client.maintenance.vacuum()
    cancelled = await client.maintenance.cancel_job(job.job_id)
    assert cancelled.cancel_requested or rf.job_state(cancelled).is_final
    # It may have finished before the cancellation reached it: either way it ends.
    final = await client.maintenance.wait_job(job.job_id, timeout=30, check=False)
    assert rf.job_state(final) in (rf.JobState.CANCELLED, rf.JobState.SUCCEEDED)
    if rf.job_state(final) is rf.JobState.CANCELLED:
        with pytest.raises(rf.JobFailed) as caught:
            await client.maintenance.wait_job(job.job_id, timeout=30)
        assert caught.value.state is rf.JobState.CANCELLED


async def test_real_backup_job_file_restores_from_the_client(
    client: rf.DataClient,
    real: tuple[RunningServer, Path],
    db: asyncpg.Connection,
    workspace: str,
) -> None:
    await _fill(db, workspace, 300)
    before = await _rows(db, workspace)
    name = f"client-{workspace}.rfbackup"
    job = await client.maintenance.backup_to_file(name, workspace_id=workspace, tables=[TABLE])
    done = await client.maintenance.wait_job(job.job_id, timeout=30)
    server_file = real[1] / name
    assert done.result.backup_sha256 == hashlib.sha256(server_file.read_bytes()).hexdigest()
    # The server's file is the client's format: the client restores it directly.
    await db.execute(f"DELETE FROM {TABLE} WHERE workspace_id = $1", uuid.UUID(workspace))
    await client.maintenance.restore_from_path(server_file)
    assert await _rows(db, workspace) == before
    with pytest.raises(rf.InvalidArgument):
        await client.maintenance.backup_to_file("../outside.rfbackup", workspace_id=workspace)
    restore = await client.maintenance.restore_from_file(name)
    with pytest.raises(rf.JobFailed) as caught:  # the workspace has its rows again
        await client.maintenance.wait_job(restore.job_id, timeout=30)
    assert caught.value.code == "FAILED_PRECONDITION"


async def test_real_status_reflects_the_pool(client: rf.DataClient, settings: Settings) -> None:
    status = await client.monitoring.get_status()
    assert status.replica
    assert status.pool.max_size == settings.pool_max_size
    assert status.database.reachable
    assert status.database.server_version


async def test_real_wait_job_outlives_its_tokens_with_a_token_function(
    settings: Settings, db: asyncpg.Connection
) -> None:
    # A job that runs longer than a token lives: the server ends each watch at its
    # token's expiry (no leeway here), and wait_job follows with a fresh token.
    table = "maint_client_token_lock"
    await create_lock_table(db, table)
    running = await start_server(settings, jwt_leeway_seconds=0.0)
    handed_out: list[float] = []

    def fresh_token() -> str:
        handed_out.append(time.monotonic())
        return mint("admin", ttl=1.5)

    try:
        async with rf.DataClient(rf.ClientConfig(running.address, token=fresh_token)) as client:
            async with locked(db, table):
                job = await client.maintenance.start_job(analyze(table))
                waiting = asyncio.ensure_future(client.maintenance.wait_job(job.job_id, timeout=30))
                await asyncio.sleep(4.0)  # the job waits for the lock: over two tokens long
                assert not waiting.done(), waiting
            final = await waiting
        assert final.state == job_pb2.JOB_STATE_SUCCEEDED
        # StartJob's token, then one per watch: the first, and at least one more (two,
        # unless a loaded machine delayed the first watch past half a second).
        assert len(handed_out) >= 3, handed_out
    finally:
        await running.stop(grace=1.0)
