"""The job runtime itself (maintenance/jobs.py) with a scripted executor: progress coalescing,
error mapping, slots, leases, claims, LISTEN gaps and pruning, against the real job table.

Each test starts `Jobs` of its own (its own replica id, job pool and LISTEN
connection) on the session database; the module server only applied migrations
and, for the cross-replica tests, is the other replica.
"""

from __future__ import annotations

import asyncio
import datetime
import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from job_helpers import FINAL_STATES, ScriptedExecutor, job_runtime, scripted
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.server.maintenance.job_progress import JobProgress
from raptorflow.data.server.maintenance.jobs import PROGRESS_INTERVAL_SECONDS, Jobs
from raptorflow.data.v1 import job_pb2

from harness.tcp_proxy import TcpProxy

QUEUED, RUNNING = job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING
SUCCEEDED, FAILED, CANCELLED = (
    job_pb2.JOB_STATE_SUCCEEDED,
    job_pb2.JOB_STATE_FAILED,
    job_pb2.JOB_STATE_CANCELLED,
)


async def until(
    jobs: Jobs, job_id: str, done: Callable[[job_pb2.Job], bool], within: float = 10.0
) -> job_pb2.Job:
    started = time.monotonic()
    while not done(job := await jobs.get(job_id)):
        assert time.monotonic() - started < within, f"job stayed {job}"
        await asyncio.sleep(0.02)
    return job


def in_state(*states: job_pb2.JobState.ValueType) -> Callable[[job_pb2.Job], bool]:
    return lambda job: job.state in states


async def ended(jobs: Jobs, job_id: str, within: float = 10.0) -> job_pb2.Job:
    return await until(jobs, job_id, lambda job: job.state in FINAL_STATES, within)


async def submitted(jobs: Jobs, spec: job_pb2.JobSpec, **claim: Any) -> job_pb2.Job:
    """The job `jobs.submit` created (it returns None only for a period already claimed)."""
    job = await jobs.submit(spec, **claim)
    assert job is not None
    return job


async def expire_lease(db: asyncpg.Connection, job_id: str) -> None:
    """Makes the job's lease run out now, so the next sweep of any replica fails it."""
    await db.execute(
        "UPDATE raptorflow_data.jobs SET lease_expires_at = now() - interval '1 second'"
        " WHERE id = $1",
        uuid.UUID(job_id),
    )


async def test_progress_is_coalesced_and_streamed(
    server: RunningServer, settings: Settings
) -> None:
    executor = ScriptedExecutor()
    async with job_runtime(settings, executor) as jobs:
        started = time.monotonic()
        job = await submitted(jobs, scripted("progress 5000 25"))
        seen = [j async for j in jobs.watch(job.job_id)]
        elapsed = time.monotonic() - started
    final = seen[-1]
    assert final.state == SUCCEEDED
    assert (final.progress.phase, final.progress.done, final.progress.total) == ("copy", 5000, 5000)
    assert final.progress.unit == job_pb2.PROGRESS_UNIT_ROWS
    running = [j.progress.done for j in seen if j.state == RUNNING]
    assert len(running) >= 2, "the watch saw the job move while it ran"
    assert running == sorted(running)
    assert 0 < running[-1] <= 5000
    # 5,000 reports, but at most one row write per interval (plus the first).
    (progress,) = executor.progress
    assert isinstance(progress, JobProgress)
    assert 2 <= progress.writes <= elapsed / PROGRESS_INTERVAL_SECONDS + 2


@pytest.mark.parametrize(
    ("command", "code", "reason"),
    [
        ("fail", "FAILED_PRECONDITION", "TABLE_CHANGED"),
        ("privilege", "FAILED_PRECONDITION", "INSUFFICIENT_PRIVILEGE"),
        ("crash", "INTERNAL", "INTERNAL"),
    ],
)
async def test_failures_keep_a_defined_error(
    server: RunningServer, settings: Settings, command: str, code: str, reason: str
) -> None:
    async with job_runtime(settings) as jobs:
        job = await submitted(jobs, scripted(command))
        final = await ended(jobs, job.job_id)
    assert final.state == FAILED
    assert (final.error.code, final.error.reason) == (code, reason)
    assert final.error.message
    assert "a bug" not in final.error.message, "an unexpected error's text stays in the log"
    assert not final.result.tables


