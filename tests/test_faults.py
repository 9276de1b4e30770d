"""Faults on one server: PostgreSQL restarted under load, backends killed from the database
side, COMMIT replies lost, streams cancelled at random. Nothing acknowledged is lost, nothing
is applied twice, every failure is a retryable status, and nothing leaks.

Every fault here is real: a PostgreSQL cluster of the test's own (pgserver) stopped and
started again, `pg_terminate_backend` on the service's backends, a proxy that drops the
reply to a COMMIT it delivered. Every test ends with the server settled: no statement of
the service running or idle in a transaction, every pool connection idle, readiness SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import pytest
from conftest import SCHEMA_SQL, start_server
from embedded_cluster import EmbeddedCluster, running_cluster
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lost_commit_proxy import LostCommitProxy
from messages import update_request
from pg_activity import (
    insert_row,
    lock_row,
    service_backends,
    wait_for_lock_waits,
)
from raptorflow.data.client import ClientConfig, CommitOutcomeUnknown, DataClient, DataError
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.v1 import (
    job_pb2,
    maintenance_service_pb2,
    maintenance_service_pb2_grpc,
    memory_sync_service_pb2,
    memory_sync_service_pb2_grpc,
    value_pb2,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)
from statuses import error_reason, rpc_error
from test_sync import Replica, captured, decode, follow_until, insert_campaigns, request
from tokens import ADMIN_TOKEN, authorized_channel

__all__ = ["captured"]  # a fixture of test_sync's, used here as well

pb = workspace_service_pb2
mpb = memory_sync_service_pb2
bpb = maintenance_service_pb2
WorkspaceStub = workspace_service_pb2_grpc.WorkspaceServiceStub
SyncStub = memory_sync_service_pb2_grpc.MemorySyncServiceStub
MaintenanceStub = maintenance_service_pb2_grpc.MaintenanceServiceStub
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

CALL_TIMEOUT = 10.0
# Health is checked every 0.2 s with a 1 s timeout (conftest settings).
NOTICE_WITHIN = 5.0
# A call that fails because the database is gone fails in milliseconds; a hang would
# wait out CALL_TIMEOUT. Generous for a loaded 2-core machine.
FAIL_FAST_WITHIN = 5.0
SETTLE_WITHIN = 10.0
# How long the restarted PostgreSQL stays down, at least.
OUTAGE_SECONDS = 2.0

# ---------------------------------------------------------------------------
# What every test checks at its end


def busy(backend: asyncpg.Record) -> bool:
    """Running a statement or holding a transaction open; LISTEN connections' keepalive
    (`SELECT 1`) and the health check are as short as they come and are not counted."""
    if backend["query"] in ("SELECT 1", "") and not backend["in_transaction"]:
        return False
    return backend["state"] != "idle" or backend["in_transaction"]


async def health_status(channel: grpc.aio.Channel, service: str = "readiness") -> int:
    health = health_pb2_grpc.HealthStub(channel)
    response = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
    return response.status


async def wait_for_health(
    channel: grpc.aio.Channel, want: int, within: float = NOTICE_WITHIN
) -> float:
    """Seconds until readiness reports `want`."""
    started = time.monotonic()
    while (got := await health_status(channel)) != want:
        elapsed = time.monotonic() - started
        assert elapsed < within, f"readiness still {got} after {elapsed:.1f} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def assert_settled(
    db: asyncpg.Connection, server: RunningServer, channel: grpc.aio.Channel, *, servers: int = 1
) -> None:
    """No statement of the service runs or holds a transaction, every query-pool connection
    is idle, the service has no more connections than its pools allow (`servers` servers
    with these settings share the database), readiness SERVING."""
    settings = server.settings
    # Query pool, owner pool (2 + job slots), job pool (3), health session, two LISTENs.
    most = servers * (settings.pool_max_size + 2 + settings.max_running_jobs + 3 + 1 + 2)
    started = time.monotonic()
    while True:
        backends = list((await service_backends(db)).values())
        working = [dict(b) for b in backends if busy(b)]
        stats = server.database.pool_stats()
        if not working and stats["in_use"] == 0 and len(backends) <= most:
            break
        assert time.monotonic() - started < SETTLE_WITHIN, (
            f"not settled after {SETTLE_WITHIN} s: busy backends {working}, "
            f"{len(backends)} connections (at most {most}), pool {dict(stats)}"
        )
        await asyncio.sleep(0.05)
    assert stats["size"] <= stats["max"]
    await wait_for_health(channel, SERVING, within=SETTLE_WITHIN)


def insert_event(workspace: str, tag: str) -> pb.InsertRequest:
    """One campaign_events row whose `kind` is `tag`: a column without a unique constraint,
    so a write applied twice shows as two rows instead of being refused."""
    return pb.InsertRequest(
        workspace_id=workspace,
        table="campaign_events",
        columns=["kind"],
        rows=[value_pb2.Row(values=[value_pb2.Value(string_value=tag)])],
    )


async def tag_counts(db: asyncpg.Connection, workspace: str) -> Counter[str]:
    rows = await db.fetch(
        "SELECT kind, count(*) AS n FROM campaign_events WHERE workspace_id = $1 GROUP BY kind",
        uuid.UUID(workspace),
    )
    return Counter({r["kind"]: r["n"] for r in rows})


def outcome_of(error: grpc.aio.AioRpcError | DataError) -> str:
    if isinstance(error, DataError):
        return f"{error.code.name} {error.reason}"
    return f"{error.code().name} {error_reason(error)}"


# ---------------------------------------------------------------------------
# PostgreSQL restarted under load


@dataclass
class Ledger:
    """What the load saw: each write's tag and outcome, each failure's latency."""

    outcomes: dict[str, str] = field(default_factory=dict)
    """Write tag -> "OK" or "<CODE> <REASON>"."""
    reads: Counter[str] = field(default_factory=Counter)
    slow_failures: list[tuple[str, str, float]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def acked(self) -> set[str]:
        return {tag for tag, outcome in self.outcomes.items() if outcome == "OK"}

    def failures(self) -> int:
        return sum(1 for outcome in self.outcomes.values() if outcome != "OK") + sum(
            n for outcome, n in self.reads.items() if not outcome.endswith("OK")
        )


# Statuses a call may end with while the database restarts: the database is unreachable
# (for a write: not applied, or, lost in COMMIT, unknown), or the deadline ran out.
RESTART_STATUSES = {
    "UNAVAILABLE DATABASE_UNAVAILABLE",
    "UNAVAILABLE COMMIT_OUTCOME_UNKNOWN",
    "DEADLINE_EXCEEDED DEADLINE_EXCEEDED",
}


async def run_load(
    address: str, workspace: str, ledger: Ledger, stop: asyncio.Event, *, writers: int = 3
) -> None:
    """Writers and readers through the client library (its default retrying service config)
    and through raw stubs (no retries), until `stop` is set."""
    config = ClientConfig(address, token=ADMIN_TOKEN, timeout=CALL_TIMEOUT)

    async def timed(kind: str, call: Callable[[], Awaitable[Any]], bound: float) -> str:
        started = time.monotonic()
        try:
            await call()
            outcome = "OK"
        except (grpc.aio.AioRpcError, DataError) as error:
            outcome = outcome_of(error)
            elapsed = time.monotonic() - started
            if elapsed > bound:
                ledger.slow_failures.append((kind, outcome, elapsed))
            if outcome not in RESTART_STATUSES:
                ledger.unexpected.append(f"{kind}: {outcome}: {error}")
            # Failing fast must not become a hot loop.
            await asyncio.sleep(0.02)
        return outcome

    async def client_writer(client: DataClient, name: str) -> None:
        table = client.workspace(workspace).table("campaign_events")
        for i in range(1_000_000):
            if stop.is_set():
                return
            tag = f"{name}-{i}"
            insert = table.insert({"kind": tag}, returning=())
            # Writes are never retried on UNAVAILABLE: each failure comes back at once.
            ledger.outcomes[tag] = await timed("client insert", insert.execute, FAIL_FAST_WITHIN)

    async def raw_writer(stub: WorkspaceStub, name: str) -> None:
        for i in range(1_000_000):
            if stop.is_set():
                return
            tag = f"{name}-{i}"
            ledger.outcomes[tag] = await timed(
                "raw insert",
                lambda tag=tag: stub.Insert(insert_event(workspace, tag), timeout=CALL_TIMEOUT),
                FAIL_FAST_WITHIN,
            )

    async def client_reader(client: DataClient) -> None:
        query = client.workspace(workspace).table("campaign_events").select("kind").limit(10)
        while not stop.is_set():
            # Retried on UNAVAILABLE by gRPC within the client's timeout: bounded by it.
            outcome = await timed("client select", query.execute, CALL_TIMEOUT + 2.0)
            ledger.reads[f"client select {outcome}"] += 1

    async def raw_reader(stub: WorkspaceStub) -> None:
        count = pb.CountRequest(workspace_id=workspace, table="campaign_events")
        while not stop.is_set():
            outcome = await timed(
                "raw count", lambda: stub.Count(count, timeout=CALL_TIMEOUT), FAIL_FAST_WITHIN
            )
            ledger.reads[f"raw count {outcome}"] += 1

    async with DataClient(config) as client, authorized_channel(address) as channel:
        stub = WorkspaceStub(channel)
        await asyncio.gather(
            *(client_writer(client, f"client{w}") for w in range(writers)),
            *(raw_writer(stub, f"raw{w}") for w in range(writers)),
            client_reader(client),
            raw_reader(stub),
        )


async def wait_until(condition: Callable[[], bool], within: float, what: str) -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, f"{what} did not happen within {within} s"
        await asyncio.sleep(0.02)


@pytest.fixture
async def restartable() -> AsyncIterator[tuple[EmbeddedCluster, str]]:
    """A pgserver cluster of this test's own, with the test tables: (cluster, database URL)."""
    with running_cluster() as cluster:
        admin = await asyncpg.connect(cluster.url())
        try:
            await admin.execute('CREATE DATABASE "faults"')
        finally:
            await admin.close()
        url = cluster.url("faults")
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(SCHEMA_SQL)
        finally:
            await conn.close()
        yield cluster, url


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_database_restart_under_load_keeps_every_acknowledged_write_once(
    settings: Settings, restartable: tuple[EmbeddedCluster, str], mode: str, workspace: str
) -> None:
    """PostgreSQL stops (`fast`: sessions ended; `immediate`: a crash, WAL replayed) and
    starts again while writers and readers run: readiness goes NOT_SERVING and back, every
    call fails fast with UNAVAILABLE, the same server process serves again, every
    acknowledged write is there exactly once, and no write that failed as not applied is."""
    cluster, url = restartable
    server = await start_server(settings, database_url=url)
    ledger = Ledger()
    stop = asyncio.Event()
    try:
        async with authorized_channel(server.address) as channel:
            load = asyncio.create_task(run_load(server.address, workspace, ledger, stop))
            try:
                await wait_until(lambda: len(ledger.acked()) >= 30, 30.0, "30 acknowledged writes")
                failures_before = ledger.failures()

                down_at = time.monotonic()
                await cluster.stop(mode)
                await wait_for_health(channel, NOT_SERVING)
                noticed = time.monotonic() - down_at
                # The load meets the outage, then PostgreSQL comes back.
                await wait_until(
                    lambda: ledger.failures() >= failures_before + 20, 20.0, "20 failed calls"
                )
                # Down long enough for the client's read retries (0.3 s backoff, doubling)
                # to meet it more than once: the length of the fault, not a wait for speed.
                await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
                await cluster.start()
                down_for = time.monotonic() - down_at
                recovered = await wait_for_health(channel, SERVING, within=20.0)
                acked_at_restart = len(ledger.acked())
                # The pool heals by itself: writes are acknowledged again, on the same process.
                await wait_until(
                    lambda: len(ledger.acked()) >= acked_at_restart + 30,
                    30.0,
                    "30 more acknowledged writes after the restart",
                )
            finally:
                stop.set()
                await load
            db = await asyncpg.connect(url)
            try:
                counts = await tag_counts(db, workspace)
                await assert_settled(db, server, channel)
            finally:
                await db.close()
    finally:
        await server.stop(grace=1.0)

    by_outcome = Counter(ledger.outcomes.values())
    unknown = [t for t, o in ledger.outcomes.items() if o == "UNAVAILABLE COMMIT_OUTCOME_UNKNOWN"]
    print(
        f"\nrestart ({mode}): readiness NOT_SERVING {noticed:.2f} s after the stop began, down "
        f"{down_for:.2f} s, SERVING {recovered:.2f} s after the start; writes {dict(by_outcome)} "
        f"({sum(counts[t] for t in unknown)} of {len(unknown)} of unknown outcome applied); "
        f"reads {dict(ledger.reads)}"
    )
    assert not ledger.unexpected, ledger.unexpected[:10]
    assert not ledger.slow_failures, ledger.slow_failures[:10]
    assert ledger.failures() > 0
    assert not [tag for tag, n in counts.items() if n > 1], "a write was applied twice"
    missing = [tag for tag in ledger.acked() if counts[tag] != 1]
    assert not missing, f"acknowledged writes lost: {missing[:10]}"
    applied_anyway = [
        tag
        for tag, outcome in ledger.outcomes.items()
        if outcome == "UNAVAILABLE DATABASE_UNAVAILABLE" and counts[tag]
    ]
    assert not applied_anyway, f"writes reported as not applied were applied: {applied_anyway}"
    # Only tags the load wrote are in the table.
    assert set(counts) <= set(ledger.outcomes)


