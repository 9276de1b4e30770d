"""Several `serve` processes on one database: sync across replicas, schedules once per period,
round-robin clients that survive a stopped replica, and graceful shutdown under load.

Every replica is a real process (`replicas.py`) with the same token key; clients are the
typed `DataClient`, balancing with round_robin over an `ipv4:` target that lists them all
and retrying reads on UNAVAILABLE through the service config it ships.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

import asyncpg
import grpc
import pytest
from pg_activity import wait_for_lock_waits
from raptorflow.data.client import (
    ChangeOperation,
    ClientConfig,
    DataClient,
    DataError,
    SyncBatch,
    SyncEvent,
    SyncStream,
    Unavailable,
)
from raptorflow.data.server import cli
from raptorflow.data.v1 import monitoring_service_pb2
from replicas import Replica, backend_clients, replicas, round_robin_target, service_backends
from server_process import QUICK_RECONNECT
from tokens import ADMIN_TOKEN

TABLE = "campaigns"
# A table the tests lock whole, so reads of it wait in PostgreSQL (slow in-flight calls).
LOCKED_TABLE = 'Odd "Name" table'
SCHEDULE_SECONDS = 2
COUNT_METHOD = "/raptorflow.data.v1.WorkspaceService/Count"
# Long enough to see that a round_robin client sends a draining replica nothing.
DRAIN_BEFORE_STOP = 4.0


@pytest.fixture(scope="module")
def captured(database_url: str) -> None:
    """Change capture on campaigns, installed as operators do, before any replica starts."""
    assert cli.main(["migrate", "--database-url", database_url, "--sync-tables", TABLE]) == 0


def client_of(*members: Replica, **changes: object) -> DataClient:
    """An admin client of one replica, or balancing round_robin over several (which, by the
    shipped service config, also watches each one's readiness health)."""
    config = ClientConfig(
        members[0].address if len(members) == 1 else round_robin_target(members),
        token=ADMIN_TOKEN,
        load_balancing_policy="round_robin" if len(members) > 1 else None,
        # Own subchannels: a channel to the same address elsewhere in the test must not
        # share (and so skew) its connections.
        channel_options=[*QUICK_RECONNECT, ("grpc.use_local_subchannel_pool", 1)],
    )
    return DataClient(dataclasses.replace(config, **changes))  # type: ignore[arg-type]


# -- a consumer of sync streams -----------------------------------------------------------


class Consumer:
    """Applies sync batches as the memory system would, refusing anything inconsistent:
    a snapshot row twice, an insert of a row it has, an update or delete of one it has
    not, or a change sequence it has seen. Its rows must end equal to the table's."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[str, str | None]] = {}
        self.sequences: set[int] = set()
        self.token = ""
        self.snapshot_rows = 0
        self.snapshot_done = False
        self.batches = 0

    def apply(self, batch: SyncBatch) -> None:
        self.batches += 1
        assert batch.resume_token
        self.token = batch.resume_token
        if batch.event is SyncEvent.SNAPSHOT_ROWS:
            assert not self.snapshot_done
            for row in batch.rows:
                assert row["id"] not in self.rows, f"snapshot row {row['id']} came twice"
                self.rows[row["id"]] = (row["name"], row["status"])
                self.snapshot_rows += 1
        elif batch.event is SyncEvent.SNAPSHOT_DONE:
            self.snapshot_done = True
        elif batch.event is SyncEvent.CHANGES:
            assert self.snapshot_done
            for operation, seq, row in zip(
                batch.operations, batch.sequences, batch.rows, strict=True
            ):
                assert seq not in self.sequences, f"change {seq} came twice"
                self.sequences.add(seq)
                key = row["id"]
                if operation is ChangeOperation.INSERT:
                    assert key not in self.rows, f"insert of row {key}, which it has"
                    self.rows[key] = (row["name"], row["status"])
                elif operation is ChangeOperation.UPDATE:
                    assert key in self.rows, f"update of row {key}, which it lacks"
                    self.rows[key] = (row["name"], row["status"])
                else:
                    assert key in self.rows, f"delete of row {key}, which it lacks"
                    del self.rows[key]


async def table_rows(db: asyncpg.Connection, workspace: str) -> dict[int, tuple[str, str | None]]:
    return {
        r["id"]: (r["name"], r["status"])
        for r in await db.fetch(
            f"SELECT id, name, status FROM {TABLE} WHERE workspace_id = $1", uuid.UUID(workspace)
        )
    }


async def follow(
    stream: SyncStream,
    consumer: Consumer,
    until: Callable[[], bool],
    within: float = 20.0,
) -> None:
    """Applies the stream's batches until `until()` holds (fails past `within` seconds)."""
    if until():
        return
    try:
        async with asyncio.timeout(within):
            async for batch in stream:
                consumer.apply(batch)
                if until():
                    return
    except TimeoutError:
        raise AssertionError(
            f"the stream did not get there in {within} s ({consumer.batches} batches)"
        ) from None
    raise AssertionError("the stream ended before it got there")


# -- replicas shared by the tests that stop none of them ---------------------------------


@dataclasses.dataclass
class Three:
    members: list[Replica]
    schedule: str
    serving_since: float
    """time.time() when all three served."""


@pytest.fixture(scope="class")
async def three(database_url: str, captured: None) -> AsyncIterator[Three]:
    """Three replicas with one interval schedule (analyze campaigns every 2 s)."""
    name = f"replicas-{uuid.uuid4().hex[:8]}"
    schedules = json.dumps(
        [
            {
                "name": name,
                "interval_seconds": SCHEDULE_SECONDS,
                "job": {"analyze": {"tables": [TABLE]}},
            }
        ]
    )
    async with replicas(database_url, 3, "--schedules", schedules) as members:
        yield Three(members, name, time.time())


async def client_status(replica: Replica) -> monitoring_service_pb2.GetStatusResponse:
    """The replica's own status view (its replica id, its calls per method)."""
    async with client_of(replica) as client:
        return await client.monitoring.get_status(timeout=10.0)


class TestThreeReplicas:
    """Three replicas for the tests that stop none of them (torn down after these)."""

    async def test_writes_through_one_replica_reach_streams_on_others_and_tokens_resume_anywhere(
        self, three: Three, db: asyncpg.Connection, workspace: str
    ) -> None:
        a, b, c = three.members
        consumer = Consumer()
        async with client_of(a) as on_a, client_of(b) as on_b, client_of(c) as on_c:
            through_a = on_a.workspace(workspace).table(TABLE)
            through_c = on_c.workspace(workspace).table(TABLE)
            await through_a.insert([{"name": f"seed-{i}"} for i in range(5)]).execute()

            # A snapshot begun on b, one row per batch, left after two rows ...
            async with on_b.memory.sync(workspace, tables=[TABLE], batch_size=1) as stream:
                await follow(stream, consumer, lambda: consumer.snapshot_rows == 2)
            # ... goes on from its token on c: the other three rows, each once.
            async with on_c.memory.sync(
                workspace, tables=[TABLE], resume_token=consumer.token
            ) as stream:
                await follow(stream, consumer, lambda: consumer.snapshot_done)
                assert consumer.snapshot_rows == 5
                assert consumer.rows == await table_rows(db, workspace)

                # Writes through a reach the stream on c (the NOTIFY crosses processes).
                inserted = await through_a.insert(
                    [{"name": f"via-a-{i}"} for i in range(3)], returning=("id",)
                ).execute()
                first = inserted.data[0]["id"]
                await through_a.update({"status": "changed on a"}).eq("id", first).execute()
                await through_a.delete().eq("name", "seed-0").execute()
                expected = await table_rows(db, workspace)
                await follow(stream, consumer, lambda: consumer.rows == expected)
                assert consumer.rows[first] == ("via-a-0", "changed on a")
            left_at = len(consumer.sequences)

            # Left on c; more writes (through c this time); resumed on a from c's token.
            await through_c.insert([{"name": f"via-c-{i}"} for i in range(3)]).execute()
            await through_c.update({"status": "changed on c"}).eq("name", "seed-1").execute()
            await through_c.delete().eq("name", "via-a-1").execute()
            expected = await table_rows(db, workspace)
            async with on_a.memory.sync(
                workspace, tables=[TABLE], resume_token=consumer.token
            ) as stream:
                await follow(stream, consumer, lambda: consumer.rows == expected)
        # 3 inserts, an update and a delete on a; 3 inserts, an update and a delete on c.
        assert left_at == 5
        assert len(consumer.sequences) == 10

    async def test_scheduled_maintenance_runs_once_per_period_across_three_replicas(
        self, three: Three, db: asyncpg.Connection
    ) -> None:
        # The periods that began once all three were serving.
        first = math.ceil(three.serving_since / SCHEDULE_SECONDS) * SCHEDULE_SECONDS
        query = (
            "SELECT period_start, count(*) AS jobs, array_agg(replica) AS replicas,"
            " array_agg(state) AS states FROM raptorflow_data.jobs WHERE schedule = $1"
            " GROUP BY period_start ORDER BY period_start"
        )
        started = time.monotonic()
        while True:
            rows = await db.fetch(query, three.schedule)
            observed = [r for r in rows if r["period_start"].timestamp() >= first]
            if len(observed) >= 4:
                break
            assert time.monotonic() - started < 30.0, rows
            await asyncio.sleep(0.2)
        checked_at = time.time()
        # Exactly one job per period, also before all were up.
        assert all(r["jobs"] == 1 for r in rows), rows
        claims = await db.fetchval(
            "SELECT count(*) FROM raptorflow_data.schedule_claims WHERE schedule = $1",
            three.schedule,
        )
        assert claims == len(rows)
        # No gaps while all three were up: three replicas tick four times a period each.
        periods = [r["period_start"].timestamp() for r in observed]
        assert periods == [first + i * SCHEDULE_SECONDS for i in range(len(periods))], (
            f"periods missed: {periods}"
        )
        assert periods[-1] <= checked_at
        replica_ids = {(await client_status(r)).replica for r in three.members}
        assert {r["replicas"][0] for r in rows} <= replica_ids
        spread = {rid: sum(r["replicas"][0] == rid for r in rows) for rid in replica_ids}
        print(f"scheduled jobs per replica: {sorted(spread.values())}")


# -- load through a round-robin client -----------------------------------------------------


@dataclasses.dataclass
class Call:
    """One call of the load: what, when (time.monotonic()), and how it ended."""

    kind: str
    """"read" or "write"."""
    started: float
    ended: float
    code: grpc.StatusCode
    name: str = ""
    """The name a write inserted."""
    reason: str = ""


class Load:
    """Steady concurrent reads (Count, Select) and writes (Insert of a unique name) of one
    workspace's campaigns through one client, every call recorded."""

    def __init__(self, client: DataClient, workspace: str, workers: int = 4) -> None:
        self.table = client.workspace(workspace).table(TABLE)
        self.calls: list[Call] = []
        self._workers = workers
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._prefix = uuid.uuid4().hex[:6]

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(i)) for i in range(self._workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def wait_for(self, calls: int, within: float = 20.0) -> None:
        """Until `calls` more calls have ended."""
        target = len(self.calls) + calls
        started = time.monotonic()
        while len(self.calls) < target:
            assert time.monotonic() - started < within, f"the load stalled: {self.summary()}"
            await asyncio.sleep(0.02)

    async def _work(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            kind = "write" if n % 2 else "read"
            name = f"load-{self._prefix}-{worker}-{n}" if kind == "write" else ""
            started = time.monotonic()
            code, reason = grpc.StatusCode.OK, ""
            try:
                if kind == "write":
                    await self.table.insert({"name": name}, returning=()).execute(timeout=20.0)
                elif n % 4:
                    await self.table.count().execute(timeout=20.0)
                else:
                    await self.table.select("id").limit(5).execute(timeout=20.0)
            except DataError as err:
                code, reason = err.code, err.reason or err.message
            self.calls.append(Call(kind, started, time.monotonic(), code, name, reason))

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for call in self.calls:
            key = f"{call.kind} {call.code.name}"
            if call.code != grpc.StatusCode.OK:
                key += f" ({call.reason[:60]})"
            counts[key] = counts.get(key, 0) + 1
        return counts


async def names_written(db: asyncpg.Connection, workspace: str) -> dict[str, int]:
    """How many rows of each name the workspace holds."""
    rows = await db.fetch(
        f"SELECT name, count(*) AS n FROM {TABLE} WHERE workspace_id = $1 GROUP BY name",
        uuid.UUID(workspace),
    )
    return {r["name"]: r["n"] for r in rows}


async def count_calls(members: Sequence[Replica]) -> list[int]:
    """Count calls each replica has answered (its own GetStatus, over a channel of its own)."""
    counts = []
    for replica in members:
        status = await client_status(replica)
        counts.append(sum(m.count for m in status.methods if m.method == COUNT_METHOD))
    return counts


def check_writes(calls: Sequence[Call], written: dict[str, int], *, refused_applied: bool) -> int:
    """Acknowledged writes are there once; failed ones failed UNAVAILABLE and, unless
    `refused_applied` may be (a replica killed between commit and answer), are absent.
    Returns how many refused writes were applied nonetheless."""
    applied_anyway = 0
    for call in calls:
        if call.kind != "write":
            continue
        if call.code == grpc.StatusCode.OK:
            assert written.get(call.name) == 1, call
        else:
            assert call.code == grpc.StatusCode.UNAVAILABLE, call
            assert written.get(call.name, 0) <= (1 if refused_applied else 0), call
            applied_anyway += written.get(call.name, 0)
    return applied_anyway


async def test_round_robin_spreads_calls_and_survives_a_stopped_and_a_killed_replica(
    database_url: str, db: asyncpg.Connection, workspace: str
) -> None:
    drain = ("--shutdown-drain-seconds", str(DRAIN_BEFORE_STOP))
    async with replicas(database_url, 3, *drain) as members, client_of(*members) as client:
        table = client.workspace(workspace).table(TABLE)
        # Until every subchannel is connected (round_robin uses those that are ready).
        started = time.monotonic()
        while min(await count_calls(members)) == 0:
            assert time.monotonic() - started < 20.0
            for _ in range(6):
                await table.count().execute()
        before = await count_calls(members)
        for _ in range(60):
            await table.count().execute()
        spread = [after - b for after, b in zip(await count_calls(members), before, strict=True)]
        print(f"60 Count calls per replica: {spread}")
        assert sum(spread) == 60
        assert min(spread) >= 10, spread

        load = Load(client, workspace)
        load.start()
        try:
            await load.wait_for(20)
            # SIGTERM: the replica goes NOT_SERVING and drains; the client, watching its
            # readiness, sends it nothing more even though it still serves; then it stops.
            stopped, killed, survivor = members
            stopped.signal(signal.SIGTERM)
            term_from = len(load.calls)
            # Settled once a stretch of 100 calls (about 25 counts) added none to its tally;
            # balanced blindly, a third of them would land there.
            previous = None
            while (answered := (await count_calls([stopped]))[0]) != previous:
                assert stopped.signalled_at is not None
                assert time.monotonic() - stopped.signalled_at < DRAIN_BEFORE_STOP - 0.5, (
                    "calls kept reaching the draining replica"
                )
                previous = answered
                await load.wait_for(100)
            assert await stopped.wait(DRAIN_BEFORE_STOP + 20.0) == 0, stopped.log()[-3000:]
            flowing = await count_calls([killed, survivor])
            await load.wait_for(40)
            after_term = await count_calls([killed, survivor])
            assert all(a > f for a, f in zip(after_term, flowing, strict=True)), (
                flowing,
                after_term,
            )

            # SIGKILL: no goodbye; the survivor takes every call.
            kill_from = len(load.calls)
            killed.signal(signal.SIGKILL)
            await killed.wait(10.0)
            await load.wait_for(40)
            after_kill = await count_calls([survivor])
            await load.wait_for(20)
            assert (await count_calls([survivor]))[0] > after_kill[0]
        finally:
            await load.stop()
        print(f"load: {load.summary()}")
        written = await names_written(db, workspace)
        # Reads never fail: retried on UNAVAILABLE by the client's service config.
        failed_reads = [c for c in load.calls if c.kind == "read" and c.code != grpc.StatusCode.OK]
        assert not failed_reads, failed_reads
        check_writes(load.calls[:kill_from], written, refused_applied=False)
        applied = check_writes(load.calls[kill_from:], written, refused_applied=True)
        print(
            f"writes refused at SIGTERM: "
            f"{sum(c.code != grpc.StatusCode.OK for c in load.calls[:kill_from])}, at SIGKILL: "
            f"{sum(c.code != grpc.StatusCode.OK for c in load.calls[kill_from:])}"
            f" ({applied} applied nonetheless); calls before SIGTERM {term_from}"
        )


# -- graceful shutdown under load --------------------------------------------------------

DRAIN = 0.5
GRACE = 8.0
STREAMS = 3


async def read_until_ended(stream: SyncStream, consumer: Consumer) -> DataError | None:
    """Applies batches until the stream ends; the error it ended with."""
    try:
        async for batch in stream:
            consumer.apply(batch)
    except DataError as err:
        return err
    return None


async def refused(replica: Replica, workspace: str, within: float = 5.0) -> bool:
    """Whether a new call on a new connection to `replica` is refused with UNAVAILABLE
    within `within` seconds (calls it still answers meanwhile are fine)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        async with client_of(replica, enable_retries=False) as fresh:
            try:
                await fresh.workspace(workspace).table(TABLE).count().execute(timeout=5.0)
            except Unavailable:
                return True
        await asyncio.sleep(0.02)
    return False


async def test_sigterm_under_load_finishes_in_flight_calls_and_moves_streams_to_the_survivor(
    database_url: str, db: asyncpg.Connection, workspace: str, captured: None
) -> None:
    flags = (
        "--shutdown-drain-seconds",
        str(DRAIN),
        "--shutdown-grace-seconds",
        str(GRACE),
        # Three slow calls hold connections of the stopped replica all along.
        "--pool-max-size",
        "8",
    )
    async with replicas(database_url, 2, *flags) as (stopped, survivor):
        async with (
            client_of(stopped, survivor) as balanced,
            client_of(stopped) as on_stopped,
            client_of(survivor) as on_survivor,
            contextlib.AsyncExitStack() as exits,
        ):
            seeded = (
                await on_survivor.workspace(workspace)
                .table(TABLE)
                .insert([{"name": f"seed-{i}"} for i in range(20)], returning=("id",))
                .execute()
            )
            # Streams on the replica to be stopped, following after their snapshot.
            consumers = [Consumer() for _ in range(STREAMS)]
            streams = [on_stopped.memory.sync(workspace, tables=[TABLE]) for _ in consumers]
            for stream, consumer in zip(streams, consumers, strict=True):
                exits.push_async_callback(stream.aclose)
                await follow(stream, consumer, lambda c=consumer: c.snapshot_done)
            readers = [
                asyncio.create_task(read_until_ended(s, c))
                for s, c in zip(streams, consumers, strict=True)
            ]

            # Slow calls in flight on that replica: an update waiting on a row lock and
            # counts waiting on a table lock, both held by the test.
            slow_row = seeded.data[0]["id"]
            row_lock = await asyncpg.connect(database_url)
            table_lock = await asyncpg.connect(database_url)
            exits.push_async_callback(row_lock.close)
            exits.push_async_callback(table_lock.close)
            row_locked = row_lock.transaction()
            table_locked = table_lock.transaction()
            await row_locked.start()
            await table_locked.start()
            await row_lock.execute(f"SELECT 1 FROM {TABLE} WHERE id = $1 FOR UPDATE", slow_row)
            await table_lock.execute('LOCK TABLE "Odd ""Name"" table" IN ACCESS EXCLUSIVE MODE')
            slow_update = asyncio.create_task(
                on_stopped.workspace(workspace)
                .table(TABLE)
                .update({"status": "slow"})
                .eq("id", slow_row)
                .execute(timeout=30.0)
            )
            slow_counts = [
                asyncio.create_task(
                    on_stopped.workspace(workspace)
                    .table(LOCKED_TABLE)
                    .count()
                    .execute(timeout=30.0)
                )
                for _ in range(2)
            ]
            await wait_for_lock_waits(db, 3)

            load = Load(balanced, workspace)
            load.start()
            try:
                await load.wait_for(30)
                stopped_backends = await stopped.backends(db)
                stopped.signal(signal.SIGTERM)
                term = stopped.signalled_at
                assert term is not None

                # The streams end UNAVAILABLE once the drain is over ...
                async with asyncio.timeout(DRAIN + 10.0):
                    ended = await asyncio.gather(*readers)
                streams_ended = time.monotonic() - term
                for error in ended:
                    assert isinstance(error, Unavailable), error
                    assert error.reason == "SERVER_SHUTTING_DOWN", (
                        f"{error!r} after {streams_ended:.2f} s\n{stopped.log()[-6000:]}"
                    )
                # ... and then (once its gRPC server stops, a moment later) new calls to it
                # are refused cleanly, while the slow ones run on.
                assert await refused(stopped, workspace), "new calls were never refused"
                assert stopped.running
                assert not slow_update.done()
                assert not any(c.done() for c in slow_counts)
                stopped_backends |= await stopped.backends(db)
                released_after = time.monotonic() - term
                await row_locked.rollback()
                await table_locked.rollback()

                # Every call in flight at SIGTERM finishes (within the grace).
                assert (await slow_update).count == 1
                assert await asyncio.gather(*slow_counts) == [0, 0]
                code = await stopped.wait(DRAIN + GRACE + 10.0)
                exited_after = time.monotonic() - term
                assert code == 0, stopped.log()[-3000:]
                exited_at = len(load.calls)
                await load.wait_for(40)
            finally:
                await load.stop()

            # The streams resume from their last token on the survivor: nothing lost or twice.
            expected = await table_rows(db, workspace)
            for consumer in consumers:
                async with on_survivor.memory.sync(
                    workspace, tables=[TABLE], resume_token=consumer.token
                ) as stream:
                    await follow(stream, consumer, lambda c=consumer: c.rows == expected)

        term_at = term
        in_flight = [c for c in load.calls if c.started < term_at < c.ended]
        after = [c for c in load.calls if c.started >= term_at]
        print(
            f"load: {load.summary()}; in flight at SIGTERM: {len(in_flight)}; after it: "
            f"{len(after)}; streams ended {streams_ended:.2f} s, locks released "
            f"{released_after:.2f} s, exit {exited_after:.2f} s after SIGTERM;"
            f" calls after exit {len(load.calls) - exited_at}; backends of the stopped"
            f" replica seen: {len(stopped_backends)}"
        )
        assert all(c.code == grpc.StatusCode.OK for c in in_flight), in_flight
        failed_reads = [c for c in load.calls if c.kind == "read" and c.code != grpc.StatusCode.OK]
        assert not failed_reads, [(c.started - term_at, c.ended - term_at, c) for c in failed_reads]
        check_writes(load.calls, await names_written(db, workspace), refused_applied=False)
        assert (await table_rows(db, workspace))[slow_row][1] == "slow"
        assert exited_after < DRAIN + GRACE, "the stop waited out the grace with nothing left"

        # None of the stopped replica's connections is left in PostgreSQL, and no backend
        # of the service lost its client (every one left belongs to a live process).
        deadline = time.monotonic() + 5.0
        while True:
            now = await service_backends(db)
            orphans = {b for b, clients in backend_clients(now).items() if not clients}
            left = (set(now) & stopped_backends) | orphans
            if not left:
                break
            assert time.monotonic() < deadline, f"connections left: {left}"
            await asyncio.sleep(0.05)
        assert stopped_backends, "the stopped replica's backends were never seen"
