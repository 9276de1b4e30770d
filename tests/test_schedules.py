"""Scheduled jobs: the configuration, periods against a fake clock, claims across replicas,
two real servers running each period once, and ListSchedules' success rates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import itertools
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import start_server
from job_helpers import FINAL_STATES, ScriptedExecutor, job_runtime
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.connections import Database
from raptorflow.data.server.maintenance.jobs import Jobs
from raptorflow.data.server.maintenance.schedule_config import (
    MAX_INTERVAL_SECONDS,
    ScheduleConfig,
    load_schedules,
)
from raptorflow.data.server.maintenance.schedules import Scheduler
from raptorflow.data.v1 import job_pb2, maintenance_service_pb2, maintenance_service_pb2_grpc
from server_process import free_port, spawn_serve
from tokens import authorized_channel

pb = maintenance_service_pb2
Stub = maintenance_service_pb2_grpc.MaintenanceServiceStub
UTC = datetime.UTC


def at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=UTC)


def cron(expression: str) -> ScheduleConfig:
    return ScheduleConfig("c", job_pb2.JobSpec(analyze=job_pb2.AnalyzeJob()), cron=expression)


def every(seconds: float) -> ScheduleConfig:
    spec = job_pb2.JobSpec(analyze=job_pb2.AnalyzeJob())
    return ScheduleConfig("i", spec, interval_seconds=seconds)


class FakeClock:
    """A UTC clock the test moves by hand."""

    def __init__(self, now: datetime.datetime) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now


def schedules_json(*entries: dict[str, Any]) -> str:
    return json.dumps(list(entries))


def entry(name: str, job: dict[str, Any], **when: Any) -> dict[str, Any]:
    return {"name": name, **when, "job": job}


# -- periods -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "now", "latest", "following"),
    [
        ("*/5 * * * *", "2030-01-01 12:03:10", "2030-01-01 12:00:00", "2030-01-01 12:05:00"),
        # A fire time is its own period from its very first microsecond.
        ("*/5 * * * *", "2030-01-01 12:05:00", "2030-01-01 12:05:00", "2030-01-01 12:10:00"),
        ("*/5 * * * *", "2030-01-01 12:04:59.999999", "2030-01-01 12:00:00", "2030-01-01 12:05:00"),
        ("0 3 * * *", "2030-01-02 02:59:00", "2030-01-01 03:00:00", "2030-01-02 03:00:00"),
        ("0 3 * * *", "2030-01-02 03:00:30", "2030-01-02 03:00:00", "2030-01-03 03:00:00"),
        # 2030-01-01 is a Tuesday.
        ("30 6 * * MON", "2030-01-01 00:00:00", "2029-12-31 06:30:00", "2030-01-07 06:30:00"),
        ("0 0 1 */3 *", "2030-05-15 00:00:00", "2030-04-01 00:00:00", "2030-07-01 00:00:00"),
        ("15,45 9-17 * * 1-5", "2030-01-04 18:00:00", "2030-01-04 17:45:00", "2030-01-07 09:15:00"),
    ],
)
def test_cron_periods(expression: str, now: str, latest: str, following: str) -> None:
    schedule = cron(expression)
    assert schedule.latest_period(at(now)) == at(latest)
    assert schedule.next_run(at(now)) == at(following)


def test_interval_periods_are_multiples_of_the_interval_since_the_epoch() -> None:
    schedule = every(90)
    # 2030-01-01 00:00:00 is 1893456000 s after the epoch, a multiple of 90.
    assert schedule.latest_period(at("2030-01-01 00:01:29.999999")) == at("2030-01-01 00:00:00")
    assert schedule.next_run(at("2030-01-01 00:01:29.999999")) == at("2030-01-01 00:01:30")
    assert schedule.latest_period(at("2030-01-01 00:01:30")) == at("2030-01-01 00:01:30")
    assert schedule.next_run(at("2030-01-01 00:01:40")) == at("2030-01-01 00:03:00")
    fractional = every(1.5)
    assert fractional.latest_period(at("2030-01-01 00:00:02.9")) == at("2030-01-01 00:00:01.5")
    assert fractional.next_run(at("2030-01-01 00:00:02.9")) == at("2030-01-01 00:00:03")


# -- configuration -----------------------------------------------------------------------


ANALYZE = {"analyze": {"tables": ["campaigns"]}}


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("{", "not valid JSON"),
        ('{"name": "x"}', "JSON array"),
        ("[1]", "must be a JSON object"),
        (schedules_json(entry("", ANALYZE, cron="* * * * *")), "'name'"),
        (schedules_json(entry("a b", ANALYZE, cron="* * * * *")), "'name'"),
        (
            schedules_json({"name": "x", "cron": "* * * * *", "job": ANALYZE, "at": 1}),
            "unknown keys",
        ),
        (schedules_json(entry("x", ANALYZE)), "exactly one of"),
        (
            schedules_json(entry("x", ANALYZE, cron="* * * * *", interval_seconds=5)),
            "exactly one of",
        ),
        (schedules_json(entry("x", ANALYZE, cron="* * * *")), "five fields"),
        (schedules_json(entry("x", ANALYZE, cron="0 * * * * *")), "five fields"),
        (schedules_json(entry("x", ANALYZE, cron="61 * * * *")), "bad cron expression"),
        (schedules_json(entry("x", ANALYZE, cron="0 0 30 2 *")), "bad cron expression"),
        (schedules_json(entry("x", ANALYZE, interval_seconds=0)), "from 1 to"),
        (schedules_json(entry("x", ANALYZE, interval_seconds=0.5)), "from 1 to"),
        # Past 100 years: such an interval used to pass, then overflow datetime when its
        # next run was computed (ListSchedules INTERNAL, every schedule gone from GetStatus).
        (schedules_json(entry("x", ANALYZE, interval_seconds=3e11)), "to 3155760000 (100 years)"),
        (schedules_json(entry("x", ANALYZE, interval_seconds=1e300)), "(100 years)"),
        (schedules_json(entry("x", ANALYZE, interval_seconds=math.inf)), "(100 years)"),
        (schedules_json(entry("x", ANALYZE, interval_seconds="5")), "'interval_seconds'"),
        (schedules_json(entry("x", ANALYZE, interval_seconds=True)), "'interval_seconds'"),
        (schedules_json(entry("x", {}, interval_seconds=5)), "must name one kind"),
        (schedules_json(entry("x", {"defrag": {}}, interval_seconds=5)), "not a JobSpec"),
        (
            schedules_json(entry("x", {"analyze": {"tables": "campaigns"}}, interval_seconds=5)),
            "not a JobSpec",
        ),
        (schedules_json(entry("x", [], interval_seconds=5)), "'job'"),
        (
            schedules_json(
                entry("same", ANALYZE, interval_seconds=5), entry("same", ANALYZE, cron="* * * * *")
            ),
            "used twice",
        ),
        ("@/no/such/schedules.json", "cannot read the schedules file"),
    ],
)
def test_bad_schedules_are_refused_at_start_up(
    settings: Settings, setting: str, message: str
) -> None:
    changed = dataclasses.replace(settings, schedules=setting)
    jobs = Jobs(changed, Database(changed), ScriptedExecutor(), "unstarted")  # type: ignore[arg-type]
    with pytest.raises(SystemExit) as refused:
        Scheduler(changed, jobs)
    assert "RAPTORFLOW_SCHEDULES" in str(refused.value)
    assert message in str(refused.value)


def test_schedules_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "schedules.json"
    path.write_text(
        schedules_json(
            entry("nightly", {"vacuum": {"analyze": True}}, cron=" 0  3 * * * "),
            entry("often", {"backupToFile": {"path": "b/x.bak"}}, interval_seconds=60),
        )
    )
    nightly, often = load_schedules(f"@{path}")
    assert (nightly.name, nightly.cron, nightly.interval_seconds) == ("nightly", "0 3 * * *", 0.0)
    assert nightly.spec == job_pb2.JobSpec(vacuum=job_pb2.VacuumJob(analyze=True))
    assert (often.name, often.cron, often.interval_seconds) == ("often", "", 60.0)
    assert often.spec.backup_to_file.path == "b/x.bak"
    assert load_schedules("") == []
    assert load_schedules("[]") == []


def test_the_longest_interval_has_a_next_run() -> None:
    (longest,) = load_schedules(
        schedules_json(entry("x", ANALYZE, interval_seconds=100 * 365.25 * 86400))
    )
    assert longest.interval_seconds == MAX_INTERVAL_SECONDS
    now = datetime.datetime.now(UTC)
    following = longest.next_run(now)
    assert following is not None
    assert now < following <= now + datetime.timedelta(seconds=MAX_INTERVAL_SECONDS)


def test_no_next_run_past_the_end_of_datetime_is_none_not_an_error() -> None:
    end = at("9999-12-31 23:59:30")
    assert every(60).next_run(end) is None
    assert every(MAX_INTERVAL_SECONDS).next_run(end) is None
    assert cron("0 0 * * *").next_run(end) is None
    assert cron("0 0 * * *").latest_period(end) == at("9999-12-31 00:00:00")
    assert every(60).latest_period(end) == at("9999-12-31 23:59:00")


async def test_serve_exits_with_the_reason_for_bad_schedules(database_url: str) -> None:
    process = await spawn_serve(
        f"127.0.0.1:{free_port()}",
        database_url,
        "--schedules",
        schedules_json(entry("x", ANALYZE, cron="every day")),
    )
    async with asyncio.timeout(20.0):
        _, stderr = await process.communicate()
    assert process.returncode == 1
    assert (
        "invalid RAPTORFLOW_SCHEDULES: schedule 'x': 'cron' must be five fields" in stderr.decode()
    )


# -- the scheduler on a fake clock --------------------------------------------------------


@pytest.fixture
async def two_runtimes(
    server: RunningServer, settings: Settings
) -> AsyncIterator[tuple[ScriptedExecutor, Jobs, Jobs]]:
    """Two job runtimes (replicas) with one scripted executor, on the session database."""
    executor = ScriptedExecutor()
    async with job_runtime(settings, executor) as first, job_runtime(settings, executor) as second:
        yield executor, first, second


def scheduler_of(
    settings: Settings, jobs: Jobs, clock: Callable[[], datetime.datetime], *entries: dict[str, Any]
) -> Scheduler:
    return Scheduler(
        dataclasses.replace(settings, schedules=schedules_json(*entries)), jobs, clock=clock
    )


async def finish(jobs: Jobs, started: list[job_pb2.Job]) -> list[job_pb2.Job]:
    ended = []
    for job in started:
        async with asyncio.timeout(10.0):
            async for seen in jobs.watch(job.job_id):
                if seen.state in FINAL_STATES:
                    ended.append(seen)
    return ended


async def test_cron_schedule_claims_each_period_once_on_a_fake_clock(
    settings: Settings, two_runtimes: tuple[ScriptedExecutor, Jobs, Jobs], db: asyncpg.Connection
) -> None:
    _, first, second = two_runtimes
    name = f"cron-{uuid.uuid4().hex[:8]}"
    clock = FakeClock(at("2030-01-01 12:03:10"))
    spec = {"analyze": {"tables": ["succeed"]}}
    a = scheduler_of(settings, first, clock, entry(name, spec, cron="*/5 * * * *"))
    b = scheduler_of(settings, second, clock, entry(name, spec, cron="*/5 * * * *"))

    # The period under way at start-up runs (12:00), once, whichever replica ticks first.
    started = await a.run_due()
    assert [j.schedule for j in started] == [name]
    assert await b.run_due() == []
    assert await a.run_due() == []
    clock.now = at("2030-01-01 12:04:59")
    assert await a.run_due() == await b.run_due() == []

    clock.now = at("2030-01-01 12:05:00.5")
    both = await asyncio.gather(b.run_due(), a.run_due())
    assert sorted(len(s) for s in both) == [0, 1]
    started += both[0] + both[1]

    # Down for hours: only the latest period runs, not the ones missed.
    clock.now = at("2030-01-01 15:07:00")
    started += await b.run_due() + await a.run_due()
    await finish(first, [j for j in started if j.replica == first.replica_id])
    await finish(second, [j for j in started if j.replica == second.replica_id])
    rows = await db.fetch(
        "SELECT period_start, count(*) AS jobs FROM raptorflow_data.jobs WHERE schedule = $1"
        " GROUP BY period_start ORDER BY period_start",
        name,
    )
    assert [(r["period_start"], r["jobs"]) for r in rows] == [
        (at("2030-01-01 12:00:00"), 1),
        (at("2030-01-01 12:05:00"), 1),
        (at("2030-01-01 15:05:00"), 1),
    ]

    listed = {s.name: s for s in await a.list()}[name]
    assert listed.cron == "*/5 * * * *"
    assert listed.next_run_time.ToDatetime(tzinfo=UTC) == at("2030-01-01 15:10:00")
    assert (listed.run_count, listed.success_count, listed.success_rate) == (3, 3, 1.0)
    assert listed.last_job.schedule == name
    assert listed.last_job.state == job_pb2.JOB_STATE_SUCCEEDED


async def test_success_rate_counts_finished_runs(
    settings: Settings, two_runtimes: tuple[ScriptedExecutor, Jobs, Jobs]
) -> None:
    _, jobs, _ = two_runtimes
    name, quiet = f"flaky-{uuid.uuid4().hex[:8]}", f"quiet-{uuid.uuid4().hex[:8]}"
    clock = FakeClock(at("2030-02-01 00:00:00"))
    scheduler = scheduler_of(
        settings,
        jobs,
        clock,
        entry(name, {"analyze": {"tables": ["flaky 3"]}}, interval_seconds=60),
        entry(quiet, {"analyze": {"tables": ["succeed"]}}, cron="0 0 1 1 *"),
    )
    assert (await scheduler.list())[1].success_rate == 1.0, "no runs yet: 1"
    started = []
    for minute in range(6):
        clock.now = at(f"2030-02-01 00:0{minute}:30")
        started += await scheduler.run_due()
    ended = [j for j in await finish(jobs, started) if j.schedule == name]
    assert [j.state for j in ended].count(job_pb2.JOB_STATE_FAILED) == 2
    flaky, listed_quiet = await scheduler.list()
    assert (flaky.name, flaky.interval_seconds, flaky.cron) == (name, 60.0, "")
    assert (flaky.run_count, flaky.success_count) == (6, 4)
    assert flaky.success_rate == pytest.approx(4 / 6)
    assert flaky.next_run_time.ToDatetime(tzinfo=UTC) == at("2030-02-01 00:06:00")
    assert flaky.last_job.job_id == ended[-1].job_id
    assert listed_quiet.name == quiet
    # The yearly schedule's latest period (2030-01-01) ran once at start-up.
    assert listed_quiet.run_count == 1
    assert listed_quiet.next_run_time.ToDatetime(tzinfo=UTC) == at("2031-01-01 00:00:00")


async def test_the_last_result_is_the_latest_run_that_ended(
    settings: Settings, two_runtimes: tuple[ScriptedExecutor, Jobs, Jobs]
) -> None:
    # last_job is the newest run whatever its state; last_finished_job (the "last result"
    # the status view gives) stays on the newest run that ended while a later one is under way.
    _, jobs, _ = two_runtimes
    name = f"slow-{uuid.uuid4().hex[:8]}"
    clock = FakeClock(at("2030-03-01 00:00:30"))
    scheduler = scheduler_of(
        settings,
        jobs,
        clock,
        entry(name, {"analyze": {"tables": ["sleep 1"]}}, interval_seconds=60),
    )
    [first] = await scheduler.run_due()
    listed = (await scheduler.list())[0]
    assert listed.last_job.job_id == first.job_id
    assert not listed.HasField("last_finished_job"), "no run has ended yet"
    [first_ended] = await finish(jobs, [first])
    clock.now = at("2030-03-01 00:01:30")
    [second] = await scheduler.run_due()
    listed = (await scheduler.list())[0]
    assert listed.last_job.job_id == second.job_id
    assert listed.last_job.state in (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING)
    assert listed.last_finished_job == first_ended
    assert first_ended.state == job_pb2.JOB_STATE_SUCCEEDED
    [second_ended] = await finish(jobs, [second])
    assert (await scheduler.list())[0].last_finished_job == second_ended


async def test_a_schedule_without_a_next_run_leaves_the_others_listed(
    settings: Settings, two_runtimes: tuple[ScriptedExecutor, Jobs, Jobs]
) -> None:
    # Near datetime's end (the only way left, now that start-up refuses an interval that
    # overflows it), a schedule has no next run: it is listed without one, and the list
    # (ListSchedules, GetStatus) neither fails nor loses the schedules that have one.
    _, jobs, _ = two_runtimes
    soon, never = f"soon-{uuid.uuid4().hex[:8]}", f"never-{uuid.uuid4().hex[:8]}"
    clock = FakeClock(at("9999-12-31 23:58:10"))
    scheduler = scheduler_of(
        settings,
        jobs,
        clock,
        entry(soon, {"analyze": {"tables": ["succeed"]}}, interval_seconds=60),
        entry(never, {"analyze": {"tables": ["succeed"]}}, cron="0 0 * * *"),
    )
    listed = {s.name: s for s in await scheduler.list()}
    assert set(listed) == {soon, never}
    assert listed[soon].next_run_time.ToDatetime(tzinfo=UTC) == at("9999-12-31 23:59:00")
    assert not listed[never].HasField("next_run_time")
    assert listed[never].cron == "0 0 * * *"


# -- real servers ---------------------------------------------------------------------------


async def test_two_servers_run_each_period_exactly_once(
    settings: Settings, db: asyncpg.Connection
) -> None:
    name = f"every-second-{uuid.uuid4().hex[:8]}"
    changed = dataclasses.replace(
        settings,
        schedules=schedules_json(
            entry(name, {"analyze": {"tables": ["campaigns"]}}, interval_seconds=1)
        ),
    )
    before = time.time()
    servers = [await start_server(changed), await start_server(changed)]
    began = time.time()
    try:
        # Until four periods ran (about four seconds; more on a loaded machine).
        started = time.monotonic()
        while (
            await db.fetchval(
                "SELECT count(DISTINCT period_start) FROM raptorflow_data.jobs WHERE schedule = $1",
                name,
            )
            < 4
        ):
            assert time.monotonic() - started < 20.0, "the schedule did not run four periods"
            await asyncio.sleep(0.1)
    finally:
        for running in servers:
            await running.stop(grace=1.0)
    ended = time.time()
    rows = await db.fetch(
        "SELECT period_start, count(*) AS jobs, array_agg(state) AS states, array_agg(replica)"
        " AS replicas FROM raptorflow_data.jobs WHERE schedule = $1"
        " GROUP BY period_start ORDER BY period_start",
        name,
    )
    periods = [r["period_start"].timestamp() for r in rows]
    assert len(periods) >= 4, rows
    assert all(r["jobs"] == 1 for r in rows), rows
    # Whole seconds, from the one under way when the servers started. (A period may be
    # skipped when neither server ticked within it, as when the loop stalls on a loaded
    # machine: only the latest period runs, by design. Mostly they are consecutive.)
    assert all(p == int(p) for p in periods), periods
    assert before - 1 < periods[0] <= began + 1
    assert periods[-1] <= ended
    gaps = [b - a for a, b in itertools.pairwise(periods)]
    assert gaps.count(1.0) >= len(gaps) // 2, periods
    replicas = {s.maintenance.jobs.replica_id for s in servers}
    assert {r["replicas"][0] for r in rows} <= replicas
    claims = await db.fetchval(
        "SELECT count(*) FROM raptorflow_data.schedule_claims WHERE schedule = $1", name
    )
    assert claims == len(rows)


async def test_list_schedules_through_the_service(
    settings: Settings, server: RunningServer
) -> None:
    good, bad = f"good-{uuid.uuid4().hex[:6]}", f"bad-{uuid.uuid4().hex[:6]}"
    running = await start_server(
        settings,
        schedules=schedules_json(
            entry(good, {"analyze": {"tables": ["campaigns"]}}, interval_seconds=1),
            # Passes the configuration check; fails at every run (no such table).
            entry(bad, {"analyze": {"tables": ["no_such_table"]}}, interval_seconds=1),
        ),
    )
    try:
        async with authorized_channel(running.address) as channel:
            stub = Stub(channel)
            started = time.monotonic()
            while True:
                listed_at = datetime.datetime.now(UTC)
                listed = (await stub.ListSchedules(pb.ListSchedulesRequest())).schedules
                if all(s.run_count >= 2 for s in listed):
                    break
                assert time.monotonic() - started < 20.0, listed
                await asyncio.sleep(0.2)
    finally:
        await running.stop(grace=1.0)
    by_name = {s.name: s for s in listed}
    # Sorted by name, not in the configured order.
    assert list(by_name) == [bad, good]
    assert by_name[good].success_rate == 1.0
    assert by_name[good].success_count == by_name[good].run_count
    assert by_name[bad].success_rate == 0.0
    assert by_name[bad].success_count == 0
    last_bad = by_name[bad].last_job
    assert last_bad.schedule == bad
    if last_bad.state == job_pb2.JOB_STATE_FAILED:
        assert last_bad.error.reason == "TABLE_CHANGED"
    for schedule in listed:
        assert schedule.interval_seconds == 1.0
        # After the time of the listing (not of this check: the stop took a while since).
        assert schedule.next_run_time.ToDatetime(tzinfo=UTC) > listed_at - (
            datetime.timedelta(seconds=1)
        )
    # The module's own server has no schedules.
    async with authorized_channel(server.address) as channel:
        assert not (await Stub(channel).ListSchedules(pb.ListSchedulesRequest())).schedules
