"""Backups and restores through the real server: ExportBackup, RestoreBackup and backup files.

The module's own tables hold awkward values of many types (NaN, -0.0,
infinities, NULLs, empty arrays, NUL bytes, unicode); every comparison is of
PostgreSQL's own text form of whole rows, read directly, so "identical" means
value for value. A stored generated column is left out of the backup and
recomputed; an identity column keeps its values.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import hashlib
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

import asyncpg
import grpc
import pytest
from conftest import ODD_TABLE, start_server
from job_helpers import RecordingProgress, watch_to_end
from pg_activity import assert_no_new_backends, service_backends, wait_for_statement_lock_wait
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.failures import to_service_error
from raptorflow.data.server.errors import Code, ServiceError
from raptorflow.data.server.maintenance import backup_file, backup_stream
from raptorflow.data.v1 import job_pb2, maintenance_service_pb2, maintenance_service_pb2_grpc
from server_process import serving
from statuses import rpc_error
from tokens import authorized_channel

pb = maintenance_service_pb2
Stub = maintenance_service_pb2_grpc.MaintenanceServiceStub

ITEMS = "backup_items"
NOTES = "backup_notes"
TABLES = [ITEMS, NOTES]
ITEMS_PER_WORKSPACE = 300
NOTES_PER_WORKSPACE = 200

SCHEMA_SQL = f"""
CREATE TABLE {ITEMS} (
    id bigint PRIMARY KEY,
    workspace_id uuid NOT NULL,
    small smallint,
    count integer,
    big bigint,
    amount numeric(20, 6),
    exact numeric,
    label text,
    flag boolean,
    happened_at timestamptz,
    local_time timestamp,
    day date,
    doc jsonb,
    raw_json json,
    ref uuid,
    blob bytea,
    tags text[],
    scores integer[],
    ratio double precision,
    ratio4 real,
    note varchar(40),
    label_length integer GENERATED ALWAYS AS (length(label)) STORED
);
CREATE INDEX ON {ITEMS} (workspace_id);
CREATE TABLE {NOTES} (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_id uuid NOT NULL,
    item_id bigint REFERENCES {ITEMS} (id) ON DELETE CASCADE,
    body text NOT NULL
);
CREATE INDEX ON {NOTES} (workspace_id);
"""

INSERT_ITEM = f"""
INSERT INTO {ITEMS} (id, workspace_id, small, count, big, amount, exact, label, flag,
    happened_at, local_time, day, doc, raw_json, ref, blob, tags, scores, ratio, ratio4, note)
VALUES ($1, $2, $3, $4, $5, $6::text::numeric, $7::text::numeric, $8, $9,
    $10::text::timestamptz, $11::text::timestamp, $12::text::date, $13::text::jsonb,
    $14::text::json, $15, $16, $17, $18, $19::text::float8, $20::text::float4, $21)
"""
INSERT_NOTE = f"INSERT INTO {NOTES} (workspace_id, item_id, body) VALUES ($1, $2, $3)"

FLOATS = [
    "0.1",
    "-0",
    "NaN",
    "Infinity",
    "-Infinity",
    "1e308",
    "5e-324",
    "2.5",
    "-1.7976931348623157e308",
]
REALS = ["0.1", "-0", "NaN", "Infinity", "-Infinity", "3.4028235e38", "1e-45", "2.5"]
NUMERICS = ["0.000001", "-99999999999999.999999", "NaN", "3.141592653589793238462643383279", "0"]
TIMESTAMPS = [
    "2024-02-29 23:59:59.999999+00",
    "infinity",
    "-infinity",
    "1970-01-01 00:00:00+00",
    "0001-01-01 00:00:00+00",
    "2000-06-15 12:30:00.5-07:00",
]
TEXTS = [
    "",
    "plain",
    "quote ' and \" and \\ backslash",
    "tab\tnew\nline",
    "ünïcødé ✓ 日本",
    "a" * 120,
]


def item_row(index: int, item_id: int, workspace: uuid.UUID) -> tuple[object, ...]:
    """One row; every column is NULL in some rows and awkward in others."""

    def pick(values: Sequence[object], offset: int = 0) -> object:
        position = (index + offset) % (len(values) + 1)
        return None if position == len(values) else values[position]

    return (
        item_id,
        workspace,
        pick([0, -32768, 32767, 7]),
        pick([0, -(2**31), 2**31 - 1, index]),
        pick([0, -(2**63), 2**63 - 1, index * 1_000_003]),
        pick(["123456.654321", "-0.000001", "0", "99999999999999.999999"]),
        pick(NUMERICS, 1),
        pick(TEXTS),
        pick([True, False]),
        pick(TIMESTAMPS),
        pick(["2024-01-01 00:00:00.000001", "infinity", "1999-12-31 23:59:59"]),
        pick(["2024-02-29", "0001-01-01", "infinity", "5874897-12-31"]),
        pick(['{"a": [1, 2.5, null, "x"], "b": {"c": "ü"}}', "[]", '"str"', "null", "0.1"]),
        pick(['{"keep":  "spacing", "dup": 1, "dup": 2}', "[1,2]"]),
        pick([uuid.UUID(int=index), uuid.UUID(int=0)]),
        pick([b"", b"\x00\x01\xff", bytes(range(256))]),
        pick([[], ["a", None, "c"], ["x,y", '"q"', "{}", ""]]),
        pick([[], [1, None, -3], [2**31 - 1]]),
        pick(FLOATS),
        pick(REALS, 3),
        pick(["", "forty characters ......................."]),
    )


async def seed(db: asyncpg.Connection, workspace: str, first_id: int) -> None:
    ws = uuid.UUID(workspace)
    items = [item_row(i, first_id + i, ws) for i in range(ITEMS_PER_WORKSPACE)]
    await db.executemany(INSERT_ITEM, items)
    notes = [
        (ws, first_id + (i * 7) % ITEMS_PER_WORKSPACE if i % 5 else None, f"note {i} ✎")
        for i in range(NOTES_PER_WORKSPACE)
    ]
    await db.executemany(INSERT_NOTE, notes)


async def rows_as_text(db: asyncpg.Connection, workspace: str | None) -> dict[str, list[str]]:
    """Every row of the module's tables (of one workspace), in PostgreSQL's text form."""
    out = {}
    for table, key in ((ITEMS, "id"), (NOTES, "seq")):
        where = "" if workspace is None else " WHERE workspace_id = $1"
        args = [] if workspace is None else [uuid.UUID(workspace)]
        out[table] = [
            r[0]
            for r in await db.fetch(f"SELECT t::text FROM {table} t{where} ORDER BY {key}", *args)
        ]
    return out


async def delete_workspace(db: asyncpg.Connection, workspace: str) -> None:
    await db.execute(f"DELETE FROM {NOTES} WHERE workspace_id = $1", uuid.UUID(workspace))
    await db.execute(f"DELETE FROM {ITEMS} WHERE workspace_id = $1", uuid.UUID(workspace))


class Workspaces:
    """The two workspaces the module seeds, and their rows as seeded."""

    def __init__(self, first: str, second: str) -> None:
        self.first = first
        self.second = second
        self.first_rows: dict[str, list[str]] = {}
        self.second_rows: dict[str, list[str]] = {}


@pytest.fixture(scope="module")
async def seeded(server: RunningServer, db: asyncpg.Connection) -> Workspaces:
    await db.execute(SCHEMA_SQL)
    await server.catalog.reload()
    workspaces = Workspaces(str(uuid.uuid4()), str(uuid.uuid4()))
    await seed(db, workspaces.first, 1)
    await seed(db, workspaces.second, 100_001)
    workspaces.first_rows = await rows_as_text(db, workspaces.first)
    workspaces.second_rows = await rows_as_text(db, workspaces.second)
    assert len(workspaces.first_rows[ITEMS]) == ITEMS_PER_WORKSPACE
    return workspaces


@pytest.fixture
async def restored(seeded: Workspaces, db: asyncpg.Connection) -> AsyncIterator[Workspaces]:
    """After each test: both workspaces as seeded again, whatever the test did."""
    yield seeded
    for workspace in (seeded.first, seeded.second):
        await delete_workspace(db, workspace)
    await seed(db, seeded.first, 1)
    await seed(db, seeded.second, 100_001)
    # The identity column moved on: the rows as seeded now are the reference.
    seeded.first_rows = await rows_as_text(db, seeded.first)
    seeded.second_rows = await rows_as_text(db, seeded.second)


# ---------------------------------------------------------------------------
# Helpers


def scope(workspace: str = "", tables: Iterable[str] = TABLES) -> job_pb2.BackupScope:
    return job_pb2.BackupScope(workspace_id=workspace, tables=list(tables))


async def export(
    stub: Stub, backup_scope: job_pb2.BackupScope, chunk_bytes: int = 0
) -> list[pb.ExportBackupResponse]:
    request = pb.ExportBackupRequest(scope=backup_scope, chunk_bytes=chunk_bytes)
    return [message async for message in stub.ExportBackup(request, timeout=30)]


def to_request(message: pb.ExportBackupResponse) -> pb.RestoreBackupRequest:
    kind = message.WhichOneof("part")
    if kind == "header":
        return pb.RestoreBackupRequest(header=message.header)
    if kind == "chunk":
        return pb.RestoreBackupRequest(chunk=message.chunk)
    return pb.RestoreBackupRequest(manifest=message.manifest)


def requests_of(
    messages: Sequence[pb.ExportBackupResponse], replace_existing: bool = False
) -> list[pb.RestoreBackupRequest]:
    requests = [to_request(m) for m in messages]
    requests[0].replace_existing = replace_existing
    return requests


async def restore(
    stub: Stub, messages: Sequence[pb.ExportBackupResponse], replace_existing: bool = False
) -> pb.RestoreBackupResponse:
    response: pb.RestoreBackupResponse = await stub.RestoreBackup(
        iter(requests_of(messages, replace_existing)), timeout=30
    )
    return response


async def no_open_transactions(db: asyncpg.Connection, within: float = 15.0) -> None:
    """Waits until none of the service's backends is in a transaction or running a COPY."""
    started = time.monotonic()
    while True:
        busy = [
            (r["state"], r["query"])
            for r in (await service_backends(db)).values()
            if r["state"] != "idle" and not r["query"].startswith("SELECT pg_stat")
        ]
        if not busy:
            return
        assert time.monotonic() - started < within, f"service backends still busy: {busy}"
        await asyncio.sleep(0.05)


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def chunks_of(messages: Sequence[pb.ExportBackupResponse]) -> list[pb.BackupChunk]:
    return [m.chunk for m in messages if m.WhichOneof("part") == "chunk"]


