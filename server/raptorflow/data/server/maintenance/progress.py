"""How a running job reports progress; the job runner supplies the implementation."""

from __future__ import annotations

from typing import Protocol

from raptorflow.data.v1 import job_pb2


class Progress(Protocol):
    """Receives a running job's progress. Calls are cheap: the runner coalesces writes."""

    async def report(
        self,
        phase: str,
        *,
        done: int = 0,
        total: int = 0,
        unit: job_pb2.ProgressUnit.ValueType = job_pb2.PROGRESS_UNIT_UNSPECIFIED,
    ) -> None:
        """Records that the job is at `phase`, `done` of `total` units (0 when unknown)."""
        ...
