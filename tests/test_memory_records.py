"""Memory records: UpsertMemoryRecords and SearchMemoryRecords against a real PostgreSQL.

The session's PostgreSQL (CI: Debian's 15, no pgvector) serves the plain SQL
search; `test_pgvector_*` starts an embedded pgserver PostgreSQL, which bundles
pgvector, and checks that the pgvector path returns exactly what the plain
path and a brute-force Python cosine return. "Nearest" always means an exact
scan: the expected results are computed here in float64, in component order,
over the same float32 values.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import struct
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import asyncpg
import grpc
import pytest
from conftest import embedded_postgres, start_server
from pg_activity import wait_for_lock_waits
from raptorflow.data.server import app
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.connections import Deadline
from raptorflow.data.server.memory.queries import FLOAT32_SAFE_NORMS, float32_cosine_error
from raptorflow.data.server.memory.store import MemoryStore
from raptorflow.data.v1 import memory_sync_service_pb2, memory_sync_service_pb2_grpc
from statuses import rpc_error
from tokens import authorized_channel

pb = memory_sync_service_pb2
Stub = memory_sync_service_pb2_grpc.MemorySyncServiceStub


def f32(x: float) -> float:
    """x rounded to float32, as a protobuf `float` field holds it."""
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def bits(values: Sequence[float]) -> bytes:
    """The exact float32 bit patterns (tells -0.0 from 0.0)."""
    return struct.pack(f"<{len(values)}f", *values)


def record(record_id: str, embedding: Sequence[float], **fields: Any) -> pb.MemoryRecord:
    fields.setdefault("kind", "fact")
    metadata = fields.pop("metadata", None)
    message = pb.MemoryRecord(id=record_id, embedding=embedding, **fields)
    if metadata is not None:
        message.metadata.update(metadata)
    return message


def batch(workspace: str, *records: pb.MemoryRecord) -> pb.UpsertMemoryRecordsRequest:
    return pb.UpsertMemoryRecordsRequest(workspace_id=workspace, records=records)


async def upsert(memory: Stub, *batches: pb.UpsertMemoryRecordsRequest) -> tuple[int, int, int]:
    response = await memory.UpsertMemoryRecords(iter(batches))
    return response.inserted_count, response.updated_count, response.batch_count


async def search(
    memory: Stub, workspace: str, embedding: Sequence[float], top_k: int, **filters: Any
):
    response = await memory.SearchMemoryRecords(
        pb.SearchMemoryRecordsRequest(
            workspace_id=workspace, embedding=embedding, top_k=top_k, **filters
        )
    )
    return list(response.results)


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Exact cosine in float64, summed in component order (no math.fsum, no sum())."""
    dot = norm_a = norm_b = 0.0
    for x, y in zip(a, b, strict=True):
        dot += x * y
        norm_a += x * x
        norm_b += y * y
    return max(-1.0, min(1.0, dot / math.sqrt(norm_a * norm_b)))


def nearest(
    records: Sequence[pb.MemoryRecord], query: Sequence[float], top_k: int
) -> list[tuple[str, float]]:
    """Brute force: (id, similarity) of the top k of same dimension, most similar first, then id."""
    scored = [
        (r.id, cosine(r.embedding, query))
        for r in records
        if len(r.embedding) == len(query) and any(r.embedding)
    ]
    scored.sort(key=lambda pair: (-pair[1], pair[0]))
    return scored[:top_k]


def ids_and_similarities(results: Sequence[pb.ScoredMemoryRecord]) -> list[tuple[str, float]]:
    return [(r.record.id, r.similarity) for r in results]


def random_records(rng: random.Random, count: int, dims: Sequence[int]) -> list[pb.MemoryRecord]:
    kinds = ("fact", "summary", "event")
    tables = ("campaigns", "campaign_events", "")
    records = []
    for i in range(count):
        dim = rng.choice(dims)
        records.append(
            record(
                f"r{i:03d}",
                [f32(rng.gauss(0.0, 1.0)) for _ in range(dim)],
                kind=rng.choice(kinds),
                source_table=rng.choice(tables),
                metadata={"team": rng.choice(["a", "b"]), "n": rng.randrange(3)},
            )
        )
    # Exact ties: a copy, and a copy scaled by 2 (exact in float32 and float64),
    # have the same similarity to anything; the id orders them.
    base = records[0]
    records.append(record("r000-copy", base.embedding, kind="fact"))
    records.append(record("r000-double", [2.0 * x for x in base.embedding], kind="fact"))
    return records


