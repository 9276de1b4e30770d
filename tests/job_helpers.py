"""Helpers of the job and schedule tests: a job runtime of the test's own with a scripted
executor, a progress that records, a table the test locks, and readers of job streams.

`ScriptedExecutor` stands in for `JobExecutor` in runtime tests only (the RPC tests
run real VACUUM/ANALYZE jobs): an ANALYZE spec's first table names what the job
does, so a test can make a job block, fail, crash or report progress at will.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.connections import Database
from raptorflow.data.server.errors import Code, ServiceError
from raptorflow.data.server.maintenance.jobs import Jobs
from raptorflow.data.server.maintenance.progress import Progress
from raptorflow.data.v1 import job_pb2, maintenance_service_pb2, maintenance_service_pb2_grpc

pb = maintenance_service_pb2
Stub = maintenance_service_pb2_grpc.MaintenanceServiceStub
FINAL_STATES = {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}


def scripted(command: str, *args: str) -> job_pb2.JobSpec:
    """A spec the ScriptedExecutor runs as `command` (see there)."""
    return job_pb2.JobSpec(analyze=job_pb2.AnalyzeJob(tables=[command, *args]))


def analyze(*tables: str) -> job_pb2.JobSpec:
    return job_pb2.JobSpec(analyze=job_pb2.AnalyzeJob(tables=list(tables)))


class RecordingProgress:
    """A job's Progress that keeps every report, in order, for direct runs of an executor."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, int, int, int]] = []

    async def report(
        self,
        phase: str,
        *,
        done: int = 0,
        total: int = 0,
        unit: job_pb2.ProgressUnit.ValueType = job_pb2.PROGRESS_UNIT_UNSPECIFIED,
    ) -> None:
        self.reports.append((phase, done, total, unit))


class ScriptedExecutor:
    """Runs specs as their first table says:

    - "succeed": returns at once with one TableReport;
    - "block": waits until `release` is set (or the job is cancelled);
    - "sleep <seconds>": sleeps, then succeeds;
    - "progress <reports> <bursts>": reports `reports` times in `bursts` bursts a
      20 ms sleep apart, then succeeds;
    - "flaky <n>": fails (ABORTED) on every n-th run of a flaky job;
    - "fail": raises a ServiceError (FAILED_PRECONDITION, TABLE_CHANGED);
    - "privilege": raises asyncpg's InsufficientPrivilegeError;
    - "crash": raises RuntimeError.
    """

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.cancel_seen = asyncio.Event()
        self.flaky_runs = 0
        self.progress: list[Progress] = []

    async def check(self, spec: job_pb2.JobSpec) -> None:
        if not spec.analyze.tables:
            raise ServiceError(Code.INVALID_ARGUMENT, "INVALID_ARGUMENT", "no command")

    async def run(self, spec: job_pb2.JobSpec, progress: Progress) -> job_pb2.JobResult:
        command, *args = spec.analyze.tables[0].split()
        self.started.append(command)
        self.progress.append(progress)
        try:
            return await self._run(command, args, progress)
        except asyncio.CancelledError:
            self.cancelled.append(command)
            self.cancel_seen.set()
            raise

    async def _run(self, command: str, args: list[str], progress: Progress) -> job_pb2.JobResult:
        if command == "block":
            await progress.report("blocked")
            await self.release.wait()
        elif command == "sleep":
            await asyncio.sleep(float(args[0]))
        elif command == "progress":
            reports, bursts = int(args[0]), int(args[1])
            per_burst = reports // bursts
            for burst in range(bursts):
                for i in range(per_burst):
                    done = burst * per_burst + i + 1
                    await progress.report(
                        "copy", done=done, total=reports, unit=job_pb2.PROGRESS_UNIT_ROWS
                    )
                await asyncio.sleep(0.02)
        elif command == "flaky":
            self.flaky_runs += 1
            if self.flaky_runs % int(args[0]) == 0:
                raise ServiceError(Code.ABORTED, "FLAKY", "every so often this fails")
        elif command == "fail":
            raise ServiceError(Code.FAILED_PRECONDITION, "TABLE_CHANGED", "table x was dropped")
        elif command == "privilege":
            raise asyncpg.exceptions.InsufficientPrivilegeError("permission denied for table x")
        elif command == "crash":
            raise RuntimeError("a bug")
        return job_pb2.JobResult(tables=[job_pb2.TableReport(table=command, action="SCRIPTED")])


