"""Sync streams against a real server and PostgreSQL: snapshot, follow, exact resume.

The consumer model (`Replica`) applies messages the way a memory controller
would, keyed by (table, id), and checks on every change that the stream is
consistent with what it already sent: an insert is of a row it does not have,
an update or delete of one it has, and no sequence value comes twice. At the
end its rows must equal a fresh snapshot of the tables.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import grpc
import pytest
from conftest import ODD_TABLE, start_server
from raptorflow.data.server import cli
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.connections import Database
from raptorflow.data.server.sync import capture
from raptorflow.data.v1 import (
    column_batch_pb2,
    memory_sync_service_pb2,
    memory_sync_service_pb2_grpc,
)
from statuses import error_reason, rpc_error
from tokens import authorized_channel

from harness.tcp_proxy import TcpProxy

pb = memory_sync_service_pb2
Stub = memory_sync_service_pb2_grpc.MemorySyncServiceStub
TABLES = ["campaigns", "campaign_events"]
SNAPSHOT_ROWS = pb.SYNC_EVENT_SNAPSHOT_ROWS
SNAPSHOT_DONE = pb.SYNC_EVENT_SNAPSHOT_DONE
CHANGES = pb.SYNC_EVENT_CHANGES
CHECKPOINT = pb.SYNC_EVENT_CHECKPOINT
INSERT = pb.CHANGE_OPERATION_INSERT
UPDATE = pb.CHANGE_OPERATION_UPDATE
DELETE = pb.CHANGE_OPERATION_DELETE


# ---------------------------------------------------------------------------
# Fixtures and the consumer model


@pytest.fixture(scope="module")
def captured(database_url: str) -> None:
    """Change capture on the session's test tables, installed as operators do."""
    code = cli.main(["migrate", "--database-url", database_url, "--sync-tables", ",".join(TABLES)])
    assert code == 0


async def install_capture(settings: Settings, tables: str) -> list[str]:
    """What `migrate --sync-tables` runs, from inside a running event loop."""
    database = Database(settings)
    try:
        await database.open_owner()
        return await capture.install(database, settings, tables)
    finally:
        await database.close()


@pytest.fixture(scope="module")
def sync(channel: grpc.aio.Channel, captured: None) -> Stub:
    return Stub(channel)


def decode(batch: column_batch_pb2.ColumnBatch) -> list[dict[str, Any]]:
    """A ColumnBatch as one dict per row, NULLs as None."""
    columns: dict[str, list[Any]] = {}
    for column in batch.columns:
        which = column.WhichOneof("values")
        assert which is not None, column.name
        cells = list(getattr(column, which).values)
        assert len(cells) == batch.row_count
        for i in column.null_rows:
            cells[i] = None
        columns[column.name] = cells
    return [{name: cells[i] for name, cells in columns.items()} for i in range(batch.row_count)]


@dataclasses.dataclass(frozen=True)
class Change:
    seq: int
    table: str
    operation: int
    row: dict[str, Any]