@pytest.fixture(scope="module")
def memory(channel: grpc.aio.Channel) -> Stub:
    return Stub(channel)


# ---------------------------------------------------------------------------
# Upsert and round trip


async def test_every_field_round_trips_exactly(memory, db, workspace):
    embedding = [
        f32(0.1),
        f32(1e-30),
        f32(-3.4e38),
        3.4028234663852886e38,  # the largest float32
        1.401298464324817e-45,  # the smallest subnormal float32
        -0.0,
        f32(1 / 3),
        1.0,
    ]
    full = record(
        "fact/1 — ünïcode",
        embedding,
        kind="summary",
        content="The campaign doubled its budget.\nSecond line, 'quotes' and \"quotes\".",
        metadata={
            "team": "growth",
            "score": 0.1,
            "count": 3,
            "big": 1e300,
            "flag": True,
            "nothing": None,
            "tags": ["a", 1, False, None, {"deep": [1.5]}],
            "nested": {"ключ": "значение", "empty": {}},
        },
        source_table="campaigns",
        source_row_id="42",
    )
    bare = record("bare", embedding)
    empty_metadata = record("empty-metadata", embedding)
    empty_metadata.metadata.SetInParent()
    assert await upsert(memory, batch(workspace, full, bare, empty_metadata)) == (3, 0, 1)

    results = await search(memory, workspace, embedding, 10)
    by_id = {r.record.id: r for r in results}
    assert set(by_id) == {full.id, bare.id, empty_metadata.id}
    for sent in (full, bare, empty_metadata):
        got = by_id[sent.id].record
        assert got == sent
        assert bits(got.embedding) == bits(sent.embedding)
        assert got.HasField("metadata") == sent.HasField("metadata")
        assert by_id[sent.id].similarity == 1.0

    stored = await db.fetchrow(
        "SELECT kind, content, metadata, source_table, source_row_id, embedding,"
        " embedding_dimension FROM raptorflow_data.memory_records"
        " WHERE workspace_id = $1 AND id = $2",
        uuid.UUID(workspace),
        full.id,
    )
    assert json.loads(stored["metadata"])["nested"] == {"ключ": "значение", "empty": {}}
    assert bits(stored["embedding"]) == bits(embedding)
    assert stored["embedding_dimension"] == len(embedding)
    # Absent optional fields are NULL, not empty strings.
    stored_bare = await db.fetchrow(
        "SELECT content, metadata, source_table, source_row_id FROM raptorflow_data.memory_records"
        " WHERE workspace_id = $1 AND id = 'bare'",
        uuid.UUID(workspace),
    )
    assert list(stored_bare.values()) == [None, None, None, None]


async def test_reupsert_is_idempotent_by_id_and_counts_updates(memory, db, workspace):
    first = [record(f"m{i}", [1.0, float(i)], content=f"v1 {i}") for i in range(3)]
    assert await upsert(memory, batch(workspace, *first)) == (3, 0, 1)
    # The same records again: every one replaces itself.
    assert await upsert(memory, batch(workspace, *first)) == (0, 3, 1)
    # Two batches in one stream, mixing replacements and new ids.
    changed = [record(f"m{i}", [2.0, float(i)], kind="summary", content=f"v2 {i}") for i in (0, 1)]
    fresh = [record(f"m{i}", [1.0, 1.0]) for i in (3, 4, 5)]
    assert await upsert(
        memory, batch(workspace, *changed, fresh[0]), batch(workspace, *fresh[1:])
    ) == (3, 2, 2)
    rows = await db.fetch(
        "SELECT id, kind, content, embedding, created_at < updated_at AS touched"
        " FROM raptorflow_data.memory_records WHERE workspace_id = $1 ORDER BY id",
        uuid.UUID(workspace),
    )
    assert [(r["id"], r["kind"], r["content"], r["embedding"]) for r in rows] == [
        ("m0", "summary", "v2 0", [2.0, 0.0]),
        ("m1", "summary", "v2 1", [2.0, 1.0]),
        ("m2", "fact", "v1 2", [1.0, 2.0]),
        ("m3", "fact", None, [1.0, 1.0]),
        ("m4", "fact", None, [1.0, 1.0]),
        ("m5", "fact", None, [1.0, 1.0]),
    ]
    assert [r["touched"] for r in rows] == [True, True, True, False, False, False]


