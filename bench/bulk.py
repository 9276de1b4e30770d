"""Bulk insert: 10,000 rows per Insert call through the service next to asyncpg's
`copy_records_to_table` of the same rows into the same table, capture triggers on both.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench.bulk [options]

One run: a fresh database on DATABASE_URL's server with an empty `bench_items`
(`bench/database.py`), change capture installed on it as `migrate --sync-tables`
does (a row trigger writing every inserted row to the change log, which every
case pays), the service started as a process of its own (`raptorflow-data
serve`, authentication and row-level security on). Then one warm-up round
(dropped) and `--rounds` rounds in which the cases take turns, the order
rotating each round. Each measurement starts from an emptied table and change
log and a checkpoint (not timed), then makes `--calls` sequential calls of
`--rows-per-call` rows each (new ids, the same rows for every case):

- `Insert (client library)`: `DataClient...table().insert(rows, returning=())
  .execute()` from Python dicts; the client's conversion is timed, as
  `copy_records_to_table` times its own encoding. The issue's target.
- `Insert (raw stub)`: the same InsertRequest, serialized beforehand, on the
  bare channel: the service alone, without the client library's share.
- `copy_records_to_table`: asyncpg's binary COPY of the same rows as tuples, on
  one connection as the database owner. The ceiling.
- `asyncpg unnest INSERT`: the statement the service compiles (one array per
  column through unnest), run directly with arrays built from the tuples.
- `asyncpg executemany`: a one-row INSERT, executemany'd over the tuples.

Rows per second are the rows of a measurement over its seconds; `x copy` is the
case's rows per second over `copy_records_to_table`'s in the same round,
medianed. CPU columns: this process (the client), the service process and the
database's backends, in microseconds per row; `foreign`: cores other jobs on
the machine used meanwhile (bench/noise.py), noise when well above 0.
Everything here runs on uvloop, as the service does. Prints a table, writes
bench/results/bulk.json and drops the database.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import uvloop
from raptorflow.data.client import ClientConfig, DataClient
from raptorflow.data.server.db import compiler
from raptorflow.data.server.db.catalog import load_catalog
from raptorflow.data.v1 import workspace_service_pb2

from bench import database, noise, processes, report
from bench.sync import install

TABLE = database.TABLE
COLUMNS = ("id", "name", "score", "created_at")
_SERVICE = workspace_service_pb2.DESCRIPTOR.services_by_name["WorkspaceService"]
INSERT_METHOD = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['Insert'].name}"

CLIENT = "Insert (client library)"
RAW = "Insert (raw stub)"
COPY = "copy_records_to_table"
UNNEST = "asyncpg unnest INSERT"
EXECUTEMANY = "asyncpg executemany"
CASES = [CLIENT, RAW, COPY, UNNEST, EXECUTEMANY]

# The measured ratios, by the ids bench/suite.py and bench/check.py know them by.
RATIO_IDS = {
    CLIENT: "bulk_insert_vs_copy",
    RAW: "bulk_insert_raw_vs_copy",
    UNNEST: "bulk_unnest_vs_copy",
    EXECUTEMANY: "bulk_executemany_vs_copy",
}

EPOCH = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bulk",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--rows-per-call", type=int, default=10_000, help="rows per call (default 10000)"
    )
    parser.add_argument(
        "--calls", type=int, default=5, help="sequential calls per measurement (default 5)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated subset of: {', '.join(CASES)} (default all; {COPY} always runs)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short run: 3 rounds of 2 calls (same call size)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=report.RESULTS / "bulk.json",
        help="where the JSON results go (default bench/results/bulk.json)",
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; the cases are {CASES}")
    args.cases = [name for name in CASES if name in chosen or name == COPY]
    if args.quick:
        args.rounds, args.calls = 3, 2
    return args


@dataclass
class Batch:
    """The rows of one call, in every shape a case starts from."""

    records: list[tuple[Any, ...]]
    """(workspace_id, id, name, score, created_at) tuples, as copy_records_to_table takes."""
    dicts: list[dict[str, Any]]
    """The same rows as the client library takes them (workspace_id filled in by the server)."""
    request: bytes
    """The serialized InsertRequest of the same rows, for the raw stub."""


def make_batches(workspace: str, calls: int, rows: int) -> list[Batch]:
    """Rows that look like bench_items' own (bench/database.py); ids new in every call."""
    workspace_id = uuid.UUID(workspace)
    batches = []
    for call in range(calls):
        records = []
        dicts = []
        for n in range(call * rows + 1, (call + 1) * rows + 1):
            name = f"item-{n:08d}"
            score = n / 10000.0
            created = EPOCH + dt.timedelta(minutes=n)
            records.append((workspace_id, n, name, score, created))
            dicts.append({"id": n, "name": name, "score": score, "created_at": created})
        batches.append(Batch(records, dicts, b""))
    return batches