# ---------------------------------------------------------------------------
# A COMMIT whose reply is lost


@pytest.fixture
async def lossy(
    settings: Settings, database_url: str
) -> AsyncIterator[tuple[LostCommitProxy, RunningServer]]:
    """A server whose database connections go through a proxy that can lose a COMMIT reply."""
    async with LostCommitProxy(database_url) as proxy:
        running = await start_server(settings, database_url=proxy.database_url(database_url))
        try:
            yield proxy, running
        finally:
            await running.stop(grace=1.0)


async def test_a_commit_whose_reply_is_lost_is_reported_as_outcome_unknown_and_not_retried(
    lossy: tuple[LostCommitProxy, RunningServer], db: asyncpg.Connection, workspace: str
) -> None:
    """PostgreSQL committed, the server never heard back: the caller must not be told
    "not applied" (DATABASE_UNAVAILABLE), and the client must not retry the write."""
    proxy, running = lossy
    config = ClientConfig(running.address, token=ADMIN_TOKEN, timeout=CALL_TIMEOUT)
    async with authorized_channel(running.address) as channel, DataClient(config) as client:
        stub = WorkspaceStub(channel)
        await stub.Insert(insert_event(workspace, "before"), timeout=CALL_TIMEOUT)

        proxy.arm()
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await stub.Insert(insert_event(workspace, "raw lost"), timeout=CALL_TIMEOUT)
        assert time.monotonic() - started < FAIL_FAST_WITHIN
        assert proxy.lost.is_set()
        assert raw.value.code() == grpc.StatusCode.UNAVAILABLE, raw.value
        assert error_reason(raw.value) == "COMMIT_OUTCOME_UNKNOWN"

        # Through the client library and its retrying service config: one attempt only.
        proxy.arm()
        table = client.workspace(workspace).table("campaign_events")
        with pytest.raises(CommitOutcomeUnknown) as through_client:
            await table.insert({"kind": "client lost"}, returning=()).execute()
        assert through_client.value.code == grpc.StatusCode.UNAVAILABLE
        assert through_client.value.reason == "COMMIT_OUTCOME_UNKNOWN"

        # A read has nothing to commit: its lost COMMIT reply is a plain DATABASE_UNAVAILABLE,
        # which the client's read policy retries, so the caller only sees the rows.
        proxy.arm()
        with pytest.raises(grpc.aio.AioRpcError) as raw_read:
            await stub.Count(
                pb.CountRequest(workspace_id=workspace, table="campaign_events"),
                timeout=CALL_TIMEOUT,
            )
        assert error_reason(raw_read.value) == "DATABASE_UNAVAILABLE"
        proxy.arm()
        page = await table.select("kind").execute()
        assert sorted(row["kind"] for row in page.data) == ["before", "client lost", "raw lost"]
        assert proxy.lost_commits == 4
        # The server recovered on its own: the lost connections were replaced.
        await stub.Insert(insert_event(workspace, "after"), timeout=CALL_TIMEOUT)
        counts = await tag_counts(db, workspace)
        assert counts == Counter({"before": 1, "raw lost": 1, "client lost": 1, "after": 1})
        await assert_settled(db, running, channel)


