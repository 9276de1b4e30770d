"""What the row-level security net costs: the service with `row_security` on against off.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench.row_security
    python -m bench.row_security --quick          # smoke run, about 30 s

One run: two fresh databases on DATABASE_URL's server, each with `bench_items`
(10,000 rows of one workspace, `bench/database.py`), and two services started as
processes of their own (`raptorflow-data serve`), one per database, one with
`--row-security true` (policies on the table, every call in a transaction that
sets the workspace), one with `--row-security false` (no policies, no added
transaction). Two databases, because a server with the net off removes it from
the tables it serves.

Cases, each a unary call with pre-serialized request bytes:
- `point`: Select by primary key, every column, page_size 1 (python -m bench's call);
- `range100`: Select of 100 rows (id >= a random id, page_size 100);
- `update`: Update of one row by primary key (a write: a transaction either way
  would be one statement; with the net it is BEGIN+SET, UPDATE, COMMIT).

Per concurrency level and round, the cases take turns and, within a case, the two
servers alternate (the order flips each round), so both see the same machine.
Each measurement counts the calls completed in `--duration` seconds after
`--warmup`, their latencies, and the server process's CPU per call. The figure
that matters is the per-round ratio on/off, medianed: the machine is shared and
absolute numbers move by 20-30 % between runs.

`--sql` also times the point select alone, on one connection of the app role,
no gRPC, to split the net's cost: the scoped transaction (BEGIN with SET LOCAL,
then COMMIT: two round trips more) and the policy itself (the same statement
inside one open transaction, on the table with and without policies).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import uvloop
from raptorflow.data.server.db.connections import begin_script
from raptorflow.data.v1 import query_pb2, value_pb2, workspace_service_pb2

from bench import database, processes
from bench.per_call import Call, Variant, per_call_table, time_variants

_SERVICE = workspace_service_pb2.DESCRIPTOR.services_by_name["WorkspaceService"]
SELECT = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['Select'].name}"
UPDATE = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['Update'].name}"
ID_SAMPLE = 4096
CASES = ("point", "range100", "update")


def _condition(column: str, operator: int, value: value_pb2.Value) -> query_pb2.Filter:
    return query_pb2.Filter(
        condition=query_pb2.Condition(column=column, operator=operator, value=value)  # type: ignore[arg-type]
    )


def request_bytes(case: str, workspace: str, row_id: int, rows: int) -> tuple[str, bytes]:
    """The method and the serialized request of one call of `case`."""
    if case == "point":
        request = workspace_service_pb2.SelectRequest(
            workspace_id=workspace,
            table=database.TABLE,
            filter=_condition("id", query_pb2.OPERATOR_EQ, value_pb2.Value(int64_value=row_id)),
            page_size=1,
        )
        return SELECT, request.SerializeToString()
    if case == "range100":
        start = min(row_id, rows - 100)
        request = workspace_service_pb2.SelectRequest(
            workspace_id=workspace,
            table=database.TABLE,
            filter=_condition("id", query_pb2.OPERATOR_GTE, value_pb2.Value(int64_value=start)),
            page_size=100,
        )
        return SELECT, request.SerializeToString()
    update = workspace_service_pb2.UpdateRequest(
        workspace_id=workspace,
        table=database.TABLE,
        values={"score": value_pb2.Value(double_value=row_id / 7.0)},
        filter=_condition("id", query_pb2.OPERATOR_EQ, value_pb2.Value(int64_value=row_id)),
    )
    return UPDATE, update.SerializeToString()


@dataclass
class Server:
    """One service process and the database it serves."""

    label: str
    db: database.BenchDatabase
    process: processes.ServerProcess
    channel: grpc.aio.Channel | None = None


async def start_server(
    label: str, db: database.BenchDatabase, row_security: bool, log_dir: Path
) -> Server:
    """`raptorflow-data serve` on a free port, authentication on as deployed."""
    server = await processes.start_data_server(
        db.url,
        log_dir,
        name=label,
        extra_args=["--row-security", "true" if row_security else "false"],
    )
    return Server(label, db, server, grpc.aio.insecure_channel(server.address))


@dataclass
class Measurement:
    case: str
    server: str
    concurrency: int
    round: int
    calls: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    server_cpu_us_per_call: float | None
    first_error: str


async def measure(
    server: Server,
    case: str,
    concurrency: int,
    round_: int,
    ids: Sequence[int],
    warmup: float,
    duration: float,
) -> Measurement:
    assert server.channel is not None
    metadata = processes.auth_metadata()
    calls: list[Callable[[], Awaitable[Any]]] = []
    for i in ids:
        method, body = request_bytes(case, server.db.workspace_id, i, server.db.rows)
        stub = server.channel.unary_unary(method, None, None)

        def call(stub: Any = stub, body: bytes = body) -> Awaitable[Any]:
            return stub(body, metadata=metadata, timeout=10)  # type: ignore[no-any-return]

        calls.append(call)
    latencies: list[float] = []
    errors = 0
    first_error = ""
    begin = time.monotonic() + warmup
    end = begin + duration
    cpu: list[float] = []

    async def caller(index: int) -> None:
        nonlocal errors, first_error
        i = index * len(calls) // concurrency
        while (started := time.monotonic()) < end:
            try:
                await calls[i % len(calls)]()
            except grpc.aio.AioRpcError as exc:
                errors += 1
                first_error = first_error or f"{exc.code().name}: {exc.details()}"[:300]
            i += 1
            finished = time.monotonic()
            if begin <= finished < end:
                latencies.append(finished - started)

    async def cpu_window() -> None:
        await asyncio.sleep(max(0.0, begin - time.monotonic()))
        cpu.append(processes.cpu_seconds(server.process.pid))
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        cpu.append(processes.cpu_seconds(server.process.pid))

    await asyncio.gather(cpu_window(), *(caller(n) for n in range(concurrency)))
    latencies.sort()
    count = len(latencies)
    return Measurement(
        case=case,
        server=server.label,
        concurrency=concurrency,
        round=round_,
        calls=count,
        errors=errors,
        rps=count / duration,
        p50_ms=latencies[count // 2] * 1000 if count else 0.0,
        p99_ms=latencies[min(count - 1, int(count * 0.99))] * 1000 if count else 0.0,
        server_cpu_us_per_call=(cpu[1] - cpu[0]) / count * 1e6 if count else None,
        first_error=first_error,
    )


def _median(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else float("nan")


def table(measurements: Sequence[Measurement]) -> str:
    """Per case and concurrency: medians on and off, and the median per-round ratio."""
    lines = [
        f"{'case':<9} {'c':>3}  {'rps on':>8} {'rps off':>8} {'on/off':>7}  "
        f"{'p50 on':>7} {'p50 off':>7}  {'us/call on':>10} {'off':>6}",
    ]
    keys = sorted({(m.case, m.concurrency) for m in measurements}, key=lambda k: (k[1], k[0]))
    for case, concurrency in keys:
        ours = [m for m in measurements if (m.case, m.concurrency) == (case, concurrency)]
        on = [m for m in ours if m.server == "on"]
        off = [m for m in ours if m.server == "off"]
        by_round = {m.round: m for m in off}
        ratios = [m.rps / by_round[m.round].rps for m in on if by_round.get(m.round)]
        lines.append(
            f"{case:<9} {concurrency:>3}  {_median([m.rps for m in on]):>8,.0f} "
            f"{_median([m.rps for m in off]):>8,.0f} {_median(ratios):>7.3f}  "
            f"{_median([m.p50_ms for m in on]):>7.2f} {_median([m.p50_ms for m in off]):>7.2f}  "
            f"{_median([m.server_cpu_us_per_call for m in on]):>10,.0f} "
            f"{_median([m.server_cpu_us_per_call for m in off]):>6,.0f}"
        )
    return "\n".join(lines)


# -- the statements alone ------------------------------------------------------------


async def sql_figures(on: database.BenchDatabase, ids: Sequence[int], seconds: float) -> str:
    """Point-select latency on one app-role connection, no gRPC: what the transaction
    costs, and what the policy costs, each apart.

    `plain_items` is a copy of `bench_items` without policies, in the same database.
    """
    admin = await asyncpg.connect(on.url)
    try:
        await admin.execute(
            f"CREATE TABLE plain_items AS TABLE {database.TABLE};"
            "ALTER TABLE plain_items ADD PRIMARY KEY (id);"
            "GRANT SELECT ON plain_items TO raptorflow_app;"
            "ANALYZE plain_items"
        )
    finally:
        await admin.close()
    sql = 'SELECT * FROM "public"."{}" WHERE "workspace_id" = $1 AND "id" = $2'
    protected, plain = sql.format(database.TABLE), sql.format("plain_items")
    conn = await asyncpg.connect(on.url, server_settings={"role": "raptorflow_app"})
    workspace = uuid.UUID(on.workspace_id)
    script = begin_script(workspace)

    def autocommit(statement: str) -> Variant:
        @contextlib.asynccontextmanager
        async def opened() -> AsyncIterator[Call]:
            async def call(i: int) -> None:
                await conn.fetch(statement, workspace, i)

            yield call

        return opened

    def scoped(statement: str) -> Variant:
        @contextlib.asynccontextmanager
        async def opened() -> AsyncIterator[Call]:
            async def call(i: int) -> None:
                await conn.execute(script)
                await conn.fetch(statement, workspace, i)
                await conn.execute("COMMIT")

            yield call

        return opened

    def in_one_transaction(statement: str) -> Variant:
        @contextlib.asynccontextmanager
        async def opened() -> AsyncIterator[Call]:
            await conn.execute(script)
            async with autocommit(statement)() as call:
                yield call
            await conn.execute("COMMIT")

        return opened

    variants = {
        "no policies, autocommit (off)": autocommit(plain),
        "policies, scoped transaction (on)": scoped(protected),
        "no policies, scoped transaction": scoped(plain),
        "policies, in one open transaction": in_one_transaction(protected),
        "no policies, in one open transaction": in_one_transaction(plain),
    }
    try:
        medians = await time_variants(variants, ids, seconds)
    finally:
        await conn.close()
    return per_call_table(
        "point select alone, one app-role connection, no gRPC (median us per call):",
        medians,
        "no policies, autocommit (off)",
    )


# -- the run ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.row_security",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--duration", type=float, default=3.0, help="counted seconds (3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="uncounted seconds (0.5)")
    parser.add_argument(
        "--concurrency",
        default="1,32",
        help="comma-separated concurrency levels (default 1,32)",
    )
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"subset of {','.join(CASES)} (default all)"
    )
    parser.add_argument("--rows", type=int, default=10_000, help="rows per database (10000)")
    parser.add_argument("--sql", action="store_true", help="also time the statements alone")
    parser.add_argument("--quick", action="store_true", help="2 short rounds")
    args = parser.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    args.cases = [x.strip() for x in args.cases.split(",") if x.strip()]
    if set(args.cases) - set(CASES):
        parser.error(f"cases are {', '.join(CASES)}")
    if args.quick:
        args.rounds, args.duration, args.warmup = 2, 1.0, 0.3
    return args


async def run(args: argparse.Namespace, server_url: str) -> int:
    log_dir = Path(tempfile.mkdtemp(prefix="raptorflow-bench-rls-"))
    failed = True
    try:
        async with contextlib.AsyncExitStack() as exits:
            print(f"creating two benchmark databases ({args.rows} rows each)", file=sys.stderr)
            db_on = await database.create(server_url, args.rows)
            exits.push_async_callback(database.drop, db_on)
            db_off = await database.create(server_url, args.rows)
            exits.push_async_callback(database.drop, db_off)
            servers = {}
            for label, db, flag in (("on", db_on, True), ("off", db_off, False)):
                server = await start_server(label, db, flag, log_dir)
                exits.push_async_callback(server.process.stop)
                assert server.channel is not None
                exits.push_async_callback(server.channel.close, None)
                servers[label] = server
            ids = random.Random(7).choices(range(1, args.rows + 1), k=ID_SAMPLE)
            measurements: list[Measurement] = []
            for concurrency in args.concurrency:
                for case in args.cases:  # warm-up: connections, prepared statements
                    for label in ("on", "off"):
                        await measure(servers[label], case, concurrency, -1, ids, 0.2, 0.5)
                for round_ in range(args.rounds):
                    for case in args.cases:
                        order = ("on", "off") if round_ % 2 == 0 else ("off", "on")
                        for label in order:
                            m = await measure(
                                servers[label],
                                case,
                                concurrency,
                                round_,
                                ids,
                                args.warmup,
                                args.duration,
                            )
                            errors = f"  errors={m.errors} ({m.first_error})" if m.errors else ""
                            print(
                                f"  round {round_ + 1}/{args.rounds} {case:<9} {label:<3} "
                                f"c={concurrency:<3} {m.rps:>8,.0f} rps  p50 {m.p50_ms:6.2f} ms"
                                f"{errors}",
                                file=sys.stderr,
                                flush=True,
                            )
                            measurements.append(m)
            print(table(measurements))
            if args.sql:
                print()
                print(await sql_figures(db_on, ids, max(0.5, args.duration / 2)))
        failed = False
    finally:
        if failed:
            print(f"logs kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    server_url = os.environ.get("DATABASE_URL", "")
    if not server_url:
        print("error: set DATABASE_URL", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run(args, server_url))


if __name__ == "__main__":
    sys.exit(main())