class Replica:
    """What a consumer holds after applying a stream's messages."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}
        self.changes: list[Change] = []
        self.messages: list[pb.SyncResponse] = []
        self.token = ""
        self.snapshot_done = False

    def apply(self, message: pb.SyncResponse) -> None:
        self.messages.append(message)
        assert message.resume_token
        self.token = message.resume_token
        if message.event == SNAPSHOT_ROWS:
            assert not self.snapshot_done
            for row in decode(message.rows):
                self.rows[message.rows.table, row["id"]] = row
        elif message.event == SNAPSHOT_DONE:
            self.snapshot_done = True
        elif message.event == CHANGES:
            rows = decode(message.rows)
            assert len(rows) == len(message.operations) == len(message.sequences)
            seen = {c.seq for c in self.changes}
            for operation, seq, row in zip(
                message.operations, message.sequences, rows, strict=True
            ):
                assert seq not in seen, f"sequence {seq} delivered twice"
                change = Change(seq, message.rows.table, operation, row)
                self.changes.append(change)
                key = (message.rows.table, row["id"])
                if operation == INSERT:
                    assert key not in self.rows, f"insert of a row the consumer has: {change}"
                    self.rows[key] = row
                elif operation == UPDATE:
                    assert key in self.rows, f"update of a row the consumer lacks: {change}"
                    self.rows[key] = row
                else:
                    assert operation == DELETE
                    assert self.rows.pop(key, None) is not None, (
                        f"delete of a missing row: {change}"
                    )
        else:
            assert message.event == CHECKPOINT
            assert not message.HasField("rows")

    def names(self, table: str = "campaigns") -> dict[int, str]:
        return {key[1]: row["name"] for key, row in self.rows.items() if key[0] == table}


def request(
    workspace: str,
    *,
    tables: Sequence[str] = ("campaigns",),
    token: str = "",
    follow: bool = False,
    batch_size: int = 0,
    consumer_id: str = "",
) -> pb.SyncRequest:
    return pb.SyncRequest(
        workspace_id=workspace,
        tables=tables,
        resume_token=token,
        follow=follow,
        batch_size=batch_size,
        consumer_id=consumer_id,
    )


async def read_all(stub: Stub, req: pb.SyncRequest, replica: Replica | None = None) -> Replica:
    """Applies a whole (non-following) stream."""
    replica = replica or Replica()
    async with asyncio.timeout(20.0):
        async for message in stub.Sync(req):
            replica.apply(message)
    return replica


async def follow_until(
    call: Any, replica: Replica, done: Callable[[Replica], bool], within: float = 5.0
) -> None:
    """Applies messages of a following stream until `done(replica)`."""
    async with asyncio.timeout(within):
        while not done(replica):
            message = await call.read()
            assert message is not grpc.aio.EOF, "the stream ended"
            replica.apply(message)


def at_least(count: int) -> Callable[[Replica], bool]:
    return lambda replica: len(replica.changes) >= count


async def truth(
    stub: Stub, workspace: str, tables: Sequence[str] = ("campaigns",)
) -> dict[Any, Any]:
    """The tables' rows now, as a fresh snapshot shows them."""
    replica = Replica()
    async with asyncio.timeout(20.0):
        async for message in stub.Sync(request(workspace, tables=tables)):
            replica.apply(message)
            if message.event == SNAPSHOT_DONE:
                break
    return replica.rows


async def insert_campaigns(db: asyncpg.Connection, workspace: str, *names: str) -> list[int]:
    rows = await db.fetch(
        "INSERT INTO campaigns (workspace_id, name, priority) "
        "SELECT $1, n, 0 FROM unnest($2::text[]) AS n RETURNING id",
        uuid.UUID(workspace),
        list(names),
    )
    return [r["id"] for r in rows]


# ---------------------------------------------------------------------------
# Snapshot and follow


async def test_snapshot_then_follow_delivers_inserts_updates_and_deletes(
    sync: Stub, db: asyncpg.Connection, workspace: str
) -> None:
    ids = await insert_campaigns(db, workspace, "a", "b", "c")
    call = sync.Sync(request(workspace, follow=True, batch_size=2))
    replica = Replica()
    await follow_until(call, replica, lambda r: r.snapshot_done)
    assert [m.event for m in replica.messages] == [SNAPSHOT_ROWS, SNAPSHOT_ROWS, SNAPSHOT_DONE]
    assert [m.rows.row_count for m in replica.messages[:2]] == [2, 1]
    assert replica.names() == dict(zip(ids, "abc", strict=True))

    await db.execute("UPDATE campaigns SET name = 'b2', priority = 5 WHERE id = $1", ids[1])
    await db.execute("DELETE FROM campaigns WHERE id = $1", ids[0])
    (new,) = await insert_campaigns(db, workspace, "d")
    await follow_until(call, replica, lambda r: len(r.changes) == 3)
    assert [(c.operation, c.row["id"]) for c in replica.changes] == [
        (UPDATE, ids[1]),
        (DELETE, ids[0]),
        (INSERT, new),
    ]
    assert replica.changes[0].row["priority"] == 5
    assert replica.changes[1].row["name"] == "a"  # a delete carries the row as it was
    assert replica.names() == {ids[1]: "b2", ids[2]: "c", new: "d"}
    assert replica.rows == await truth(sync, workspace)
    call.cancel()


async def test_non_following_stream_ends_after_the_snapshot_and_pending_changes(
    sync: Stub, db: asyncpg.Connection, workspace: str
) -> None:
    await insert_campaigns(db, workspace, "x")
    first = await read_all(sync, request(workspace))
    assert first.messages[-1].event in (SNAPSHOT_DONE, CHECKPOINT)
    await insert_campaigns(db, workspace, "y")
    second = await read_all(sync, request(workspace, token=first.token), first)
    assert sorted(second.names().values()) == ["x", "y"]
    # Nothing pending: the stream ends at once, with at most a checkpoint.
    third = await read_all(sync, request(workspace, token=second.token))
    assert all(m.event == CHECKPOINT for m in third.messages)


# ---------------------------------------------------------------------------
# Exact resume