@dataclass
class Sample:
    """One case's measurement in one round."""

    case: str
    round: int
    rows: int
    seconds: float
    call_seconds: list[float]
    client_cpu: float
    service_cpu: float
    database_cpu: float
    foreign_cores: float
    """CPU cores other jobs on the machine used meanwhile (bench/noise.py): noise."""

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds


class Run:
    """The database, the service, the connections and the rows of one run."""

    def __init__(
        self,
        db: database.BenchDatabase,
        server: processes.ServerProcess,
        client: DataClient,
        owner: asyncpg.Connection,
        batches: list[Batch],
        insert_sql: str,
    ) -> None:
        self.db = db
        self.server = server
        self.client = client
        self.owner = owner
        self.batches = batches
        self.insert_sql = insert_sql
        # No serializers: the request goes as the bytes serialized beforehand.
        self.raw_insert = client.channel.unary_unary(INSERT_METHOD, None, None)
        self.table = client.workspace(db.workspace_id).table(TABLE)
        self.can_checkpoint = True

    # -- the cases, one call each ---------------------------------------------------

    async def client_insert(self, batch: Batch) -> None:
        result = await self.table.insert(batch.dicts, returning=()).execute(timeout=600)
        _check_count(result.count, len(batch.dicts))

    async def raw_stub_insert(self, batch: Batch) -> None:
        raw: bytes = await self.raw_insert(
            batch.request, timeout=600, metadata=processes.auth_metadata()
        )
        response = workspace_service_pb2.InsertResponse.FromString(raw)
        _check_count(response.affected_count, len(batch.records))

    async def copy(self, batch: Batch) -> None:
        status = await self.owner.copy_records_to_table(
            TABLE, records=batch.records, columns=["workspace_id", *COLUMNS]
        )
        _check_count(int(status.split()[-1]), len(batch.records))

    async def unnest(self, batch: Batch) -> None:
        workspace, *columns = zip(*batch.records, strict=True)
        status = await self.owner.execute(self.insert_sql, workspace[0], *map(list, columns))
        _check_count(int(status.split()[-1]), len(batch.records))

    async def executemany(self, batch: Batch) -> None:
        await self.owner.executemany(
            f"INSERT INTO {TABLE} (workspace_id, {', '.join(COLUMNS)}) VALUES ($1, $2, $3, $4, $5)",
            batch.records,
        )

    def action(self, case: str) -> Callable[[Batch], Awaitable[None]]:
        actions: dict[str, Callable[[Batch], Awaitable[None]]] = {
            CLIENT: self.client_insert,
            RAW: self.raw_stub_insert,
            COPY: self.copy,
            UNNEST: self.unnest,
            EXECUTEMANY: self.executemany,
        }
        return actions[case]

    # -- one measurement -------------------------------------------------------------

    async def reset(self) -> None:
        """An empty table and change log, written out, so every measurement starts alike.

        As superuser with session_replication_role = replica, the capture's truncate
        trigger does not fire (it would log every row as deleted).
        """
        await self.owner.execute(
            "SET session_replication_role = replica; "
            f"TRUNCATE {TABLE}, raptorflow_data.change_log; "
            "RESET session_replication_role"
        )
        if self.can_checkpoint:
            try:
                await self.owner.execute("CHECKPOINT")
            except asyncpg.InsufficientPrivilegeError:
                self.can_checkpoint = False

    async def measure(self, case: str, round_: int) -> Sample:
        await self.reset()
        action = self.action(case)
        backends = processes.database_backends(self.db.name)
        window = noise.Window(self.db.name)
        window.start()
        client_before = time.process_time()
        service_before = processes.cpu_seconds(self.server.pid)
        database_before = processes.total_cpu_seconds(backends)
        calls = []
        for batch in self.batches:
            started = time.perf_counter()
            await action(batch)
            calls.append(time.perf_counter() - started)
        client_cpu = time.process_time() - client_before
        service_cpu = processes.cpu_seconds(self.server.pid) - service_before
        database_cpu = processes.total_cpu_seconds(backends) - database_before
        foreign = window.cores()
        rows = sum(len(b.records) for b in self.batches)
        count = await self.owner.fetchval(f"SELECT count(*) FROM {TABLE}")
        if count != rows:
            raise RuntimeError(f"{case}: {count} rows in the table after inserting {rows}")
        return Sample(
            case, round_, rows, sum(calls), calls, client_cpu, service_cpu, database_cpu, foreign
        )


