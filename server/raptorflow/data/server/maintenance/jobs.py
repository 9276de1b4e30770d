"""Jobs in the database's job history table: start, run with a lease, watch, cancel.

Where a job runs: on the replica that accepted it (StartJob, or the scheduler's
claim of a period), as the contract says. Its row names that replica from the
start, and the replica holds a lease on every job it has, QUEUED (waiting for
one of `max_running_jobs` slots) or RUNNING, renewed for all of them in one
statement every lease/3. A replica that dies stops renewing; the sweeper of
any replica (every lease/2) then marks its jobs FAILED (UNAVAILABLE,
LEASE_EXPIRED). A queued job of a dead replica fails too rather than move to
another replica: a job never runs twice, and never where nobody looks for it.
Leases are on the database's clock, so replicas' clocks need not agree.

Changes: a trigger NOTIFYs `raptorflow_jobs` with the job's id in the
transaction of every change a watcher can see (state, progress, cancel flag).
Every replica LISTENs and wakes the WatchJob streams of that job, which re-read
it, and, when it runs that job, its runner, which re-reads the cancel flag and
cancels the job's task. The lease renewal returns the same flags, so a missed
notification delays a cancel by lease/3 at most, and a LISTEN gap wakes every
watcher and re-checks every running job. So GetJob, WatchJob and CancelJob
work on any replica.

Ends: SUCCEEDED with the executor's result; FAILED with the ServiceError (or
the mapped database error) it raised, an unexpected exception being INTERNAL
and logged; CANCELLED when CancelJob asked and the job's task was cancelled
(its statements are cancelled in PostgreSQL and its transaction rolled back).
A server that stops cancels the jobs it runs and marks them, and those still
queued, FAILED (UNAVAILABLE, SERVER_STOPPING): nobody asked for them to stop,
so the schedules' success rates count them as failures. It first waits (briefly)
for submissions under way, so a job whose row commits during the stop is marked
too; no job of a stopped replica stays QUEUED or RUNNING until its lease runs
out, unless the database could not be reached meanwhile.

All bookkeeping runs on the owner's job pool (`Database.job_pool`), never on
the owner pool that the jobs themselves hold for as long as they run. That
pool's statements time out client-side after `statement_timeout` (asyncpg's
`command_timeout`), so none of them needs its own timeout argument.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import datetime
import functools
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.connections import Connection, Database
from raptorflow.data.server.db.failures import to_service_error
from raptorflow.data.server.db.values import parse_uuid
from raptorflow.data.server.errors import Code, ServiceError, invalid_argument
from raptorflow.data.server.maintenance import job_queries as sql
from raptorflow.data.server.maintenance.executor import JobExecutor
from raptorflow.data.server.maintenance.job_pages import JobPageTokens
from raptorflow.data.server.maintenance.job_progress import JobProgress
from raptorflow.data.server.tasks import cancel_and_wait
from raptorflow.data.v1 import job_pb2, maintenance_service_pb2

log = logging.getLogger(__name__)

# At most this many progress writes per second per job.
PROGRESS_INTERVAL_SECONDS = 0.25
# Jobs one replica keeps queued at most; StartJob beyond is RESOURCE_EXHAUSTED.
MAX_QUEUED_JOBS = 1000
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Finished jobs deleted per statement, and statements per sweep, when pruning.
PRUNE_BATCH = 1000
PRUNE_BATCHES_PER_SWEEP = 10
PRUNE_EVERY_SECONDS = 60.0
# How long close() waits for submissions under way and for cancelled jobs to
# record how they ended.
CLOSE_WAIT_SECONDS = 5.0

# Why this replica cancels a job's task.
_CANCEL = "cancel"  # CancelJob asked
_STOPPING = "stopping"  # the server stops
_LOST = "lost"  # the row is no longer this replica's open job (its lease ran out)
_OPEN_STATE_NAMES = frozenset({"QUEUED", "RUNNING"})


@dataclass(eq=False)
class _Run:
    """A job this replica runs in a task."""

    task: asyncio.Task[None] | None = None
    stop_reason: str = ""
    finishing: bool = False
    """Set once the outcome is known: from then on nothing cancels the task, so the
    final state is written."""


@dataclass(frozen=True)
class _Outcome:
    state: str
    result: bytes | None = None
    error: tuple[str, str, str] | None = None


@dataclass(frozen=True)
class ScheduleHistory:
    """What the job history says about one schedule."""

    runs: int
    """Finished jobs (SUCCEEDED, FAILED, CANCELLED)."""
    succeeded: int
    last_job: job_pb2.Job | None
    """The newest job, in any state."""
    last_finished_job: job_pb2.Job | None
    """The newest job that ended: the schedule's last result."""