# ---------------------------------------------------------------------------
# Backends killed from the database side (pg_terminate_backend)


async def terminate(db: asyncpg.Connection, pid: int) -> None:
    assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)


async def wait_for_backend(
    db: asyncpg.Connection, matches: Callable[[asyncpg.Record], bool], what: str
) -> int:
    """The pid of the one service backend `matches` picks, once there is one."""
    started = time.monotonic()
    while True:
        backends = await service_backends(db)
        found = [pid for pid, b in backends.items() if matches(b)]
        if found:
            assert len(found) == 1, f"more than one {what}: {found}"
            return int(found[0])
        assert time.monotonic() - started < NOTICE_WITHIN, (
            f"no {what} within {NOTICE_WITHIN} s: {[dict(b) for b in backends.values()]}"
        )
        await asyncio.sleep(0.02)


async def test_a_backend_killed_in_a_lock_wait_fails_its_call_with_unavailable(
    db: asyncpg.Connection,
    server: RunningServer,
    channel: grpc.aio.Channel,
    stub: WorkspaceStub,
    workspace: str,
) -> None:
    """A write and reads whose backends die mid-statement: UNAVAILABLE (nothing applied),
    never UNKNOWN or INTERNAL; the client library's read retries wait it out."""
    row_id = await insert_row(db, workspace, "locked")
    config = ClientConfig(server.address, token=ADMIN_TOKEN, timeout=CALL_TIMEOUT)
    async with DataClient(config) as client:
        async with db.transaction():
            await lock_row(db, row_id)
            update = stub.Update(update_request(workspace, row_id, "killed"), timeout=CALL_TIMEOUT)
            (pid,) = await wait_for_lock_waits(db, 1)
            await terminate(db, pid)
            failure = await rpc_error(update)
            assert (failure.code, failure.reason) == (
                grpc.StatusCode.UNAVAILABLE,
                "DATABASE_UNAVAILABLE",
            )

            # Reads behind a table lock: one raw (no retries), one through the client.
            await db.execute("LOCK TABLE campaigns IN ACCESS EXCLUSIVE MODE")
            raw = stub.Count(
                pb.CountRequest(workspace_id=workspace, table="campaigns"), timeout=CALL_TIMEOUT
            )
            retried = asyncio.ensure_future(
                client.workspace(workspace).table("campaigns").select("status").execute()
            )
            for pid in await wait_for_lock_waits(db, 2):
                await terminate(db, pid)
            failure = await rpc_error(raw)
            assert failure.code == grpc.StatusCode.UNAVAILABLE
            # The client's retry comes back and waits on the lock again...
            await wait_for_lock_waits(db, 1)
        # ...and succeeds once it is gone.
        page = await retried
        assert [row["status"] for row in page.data] == ["original"]
    assert await db.fetchval("SELECT status FROM campaigns WHERE id = $1", row_id) == "original"
    await assert_settled(db, server, channel)


