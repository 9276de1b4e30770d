"""Maintenance calls: stream backups and restores, run and follow jobs, list schedules.

A nightly job might do::

    job = await client.maintenance.vacuum(["events"])  # returns at once, QUEUED or RUNNING
    done = await client.maintenance.wait_job(job.job_id, timeout=3600)  # or JobFailed
    for report in done.result.tables:
        print(report.table, report.dead_rows_before, report.dead_rows_after)

    saved = await client.maintenance.backup_to_path("nightly.rfbackup", workspace_id=ws)
    restored = await client.maintenance.restore_from_path("nightly.rfbackup")

Two kinds of backup files, kept apart by name:

- ``backup_to_path`` / ``restore_from_path`` write and read a file on the
  *client's* disk, streamed over ExportBackup / RestoreBackup.
- ``backup_to_file`` / ``restore_from_file`` start *jobs* that write and read
  a file under the *server's* backup directory (a path relative to it).

Both kinds have the server's backup file format, so a file copied from the
backup directory restores with ``restore_from_path``, and a local one put
there restores with a job: the magic line ``RAPTORFLOW-BACKUP 1\\n``, then
each ExportBackupResponse of the stream (header, chunks, manifest) as a
4-byte big-endian length and the serialized message.

Policies worth knowing:

- Jobs are returned as the generated `job_pb2.Job` message; `JobState` names
  its states. `wait_job` raises `JobFailed` (carrying the final Job) for a job
  that FAILED or was CANCELLED, unless ``check=False``.
- ExportBackup, WatchJob, GetJob, ListJobs, CancelJob (idempotent) and
  ListSchedules retry UNAVAILABLE and ABORTED; a streaming call is only
  retried by gRPC before its first message arrives, so nothing is repeated.
  StartJob retries ABORTED only (the server rolled the insert back), like the
  other writes. RestoreBackup is never retried: its request stream is gone
  once sent; call `restore_backup` again with the same parts.
- The streaming and waiting calls (export, restore, watch, wait) default to
  no deadline, since a backup or a job takes as long as it takes; pass
  ``timeout=`` to bound them. The unary calls use ``ClientConfig.timeout``.
- The server ends a stream when its token expires. `wait_job` then watches
  again if ``ClientConfig.token`` is a function (each watch fetches a fresh
  token), so a job may outlive any one token; with a fixed token it raises
  `Unauthenticated` (reason TOKEN_EXPIRED).
"""

# `timeout` is the gRPC deadline sent along with each call (the server cancels the
# statement when it passes), which asyncio.timeout around the await cannot express.

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import os
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Callable,
    Coroutine,
    Iterable,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, TypeAlias, TypeVar
from uuid import UUID

import grpc.aio
from google.protobuf.message import DecodeError
from raptorflow.data.client._auth import AUTHORIZATION
from raptorflow.data.client._config import (
    USE_CLIENT_DEFAULT,
    MetadataLike,
    Timeout,
    check_call_timeout,
    merge_metadata,
)
from raptorflow.data.client._errors import DataLoss, Unauthenticated, Unavailable, from_rpc_error
from raptorflow.data.client._values import canonical_workspace_id
from raptorflow.data.v1 import job_pb2, maintenance_service_pb2, maintenance_service_pb2_grpc

if TYPE_CHECKING:
    from raptorflow.data.client._client import DataClient

pb = maintenance_service_pb2

_Item = TypeVar("_Item")

BackupPart: TypeAlias = maintenance_service_pb2.ExportBackupResponse
"""One message of a backup stream: a header, a chunk or the manifest."""

_RestoreCall: TypeAlias = grpc.aio.StreamUnaryCall[
    maintenance_service_pb2.RestoreBackupRequest, maintenance_service_pb2.RestoreBackupResponse
]