async def write_changes(
    db: asyncpg.Connection, workspace: str, rounds: range | Sequence[int]
) -> int:
    """About 5 changes a round over both tables: inserts, updates (some multi-row, in
    one transaction) and deletes; returns how many change-log entries they made."""
    ws = uuid.UUID(workspace)
    made = 0
    for i in rounds:
        async with db.transaction():
            ids = await db.fetch(
                "INSERT INTO campaigns (workspace_id, name, priority) "
                "VALUES ($1, $2, $3), ($1, $4, $3) RETURNING id",
                ws,
                f"r{i}a",
                i,
                f"r{i}b",
            )
            await db.execute(
                "INSERT INTO campaign_events (workspace_id, campaign_id, kind) VALUES ($1, $2, $3)",
                ws,
                ids[0]["id"],
                f"made {i}",
            )
            made += 3
        # One statement, several rows.
        status = await db.execute(
            "UPDATE campaigns SET priority = priority + 1 WHERE workspace_id = $1 AND priority < 3",
            ws,
        )
        made += int(status.split()[-1])
        if i % 3 == 2:
            status = await db.execute(
                "DELETE FROM campaigns WHERE id = (SELECT min(id) FROM campaigns "
                "WHERE workspace_id = $1 AND NOT EXISTS (SELECT 1 FROM campaign_events e "
                "WHERE e.campaign_id = campaigns.id))",
                ws,
            )
            made += int(status.split()[-1])
        if i % 4 == 0:
            made += int(
                (
                    await db.execute(
                        "UPDATE campaign_events SET kind = kind || '!' WHERE workspace_id = $1",
                        ws,
                    )
                ).split()[-1]
            )
    return made


async def test_resume_from_every_position_gives_exactly_the_rest(
    sync: Stub, db: asyncpg.Connection, workspace: str
) -> None:
    await insert_campaigns(db, workspace, *(f"seed{i}" for i in range(9)))
    call = sync.Sync(request(workspace, tables=TABLES, follow=True, batch_size=7))
    recorded = Replica()
    await follow_until(call, recorded, lambda r: r.snapshot_done)
    made = rounds = 0
    while made < 200:
        made += await write_changes(db, workspace, range(rounds, rounds + 5))
        rounds += 5
        # Read as the writes go, so the recording spans many epochs.
        await follow_until(call, recorded, at_least(made - 30), within=10.0)
    await follow_until(call, recorded, lambda r: len(r.changes) == made, within=10.0)
    call.cancel()
    final = await truth(sync, workspace, TABLES)
    assert recorded.rows == final
    assert len({c.seq for c in recorded.changes}) == made

    messages = recorded.messages
    epochs = sum(1 for m in messages if m.event == CHANGES and len(m.sequences) < 7)
    assert epochs > 5, "the recording should span several epochs and pages"
    for i, message in enumerate(messages):
        # A consumer that applied messages[: i + 1] and resumes with its token...
        replica = Replica()
        for earlier in messages[: i + 1]:
            replica.apply(earlier)
        before = len(replica.changes)
        await read_all(sync, request(workspace, tables=TABLES, token=message.resume_token), replica)
        # ...ends with the tables' rows, having seen exactly the remaining changes.
        assert replica.rows == final, f"resumed after message {i}"
        if replica.snapshot_done and message.event != SNAPSHOT_ROWS:
            assert replica.changes[before:] == recorded.changes[before:], f"after message {i}"


async def test_a_transaction_that_took_an_earlier_sequence_and_commits_last_is_not_lost(
    sync: Stub, db: asyncpg.Connection, database_url: str, workspace: str
) -> None:
    call = sync.Sync(request(workspace, follow=True))
    replica = Replica()
    await follow_until(call, replica, lambda r: r.snapshot_done)
    late = await asyncpg.connect(database_url)
    try:
        slow = late.transaction()
        await slow.start()
        (late_id,) = await insert_campaigns(late, workspace, "late")  # takes its sequence first
        (early_id,) = await insert_campaigns(db, workspace, "early")  # commits first
        await follow_until(call, replica, lambda r: early_id in r.names())
        assert late_id not in replica.names()
        await slow.commit()
    finally:
        await late.close()
    await follow_until(call, replica, lambda r: late_id in r.names())
    early_seq, late_seq = (c.seq for c in replica.changes)
    assert late_seq < early_seq, "the late transaction took its sequence value first"
    assert replica.rows == await truth(sync, workspace)
    call.cancel()


