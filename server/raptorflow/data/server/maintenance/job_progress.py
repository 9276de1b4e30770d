"""A running job's progress: reports are kept in memory and written to the job row, coalesced.

A job may report thousands of times a second (one call per COPY chunk); the row
is written at most once per `interval`, always with the latest report, by a
writer task of the job's own. A report never waits for the database, so a slow
or unreachable database slows no job, and the last report is never lost: the
job's final state is written with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from raptorflow.data.v1 import job_pb2

log = logging.getLogger(__name__)

_MAX_PHASE_CHARS = 200
_INT64_MAX = 2**63 - 1


def _count(value: int) -> int:
    return min(max(int(value), 0), _INT64_MAX)


class JobProgress:
    """Implements `maintenance.progress.Progress` for one running job."""

    def __init__(
        self, write: Callable[[job_pb2.JobProgress], Awaitable[None]], interval: float
    ) -> None:
        self._write = write
        self._interval = interval
        self._changed = asyncio.Event()
        self.latest = job_pb2.JobProgress()
        """The latest report, written or not."""
        self.writes = 0
        """Rows written so far (tests check the coalescing)."""

    async def report(
        self,
        phase: str,
        *,
        done: int = 0,
        total: int = 0,
        unit: job_pb2.ProgressUnit.ValueType = job_pb2.PROGRESS_UNIT_UNSPECIFIED,
    ) -> None:
        self.latest = job_pb2.JobProgress(
            phase=phase[:_MAX_PHASE_CHARS], done=_count(done), total=_count(total), unit=unit
        )
        self._changed.set()

    async def write_forever(self) -> None:
        """Writes each new report, then rests `interval`; runs until cancelled."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self._write(self.latest)
                self.writes += 1
            except Exception as exc:  # tried again after the rest (the final state has it too)
                log.warning("could not write job progress: %s", exc or type(exc).__name__)
                self._changed.set()
            await asyncio.sleep(self._interval)