# ---------------------------------------------------------------------------
# Export


async def test_export_stream_shape(maintenance: Stub, seeded: Workspaces) -> None:
    # Listed children-first: the backup still copies the referenced table first.
    messages = await export(maintenance, scope(seeded.first, [NOTES, ITEMS]), chunk_bytes=4096)
    header = messages[0].header
    assert messages[0].WhichOneof("part") == "header"
    assert messages[-1].WhichOneof("part") == "manifest"
    assert header.format_version == 1
    assert header.scope.workspace_id == seeded.first
    assert list(header.scope.tables) == [ITEMS, NOTES]
    assert [t.name for t in header.tables] == [ITEMS, NOTES]
    items = header.tables[0]
    # The generated column is left out; every other column is there, with its type.
    assert "label_length" not in items.columns
    assert items.columns[:3] == ["id", "workspace_id", "small"]
    assert dict(zip(items.columns, items.column_types, strict=True))["amount"] == "numeric(20,6)"
    assert list(header.tables[1].columns) == ["seq", "workspace_id", "item_id", "body"]
    assert header.server_version_num >= 150000
    assert header.snapshot_time.endswith("Z")

    chunks = chunks_of(messages)
    assert [c.sequence for c in chunks] == list(range(len(chunks)))
    assert all(len(c.data) <= 4096 for c in chunks)
    assert len(chunks) > 10
    for chunk in chunks:
        assert chunk.sha256 == hashlib.sha256(chunk.data).digest()
    # Each table's chunks together are one binary COPY stream.
    tables_in_order = [c.table for c in chunks]
    assert tables_in_order == sorted(tables_in_order, key=[ITEMS, NOTES].index)
    for table in TABLES:
        data = b"".join(c.data for c in chunks if c.table == table)
        assert data.startswith(b"PGCOPY\n\xff\r\n\x00")
        assert data.endswith(b"\xff\xff")

    manifest = messages[-1].manifest
    assert [(t.table, t.row_count) for t in manifest.tables] == [
        (ITEMS, ITEMS_PER_WORKSPACE),
        (NOTES, NOTES_PER_WORKSPACE),
    ]
    assert manifest.chunk_count == len(chunks)
    assert manifest.data_bytes == sum(len(c.data) for c in chunks)
    assert manifest.sha256 == hashlib.sha256(b"".join(c.data for c in chunks)).hexdigest()


async def test_export_of_an_empty_workspace(maintenance: Stub, seeded: Workspaces) -> None:
    messages = await export(maintenance, scope(str(uuid.uuid4())))
    chunks = chunks_of(messages)
    # Even no rows make one chunk per table: the COPY header and trailer.
    assert [c.table for c in chunks] == [ITEMS, NOTES]
    assert [t.row_count for t in messages[-1].manifest.tables] == [0, 0]


@pytest.mark.parametrize(
    ("request_scope", "chunk_bytes", "field"),
    [
        (scope("not-a-uuid"), 0, "scope.workspace_id"),
        (scope("00000000-0000-0000-0000-000000000000' OR '1'='1"), 0, "scope.workspace_id"),
        (scope("", [ITEMS, "no_such_table"]), 0, "scope.tables[1]"),
        (scope("", [ITEMS, "internal_secrets"]), 0, "scope.tables[1]"),
        (scope("", [ITEMS, ITEMS]), 0, "scope.tables[1]"),
        (scope(""), 100, "chunk_bytes"),
        (scope(""), 5 << 20, "chunk_bytes"),
    ],
)
async def test_export_refuses_bad_requests(
    maintenance: Stub,
    seeded: Workspaces,
    db: asyncpg.Connection,
    request_scope: job_pb2.BackupScope,
    chunk_bytes: int,
    field: str,
) -> None:
    received: list[pb.ExportBackupResponse] = []

    async def consume() -> None:
        request = pb.ExportBackupRequest(scope=request_scope, chunk_bytes=chunk_bytes)
        async for message in maintenance.ExportBackup(request, timeout=10):
            received.append(message)

    failure = await rpc_error(consume(), echoed=request_scope.workspace_id)
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.fields == [field]
    # Refused before anything was read: not even a header.
    assert received == []


@pytest.mark.parametrize("collect_garbage", [True, False], ids=["gc", "no-gc"])
async def test_cancelled_export_rolls_back(
    maintenance: Stub, seeded: Workspaces, db: asyncpg.Connection, collect_garbage: bool
) -> None:
    # Also with garbage collection off: the connection must not depend on the collector
    # finding the handler's generator (grpc.aio leaves one suspended at a send unclosed;
    # services/status.py closes it when the call ends). Under CPU load a cancelled export
    # once stayed idle in transaction past 15 s before that.
    if not collect_garbage:
        gc.disable()
    try:
        call = maintenance.ExportBackup(
            pb.ExportBackupRequest(scope=scope(), chunk_bytes=4096), timeout=30
        )
        for _ in range(3):
            assert await call.read() is not grpc.aio.EOF
        # The server fills its queue and the flow-control window, then waits to send.
        await asyncio.sleep(0.3)
        call.cancel()
        await no_open_transactions(db)
    finally:
        gc.enable()
    # The owner connections are free again: a whole export still runs.
    assert len(await export(maintenance, scope(seeded.second))) > 2


# ---------------------------------------------------------------------------
# Restore


async def test_workspace_round_trip(
    maintenance: Stub, restored: Workspaces, db: asyncpg.Connection
) -> None:
    messages = await export(maintenance, scope(restored.first), chunk_bytes=8192)
    await delete_workspace(db, restored.first)
    response = await restore(maintenance, messages)
    assert [(t.table, t.row_count) for t in response.tables] == [
        (ITEMS, ITEMS_PER_WORKSPACE),
        (NOTES, NOTES_PER_WORKSPACE),
    ]
    assert response.replaced_row_count == 0
    assert response.data_bytes == messages[-1].manifest.data_bytes
    assert await rows_as_text(db, restored.first) == restored.first_rows
    assert await rows_as_text(db, restored.second) == restored.second_rows


async def test_restore_refused_while_the_workspace_has_rows(
    maintenance: Stub, restored: Workspaces, db: asyncpg.Connection
) -> None:
    messages = await export(maintenance, scope(restored.first))
    failure = await rpc_error(restore(maintenance, messages))
    assert (failure.code, failure.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "WORKSPACE_NOT_EMPTY",
    )
    # With replace_existing: the workspace's rows are deleted and loaded again, at once.
    await db.execute(
        f"UPDATE {ITEMS} SET label = 'changed' WHERE workspace_id = $1", uuid.UUID(restored.first)
    )
    response = await restore(maintenance, messages, replace_existing=True)
    assert response.replaced_row_count == ITEMS_PER_WORKSPACE + NOTES_PER_WORKSPACE
    assert await rows_as_text(db, restored.first) == restored.first_rows
    assert await rows_as_text(db, restored.second) == restored.second_rows


