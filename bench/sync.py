"""Sync stream figures: snapshot rows per second next to asyncpg reading the same rows,
commit-to-delivery latency of a following stream, and a large catch-up epoch.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench.sync [--rows N]

One run: a fresh database on DATABASE_URL's server with `bench_items` (N rows of
one workspace, `bench/database.py`), change capture installed as `migrate
--sync-tables` does, the service started as a process of its own (`raptorflow-data
serve`). Then, in alternating rounds:

- `asyncpg cursor`: one REPEATABLE READ transaction, the same query the snapshot
  runs, fetched 1,000 rows at a time through a server-side cursor, with the
  service's date/time codecs (what the service itself reads);
- `cursor + ColumnBatch`: the same, plus encoding each batch as the stream does,
  in this process (the encoding's share);
- `Sync snapshot`: a non-following Sync stream of the same rows, received by a
  grpc.aio client (batch 1,000).

Latency: a following stream, and single-row inserts committed every 20 ms; for
each, the time from the commit returning to the row arriving. Catch-up: a
token, then N rows inserted in one transaction, then the time the resumed
stream takes to deliver them (one epoch, paged). Prints a table; drops the
database at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import grpc
from raptorflow.data.client import bearer_auth
from raptorflow.data.server.app import run_migrations
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db import codecs
from raptorflow.data.server.db.catalog import load_catalog
from raptorflow.data.server.db.columnar import ColumnEncoder
from raptorflow.data.server.db.connections import Database
from raptorflow.data.server.sync import capture, sql
from raptorflow.data.v1 import memory_sync_service_pb2, memory_sync_service_pb2_grpc

from bench import database, processes

pb = memory_sync_service_pb2
BATCH = 1000


async def install(url: str) -> None:
    settings = Settings(database_url=url, app_role="")
    db = Database(settings)
    try:
        await db.open_owner()
        await run_migrations(settings, db)
        await capture.install(db, settings, database.TABLE)
    finally:
        await db.close()


async def cursor_read(url: str, workspace: str, encode: bool) -> tuple[int, float]:
    conn = await asyncpg.connect(url)
    try:
        await codecs.register(conn)
        table = (await load_catalog(conn, "public", [database.TABLE])).table(database.TABLE)
        encoder = ColumnEncoder(table.name, table.columns)
        params = sql.Params(uuid.UUID(workspace))
        query = sql.snapshot_rows(table, params, ())
        started = time.perf_counter()
        rows = 0
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            cursor = await conn.cursor(query, *params.values)
            while records := await cursor.fetch(BATCH):
                rows += len(records)
                if encode:
                    encoder.encode(records).SerializeToString()
        return rows, time.perf_counter() - started
    finally:
        await conn.close()


async def snapshot_read(
    stub: memory_sync_service_pb2_grpc.MemorySyncServiceStub, workspace: str
) -> tuple[int, float]:
    started = time.perf_counter()
    rows = 0
    async for message in stub.Sync(
        pb.SyncRequest(workspace_id=workspace, tables=[database.TABLE], batch_size=BATCH)
    ):
        rows += message.rows.row_count
        if message.event == pb.SYNC_EVENT_SNAPSHOT_DONE:
            break
    return rows, time.perf_counter() - started


async def latency(
    stub: memory_sync_service_pb2_grpc.MemorySyncServiceStub, url: str, workspace: str, count: int
) -> list[float]:
    call = stub.Sync(
        pb.SyncRequest(
            workspace_id=workspace, tables=[database.TABLE], follow=True, batch_size=BATCH
        )
    )
    while (await call.read()).event != pb.SYNC_EVENT_SNAPSHOT_DONE:
        pass
    committed: dict[int, float] = {}
    delays: list[float] = []
    conn = await asyncpg.connect(url)

    async def write() -> None:
        for i in range(count):
            row_id = 10_000_000 + i
            await conn.execute(
                f"INSERT INTO {database.TABLE} (id, workspace_id, name) VALUES ($1, $2, 'l')",
                row_id,
                uuid.UUID(workspace),
            )
            committed[row_id] = time.perf_counter()
            await asyncio.sleep(0.02)

    writer = asyncio.create_task(write())
    try:
        while len(delays) < count:
            message = await asyncio.wait_for(call.read(), 10.0)
            assert message is not grpc.aio.EOF
            arrived = time.perf_counter()
            if message.event != pb.SYNC_EVENT_CHANGES:
                continue
            (ids,) = [c for c in message.rows.columns if c.name == "id"]
            for row_id in ids.int64_values.values:
                delays.append(arrived - committed[row_id])
    finally:
        await writer
        call.cancel()
        await conn.execute(f"DELETE FROM {database.TABLE} WHERE id >= 10000000")
        await conn.close()
    return delays


async def catch_up(
    stub: memory_sync_service_pb2_grpc.MemorySyncServiceStub, url: str, workspace: str, rows: int
) -> tuple[int, float]:
    token = ""
    async for message in stub.Sync(
        pb.SyncRequest(workspace_id=workspace, tables=[database.TABLE], batch_size=BATCH)
    ):
        token = message.resume_token
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            f"INSERT INTO {database.TABLE} (id, workspace_id, name, score, created_at) "
            "SELECT 20000000 + n, $1, 'c', n, now() FROM generate_series(1, $2) AS n",
            uuid.UUID(workspace),
            rows,
        )
        started = time.perf_counter()
        delivered = 0
        async for message in stub.Sync(
            pb.SyncRequest(
                workspace_id=workspace,
                tables=[database.TABLE],
                batch_size=BATCH,
                resume_token=token,
            )
        ):
            delivered += len(message.sequences)
        elapsed = time.perf_counter() - started
        await conn.execute(f"DELETE FROM {database.TABLE} WHERE id > 20000000")
    finally:
        await conn.close()
    return delivered, elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sync", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-rows", type=int, default=300)
    args = parser.parse_args()
    server_url = os.environ.get("DATABASE_URL")
    if not server_url:
        raise SystemExit("set DATABASE_URL to a PostgreSQL server (a database is created there)")
    bench_db = await database.create(server_url, args.rows)
    server = None
    try:
        await install(bench_db.url)
        with tempfile.TemporaryDirectory(prefix="raptorflow-bench-sync-") as logs:
            server = await processes.start_data_server(bench_db.url, Path(logs))
            async with grpc.aio.insecure_channel(
                server.address,
                options=[("grpc.max_receive_message_length", 64 << 20)],
                interceptors=bearer_auth(processes.bench_token()),
            ) as channel:
                stub = memory_sync_service_pb2_grpc.MemorySyncServiceStub(channel)
                timings: dict[str, list[float]] = {}
                for _ in range(args.rounds + 1):  # the first round warms up, and is dropped
                    for name, read in (
                        ("asyncpg cursor", cursor_read(bench_db.url, bench_db.workspace_id, False)),
                        (
                            "cursor + ColumnBatch",
                            cursor_read(bench_db.url, bench_db.workspace_id, True),
                        ),
                        ("Sync snapshot", snapshot_read(stub, bench_db.workspace_id)),
                    ):
                        rows, seconds = await read
                        assert rows == args.rows, (name, rows)
                        timings.setdefault(name, []).append(seconds)
                print(f"snapshot of {args.rows:,} rows, {args.rounds} rounds (best / median):")
                base = min(timings["asyncpg cursor"][1:])
                for name, seconds in timings.items():
                    best, median = min(seconds[1:]), statistics.median(seconds[1:])
                    rates = f"{args.rows / best:>10,.0f} / {args.rows / median:>10,.0f} rows/s"
                    print(f"  {name:22} {rates}  ({base / best:.0%} of the cursor)")
                delays = await latency(stub, bench_db.url, bench_db.workspace_id, args.latency_rows)
                print(
                    f"commit to delivery, {len(delays)} single-row commits 20 ms apart: "
                    f"median {statistics.median(delays) * 1000:.2f} ms, "
                    f"p99 {percentile(delays, 0.99) * 1000:.2f} ms, "
                    f"max {max(delays) * 1000:.2f} ms"
                )
                delivered, seconds = await catch_up(
                    stub, bench_db.url, bench_db.workspace_id, args.rows
                )
                print(
                    f"catch-up: {delivered:,} changes of one transaction in {seconds:.2f} s "
                    f"({delivered / seconds:,.0f} changes/s)"
                )
    finally:
        if server is not None:
            await server.stop()
        await database.drop(bench_db)


if __name__ == "__main__":
    asyncio.run(main())