async def test_many_batches_in_one_stream(memory, db, workspace):
    batches = [
        batch(workspace, *(record(f"b{b}-{i}", [float(b), float(i), 1.0]) for i in range(100)))
        for b in range(5)
    ]
    assert await upsert(memory, *batches) == (500, 0, 5)
    count = await db.fetchval(
        "SELECT count(*) FROM raptorflow_data.memory_records WHERE workspace_id = $1",
        uuid.UUID(workspace),
    )
    assert count == 500


async def test_an_empty_stream_writes_nothing(memory):
    assert await upsert(memory) == (0, 0, 0)


def _too_long(n: int) -> str:
    return "x" * n


BAD_RECORDS: list[tuple[str, pb.MemoryRecord, str, str]] = [
    ("empty id", record("", [1.0]), "id", "INVALID_VALUE"),
    ("long id", record(_too_long(257), [1.0]), "id", "INVALID_VALUE"),
    ("empty kind", record("k", [1.0], kind=""), "kind", "INVALID_VALUE"),
    ("long kind", record("k", [1.0], kind=_too_long(65)), "kind", "INVALID_VALUE"),
    ("no embedding", record("k", []), "embedding", "INVALID_VALUE"),
    ("huge embedding", record("k", [1.0] * 16_001), "embedding", "INVALID_VALUE"),
    ("NaN component", record("k", [1.0, math.nan]), "embedding", "INVALID_VALUE"),
    ("infinite component", record("k", [-math.inf, 1.0]), "embedding", "INVALID_VALUE"),
    ("NaN metadata", record("k", [1.0], metadata={"x": math.nan}), "metadata", "INVALID_VALUE"),
    ("NUL metadata", record("k", [1.0], metadata={"x": "a\x00b"}), "metadata", "INVALID_VALUE"),
    ("NUL content", record("k", [1.0], content="a\x00b"), "content", "INVALID_VALUE"),
    ("NUL source", record("k", [1.0], source_table="t\x00"), "source_table", "INVALID_VALUE"),
    ("NUL row id", record("k", [1.0], source_row_id="\x00"), "source_row_id", "INVALID_VALUE"),
]