async def test_all_workspaces_round_trip(
    maintenance: Stub, restored: Workspaces, db: asyncpg.Connection
) -> None:
    before = await rows_as_text(db, None)
    messages = await export(maintenance, scope("", [NOTES, ITEMS]))
    assert messages[0].header.scope.workspace_id == ""
    assert [t.row_count for t in messages[-1].manifest.tables] == [
        2 * ITEMS_PER_WORKSPACE,
        2 * NOTES_PER_WORKSPACE,
    ]
    failure = await rpc_error(restore(maintenance, messages))
    assert failure.reason == "WORKSPACE_NOT_EMPTY"
    await db.execute(f"DELETE FROM {NOTES}")
    await db.execute(f"DELETE FROM {ITEMS}")
    # As in a fresh database: the identity sequence starts again below the backup's values.
    await db.execute(f"ALTER TABLE {NOTES} ALTER COLUMN seq RESTART WITH 1")
    response = await restore(maintenance, messages)
    assert [t.row_count for t in response.tables] == [
        2 * ITEMS_PER_WORKSPACE,
        2 * NOTES_PER_WORKSPACE,
    ]
    assert await rows_as_text(db, None) == before
    # The restore moved the sequence past the loaded values: a new row does not collide.
    top = await db.fetchval(f"SELECT max(seq) FROM {NOTES}")
    new_seq = await db.fetchval(
        f"INSERT INTO {NOTES} (workspace_id, body) VALUES ($1, 'new') RETURNING seq",
        uuid.UUID(restored.first),
    )
    assert new_seq > top
    await db.execute(f"DELETE FROM {NOTES} WHERE seq = $1", new_seq)
    response = await restore(maintenance, messages, replace_existing=True)
    assert response.replaced_row_count == 2 * (ITEMS_PER_WORKSPACE + NOTES_PER_WORKSPACE)
    assert await rows_as_text(db, None) == before


async def assert_refused_and_untouched(
    stub: Stub,
    db: asyncpg.Connection,
    workspaces: Workspaces,
    requests: Sequence[pb.RestoreBackupRequest],
    code: grpc.StatusCode,
    reason: str,
) -> None:
    """The restore fails as expected; the (emptied) first workspace stays empty."""
    failure = await rpc_error(stub.RestoreBackup(iter(requests), timeout=30))
    assert (failure.code, failure.reason) == (code, reason), failure.message
    assert await rows_as_text(db, workspaces.first) == {ITEMS: [], NOTES: []}
    assert await rows_as_text(db, workspaces.second) == workspaces.second_rows
    await no_open_transactions(db)