async def test_a_lower_transaction_id_changing_a_row_after_a_higher_one_wins(
    sync: Stub, db: asyncpg.Connection, database_url: str, workspace: str
) -> None:
    (row_id,) = await insert_campaigns(db, workspace, "contested")
    call = sync.Sync(request(workspace, follow=True))
    replica = Replica()
    await follow_until(call, replica, lambda r: r.snapshot_done)
    low, high = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        low_tx, high_tx = low.transaction(), high.transaction()
        await low_tx.start()
        low_xid = int(await low.fetchval("SELECT pg_current_xact_id()::text"))
        await high_tx.start()
        high_xid = int(await high.fetchval("SELECT pg_current_xact_id()::text"))
        assert low_xid < high_xid
        await high.execute("UPDATE campaigns SET status = 'high' WHERE id = $1", row_id)
        await high_tx.commit()
        await low.execute("UPDATE campaigns SET status = 'low' WHERE id = $1", row_id)
        await low_tx.commit()
    finally:
        await low.close()
        await high.close()
    await follow_until(call, replica, lambda r: len(r.changes) == 2)
    assert [c.row["status"] for c in replica.changes] == ["high", "low"]
    assert replica.rows[("campaigns", row_id)]["status"] == "low"
    assert replica.rows == await truth(sync, workspace)
    call.cancel()


async def test_changes_committed_during_the_snapshot_arrive_exactly_once(
    sync: Stub, db: asyncpg.Connection, workspace: str
) -> None:
    ids = await insert_campaigns(db, workspace, *(f"s{i:02}" for i in range(30)))
    call = sync.Sync(request(workspace, follow=True, batch_size=5))
    replica = Replica()
    await follow_until(call, replica, lambda r: len(r.messages) == 1)
    # Rows already sent, rows not yet sent, rows the snapshot never sees.
    await db.execute(
        "UPDATE campaigns SET status = 'changed' WHERE id = ANY($1)", [ids[0], ids[-1]]
    )
    await db.execute("DELETE FROM campaigns WHERE id = ANY($1)", [ids[1], ids[-2]])
    (new,) = await insert_campaigns(db, workspace, "during")
    await follow_until(call, replica, lambda r: r.snapshot_done)
    assert len(replica.rows) == 30, "the snapshot shows the rows as they were when it began"
    await follow_until(call, replica, lambda r: len(r.changes) == 5)
    assert sorted((c.operation, c.row["id"]) for c in replica.changes) == sorted(
        [(UPDATE, ids[0]), (UPDATE, ids[-1]), (DELETE, ids[1]), (DELETE, ids[-2]), (INSERT, new)]
    )
    assert replica.rows == await truth(sync, workspace)
    await db.execute("UPDATE campaigns SET status = 'after' WHERE id = $1", ids[5])
    await follow_until(call, replica, lambda r: len(r.changes) == 6)
    call.cancel()


async def cut_after(stub: Stub, req: pb.SyncRequest, replica: Replica, count: int) -> None:
    """Applies `count` messages of a stream, then drops it (a crashed consumer)."""
    call = stub.Sync(req)
    async with asyncio.timeout(10.0):
        for _ in range(count):
            message = await call.read()
            assert message is not grpc.aio.EOF
            replica.apply(message)
    call.cancel()


async def test_snapshot_phase_resume_under_new_snapshots_is_exact(
    sync: Stub, db: asyncpg.Connection, workspace: str
) -> None:
    ws = uuid.UUID(workspace)
    ids = await insert_campaigns(db, workspace, *(f"p{i:02}" for i in range(20)))
    await db.execute(
        "INSERT INTO campaign_events (workspace_id, campaign_id, kind) "
        "SELECT $1, id, 'seed' FROM unnest($2::bigint[]) AS id",
        ws,
        ids[:6],
    )
    replica = Replica()
    # Two messages: the first 8 campaigns, read under snapshot S1.
    await cut_after(sync, request(workspace, tables=TABLES, batch_size=4), replica, 2)
    assert not replica.snapshot_done
    # Rows the consumer has and rows it does not; a key change; a new row.
    await db.execute("UPDATE campaigns SET status = 'u1' WHERE id = ANY($1)", [ids[1], ids[15]])
    await db.execute("DELETE FROM campaigns WHERE id = ANY($1)", [ids[7], ids[16]])
    await db.execute("UPDATE campaigns SET id = id + 1000000 WHERE id = $1", ids[6])
    await insert_campaigns(db, workspace, "p-new-1")
    await db.execute("UPDATE campaign_events SET kind = 'u1' WHERE campaign_id = $1", ids[0])

    # Resumed under S2, cut again inside the events table.
    token = replica.token
    await cut_after(sync, request(workspace, tables=TABLES, batch_size=4, token=token), replica, 5)
    assert not replica.snapshot_done
    await db.execute("UPDATE campaigns SET status = 'u2' WHERE id = ANY($1)", [ids[2], ids[12]])
    await db.execute("UPDATE campaign_events SET kind = 'u2' WHERE campaign_id = ANY($1)", ids[:6])
    await db.execute("DELETE FROM campaigns WHERE id = $1", ids[19])
    await db.execute("UPDATE campaigns SET id = id + 2000000 WHERE id = $1", ids[13])

    # Resumed under S3, to the end.
    await read_all(
        sync, request(workspace, tables=TABLES, batch_size=4, token=replica.token), replica
    )
    assert replica.snapshot_done
    assert replica.rows == await truth(sync, workspace, TABLES)
    # The token of the end carries no boundaries any more: later changes come plainly.
    await db.execute("UPDATE campaigns SET status = 'u3' WHERE id = $1", ids[3])
    await read_all(sync, request(workspace, tables=TABLES, token=replica.token), replica)
    assert replica.rows == await truth(sync, workspace, TABLES)
    assert replica.changes[-1].row["status"] == "u3"