# A client that reads slowly: without BDP probing the HTTP/2 window stays at 64 KiB, so a
# server stream blocks on it after a few messages instead of sending everything at once.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0)]
SNAPSHOT_ROWS = 2_000


def snapshot_ids(replica: Replica) -> list[int]:
    """The ids of every snapshot row the replica received, repeats included."""
    return [
        row["id"]
        for message in replica.messages
        if message.event == mpb.SYNC_EVENT_SNAPSHOT_ROWS
        for row in decode(message.rows)
    ]


async def read_until_failure(
    call: Any, replica: Replica, within: float = 10.0
) -> grpc.aio.AioRpcError:
    """Applies the messages still coming on a stream whose backend died; its final status."""
    try:
        async with asyncio.timeout(within):
            while True:
                message = await call.read()
                assert message is not grpc.aio.EOF, "the stream ended without an error"
                replica.apply(message)
    except grpc.aio.AioRpcError as error:
        return error


@pytest.mark.usefixtures("captured")
async def test_a_sync_stream_killed_in_its_snapshot_resumes_exactly_from_its_token(
    db: asyncpg.Connection, server: RunningServer, channel: grpc.aio.Channel, workspace: str
) -> None:
    ids = await insert_campaigns(db, workspace, *(f"s{i:04}" for i in range(SNAPSHOT_ROWS)))
    async with authorized_channel(server.address, options=SMALL_WINDOW) as slow_reader:
        sync = SyncStub(slow_reader)
        call = sync.Sync(request(workspace, follow=True, batch_size=10))
        replica = Replica()
        await follow_until(call, replica, lambda r: len(r.messages) >= 2)
        # The snapshot's transaction stays open while the server waits for this client.
        pid = await wait_for_backend(
            db, lambda b: b["state"] == "idle in transaction", "snapshot backend"
        )
        await terminate(db, pid)
        ended = await read_until_failure(call, replica)
        assert ended.code() == grpc.StatusCode.UNAVAILABLE, ended
        assert not replica.snapshot_done
        # Committed while no stream runs, each must come exactly once: the insert (a key
        # after the last one sent) with the rest of the snapshot, the update of a row sent
        # already as a change after it.
        (late,) = await insert_campaigns(db, workspace, "late")
        await db.execute("UPDATE campaigns SET name = 'renamed' WHERE id = $1", ids[0])

        resumed = sync.Sync(request(workspace, token=replica.token, follow=True, batch_size=10))
        await follow_until(resumed, replica, lambda r: len(r.changes) == 1, within=20.0)
        resumed.cancel()
    received = snapshot_ids(replica)
    assert len(received) == len(set(received)), "a snapshot row came twice"
    assert sorted(received) == [*ids, late]
    assert [(c.operation, c.row["id"], c.row["name"]) for c in replica.changes] == [
        (mpb.CHANGE_OPERATION_UPDATE, ids[0], "renamed")
    ]
    await assert_settled(db, server, channel)