# The contract's limits, checked here so a mistake fails at the line that made
# it instead of after a round trip.
_MIN_CHUNK_BYTES: Final = 4_096
_MAX_CHUNK_BYTES: Final = 4_194_304
_MAX_PAGE_SIZE: Final = 1_000
# The server's backup file format (maintenance/backup_file.py): keep in step.
BACKUP_FILE_MAGIC: Final = b"RAPTORFLOW-BACKUP 1\n"
"""The first bytes of a backup file, local or under the server's backup directory."""
_LENGTH_BYTES: Final = 4
# A message longer than this is not a backup part (chunks carry at most 4 MiB
# of data): reading on would allocate whatever a damaged length says.
_MAX_PART_BYTES: Final = 64 * 1024 * 1024
# Pause before watching a job again after its watch stream broke off (a replica
# shutting down), so a server in trouble is not called in a tight loop.
_REWATCH_SECONDS: Final = 0.5


class JobState(enum.IntEnum):
    """The life of a job (`JobState` of the proto, same numbers)."""

    QUEUED = job_pb2.JOB_STATE_QUEUED
    """Accepted, waiting for a free job slot."""
    RUNNING = job_pb2.JOB_STATE_RUNNING
    """Running on the replica named in `Job.replica`."""
    SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED
    """Ended, and did everything it was asked."""
    FAILED = job_pb2.JOB_STATE_FAILED
    """Ended with an error, or its replica died (reason LEASE_EXPIRED)."""
    CANCELLED = job_pb2.JOB_STATE_CANCELLED
    """Ended by `cancel_job`; uncommitted work was rolled back."""

    @property
    def is_final(self) -> bool:
        """Whether the job has ended (SUCCEEDED, FAILED or CANCELLED)."""
        return self >= JobState.SUCCEEDED


def job_state(job: job_pb2.Job) -> JobState:
    """The state of `job` as a `JobState`. Raises ValueError for a state this client
    does not know (a newer server), rather than guessing whether it is final."""
    try:
        return JobState(job.state)
    except ValueError:
        raise ValueError(
            f"job {job.job_id} is in state {job.state}, which this client does not know;"
            " upgrade raptorflow-data-stubs"
        ) from None


class JobFailed(Exception):
    """A job `wait_job` waited for ended FAILED or CANCELLED.

    Not a `DataError`: every call succeeded, the job did not. `job` is the
    final Job, with what it did before it stopped in `job.result`.
    """

    job: job_pb2.Job
    """The job in its final state."""
    state: JobState
    """FAILED or CANCELLED."""
    code: str
    """The gRPC status code name of the job's error ("FAILED_PRECONDITION",
    "CANCELLED"...); "" when the server gave none."""
    reason: str
    """The error's UPPER_SNAKE_CASE reason ("LEASE_EXPIRED"...); "" when none."""
    message: str
    """The error message, for humans."""

    def __init__(self, job: job_pb2.Job) -> None:
        self.job = job
        self.state = job_state(job)
        self.code = job.error.code
        self.reason = job.error.reason
        self.message = job.error.message
        super().__init__(str(self))

    def __str__(self) -> str:
        # Agents often log only str(err): the job, what ended it, and why.
        text = f"job {self.job.job_id} {self.state.name}"
        if self.code:
            text += f": {self.code}"
        if self.message:
            text += f": {self.message}"
        if self.reason:
            text += f" [{self.reason}]"
        return text


@dataclass(frozen=True)
class LocalBackup:
    """A backup `Maintenance.backup_to_path` wrote to a local file."""

    path: Path
    """The file."""
    file_bytes: int
    """The file's size in bytes."""
    data_bytes: int
    """COPY data bytes in the backup (the manifest's `data_bytes`)."""
    sha256: str
    """SHA-256 of the whole file in lowercase hex, as a backup job reports its
    file's (`result.backup_sha256`)."""
    data_sha256: str
    """SHA-256 of the COPY data in lowercase hex, as the manifest gives it;
    checked against the chunks written."""
    row_counts: dict[str, int]
    """Rows per table, in the backup's table order."""
    chunk_count: int
    """Chunks in the backup."""


class BackupFileError(ValueError):
    """A local backup file is not a whole backup stream (truncated or not a backup)."""


# --------------------------------------------------------------------------
# Helpers


async def _each(items: Iterable[_Item] | AsyncIterable[_Item]) -> AsyncGenerator[_Item, None]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


