"""A job whose server dies is marked FAILED when its lease runs out, by another replica.

The dying server is a real `raptorflow-data serve` process with a two-second
lease; the test starts a job through it that waits for a lock the test holds,
kills the process with SIGKILL (no shutdown code runs), and watches the job
through an in-process server whose sweeper expires the lease.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from conftest import start_server
from job_helpers import analyze, create_lock_table, locked, next_job, rest_of
from pg_activity import wait_for_lock_waits
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.v1 import job_pb2, maintenance_service_pb2, maintenance_service_pb2_grpc
from server_process import serving
from tokens import authorized_channel

pb = maintenance_service_pb2
Stub = maintenance_service_pb2_grpc.MaintenanceServiceStub
LEASE_TABLE = "jobs_lease_target"
# Renewed every third of it: a stall of the dying server's loop shorter than two thirds
# (1.3 s) expires nothing, which a loaded 2-core CI machine needs.
LEASE_SECONDS = 2.0
log = logging.getLogger(__name__)


@pytest.fixture
async def serve_process(
    database_url: str, db: asyncpg.Connection
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """A `serve` subprocess with a short job lease, SERVING; killed at the end if still alive."""
    await create_lock_table(db, LEASE_TABLE)
    flags = ("--job-lease-seconds", str(LEASE_SECONDS), "--health-interval", "0.2")
    async with serving(database_url, *flags, "--log-level", "WARNING") as served:
        yield served


@pytest.fixture
async def sweeper(settings: Settings) -> AsyncIterator[RunningServer]:
    """The surviving replica; its sweeper runs every half lease."""
    running = await start_server(settings, job_lease_seconds=LEASE_SECONDS)
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


async def test_job_of_a_killed_server_fails_when_its_lease_runs_out(
    serve_process: tuple[asyncio.subprocess.Process, str],
    sweeper: RunningServer,
    db: asyncpg.Connection,
) -> None:
    process, address = serve_process
    async with (
        authorized_channel(address) as dying_channel,
        authorized_channel(sweeper.address) as channel,
        locked(db, LEASE_TABLE),
    ):
        job = (
            await Stub(dying_channel).StartJob(
                pb.StartJobRequest(spec=analyze(LEASE_TABLE)), timeout=5.0
            )
        ).job
        await wait_for_lock_waits(db)
        watch = Stub(channel).WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=30.0)
        running = await next_job(watch)
        assert running.state == job_pb2.JOB_STATE_RUNNING
        assert running.replica == job.replica != sweeper.maintenance.jobs.replica_id
        # Over two lease lengths: the dying server renews meanwhile, so nothing expires.
        await asyncio.sleep(2.5 * LEASE_SECONDS)
        assert (await Stub(channel).GetJob(pb.GetJobRequest(job_id=job.job_id))).job == running

        process.send_signal(signal.SIGKILL)
        await process.wait()
        killed = time.monotonic()
        final = (await rest_of(watch))[-1]
        log.info("marked FAILED %.2f s after the kill", time.monotonic() - killed)
    assert final.state == job_pb2.JOB_STATE_FAILED
    assert (final.error.code, final.error.reason) == ("UNAVAILABLE", "LEASE_EXPIRED")
    assert job.replica in final.error.message
    assert final.HasField("end_time")
