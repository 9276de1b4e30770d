"""Sync stream figures: snapshot rows per second next to asyncpg reading the same rows
(cursor and COPY out), commit-to-delivery latency of a following stream, and a
large catch-up epoch.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench.sync [options]

One run: a fresh database on DATABASE_URL's server with `bench_items` (N rows of
one workspace, `bench/database.py`), change capture installed as `migrate
--sync-tables` does, the service started as a process of its own (`raptorflow-data
serve`). Then one warm-up round (dropped) and `--rounds` rounds in which these
take turns, the order rotating each round:

- `asyncpg cursor`: one REPEATABLE READ transaction, the same query the snapshot
  runs, fetched 1,000 rows at a time through a server-side cursor, with the
  service's date/time codecs (what the service itself reads). The issue's
  ceiling for the snapshot target;
- `COPY out (binary)`: the same query in the same kind of transaction,
  `copy_from_query(format="binary")` into a sink that only counts the bytes:
  what PostgreSQL can hand one asyncpg connection without decoding a row;
- `cursor + ColumnBatch`: the cursor, plus encoding each batch as the stream
  does, in this process (the encoding's share);
- `Sync snapshot`: a non-following Sync stream of the same rows, received by a
  grpc.aio client (batch 1,000).

`x cursor` and `x COPY` are a case's rows per second over the cursor's and
COPY's in the same round, medianed. Latency: a following stream, and single-row
inserts committed every 20 ms; for each, the time from the commit returning to
the row arriving (0 when it arrives first). Catch-up: a token, then N rows
inserted in one transaction, then the time the resumed stream takes to deliver
them (one epoch, paged). Everything here runs on uvloop, as the service does.
Prints a table, writes bench/results/sync.json and drops the database.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import uvloop
from raptorflow.data.client import bearer_auth
from raptorflow.data.server.app import run_migrations
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db import codecs
from raptorflow.data.server.db.catalog import load_catalog
from raptorflow.data.server.db.columnar import ColumnEncoder
from raptorflow.data.server.db.connections import Database
from raptorflow.data.server.sync import capture, sql
from raptorflow.data.v1 import memory_sync_service_pb2, memory_sync_service_pb2_grpc

from bench import database, noise, processes, report

pb = memory_sync_service_pb2
BATCH = 1000


async def install(url: str, table: str = database.TABLE) -> None:
    """Migrations and change capture on `table`, as `migrate --sync-tables` does."""
    settings = Settings(database_url=url, app_role="")
    db = Database(settings)
    try:
        await db.open_owner()
        await run_migrations(settings, db)
        await capture.install(db, settings, table)
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


async def copy_out(url: str, workspace: str) -> tuple[int, float]:
    """The snapshot's query as binary COPY, into a sink that keeps nothing."""
    conn = await asyncpg.connect(url)
    try:
        table = (await load_catalog(conn, "public", [database.TABLE])).table(database.TABLE)
        params = sql.Params(uuid.UUID(workspace))
        query = sql.snapshot_rows(table, params, ())
        received = 0

        async def sink(data: bytes) -> None:
            nonlocal received
            received += len(data)

        started = time.perf_counter()
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            status = await conn.copy_from_query(query, *params.values, output=sink, format="binary")
        seconds = time.perf_counter() - started
        if not received:
            raise RuntimeError("COPY out sent no bytes")
        return int(status.split()[-1]), seconds
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
    while _message(await call.read()).event != pb.SYNC_EVENT_SNAPSHOT_DONE:
        pass
    committed: dict[int, float] = {}
    arrivals: dict[int, float] = {}
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
        while len(arrivals) < count:
            message = _message(await asyncio.wait_for(call.read(), 10.0))
            arrived = time.perf_counter()
            if message.event != pb.SYNC_EVENT_CHANGES:
                continue
            (ids,) = [c for c in message.rows.columns if c.name == "id"]
            for row_id in ids.int64_values.values:
                arrivals[row_id] = arrived
    finally:
        await writer
        call.cancel()
        await conn.execute(f"DELETE FROM {database.TABLE} WHERE id >= 10000000")
        await conn.close()
    # A row can arrive before the writer task has seen its commit return (the
    # notification leaves PostgreSQL at commit): that delay counts as 0.
    return [max(0.0, arrivals[row_id] - committed[row_id]) for row_id in committed]