async def test_a_key_change_arrives_as_a_delete_and_an_insert(
    sync: Stub, db: asyncpg.Connection, workspace: str
) -> None:
    (row_id,) = await insert_campaigns(db, workspace, "rekeyed")
    start = await read_all(sync, request(workspace))
    await db.execute("UPDATE campaigns SET id = id + 3000000 WHERE id = $1", row_id)
    after = await read_all(sync, request(workspace, token=start.token), start)
    assert [(c.operation, c.row["id"]) for c in after.changes] == [
        (DELETE, row_id),
        (INSERT, row_id + 3000000),
    ]


async def test_truncate_arrives_as_deletes(
    sync: Stub, server: RunningServer, db: asyncpg.Connection, settings: Settings, workspace: str
) -> None:
    # Truncating the shared test table would hit other workspaces: use a table of its own.
    await db.execute(
        "CREATE TABLE sync_truncated (id int PRIMARY KEY, workspace_id uuid NOT NULL, note text)"
    )
    try:
        await install_capture(settings, "sync_truncated")
        await server.catalog.reload()
        await db.execute(
            "INSERT INTO sync_truncated SELECT g, $1, 'n' FROM generate_series(1, 3) AS g",
            uuid.UUID(workspace),
        )
        start = await read_all(sync, request(workspace, tables=["sync_truncated"]))
        assert len(start.rows) == 3
        await db.execute("TRUNCATE sync_truncated")
        after = await read_all(
            sync, request(workspace, tables=["sync_truncated"], token=start.token), start
        )
        assert sorted((c.operation, c.row["id"]) for c in after.changes) == [
            (DELETE, 1),
            (DELETE, 2),
            (DELETE, 3),
        ]
        assert after.rows == {}
    finally:
        await db.execute("DROP TABLE sync_truncated")


# ---------------------------------------------------------------------------
# Replicas, shutdown and reconnects


async def test_a_stream_resumes_on_another_server(
    sync: Stub, db: asyncpg.Connection, settings: Settings, captured: None, workspace: str
) -> None:
    await insert_campaigns(db, workspace, "one")
    first = await read_all(sync, request(workspace))
    await insert_campaigns(db, workspace, "two")
    other = await start_server(settings)  # the same database and token key
    try:
        async with authorized_channel(other.address) as channel:
            resumed = await read_all(Stub(channel), request(workspace, token=first.token), first)
    finally:
        await other.stop(grace=0)
    assert sorted(resumed.names().values()) == ["one", "two"]
    assert [c.row["name"] for c in resumed.changes] == ["two"]


async def test_server_stop_ends_follow_streams_at_once_and_they_resume_elsewhere(
    sync: Stub, db: asyncpg.Connection, settings: Settings, captured: None, workspace: str
) -> None:
    stopping = await start_server(settings, shutdown_grace_seconds=5.0)
    replica = Replica()
    try:
        async with authorized_channel(stopping.address) as channel:
            call = Stub(channel).Sync(request(workspace, follow=True))
            await follow_until(call, replica, lambda r: r.snapshot_done)
            await insert_campaigns(db, workspace, "before stop")
            await follow_until(call, replica, lambda r: len(r.changes) == 1)
            stop = asyncio.create_task(stopping.stop())
            began = asyncio.get_running_loop().time()
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await follow_until(call, replica, lambda r: False, within=2.0)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_reason(ended.value) == "SERVER_SHUTTING_DOWN"
            assert asyncio.get_running_loop().time() - began < 1.0
            await stop
    finally:
        await stopping.stop(grace=0)
    await insert_campaigns(db, workspace, "after stop")
    await read_all(sync, request(workspace, token=replica.token), replica)
    assert [c.row["name"] for c in replica.changes] == ["before stop", "after stop"]


