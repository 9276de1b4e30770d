"""Maintenance jobs through MaintenanceService: start, watch, list, cancel, on one or two servers.

The jobs are real ANALYZE jobs on the session database. A test that needs a job
to stay running holds an ACCESS EXCLUSIVE lock on a table of its own from its own
connection: the job's ANALYZE then waits in PostgreSQL until the lock goes or the
job is cancelled.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from conftest import start_server
from job_helpers import (
    FINAL_STATES,
    analyze,
    create_lock_table,
    locked,
    next_job,
    rest_of,
    wait_for_job,
    wait_until_no_lock_waiters,
    watch_to_end,
)
from pg_activity import wait_for_lock_waits
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.v1 import job_pb2, maintenance_service_pb2, maintenance_service_pb2_grpc
from statuses import rpc_error
from tokens import authorized_channel

pb = maintenance_service_pb2
Stub = maintenance_service_pb2_grpc.MaintenanceServiceStub
LOCKED = "jobs_locked_target"
QUEUED, RUNNING = job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING
SUCCEEDED, FAILED, CANCELLED = (
    job_pb2.JOB_STATE_SUCCEEDED,
    job_pb2.JOB_STATE_FAILED,
    job_pb2.JOB_STATE_CANCELLED,
)


@pytest.fixture(scope="module")
async def maintenance(
    server: RunningServer, channel: grpc.aio.Channel, db: asyncpg.Connection
) -> Stub:
    await create_lock_table(db, LOCKED)
    await server.catalog.reload()
    return Stub(channel)


@pytest.fixture
async def other_server(settings: Settings) -> AsyncIterator[RunningServer]:
    """A second replica on the same database."""
    running = await start_server(settings)
    await running.catalog.reload()
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


async def start(stub: Stub, spec: job_pb2.JobSpec) -> job_pb2.Job:
    return (await stub.StartJob(pb.StartJobRequest(spec=spec), timeout=5.0)).job


# -- lifecycle and progress ---------------------------------------------------------


async def test_start_returns_at_once_and_watch_streams_until_success(
    maintenance: Stub, server: RunningServer
) -> None:
    job = await start(maintenance, analyze("campaigns", "campaign_events"))
    assert job.state == QUEUED
    assert str(uuid.UUID(job.job_id)) == job.job_id
    assert job.spec == analyze("campaigns", "campaign_events")
    assert job.replica == server.maintenance.jobs.replica_id
    assert job.HasField("create_time")
    assert not job.HasField("start_time")
    assert not job.HasField("end_time")
    assert not job.HasField("error")

    seen = await watch_to_end(maintenance, job.job_id)
    states = [j.state for j in seen]
    assert states == sorted(states), "states only move forward"
    assert states[-1] == SUCCEEDED
    assert all(s not in FINAL_STATES for s in states[:-1])
    final = seen[-1]
    assert [(t.table, t.action) for t in final.result.tables] == [
        ("campaigns", "ANALYZE"),
        ("campaign_events", "ANALYZE"),
    ]
    assert (final.progress.done, final.progress.total) == (2, 2)
    assert final.progress.unit == job_pb2.PROGRESS_UNIT_TABLES
    assert not final.HasField("error")
    create, begin, end = (
        t.ToDatetime() for t in (final.create_time, final.start_time, final.end_time)
    )
    assert create <= begin <= end
    assert (await maintenance.GetJob(pb.GetJobRequest(job_id=job.job_id))).job == final


async def test_watch_streams_progress_of_a_running_job(
    maintenance: Stub, db: asyncpg.Connection
) -> None:
    async with locked(db, LOCKED):
        job = await start(maintenance, analyze("campaigns", LOCKED, "campaign_events"))
        await wait_for_lock_waits(db)
        watch = maintenance.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=20.0)
        streamed = [await next_job(watch)]
        # The stream follows the job to the lock of the second table: one done of three.
        while streamed[-1].progress.phase != f"analyze public.{LOCKED}":
            streamed.append(await next_job(watch))
        current = streamed[-1]
        assert current.state == RUNNING
        assert current.HasField("start_time")
        assert (current.progress.done, current.progress.total) == (1, 3)
        assert current.progress.unit == job_pb2.PROGRESS_UNIT_TABLES
    rest = await rest_of(watch)
    final = rest[-1]
    assert final.state == SUCCEEDED
    assert (final.progress.done, final.progress.total) == (3, 3)
    assert [t.table for t in final.result.tables] == ["campaigns", LOCKED, "campaign_events"]
    done = [j.progress.done for j in streamed + rest]
    assert done == sorted(done)


async def test_failed_job_keeps_its_error(
    maintenance: Stub, server: RunningServer, db: asyncpg.Connection
) -> None:
    await db.execute("CREATE TABLE jobs_dropped_target (id bigint PRIMARY KEY, workspace_id uuid)")
    await server.catalog.reload()
    async with locked(db, LOCKED):
        job = await start(maintenance, analyze(LOCKED, "jobs_dropped_target"))
        await wait_for_lock_waits(db)
        # Passed its check; the table is gone by the time the job reaches it.
        dropper = await asyncpg.connect(server.settings.database_url)
        try:
            await dropper.execute("DROP TABLE jobs_dropped_target")
        finally:
            await dropper.close()
    final = (await watch_to_end(maintenance, job.job_id))[-1]
    assert final.state == FAILED
    assert final.error.code == "FAILED_PRECONDITION", final.error
    assert final.error.reason == "TABLE_CHANGED"
    assert "jobs_dropped_target" in final.error.message
    assert final.HasField("end_time")


# -- cancellation -------------------------------------------------------------------


async def test_cancel_stops_a_job_waiting_for_a_lock(
    maintenance: Stub, db: asyncpg.Connection
) -> None:
    async with locked(db, LOCKED):
        job = await start(maintenance, analyze(LOCKED))
        await wait_for_lock_waits(db)
        watch = maintenance.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=20.0)
        assert (await next_job(watch)).state == RUNNING

        cancelled = (await maintenance.CancelJob(pb.CancelJobRequest(job_id=job.job_id))).job
        assert cancelled.cancel_requested
        assert cancelled.state in (RUNNING, CANCELLED)
        rest = await rest_of(watch)
        final = rest[-1]
        assert final.state == CANCELLED
        assert final.cancel_requested
        assert (final.error.code, final.error.reason) == ("CANCELLED", "CANCELLED")
        assert final.HasField("end_time")
        assert not final.result.tables
        # The ANALYZE stopped waiting in PostgreSQL while the lock is still held.
        await wait_until_no_lock_waiters(db)
    assert (await maintenance.GetJob(pb.GetJobRequest(job_id=job.job_id))).job == final


async def test_cancel_of_a_queued_job_ends_it_at_once(
    settings: Settings, db: asyncpg.Connection
) -> None:
    single = await start_server(settings, max_running_jobs=1)
    await single.catalog.reload()
    try:
        async with authorized_channel(single.address) as channel:
            stub = Stub(channel)
            async with locked(db, LOCKED):
                blocked = await start(stub, analyze(LOCKED))
                await wait_for_lock_waits(db)
                queued = await start(stub, analyze("campaigns"))
                assert (
                    await stub.GetJob(pb.GetJobRequest(job_id=queued.job_id))
                ).job.state == QUEUED

                cancelled = (await stub.CancelJob(pb.CancelJobRequest(job_id=queued.job_id))).job
                assert cancelled.state == CANCELLED
                assert cancelled.cancel_requested
                assert cancelled.HasField("end_time")
                assert not cancelled.HasField("start_time")
                assert cancelled.error.reason == "CANCELLED"
                await stub.CancelJob(pb.CancelJobRequest(job_id=blocked.job_id))
                assert (await wait_for_job(stub, blocked.job_id, FINAL_STATES)).state == CANCELLED
            # The slot is free again, and the cancelled job never ran.
            after = await start(stub, analyze("campaigns"))
            assert (await watch_to_end(stub, after.job_id))[-1].state == SUCCEEDED
            never = (await stub.GetJob(pb.GetJobRequest(job_id=queued.job_id))).job
            assert never == cancelled
    finally:
        await single.stop(grace=1.0)


async def test_cancel_of_an_ended_job_changes_nothing(maintenance: Stub) -> None:
    job = await start(maintenance, analyze("campaigns"))
    final = (await watch_to_end(maintenance, job.job_id))[-1]
    assert final.state == SUCCEEDED
    again = (await maintenance.CancelJob(pb.CancelJobRequest(job_id=job.job_id))).job
    assert again == final
    assert not again.cancel_requested


async def test_watch_and_cancel_through_the_other_server(
    maintenance: Stub, server: RunningServer, other_server: RunningServer, db: asyncpg.Connection
) -> None:
    async with authorized_channel(other_server.address) as channel:
        other = Stub(channel)
        async with locked(db, LOCKED):
            job = await start(maintenance, analyze(LOCKED))
            await wait_for_lock_waits(db)
            watch = other.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=20.0)
            current = await next_job(watch)
            assert current.state == RUNNING
            assert current.replica == server.maintenance.jobs.replica_id
            assert current.replica != other_server.maintenance.jobs.replica_id

            cancelled = (await other.CancelJob(pb.CancelJobRequest(job_id=job.job_id))).job
            assert cancelled.cancel_requested
            final = (await rest_of(watch))[-1]
            assert final.state == CANCELLED
            await wait_until_no_lock_waiters(db)
        assert (await other.GetJob(pb.GetJobRequest(job_id=job.job_id))).job == final


async def test_stopping_server_fails_its_running_and_queued_jobs(
    maintenance: Stub, settings: Settings, db: asyncpg.Connection
) -> None:
    stopping = await start_server(settings, max_running_jobs=1)
    await stopping.catalog.reload()
    replica = stopping.maintenance.jobs.replica_id
    try:
        async with authorized_channel(stopping.address) as channel, locked(db, LOCKED):
            stub = Stub(channel)
            running = await start(stub, analyze(LOCKED))
            await wait_for_lock_waits(db)
            queued = await start(stub, analyze("campaigns"))
            await stopping.stop(grace=0.5)
            # The lock wait was cancelled in PostgreSQL, with the lock still held.
            await wait_until_no_lock_waiters(db)
    finally:
        await stopping.stop(grace=0.5)
    for job_id, message in ((running.job_id, "while the job ran"), (queued.job_id, "before")):
        job = (await maintenance.GetJob(pb.GetJobRequest(job_id=job_id))).job
        assert job.state == FAILED
        assert (job.error.code, job.error.reason) == ("UNAVAILABLE", "SERVER_STOPPING")
        assert replica in job.error.message
        assert message in job.error.message


async def test_watch_ends_with_unavailable_when_its_server_stops(
    settings: Settings, db: asyncpg.Connection
) -> None:
    stopping = await start_server(settings)
    await stopping.catalog.reload()
    try:
        async with authorized_channel(stopping.address) as channel, locked(db, LOCKED):
            stub = Stub(channel)
            job = await start(stub, analyze(LOCKED))
            await wait_for_lock_waits(db)
            watch = stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=20.0)
            assert (await next_job(watch)).state == RUNNING
            stop = asyncio.create_task(stopping.stop(grace=5.0))
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async with asyncio.timeout(3.0):
                    await watch.read()
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            await stop
    finally:
        await stopping.stop(grace=0.5)


# -- listing --------------------------------------------------------------------------


async def test_list_jobs_pages_newest_first_with_filters(maintenance: Stub) -> None:
    mine = []
    for _ in range(7):
        job = await start(maintenance, analyze("campaigns"))
        mine.append(job.job_id)
        await watch_to_end(maintenance, job.job_id)
    request = pb.ListJobsRequest(page_size=3, states=[SUCCEEDED])
    listed: list[job_pb2.Job] = []
    pages = 0
    while True:
        page = await maintenance.ListJobs(request)
        assert len(page.jobs) <= 3
        listed.extend(page.jobs)
        pages += 1
        if not page.next_page_token:
            break
        # A job started between pages is newer than the cursor: no page repeats or skips.
        await start(maintenance, analyze("campaigns"))
        request = pb.ListJobsRequest(
            page_size=3, states=[SUCCEEDED], page_token=page.next_page_token
        )
    ids = [j.job_id for j in listed]
    assert len(ids) == len(set(ids))
    assert set(mine) <= set(ids)
    assert pages >= 3
    assert all(j.state == SUCCEEDED for j in listed)
    keys = [(j.create_time.ToDatetime(), j.job_id) for j in listed]
    assert keys == sorted(keys, reverse=True)
    # Newest first: the last of mine comes before the first.
    assert ids.index(mine[-1]) < ids.index(mine[0])

    everything = await maintenance.ListJobs(pb.ListJobsRequest(page_size=1000))
    assert not everything.next_page_token
    default = await maintenance.ListJobs(pb.ListJobsRequest())
    assert len(default.jobs) == min(100, len(everything.jobs))
    # page_size above 1000 is lowered to 1000; the states are a set, in any order.
    first = await maintenance.ListJobs(pb.ListJobsRequest(page_size=1, states=[SUCCEEDED, FAILED]))
    more = await maintenance.ListJobs(
        pb.ListJobsRequest(
            page_size=5000, states=[FAILED, SUCCEEDED, FAILED], page_token=first.next_page_token
        )
    )
    assert first.jobs[0].job_id not in {j.job_id for j in more.jobs}
    none = await maintenance.ListJobs(pb.ListJobsRequest(schedule="no-such-schedule"))
    assert not none.jobs
    assert not none.next_page_token


async def test_list_jobs_refuses_bad_requests(maintenance: Stub) -> None:
    await start(maintenance, analyze("campaigns"))
    await start(maintenance, analyze("campaigns"))
    page = await maintenance.ListJobs(
        pb.ListJobsRequest(page_size=1, states=[SUCCEEDED, QUEUED, RUNNING])
    )
    assert page.next_page_token
    for request, field in (
        (pb.ListJobsRequest(page_token=page.next_page_token), "page_token"),
        (pb.ListJobsRequest(states=[SUCCEEDED], page_token=page.next_page_token), "page_token"),
        (
            pb.ListJobsRequest(
                states=[SUCCEEDED, QUEUED, RUNNING], schedule="x", page_token=page.next_page_token
            ),
            "page_token",
        ),
        (pb.ListJobsRequest(page_token="not-a-token"), "page_token"),
        (pb.ListJobsRequest(page_token=page.next_page_token[:-2] + "AA"), "page_token"),
        (pb.ListJobsRequest(page_size=-1), "page_size"),
        (pb.ListJobsRequest(states=[job_pb2.JOB_STATE_UNSPECIFIED]), "states"),
        (pb.ListJobsRequest(states=[job_pb2.JobState.ValueType(42)]), "states"),
    ):
        failure = await rpc_error(maintenance.ListJobs(request))
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, request
        assert failure.fields == [field], request


# -- bad requests -----------------------------------------------------------------------


async def test_unknown_and_malformed_job_ids(maintenance: Stub) -> None:
    missing = str(uuid.uuid4())
    for call in (
        maintenance.GetJob(pb.GetJobRequest(job_id=missing)),
        maintenance.CancelJob(pb.CancelJobRequest(job_id=missing)),
    ):
        failure = await rpc_error(call)
        assert failure.code == grpc.StatusCode.NOT_FOUND
        assert failure.reason == "JOB_NOT_FOUND"
    watch = maintenance.WatchJob(pb.WatchJobRequest(job_id=missing))
    failure = await rpc_error(watch.read())
    assert failure.code == grpc.StatusCode.NOT_FOUND

    for bad in ("", "not-a-uuid", "12345678-1234-1234-1234-1234567890"):
        for call in (
            maintenance.GetJob(pb.GetJobRequest(job_id=bad)),
            maintenance.CancelJob(pb.CancelJobRequest(job_id=bad)),
            maintenance.WatchJob(pb.WatchJobRequest(job_id=bad)).read(),
        ):
            failure = await rpc_error(call)
            assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
            assert failure.fields == ["job_id"]


async def test_start_job_refuses_a_spec_without_kind_or_with_unknown_tables(
    maintenance: Stub,
) -> None:
    before = await maintenance.ListJobs(pb.ListJobsRequest(page_size=1000))
    failure = await rpc_error(maintenance.StartJob(pb.StartJobRequest()))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "JOB_KIND_REQUIRED"
    failure = await rpc_error(
        maintenance.StartJob(pb.StartJobRequest(spec=analyze("no_such_table"))),
        echoed="no_such_table",
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    after = await maintenance.ListJobs(pb.ListJobsRequest(page_size=1000))
    assert len(after.jobs) == len(before.jobs), "a refused spec creates no job"


async def test_job_tables_are_the_owners_alone(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    role = server.settings.app_role
    for table in ("raptorflow_data.jobs", "raptorflow_data.schedule_claims"):
        for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE"):
            assert not await db.fetchval(
                "SELECT has_table_privilege($1, $2, $3)", role, table, privilege
            ), (table, privilege)
