"""Scheduled jobs from configuration: each period runs once across all replicas.

Every replica runs the same loop: on each tick, for each schedule whose latest
period has begun and was not yet seen claimed here, it submits the job with
that period (`Jobs.submit(..., schedule=, period_start=)`). The submission
inserts the claim row (unique per schedule and period) and the job in one
transaction, so exactly one replica gets each period, whatever their number and
however their ticks interleave; the others learn the period is taken and move
on. Only the latest period runs: a replica that was down (or a schedule that
was added) does not run the periods it missed, just the one under way.

A period's job runs even if the previous period's job is still running; jobs
beyond `max_running_jobs` wait queued on the replica that claimed them.

The clock is injectable (`Scheduler(..., clock=)`), and `run_due()` is one
tick, so tests drive cron schedules through days of fake time at once.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable

from raptorflow.data.server.config import Settings
from raptorflow.data.server.maintenance.jobs import Jobs
from raptorflow.data.server.maintenance.schedule_config import (
    ScheduleConfig,
    ScheduleConfigError,
    load_schedules,
)
from raptorflow.data.server.tasks import cancel_and_wait
from raptorflow.data.v1 import job_pb2

log = logging.getLogger(__name__)

Clock = Callable[[], datetime.datetime]
# The longest pause between two ticks; short interval schedules tick faster.
MAX_TICK_SECONDS = 1.0


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Scheduler:
    """Starts each configured schedule's job when its period comes, claiming the period first."""

    def __init__(self, settings: Settings, jobs: Jobs, *, clock: Clock = utc_now) -> None:
        """Reads the schedules; SystemExit (with the reason) if the setting is unusable."""
        self._settings = settings
        self._jobs = jobs
        self._clock = clock
        try:
            self.schedules: list[ScheduleConfig] = load_schedules(settings.schedules)
        except ScheduleConfigError as exc:
            raise SystemExit(f"invalid RAPTORFLOW_SCHEDULES: {exc}") from exc
        intervals = [s.interval_seconds for s in self.schedules if not s.cron]
        self._tick_seconds = min([MAX_TICK_SECONDS, *(i / 4 for i in intervals)])
        # The latest period of each schedule known to be claimed (here or elsewhere).
        self._claimed: dict[str, datetime.datetime] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Starts the scheduling loop (no-op without schedules)."""
        if self.schedules and self._task is None:
            names = ", ".join(s.name for s in self.schedules)
            log.info("scheduling %d jobs: %s", len(self.schedules), names)
            for schedule in self.schedules:
                try:
                    await self._jobs.check(schedule.spec)
                except Exception as exc:
                    # Not fatal (a table may come later), but every run would fail: say so now.
                    log.error(
                        "schedule %s: its job cannot run as configured: %s", schedule.name, exc
                    )
            self._task = asyncio.create_task(self._run_forever(), name="scheduler")

    async def close(self) -> None:
        """Stops the scheduling loop; jobs already started keep running under Jobs."""
        task, self._task = self._task, None
        await cancel_and_wait([task])

    async def _run_forever(self) -> None:
        while True:
            await self.run_due()
            await asyncio.sleep(self._tick_seconds)

    async def run_due(self) -> list[job_pb2.Job]:
        """One tick: submits every schedule's due period not yet claimed; the jobs this
        replica claimed. A schedule whose submission fails is tried again next tick."""
        now = self._clock()
        started = []
        for schedule in self.schedules:
            period = schedule.latest_period(now)
            known = self._claimed.get(schedule.name)
            if period is None or (known is not None and period <= known):
                continue
            try:
                job = await self._jobs.submit(
                    schedule.spec, schedule=schedule.name, period_start=period
                )
            except Exception as exc:  # the database may be away; the next tick retries
                log.warning(
                    "schedule %s: could not start the run of %s: %s",
                    schedule.name,
                    period.isoformat(),
                    str(exc) or type(exc).__name__,
                )
                continue
            self._claimed[schedule.name] = period
            if job is not None:
                log.info(
                    "schedule %s: started job %s for %s",
                    schedule.name,
                    job.job_id,
                    period.isoformat(),
                )
                started.append(job)
        return started

    async def list(self) -> list[job_pb2.Schedule]:
        """Every configured schedule, sorted by name, with its next run, latest job, last
        result and success rate."""
        if not self.schedules:
            return []
        history = await self._jobs.schedule_history([s.name for s in self.schedules])
        now = self._clock()
        listed = []
        for config in sorted(self.schedules, key=lambda s: s.name):
            seen = history[config.name]
            schedule = job_pb2.Schedule(
                name=config.name,
                spec=config.spec,
                cron=config.cron,
                interval_seconds=config.interval_seconds,
                run_count=seen.runs,
                success_count=seen.succeeded,
                success_rate=seen.succeeded / seen.runs if seen.runs else 1.0,
            )
            # None (left unset) rather than an error past datetime's year 9999, so one
            # schedule never fails or empties the whole list; start-up refuses a schedule
            # that has no next run now.
            next_run = config.next_run(now)
            if next_run is not None:
                schedule.next_run_time.FromDatetime(next_run)
            if seen.last_job is not None:
                schedule.last_job.CopyFrom(seen.last_job)
            if seen.last_finished_job is not None:
                schedule.last_finished_job.CopyFrom(seen.last_finished_job)
            listed.append(schedule)
        return listed