@contextlib.asynccontextmanager
async def job_runtime(
    settings: Settings, executor: ScriptedExecutor | None = None, **changes: Any
) -> AsyncIterator[Jobs]:
    """A started Jobs of the test's own (its own replica id, job pool and LISTEN connection)
    on the session database, which a server already migrated."""
    changed = dataclasses.replace(settings, **changes)
    database = Database(changed)
    jobs = Jobs(
        changed,
        database,
        executor or ScriptedExecutor(),  # type: ignore[arg-type]
        f"test-runtime-{uuid.uuid4().hex[:6]}",
    )
    try:
        await jobs.start()
        yield jobs
    finally:
        await jobs.close()
        await database.close()


async def watch_to_end(stub: Stub, job_id: str, within: float = 20.0) -> list[job_pb2.Job]:
    """Every message of a WatchJob stream until it ends."""
    seen = []
    async for response in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=within):
        seen.append(response.job)
    return seen


async def next_job(
    stream: grpc.aio.UnaryStreamCall[pb.WatchJobRequest, pb.WatchJobResponse], within: float = 10.0
) -> job_pb2.Job:
    async with asyncio.timeout(within):
        response = await stream.read()
    assert response is not grpc.aio.EOF, "the watch ended"
    assert isinstance(response, pb.WatchJobResponse)
    return response.job


async def rest_of(
    stream: grpc.aio.UnaryStreamCall[pb.WatchJobRequest, pb.WatchJobResponse], within: float = 20.0
) -> list[job_pb2.Job]:
    """The remaining messages of a watch read with `next_job`, until it ends."""
    seen = []
    async with asyncio.timeout(within):
        while (response := await stream.read()) is not grpc.aio.EOF:
            assert isinstance(response, pb.WatchJobResponse)
            seen.append(response.job)
    return seen


async def wait_for_job(
    stub: Stub, job_id: str, states: set[job_pb2.JobState.ValueType], within: float = 10.0
) -> job_pb2.Job:
    """Polls GetJob until the job is in one of `states`."""
    started = time.monotonic()
    while True:
        job = (await stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=5.0)).job
        if job.state in states:
            return job
        assert time.monotonic() - started < within, f"job stayed {job}"
        await asyncio.sleep(0.05)


async def create_lock_table(db: asyncpg.Connection, name: str) -> None:
    """An exposed table (it has a workspace_id) that tests lock to make jobs wait."""
    await db.execute(
        f'CREATE TABLE IF NOT EXISTS "{name}" (id bigint PRIMARY KEY, workspace_id uuid NOT NULL)'
    )


@contextlib.asynccontextmanager
async def locked(db: asyncpg.Connection, table: str) -> AsyncIterator[None]:
    """Holds an ACCESS EXCLUSIVE lock on the table, so every job that touches it waits."""
    transaction = db.transaction()
    await transaction.start()
    try:
        await db.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
        yield
    finally:
        await transaction.rollback()


async def lock_waiters(db: asyncpg.Connection) -> list[int]:
    """The service's backends now waiting for a lock."""
    await db.execute("SELECT pg_stat_clear_snapshot()")
    rows = await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'raptorflow-data' AND wait_event_type = 'Lock'"
    )
    return [row["pid"] for row in rows]


async def wait_until_no_lock_waiters(db: asyncpg.Connection, within: float = 5.0) -> None:
    started = time.monotonic()
    while waiting := await lock_waiters(db):
        assert time.monotonic() - started < within, f"backends still wait for a lock: {waiting}"
        await asyncio.sleep(0.02)