@pytest.mark.usefixtures("captured", "server")
async def test_killing_every_connection_of_the_server_while_streams_follow(
    db: asyncpg.Connection, settings: Settings, workspace: str
) -> None:
    """Pools, the health session and both LISTEN connections all die: a following stream
    still gets every change once (on the same stream, or resumed from its token if it ended
    UNAVAILABLE), LISTEN and health come back by themselves.

    The fallback poll is slowed to a minute, so only a LISTEN connection that came back
    can deliver the changes in time."""
    running = await start_server(settings, sync_poll_seconds=60.0)
    try:
        async with authorized_channel(running.address) as channel:
            sync = SyncStub(channel)
            call = sync.Sync(request(workspace, follow=True))
            replica = Replica()
            await follow_until(call, replica, lambda r: r.snapshot_done)
            await insert_campaigns(db, workspace, "before")
            await follow_until(call, replica, lambda r: len(r.changes) == 1)

            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=60)
            assert (await watch.read()).status == SERVING
            seen: list[int] = []

            async def watch_readiness() -> None:
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                    async for response in watch:
                        seen.append(response.status)

            watching = asyncio.ensure_future(watch_readiness())
            # This server's and the module's: every connection of the service dies.
            killed = list((await service_backends(db)).values())
            listens = [b for b in killed if b["query"].startswith("LISTEN")]
            assert len(listens) >= 2, killed  # changes and jobs
            for backend in killed:
                await db.fetchval("SELECT pg_terminate_backend($1)", backend["pid"])

            await insert_campaigns(db, workspace, "after the kill")
            ended: grpc.StatusCode | None = None
            try:
                await follow_until(call, replica, lambda r: len(r.changes) == 2, within=10.0)
            except grpc.aio.AioRpcError as error:
                ended = error.code()
            if ended is not None:
                # A read that met a dying connection ends the stream; the token resumes it.
                assert ended == grpc.StatusCode.UNAVAILABLE
                call = sync.Sync(request(workspace, token=replica.token, follow=True))
                await follow_until(call, replica, lambda r: len(r.changes) == 2, within=10.0)
            # The LISTEN connection is back (nothing else wakes the stream within a minute).
            await insert_campaigns(db, workspace, "heard again")
            await follow_until(call, replica, lambda r: len(r.changes) == 3, within=10.0)
            call.cancel()
            names = [c.row["name"] for c in replica.changes]
            assert names == ["before", "after the kill", "heard again"]
            await assert_settled(db, running, channel, servers=2)
            watching.cancel()
            await watching
    finally:
        await running.stop(grace=1.0)
    print(
        f"\nkilled {len(killed)} connections ({len(listens)} LISTEN); stream ended: {ended}; "
        f"readiness seen {seen}"
    )