async def _stream(
    start: Callable[[], grpc.aio.UnaryStreamCall[Any, _Item]],
) -> AsyncGenerator[_Item, None]:
    """The messages of a server-streaming call started on first iteration, errors as
    `DataError`; closing the generator early cancels the call."""
    call = start()
    try:
        async for response in call:
            yield response
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err) from err
    finally:
        # A no-op once the stream ended; otherwise the caller left early.
        call.cancel()


async def _jobs(
    responses: AsyncGenerator[pb.WatchJobResponse, None],
) -> AsyncGenerator[job_pb2.Job, None]:
    async with contextlib.aclosing(responses):
        async for response in responses:
            yield response.job


def _names(tables: Iterable[str], what: str = "tables") -> list[str]:
    if isinstance(tables, str):
        # A str is an Iterable of its characters.
        raise TypeError(f"{what} takes a list of table names, not the str {tables!r}")
    names = list(tables)
    for index, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"{what}[{index}] is a {type(name).__name__}, not a str")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} repeats a name: {names!r}")
    return names


def _job_id(job_id: str | UUID) -> str:
    try:
        return str(job_id if isinstance(job_id, UUID) else UUID(job_id))
    except ValueError as err:
        raise ValueError(f"job id {job_id!r} is not a UUID") from err


def _scope(workspace_id: str | UUID | None, tables: Iterable[str]) -> job_pb2.BackupScope:
    return job_pb2.BackupScope(
        workspace_id=canonical_workspace_id(workspace_id) if workspace_id is not None else "",
        tables=_names(tables),
    )


def _restore_request(part: BackupPart, replace_existing: bool) -> pb.RestoreBackupRequest:
    request = pb.RestoreBackupRequest(replace_existing=replace_existing)
    match part.WhichOneof("part"):
        case "header":
            request.header.CopyFrom(part.header)
        case "chunk":
            request.chunk.CopyFrom(part.chunk)
        case "manifest":
            request.manifest.CopyFrom(part.manifest)
        case None:
            raise ValueError("a backup part has no header, chunk or manifest set")
    return request


def _framed(part: BackupPart) -> bytes:
    data = part.SerializeToString()
    return len(data).to_bytes(_LENGTH_BYTES, "big") + data


def _read_magic(file: IO[bytes]) -> None:
    if file.read(len(BACKUP_FILE_MAGIC)) != BACKUP_FILE_MAGIC:
        raise BackupFileError("the file does not start with the backup magic line")


def _read_part(file: IO[bytes]) -> BackupPart | None:
    """The next part of a backup file; None at its end."""
    prefix = file.read(_LENGTH_BYTES)
    if not prefix:
        return None
    length = int.from_bytes(prefix, "big")
    if len(prefix) < _LENGTH_BYTES or length > _MAX_PART_BYTES:
        raise BackupFileError("the backup file has a damaged message length")
    data = file.read(length)
    if len(data) != length:
        raise BackupFileError("the backup file ends inside a message (truncated?)")
    try:
        part = BackupPart.FromString(data)
    except DecodeError as err:
        raise BackupFileError(
            f"the backup file holds a message that does not parse: {err}"
        ) from err
    if part.WhichOneof("part") is None:
        raise BackupFileError("the backup file holds a message with no header, chunk or manifest")
    return part


# What grpc.aio reports when a write fails because the call has just ended.
_CORE_WRITE_ERROR: Final = "Internal error from Core"