def _server_stopping() -> ServiceError:
    return ServiceError(Code.UNAVAILABLE, "SERVER_SHUTTING_DOWN", "the server is shutting down")


def _not_found(job_id: str) -> ServiceError:
    return ServiceError(
        Code.NOT_FOUND, "JOB_NOT_FOUND", f"no job has the id {job_id}", metadata={"job_id": job_id}
    )


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


class Jobs:
    """The job table of one database, seen from one replica, which also runs jobs it accepted."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        executor: JobExecutor,
        replica_id: str,
        *,
        progress_interval: float = PROGRESS_INTERVAL_SECONDS,
    ) -> None:
        self._settings = settings
        self._database = database
        self._executor = executor
        self.replica_id = replica_id
        self._progress_interval = progress_interval
        self._lease = settings.job_lease_seconds
        self._slots = max(1, settings.max_running_jobs)
        # Also how often the LISTEN connection is checked and watchers poll anyway.
        self._keepalive = _clamp(self._lease / 3, 0.5, 5.0)
        self._pages = JobPageTokens(settings.token_key or secrets.token_bytes(32))
        self._queue: collections.deque[str] = collections.deque()
        self._runs: dict[str, _Run] = {}
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._control_ids: set[str] = set()
        self._control_all = False
        self._control_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._creating: set[asyncio.Task[job_pb2.Job | None]] = set()
        self._started = False
        self._closing = False
        self._watches_closed = False
        self._next_prune = 0.0
        self.on_end: Callable[[str, job_pb2.JobState.ValueType], None] | None = None
        """Called with (kind, final state) for each job whose end this replica records:
        the jobs it ran, queued jobs it cancelled or failed, expired leases it swept
        (so each job is counted once, by one replica). The metrics count job outcomes."""
        self.on_scheduled_end: Callable[[str, job_pb2.JobState.ValueType], None] | None = None
        """Called with (schedule name, final state) as well when such a job was started by a
        schedule, so the metrics can tell scheduled runs' success from manual ones'."""

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Starts the background work: lease renewal, expiry of dead replicas' jobs, LISTEN."""
        await self._database.open_jobs()
        self._started = True
        self._database.add_change_listener(
            sql.CHANNEL, self._on_notify, self._on_gap, keepalive=self._keepalive
        )
        self._tasks = [
            asyncio.create_task(self._renew_forever(), name="job-leases"),
            asyncio.create_task(self._sweep_forever(), name="job-sweeper"),
            asyncio.create_task(self._control_forever(), name="job-control"),
        ]

    def end_watches(self) -> None:
        """Ends every WatchJob stream with UNAVAILABLE (server shutdown); refuses new ones."""
        self._watches_closed = True
        for events in self._watchers.values():
            for event in events:
                event.set()

    async def close(self) -> None:
        """Stops running jobs (FAILED, SERVER_STOPPING) and the background work."""
        if self._closing:
            return
        self._closing = True
        self.end_watches()
        # Every job this replica holds or dispatched: a run task cancelled before its
        # first step (or before START_JOB committed) leaves its row QUEUED.
        dispatched = set(self._runs)
        for job_id, run in list(self._runs.items()):
            self._stop_run(job_id, run, _STOPPING)
        running = [run.task for run in self._runs.values() if run.task is not None]
        # Submissions under way (shielded from their callers) are awaited too: a row
        # they commit joins the queue, which is failed below.
        waited = [*running, *self._creating]
        if waited:
            _, pending = await asyncio.wait(waited, timeout=CLOSE_WAIT_SECONDS)
            for task in pending:
                log.warning("task %s did not end in time; cancelling it", task.get_name())
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        held = dispatched | set(self._queue)
        self._queue = collections.deque()
        if held and self._started:
            await self._fail_queued(held)
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(tasks)

    async def _fail_queued(self, ids: set[str]) -> None:
        """Marks those of the jobs still QUEUED here FAILED (SERVER_STOPPING)."""
        try:
            async with asyncio.timeout(CLOSE_WAIT_SECONDS):
                async with self._connection() as conn:
                    failed = await conn.fetch(
                        sql.FAIL_QUEUED, [uuid.UUID(i) for i in ids], self.replica_id
                    )
            for row in failed:
                self._ended(row["kind"], job_pb2.JOB_STATE_FAILED, row["schedule"])
        except Exception as exc:  # their leases run out instead
            log.warning("could not end %d queued jobs: %s", len(ids), _describe(exc))

    # -- requests --------------------------------------------------------------

    async def submit(
        self,
        spec: job_pb2.JobSpec,
        *,
        schedule: str = "",
        period_start: datetime.datetime | None = None,
    ) -> job_pb2.Job | None:
        """Creates a QUEUED job that this replica runs as soon as a slot is free.

        With a schedule and period, claims that period in the same transaction and
        returns None when another replica (or an earlier call) already claimed it.
        """
        if self._closing or not self._started:
            raise _server_stopping()
        kind = spec.WhichOneof("kind")
        if kind is None:
            raise invalid_argument(
                "spec", "a job spec names exactly one kind", reason="JOB_KIND_REQUIRED"
            )
        if bool(schedule) != (period_start is not None):
            raise ValueError("a scheduled job needs both its schedule and its period")
        if len(self._queue) >= MAX_QUEUED_JOBS:
            raise ServiceError(
                Code.RESOURCE_EXHAUSTED,
                "JOB_QUEUE_FULL",
                f"this server already holds {MAX_QUEUED_JOBS} queued jobs; retry later",
            )
        # Shielded: once the row is committed, the job must reach the queue (and so
        # its lease renewals) even if the caller goes away meanwhile. close() waits
        # for it, and cancels it (its transaction rolls back) only past its bound.
        task = asyncio.create_task(
            self._create(spec, kind, schedule, period_start), name="job-create"
        )
        self._creating.add(task)
        task.add_done_callback(self._creating.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                raise _server_stopping() from None  # close() gave up on it, not our caller
            raise

    async def _create(
        self,
        spec: job_pb2.JobSpec,
        kind: str,
        schedule: str,
        period_start: datetime.datetime | None,
    ) -> job_pb2.Job | None:
        job_id = uuid.uuid4()
        async with self._connection() as conn:
            async with conn.transaction():
                if schedule:
                    claimed = await conn.fetchval(
                        sql.CLAIM_PERIOD, schedule, period_start, job_id, self.replica_id
                    )
                    if claimed is None:
                        return None
                row = await conn.fetchrow(
                    sql.INSERT_JOB,
                    job_id,
                    kind,
                    spec.SerializeToString(deterministic=True),
                    schedule,
                    period_start,
                    self.replica_id,
                    self._lease,
                )
            assert row is not None
            # Queued once committed (never before: START_JOB would not see the row)
            # and before the connection's release, an await: close() then finds it
            # in the queue, however late it stops us.
            self._queue.append(str(job_id))
        self._dispatch()
        return sql.job_from_row(row)

    async def check(self, spec: job_pb2.JobSpec) -> None:
        """Raises ServiceError if the spec could not run (the executor's check)."""
        await self._executor.check(spec)

    async def get(self, job_id: str) -> job_pb2.Job:
        """The job; NOT_FOUND if no job has the id."""
        key = parse_uuid(job_id, "job_id")
        async with self._connection() as conn:
            row = await conn.fetchrow(sql.GET_JOB, key)
        if row is None:
            raise _not_found(str(key))
        return sql.job_from_row(row)

    async def list(
        self, request: maintenance_service_pb2.ListJobsRequest
    ) -> maintenance_service_pb2.ListJobsResponse:
        """Jobs newest first, filtered by state and schedule, one page at a time."""
        if request.page_size < 0:
            raise invalid_argument("page_size", "must not be negative")
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        for state in request.states:
            if state not in sql.STATE_NAMES:
                raise invalid_argument("states", f"not a job state: {state}")
        states = sorted({sql.STATE_NAMES[s] for s in request.states}) or None
        after: tuple[Any, Any] = (None, None)
        if request.page_token:
            after = self._pages.verify(request)
        async with self._connection() as conn:
            rows = await conn.fetch(
                sql.LIST_JOBS,
                states,
                request.schedule,
                *after,
                page_size + 1,
            )
        response = maintenance_service_pb2.ListJobsResponse(
            jobs=[sql.job_from_row(row) for row in rows[:page_size]]
        )
        if len(rows) > page_size:
            last = rows[page_size - 1]
            response.next_page_token = self._pages.issue(request, last["created_at"], last["id"])
        return response

    async def watch(self, job_id: str) -> AsyncIterator[job_pb2.Job]:
        """The job now, then every change of it, until (and including) its final state."""
        key = str(parse_uuid(job_id, "job_id"))
        self._check_watchable()
        woken = asyncio.Event()
        self._watchers.setdefault(key, set()).add(woken)
        try:
            job = await self.get(key)
            yield job
            sent = job.SerializeToString(deterministic=True)
            while job.state in sql.OPEN_STATES:
                # Woken by the job's NOTIFY or a LISTEN gap; the poll covers a
                # notification lost without a gap being noticed.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._keepalive):
                        await woken.wait()
                self._check_watchable()
                woken.clear()
                job = await self.get(key)
                latest = job.SerializeToString(deterministic=True)
                if latest != sent:
                    sent = latest
                    yield job
        finally:
            watchers = self._watchers.get(key)
            if watchers is not None:
                watchers.discard(woken)
                if not watchers:
                    del self._watchers[key]

    async def cancel(self, job_id: str) -> job_pb2.Job:
        """Records the cancellation (a queued job ends at once); an ended job is unchanged."""
        key = parse_uuid(job_id, "job_id")
        async with self._connection() as conn:
            row = await conn.fetchrow(sql.CANCEL_JOB, key)
            # Only a job that was queued comes back from CANCEL_JOB already CANCELLED.
            ended_here = row is not None and row["state"] == "CANCELLED"
            if row is None:
                row = await conn.fetchrow(sql.GET_JOB, key)
        if row is None:
            raise _not_found(str(key))
        job = sql.job_from_row(row)
        if ended_here:
            self._ended(job.spec.WhichOneof("kind") or "", job.state, job.schedule)
        # A job this replica runs stops at once, without waiting for its NOTIFY.
        run = self._runs.get(job.job_id)
        if run is not None and job.cancel_requested:
            self._stop_run(job.job_id, run, _CANCEL)
        return job

    async def schedule_history(self, names: Sequence[str]) -> dict[str, ScheduleHistory]:
        """Finished and successful runs and the latest job (and latest finished job) of each
        named schedule."""
        async with self._connection() as conn:
            counts = await conn.fetch(sql.SCHEDULE_COUNTS, list(names))
            latest = await conn.fetch(sql.LATEST_SCHEDULED_JOBS, list(names))
            finished = await conn.fetch(sql.LATEST_FINISHED_SCHEDULED_JOBS, list(names))
        last_jobs = {row["schedule"]: sql.job_from_row(row) for row in latest}
        last_finished = {row["schedule"]: sql.job_from_row(row) for row in finished}
        by_name = {row["schedule"]: row for row in counts}
        history = {}
        for name in names:
            row = by_name.get(name)
            history[name] = ScheduleHistory(
                runs=row["runs"] if row else 0,
                succeeded=row["succeeded"] if row else 0,
                last_job=last_jobs.get(name),
                last_finished_job=last_finished.get(name),
            )
        return history

    # -- running jobs ------------------------------------------------------------

    def _dispatch(self) -> None:
        """Starts queued jobs while slots are free."""
        while self._queue and len(self._runs) < self._slots and not self._closing:
            job_id = self._queue.popleft()
            run = _Run()
            self._runs[job_id] = run
            run.task = asyncio.create_task(self._run(job_id, run), name=f"job-{job_id}")
            run.task.add_done_callback(functools.partial(self._ran, job_id))

    def _ran(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._runs.pop(job_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("job %s ended abnormally", job_id, exc_info=task.exception())
        self._dispatch()

    def _stop_run(self, job_id: str, run: _Run, reason: str) -> None:
        if run.finishing or run.stop_reason or run.task is None or run.task.done():
            return
        log.info("stopping job %s (%s)", job_id, reason)
        run.stop_reason = reason
        run.task.cancel()

    async def _run(self, job_id: str, run: _Run) -> None:
        progress = JobProgress(
            functools.partial(self._write_progress, job_id), self._progress_interval
        )
        writer: asyncio.Task[None] | None = None
        started = False
        try:
            async with self._connection() as conn:
                spec_bytes = await conn.fetchval(
                    sql.START_JOB,
                    uuid.UUID(job_id),
                    self.replica_id,
                    self._lease,
                )
            if spec_bytes is None:
                return  # cancelled while queued, or its lease ran out
            started = True
            spec = job_pb2.JobSpec.FromString(spec_bytes)
            log.info("job %s started: %s", job_id, spec.WhichOneof("kind"))
            writer = asyncio.create_task(progress.write_forever(), name=f"job-progress-{job_id}")
            result = await self._executor.run(spec, progress)
            outcome = _Outcome("SUCCEEDED", result=result.SerializeToString(deterministic=True))
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            outcome = self._stopped(run, started=started)
        except Exception as exc:
            if run.stop_reason:
                # The cancellation surfaced as another error; it is still why the job ended.
                outcome = self._stopped(run, started=started)
            else:
                error = to_service_error(exc)
                outcome = _Outcome("FAILED", error=(error.code.value, error.reason, error.message))
        run.finishing = True
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        await self._finish(job_id, outcome, progress.latest)

    def _stopped(self, run: _Run, *, started: bool) -> _Outcome:
        if run.stop_reason == _CANCEL:
            return _Outcome("CANCELLED", error=("CANCELLED", "CANCELLED", "cancelled by CancelJob"))
        if run.stop_reason == _LOST:
            return _Outcome(
                "FAILED",
                error=(
                    "UNAVAILABLE",
                    "LEASE_EXPIRED",
                    f"replica {self.replica_id} lost the lease of the job",
                ),
            )
        return _Outcome(
            "FAILED",
            error=(
                "UNAVAILABLE",
                "SERVER_STOPPING",
                f"replica {self.replica_id} stopped "
                + ("while the job ran" if started else "before the job could start"),
            ),
        )

    async def _write_progress(self, job_id: str, progress: job_pb2.JobProgress) -> None:
        async with self._connection() as conn:
            await conn.execute(
                sql.REPORT_PROGRESS,
                uuid.UUID(job_id),
                progress.phase,
                progress.done,
                progress.total,
                progress.unit,
            )

    async def _finish(self, job_id: str, outcome: _Outcome, progress: job_pb2.JobProgress) -> None:
        """Records how the job ended, retrying while the database is briefly away."""
        code, reason, message = outcome.error or (None, None, None)
        give_up_at = time.monotonic() + (CLOSE_WAIT_SECONDS if self._closing else self._lease)
        delay = 0.1
        while True:
            try:
                async with self._connection() as conn:
                    ended = await conn.fetchrow(
                        sql.FINISH_JOB,
                        uuid.UUID(job_id),
                        self.replica_id,
                        outcome.state,
                        outcome.result,
                        code,
                        reason,
                        message,
                        progress.phase,
                        progress.done,
                        progress.total,
                        progress.unit,
                    )
                if ended is not None:
                    log.info(
                        "job %s ended %s%s", job_id, outcome.state, f" ({reason})" if reason else ""
                    )
                    self._ended(ended["kind"], sql.STATES_BY_NAME[outcome.state], ended["schedule"])
                return
            except Exception as exc:
                if time.monotonic() + delay > give_up_at:
                    log.error(
                        "could not record that job %s ended %s (%s); its lease will expire",
                        job_id,
                        outcome.state,
                        _describe(exc),
                    )
                    return
                log.warning("could not record the end of job %s yet: %s", job_id, _describe(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # -- notifications, leases, sweeping -------------------------------------------

    def _on_notify(self, payload: str) -> None:
        for event in self._watchers.get(payload, ()):
            event.set()
        if payload in self._runs:
            self._control_ids.add(payload)
            self._control_wake.set()

    def _on_gap(self) -> None:
        for events in self._watchers.values():
            for event in events:
                event.set()
        self._control_all = True
        self._control_wake.set()

    async def _control_forever(self) -> None:
        """Cancels the tasks of jobs whose cancel flag was set (or that are no longer ours)."""
        while True:
            await self._control_wake.wait()
            self._control_wake.clear()
            ids = set(self._runs) if self._control_all else self._control_ids & set(self._runs)
            self._control_all = False
            self._control_ids.clear()
            if not ids:
                continue
            try:
                async with self._connection() as conn:
                    rows = await conn.fetch(
                        sql.CONTROL_READ,
                        [uuid.UUID(i) for i in ids],
                    )
            except Exception as exc:  # the next lease renewal reads the same flags
                log.warning("could not read the cancel flags of jobs: %s", _describe(exc))
                continue
            self._apply_control(ids, rows)

    def _apply_control(self, ids: Iterable[str], rows: Iterable[asyncpg.Record]) -> None:
        found = {str(row["id"]): row for row in rows}
        for job_id in ids:
            run = self._runs.get(job_id)
            if run is None:
                continue
            row = found.get(job_id)
            ours = row is not None and row["replica"] == self.replica_id
            if row is None or not ours or row["state"] not in _OPEN_STATE_NAMES:
                self._stop_run(job_id, run, _LOST)
            elif row["cancel_requested"]:
                self._stop_run(job_id, run, _CANCEL)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            try:
                await self.renew_leases()
            except Exception as exc:  # retried next round; the lease outlasts two misses
                log.warning("could not renew job leases: %s", _describe(exc))

    async def renew_leases(self) -> None:
        """Extends the lease of every job this replica holds; stops those taken from it."""
        held = {*self._queue, *self._runs}
        if not held:
            return
        async with self._connection() as conn:
            rows = await conn.fetch(
                sql.RENEW_LEASES,
                [uuid.UUID(i) for i in held],
                self.replica_id,
                self._lease,
            )
        renewed = {str(row["id"]) for row in rows}
        # Queued jobs cancelled (or expired) meanwhile leave the queue.
        if any(i not in renewed for i in self._queue if i in held):
            self._queue = collections.deque(i for i in self._queue if i in renewed or i not in held)
        self._apply_control(held, rows)

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception as exc:  # the next sweep tries again
                log.warning("could not sweep the job table: %s", _describe(exc))
            await asyncio.sleep(_clamp(self._lease / 2, 0.2, 30.0))

    async def sweep(self, *, prune: bool | None = None) -> builtins.list[str]:
        """Marks open jobs whose lease ran out FAILED; the expired ids. Also prunes the
        history when `prune` says so (None: once a minute)."""
        async with self._connection() as conn:
            expired = await conn.fetch(sql.EXPIRE_LEASES)
            for row in expired:
                log.warning(
                    "job %s: the lease of replica %s ran out; marked FAILED",
                    row["id"],
                    row["replica"],
                )
                self._ended(row["kind"], job_pb2.JOB_STATE_FAILED, row["schedule"])
            if prune or (prune is None and time.monotonic() >= self._next_prune):
                await self._prune(conn)
                self._next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
        return [str(row["id"]) for row in expired]

    async def _prune(self, conn: Connection) -> None:
        history = self._settings.job_history_seconds
        for _ in range(PRUNE_BATCHES_PER_SWEEP):
            status = await conn.execute(sql.PRUNE_JOBS, history, PRUNE_BATCH)
            if int(status.split()[-1]) < PRUNE_BATCH:
                break
        await conn.execute(sql.PRUNE_CLAIMS, history)

    # -- plumbing ------------------------------------------------------------------

    def _ended(self, kind: str, state: job_pb2.JobState.ValueType, schedule: str) -> None:
        try:  # a metrics hook never breaks a job
            if self.on_end is not None:
                self.on_end(kind, state)
            if schedule and self.on_scheduled_end is not None:
                self.on_scheduled_end(schedule, state)
        except Exception:
            log.exception("the job end hook failed")

    def _check_watchable(self) -> None:
        if self._watches_closed or self._closing:
            raise _server_stopping()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """A job-pool connection, waited for at most the acquire timeout."""
        pool = self._database.job_pool
        try:
            conn = await pool.acquire(timeout=self._settings.acquire_timeout)
        except TimeoutError:
            if pool.get_size() < pool.get_max_size():
                raise ServiceError(
                    Code.UNAVAILABLE, "DATABASE_UNAVAILABLE", "the database cannot be reached"
                ) from None
            raise ServiceError(
                Code.RESOURCE_EXHAUSTED,
                "POOL_EXHAUSTED",
                f"no job-table connection became free within {self._settings.acquire_timeout:g} s",
            ) from None
        try:
            yield conn
        finally:
            # The timeout is explicit because asyncpg would otherwise reuse the acquire
            # timeout and, past it, drop a connection whose cancelled statement it was
            # still waiting for without cancelling that statement: a START_JOB or
            # FINISH_JOB could then commit in PostgreSQL after the runner gave up on it
            # (see Database.connection). The pool's command_timeout (statement_timeout)
            # bounds the wait anyway; connect_timeout covers the cancel request.
            release_timeout = self._settings.statement_timeout + self._settings.connect_timeout
            await pool.release(conn, timeout=release_timeout)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