def _message(read: object) -> pb.SyncResponse:
    """A message read from the stream; the stream ending here is an error."""
    if not isinstance(read, pb.SyncResponse):
        raise RuntimeError(f"the sync stream ended early: {read!r}")
    return read


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


CURSOR = "asyncpg cursor"
COPY_OUT = "COPY out (binary)"
ENCODED = "cursor + ColumnBatch"
SNAPSHOT = "Sync snapshot"
CASES = [CURSOR, COPY_OUT, ENCODED, SNAPSHOT]

# The measured ratios, by the ids bench/suite.py and bench/check.py know them by:
# (id, case, over which case's rows per second).
RATIOS = [
    ("snapshot_vs_cursor", SNAPSHOT, CURSOR),
    ("snapshot_vs_copy_out", SNAPSHOT, COPY_OUT),
    ("columnbatch_vs_cursor", ENCODED, CURSOR),
    ("copy_out_vs_cursor", COPY_OUT, CURSOR),
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sync",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--rows", type=int, default=100_000, help="rows in the snapshot (default 100000)"
    )
    parser.add_argument("--rounds", type=int, default=9, help="measured rounds (default 9)")
    parser.add_argument(
        "--latency-rows", type=int, default=300, help="single-row commits timed (default 300)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run: 5 rounds of the same snapshot, 100 latency rows",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=report.RESULTS / "sync.json",
        help="where the JSON results go (default bench/results/sync.json)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.latency_rows = 5, 100
    return args


async def snapshot_rounds(
    stub: memory_sync_service_pb2_grpc.MemorySyncServiceStub,
    bench_db: database.BenchDatabase,
    rounds: int,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds, and foreign cores (bench/noise.py), per case per measured round; the
    first (warm-up) round is dropped."""
    url, workspace = bench_db.url, bench_db.workspace_id
    reads: dict[str, Callable[[], Awaitable[tuple[int, float]]]] = {
        CURSOR: lambda: cursor_read(url, workspace, False),
        COPY_OUT: lambda: copy_out(url, workspace),
        ENCODED: lambda: cursor_read(url, workspace, True),
        SNAPSHOT: lambda: snapshot_read(stub, workspace),
    }
    timings: dict[str, list[float]] = {name: [] for name in CASES}
    foreign: dict[str, list[float]] = {name: [] for name in CASES}
    window = noise.Window(bench_db.name)
    for round_ in range(rounds + 1):
        shift = round_ % len(CASES)
        for name in CASES[shift:] + CASES[:shift]:
            window.start()
            rows, seconds = await reads[name]()
            cores = window.cores()
            if rows != bench_db.rows:
                raise RuntimeError(f"{name} read {rows} rows, not {bench_db.rows}")
            label = f"round {round_}/{rounds}" if round_ else "warm-up"
            print(
                f"  {label:12} {name:22} {rows / seconds:>10,.0f} rows/s  foreign cpu {cores:4.2f}",
                file=sys.stderr,
                flush=True,
            )
            if round_:
                timings[name].append(seconds)
                foreign[name].append(cores)
    return timings, foreign


def summarize(
    timings: dict[str, list[float]], foreign: dict[str, list[float]], rows: int
) -> list[dict[str, Any]]:
    out = []
    for name in CASES:
        rates = [rows / s for s in timings[name]]
        over_cursor = [r / (rows / c) for r, c in zip(rates, timings[CURSOR], strict=True)]
        over_copy = [r / (rows / c) for r, c in zip(rates, timings[COPY_OUT], strict=True)]
        out.append(
            {
                "case": name,
                "rows_per_second": statistics.median(rates),
                "min_rows_per_second": min(rates),
                "max_rows_per_second": max(rates),
                "ratio_to_cursor": statistics.median(over_cursor),
                "ratio_to_copy_out": statistics.median(over_copy),
                "foreign_cpu_cores": statistics.median(foreign[name]),
                "seconds": timings[name],
            }
        )
    return out


def ratios(timings: dict[str, list[float]]) -> dict[str, float]:
    """Each ratio of rows per second (the inverse ratio of seconds), per round, medianed."""
    return {
        ratio_id: statistics.median(
            base / seconds for seconds, base in zip(timings[case], timings[over], strict=True)
        )
        for ratio_id, case, over in RATIOS
    }


def table(results: list[dict[str, Any]], rows: int) -> str:
    lines = [
        f"snapshot of {rows:,} rows, medians:",
        f"  {'case':22} {'rows/s':>10} {'min-max rows/s':>21} {'x cursor':>8} {'x COPY':>7} "
        f"{'foreign':>7}",
    ]
    for r in results:
        spread = f"{r['min_rows_per_second']:,.0f}-{r['max_rows_per_second']:,.0f}"
        lines.append(
            f"  {r['case']:22} {r['rows_per_second']:10,.0f} {spread:>21} "
            f"{r['ratio_to_cursor']:8.3f} {r['ratio_to_copy_out']:7.3f} "
            f"{r['foreign_cpu_cores']:7.2f}"
        )
    lines.append(
        "  (x cursor, x COPY: rows/s over theirs in the same round, medianed; foreign: cores "
        "other jobs used meanwhile, noise when well above 0)"
    )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    server_url = os.environ.get("DATABASE_URL", "")
    if not server_url:
        print("error: set DATABASE_URL (or run `make bench`)", file=sys.stderr)
        return 2
    started = time.monotonic()
    print(f"creating the benchmark database ({args.rows} rows)", file=sys.stderr)
    bench_db = await database.create(server_url, args.rows)
    server = None
    try:
        await install(bench_db.url)
        conn = await asyncpg.connect(bench_db.url)
        try:
            postgres_version = str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()
        with tempfile.TemporaryDirectory(prefix="raptorflow-bench-sync-") as logs:
            server = await processes.start_data_server(bench_db.url, Path(logs))
            async with grpc.aio.insecure_channel(
                server.address,
                options=[("grpc.max_receive_message_length", 64 << 20)],
                interceptors=bearer_auth(processes.bench_token()),
            ) as channel:
                stub = memory_sync_service_pb2_grpc.MemorySyncServiceStub(channel)
                timings, foreign = await snapshot_rounds(stub, bench_db, args.rounds)
                results = summarize(timings, foreign, args.rows)
                print(table(results, args.rows), flush=True)
                delays = await latency(stub, bench_db.url, bench_db.workspace_id, args.latency_rows)
                delivery = {
                    "commits": len(delays),
                    "median_ms": statistics.median(delays) * 1000,
                    "p99_ms": percentile(delays, 0.99) * 1000,
                    "max_ms": max(delays) * 1000,
                }
                print(
                    f"commit to delivery, {len(delays)} single-row commits 20 ms apart: "
                    f"median {delivery['median_ms']:.2f} ms, p99 {delivery['p99_ms']:.2f} ms, "
                    f"max {delivery['max_ms']:.2f} ms",
                    flush=True,
                )
                delivered, seconds = await catch_up(
                    stub, bench_db.url, bench_db.workspace_id, args.rows
                )
                print(
                    f"catch-up: {delivered:,} changes of one transaction in {seconds:.2f} s "
                    f"({delivered / seconds:,.0f} changes/s)",
                    flush=True,
                )
        doc = {
            **report.run_info(postgres_version),
            "settings": {
                "rows": args.rows,
                "rounds": args.rounds,
                "batch_size": BATCH,
                "latency_rows": args.latency_rows,
                "quick": args.quick,
                "table": database.TABLE,
            },
            "ratios": ratios(timings),
            "foreign_cpu_cores": {
                "median": statistics.median(c for cores in foreign.values() for c in cores),
                "max": max(c for cores in foreign.values() for c in cores),
            },
            "results": results,
            "commit_to_delivery": delivery,
            "catch_up": {
                "changes": delivered,
                "seconds": seconds,
                "changes_per_second": delivered / seconds,
            },
        }
        report.write(report.rounded(doc), args.output)
        print(f"wrote {args.output} ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    finally:
        if server is not None:
            await server.stop()
        await database.drop(bench_db)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # The service runs on uvloop; the client and the asyncpg reads here do too.
    return uvloop.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
