"""End-to-end tests of the typed client against the real server and a real PostgreSQL.

Every call goes through `DataClient` as an `async with` resource; what the
server really wrote is checked through the direct `db` connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
import grpc
import pytest
from conftest import CAMPAIGN_COLUMNS, start_server
from pg_activity import wait_for_lock_waits
from raptorflow.data.client import (
    ERROR_DOMAIN,
    MAX_TIMEOUT_SECONDS,
    AlreadyExists,
    ClientConfig,
    DataClient,
    DataError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Json,
    MemoryRecord,
    SelectResult,
    Unavailable,
    UpsertCounts,
    Vector,
    any_of,
    eq,
)
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from tokens import ADMIN_TOKEN


@pytest.fixture(scope="module")
async def client(server: RunningServer) -> AsyncIterator[DataClient]:
    async with DataClient(ClientConfig(server.address, token=ADMIN_TOKEN)) as data_client:
        yield data_client


@pytest.fixture
def refused_address() -> Iterator[str]:
    """An address where nothing listens: a bound port that never listens refuses
    connections, and holding it keeps any other process from taking it meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


async def _names(db: asyncpg.Connection, workspace: str) -> dict[str, asyncpg.Record]:
    rows = await db.fetch("SELECT * FROM campaigns WHERE workspace_id = $1", UUID(workspace))
    return {row["name"]: row for row in rows}


# --------------------------------------------------------------------------
# The README's flow