def _check_count(got: int, expected: int) -> None:
    if got != expected:
        raise RuntimeError(f"{got} rows inserted, not {expected}")


async def compiled_insert_sql(url: str, workspace: str, batch: Batch) -> str:
    """The statement the service runs for an Insert of `batch`, from its own compiler."""
    conn = await asyncpg.connect(url)
    try:
        catalog = await load_catalog(conn, "public", [TABLE])
    finally:
        await conn.close()
    request = workspace_service_pb2.InsertRequest.FromString(batch.request)
    (statement,) = compiler.compile_insert(catalog.table(TABLE), request)
    if len(statement.args) != 1 + len(COLUMNS) or str(statement.args[0]) != workspace:
        raise RuntimeError(f"unexpected Insert arguments: {[type(a) for a in statement.args]}")
    return statement.sql


async def run_rounds(run: Run, cases: list[str], rounds: int) -> list[Sample]:
    samples = []
    for round_ in range(rounds + 1):  # the first round warms up, and is dropped
        shift = round_ % len(cases)
        for case in cases[shift:] + cases[:shift]:
            sample = await run.measure(case, round_)
            label = f"round {round_}/{rounds}" if round_ else "warm-up"
            print(
                f"  {label:12} {case:24} {sample.rows_per_second:10,.0f} rows/s  "
                f"({statistics.median(sample.call_seconds) * 1000:7.1f} ms per call)  "
                f"foreign cpu {sample.foreign_cores:4.2f}",
                file=sys.stderr,
                flush=True,
            )
            if round_:
                samples.append(sample)
    return samples


def summarize(samples: list[Sample], cases: list[str]) -> list[dict[str, Any]]:
    copy_rate = {s.round: s.rows_per_second for s in samples if s.case == COPY}
    out = []
    for case in cases:
        group = [s for s in samples if s.case == case]
        rates = [s.rows_per_second for s in group]
        ratios = [s.rows_per_second / copy_rate[s.round] for s in group]
        rows = sum(s.rows for s in group)
        out.append(
            {
                "case": case,
                "rows_per_second": statistics.median(rates),
                "min_rows_per_second": min(rates),
                "max_rows_per_second": max(rates),
                "ms_per_call": statistics.median(c for s in group for c in s.call_seconds) * 1000,
                "ratio_to_copy": statistics.median(ratios),
                "client_cpu_us_per_row": sum(s.client_cpu for s in group) / rows * 1e6,
                "service_cpu_us_per_row": sum(s.service_cpu for s in group) / rows * 1e6,
                "database_cpu_us_per_row": sum(s.database_cpu for s in group) / rows * 1e6,
                "foreign_cpu_cores": statistics.median(s.foreign_cores for s in group),
                "rounds": [
                    {
                        "rows_per_second": s.rows_per_second,
                        "ratio_to_copy": s.rows_per_second / copy_rate[s.round],
                        "call_seconds": s.call_seconds,
                        "foreign_cpu_cores": s.foreign_cores,
                    }
                    for s in group
                ],
            }
        )
    return out