async def test_jobs_beyond_the_slots_wait_queued(server: RunningServer, settings: Settings) -> None:
    executor = ScriptedExecutor()
    async with job_runtime(settings, executor, max_running_jobs=2) as jobs:
        submitted = [await jobs.submit(scripted("block")) for _ in range(4)]
        ids = [job.job_id for job in submitted if job is not None]
        assert all(job.state == QUEUED for job in submitted if job is not None)
        first, second = [await until(jobs, i, in_state(RUNNING)) for i in ids[:2]]
        assert first.replica == second.replica == jobs.replica_id
        await asyncio.sleep(0.2)
        assert [(await jobs.get(i)).state for i in ids[2:]] == [QUEUED, QUEUED]
        assert executor.started == ["block", "block"]
        executor.release.set()
        finals = [await ended(jobs, i) for i in ids]
    assert [j.state for j in finals] == [SUCCEEDED] * 4
    # Queued jobs start only after running ones end.
    assert min(j.start_time.ToDatetime() for j in finals[2:]) >= min(
        j.end_time.ToDatetime() for j in finals[:2]
    )


async def test_a_renewed_lease_outlives_its_length(
    server: RunningServer, settings: Settings
) -> None:
    # Renewed every 0.67 s: only a stall of the loop over 1.3 s could let it run out.
    async with job_runtime(settings, job_lease_seconds=2.0) as jobs:
        job = await submitted(jobs, scripted("sleep 4.5"))
        # The runtime's own sweeper runs every second meanwhile; nothing expires.
        final = await ended(jobs, job.job_id)
    assert final.state == SUCCEEDED


async def test_a_job_whose_lease_was_taken_stops_and_stays_failed(
    server: RunningServer, settings: Settings, db: asyncpg.Connection
) -> None:
    executor = ScriptedExecutor()
    async with job_runtime(settings, executor) as jobs:
        job = await submitted(jobs, scripted("block"))
        await until(jobs, job.job_id, in_state(RUNNING))
        # As if this replica had been cut off for a whole lease: another replica expires it.
        await expire_lease(db, job.job_id)
        await server.maintenance.jobs.sweep()
        failed = await until(jobs, job.job_id, in_state(FAILED))
        # The runner hears of it (NOTIFY) and cancels the job's task.
        async with asyncio.timeout(5.0):
            await executor.cancel_seen.wait()
        assert executor.cancelled == ["block"]
        await asyncio.sleep(0.1)
        assert await jobs.get(job.job_id) == failed
    assert failed.state == FAILED
    assert (failed.error.code, failed.error.reason) == ("UNAVAILABLE", "LEASE_EXPIRED")
    assert jobs.replica_id in failed.error.message


async def test_a_period_is_claimed_once_with_its_job(
    server: RunningServer, settings: Settings, db: asyncpg.Connection
) -> None:
    period = datetime.datetime(2030, 1, 1, 12, 5, tzinfo=datetime.UTC)
    name = f"claim-{uuid.uuid4().hex[:8]}"
    async with job_runtime(settings) as first, job_runtime(settings) as second:
        results = await asyncio.gather(
            *(
                jobs.submit(scripted("succeed"), schedule=name, period_start=period)
                for jobs in (first, second, first, second)
            )
        )
        created = [job for job in results if job is not None]
        assert len(created) == 1
        (job,) = created
        assert job.schedule == name
        await ended(first, job.job_id)
    claims = await db.fetch(
        "SELECT period_start, job_id, replica FROM raptorflow_data.schedule_claims"
        " WHERE schedule = $1",
        name,
    )
    assert [(r["period_start"], str(r["job_id"]), r["replica"]) for r in claims] == [
        (period, job.job_id, job.replica)
    ]
    rows = await db.fetch(
        "SELECT id, period_start FROM raptorflow_data.jobs WHERE schedule = $1", name
    )
    assert [(str(r["id"]), r["period_start"]) for r in rows] == [(job.job_id, period)]


async def test_watch_survives_a_lost_listen_connection(
    server: RunningServer, settings: Settings, db: asyncpg.Connection
) -> None:
    executor = ScriptedExecutor()
    async with job_runtime(settings, executor) as jobs:
        job = await submitted(jobs, scripted("block"))
        watch = jobs.watch(job.job_id)
        try:
            while (await anext(watch)).progress.phase != "blocked":
                pass
            # Every LISTEN connection on the job channel goes, this runtime's among them.
            killed = await db.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'LISTEN%raptorflow_jobs%'"
            )
            assert killed >= 1
            executor.release.set()
            async with asyncio.timeout(4.0):
                final = await anext(watch)
                while final.state not in FINAL_STATES:
                    final = await anext(watch)
        finally:
            await watch.aclose()
    assert final.state == SUCCEEDED