async def test_readme_flow_verbatim(
    server: RunningServer,
    db: asyncpg.Connection,
    workspace: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = datetime.now(UTC)
    await db.executemany(
        "INSERT INTO campaigns (workspace_id, name, status, created_at) VALUES ($1, $2, $3, $4)",
        [
            (UUID(workspace), f"old-{i}", "active" if i % 2 == 0 else "paused", now - timedelta(i))
            for i in range(30)
        ],
    )
    workspace_id = workspace
    streamed: list[Any] = []

    # From README.md "Using it"; only the body of the last loop is filled in.
    async with DataClient(ClientConfig(server.address, token=ADMIN_TOKEN)) as client:
        campaigns = client.workspace(workspace_id).table("campaigns")

        page = await (
            campaigns.select("id", "name")
            .eq("status", "active")
            .order("created_at", desc=True)
            .limit(20)
            .execute()
        )
        for row in page.data:  # list of dicts with typed values
            print(row["id"], row["name"])

        created = await campaigns.insert(
            {"name": "Spring", "status": "active"}, returning=("id",)
        ).execute()
        await campaigns.update({"status": "paused"}).eq("id", created.data[0]["id"]).execute()

        async for row in campaigns.select("id").stream():  # follows page tokens
            streamed.append(row["id"])

    # The 15 active rows, newest first (old-0, old-2, ...), under the 20-row limit.
    printed = [line.split(" ", 1) for line in capsys.readouterr().out.splitlines()]
    assert [name for _, name in printed] == [f"old-{i}" for i in range(0, 30, 2)]
    stored = await _names(db, workspace)
    assert [int(row_id) for row_id, _ in printed] == [
        stored[f"old-{i}"]["id"] for i in range(0, 30, 2)
    ]
    assert all(isinstance(row["id"], int) for row in page.data)
    assert page.columns == ["id", "name"]
    assert page.next_page_token == ""
    assert created.columns == ["id"]
    assert created.count == 1
    spring_id = created.data[0]["id"]
    assert stored["Spring"]["id"] == spring_id
    assert stored["Spring"]["status"] == "paused"
    assert sorted(streamed) == sorted(row["id"] for row in stored.values())
    assert len(streamed) == 31


# --------------------------------------------------------------------------
# Values


EVERY_TYPE: dict[str, Any] = {
    "name": "every type ✓ \"quoted\" 'and' ;--",
    "status": None,
    "priority": 2_147_483_647,
    "budget": Decimal("123456789012.34"),
    "score": 0.1,
    "active": False,
    "created_at": datetime(
        2024, 2, 29, 23, 59, 58, 123_456, tzinfo=timezone(timedelta(hours=-5, minutes=-30))
    ),
    "starts_on": date(2024, 2, 29),
    "external_id": UUID("123e4567-e89b-12d3-a456-426614174000"),
    "payload": b"\x00\xff\x10binary",
    "meta": {"a": [1, 2.5, None, True], "nested": {"é": "ü"}, "empty": {}},
    "tags": ["alpha", "", None, "omega ✓"],
    "embedding": Vector([0.5, -1.25, 3.0, 1e-3]),
}


def _expected_read_back(column: str, sent: Any) -> Any:
    if isinstance(sent, Vector):
        # real[] keeps 32-bit floats: 1e-3 comes back as its float32 neighbour.
        return pytest.approx(list(sent.values), rel=1e-7)
    if isinstance(sent, datetime):
        return sent.astimezone(UTC)
    return sent


async def test_every_value_type_round_trips(
    client: DataClient, db: asyncpg.Connection, workspace: str
) -> None:
    campaigns = client.workspace(workspace).table("campaigns")
    created = await campaigns.insert(EVERY_TYPE).execute()
    assert created.columns == CAMPAIGN_COLUMNS
    written = created.data[0]
    assert written["workspace_id"] == UUID(workspace)

    read = await campaigns.select().eq("id", written["id"]).execute()
    assert read.data == [written]
    for column, sent in EVERY_TYPE.items():
        got = read.data[0][column]
        assert got == _expected_read_back(column, sent), column
        if sent is not None and not isinstance(sent, Vector):
            assert type(got) is type(sent), column
    assert read.data[0]["created_at"].tzinfo == UTC

    # What PostgreSQL holds, not just what the server echoes.
    stored = await db.fetchrow("SELECT * FROM campaigns WHERE id = $1", written["id"])
    assert stored is not None
    assert stored["created_at"] == EVERY_TYPE["created_at"]
    assert stored["budget"] == Decimal("123456789012.34")
    assert stored["payload"] == b"\x00\xff\x10binary"
    assert stored["tags"] == ["alpha", "", None, "omega ✓"]
    assert stored["starts_on"] == date(2024, 2, 29)

    # The same Python values work as filter operands, so each converts to its column's type.
    for column in ("created_at", "starts_on", "external_id", "budget", "payload", "active"):
        hits = await campaigns.select("id").eq(column, EVERY_TYPE[column]).execute()
        assert hits.data == [{"id": written["id"]}], column
    hits = await campaigns.select("id").contains("meta", {"nested": {"é": "ü"}}).execute()
    assert hits.data == [{"id": written["id"]}]


async def test_nulls_and_json_wrappers_round_trip(client: DataClient, workspace: str) -> None:
    campaigns = client.workspace(workspace).table("campaigns")
    nullable = [
        c for c in CAMPAIGN_COLUMNS if c not in ("id", "workspace_id", "name", "created_at")
    ]
    nulls = await campaigns.insert({"name": "nulls", **dict.fromkeys(nullable)}).execute()
    row = nulls.data[0]
    assert {column: row[column] for column in nullable} == dict.fromkeys(nullable)

    documents: list[tuple[str, Any]] = [
        ("json list", Json(["a", 1, None])),
        ("json string", Json("just text")),
        ("json number", Json(12.5)),
        ("json empty list", Json([])),
    ]
    for name, document in documents:
        written = await campaigns.insert({"name": name, "meta": document}).execute()
        assert written.data[0]["meta"] == document.value, name
    emptied = await campaigns.insert(
        {"name": "empty arrays", "tags": [], "embedding": Vector([])}
    ).execute()
    assert emptied.data[0]["tags"] == []
    assert emptied.data[0]["embedding"] == []
    is_nulls = await campaigns.select("name").is_null("priority").order("name").execute()
    assert [r["name"] for r in is_nulls.data] == sorted(
        ["nulls", "empty arrays", *(name for name, _ in documents)]
    )


# --------------------------------------------------------------------------
# Writes


async def test_count(client: DataClient, workspace: str, other_workspace: str) -> None:
    campaigns = client.workspace(workspace).table("campaigns")
    assert await campaigns.count().execute() == 0
    await campaigns.insert(
        [{"name": f"c{i}", "status": "active" if i < 4 else "paused"} for i in range(7)]
    ).execute()
    await (
        client.workspace(other_workspace)
        .table("campaigns")
        .insert({"name": "c0", "status": "active"})
        .execute()
    )
    assert await campaigns.count().execute() == 7
    assert await campaigns.count().eq("status", "active").execute() == 4
    assert await campaigns.count().where(any_of(eq("name", "c5"), eq("name", "c6"))).execute() == 2
    assert await campaigns.count().eq("status", "archived").execute() == 0


async def test_upsert_updates_or_ignores_on_conflict(
    client: DataClient, db: asyncpg.Connection, workspace: str
) -> None:
    campaigns = client.workspace(workspace).table("campaigns")
    first = await campaigns.insert({"name": "A", "priority": 1, "status": "draft"}).execute()
    original_id = first.data[0]["id"]

    updated = await campaigns.upsert(
        [{"name": "A", "priority": 5}, {"name": "B", "priority": 6}],
        on_conflict="workspace_id, name",
    ).execute()
    assert updated.count == 2
    assert {r["name"]: (r["id"] == original_id, r["priority"]) for r in updated.data} == {
        "A": (True, 5),
        "B": (False, 6),
    }

    limited = await campaigns.upsert(
        {"name": "A", "priority": 7, "status": "live"},
        on_conflict=("workspace_id", "name"),
        update_columns="status",
        returning=("priority", "status"),
    ).execute()
    assert limited.data == [{"priority": 5, "status": "live"}]

    ignored = await campaigns.upsert(
        [{"name": "A", "priority": 9}, {"name": "C", "priority": 3}],
        on_conflict="workspace_id, name",
        ignore_duplicates=True,
    ).execute()
    assert ignored.count == 1
    assert [r["name"] for r in ignored.data] == ["C"]

    stored = await _names(db, workspace)
    assert {name: row["priority"] for name, row in stored.items()} == {"A": 5, "B": 6, "C": 3}
    assert stored["A"]["id"] == original_id
    assert stored["A"]["status"] == "live"


async def test_delete_with_eq(client: DataClient, db: asyncpg.Connection, workspace: str) -> None:
    campaigns = client.workspace(workspace).table("campaigns")
    await campaigns.insert([{"name": n} for n in ("keep-1", "drop", "keep-2")]).execute()
    deleted = await campaigns.delete().eq("name", "drop").execute()
    assert deleted.count == 1
    assert [r["name"] for r in deleted.data] == ["drop"]
    none_left = await campaigns.delete().eq("name", "drop").returning().execute()
    assert (none_left.count, none_left.data, none_left.columns) == (0, [], [])
    assert sorted(await _names(db, workspace)) == ["keep-1", "keep-2"]


async def test_unfiltered_update_and_delete_raise_before_sending(
    client: DataClient, db: asyncpg.Connection, workspace: str, refused_address: str
) -> None:
    campaigns = client.workspace(workspace).table("campaigns")
    await campaigns.insert([{"name": "x", "priority": 1}, {"name": "y", "priority": 2}]).execute()

    with pytest.raises(ValueError, match=r"all_rows\(\)"):
        await campaigns.update({"priority": 0}).execute()
    with pytest.raises(ValueError, match=r"all_rows\(\)"):
        await campaigns.delete().execute()
    # Nothing was sent: against an address with no server the same calls still
    # fail with ValueError, not Unavailable.
    async with DataClient(refused_address) as nowhere:
        unsent = nowhere.workspace(workspace).table("campaigns")
        with pytest.raises(ValueError, match=r"all_rows\(\)"):
            await unsent.update({"priority": 0}).execute(timeout=1.0)
        with pytest.raises(ValueError, match=r"all_rows\(\)"):
            await unsent.delete().execute(timeout=1.0)
    assert {n: r["priority"] for n, r in (await _names(db, workspace)).items()} == {"x": 1, "y": 2}

    everything = await campaigns.update({"priority": 0}).all_rows().returning("name").execute()
    assert everything.count == 2
    assert sorted(r["name"] for r in everything.data) == ["x", "y"]
    assert {n: r["priority"] for n, r in (await _names(db, workspace)).items()} == {"x": 0, "y": 0}
    wiped = await campaigns.delete().all_rows().execute()
    assert wiped.count == 2
    assert await _names(db, workspace) == {}


async def test_batch_is_atomic(client: DataClient, db: asyncpg.Connection, workspace: str) -> None:
    ws = client.workspace(workspace)
    campaigns = ws.table("campaigns")
    base = await campaigns.insert({"name": "base", "priority": 1}).execute()
    base_id = base.data[0]["id"]

    with pytest.raises(InvalidArgument) as failed:
        await ws.batch(
            campaigns.insert({"name": "new"}),
            campaigns.update({"priority": 50}).eq("id", base_id),
            ws.table("campaign_events").insert({"campaign_id": base_id, "kind": "bumped"}),
            campaigns.insert({"name": "negative", "priority": -1}),
        )
    assert failed.value.reason == "CHECK_VIOLATION"
    assert failed.value.field_violations
    assert all(v.field.startswith("operations[3].insert") for v in failed.value.field_violations)
    # Nothing of the first three operations survived.
    stored = await _names(db, workspace)
    assert sorted(stored) == ["base"]
    assert stored["base"]["priority"] == 1
    assert (
        await db.fetchval(
            "SELECT count(*) FROM campaign_events WHERE workspace_id = $1", UUID(workspace)
        )
        == 0
    )

    with pytest.raises(AlreadyExists):
        await ws.batch(
            campaigns.update({"priority": 60}).eq("id", base_id),
            campaigns.insert({"name": "base"}),
        )
    assert (await _names(db, workspace))["base"]["priority"] == 1

    inserted, updated, deleted = await ws.batch(
        campaigns.insert([{"name": "n1"}, {"name": "n2"}], returning="name"),
        campaigns.update({"priority": 70}).eq("id", base_id).returning(),
        campaigns.delete().eq("name", "n1").returning("name"),
    )
    assert (inserted.count, [r["name"] for r in inserted.data]) == (2, ["n1", "n2"])
    assert (updated.count, updated.data) == (1, [])
    assert (deleted.count, deleted.data) == (1, [{"name": "n1"}])
    stored = await _names(db, workspace)
    assert sorted(stored) == ["base", "n2"]
    assert stored["base"]["priority"] == 70


# --------------------------------------------------------------------------
# Reading many rows


async def test_pages_and_stream_visit_every_row_once(
    client: DataClient, workspace: str, other_workspace: str
) -> None:
    campaigns = client.workspace(workspace).table("campaigns")
    written = await campaigns.insert(
        # Few distinct priorities, so pages split runs of equal sort keys and only
        # the primary-key tie-break keeps them from repeating or skipping rows.
        [{"name": f"row-{i:03}", "priority": i % 3} for i in range(250)],
        returning="id",
    ).execute()
    assert written.count == 250
    expected = {row["id"] for row in written.data}
    await (
        client.workspace(other_workspace)
        .table("campaigns")
        .insert([{"name": f"row-{i:03}"} for i in range(5)])
        .execute()
    )

    query = campaigns.select("id", "priority").order("priority", desc=True).limit(40)
    sizes: list[int] = []
    paged: list[Any] = []
    priorities: list[Any] = []
    async for page in query.pages():
        sizes.append(len(page.data))
        paged.extend(row["id"] for row in page.data)
        priorities.extend(row["priority"] for row in page.data)
    assert sizes == [40] * 6 + [10]
    assert len(paged) == 250
    assert set(paged) == expected
    assert priorities == sorted(priorities, reverse=True)

    streamed = [row["id"] async for row in query.stream()]
    assert streamed == paged

    # Unordered: the primary key alone pages the rows.
    plain = [row["id"] async for row in campaigns.select("id").limit(40).stream()]
    assert plain == sorted(expected)

    # A page token continues the query it came from.
    first = await query.execute()
    second = await query.page_token(first.next_page_token).execute()
    assert [r["id"] for r in first.data + second.data] == paged[:80]


# --------------------------------------------------------------------------
# Errors


async def test_unknown_column_is_invalid_argument_with_field_path(
    client: DataClient, workspace: str
) -> None:
    campaigns = client.workspace(workspace).table("campaigns")
    with pytest.raises(InvalidArgument) as selected:
        await campaigns.select("id", "nope").execute()
    err = selected.value
    assert err.reason == "UNKNOWN_COLUMN"
    assert err.domain == ERROR_DOMAIN
    assert err.metadata["column"] == "nope"
    assert [v.field for v in err.field_violations] == ["columns[1]"]
    assert isinstance(err.__cause__, grpc.aio.AioRpcError)
    assert "UNKNOWN_COLUMN" in str(err)
    assert "columns[1]" in str(err)

    with pytest.raises(InvalidArgument) as filtered:
        await campaigns.select().eq("nope", 1).execute()
    assert filtered.value.reason == "UNKNOWN_COLUMN"
    assert [v.field for v in filtered.value.field_violations] == ["filter.condition.column"]

    with pytest.raises(InvalidArgument) as unknown_table:
        await client.workspace(workspace).table("internal_secrets").select().execute()
    assert unknown_table.value.reason == "UNKNOWN_TABLE"
    assert [v.field for v in unknown_table.value.field_violations] == ["table"]


async def test_duplicate_name_is_already_exists(
    client: DataClient, db: asyncpg.Connection, workspace: str
) -> None:
    campaigns = client.workspace(workspace).table("campaigns")
    await campaigns.insert({"name": "twice", "priority": 1}).execute()
    with pytest.raises(AlreadyExists) as raised:
        await campaigns.insert({"name": "twice", "priority": 2}).execute()
    assert raised.value.reason == "UNIQUE_VIOLATION"
    assert raised.value.domain == ERROR_DOMAIN
    assert isinstance(raised.value, DataError)
    assert [r["priority"] for r in (await _names(db, workspace)).values()] == [1]


async def test_foreign_key_violation_is_failed_precondition(
    client: DataClient, db: asyncpg.Connection, workspace: str
) -> None:
    missing = await db.fetchval("SELECT coalesce(max(id), 0) + 1000 FROM campaigns")
    events = client.workspace(workspace).table("campaign_events")
    with pytest.raises(FailedPrecondition) as raised:
        await events.insert({"campaign_id": missing, "kind": "orphan"}).execute()
    assert raised.value.reason == "FOREIGN_KEY_VIOLATION"
    assert raised.value.metadata.get("table") == "campaign_events"
    assert (
        await db.fetchval(
            "SELECT count(*) FROM campaign_events WHERE workspace_id = $1", UUID(workspace)
        )
        == 0
    )


async def test_deadline_exceeded_while_blocked_on_a_lock(
    client: DataClient, db: asyncpg.Connection, database_url: str, workspace: str
) -> None:
    campaigns = client.workspace(workspace).table("campaigns")
    await campaigns.insert({"name": "locked"}).execute()
    observer = await asyncpg.connect(database_url)
    lock = db.transaction()
    await lock.start()
    try:
        await db.execute("LOCK TABLE campaigns IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await campaigns.select("name").execute(timeout=0.2)
        assert time.monotonic() - started < 2.0
        # The server cancelled its statement: no backend of the service is left
        # waiting for the lock, although the lock is still held.
        waiting = -1
        for _ in range(50):
            waiting = await observer.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'raptorflow-data' AND wait_event_type = 'Lock'"
            )
            if waiting == 0:
                break
            await asyncio.sleep(0.05)
        assert waiting == 0
    finally:
        await lock.rollback()
        await observer.close()
    after = await campaigns.select("name").execute(timeout=2.0)
    assert after.data == [{"name": "locked"}]


async def test_unavailable_without_a_server(refused_address: str, workspace: str) -> None:
    async with DataClient(refused_address) as nowhere:
        campaigns = nowhere.workspace(workspace).table("campaigns")
        started = time.monotonic()
        with pytest.raises(Unavailable) as read:
            await campaigns.select().execute(timeout=15.0)
        # Reads are retried (backoff at most 0.3 + 0.6 + 1.2 + 2.4 s), but a refused
        # connection ends them well before the deadline.
        assert time.monotonic() - started < 10.0
        assert read.value.code is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(Unavailable):
            await campaigns.insert({"name": "never"}).execute(timeout=5.0)
    with pytest.raises(Unavailable):
        await DataClient.connect(refused_address, timeout=0.3)


async def test_a_long_client_timeout_works_and_one_grpc_cannot_send_is_refused(
    server: RunningServer, workspace: str
) -> None:
    # ClientConfig(timeout=inf) (or 1e10) used to be accepted, and then every call
    # failed at once with DEADLINE_EXCEEDED: gRPC's deadline overflowed.
    for timeout in (1e9, MAX_TIMEOUT_SECONDS):
        config = ClientConfig(server.address, token=ADMIN_TOKEN, timeout=timeout)
        async with DataClient(config) as patient:
            assert await patient.workspace(workspace).table("campaigns").count().execute() == 0
            assert await patient.describe_tables(timeout=timeout)
    for timeout in (1e10, float("inf")):
        with pytest.raises(ValueError, match="None sets no deadline"):
            ClientConfig(server.address, token=ADMIN_TOKEN, timeout=timeout)


# --------------------------------------------------------------------------
# Workspaces, catalog, metadata


async def test_workspaces_are_isolated(
    client: DataClient, db: asyncpg.Connection, workspace: str, other_workspace: str
) -> None:
    a = client.workspace(workspace).table("campaigns")
    b = client.workspace(UUID(other_workspace)).table("campaigns")
    await a.insert([{"name": "shared", "priority": 1}, {"name": "only-a", "priority": 1}]).execute()
    b_row = await b.insert({"name": "shared", "priority": 2}).execute()
    b_id = b_row.data[0]["id"]

    assert sorted(r["name"] for r in (await a.select("name").execute()).data) == [
        "only-a",
        "shared",
    ]
    assert (await a.select().eq("id", b_id).execute()).data == []
    assert await a.count().execute() == 2
    assert (await a.update({"priority": 9}).eq("id", b_id).execute()).count == 0
    assert (await a.delete().eq("id", b_id).execute()).count == 0
    assert (await a.update({"priority": 3}).all_rows().execute()).count == 2
    # An upsert from A that conflicts with B's primary key leaves B's row alone: row-level
    # security refuses it, as a plain insert of that key would be refused.
    hijack = a.upsert({"id": b_id, "name": "hijack", "priority": 99}, on_conflict="id")
    with pytest.raises(AlreadyExists):
        await hijack.execute()
    assert (await a.delete().eq("name", "shared").execute()).count == 1

    b_rows = await _names(db, other_workspace)
    assert {n: (r["id"], r["priority"]) for n, r in b_rows.items()} == {"shared": (b_id, 2)}
    assert [r["name"] for r in (await b.select("name").execute()).data] == ["shared"]


# --------------------------------------------------------------------------
# Memory records


async def test_memory_delete_records(
    client: DataClient, db: asyncpg.Connection, workspace: str, other_workspace: str
) -> None:
    """The memory controller's path: records derived from rows, removed when rows go."""
    records = [
        MemoryRecord(
            "note-1-fact", "fact", embedding=[1.0, 0.0], source_table="notes", source_row_id="1"
        ),
        MemoryRecord(
            "note-1-summary",
            "summary",
            embedding=[0.0, 1.0],
            source_table="notes",
            source_row_id="1",
        ),
        MemoryRecord(
            "note-2", "fact", embedding=[1.0, 1.0], source_table="notes", source_row_id="2"
        ),
        MemoryRecord("loose", "fact", embedding=[1.0, 0.5]),
    ]
    for ws in (workspace, other_workspace):
        counts = await client.memory.upsert_records(ws, records)
        assert counts == UpsertCounts(inserted=4, updated=0, batches=1)

    async def remaining(ws: str) -> list[str]:
        results = await client.memory.search(ws, [1.0, 0.25], top_k=10)
        return sorted(result.record.id for result in results)

    memory = client.memory
    row_ids = [str(row_id) for row_id in (1, 3)]  # as a consumer turns DELETE rows' keys
    assert await memory.delete_records(workspace, source_table="notes", source_row_ids=row_ids) == 2
    assert await remaining(workspace) == ["loose", "note-2"]
    assert await memory.delete_records(UUID(workspace), ids=["loose", "missing"]) == 1
    # Idempotent: the same call again deletes nothing and succeeds.
    assert await memory.delete_records(workspace, ids=["loose"]) == 0
    assert (
        await memory.delete_records(
            workspace, ids=["note-2"], source_table="notes", source_row_ids=["2"]
        )
        == 1
    )
    assert await remaining(workspace) == []
    # The other workspace, with the same ids and source rows, is untouched.
    assert await remaining(other_workspace) == sorted(record.id for record in records)
    stored = await db.fetchval(
        "SELECT count(*) FROM raptorflow_data.memory_records WHERE workspace_id = $1",
        UUID(other_workspace),
    )
    assert stored == 4


async def test_memory_delete_records_refused_by_the_server(
    client: DataClient, workspace: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await client.memory.delete_records(
            workspace, ids=["ok", "x" * 257], source_table="notes", source_row_ids=["1", ""]
        )
    assert caught.value.reason == "INVALID_VALUE"
    assert caught.value.domain == ERROR_DOMAIN
    assert [v.field for v in caught.value.field_violations] == ["ids[1]", "source_row_ids[1]"]


async def test_describe_tables(client: DataClient) -> None:
    tables = await client.describe_tables()
    by_name = {table.name: table for table in tables}
    assert "campaigns" in by_name
    assert "campaign_events" in by_name
    assert "internal_secrets" not in by_name
    campaigns = by_name["campaigns"]
    assert [c.name for c in campaigns.columns] == CAMPAIGN_COLUMNS
    assert list(campaigns.primary_key) == ["id"]
    assert ["workspace_id", "name"] in [
        sorted(k.columns, reverse=True) for k in campaigns.unique_keys
    ]
    columns = {c.name: c for c in campaigns.columns}
    assert not columns["name"].nullable
    assert columns["created_at"].has_default

    only = await client.describe_tables("campaigns")
    assert [t.name for t in only] == ["campaigns"]
    with pytest.raises(InvalidArgument) as unknown:
        await client.describe_tables("campaigns", "internal_secrets")
    assert unknown.value.reason == "UNKNOWN_TABLE"
    assert [v.field for v in unknown.value.field_violations] == ["tables[1]"]


async def test_metadata_is_accepted(server: RunningServer, workspace: str) -> None:
    config = ClientConfig(
        server.address, token=ADMIN_TOKEN, metadata={"X-Agent": "e2e", "x-trace-bin": b"\x00\x01"}
    )
    async with DataClient(config) as configured:
        campaigns = configured.workspace(workspace).table("campaigns")
        await campaigns.insert({"name": "m"}, returning=()).execute(
            metadata=[("x-request-id", "1"), ("x-request-id", "2")]
        )
        page = await campaigns.select("name").execute(metadata={"x-agent": "override"})
        assert page.data == [{"name": "m"}]
        assert await campaigns.count().execute(metadata={}) == 1


# --------------------------------------------------------------------------
# Retries on UNAVAILABLE, by the service config


async def _with_backend_killed(
    config: ClientConfig,
    db: asyncpg.Connection,
    database_url: str,
    call: Callable[[DataClient], Awaitable[Any]],
) -> Any:
    """Runs `call` while its statement waits for a lock, then kills the backend
    running it: the server answers UNAVAILABLE (the database went away)."""
    observer = await asyncpg.connect(database_url)
    try:
        async with DataClient(config) as data_client:
            lock = db.transaction()
            await lock.start()
            try:
                await db.execute("LOCK TABLE campaigns IN ACCESS EXCLUSIVE MODE")
                pending = asyncio.create_task(call(data_client))
                pid = (await wait_for_lock_waits(observer))[0]
                assert await observer.fetchval("SELECT pg_terminate_backend($1)", pid)
            finally:
                await lock.rollback()
            return await pending
    finally:
        await observer.close()


async def test_read_is_retried_when_the_server_answers_unavailable(
    server: RunningServer, db: asyncpg.Connection, database_url: str, workspace: str
) -> None:
    await db.execute(
        "INSERT INTO campaigns (workspace_id, name) VALUES ($1, 'survivor')", UUID(workspace)
    )

    def read(data_client: DataClient) -> Awaitable[Any]:
        campaigns = data_client.workspace(workspace).table("campaigns")
        return campaigns.select("name").execute(timeout=10.0)

    page = await _with_backend_killed(
        ClientConfig(server.address, token=ADMIN_TOKEN), db, database_url, read
    )
    assert page.data == [{"name": "survivor"}]

    # The same failure without the retry policy: the read fails, so the policy did it.
    with pytest.raises(Unavailable) as unretried:
        await _with_backend_killed(
            ClientConfig(server.address, token=ADMIN_TOKEN, enable_retries=False),
            db,
            database_url,
            read,
        )
    assert unretried.value.reason == "DATABASE_UNAVAILABLE"

    # Writes are not retried on UNAVAILABLE: the first attempt may have been applied.
    def write(data_client: DataClient) -> Awaitable[Any]:
        campaigns = data_client.workspace(workspace).table("campaigns")
        return campaigns.update({"priority": 1}).eq("name", "survivor").execute(timeout=10.0)

    with pytest.raises(Unavailable):
        await _with_backend_killed(
            ClientConfig(server.address, token=ADMIN_TOKEN), db, database_url, write
        )


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(64 * 1024):
            writer.write(data)
            await writer.drain()


class ServerAddress:
    """One fixed address in front of whichever server is current, as DNS or a
    load balancer gives clients: `go_dark()` closes the port (connections are
    refused, open ones aborted), `serve(port)` listens again on the same port,
    forwarding to another server. The outage lasts exactly as long as the test
    says, however long the next server took to start."""

    def __init__(self) -> None:
        self.port = 0
        self._listener: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serve(self, upstream_port: int) -> None:
        async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._handlers.add(task)
            self._writers.add(writer)
            try:
                upstream_reader, upstream = await asyncio.open_connection(
                    "127.0.0.1", upstream_port
                )
                self._writers.add(upstream)
                pipes = [
                    asyncio.ensure_future(_pipe(reader, upstream)),
                    asyncio.ensure_future(_pipe(upstream_reader, writer)),
                ]
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
                upstream.transport.abort()
            except OSError:
                pass
            finally:
                writer.transport.abort()
                self._handlers.discard(task)

        self._listener = await asyncio.start_server(forward, "127.0.0.1", self.port)
        self.port = self._listener.sockets[0].getsockname()[1]

    async def go_dark(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            await listener.wait_closed()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=2.0)


async def test_read_survives_a_short_server_restart(
    settings: Settings, db: asyncpg.Connection, workspace: str
) -> None:
    await db.execute(
        "INSERT INTO campaigns (workspace_id, name) VALUES ($1, 'restarted')", UUID(workspace)
    )
    address = ServerAddress()
    read: asyncio.Task[SelectResult] | None = None
    first = await start_server(settings)
    second = await start_server(settings)
    try:
        await address.serve(first.port)
        # After a refused connection gRPC waits 1 s (+-20 %) before reconnecting,
        # about as long as the read policy's five attempts last (~1.5 s): with the
        # default the outcome would hinge on that race. A quicker first reconnect
        # leaves the retry policy as the only thing the test depends on.
        config = ClientConfig(
            address.target,
            token=ADMIN_TOKEN,
            channel_options=[("grpc.initial_reconnect_backoff_ms", 100)],
        )
        async with DataClient(config) as data_client:
            campaigns = data_client.workspace(workspace).table("campaigns")
            assert (await campaigns.count().execute()) == 1
            await address.go_dark()
            await first.stop(grace=0.5)

            read = asyncio.create_task(campaigns.select("name").execute(timeout=10.0))
            await asyncio.sleep(0.3)
            # Its first attempts met a refused port; without the retry policy it
            # would have failed already.
            assert not read.done()
            await address.serve(second.port)
            page = await read
            assert page.data == [{"name": "restarted"}]
    finally:
        if read is not None:
            # Collected even when an assertion failed first, so asyncio does not
            # report a never-retrieved exception on top of the real failure.
            read.cancel()
            await asyncio.gather(read, return_exceptions=True)
        await address.go_dark()
        await first.stop(grace=0.5)
        await second.stop(grace=0.5)