class _FirstStatus:
    """Keeps the status a client-streaming call ended with first.

    When the server ends the call (refusing a part) while a write is in
    flight, grpc.aio can overwrite the server's status with a bare INTERNAL
    "Internal error from Core" (grpc/grpc#36066, fix pending in #43486), which
    would hide WORKSPACE_NOT_EMPTY or CHECKSUM_MISMATCH. A done callback runs
    as each status is set, so it sees the server's before the overwrite.
    """

    def __init__(self, call: grpc.aio.Call) -> None:
        self.first: grpc.aio.AioRpcError | None = None
        call.add_done_callback(self._done)

    def _done(self, call: grpc.aio.Call) -> None:
        if self.first is not None:
            return
        code = _settled(call.code())
        details = _settled(call.details())
        trailing = _settled(call.trailing_metadata())
        if code is None or code is grpc.StatusCode.OK or trailing is None:
            return
        self.first = grpc.aio.AioRpcError(
            code, grpc.aio.Metadata(), trailing, details, "kept by _FirstStatus"
        )

    def unmasked(self, err: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
        """The server's own error when `err` is grpc.aio's write failure masking it."""
        masked = err.code() is grpc.StatusCode.INTERNAL and err.details() == _CORE_WRITE_ERROR
        if masked and self.first is not None and self.first.details() != _CORE_WRITE_ERROR:
            return self.first
        return err


def _settled(awaitable: Coroutine[Any, Any, _Item]) -> _Item | None:
    """The result of a coroutine that finishes without suspending, else None.

    A finished call's `code()`, `details()` and `trailing_metadata()` return
    at once; this reads them inside a synchronous done callback.
    """
    try:
        awaitable.send(None)
    except StopIteration as finished:
        result: _Item = finished.value
        return result
    awaitable.close()
    return None


class _BackupCheck:
    """Verifies a backup stream as it is written: chunk checksums, sequence, manifest."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._next_sequence = 0
        self._data_bytes = 0
        self.manifest: pb.BackupManifest | None = None

    def add(self, part: BackupPart) -> None:
        # The server checks all this again on restore; checking here means a
        # damaged download is refused now, not discovered at restore time.
        kind = part.WhichOneof("part")
        if self.manifest is not None:
            raise DataLoss(
                "the backup stream goes on after its manifest", reason="MALFORMED_BACKUP"
            )
        if kind == "chunk":
            chunk = part.chunk
            if chunk.sequence != self._next_sequence:
                raise DataLoss(
                    f"backup chunk {chunk.sequence} arrived where {self._next_sequence} was due",
                    reason="MALFORMED_BACKUP",
                )
            if hashlib.sha256(chunk.data).digest() != chunk.sha256:
                raise DataLoss(
                    f"backup chunk {chunk.sequence} of {chunk.table!r} does not match its checksum",
                    reason="CHECKSUM_MISMATCH",
                )
            self._digest.update(chunk.data)
            self._data_bytes += len(chunk.data)
            self._next_sequence += 1
        elif kind == "manifest":
            self.manifest = part.manifest
            if (
                self._digest.hexdigest() != self.manifest.sha256
                or self._data_bytes != self.manifest.data_bytes
                or self._next_sequence != self.manifest.chunk_count
            ):
                raise DataLoss(
                    "the backup's manifest does not match the chunks received",
                    reason="CHECKSUM_MISMATCH",
                )


# --------------------------------------------------------------------------
# The handle


class Maintenance:
    """MaintenanceService: backups, restores, maintenance jobs and schedules.

    Reach it as `client.maintenance`. Every method takes keyword-only
    `timeout` and `metadata`, as the rest of the client; job ids are UUIDs or
    their text (ValueError otherwise), table lists are lists of names
    without repeats (TypeError for a bare str).
    """

    def __init__(self, client: DataClient) -> None:
        self._client = client
        self._stub = maintenance_service_pb2_grpc.MaintenanceServiceStub(client.channel)

    @property
    def stub(self) -> maintenance_service_pb2_grpc.MaintenanceServiceStub:
        """The generated stub on the client's channel, for calls this class does not cover.

        Calls made through it bypass the default timeout, the default metadata
        and the conversion to `DataError`.
        """
        return self._stub

    # ----------------------------------------------------------------------
    # Backups streamed to and from the client

    def export_backup(
        self,
        *,
        workspace_id: str | UUID | None = None,
        tables: Sequence[str] = (),
        chunk_bytes: int = 0,
        timeout: Timeout = None,
        metadata: MetadataLike | None = None,
    ) -> AsyncGenerator[BackupPart, None]:
        """Streams a backup of one consistent snapshot: a header, chunks, then the manifest.

        `workspace_id` None backs up the rows of every workspace; `tables`
        empty means every exposed table. `chunk_bytes` is the most COPY data
        per chunk (4,096 to 4,194,304; 0 for the server's 1 MiB). Pass the
        messages to `restore_backup` as they are, or keep them.

        Leaving the ``async for`` early cancels the call (the snapshot
        transaction is rolled back). Raises, while iterating,
        `InvalidArgument` for a table that is not exposed and
        `DeadlineExceeded` if `timeout` passes first.
        """
        if chunk_bytes and not _MIN_CHUNK_BYTES <= chunk_bytes <= _MAX_CHUNK_BYTES:
            raise ValueError(
                f"chunk_bytes must be 0 or from {_MIN_CHUNK_BYTES:,} to {_MAX_CHUNK_BYTES:,}"
            )
        request = pb.ExportBackupRequest(
            scope=_scope(workspace_id, tables), chunk_bytes=chunk_bytes
        )
        deadline, call_metadata = self._client._call_options(timeout, metadata)
        return _stream(
            lambda: self._stub.ExportBackup(request, timeout=deadline, metadata=call_metadata)
        )

    async def restore_backup(
        self,
        parts: AsyncIterable[BackupPart] | Iterable[BackupPart],
        *,
        replace_existing: bool = False,
        timeout: Timeout = None,
        metadata: MetadataLike | None = None,
    ) -> pb.RestoreBackupResponse:
        """Loads a backup, in the order `export_backup` gave its parts, in one transaction.

        The backup goes back to the workspace (or all workspaces) it came
        from. `parts` may be a list, any iterable, or an async iterable such
        as `export_backup(...)` itself, which copies a backup without holding
        it in memory. With `replace_existing`, the rows the backup's scope
        holds now are deleted first, in the same transaction.

        Nothing is written unless the whole backup checks out. Raises
        `DataLoss` (reason CHECKSUM_MISMATCH or ROW_COUNT_MISMATCH) for a
        damaged backup, `FailedPrecondition` with reason WORKSPACE_NOT_EMPTY
        when the scope holds rows and `replace_existing` is not set, or
        TABLE_CHANGED when a table's columns differ from the backup's, and
        `InvalidArgument` (reason MALFORMED_BACKUP) for parts out of order.
        An exception raised by `parts` cancels the call, so nothing is
        written either. Never retried by gRPC.
        """
        deadline, call_metadata = self._client._call_options(timeout, metadata)
        # The writer API rather than a request iterator: grpc.aio swallows an
        # exception raised inside a request iterator and reports only a
        # cancelled call, which would hide the caller's own error.
        call: _RestoreCall = self._stub.RestoreBackup(
            None, timeout=deadline, metadata=call_metadata
        )
        status = _FirstStatus(call)
        try:
            first = True
            async with contextlib.aclosing(_each(parts)) as each:
                async for part in each:
                    request = _restore_request(part, replace_existing and first)
                    first = False
                    try:
                        await call.write(request)
                    except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                        # The server already ended the call (it refused a
                        # part): its status, awaited below, says why.
                        break
            await call.done_writing()
            return await call
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(status.unmasked(err)) from err
        except BaseException:
            # Cancelling before the manifest means the server rolls back.
            call.cancel()
            raise

    async def backup_to_path(
        self,
        path: str | os.PathLike[str],
        *,
        workspace_id: str | UUID | None = None,
        tables: Sequence[str] = (),
        chunk_bytes: int = 0,
        timeout: Timeout = None,
        metadata: MetadataLike | None = None,
    ) -> LocalBackup:
        """Streams a backup (as `export_backup`) into a new local file; see the module docstring.

        Each chunk's checksum, the sequence and the manifest are checked as
        they arrive; the file is only kept if the whole stream checked out
        and ended with its manifest (otherwise it is removed and the error
        raised: `DataLoss`, or the call's own `DataError`). Raises
        FileExistsError, before any call, if `path` exists.
        """
        target = Path(path)
        check = _BackupCheck()
        # "x": never overwrite an earlier backup, and no window in which two
        # backups write the same file.
        file = await asyncio.to_thread(target.open, "xb")
        file_digest = hashlib.sha256(BACKUP_FILE_MAGIC)
        file_bytes = len(BACKUP_FILE_MAGIC)
        try:
            await asyncio.to_thread(file.write, BACKUP_FILE_MAGIC)
            parts = self.export_backup(
                workspace_id=workspace_id,
                tables=tables,
                chunk_bytes=chunk_bytes,
                timeout=timeout,
                metadata=metadata,
            )
            async with contextlib.aclosing(parts):
                async for part in parts:
                    check.add(part)
                    framed = _framed(part)
                    file_digest.update(framed)
                    file_bytes += await asyncio.to_thread(file.write, framed)
            if check.manifest is None:
                raise DataLoss("the backup stream ended without its manifest", reason="TRUNCATED")
            await asyncio.to_thread(_flush, file)
        except BaseException:
            _discard(file, target)
            raise
        file.close()
        manifest = check.manifest
        return LocalBackup(
            path=target,
            file_bytes=file_bytes,
            data_bytes=manifest.data_bytes,
            sha256=file_digest.hexdigest(),
            data_sha256=manifest.sha256,
            row_counts={count.table: count.row_count for count in manifest.tables},
            chunk_count=manifest.chunk_count,
        )

    async def restore_from_path(
        self,
        path: str | os.PathLike[str],
        *,
        replace_existing: bool = False,
        timeout: Timeout = None,
        metadata: MetadataLike | None = None,
    ) -> pb.RestoreBackupResponse:
        """Restores a file `backup_to_path` wrote, streaming it (as `restore_backup`).

        The file is read as it is sent, so its size does not matter. Raises
        `BackupFileError` for a file that is not a whole backup stream (the
        call is cancelled first, so nothing is written), and what
        `restore_backup` raises.
        """
        # Closed here, not left to the garbage collector, so the file is
        # closed when the server refuses the backup part-way.
        async with contextlib.aclosing(_parts_of_file(Path(path))) as parts:
            return await self.restore_backup(
                parts, replace_existing=replace_existing, timeout=timeout, metadata=metadata
            )

    # ----------------------------------------------------------------------
    # Jobs

    async def start_job(
        self,
        spec: job_pb2.JobSpec,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> job_pb2.Job:
        """Starts a job and returns it at once, QUEUED or RUNNING.

        The shortcuts below (`vacuum`, `analyze`, `reindex`,
        `cleanup_retention`, `backup_to_file`, `restore_from_file`) build the
        spec. Raises `InvalidArgument` for a spec without a kind, a table that
        is not exposed or a path outside the backup directory, and
        `FailedPrecondition` (reason BACKUP_DIR_NOT_SET) for a file job on a
        server without a backup directory.
        """
        if spec.WhichOneof("kind") is None:
            raise ValueError("a job spec names exactly one kind (vacuum, analyze...)")
        response = await self._client._call(
            self._stub.StartJob,
            pb.StartJobRequest(spec=spec),
            timeout=timeout,
            metadata=metadata,
        )
        return response.job

    async def vacuum(
        self,
        tables: Sequence[str] = (),
        *,
        analyze: bool = True,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> job_pb2.Job:
        """Starts VACUUM (ANALYZE) of `tables` (every exposed table when empty);
        ``analyze=False`` for a plain VACUUM. Returns the job."""
        spec = job_pb2.JobSpec(vacuum=job_pb2.VacuumJob(tables=_names(tables), analyze=analyze))
        return await self.start_job(spec, timeout=timeout, metadata=metadata)

    async def analyze(
        self,
        tables: Sequence[str] = (),
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> job_pb2.Job:
        """Starts ANALYZE of `tables` (every exposed table when empty). Returns the job."""
        spec = job_pb2.JobSpec(analyze=job_pb2.AnalyzeJob(tables=_names(tables)))
        return await self.start_job(spec, timeout=timeout, metadata=metadata)

    async def reindex(
        self,
        tables: Sequence[str] = (),
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> job_pb2.Job:
        """Starts REINDEX TABLE CONCURRENTLY of `tables` (every exposed table when
        empty); reads and writes go on meanwhile. Returns the job."""
        spec = job_pb2.JobSpec(reindex=job_pb2.ReindexJob(tables=_names(tables)))
        return await self.start_job(spec, timeout=timeout, metadata=metadata)

    async def cleanup_retention(
        self,
        tables: Sequence[str] = (),
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> job_pb2.Job:
        """Starts a cleanup by the server's retention rules, of the rules for
        `tables` (every rule when empty; a table without a rule is
        `InvalidArgument`). The ages come from the server's configuration,
        never from the caller. Returns the job."""
        spec = job_pb2.JobSpec(retention_cleanup=job_pb2.RetentionCleanupJob(tables=_names(tables)))
        return await self.start_job(spec, timeout=timeout, metadata=metadata)

    async def backup_to_file(
        self,
        path: str,
        *,
        workspace_id: str | UUID | None = None,
        tables: Sequence[str] = (),
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> job_pb2.Job:
        """Starts a job that writes a backup to `path` under the server's backup directory.

        `path` is relative to that directory, with forward slashes; one that
        leaves it is `InvalidArgument`, an existing file `AlreadyExists`. Each
        `{time}` in it becomes the run's UTC time (`YYYYMMDDTHHMMSSZ`). The
        finished job's `result` gives the expanded path, size and checksum.
        """
        spec = job_pb2.JobSpec(
            backup_to_file=job_pb2.BackupToFileJob(
                scope=_scope(workspace_id, tables), path=_server_path(path)
            )
        )
        return await self.start_job(spec, timeout=timeout, metadata=metadata)

    async def restore_from_file(
        self,
        path: str,
        *,
        replace_existing: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> job_pb2.Job:
        """Starts a job that restores a `backup_to_file` file (relative to the server's
        backup directory), in one transaction; `replace_existing` as in
        `restore_backup`. Returns the job."""
        spec = job_pb2.JobSpec(
            restore_from_file=job_pb2.RestoreFromFileJob(
                path=_server_path(path), replace_existing=replace_existing
            )
        )
        return await self.start_job(spec, timeout=timeout, metadata=metadata)

    async def get_job(
        self,
        job_id: str | UUID,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> job_pb2.Job:
        """The job as it is now, from any replica. Raises `NotFound` if no job has the id."""
        response = await self._client._call(
            self._stub.GetJob,
            pb.GetJobRequest(job_id=_job_id(job_id)),
            timeout=timeout,
            metadata=metadata,
        )
        return response.job

    def list_jobs(
        self,
        *,
        states: Iterable[JobState | int] = (),
        schedule: str | None = None,
        page_size: int = 0,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> AsyncGenerator[job_pb2.Job, None]:
        """Every job in the history, newest first, reading page after page.

        Only jobs in `states` (all when empty) and, with `schedule`, only the
        runs of that schedule. `page_size` is the jobs per call (1 to 1,000;
        0 for the server's 100); `timeout` applies to each page.
        """
        if page_size and not 1 <= page_size <= _MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be 0 or from 1 to {_MAX_PAGE_SIZE:,}")
        request = pb.ListJobsRequest(
            page_size=page_size,
            states=[job_pb2.JobState.ValueType(int(state)) for state in states],
            schedule=schedule or "",
        )
        return self._job_pages(request, timeout, metadata)

    async def _job_pages(
        self, request: pb.ListJobsRequest, timeout: Timeout, metadata: MetadataLike | None
    ) -> AsyncGenerator[job_pb2.Job, None]:
        while True:
            response = await self._client._call(
                self._stub.ListJobs, request, timeout=timeout, metadata=metadata
            )
            for job in response.jobs:
                yield job
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def watch_job(
        self,
        job_id: str | UUID,
        *,
        timeout: Timeout = None,
        metadata: MetadataLike | None = None,
    ) -> AsyncGenerator[job_pb2.Job, None]:
        """Streams the job: as it is now, then at every change of state or progress,
        ending after the message with a final state. Works on any replica.

        Leaving the ``async for`` early cancels the watch, not the job.
        Raises `NotFound`, while iterating, if no job has the id.
        """
        request = pb.WatchJobRequest(job_id=_job_id(job_id))
        deadline, call_metadata = self._client._call_options(timeout, metadata)
        return _jobs(
            _stream(lambda: self._stub.WatchJob(request, timeout=deadline, metadata=call_metadata))
        )

    async def wait_job(
        self,
        job_id: str | UUID,
        *,
        timeout: float | None = None,
        check: bool = True,
        metadata: MetadataLike | None = None,
    ) -> job_pb2.Job:
        """Waits until the job ends and returns it in its final state.

        Follows `watch_job`, watching again (every half second) while the
        stream breaks off or the service is `Unavailable` (a replica
        restarting: the job lives in the database, so any replica can tell),
        until `timeout` seconds have passed; then `DeadlineExceeded`, or the
        last `Unavailable`. None waits for as long as it takes. With `check`
        (the default) a job that ended FAILED or CANCELLED raises
        `JobFailed`, which carries the job; ``check=False`` returns it
        instead. Raises `NotFound` if no job has the id, and ValueError for
        a `timeout` over `MAX_TIMEOUT_SECONDS` (or NaN, or infinity).

        The server ends a watch `Unauthenticated` (reason TOKEN_EXPIRED) when
        its token expires. With a function as `ClientConfig.token` (and no
        authorization header in `metadata`), every watch gets a fresh token,
        so the wait watches again and a job may outlive any one token. With a
        fixed token it raises `Unauthenticated`, as it does when a fresh
        token is refused at once.
        """
        check_call_timeout(timeout)
        config = self._client.config
        # Whether each watch sends a token of its own, fetched for it.
        refreshing = callable(config.token) and all(
            key != AUTHORIZATION for key, _ in merge_metadata(config.metadata, metadata)
        )
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if end is None else max(end - loop.time(), 0.0)
            watched = False
            try:
                watch = self.watch_job(job_id, timeout=remaining, metadata=metadata)
                async with contextlib.aclosing(watch):
                    async for job in watch:
                        watched = True
                        state = job_state(job)
                        if state.is_final:
                            if check and state is not JobState.SUCCEEDED:
                                raise JobFailed(job)
                            return job
            except Unavailable:
                if end is not None and loop.time() >= end:
                    raise
            except Unauthenticated as err:
                # A watch that sent nothing was refused its token outright: watching
                # again with the next one could loop for ever, so that raises.
                if not (refreshing and watched and err.reason == "TOKEN_EXPIRED"):
                    raise
            # The stream ended without a final state (its replica shut down, its
            # token expired): the job lives in the database, so watch it again,
            # perhaps elsewhere. The pause also keeps a token function that hands
            # out tokens about to expire from making a tight loop of watches.
            await asyncio.sleep(_REWATCH_SECONDS)

    async def cancel_job(
        self,
        job_id: str | UUID,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> job_pb2.Job:
        """Asks the job to stop, on whichever replica runs it; returns it with
        `cancel_requested` set (a job that already ended comes back unchanged).
        Idempotent. Use `wait_job` to see it end. Raises `NotFound` if no job
        has the id."""
        response = await self._client._call(
            self._stub.CancelJob,
            pb.CancelJobRequest(job_id=_job_id(job_id)),
            timeout=timeout,
            metadata=metadata,
        )
        return response.job

    async def list_schedules(
        self,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> list[job_pb2.Schedule]:
        """The server's configured schedules, by name, with their next run, latest
        job and success rate."""
        response = await self._client._call(
            self._stub.ListSchedules, pb.ListSchedulesRequest(), timeout=timeout, metadata=metadata
        )
        return list(response.schedules)


def _server_path(path: str) -> str:
    if not isinstance(path, str) or not path:
        # A pathlib.Path would carry the client's separators and meaning.
        raise TypeError("a server backup path is a non-empty str, relative to its backup directory")
    return path


def _discard(file: IO[bytes], path: Path) -> None:
    # Synchronous on purpose: it runs while a cancellation unwinds, where an
    # await could be interrupted and leave half a backup behind.
    file.close()
    path.unlink(missing_ok=True)


def _flush(file: IO[bytes]) -> None:
    file.flush()
    os.fsync(file.fileno())


async def _parts_of_file(path: Path) -> AsyncGenerator[BackupPart, None]:
    file = await asyncio.to_thread(path.open, "rb")
    try:
        await asyncio.to_thread(_read_magic, file)
        while True:
            part = await asyncio.to_thread(_read_part, file)
            if part is None:
                return
            yield part
    finally:
        file.close()