LISTENERS = """
SELECT pid FROM pg_stat_activity WHERE datname = current_database()
AND application_name = 'raptorflow-data' AND query LIKE 'LISTEN%'
"""


async def test_changes_missed_while_listen_reconnects_are_read_after_it(
    db: asyncpg.Connection, settings: Settings, captured: None, workspace: str
) -> None:
    # A long poll interval: only the LISTEN connection can wake the stream in time.
    running = await start_server(settings, sync_poll_seconds=60.0)
    try:
        async with authorized_channel(running.address) as channel:
            call = Stub(channel).Sync(request(workspace, follow=True))
            replica = Replica()
            await follow_until(call, replica, lambda r: r.snapshot_done)
            async with asyncio.timeout(5.0):
                while True:  # the server connects its listener in the background
                    listeners = await db.fetch(LISTENERS)
                    if listeners:
                        break
                    await asyncio.sleep(0.05)
            for listener in listeners:
                await db.execute("SELECT pg_terminate_backend($1)", listener["pid"])
            # Committed while no connection listens: its NOTIFY reaches nobody.
            await insert_campaigns(db, workspace, "unheard")
            await follow_until(call, replica, lambda r: len(r.changes) == 1, within=5.0)
            # And notifications work again afterwards.
            await insert_campaigns(db, workspace, "heard")
            await follow_until(call, replica, lambda r: len(r.changes) == 2, within=2.0)
            call.cancel()
    finally:
        await running.stop(grace=0)


async def test_idle_followers_hold_no_connection_and_share_their_reads(
    db: asyncpg.Connection, settings: Settings, captured: None, workspace: str
) -> None:
    running = await start_server(settings, sync_checkpoint_seconds=60.0)
    followers = 100
    try:
        async with authorized_channel(running.address) as channel:
            stub = Stub(channel)
            calls = [stub.Sync(request(workspace, follow=True)) for _ in range(followers)]
            replicas = [Replica() for _ in calls]
            await asyncio.gather(
                *(
                    follow_until(c, r, lambda r: r.snapshot_done, within=20.0)
                    for c, r in zip(calls, replicas, strict=True)
                )
            )

            async def everyone_sees(count: int) -> None:
                await asyncio.gather(
                    *(
                        follow_until(c, r, lambda r: len(r.changes) == count)
                        for c, r in zip(calls, replicas, strict=True)
                    )
                )

            await insert_campaigns(db, workspace, "first")  # brings them to one position
            await everyone_sees(1)
            await asyncio.sleep(0.2)
            assert running.database.pool_stats()["in_use"] == 0
            assert running.sync_streams.stats()["waiting_streams"] == followers
            reads = running.sync_streams.page_reads
            await insert_campaigns(db, workspace, "second")
            await everyone_sees(2)
            shared = running.sync_streams.page_reads - reads
            assert shared <= 3, f"{followers} followers at one position read {shared} pages"
            await asyncio.sleep(0.2)
            assert running.database.pool_stats()["in_use"] == 0
            for call in calls:
                call.cancel()
    finally:
        await running.stop(grace=0)


async def test_a_consumer_that_stops_reading_stops_the_reads_for_it(
    db: asyncpg.Connection, settings: Settings, captured: None, workspace: str
) -> None:
    running = await start_server(settings)
    ws = uuid.UUID(workspace)
    written = 0
    writing = True

    async def write() -> None:
        nonlocal written
        while writing:
            # 20 rows of 64 KiB each as the consumer sees them (PostgreSQL compresses them).
            await db.execute(
                "INSERT INTO campaigns (workspace_id, name, status) "
                "SELECT $1, 'bp' || $2::int || '-' || g, repeat('x', 65536) "
                "FROM generate_series(1, 20) AS g",
                ws,
                written,
            )
            written += 20
            await asyncio.sleep(0.02)

    writer = None
    try:
        async with authorized_channel(running.address) as channel:
            call = Stub(channel).Sync(request(workspace, follow=True, batch_size=10))
            replica = Replica()
            await follow_until(call, replica, lambda r: r.snapshot_done)
            reads_before = running.sync_streams.page_reads
            writer = asyncio.create_task(write())
            # The consumer reads nothing now. Once the transport's buffers are full the
            # server stops asking the change log for more, while the writes go on.
            history = []
            async with asyncio.timeout(20.0):
                while True:
                    await asyncio.sleep(0.5)
                    history.append((running.sync_streams.page_reads, written))
                    if len(history) >= 5 and history[-5][0] == history[-1][0]:
                        break
            assert history[-1][1] > history[-5][1], "the writer kept writing meanwhile"
            assert history[-1][0] > reads_before, "the server read for it until buffers filled"
            writing = False
            await writer
            # Reading again, the consumer gets everything, in order.
            await follow_until(call, replica, lambda r: len(r.changes) == written, within=20.0)
            call.cancel()
    finally:
        writing = False
        if writer is not None:
            await writer
        await running.stop(grace=0)
    assert [c.operation for c in replica.changes] == [INSERT] * written