async def test_corrupted_backups_are_refused(
    maintenance: Stub, restored: Workspaces, db: asyncpg.Connection
) -> None:
    messages = await export(maintenance, scope(restored.first), chunk_bytes=4096)
    await delete_workspace(db, restored.first)
    data_loss = grpc.StatusCode.DATA_LOSS

    # A flipped byte in the last chunk of the second table: the first table was loaded
    # by then, and is rolled back too.
    requests = requests_of(messages)
    last_chunk = requests[-2].chunk
    flipped = bytearray(last_chunk.data)
    flipped[len(flipped) // 2] ^= 0x01
    last_chunk.data = bytes(flipped)
    await assert_refused_and_untouched(
        maintenance, db, restored, requests, data_loss, "CHECKSUM_MISMATCH"
    )

    requests = requests_of(messages)
    requests[-1].manifest.sha256 = "0" * 64
    await assert_refused_and_untouched(
        maintenance, db, restored, requests, data_loss, "CHECKSUM_MISMATCH"
    )

    requests = requests_of(messages)
    requests[-1].manifest.tables[1].row_count += 1
    await assert_refused_and_untouched(
        maintenance, db, restored, requests, data_loss, "ROW_COUNT_MISMATCH"
    )


async def test_malformed_streams_are_refused(
    maintenance: Stub, restored: Workspaces, db: asyncpg.Connection
) -> None:
    messages = await export(maintenance, scope(restored.first), chunk_bytes=4096)
    await delete_workspace(db, restored.first)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    requests = requests_of(messages)
    cases = {
        "no header": requests[1:],
        "a missing chunk": requests[:3] + requests[4:],
        "chunks swapped": [requests[0], requests[2], requests[1], *requests[3:]],
        "no manifest": requests[:-1],
        "only a header": requests[:1],
        "two manifests": [*requests, requests[-1]],
        "a chunk after the manifest": [*requests, requests[1]],
    }
    for case in cases.values():
        await assert_refused_and_untouched(
            maintenance, db, restored, case, invalid, "MALFORMED_BACKUP"
        )
    await assert_refused_and_untouched(maintenance, db, restored, [], invalid, "MALFORMED_BACKUP")


async def test_a_changed_or_unknown_table_is_refused(
    maintenance: Stub, restored: Workspaces, db: asyncpg.Connection
) -> None:
    messages = await export(maintenance, scope(restored.first))
    await delete_workspace(db, restored.first)

    requests = requests_of(messages)
    requests[0].header.tables[0].column_types[5] = "numeric(10,2)"
    await assert_refused_and_untouched(
        maintenance, db, restored, requests, grpc.StatusCode.FAILED_PRECONDITION, "TABLE_CHANGED"
    )

    requests = requests_of(messages)
    del requests[0].header.tables[1].columns[3]
    del requests[0].header.tables[1].column_types[3]
    await assert_refused_and_untouched(
        maintenance, db, restored, requests, grpc.StatusCode.FAILED_PRECONDITION, "TABLE_CHANGED"
    )

    requests = requests_of(messages)
    requests[0].header.tables[1].name = "internal_secrets"
    failure = await rpc_error(maintenance.RestoreBackup(iter(requests), timeout=30))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.fields == ["header.tables[1]"]

    requests = requests_of(messages)
    requests[0].header.scope.workspace_id = "x' OR 1=1 --"
    failure = await rpc_error(maintenance.RestoreBackup(iter(requests), timeout=30))
    assert failure.fields == ["header.scope.workspace_id"]


async def test_a_backup_never_writes_into_another_workspace(
    maintenance: Stub, restored: Workspaces, db: asyncpg.Connection
) -> None:
    # Every workspace's rows, relabelled as the first workspace's backup: the second
    # workspace's rows in it must not be written, whatever the checksums say.
    messages = await export(maintenance, scope(""))
    await delete_workspace(db, restored.first)
    await delete_workspace(db, restored.second)
    requests = requests_of(messages)
    requests[0].header.scope.workspace_id = restored.first
    failure = await rpc_error(maintenance.RestoreBackup(iter(requests), timeout=30))
    assert (failure.code, failure.reason) == (grpc.StatusCode.DATA_LOSS, "ROW_COUNT_MISMATCH")
    assert await rows_as_text(db, None) == {ITEMS: [], NOTES: []}


async def test_a_restore_cancelled_half_way_leaves_nothing(
    maintenance: Stub, restored: Workspaces, db: asyncpg.Connection
) -> None:
    messages = await export(maintenance, scope(restored.first), chunk_bytes=4096)
    await delete_workspace(db, restored.first)
    requests = requests_of(messages)
    half = len(requests) // 2
    sent = asyncio.Event()

    async def stream() -> AsyncIterator[pb.RestoreBackupRequest]:
        for request in requests[:half]:
            yield request
        sent.set()
        await asyncio.sleep(60)  # never finishes: the client is cancelled meanwhile

    call = maintenance.RestoreBackup(stream(), timeout=30)
    await sent.wait()
    # Wait until the service is inside its COPY, then go away.
    started = time.monotonic()
    while not any(
        r["query"].startswith("COPY") and r["state"] == "active"
        for r in (await service_backends(db)).values()
    ):
        assert time.monotonic() - started < 15, "the restore's COPY never started"
        await asyncio.sleep(0.02)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await no_open_transactions(db)
    assert await rows_as_text(db, restored.first) == {ITEMS: [], NOTES: []}
    # Nothing leaked: a whole restore still runs.
    response = await restore(maintenance, messages)
    assert response.tables[0].row_count == ITEMS_PER_WORKSPACE
    assert await rows_as_text(db, restored.first) == restored.first_rows


async def test_a_restore_whose_server_is_killed_half_way_leaves_nothing(
    maintenance: Stub, restored: Workspaces, db: asyncpg.Connection, database_url: str
) -> None:
    """SIGKILL: no shutdown code runs, so only PostgreSQL's own rollback of a transaction
    whose client vanished stands between a half-loaded COPY and the table."""
    messages = await export(maintenance, scope(restored.first), chunk_bytes=4096)
    await delete_workspace(db, restored.first)
    requests = requests_of(messages)
    sent = asyncio.Event()

    async def stream() -> AsyncIterator[pb.RestoreBackupRequest]:
        for request in requests[: len(requests) // 2]:
            yield request
        sent.set()
        await asyncio.sleep(60)  # never finishes: the server dies meanwhile

    before = set(await service_backends(db))
    async with (
        serving(database_url, "--log-level", "WARNING") as (process, address),
        authorized_channel(address) as channel,
    ):
        call = Stub(channel).RestoreBackup(stream(), timeout=30)
        await sent.wait()
        started = time.monotonic()
        while not any(
            r["query"].startswith("COPY") and r["state"] == "active"
            for pid, r in (await service_backends(db)).items()
            if pid not in before
        ):
            assert time.monotonic() - started < 15, "the restore's COPY never started"
            await asyncio.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        await process.wait()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    await assert_no_new_backends(db, before)
    assert await rows_as_text(db, restored.first) == {ITEMS: [], NOTES: []}
    response = await restore(maintenance, messages)
    assert response.tables[0].row_count == ITEMS_PER_WORKSPACE
    assert await rows_as_text(db, restored.first) == restored.first_rows


# ---------------------------------------------------------------------------
# Files


@pytest.fixture(scope="module")
def backup_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("backup-root")
    (root / "backups").mkdir()
    (root / "outside").mkdir()
    (root / "backups" / "escape").symlink_to(root / "outside")
    (root / "backups" / "escape-file.bak").symlink_to(root / "outside" / "x.bak")
    return root / "backups"


@pytest.fixture(scope="module")
async def file_server(
    settings: Settings, backup_dir: Path, seeded: Workspaces
) -> AsyncIterator[RunningServer]:
    running = await start_server(settings, backup_dir=str(backup_dir))
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


async def test_file_round_trip(
    file_server: RunningServer, backup_dir: Path, restored: Workspaces, db: asyncpg.Connection
) -> None:
    backups = file_server.maintenance.backups
    spec = job_pb2.BackupToFileJob(scope=scope(restored.first), path="daily/first.bak")
    await backups.check_backup_file(spec, "spec.backup_to_file")
    progress = RecordingProgress()
    result = await backups.backup_to_file(spec, progress)
    file = backup_dir / "daily" / "first.bak"
    content = file.read_bytes()
    assert content.startswith(backup_file.MAGIC)
    assert result.backup_path == "daily/first.bak"
    assert result.backup_bytes == len(content)
    assert result.backup_sha256 == hashlib.sha256(content).hexdigest()
    assert [(t.table, t.action, t.rows) for t in result.tables] == [
        (ITEMS, "COPY TO", ITEMS_PER_WORKSPACE),
        (NOTES, "COPY TO", NOTES_PER_WORKSPACE),
    ]
    assert {phase for phase, *_ in progress.reports} == {f"copy {ITEMS}", f"copy {NOTES}", "commit"}
    assert progress.reports[-1][:2] == ("commit", len(content))
    assert all(unit == job_pb2.PROGRESS_UNIT_BYTES for *_, unit in progress.reports)
    # No temporary file is left next to it.
    assert os.listdir(backup_dir / "daily") == ["first.bak"]

    # The same name again: refused, the file untouched.
    with pytest.raises(ServiceError) as caught:
        await backups.check_backup_file(spec, "spec.backup_to_file")
    assert caught.value.reason == "BACKUP_FILE_EXISTS"
    with pytest.raises(ServiceError):
        await backups.backup_to_file(spec, RecordingProgress())
    assert file.read_bytes() == content

    restore_spec = job_pb2.RestoreFromFileJob(path="daily/first.bak")
    await backups.check_restore_file(restore_spec, "spec.restore_from_file")
    with pytest.raises(ServiceError) as caught:
        await backups.restore_from_file(restore_spec, RecordingProgress())
    assert caught.value.reason == "WORKSPACE_NOT_EMPTY"

    await delete_workspace(db, restored.first)
    progress = RecordingProgress()
    result = await backups.restore_from_file(restore_spec, progress)
    assert [(t.table, t.action, t.rows) for t in result.tables] == [
        (ITEMS, "COPY FROM", ITEMS_PER_WORKSPACE),
        (NOTES, "COPY FROM", NOTES_PER_WORKSPACE),
    ]
    assert result.backup_sha256 == hashlib.sha256(content).hexdigest()
    assert result.backup_bytes == len(content)
    assert progress.reports[-1][1:3] == (len(content), len(content))
    assert await rows_as_text(db, restored.first) == restored.first_rows

    replace = job_pb2.RestoreFromFileJob(path="daily/first.bak", replace_existing=True)
    result = await backups.restore_from_file(replace, RecordingProgress())
    assert [t.action for t in result.tables] == [
        "DELETE (replace)",
        "DELETE (replace)",
        "COPY FROM",
        "COPY FROM",
    ]
    assert await rows_as_text(db, restored.first) == restored.first_rows


async def test_damaged_files_are_refused(
    file_server: RunningServer, backup_dir: Path, restored: Workspaces, db: asyncpg.Connection
) -> None:
    backups = file_server.maintenance.backups
    spec = job_pb2.BackupToFileJob(scope=scope(restored.first), path="damaged.bak")
    await backups.backup_to_file(spec, RecordingProgress())
    content = (backup_dir / "damaged.bak").read_bytes()
    await delete_workspace(db, restored.first)

    cases = {
        "flipped.bak": (
            content[: len(content) // 2]
            + bytes([content[len(content) // 2] ^ 1])
            + content[len(content) // 2 + 1 :],
            {"CHECKSUM_MISMATCH", "MALFORMED_BACKUP"},
        ),
        "truncated.bak": (content[: len(content) - 10], {"MALFORMED_BACKUP"}),
        "not-a-backup.bak": (b"hello\n", {"MALFORMED_BACKUP"}),
    }
    for name, (data, reasons) in cases.items():
        (backup_dir / name).write_bytes(data)
        with pytest.raises(ServiceError) as caught:
            await backups.restore_from_file(
                job_pb2.RestoreFromFileJob(path=name), RecordingProgress()
            )
        assert caught.value.reason in reasons, (name, caught.value)
        assert await rows_as_text(db, restored.first) == {ITEMS: [], NOTES: []}
    await no_open_transactions(db)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("../outside/x.bak", "PATH_OUTSIDE_BACKUP_DIR"),
        ("daily/../../outside/x.bak", "PATH_OUTSIDE_BACKUP_DIR"),
        ("/tmp/x.bak", "PATH_OUTSIDE_BACKUP_DIR"),
        ("escape/x.bak", "PATH_OUTSIDE_BACKUP_DIR"),
        ("escape-file.bak", "PATH_OUTSIDE_BACKUP_DIR"),
        (".", "PATH_OUTSIDE_BACKUP_DIR"),
        ("", "PATH_REQUIRED"),
    ],
)
async def test_paths_outside_the_directory_are_refused(
    file_server: RunningServer, backup_dir: Path, seeded: Workspaces, path: str, reason: str
) -> None:
    async with authorized_channel(file_server.address) as channel:
        stub = Stub(channel)
        spec = job_pb2.JobSpec(
            backup_to_file=job_pb2.BackupToFileJob(scope=scope(seeded.first), path=path)
        )
        failure = await rpc_error(stub.StartJob(pb.StartJobRequest(spec=spec), timeout=10))
        assert (failure.code, failure.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
        assert failure.fields == ["spec.backup_to_file.path"]
        spec = job_pb2.JobSpec(restore_from_file=job_pb2.RestoreFromFileJob(path=path))
        failure = await rpc_error(stub.StartJob(pb.StartJobRequest(spec=spec), timeout=10))
        assert (failure.code, failure.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    backups = file_server.maintenance.backups
    with pytest.raises(ServiceError) as caught:
        await backups.backup_to_file(
            job_pb2.BackupToFileJob(scope=scope(seeded.first), path=path), RecordingProgress()
        )
    assert caught.value.reason == reason
    assert os.listdir(backup_dir.parent / "outside") == []


async def test_file_jobs_need_a_backup_directory(maintenance: Stub, seeded: Workspaces) -> None:
    for spec in (
        job_pb2.JobSpec(backup_to_file=job_pb2.BackupToFileJob(scope=scope(), path="x.bak")),
        job_pb2.JobSpec(restore_from_file=job_pb2.RestoreFromFileJob(path="x.bak")),
    ):
        failure = await rpc_error(maintenance.StartJob(pb.StartJobRequest(spec=spec), timeout=10))
        assert (failure.code, failure.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "BACKUP_DIR_NOT_SET",
        )


async def test_a_missing_file_is_not_found(
    file_server: RunningServer, backup_dir: Path, seeded: Workspaces
) -> None:
    (backup_dir / "a-directory").mkdir(exist_ok=True)
    async with authorized_channel(file_server.address) as channel:
        for path in ("none.bak", "a-directory", "none/x.bak"):
            spec = job_pb2.JobSpec(restore_from_file=job_pb2.RestoreFromFileJob(path=path))
            failure = await rpc_error(
                Stub(channel).StartJob(pb.StartJobRequest(spec=spec), timeout=10)
            )
            assert (failure.code, failure.reason) == (
                grpc.StatusCode.NOT_FOUND,
                "BACKUP_FILE_NOT_FOUND",
            ), path


async def test_file_jobs_through_start_and_watch(
    file_server: RunningServer, backup_dir: Path, restored: Workspaces, db: asyncpg.Connection
) -> None:
    async with authorized_channel(file_server.address) as channel:
        stub = Stub(channel)
        backup = job_pb2.JobSpec(
            backup_to_file=job_pb2.BackupToFileJob(scope=scope(restored.first), path="job.bak")
        )
        job = (await stub.StartJob(pb.StartJobRequest(spec=backup), timeout=10)).job
        seen = await watch_to_end(stub, job.job_id)
        final = seen[-1]
        assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error
        content = (backup_dir / "job.bak").read_bytes()
        assert final.result.backup_path == "job.bak"
        assert final.result.backup_sha256 == hashlib.sha256(content).hexdigest()
        assert [t.rows for t in final.result.tables] == [ITEMS_PER_WORKSPACE, NOTES_PER_WORKSPACE]

        # Refused while the workspace has rows: the job fails and says why.
        restore_spec = job_pb2.JobSpec(restore_from_file=job_pb2.RestoreFromFileJob(path="job.bak"))
        job = (await stub.StartJob(pb.StartJobRequest(spec=restore_spec), timeout=10)).job
        final = (await watch_to_end(stub, job.job_id))[-1]
        assert final.state == job_pb2.JOB_STATE_FAILED
        assert (final.error.code, final.error.reason) == (
            "FAILED_PRECONDITION",
            "WORKSPACE_NOT_EMPTY",
        )

        await delete_workspace(db, restored.first)
        job = (await stub.StartJob(pb.StartJobRequest(spec=restore_spec), timeout=10)).job
        final = (await watch_to_end(stub, job.job_id))[-1]
        assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error
        assert [(t.action, t.rows) for t in final.result.tables] == [
            ("COPY FROM", ITEMS_PER_WORKSPACE),
            ("COPY FROM", NOTES_PER_WORKSPACE),
        ]
        assert await rows_as_text(db, restored.first) == restored.first_rows


async def test_a_table_whose_names_need_quoting(
    maintenance: Stub, seeded: Workspaces, db: asyncpg.Connection, server: RunningServer
) -> None:
    workspace = uuid.uuid4()
    table = quote(ODD_TABLE)
    await server.catalog.reload()
    await db.executemany(
        f'INSERT INTO {table} (id, workspace_id, "select", "drop table x; --") '
        "VALUES ($1, $2, $3, $4)",
        [(9_000_000 + i, workspace, f"s{i}", None if i % 2 else "'; --") for i in range(5)],
    )
    select = f"SELECT t::text FROM {table} t WHERE workspace_id = $1 ORDER BY id"
    before = [r[0] for r in await db.fetch(select, workspace)]
    messages = await export(maintenance, scope(str(workspace), [ODD_TABLE]))
    await db.execute(f"DELETE FROM {table} WHERE workspace_id = $1", workspace)
    response = await restore(maintenance, messages)
    assert [(t.table, t.row_count) for t in response.tables] == [(ODD_TABLE, 5)]
    assert [r[0] for r in await db.fetch(select, workspace)] == before
    await db.execute(f"DELETE FROM {table} WHERE workspace_id = $1", workspace)


# ---------------------------------------------------------------------------
# Replacing restores and the rows of tables outside the backup

FK_PARENTS = "backup_fk_parents"
# Child tables, each referencing FK_PARENTS with another ON DELETE action. The hidden one
# has no workspace_id, so the server does not expose it; its rows count all the same.
FK_CHILDREN = {
    "backup_fk_cascade": "ON DELETE CASCADE",
    "backup_fk_set_null": "ON DELETE SET NULL",
    "backup_fk_set_default": "ON DELETE SET DEFAULT",
    "backup_fk_hidden": "ON DELETE CASCADE",
    "backup_fk_restrict": "ON DELETE RESTRICT",
    "backup_fk_no_action": "",
}
FK_REFUSALS = {
    "backup_fk_cascade": "DEPENDENT_ROWS_OUTSIDE_BACKUP",
    "backup_fk_set_null": "DEPENDENT_ROWS_OUTSIDE_BACKUP",
    "backup_fk_set_default": "DEPENDENT_ROWS_OUTSIDE_BACKUP",
    "backup_fk_hidden": "DEPENDENT_ROWS_OUTSIDE_BACKUP",
    "backup_fk_restrict": "FOREIGN_KEY_VIOLATION",
    "backup_fk_no_action": "FOREIGN_KEY_VIOLATION",
}


def fk_schema_sql() -> str:
    parts = [
        f"CREATE TABLE {FK_PARENTS} (id bigint PRIMARY KEY, workspace_id uuid NOT NULL, "
        "name text NOT NULL);"
    ]
    for child, action in FK_CHILDREN.items():
        workspace = "" if child == "backup_fk_hidden" else "workspace_id uuid NOT NULL, "
        parts.append(
            f"CREATE TABLE {child} (id bigint PRIMARY KEY, {workspace}"
            f"parent_id bigint DEFAULT NULL REFERENCES {FK_PARENTS} (id) {action});"
        )
    return "\n".join(parts)


async def fk_rows(db: asyncpg.Connection) -> dict[str, list[str]]:
    return {
        table: [r[0] for r in await db.fetch(f"SELECT t::text FROM {table} t ORDER BY id")]
        for table in [FK_PARENTS, *FK_CHILDREN]
    }


async def add_child(db: asyncpg.Connection, child: str, row_id: int, workspace: uuid.UUID) -> None:
    """A row of `child` that references parent 1 (of the first workspace)."""
    if child == "backup_fk_hidden":
        await db.execute(f"INSERT INTO {child} (id, parent_id) VALUES ($1, 1)", row_id)
    else:
        await db.execute(
            f"INSERT INTO {child} (id, workspace_id, parent_id) VALUES ($1, $2, 1)",
            row_id,
            workspace,
        )


@pytest.fixture
async def fk_workspaces(
    server: RunningServer, seeded: Workspaces, db: asyncpg.Connection
) -> AsyncIterator[tuple[uuid.UUID, uuid.UUID]]:
    """Parents 1-5 in a first workspace, 101-105 in a second; each child table has a row
    of the second workspace referencing the second workspace's parent 101."""
    first, second = uuid.uuid4(), uuid.uuid4()
    await db.execute(fk_schema_sql())
    await db.executemany(
        f"INSERT INTO {FK_PARENTS} VALUES ($1, $2, $3)",
        [(i, first, f"p{i}") for i in range(1, 6)]
        + [(i, second, f"p{i}") for i in range(101, 106)],
    )
    for child in FK_CHILDREN:
        if child == "backup_fk_hidden":
            await db.execute(f"INSERT INTO {child} (id, parent_id) VALUES (1001, 101)")
        else:
            await db.execute(
                f"INSERT INTO {child} (id, workspace_id, parent_id) VALUES (1001, $1, 101)", second
            )
    await server.catalog.reload()
    try:
        yield first, second
    finally:
        await db.execute(f"DROP TABLE {', '.join([*FK_CHILDREN, FK_PARENTS])}")
        await server.catalog.reload()


async def test_a_replacing_restore_never_reaches_tables_outside_the_backup(
    maintenance: Stub, fk_workspaces: tuple[uuid.UUID, uuid.UUID], db: asyncpg.Connection
) -> None:
    first, _ = fk_workspaces
    messages = await export(maintenance, scope(str(first), [FK_PARENTS]))
    # The other workspace's child rows reference other parents: they do not stand in the way.
    before = await fk_rows(db)
    response = await restore(maintenance, messages, replace_existing=True)
    assert response.replaced_row_count == 5
    assert await fk_rows(db) == before

    # A backup of every workspace's parents would replace parent 101, which they reference.
    everything = await export(maintenance, scope("", [FK_PARENTS]))
    failure = await rpc_error(restore(maintenance, everything, replace_existing=True))
    assert (failure.code, failure.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "DEPENDENT_ROWS_OUTSIDE_BACKUP",
    )
    assert failure.metadata["table"] in FK_CHILDREN
    assert await fk_rows(db) == before

    for child, reason in FK_REFUSALS.items():
        await add_child(db, child, 1, first)
        # A change the restore would undo: still there afterwards means nothing was written.
        await db.execute(f"UPDATE {FK_PARENTS} SET name = 'changed' WHERE id = 2")
        snapshot = await fk_rows(db)
        failure = await rpc_error(restore(maintenance, messages, replace_existing=True))
        assert (failure.code, failure.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            reason,
        ), (child, failure.message)
        if reason == "DEPENDENT_ROWS_OUTSIDE_BACKUP":
            assert failure.metadata == {"table": child, "referenced_table": FK_PARENTS}
            assert repr(child) in failure.message
        assert await fk_rows(db) == snapshot, child
        await no_open_transactions(db)
        await db.execute(f"DELETE FROM {child} WHERE id = 1")

    # Without the referencing rows the restore goes through, and undoes the change.
    response = await restore(maintenance, messages, replace_existing=True)
    assert response.replaced_row_count == 5
    assert await fk_rows(db) == before


async def test_a_replacing_file_restore_never_reaches_tables_outside_the_backup(
    file_server: RunningServer,
    fk_workspaces: tuple[uuid.UUID, uuid.UUID],
    db: asyncpg.Connection,
) -> None:
    first, _ = fk_workspaces
    await file_server.catalog.reload()
    try:
        async with authorized_channel(file_server.address) as channel:
            stub = Stub(channel)
            backup = job_pb2.JobSpec(
                backup_to_file=job_pb2.BackupToFileJob(
                    scope=scope(str(first), [FK_PARENTS]), path="fk/parents.bak"
                )
            )
            job = (await stub.StartJob(pb.StartJobRequest(spec=backup), timeout=10)).job
            final = (await watch_to_end(stub, job.job_id))[-1]
            assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error
            await add_child(db, "backup_fk_cascade", 1, first)
            snapshot = await fk_rows(db)
            restore_spec = job_pb2.JobSpec(
                restore_from_file=job_pb2.RestoreFromFileJob(
                    path="fk/parents.bak", replace_existing=True
                )
            )
            job = (await stub.StartJob(pb.StartJobRequest(spec=restore_spec), timeout=10)).job
            final = (await watch_to_end(stub, job.job_id))[-1]
            assert final.state == job_pb2.JOB_STATE_FAILED
            assert (final.error.code, final.error.reason) == (
                "FAILED_PRECONDITION",
                "DEPENDENT_ROWS_OUTSIDE_BACKUP",
            )
            assert "backup_fk_cascade" in final.error.message
            assert await fk_rows(db) == snapshot
    finally:
        await db.execute("DELETE FROM backup_fk_cascade WHERE id = 1")


# ---------------------------------------------------------------------------
# Backup paths with {time}

TIME_NAME = re.compile(r"nightly/ws-\d{8}T\d{6}Z\.backup")


async def test_a_time_template_names_a_new_file_each_run(
    file_server: RunningServer, backup_dir: Path, seeded: Workspaces
) -> None:
    spec = job_pb2.JobSpec(
        backup_to_file=job_pb2.BackupToFileJob(
            scope=scope(seeded.first), path="nightly/ws-{time}.backup"
        )
    )
    paths = []
    async with authorized_channel(file_server.address) as channel:
        stub = Stub(channel)
        for run in range(2):
            if run:
                await asyncio.sleep(1.05)  # the next run starts in a later second
            job = (await stub.StartJob(pb.StartJobRequest(spec=spec), timeout=10)).job
            final = (await watch_to_end(stub, job.job_id))[-1]
            assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error
            assert TIME_NAME.fullmatch(final.result.backup_path), final.result.backup_path
            content = (backup_dir / final.result.backup_path).read_bytes()
            assert final.result.backup_sha256 == hashlib.sha256(content).hexdigest()
            paths.append(final.result.backup_path)
    assert paths[0] != paths[1]


async def test_the_time_is_the_runs_start_in_utc(
    file_server: RunningServer, backup_dir: Path, seeded: Workspaces
) -> None:
    backups = file_server.maintenance.backups
    spec = job_pb2.BackupToFileJob(scope=scope(seeded.first), path="at/{time}-{time}.bak")
    started = dt.datetime(2024, 1, 31, 3, 4, 5, 999_999, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    result = await backups.backup_to_file(spec, RecordingProgress(), started)
    assert result.backup_path == "at/20240131T020405Z-20240131T020405Z.bak"
    assert (backup_dir / result.backup_path).is_file()
    # The same second again: that name is taken, and the file is left as it was.
    with pytest.raises(ServiceError) as caught:
        await backups.backup_to_file(spec, RecordingProgress(), started)
    assert caught.value.reason == "BACKUP_FILE_EXISTS"
    # A template passes the check even while today's expansion happens to exist.
    await backups.check_backup_file(spec, "spec.backup_to_file")


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("{date}.bak", "INVALID_PATH_TEMPLATE"),
        ("x{.bak", "INVALID_PATH_TEMPLATE"),
        ("x}.bak", "INVALID_PATH_TEMPLATE"),
        ("{time.bak", "INVALID_PATH_TEMPLATE"),
        ("{{time}}.bak", "INVALID_PATH_TEMPLATE"),
        ("{TIME}.bak", "INVALID_PATH_TEMPLATE"),
        ("../{time}.bak", "PATH_OUTSIDE_BACKUP_DIR"),
        ("escape/{time}.bak", "PATH_OUTSIDE_BACKUP_DIR"),
        ("/tmp/{time}.bak", "PATH_OUTSIDE_BACKUP_DIR"),
    ],
)
async def test_bad_path_templates_are_refused(
    file_server: RunningServer, backup_dir: Path, seeded: Workspaces, path: str, reason: str
) -> None:
    async with authorized_channel(file_server.address) as channel:
        spec = job_pb2.JobSpec(
            backup_to_file=job_pb2.BackupToFileJob(scope=scope(seeded.first), path=path)
        )
        failure = await rpc_error(
            Stub(channel).StartJob(pb.StartJobRequest(spec=spec), timeout=10), echoed=path
        )
    assert (failure.code, failure.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert failure.fields == ["spec.backup_to_file.path"]
    assert os.listdir(backup_dir.parent / "outside") == []


# ---------------------------------------------------------------------------
# Files swapped after their path was checked


async def test_a_fifo_is_not_a_backup_file(
    file_server: RunningServer, backup_dir: Path, seeded: Workspaces
) -> None:
    fifo = backup_dir / "a-fifo.bak"
    os.mkfifo(fifo)
    try:
        async with authorized_channel(file_server.address) as channel:
            spec = job_pb2.JobSpec(restore_from_file=job_pb2.RestoreFromFileJob(path=fifo.name))
            failure = await rpc_error(
                Stub(channel).StartJob(pb.StartJobRequest(spec=spec), timeout=10)
            )
        assert (failure.code, failure.reason) == (
            grpc.StatusCode.NOT_FOUND,
            "BACKUP_FILE_NOT_FOUND",
        )
    finally:
        fifo.unlink()


async def test_a_file_swapped_after_its_check_is_refused(
    file_server: RunningServer, backup_dir: Path, tmp_path: Path, seeded: Workspaces
) -> None:
    backups = file_server.maintenance.backups
    spec = job_pb2.BackupToFileJob(scope=scope(seeded.first), path="swapped.bak")
    await backups.backup_to_file(spec, RecordingProgress())
    name = backup_dir / "swapped.bak"
    # A whole backup outside the directory: following a link to it would read it fine.
    outside = tmp_path / "elsewhere.bak"
    outside.write_bytes(name.read_bytes())

    def swap_for_symlink() -> None:
        name.unlink()
        name.symlink_to(outside)

    def swap_for_fifo() -> None:
        name.unlink()
        os.mkfifo(name)

    try:
        for swap in (swap_for_symlink, swap_for_fifo):
            name.unlink(missing_ok=True)
            name.write_bytes(outside.read_bytes())
            # Checked while it is the real file, swapped before it is opened.
            checked = backup_file.resolve(str(backup_dir), "swapped.bak", "path")
            swap()
            reader = backup_file.BackupReader(checked, "path")
            with pytest.raises(ServiceError) as caught:
                await asyncio.wait_for(read_all(reader), 10)  # a FIFO must not block the open
            assert caught.value.reason == "BACKUP_FILE_NOT_FOUND", swap.__name__
            assert reader.bytes == 0
    finally:
        name.unlink(missing_ok=True)


async def read_all(reader: backup_file.BackupReader) -> None:
    async with contextlib.aclosing(reader.messages()) as messages:
        async for _ in messages:
            pass


# ---------------------------------------------------------------------------
# Tables as they are in the backup's own transaction, not as the cached catalog says

STALE = "backup_stale"


@pytest.fixture(scope="module")
async def stale_server(settings: Settings, seeded: Workspaces) -> AsyncIterator[RunningServer]:
    """A server whose catalog is reloaded only when a test says so: its cached columns go
    stale on purpose (the default timer, 30 s, leaves the same window)."""
    running = await start_server(settings, catalog_refresh_seconds=3600.0)
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


@pytest.fixture
async def stale_table(stale_server: RunningServer, db: asyncpg.Connection) -> AsyncIterator[Stub]:
    """STALE as the server's catalog knows it, and a stub of that server; dropped after."""
    await db.execute(
        f"CREATE TABLE {STALE} (id bigint PRIMARY KEY, workspace_id uuid NOT NULL, a text, "
        "gone text)"
    )
    await stale_server.catalog.reload()
    try:
        async with authorized_channel(stale_server.address) as channel:
            yield Stub(channel)
    finally:
        kind = await db.fetchval(
            "SELECT relkind::text FROM pg_class WHERE oid = $1::regclass", STALE
        )
        await db.execute(f"DROP {'VIEW' if kind == 'v' else 'TABLE'} {STALE}")
        await stale_server.catalog.reload()


async def stale_rows(db: asyncpg.Connection) -> list[str]:
    return [r[0] for r in await db.fetch(f"SELECT t::text FROM {STALE} t ORDER BY id")]


async def test_a_backup_holds_the_columns_the_table_has_now(
    stale_table: Stub, db: asyncpg.Connection
) -> None:
    """A migration since the server last read its catalog: the backup used to leave the new
    column out (its values lost on restore) and fail on the dropped one."""
    stub = stale_table
    workspace = uuid.uuid4()
    await db.execute(f"ALTER TABLE {STALE} ADD COLUMN b text, DROP COLUMN gone")
    await db.execute(
        f"INSERT INTO {STALE} VALUES (1, $1, 'a1', 'precious b1'), (2, $1, 'a2', NULL)",
        workspace,
    )
    before = await stale_rows(db)
    for backup_scope in (scope(str(workspace), [STALE]), scope("", [STALE])):
        messages = await export(stub, backup_scope)
        (table,) = messages[0].header.tables
        assert list(table.columns) == ["id", "workspace_id", "a", "b"]
        assert list(table.column_types) == ["bigint", "uuid", "text", "text"]
        await db.execute(f"DELETE FROM {STALE}")
        response = await restore(stub, messages)
        assert [(t.table, t.row_count) for t in response.tables] == [(STALE, 2)]
        assert await stale_rows(db) == before

    # A restore checks the backup against the table as it is now, cache or not.
    await db.execute(f"ALTER TABLE {STALE} ADD COLUMN c integer")
    await db.execute(f"DELETE FROM {STALE}")
    failure = await rpc_error(restore(stub, messages))
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TABLE_CHANGED")
    assert "'c' is not in the backup" in failure.message
    assert await stale_rows(db) == []


async def test_a_table_replaced_by_a_view_is_a_changed_table(
    stale_table: Stub, db: asyncpg.Connection
) -> None:
    stub = stale_table
    workspace = uuid.uuid4()
    await db.execute(f"INSERT INTO {STALE} VALUES (1, $1, 'a1', 'g1')", workspace)
    messages = await export(stub, scope(str(workspace), [STALE]))
    await db.execute(f"DROP TABLE {STALE}")
    await db.execute(
        f"CREATE VIEW {STALE} AS SELECT 1::bigint AS id, "
        f"'{workspace}'::uuid AS workspace_id, 'a1'::text AS a, 'g1'::text AS gone"
    )
    # Every workspace's export used to reach COPY with the view and fail as INTERNAL.
    for backup_scope in (scope(str(workspace), [STALE]), scope("", [STALE])):
        failure = await rpc_error(export(stub, backup_scope))
        assert (failure.code, failure.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "TABLE_CHANGED",
        )
    failure = await rpc_error(restore(stub, messages))
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TABLE_CHANGED")


def test_a_wrong_object_type_is_a_failed_precondition() -> None:
    """SQLSTATE 42809 (a statement met an object of another kind, such as a partitioned
    table where COPY wants a plain one) used to fall through to INTERNAL."""
    error = to_service_error(
        asyncpg.exceptions.WrongObjectTypeError('cannot copy from partitioned table "x"')
    )
    assert (error.code, error.reason) == (Code.FAILED_PRECONDITION, "WRONG_OBJECT_TYPE")


REWRITE_FIRST = "backup_rewrite_first"
REWRITE_SECOND = "backup_rewrite_second"


async def test_a_table_altered_during_a_backup_keeps_its_rows(
    maintenance: Stub, server: RunningServer, db: asyncpg.Connection, database_url: str
) -> None:
    """An ALTER TABLE that rewrites a table the backup has not reached yet waits for it: a
    rewrite committed after the backup's snapshot made the table look empty to it."""
    workspace = uuid.uuid4()
    await db.execute(
        f"CREATE TABLE {REWRITE_FIRST} (id bigint PRIMARY KEY, workspace_id uuid NOT NULL, "
        f"pad text); CREATE TABLE {REWRITE_SECOND} (id bigint PRIMARY KEY, "
        "workspace_id uuid NOT NULL, n integer)"
    )
    migration: asyncio.Task[str] | None = None
    migrator = await asyncpg.connect(database_url)
    try:
        # About 4 MB of COPY data first: the export stalls in it while nobody reads.
        await db.execute(
            f"INSERT INTO {REWRITE_FIRST} SELECT g, $1, repeat('x', 2000) "
            "FROM generate_series(1, 2000) g",
            workspace,
        )
        await db.execute(
            f"INSERT INTO {REWRITE_SECOND} SELECT g, $1, g FROM generate_series(1, 50) g",
            workspace,
        )
        await server.catalog.reload()
        call = maintenance.ExportBackup(
            pb.ExportBackupRequest(
                scope=scope(str(workspace), [REWRITE_FIRST, REWRITE_SECOND]), chunk_bytes=4096
            ),
            timeout=30,
        )
        first = await call.read()
        assert isinstance(first, pb.ExportBackupResponse)
        assert [t.name for t in first.header.tables] == [REWRITE_FIRST, REWRITE_SECOND]
        migration = asyncio.create_task(
            migrator.execute(f"ALTER TABLE {REWRITE_SECOND} ALTER COLUMN n TYPE bigint")
        )
        await wait_for_statement_lock_wait(db, "ALTER TABLE", within=5.0)
        messages = [first]
        while (message := await call.read()) is not grpc.aio.EOF:
            assert isinstance(message, pb.ExportBackupResponse)
            messages.append(message)
        assert [(t.table, t.row_count) for t in messages[-1].manifest.tables] == [
            (REWRITE_FIRST, 2000),
            (REWRITE_SECOND, 50),
        ]
        await asyncio.wait_for(migration, 10)
    finally:
        if migration is not None and not migration.done():
            migration.cancel()
            with contextlib.suppress(BaseException):
                await migration
        await migrator.close()
        await db.execute(f"DROP TABLE {REWRITE_FIRST}, {REWRITE_SECOND}")
        await server.catalog.reload()


# ---------------------------------------------------------------------------
# Tables that reference each other

PROJECTS = "backup_cycle_projects"
TASKS = "backup_cycle_tasks"


@contextlib.asynccontextmanager
async def cycle_tables(
    server: RunningServer, db: asyncpg.Connection, project_key: str, lead_key: str
) -> AsyncIterator[None]:
    """Projects and their tasks: tasks.project_id (NOT NULL) references a project with
    `project_key`, projects.lead_task (nullable) a task with `lead_key`."""
    await db.execute(
        f"""CREATE TABLE {PROJECTS} (id bigint PRIMARY KEY, workspace_id uuid NOT NULL,
                lead_task bigint);
            CREATE TABLE {TASKS} (id bigint PRIMARY KEY, workspace_id uuid NOT NULL,
                project_id bigint NOT NULL REFERENCES {PROJECTS} (id) {project_key});
            ALTER TABLE {PROJECTS} ADD CONSTRAINT {PROJECTS}_lead FOREIGN KEY (lead_task)
                REFERENCES {TASKS} (id) {lead_key};"""
    )
    await server.catalog.reload()
    try:
        yield
    finally:
        await db.execute(f"DROP TABLE {PROJECTS}, {TASKS} CASCADE")
        await server.catalog.reload()


async def cycle_rows(db: asyncpg.Connection) -> dict[str, list[str]]:
    return {
        table: [r[0] for r in await db.fetch(f"SELECT t::text FROM {table} t ORDER BY id")]
        for table in (PROJECTS, TASKS)
    }


async def fill_cycle(db: asyncpg.Connection, workspace: uuid.UUID, leads: bool) -> None:
    """Two projects with two tasks each, written the ordinary way: projects, then their
    tasks, then (`leads`) each project points at its lead task, closing the cycle."""
    await db.execute(
        f"INSERT INTO {PROJECTS} VALUES (1, $1, NULL), (2, $1, NULL), (3, $1, NULL)", workspace
    )
    await db.execute(
        f"INSERT INTO {TASKS} VALUES (10, $1, 1), (11, $1, 1), (20, $1, 2), (21, $1, 2)",
        workspace,
    )
    if leads:
        await db.execute(f"UPDATE {PROJECTS} SET lead_task = id * 10 + 1 WHERE id < 3")


async def empty_cycle(db: asyncpg.Connection) -> None:
    await db.execute(f"UPDATE {PROJECTS} SET lead_task = NULL")
    await db.execute(f"DELETE FROM {TASKS}")
    await db.execute(f"DELETE FROM {PROJECTS}")


@pytest.mark.parametrize(
    ("project_key", "lead_key"),
    [("DEFERRABLE", "DEFERRABLE"), ("", "DEFERRABLE"), ("DEFERRABLE INITIALLY DEFERRED", "")],
    ids=["both-deferrable", "lead-deferrable", "project-deferrable"],
)
async def test_tables_that_reference_each_other_round_trip(
    maintenance: Stub,
    server: RunningServer,
    db: asyncpg.Connection,
    project_key: str,
    lead_key: str,
) -> None:
    """Rows that reference each other across two tables, through keys of which at least one
    is DEFERRABLE: the restore checks those at COMMIT. Such a backup used to be refused,
    replacing or not (FOREIGN_KEY_VIOLATION), though the export had succeeded."""
    workspace = uuid.uuid4()
    async with cycle_tables(server, db, project_key, lead_key):
        await fill_cycle(db, workspace, leads=True)
        before = await cycle_rows(db)
        # Children first as asked: the backup orders them so the keys that are not
        # DEFERRABLE hold table by table.
        messages = await export(maintenance, scope(str(workspace), [TASKS, PROJECTS]))
        order = [t.name for t in messages[0].header.tables]
        assert order == ([TASKS, PROJECTS] if project_key else [PROJECTS, TASKS])

        response = await restore(maintenance, messages, replace_existing=True)
        assert response.replaced_row_count == 7
        assert await cycle_rows(db) == before

        await empty_cycle(db)
        response = await restore(maintenance, messages)
        assert [t.row_count for t in response.tables] == ([4, 3] if project_key else [3, 4])
        assert await cycle_rows(db) == before


async def test_a_cycle_of_keys_that_are_not_deferrable_is_refused_clearly(
    maintenance: Stub, server: RunningServer, db: asyncpg.Connection
) -> None:
    workspace = uuid.uuid4()
    async with cycle_tables(server, db, "", ""):
        # No row closes the cycle: the nullable key is the one the order breaks.
        await fill_cycle(db, workspace, leads=False)
        before = await cycle_rows(db)
        messages = await export(maintenance, scope(str(workspace), [TASKS, PROJECTS]))
        assert [t.name for t in messages[0].header.tables] == [PROJECTS, TASKS]
        await restore(maintenance, messages, replace_existing=True)
        await empty_cycle(db)
        await restore(maintenance, messages)
        assert await cycle_rows(db) == before

        # Rows that reference each other around the cycle load in no order.
        await db.execute(f"UPDATE {PROJECTS} SET lead_task = id * 10 + 1 WHERE id < 3")
        before = await cycle_rows(db)
        messages = await export(maintenance, scope(str(workspace), [PROJECTS, TASKS]))
        for replace_existing in (True, False):
            if not replace_existing:
                await empty_cycle(db)
            failure = await rpc_error(restore(maintenance, messages, replace_existing))
            assert (failure.code, failure.reason) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                "FOREIGN_KEY_CYCLE",
            ), failure.message
            assert failure.metadata["constraint"] in {
                f"{PROJECTS}_lead",
                f"{TASKS}_project_id_fkey",
            }
            assert "DEFERRABLE" in failure.message
            # Nothing written.
            assert await cycle_rows(db) == (
                before if replace_existing else {PROJECTS: [], TASKS: []}
            )
            await no_open_transactions(db)


# ---------------------------------------------------------------------------
# Partitioned tables

PARTITIONED = "backup_partitioned"


async def test_a_partitioned_table_round_trips_for_every_workspace(
    maintenance: Stub, server: RunningServer, db: asyncpg.Connection
) -> None:
    """`COPY table TO` refuses a partitioned table: a backup of every workspace failed."""
    await db.execute(
        f"""CREATE TABLE {PARTITIONED} (id bigint NOT NULL, workspace_id uuid NOT NULL,
                created_at timestamptz NOT NULL, body text) PARTITION BY RANGE (created_at);
            CREATE TABLE {PARTITIONED}_old PARTITION OF {PARTITIONED}
                FOR VALUES FROM (MINVALUE) TO ('2024-01-01');
            CREATE TABLE {PARTITIONED}_new PARTITION OF {PARTITIONED}
                FOR VALUES FROM ('2024-01-01') TO (MAXVALUE);"""
    )
    try:
        await server.catalog.reload()
        for workspace in (uuid.uuid4(), uuid.uuid4()):
            await db.execute(
                f"INSERT INTO {PARTITIONED} SELECT g, $1, "
                "timestamptz '2023-12-31' + g * interval '1 hour', 'row ' || g "
                "FROM generate_series(1, 40) g",
                workspace,
            )
        select = f"SELECT t::text FROM {PARTITIONED} t ORDER BY workspace_id, id"
        before = [r[0] for r in await db.fetch(select)]
        messages = await export(maintenance, scope("", [PARTITIONED]))
        assert [(t.table, t.row_count) for t in messages[-1].manifest.tables] == [(PARTITIONED, 80)]
        await db.execute(f"DELETE FROM {PARTITIONED}")
        response = await restore(maintenance, messages)
        assert [t.row_count for t in response.tables] == [80]
        assert [r[0] for r in await db.fetch(select)] == before
        response = await restore(maintenance, messages, replace_existing=True)
        assert response.replaced_row_count == 80
        assert [r[0] for r in await db.fetch(select)] == before
    finally:
        await db.execute(f"DROP TABLE {PARTITIONED}")
        await server.catalog.reload()


# ---------------------------------------------------------------------------
# Message and file name limits

BLOBS = "backup_blobs"


async def test_the_largest_chunk_size_fits_a_default_channel(
    maintenance: Stub, server: RunningServer, db: asyncpg.Connection
) -> None:
    """chunk_bytes 4,194,304 read through a channel with gRPC's default 4 MiB receive limit
    (this module's channel): chunks of that much data made messages a little larger."""
    workspace = uuid.uuid4()
    await db.execute(
        f"CREATE TABLE {BLOBS} (id int PRIMARY KEY, workspace_id uuid NOT NULL, b bytea)"
    )
    try:
        await server.catalog.reload()
        blob = os.urandom(5 << 20)
        await db.execute(f"INSERT INTO {BLOBS} VALUES (1, $1, $2)", workspace, blob)
        messages = await export(maintenance, scope(str(workspace), [BLOBS]), chunk_bytes=4 << 20)
        chunks = chunks_of(messages)
        assert len(chunks[0].data) == backup_stream.LARGEST_CHUNK_DATA
        assert all(m.ByteSize() <= 4 << 20 for m in messages)
        await db.execute(f"DELETE FROM {BLOBS}")
        await restore(maintenance, messages)
        assert await db.fetchval(f"SELECT b FROM {BLOBS} WHERE id = 1") == blob
    finally:
        await db.execute(f"DROP TABLE {BLOBS}")
        await server.catalog.reload()
    # The documented range is still accepted; a server with a lower message limit cuts
    # chunks to fit that instead.
    assert backup_stream.chunk_bytes(4 << 20, 64 << 20) == (4 << 20) - 1024
    assert backup_stream.chunk_bytes(4 << 20, 1 << 20) == (1 << 20) - 1024
    assert backup_stream.chunk_bytes(0, 64 << 20) == 1 << 20
    assert backup_stream.chunk_bytes(4096, 64 << 20) == 4096


async def test_a_backup_file_name_of_255_bytes_works(
    file_server: RunningServer, backup_dir: Path, seeded: Workspaces
) -> None:
    """The longest name a file system takes: the temporary file's name, which used to be
    the target's with 17 bytes added, was too long."""
    name = "n" * 251 + ".bak"
    spec = job_pb2.BackupToFileJob(scope=scope(seeded.first), path=f"long/{name}")
    await file_server.maintenance.backups.check_backup_file(spec, "spec.backup_to_file")
    result = await file_server.maintenance.backups.backup_to_file(spec, RecordingProgress())
    assert result.backup_path == f"long/{name}"
    assert os.listdir(backup_dir / "long") == [name]