@pytest.mark.parametrize(
    ("bad", "field", "reason"),
    [pytest.param(r, f, reason, id=name) for name, r, f, reason in BAD_RECORDS],
)
async def test_a_bad_record_names_its_batch_record_and_field(
    memory, db, workspace, bad, field, reason
):
    good = [record(f"ok{i}", [1.0, 0.0]) for i in range(3)]
    failure = await rpc_error(
        memory.UpsertMemoryRecords(
            iter([batch(workspace, good[0]), batch(workspace, good[1], good[2], bad)])
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == reason
    assert failure.fields == [f"batches[1].records[2].{field}"]
    # The earlier batch stays written; the bad batch is refused whole.
    ids = await db.fetch(
        "SELECT id FROM raptorflow_data.memory_records WHERE workspace_id = $1",
        uuid.UUID(workspace),
    )
    assert [r["id"] for r in ids] == ["ok0"]


async def test_every_bad_field_of_a_batch_is_reported(memory, workspace):
    failure = await rpc_error(
        upsert(
            memory,
            batch(
                workspace,
                record("a", [1.0]),
                record("", [1.0], kind=""),
                record("a", [math.inf]),
            ),
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.fields == [
        "batches[0].records[1].id",
        "batches[0].records[1].kind",
        "batches[0].records[2].embedding",
        "batches[0].records[2].id",
    ]


async def test_a_thousand_bad_records_give_a_bounded_status(memory, workspace):
    failure = await rpc_error(
        upsert(memory, batch(workspace, *(record("", [1.0]) for _ in range(1000))))
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(failure.fields) == 10
    assert failure.fields[0] == "batches[0].records[0].id"


async def test_a_repeated_id_in_a_batch(memory, workspace):
    failure = await rpc_error(
        upsert(memory, batch(workspace, record("same", [1.0]), record("same", [2.0])))
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "DUPLICATE_RECORD_ID"
    assert failure.fields == ["batches[0].records[1].id"]


@pytest.mark.parametrize(("count", "reason"), [(0, "INVALID_VALUE"), (1001, "TOO_MANY_RECORDS")])
async def test_batch_size_limits(memory, workspace, count, reason):
    records = [record(f"r{i}", [1.0]) for i in range(count)]
    failure = await rpc_error(
        upsert(memory, batch(workspace, record("x", [1.0])), batch(workspace, *records))
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == reason
    assert failure.fields == ["batches[1].records"]


async def test_a_batch_of_another_workspace_ends_the_stream(memory, db, workspace, other_workspace):
    failure = await rpc_error(
        upsert(
            memory,
            batch(workspace, record("first", [1.0])),
            batch(other_workspace, record("second", [1.0])),
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "WORKSPACE_MISMATCH"
    assert failure.fields == ["batches[1].workspace_id"]
    rows = await db.fetch(
        "SELECT workspace_id, id FROM raptorflow_data.memory_records"
        " WHERE workspace_id = ANY ($1::uuid[])",
        [uuid.UUID(workspace), uuid.UUID(other_workspace)],
    )
    assert [(str(r["workspace_id"]), r["id"]) for r in rows] == [(workspace, "first")]


async def test_a_bad_workspace_id(memory):
    failure = await rpc_error(upsert(memory, batch("not-a-uuid", record("a", [1.0]))))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "INVALID_UUID"
    assert failure.fields == ["batches[0].workspace_id"]


# ---------------------------------------------------------------------------
# Delete


async def delete(memory: Stub, workspace: str, **selectors: Any) -> int:
    response = await memory.DeleteMemoryRecords(
        pb.DeleteMemoryRecordsRequest(workspace_id=workspace, **selectors)
    )
    return response.deleted_count


async def stored_ids(db: asyncpg.Connection, workspace: str) -> list[str]:
    rows = await db.fetch(
        "SELECT id FROM raptorflow_data.memory_records WHERE workspace_id = $1"
        ' ORDER BY id COLLATE "C"',
        uuid.UUID(workspace),
    )
    return [r["id"] for r in rows]


def derived(record_id: str, table: str, row_id: str) -> pb.MemoryRecord:
    return record(record_id, [1.0, 0.0], source_table=table, source_row_id=row_id)


async def test_delete_by_ids_is_idempotent(memory, db, workspace):
    await upsert(memory, batch(workspace, *(record(f"d{i}", [1.0, float(i)]) for i in range(5))))
    # Absent ids and repeats are fine; only records that went are counted.
    assert await delete(memory, workspace, ids=["d1", "d3", "absent", "d1"]) == 2
    assert await stored_ids(db, workspace) == ["d0", "d2", "d4"]
    assert await delete(memory, workspace, ids=["d1", "d3"]) == 0
    assert await delete(memory, workspace, ids=["d0", "d2", "d4"]) == 3
    assert await stored_ids(db, workspace) == []
    # Search no longer finds them.
    assert await search(memory, workspace, [1.0, 0.0], 10) == []


async def test_delete_by_source_rows(memory, db, workspace):
    await upsert(
        memory,
        batch(
            workspace,
            derived("note-1-a", "notes", "1"),
            derived("note-1-b", "notes", "1"),
            derived("note-2", "notes", "2"),
            derived("note-10", "notes", "10"),
            derived("campaign-1", "campaigns", "1"),
            record("loose", [1.0, 0.0]),
        ),
    )
    # Every record of row 1 of notes, and only of that table; row 9 has none.
    assert await delete(memory, workspace, source_table="notes", source_row_ids=["1", "9"]) == 2
    assert await stored_ids(db, workspace) == ["campaign-1", "loose", "note-10", "note-2"]
    # Both selectors at once: a record matching either goes, counted once.
    deleted = await delete(
        memory,
        workspace,
        ids=["note-2", "loose"],
        source_table="notes",
        source_row_ids=["2", "2", "10"],
    )
    assert deleted == 3
    assert await stored_ids(db, workspace) == ["campaign-1"]
    # The table name is compared exactly.
    assert await delete(memory, workspace, source_table="Campaigns", source_row_ids=["1"]) == 0
    assert await delete(memory, workspace, source_table="campaigns", source_row_ids=["1"]) == 1


async def test_delete_never_touches_another_workspace(memory, db, workspace, other_workspace):
    # The same ids and the same source rows in both workspaces.
    for ws in (workspace, other_workspace):
        await upsert(
            memory,
            batch(ws, derived("shared", "notes", "1"), derived("by-row", "notes", "2")),
        )
    assert await delete(memory, workspace, ids=["shared"]) == 1
    assert await delete(memory, workspace, source_table="notes", source_row_ids=["2"]) == 1
    assert await stored_ids(db, workspace) == []
    assert await stored_ids(db, other_workspace) == ["by-row", "shared"]
    # A workspace without records, with the same selectors, deletes nothing.
    nobody = str(uuid.uuid4())
    assert (
        await delete(memory, nobody, ids=["shared"], source_table="notes", source_row_ids=["2"])
        == 0
    )
    assert await stored_ids(db, other_workspace) == ["by-row", "shared"]


async def test_delete_locks_records_in_id_order(memory, db, database_url, workspace):
    """Rows are locked in the order upsert locks them (ids in code point order), not
    in the order the table or an index yields them, so a delete and an upsert
    cannot deadlock."""
    # Stored c, b, a, and derived from rows 1, 2, 3: both the heap and the
    # source-row index hold them in the reverse of id order.
    for record_id, row_id in (("c", "1"), ("b", "2"), ("a", "3")):
        await upsert(memory, batch(workspace, derived(record_id, "notes", row_id)))
    ws = uuid.UUID(workspace)
    lock_one = "SELECT 1 FROM raptorflow_data.memory_records WHERE workspace_id = $1 AND id = $2"
    holder = await asyncpg.connect(database_url)
    prober = await asyncpg.connect(database_url)
    try:
        holder_tx = holder.transaction()
        await holder_tx.start()
        await holder.fetch(lock_one + " FOR UPDATE", ws, "b")
        deleting = asyncio.ensure_future(
            delete(memory, workspace, source_table="notes", source_row_ids=["1", "2", "3"])
        )
        try:
            await wait_for_lock_waits(db)
            # The delete holds "a" and waits for "b"; it has not reached "c".
            async with prober.transaction():
                with pytest.raises(asyncpg.LockNotAvailableError):
                    await prober.fetch(lock_one + " FOR UPDATE NOWAIT", ws, "a")
            async with prober.transaction():
                assert await prober.fetch(lock_one + " FOR UPDATE NOWAIT", ws, "c")
        finally:
            await holder_tx.rollback()
        assert await deleting == 3
    finally:
        await prober.close()
        await holder.close()
    assert await stored_ids(db, workspace) == []


@pytest.mark.parametrize(
    ("selectors", "reason", "fields"),
    [
        pytest.param({}, "SELECTOR_REQUIRED", ["ids"], id="nothing selected"),
        pytest.param(
            {"source_row_ids": ["1"]}, "SELECTOR_REQUIRED", ["source_table"], id="rows, no table"
        ),
        pytest.param(
            {"source_table": "notes"}, "SELECTOR_REQUIRED", ["source_row_ids"], id="table, no rows"
        ),
        pytest.param(
            {"ids": ["a", "", "b", "x" * 257]},
            "INVALID_VALUE",
            ["ids[1]", "ids[3]"],
            id="bad ids",
        ),
        pytest.param({"ids": ["a\x00"]}, "INVALID_VALUE", ["ids[0]"], id="NUL id"),
        pytest.param(
            {"ids": [f"r{i}" for i in range(1001)]}, "TOO_MANY_RECORDS", ["ids"], id="1001 ids"
        ),
        pytest.param(
            {"source_table": "notes", "source_row_ids": ["1", "", "2\x00"]},
            "INVALID_VALUE",
            ["source_row_ids[1]", "source_row_ids[2]"],
            id="bad row ids",
        ),
        pytest.param(
            {"source_table": "no\x00tes", "source_row_ids": ["1"]},
            "INVALID_VALUE",
            ["source_table"],
            id="NUL table",
        ),
        pytest.param(
            {"source_table": "notes", "source_row_ids": [str(i) for i in range(1001)]},
            "TOO_MANY_RECORDS",
            ["source_row_ids"],
            id="1001 row ids",
        ),
        pytest.param(
            {"workspace_id": "nope", "ids": ["a"]}, "INVALID_UUID", ["workspace_id"], id="bad uuid"
        ),
        pytest.param(
            {"workspace_id": "", "ids": ["", "x" * 300], "source_row_ids": ["1"]},
            "INVALID_UUID",
            # The authorization check refuses a request without a workspace first.
            ["workspace_id"],
            id="no workspace, then other errors",
        ),
        pytest.param(
            {"ids": ["", "x" * 300], "source_row_ids": ["1"]},
            "INVALID_VALUE",
            ["ids[0]", "ids[1]", "source_table"],
            id="every error at once",
        ),
    ],
)
async def test_delete_refuses_bad_requests(memory, db, workspace, selectors, reason, fields):
    await upsert(memory, batch(workspace, derived("a", "notes", "1"), derived("b", "notes", "2")))
    request = pb.DeleteMemoryRecordsRequest(**({"workspace_id": workspace} | selectors))
    failure = await rpc_error(memory.DeleteMemoryRecords(request))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == reason
    assert failure.fields == fields
    # A refused request deletes nothing, not even what its valid parts select.
    assert await stored_ids(db, workspace) == ["a", "b"]


async def test_delete_accepts_the_limits(memory, db, workspace):
    await upsert(memory, batch(workspace, derived("x" * 256, "notes", "1"), derived("a", "t", "2")))
    deleted = await delete(
        memory,
        workspace,
        ids=["x" * 256, *(f"r{i}" for i in range(999))],
        source_table="t",
        source_row_ids=[str(i) for i in range(1000)],
    )
    assert deleted == 2
    assert await stored_ids(db, workspace) == []


# ---------------------------------------------------------------------------
# Search


async def test_search_never_crosses_workspaces(memory, workspace, other_workspace):
    # The same ids in both; the other workspace's records are the closer ones.
    mine = [record("shared", [1.0, 1.0], content="mine"), record("only-mine", [0.0, 1.0])]
    theirs = [record("shared", [1.0, 0.0], content="theirs"), record("only-theirs", [1.0, 0.0])]
    assert await upsert(memory, batch(workspace, *mine)) == (2, 0, 1)
    assert await upsert(memory, batch(other_workspace, *theirs)) == (2, 0, 1)

    results = await search(memory, workspace, [1.0, 0.0], 10)
    assert [(r.record.id, r.record.content) for r in results] == [
        ("shared", "mine"),
        ("only-mine", ""),
    ]
    results = await search(memory, other_workspace, [1.0, 0.0], 10)
    assert {r.record.content for r in results} == {"theirs", ""}
    assert await search(memory, str(uuid.uuid4()), [1.0, 0.0], 10) == []


async def test_search_skips_other_dimensions_and_zero_vectors(memory, workspace):
    await upsert(
        memory,
        batch(
            workspace,
            record("three", [1.0, 0.0, 0.0]),
            record("three-zero", [0.0, 0.0, -0.0]),
            record("two", [1.0, 0.0]),
            record("four", [1.0, 0.0, 0.0, 0.0]),
        ),
    )
    assert ids_and_similarities(await search(memory, workspace, [2.0, 0.0, 0.0], 10)) == [
        ("three", 1.0)
    ]
    assert ids_and_similarities(await search(memory, workspace, [-1.0, 0.0], 10)) == [("two", -1.0)]


async def test_search_filters(memory, workspace):
    rng = random.Random(7)
    records = random_records(rng, 60, [8])
    records.append(record("no-metadata", records[1].embedding, kind="event"))
    for i in range(0, len(records), 25):
        await upsert(memory, batch(workspace, *records[i : i + 25]))
    query = [f32(rng.gauss(0.0, 1.0)) for _ in range(8)]

    def matching(keep):
        return nearest([r for r in records if keep(r)], query, 1000)

    cases = [
        ({"kinds": ["summary"]}, lambda r: r.kind == "summary"),
        ({"kinds": ["event", "summary"]}, lambda r: r.kind in ("event", "summary")),
        ({"source_table": "campaigns"}, lambda r: r.source_table == "campaigns"),
        (
            {"metadata_contains": '{"team": "a"}'},
            lambda r: r.HasField("metadata") and r.metadata["team"] == "a",
        ),
        (
            {"metadata_contains": '{"team": "b", "n": 2}'},
            lambda r: r.HasField("metadata") and r.metadata["team"] == "b" and r.metadata["n"] == 2,
        ),
        # Every object contains {}; a record without metadata counts as {}.
        ({"metadata_contains": "{}"}, lambda r: True),
        (
            {"kinds": ["fact"], "source_table": "campaign_events", "metadata_contains": '{"n": 0}'},
            lambda r: (
                r.kind == "fact"
                and r.source_table == "campaign_events"
                and r.HasField("metadata")
                and r.metadata["n"] == 0
            ),
        ),
        ({"kinds": ["nothing"]}, lambda r: False),
    ]
    for filters, keep in cases:
        expected = matching(keep)
        got = await search(memory, workspace, query, 1000, **filters)
        assert ids_and_similarities(got) == expected, filters
    assert len(matching(lambda r: True)) == len(records)


async def test_search_returns_the_true_nearest_records(memory, workspace):
    rng = random.Random(20240611)
    records = random_records(rng, 200, range(8, 33))
    for i in range(0, len(records), 50):
        await upsert(memory, batch(workspace, *records[i : i + 50]))
    queries = [list(records[0].embedding)] + [
        [f32(rng.gauss(0.0, 1.0)) for _ in range(rng.choice([8, 16, 24, 32]))] for _ in range(20)
    ]
    for query in queries:
        for top_k in (1, 5, 1000):
            got = await search(memory, workspace, query, top_k)
            expected = nearest(records, query, top_k)
            assert ids_and_similarities(got) == expected
            assert got, "every query dimension has records"
    # The exact ties of the first record come in id order.
    top = ids_and_similarities(await search(memory, workspace, records[0].embedding, 3))
    assert top == [("r000", 1.0), ("r000-copy", 1.0), ("r000-double", 1.0)]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"workspace_id": "nope"}, "workspace_id"),
        ({"embedding": []}, "embedding"),
        ({"embedding": [1.0] * 16_001}, "embedding"),
        ({"embedding": [1.0, math.nan]}, "embedding"),
        ({"embedding": [0.0, -0.0]}, "embedding"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 1001}, "top_k"),
        ({"top_k": -1}, "top_k"),
        ({"kinds": ["fact", "a\x00"]}, "kinds[1]"),
        ({"source_table": "\x00"}, "source_table"),
        ({"metadata_contains": "[1]"}, "metadata_contains"),
        ({"metadata_contains": "not json"}, "metadata_contains"),
        ({"metadata_contains": '{"x": NaN}'}, "metadata_contains"),
        ({"metadata_contains": '{"x": "\\u0000"}'}, "metadata_contains"),
        ({"metadata_contains": '{"x": "\\ud800"}'}, "metadata_contains"),
        ({"metadata_contains": '{"x": 1e999999}'}, "metadata_contains"),
    ],
)
async def test_search_refuses_bad_requests(memory, workspace, request_fields, field):
    fields = {"workspace_id": workspace, "embedding": [1.0, 0.0], "top_k": 5, **request_fields}
    failure = await rpc_error(memory.SearchMemoryRecords(pb.SearchMemoryRecordsRequest(**fields)))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason in ("INVALID_VALUE", "INVALID_UUID")
    assert failure.fields == [field]


# ---------------------------------------------------------------------------
# pgvector (embedded pgserver PostgreSQL)


@pytest.fixture(scope="module")
def pgvector_url() -> Iterator[str]:
    """A throwaway pgserver cluster, which bundles pgvector; never skipped."""
    with embedded_postgres("raptorflow-pgvector-") as url:
        yield url


@pytest.fixture(scope="module")
async def pgvector_server(
    settings: Settings, pgvector_url: str
) -> AsyncIterator[app.RunningServer]:
    running = await start_server(settings, database_url=pgvector_url)
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


def next_float32(x: float) -> float:
    """The float32 after x (x positive)."""
    (as_int,) = struct.unpack("<i", struct.pack("<f", x))
    return float(struct.unpack("<f", struct.pack("<i", as_int + 1))[0])


def extreme_records(rng: random.Random, dim: int) -> list[pb.MemoryRecord]:
    """Records pgvector's float32 arithmetic gets wrong, and records closer than its error.

    Components near 1e30 overflow its float32 sums (a record looks orthogonal to
    everything), near 1e-30 underflow them (a record looks identical to
    everything), and a one-ulp change moves the cosine by far less than
    float32 summation error.
    """
    found = []
    for i in range(6):
        direction = [f32(abs(rng.gauss(0.0, 1.0))) for _ in range(dim)]
        found.append(record(f"huge{dim}-{i}", [f32(x * 1e30) for x in direction]))
        found.append(record(f"tiny{dim}-{i}", [f32(x * 1e-30) for x in direction]))
        found.append(record(f"near{dim}-{i}-a", direction))
        found.append(record(f"near{dim}-{i}-b", [next_float32(direction[0]), *direction[1:]]))
    return found


@pytest.fixture
async def pgvector_db(pgvector_server: app.RunningServer) -> AsyncIterator[asyncpg.Connection]:
    """A direct superuser connection to the pgserver database."""
    conn = await asyncpg.connect(pgvector_server.settings.database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def test_pgvector_is_detected(pgvector_server, pgvector_db):
    column_type = await pgvector_db.fetchval(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = 'raptorflow_data.memory_records'::regclass"
        " AND attname = 'embedding_vector'"
    )
    assert column_type == "vector"
    store = MemoryStore(pgvector_server.settings, pgvector_server.database)
    assert not store.uses_pgvector
    await store.prepare()
    assert store.uses_pgvector


async def test_pgvector_search_equals_the_sql_scan_and_brute_force(pgvector_server, pgvector_db):
    running = pgvector_server
    with_vector = MemoryStore(running.settings, running.database)
    await with_vector.prepare()
    plain = MemoryStore(running.settings, running.database)  # not prepared: the SQL scan

    rng = random.Random(99)
    dims = [8, 16, 32]
    records = random_records(rng, 200, dims)
    for dim in dims:
        records.extend(extreme_records(rng, dim))
    workspace = str(uuid.uuid4())
    queries = [
        list(r.embedding) for r in records if r.id.startswith(("near8-0", "tiny16-0", "r00"))
    ]
    queries += [[f32(rng.gauss(0.0, 1.0)) for _ in range(rng.choice(dims))] for _ in range(15)]
    queries += [[f32(x * 1e-30) for x in queries[-1]], [f32(x * 1e30) for x in queries[-2]]]
    queries.append([1.0] * 8)
    deadline = Deadline.after(30.0)
    async with authorized_channel(running.address) as channel:
        memory = Stub(channel)
        for i in range(0, len(records), 100):
            await upsert(memory, batch(workspace, *records[i : i + 100]))
        for query in queries:
            for top_k in (1, 10):
                served = await search(memory, workspace, query, top_k)
                assert ids_and_similarities(served) == nearest(records, query, top_k)
                request = pb.SearchMemoryRecordsRequest(
                    workspace_id=workspace, embedding=query, top_k=top_k
                )
                assert await with_vector.search(request, deadline) == served
                assert await plain.search(request, deadline) == served

    # What the pgvector path has to guard against, and the bound it relies on.
    low, high = FLOAT32_SAFE_NORMS
    checked = 0
    for query in queries:
        scored = await pgvector_db.fetch(
            "SELECT id, embedding, vector_norm(embedding_vector) AS norm,"
            " embedding_vector <=> $2::real[]::vector AS distance"
            " FROM raptorflow_data.memory_records"
            " WHERE workspace_id = $1 AND embedding_dimension = $3"
            " ORDER BY distance, id",
            uuid.UUID(workspace),
            query,
            len(query),
        )
        query_norm = math.sqrt(math.fsum(x * x for x in query))
        for row in scored:
            if low <= row["norm"] <= high and low <= query_norm <= high:
                exact = cosine(row["embedding"], query)
                assert abs(1.0 - row["distance"] - exact) <= float32_cosine_error(len(query))
                checked += 1
        if query == [1.0] * 8:
            # Unaided, pgvector calls a tiny record identical to the query (its
            # float32 norm underflows to 0), although it is not even close.
            first = scored[0]
            assert first["id"].startswith("tiny")
            assert first["distance"] == 0.0
            assert cosine(first["embedding"], query) < 0.99
    assert checked > 1000


async def test_pgvector_round_trip_is_exact(pgvector_server):
    embedding = [f32(0.1), f32(1e-30), f32(-3.4e38), 1.401298464324817e-45, -0.0]
    workspace = str(uuid.uuid4())
    async with authorized_channel(pgvector_server.address) as channel:
        memory = Stub(channel)
        sent = record("exact", embedding, metadata={"a": [1, "b"]})
        assert await upsert(memory, batch(workspace, sent)) == (1, 0, 1)
        (got,) = await search(memory, workspace, embedding, 5)
    assert got.record == sent
    assert bits(got.record.embedding) == bits(embedding)
    assert got.similarity == cosine(embedding, embedding)
