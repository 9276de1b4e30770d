"""MaintenanceService: backups, restores and jobs, kept thin.

ExportBackup and RestoreBackup hand over to `maintenance.backup.Backups`; the
job RPCs to `maintenance.jobs.Jobs` (after `maintenance.executor.JobExecutor`
has checked the spec), ListSchedules to `maintenance.schedules.Scheduler`.
Errors are mapped by `@rpc_errors` / `@stream_errors`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from raptorflow.data.server.db.connections import Deadline
from raptorflow.data.server.db.values import parse_uuid
from raptorflow.data.server.maintenance.backup import Backups
from raptorflow.data.server.maintenance.executor import JobExecutor
from raptorflow.data.server.maintenance.jobs import Jobs
from raptorflow.data.server.maintenance.schedules import Scheduler
from raptorflow.data.server.services.status import rpc_errors, stream_errors
from raptorflow.data.v1 import maintenance_service_pb2, maintenance_service_pb2_grpc

pb = maintenance_service_pb2
Context = grpc.aio.ServicerContext[Any, Any]


class MaintenanceServicer(maintenance_service_pb2_grpc.MaintenanceServiceServicer):
    """Serves raptorflow.data.v1.MaintenanceService."""

    def __init__(
        self, backups: Backups, executor: JobExecutor, jobs: Jobs, scheduler: Scheduler
    ) -> None:
        self._backups = backups
        self._executor = executor
        self._jobs = jobs
        self._scheduler = scheduler

    @stream_errors
    async def ExportBackup(
        self, request: pb.ExportBackupRequest, context: Context
    ) -> AsyncIterator[pb.ExportBackupResponse]:
        # Closed with this generator (stream_errors closes it when the call ends), so the
        # export's COPY ends and its connection goes back at once.
        messages = self._backups.export(request, Deadline.after(context.time_remaining()))
        async with contextlib.aclosing(messages):
            async for response in messages:
                yield response

    @rpc_errors
    async def RestoreBackup(
        self, request_iterator: AsyncIterator[pb.RestoreBackupRequest], context: Context
    ) -> pb.RestoreBackupResponse:
        return await self._backups.restore(
            request_iterator, Deadline.after(context.time_remaining())
        )

    @rpc_errors
    async def StartJob(self, request: pb.StartJobRequest, context: Context) -> pb.StartJobResponse:
        await self._executor.check(request.spec)
        job = await self._jobs.submit(request.spec)
        assert job is not None  # only scheduled submissions can lose a claim
        return pb.StartJobResponse(job=job)

    @rpc_errors
    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.GetJobResponse:
        parse_uuid(request.job_id, "job_id")
        return pb.GetJobResponse(job=await self._jobs.get(request.job_id))

    @rpc_errors
    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        return await self._jobs.list(request)

    @stream_errors
    async def WatchJob(
        self, request: pb.WatchJobRequest, context: Context
    ) -> AsyncIterator[pb.WatchJobResponse]:
        parse_uuid(request.job_id, "job_id")
        async for job in self._jobs.watch(request.job_id):
            yield pb.WatchJobResponse(job=job)

    @rpc_errors
    async def CancelJob(
        self, request: pb.CancelJobRequest, context: Context
    ) -> pb.CancelJobResponse:
        parse_uuid(request.job_id, "job_id")
        return pb.CancelJobResponse(job=await self._jobs.cancel(request.job_id))

    @rpc_errors
    async def ListSchedules(
        self, request: pb.ListSchedulesRequest, context: Context
    ) -> pb.ListSchedulesResponse:
        return pb.ListSchedulesResponse(schedules=await self._scheduler.list())