MEMORY_RECORDS = "raptorflow_data.memory_records"


def memory_record(record_id: str) -> mpb.MemoryRecord:
    return mpb.MemoryRecord(id=record_id, kind="fact", embedding=[1.0, 0.5])


def memory_batch(workspace: str, *ids: str) -> mpb.UpsertMemoryRecordsRequest:
    return mpb.UpsertMemoryRecordsRequest(
        workspace_id=workspace, records=[memory_record(i) for i in ids]
    )


async def memory_ids(db: asyncpg.Connection, workspace: str) -> list[str]:
    rows = await db.fetch(
        f"SELECT id FROM {MEMORY_RECORDS} WHERE workspace_id = $1 ORDER BY id",
        uuid.UUID(workspace),
    )
    return [r["id"] for r in rows]


async def test_a_memory_upsert_stream_killed_mid_batch_keeps_committed_batches(
    db: asyncpg.Connection, server: RunningServer, channel: grpc.aio.Channel, workspace: str
) -> None:
    memory = SyncStub(channel)
    await memory.UpsertMemoryRecords(iter([memory_batch(workspace, "held")]), timeout=CALL_TIMEOUT)
    async with db.transaction():
        await db.execute(
            f"SELECT 1 FROM {MEMORY_RECORDS} WHERE workspace_id = $1 AND id = 'held' FOR UPDATE",
            uuid.UUID(workspace),
        )
        call = memory.UpsertMemoryRecords(timeout=CALL_TIMEOUT)
        await call.write(memory_batch(workspace, "a", "b"))
        # Each batch commits on its own: the first is in before the second is sent.
        await wait_until_async(
            lambda: memory_ids(db, workspace), ["a", "b", "held"], "the first batch"
        )
        await call.write(memory_batch(workspace, "c", "held"))
        (pid,) = await wait_for_lock_waits(db, 1)
        await terminate(db, pid)
        await call.done_writing()
        failure = await rpc_error(call)
        assert (failure.code, failure.reason) == (
            grpc.StatusCode.UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
        )
    assert await memory_ids(db, workspace) == ["a", "b", "held"]
    # Ids make the whole stream safe to send again.
    response = await memory.UpsertMemoryRecords(
        iter([memory_batch(workspace, "a", "b"), memory_batch(workspace, "c", "held")]),
        timeout=CALL_TIMEOUT,
    )
    assert (response.inserted_count, response.updated_count) == (1, 3)
    assert await memory_ids(db, workspace) == ["a", "b", "c", "held"]
    await assert_settled(db, server, channel)