# ---------------------------------------------------------------------------
# Refusals and isolation


async def test_tokens_of_another_workspace_or_table_list_or_altered_are_refused(
    sync: Stub, workspace: str, other_workspace: str
) -> None:
    token = (await read_all(sync, request(workspace, tables=TABLES))).token
    cases = [
        request(other_workspace, tables=TABLES, token=token),
        request(workspace, tables=["campaigns"], token=token),
        request(workspace, tables=list(reversed(TABLES)), token=token),
        request(
            workspace, tables=TABLES, token=token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")
        ),
        request(workspace, tables=TABLES, token="not a token"),
    ]
    for req in cases:
        failure = await rpc_error(read_all(sync, req))
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
        assert failure.reason == "INVALID_RESUME_TOKEN"
        assert failure.fields == ["resume_token"]
    ack = pb.AcknowledgeSyncRequest(
        workspace_id=other_workspace, consumer_id="memory", resume_token=token
    )
    failure = await rpc_error(sync.AcknowledgeSync(ack))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "INVALID_RESUME_TOKEN"


async def test_a_table_without_capture_or_key_is_refused(
    sync: Stub, server: RunningServer, db: asyncpg.Connection, workspace: str
) -> None:
    failure = await rpc_error(
        read_all(sync, request(workspace, tables=[ODD_TABLE])), echoed=ODD_TABLE
    )
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "SYNC_NOT_INSTALLED"
    await db.execute("CREATE TABLE sync_keyless (workspace_id uuid NOT NULL, note text)")
    try:
        await server.catalog.reload()
        failure = await rpc_error(read_all(sync, request(workspace, tables=["sync_keyless"])))
        assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
        assert failure.reason == "PRIMARY_KEY_REQUIRED"
    finally:
        await db.execute("DROP TABLE sync_keyless")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"workspace_id": "nope"}, "workspace_id"),
        ({"tables": []}, "tables"),
        ({"tables": ["campaigns", "campaigns"]}, "tables[1]"),
        ({"tables": ["no_such_table"]}, "tables[0]"),
        ({"tables": ["internal_secrets"]}, "tables[0]"),
        ({"batch_size": 10_001}, "batch_size"),
        ({"batch_size": -1}, "batch_size"),
        ({"consumer_id": "c" * 129}, "consumer_id"),
    ],
)
async def test_bad_requests_are_invalid_argument(
    sync: Stub, workspace: str, changes: dict[str, Any], field: str
) -> None:
    req = request(workspace)
    for name, value in changes.items():
        if name == "tables":
            del req.tables[:]
            req.tables.extend(value)
        else:
            setattr(req, name, value)
    failure = await rpc_error(read_all(sync, req))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.fields == [field]


async def test_streams_never_carry_another_workspace_and_moved_rows_leave_and_arrive(
    sync: Stub, db: asyncpg.Connection, workspace: str, other_workspace: str
) -> None:
    (mine,) = await insert_campaigns(db, workspace, "mine")
    (theirs,) = await insert_campaigns(db, other_workspace, "theirs")
    ours = sync.Sync(request(workspace, follow=True))
    other = sync.Sync(request(other_workspace, follow=True))
    replica, other_replica = Replica(), Replica()
    await follow_until(ours, replica, lambda r: r.snapshot_done)
    await follow_until(other, other_replica, lambda r: r.snapshot_done)
    assert replica.names() == {mine: "mine"}
    assert other_replica.names() == {theirs: "theirs"}
    await db.execute("UPDATE campaigns SET status = 'x' WHERE id = $1", theirs)
    await db.execute(
        "UPDATE campaigns SET workspace_id = $1 WHERE id = $2", uuid.UUID(other_workspace), mine
    )
    await follow_until(ours, replica, lambda r: len(r.changes) == 1)
    await follow_until(other, other_replica, lambda r: len(r.changes) == 2)
    assert [(c.operation, c.row["id"]) for c in replica.changes] == [(DELETE, mine)]
    assert [(c.operation, c.row["id"]) for c in other_replica.changes] == [
        (UPDATE, theirs),
        (INSERT, mine),
    ]
    for r in (replica, other_replica):
        for row in r.rows.values():
            assert row["workspace_id"] == (workspace if r is replica else other_workspace)
    ours.cancel()
    other.cancel()