async def test_sweep_prunes_finished_history_but_keeps_each_schedules_latest_claim(
    server: RunningServer, settings: Settings, db: asyncpg.Connection
) -> None:
    name = f"prune-{uuid.uuid4().hex[:8]}"
    periods = [datetime.datetime(2030, 1, 1, 12, m, tzinfo=datetime.UTC) for m in (0, 5)]
    async with job_runtime(settings, job_history_seconds=0.5) as jobs:
        ids = []
        for period in periods:
            job = await submitted(jobs, scripted("succeed"), schedule=name, period_start=period)
            ids.append(job.job_id)
            await ended(jobs, job.job_id)
        blocked = await submitted(jobs, scripted("sleep 3"))
        await asyncio.sleep(0.6)
        await jobs.sweep(prune=True)
        remaining = await db.fetch(
            "SELECT id FROM raptorflow_data.jobs WHERE id = ANY($1::uuid[])",
            [uuid.UUID(i) for i in [*ids, blocked.job_id]],
        )
        # Finished jobs older than the history are gone; the open one stays.
        assert [str(r["id"]) for r in remaining] == [blocked.job_id]
        claims = await db.fetch(
            "SELECT period_start FROM raptorflow_data.schedule_claims WHERE schedule = $1", name
        )
        assert [r["period_start"] for r in claims] == [periods[-1]]


async def test_each_end_is_reported_once_to_the_end_hook(
    server: RunningServer, settings: Settings, db: asyncpg.Connection
) -> None:
    executor = ScriptedExecutor()
    async with job_runtime(settings, executor, max_running_jobs=1) as jobs:
        recorded: list[tuple[str, int]] = []
        jobs.on_end = lambda kind, state: recorded.append((kind, state))
        for command in ("succeed", "fail"):
            job = await submitted(jobs, scripted(command))
            await ended(jobs, job.job_id)
        blocked = await submitted(jobs, scripted("block"))
        queued = await submitted(jobs, scripted("succeed"))
        await until(jobs, blocked.job_id, in_state(RUNNING))
        await jobs.cancel(queued.job_id)
        await jobs.cancel(queued.job_id)  # already ended: not counted again
        await jobs.cancel(blocked.job_id)
        await ended(jobs, blocked.job_id)
        assert recorded == [
            ("analyze", SUCCEEDED),
            ("analyze", FAILED),
            ("analyze", CANCELLED),
            ("analyze", CANCELLED),
        ]
        # A lease that ran out is counted by the replica that swept it, not by the runner.
        recorded.clear()
        swept: list[tuple[str, int]] = []
        lost = await submitted(jobs, scripted("block"))
        await until(jobs, lost.job_id, in_state(RUNNING))
        async with job_runtime(settings) as sweeper:
            sweeper.on_end = lambda kind, state: swept.append((kind, state))
            await expire_lease(db, lost.job_id)
            await sweeper.sweep()
        await ended(jobs, lost.job_id)
        async with asyncio.timeout(5.0):
            await executor.cancel_seen.wait()
        await asyncio.sleep(0.1)
    # (Unless another replica's periodic sweep came first, in those few milliseconds.)
    assert swept in ([("analyze", FAILED)], [])
    assert recorded == []


async def test_jobs_and_background_work_outlive_a_database_outage(
    server: RunningServer, settings: Settings, database_url: str
) -> None:
    executor = ScriptedExecutor()
    async with (
        TcpProxy.for_database(database_url) as proxy,
        job_runtime(
            settings,
            executor,
            database_url=proxy.database_url(database_url),
            job_lease_seconds=3.0,
        ) as jobs,
    ):
        job = await submitted(jobs, scripted("sleep 2"))
        # Running as far as the runner knows: the row can read RUNNING before the
        # START_JOB reply has passed the proxy, and a cut then rightly fails the job.
        started = time.monotonic()
        while not executor.started:
            assert time.monotonic() - started < 10, "the job never started"
            await asyncio.sleep(0.01)
        # Every connection of the runtime (job pool, LISTEN) goes for over a second,
        # during which renewals, sweeps and the job's end all meet a dead database.
        await proxy.cut()
        await asyncio.sleep(1.2)
        await proxy.restore()
        final = await ended(server.maintenance.jobs, job.job_id)
        assert final.state == SUCCEEDED
        assert final.replica == jobs.replica_id
        after = await submitted(jobs, scripted("succeed"))
        assert (await ended(jobs, after.job_id)).state == SUCCEEDED


async def waiting_on_lock(db: asyncpg.Connection, statement: str, within: float = 5.0) -> int:
    """The pid of the service backend waiting for a lock while running `statement` (a snippet)."""
    started = time.monotonic()
    while True:
        await db.execute("SELECT pg_stat_clear_snapshot()")
        pid = await db.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'raptorflow-data' AND wait_event_type = 'Lock'"
            " AND position($1 in query) > 0",
            statement,
        )
        if pid is not None:
            return int(pid)
        assert time.monotonic() - started < within, f"nothing waits running {statement!r}"
        await asyncio.sleep(0.02)


async def job_row(db: asyncpg.Connection, job_id: str) -> asyncpg.Record:
    row = await db.fetchrow(
        "SELECT state, error_reason, error_message, lease_expires_at FROM raptorflow_data.jobs"
        " WHERE id = $1",
        uuid.UUID(job_id),
    )
    assert row is not None
    return row