async def wait_until_async(
    read: Callable[[], Awaitable[Any]], want: Any, what: str, within: float = NOTICE_WITHIN
) -> None:
    started = time.monotonic()
    while (got := await read()) != want:
        assert time.monotonic() - started < within, f"{what}: {got!r}, not {want!r}"
        await asyncio.sleep(0.02)


async def seed_events(db: asyncpg.Connection, workspace: str, count: int) -> None:
    await db.execute(
        "INSERT INTO campaign_events (workspace_id, kind, note) "
        "SELECT $1, 'seed ' || g || repeat('x', 80), 'n' || g FROM generate_series(1, $2) g",
        uuid.UUID(workspace),
        count,
    )


EXPORT_ROWS = 20_000


def export_request(workspace: str) -> bpb.ExportBackupRequest:
    return bpb.ExportBackupRequest(
        scope=job_pb2.BackupScope(workspace_id=workspace, tables=["campaign_events"]),
        chunk_bytes=4096,
    )


async def test_an_export_killed_mid_copy_fails_unavailable_and_frees_its_connection(
    db: asyncpg.Connection, server: RunningServer, channel: grpc.aio.Channel, workspace: str
) -> None:
    await seed_events(db, workspace, EXPORT_ROWS)
    maintenance = MaintenanceStub(channel)
    async with authorized_channel(server.address, options=SMALL_WINDOW) as slow_reader:
        call = MaintenanceStub(slow_reader).ExportBackup(export_request(workspace), timeout=30.0)
        for _ in range(3):
            assert await call.read() is not grpc.aio.EOF
        # The server's queue and the flow-control window fill; its COPY waits to send.
        pid = await wait_for_backend(db, lambda b: b["query"].startswith("COPY"), "COPY backend")
        await terminate(db, pid)
        with contextlib.suppress(grpc.aio.AioRpcError):
            async with asyncio.timeout(10.0):
                while True:
                    assert await call.read() is not grpc.aio.EOF, "the export ended as if whole"
        assert await call.code() == grpc.StatusCode.UNAVAILABLE, await call.details()
    # A whole export runs again at once.
    messages = [m async for m in maintenance.ExportBackup(export_request(workspace), timeout=30.0)]
    assert messages[-1].HasField("manifest")
    assert sum(t.row_count for t in messages[-1].manifest.tables) == EXPORT_ROWS
    await assert_settled(db, server, channel)


# ---------------------------------------------------------------------------
# Streams cancelled or timed out at random

STREAM_CALLS = 300
# grpc.aio reports INTERNAL "Internal error from Core" by itself when a client-streaming
# call's write meets the end of the call (its deadline or a cancel): grpc/grpc#24758. No
# such status comes from the server; it is counted apart, as this.
CLIENT_WRITE_FAILED = "CLIENT_WRITE_FAILED"