# ---------------------------------------------------------------------------
# Exact values


async def test_snapshot_and_change_rows_carry_the_same_exact_values(
    sync: Stub, db: asyncpg.Connection, workspace: str
) -> None:
    ws = uuid.UUID(workspace)
    campaign = await db.fetchval(
        "INSERT INTO campaigns (workspace_id, name, status, priority, budget, score, active, "
        "created_at, starts_on, external_id, payload, meta, tags, embedding) VALUES "
        "($1, 'exact', NULL, 2147483647, 123456789012.50, 5e-324, true, "
        "'2024-02-29 12:34:56.789012+00', '1969-12-31', "
        "'0b9e5a3c-1d2f-4a5b-8c7d-6e5f4a3b2c1d', '\\x00ff', "
        '\'{"a": [1, 2.50, null], "b": "\u00fc"}\', \'{a,NULL,"b c"}\', \'{1.5,-0.25}\') '
        "RETURNING id",
        ws,
    )
    event = await db.fetchval(
        "INSERT INTO campaign_events (workspace_id, campaign_id, kind, happened_at, counts, "
        "info, note, address, small, ratio, big) VALUES ($1, $2, 'k', '0001-01-01 00:00:00', "
        "'{9223372036854775807,-1,NULL}', '{\"k\": \"v\"}', 'n', '10.0.0.1', -32768, 0.1, "
        "0.0000001) RETURNING id",
        ws,
        campaign,
    )
    start = await read_all(sync, request(workspace, tables=TABLES))
    snapshot = dict(start.rows)
    await db.execute("UPDATE campaigns SET active = false WHERE id = $1", campaign)
    await db.execute("UPDATE campaign_events SET small = 32767 WHERE id = $1", event)
    after = await read_all(sync, request(workspace, tables=TABLES, token=start.token), start)
    changed_campaign, changed_event = (c.row for c in after.changes)
    assert changed_campaign == {**snapshot["campaigns", campaign], "active": False}
    assert changed_event == {**snapshot["campaign_events", event], "small": 32767}

    row = snapshot["campaigns", campaign]
    assert row["priority"] == 2147483647
    assert row["budget"] == "123456789012.50"
    assert row["score"] == 5e-324
    assert row["status"] is None
    assert row["created_at"] == 1709210096789012  # microseconds since 1970
    assert row["starts_on"] == -1
    assert row["external_id"] == "0b9e5a3c-1d2f-4a5b-8c7d-6e5f4a3b2c1d"
    assert row["payload"] == b"\x00\xff"
    assert row["workspace_id"] == workspace
    assert [v.WhichOneof("kind") for v in row["tags"].array_value.values] == [
        "string_value",
        "null_value",
        "string_value",
    ]
    assert list(row["embedding"].vector_value.values) == [1.5, -0.25]
    event_row = snapshot["campaign_events", event]
    assert event_row["happened_at"] == -62135596800 * 1_000_000
    assert event_row["big"] == "0.0000001"
    assert event_row["address"] == "10.0.0.1"
    assert event_row["info"] == '{"k": "v"}'
    columns = {
        c.name: c for m in start.messages if m.rows.table == "campaigns" for c in m.rows.columns
    }
    assert columns["created_at"].WhichOneof("values") == "timestamp_micros"
    assert columns["budget"].WhichOneof("values") == "string_values"
    assert columns["tags"].WhichOneof("values") == "other_values"
    assert list(columns["status"].null_rows) == [0]


async def test_a_lost_database_ends_follow_streams_with_unavailable(
    db: asyncpg.Connection, settings: Settings, captured: None, sync: Stub, workspace: str
) -> None:
    async with TcpProxy.for_database(settings.database_url) as proxy:
        running = await start_server(
            settings, database_url=proxy.database_url(settings.database_url)
        )
        try:
            async with authorized_channel(running.address) as channel:
                call = Stub(channel).Sync(request(workspace, follow=True))
                replica = Replica()
                await follow_until(call, replica, lambda r: r.snapshot_done)
                await insert_campaigns(db, workspace, "seen")
                await follow_until(call, replica, lambda r: len(r.changes) == 1)
                await proxy.cut()
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await follow_until(call, replica, lambda r: False, within=5.0)
                assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
                assert error_reason(ended.value) == "DATABASE_UNAVAILABLE"
        finally:
            await proxy.restore()
            await running.stop(grace=0)
    # Another replica takes over from the last token.
    await insert_campaigns(db, workspace, "after")
    await read_all(sync, request(workspace, token=replica.token), replica)
    assert [c.row["name"] for c in replica.changes] == ["seen", "after"]