def noise_summary(foreign: list[float]) -> dict[str, float]:
    return {"median": statistics.median(foreign), "max": max(foreign)}


def table(results: list[dict[str, Any]], rows_per_call: int) -> str:
    header = (
        f"  {'case':24} {'rows/s':>10} {'min-max rows/s':>19} {'ms/call':>8} {'x copy':>7} "
        f"{'cli us/row':>10} {'srv us/row':>10} {'db us/row':>9} {'foreign':>7}"
    )
    lines = [f"bulk insert, {rows_per_call:,} rows per call, medians:", header]
    for r in results:
        spread = f"{r['min_rows_per_second']:,.0f}-{r['max_rows_per_second']:,.0f}"
        service = r["service_cpu_us_per_row"] if r["case"] in (CLIENT, RAW) else None
        lines.append(
            f"  {r['case']:24} {r['rows_per_second']:10,.0f} {spread:>19} "
            f"{r['ms_per_call']:8.1f} {r['ratio_to_copy']:7.3f} "
            f"{r['client_cpu_us_per_row']:10.1f} "
            f"{f'{service:.1f}' if service is not None else '-':>10} "
            f"{r['database_cpu_us_per_row']:9.1f} {r['foreign_cpu_cores']:7.2f}"
        )
    lines.append(
        "  (x copy: rows/s over copy_records_to_table's in the same round, medianed; "
        "cpu: this process, the service, the database's backends; foreign: cores other jobs "
        "used meanwhile, noise when well above 0)"
    )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    server_url = os.environ.get("DATABASE_URL", "")
    if not server_url:
        print("error: set DATABASE_URL (or run `make bench`)", file=sys.stderr)
        return 2
    started = time.monotonic()
    print(f"creating the benchmark database, capture on {TABLE}", file=sys.stderr)
    bench_db = await database.create(server_url, 0)
    try:
        await install(bench_db.url)
        batches = make_batches(bench_db.workspace_id, args.calls, args.rows_per_call)
        async with contextlib.AsyncExitStack() as exits:
            logs = Path(exits.enter_context(tempfile.TemporaryDirectory(prefix="rf-bench-bulk-")))
            server = await processes.start_data_server(bench_db.url, logs)
            exits.push_async_callback(server.stop)
            client = await DataClient.connect(
                ClientConfig(server.address, token=processes.bench_token(), timeout=600)
            )
            exits.push_async_callback(client.close)
            workspace = client.workspace(bench_db.workspace_id).table(TABLE)
            for batch in batches:
                request = workspace.insert(batch.dicts, returning=()).to_request()
                batch.request = request.SerializeToString()
            insert_sql = await compiled_insert_sql(bench_db.url, bench_db.workspace_id, batches[0])
            owner = await asyncpg.connect(bench_db.url)
            exits.push_async_callback(owner.close)
            postgres_version = str(await owner.fetchval("SHOW server_version"))
            run = Run(bench_db, server, client, owner, batches, insert_sql)
            samples = await run_rounds(run, args.cases, args.rounds)
        results = summarize(samples, args.cases)
        print(table(results, args.rows_per_call))
        doc = {
            **report.run_info(postgres_version),
            "settings": {
                "rows_per_call": args.rows_per_call,
                "calls_per_measurement": args.calls,
                "rounds": args.rounds,
                "quick": args.quick,
                "table": TABLE,
                "capture": "raptorflow_data_capture row trigger on",
                "checkpoint_before_each": run.can_checkpoint,
                "cases": args.cases,
            },
            "ratios": {
                RATIO_IDS[r["case"]]: r["ratio_to_copy"] for r in results if r["case"] in RATIO_IDS
            },
            "foreign_cpu_cores": noise_summary([s.foreign_cores for s in samples]),
            "results": results,
        }
        report.write(report.rounded(doc), args.output)
        print(f"wrote {args.output} ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    finally:
        await database.drop(bench_db)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # The service runs on uvloop; its client and the asyncpg cases here do too.
    return uvloop.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