# How a stream may end when its client cancels it or its deadline passes at a random moment.
ALLOWED_ENDS = {"CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", CLIENT_WRITE_FAILED}


def code_of(error: grpc.aio.AioRpcError) -> str:
    """The status's code name, or CLIENT_WRITE_FAILED for grpc.aio's own INTERNAL."""
    if (
        error.code() == grpc.StatusCode.INTERNAL
        and not error_reason(error)
        and (error.details() or "").startswith("Internal error from Core")
    ):
        return CLIENT_WRITE_FAILED
    return error.code().name


async def test_streams_cancelled_or_timed_out_at_random_leak_nothing(
    db: asyncpg.Connection,
    server: RunningServer,
    channel: grpc.aio.Channel,
    captured: None,
    workspace: str,
) -> None:
    """Sync streams (snapshot and following), exports and memory upserts end at random
    moments, by deadline or by the client: afterwards nothing of the service runs or holds
    a transaction in PostgreSQL, every pool connection is idle and no stream is left open."""
    rng = random.Random(20261127)
    await insert_campaigns(db, workspace, *(f"r{i:03}" for i in range(300)))
    await seed_events(db, workspace, 3_000)
    sync = SyncStub(channel)
    maintenance = MaintenanceStub(channel)
    outcomes: Counter[str] = Counter()
    unexpected: list[str] = []
    gate = asyncio.Semaphore(30)

    async def upserts(i: int) -> AsyncIterator[mpb.UpsertMemoryRecordsRequest]:
        for b in range(5):
            yield memory_batch(workspace, f"u{i}-{b}-a", f"u{i}-{b}-b")
            await asyncio.sleep(rng.uniform(0.0, 0.05))

    async def one(i: int) -> None:
        async with gate:
            kind = rng.choice(("sync", "follow", "export", "upsert"))
            if rng.random() < 0.5:
                timeout, cancel_after = rng.uniform(0.01, 0.5), None
            else:
                timeout, cancel_after = 30.0, rng.uniform(0.0, 0.5)
            call: Any
            if kind in ("sync", "follow"):
                call = sync.Sync(
                    request(workspace, follow=kind == "follow", batch_size=5), timeout=timeout
                )
            elif kind == "export":
                call = maintenance.ExportBackup(export_request(workspace), timeout=timeout)
            else:
                call = SyncStub(channel).UpsertMemoryRecords(upserts(i), timeout=timeout)

            async def run() -> None:
                if kind == "upsert":
                    await call
                else:
                    async for _ in call:
                        pass

            task = asyncio.ensure_future(run())
            if cancel_after is not None:
                done, _ = await asyncio.wait([task], timeout=cancel_after)
                if not done:
                    call.cancel()
            try:
                await task
                outcomes[f"{kind} OK"] += 1
            except asyncio.CancelledError:
                outcomes[f"{kind} CANCELLED"] += 1
            except grpc.aio.AioRpcError as error:
                outcomes[f"{kind} {code_of(error)}"] += 1
                if code_of(error) not in ALLOWED_ENDS:
                    unexpected.append(f"{kind}: {outcome_of(error)}: {error.details()}")

    await asyncio.gather(*(one(i) for i in range(STREAM_CALLS)))
    print(f"\nrandom stream ends: {dict(sorted(outcomes.items()))}")
    assert sum(outcomes.values()) == STREAM_CALLS
    assert not unexpected, unexpected
    for kind in ("sync", "follow", "export", "upsert"):
        assert outcomes[f"{kind} CANCELLED"] + outcomes[f"{kind} DEADLINE_EXCEEDED"] > 0, kind
    await assert_settled(db, server, channel)
    await wait_until(
        lambda: server.sync_streams.stats()["open_streams"] == 0, SETTLE_WITHIN, "streams closed"
    )
    # Memory upserts that ended early kept whole batches only (each commits on its own).
    counts = await db.fetch(
        f"SELECT split_part(id, '-', 1) || '-' || split_part(id, '-', 2) AS batch, count(*) AS n "
        f"FROM {MEMORY_RECORDS} WHERE workspace_id = $1 GROUP BY 1",
        uuid.UUID(workspace),
    )
    assert all(r["n"] == 2 for r in counts), [dict(r) for r in counts if r["n"] != 2]