async def test_a_job_committed_while_the_server_stops_is_marked_server_stopping(
    server: RunningServer, settings: Settings, db: asyncpg.Connection
) -> None:
    name = f"late-{uuid.uuid4().hex[:8]}"
    period = datetime.datetime(2030, 3, 1, tzinfo=datetime.UTC)
    async with job_runtime(settings) as jobs:
        # An uncommitted claim of the same period makes the submission's claim wait.
        transaction = db.transaction()
        await transaction.start()
        try:
            await db.execute(
                "INSERT INTO raptorflow_data.schedule_claims"
                " (schedule, period_start, job_id, replica) VALUES ($1, $2, $3, 'test')",
                name,
                period,
                uuid.uuid4(),
            )
            submitting = asyncio.create_task(
                jobs.submit(scripted("succeed"), schedule=name, period_start=period)
            )
            await waiting_on_lock(db, "schedule_claims")
            closing = asyncio.create_task(jobs.close())
            await asyncio.sleep(0.3)
            assert not closing.done(), "close() waits for the submission under way"
        finally:
            await transaction.rollback()
        job = await submitting
        assert job is not None
        assert job.state == QUEUED
        await closing
        row = await job_row(db, job.job_id)
    # Not left QUEUED, run by nobody, until its lease ran out.
    assert (row["state"], row["error_reason"]) == ("FAILED", "SERVER_STOPPING")
    assert row["lease_expires_at"] is None


async def test_a_job_stopped_before_its_start_committed_is_marked_server_stopping(
    server: RunningServer, settings: Settings, db: asyncpg.Connection
) -> None:
    executor = ScriptedExecutor()
    async with job_runtime(settings, executor, max_running_jobs=1, job_lease_seconds=60.0) as jobs:
        first = await submitted(jobs, scripted("block"))
        second = await submitted(jobs, scripted("succeed"))
        await until(jobs, first.job_id, in_state(RUNNING))
        transaction = db.transaction()
        await transaction.start()
        try:
            # The second job's START_JOB waits for this row lock when the server stops.
            await db.execute(
                "SELECT 1 FROM raptorflow_data.jobs WHERE id = $1 FOR UPDATE",
                uuid.UUID(second.job_id),
            )
            executor.release.set()
            await waiting_on_lock(db, "SET state = 'RUNNING'")
            closing = asyncio.create_task(jobs.close())
            # START_JOB was cancelled (its row is still QUEUED); the end waits for the lock.
            # (A FINISH_JOB that matched RUNNING rows only would not wait: it skipped the
            # QUEUED row, which then stayed QUEUED until its lease ran out.)
            await waiting_on_lock(db, "SET state = $3")
        finally:
            await transaction.rollback()
        await closing
        rows = [await job_row(db, job.job_id) for job in (first, second)]
    assert rows[0]["state"] == "SUCCEEDED"
    assert (rows[1]["state"], rows[1]["error_reason"]) == ("FAILED", "SERVER_STOPPING")
    assert "before the job could start" in rows[1]["error_message"]
    assert executor.started == ["block"]


async def test_a_job_whose_start_failed_ends_instead_of_staying_queued(
    server: RunningServer, settings: Settings, db: asyncpg.Connection
) -> None:
    executor = ScriptedExecutor()
    async with job_runtime(settings, executor, max_running_jobs=1, job_lease_seconds=60.0) as jobs:
        recorded: list[tuple[str, int]] = []
        jobs.on_end = lambda kind, state: recorded.append((kind, state))
        first = await submitted(jobs, scripted("block"))
        second = await submitted(jobs, scripted("succeed"))
        await until(jobs, first.job_id, in_state(RUNNING))
        transaction = db.transaction()
        await transaction.start()
        try:
            await db.execute(
                "SELECT 1 FROM raptorflow_data.jobs WHERE id = $1 FOR UPDATE",
                uuid.UUID(second.job_id),
            )
            executor.release.set()
            # The second job's START_JOB loses its connection before it commits.
            pid = await waiting_on_lock(db, "SET state = 'RUNNING'")
            assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
            # The job's end (FAILED) waits for the row, still QUEUED.
            await waiting_on_lock(db, "SET state = $3")
        finally:
            await transaction.rollback()
        final = await ended(jobs, second.job_id)
        assert (await jobs.get(first.job_id)).state == SUCCEEDED
    # Before: FINISH_JOB matched RUNNING rows only, so it stayed QUEUED for a whole lease.
    assert final.state == FAILED
    assert (final.error.code, final.error.reason) == ("UNAVAILABLE", "DATABASE_UNAVAILABLE")
    assert not final.HasField("start_time")
    assert ("analyze", FAILED) in recorded
