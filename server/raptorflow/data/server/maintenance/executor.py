"""Runs one JobSpec by handing it to the module for its kind.

`check` runs before a job is created, so StartJob answers bad input with
INVALID_ARGUMENT at once instead of a job that fails later.
"""

from __future__ import annotations

from raptorflow.data.server.errors import invalid_argument
from raptorflow.data.server.maintenance.backup import Backups
from raptorflow.data.server.maintenance.operations import Operations
from raptorflow.data.server.maintenance.progress import Progress
from raptorflow.data.v1 import job_pb2


class JobExecutor:
    """Checks and runs job specs of every kind."""

    def __init__(self, operations: Operations, backups: Backups) -> None:
        self._operations = operations
        self._backups = backups

    async def check(self, spec: job_pb2.JobSpec) -> None:
        """Raises ServiceError (INVALID_ARGUMENT, ...) for a spec that cannot run."""
        kind = spec.WhichOneof("kind")
        if kind is None:
            raise invalid_argument(
                "spec", "a job spec names exactly one kind", reason="JOB_KIND_REQUIRED"
            )
        if kind == "backup_to_file":
            await self._backups.check_backup_file(spec.backup_to_file, "spec.backup_to_file")
        elif kind == "restore_from_file":
            await self._backups.check_restore_file(spec.restore_from_file, "spec.restore_from_file")
        else:
            await self._operations.check(spec)

    async def run(self, spec: job_pb2.JobSpec, progress: Progress) -> job_pb2.JobResult:
        """Runs the job to its end; raises ServiceError on failure, CancelledError if cancelled."""
        kind = spec.WhichOneof("kind")
        if kind == "backup_to_file":
            return await self._backups.backup_to_file(spec.backup_to_file, progress)
        if kind == "restore_from_file":
            return await self._backups.restore_from_file(spec.restore_from_file, progress)
        return await self._operations.run(spec, progress)
