"""What PgBouncer mode costs: the service direct, direct in PgBouncer mode, and through PgBouncer.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench.pgbouncer
    python -m bench.pgbouncer --quick          # smoke run, about 40 s

One run: a fresh database on DATABASE_URL's server (`bench_items`, 10,000 rows of
one workspace, and `bench_events` for inserts), one PgBouncer 1.18 (Debian's
`pgbouncer`; transaction pooling, `default_pool_size` equal to the service's
query pool) on loopback, and three services as processes of their own, all with
row-level security and authentication on, as deployed:

- `direct`: the normal mode, straight to PostgreSQL;
- `direct-mode`: `--pgbouncer true`, still straight to PostgreSQL: what the mode
  itself costs (no statement cache; every call in a transaction whose BEGIN
  also sets the role and statement_timeout);
- `pgbouncer`: `--pgbouncer true` through PgBouncer: the mode plus the extra hop.

Cases, each a unary call with pre-serialized request bytes at `--concurrency`
callers: `point` (Select by primary key, page_size 1), `range100` (Select of 100
rows) and `insert` (Insert of one row into `bench_events`). Per round the cases
take turns and, within a case, the three servers take turns in an order that
rotates each round. The figures that matter are the per-round ratios against
`direct`, medianed: the machine is shared and absolute numbers move by 20-30 %.

PgBouncer refuses to run as root; as root it runs as the `postgres` user
(`harness/pgbouncer.py`, which the tests use too).
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
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import uvloop
from raptorflow.data.server.db import migrations
from raptorflow.data.server.db.connections import begin_script
from raptorflow.data.v1 import value_pb2, workspace_service_pb2

from bench import database, processes
from bench.per_call import Call, Variant, per_call_table, time_variants
from bench.row_security import request_bytes as select_request_bytes
from harness.pgbouncer import PgBouncerUnavailable, running_pgbouncer, through

_SERVICE = workspace_service_pb2.DESCRIPTOR.services_by_name["WorkspaceService"]
INSERT = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['Insert'].name}"
CASES = ("point", "range100", "insert")
SERVERS = ("direct", "direct-mode", "pgbouncer")
ID_SAMPLE = 4096
QUERY_POOL = 10


def request_bytes(case: str, workspace: str, row_id: int, rows: int) -> tuple[str, bytes]:
    if case != "insert":
        return select_request_bytes(case, workspace, row_id, rows)
    request = workspace_service_pb2.InsertRequest(
        workspace_id=workspace,
        table=database.EVENTS_TABLE,
        columns=["name", "score"],
        rows=[
            value_pb2.Row(
                values=[
                    value_pb2.Value(string_value=f"event-{row_id:08d}"),
                    value_pb2.Value(double_value=row_id / 7.0),
                ]
            )
        ],
    )
    return INSERT, request.SerializeToString()


# -- PgBouncer -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def pgbouncer(server_url: str, pool_size: int) -> AsyncIterator[int]:
    """A PgBouncer in transaction pooling mode in front of `server_url`'s PostgreSQL; its port."""
    parts = urllib.parse.urlsplit(server_url)
    if not parts.hostname:
        raise SystemExit("DATABASE_URL must name a TCP host for PgBouncer to reach")
    try:
        async with running_pgbouncer(server_url, pool_size=pool_size) as bouncer:
            yield bouncer.port
    except PgBouncerUnavailable as unavailable:
        raise SystemExit(str(unavailable)) from None


# -- servers and measurements ------------------------------------------------------------------


@dataclass
class Server:
    label: str
    process: processes.ServerProcess
    channel: grpc.aio.Channel


async def start_server(
    label: str, database_url: str, flags: Sequence[str], log_dir: Path
) -> Server:
    process = await processes.start_data_server(
        database_url,
        log_dir,
        name=label,
        extra_args=["--pool-max-size", str(QUERY_POOL), *flags],
    )
    return Server(label, process, grpc.aio.insecure_channel(process.address))


@dataclass
class Measurement:
    case: str
    server: str
    round: int
    calls: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    first_error: str


async def measure(
    server: Server,
    db: database.BenchDatabase,
    case: str,
    concurrency: int,
    round_: int,
    ids: Sequence[int],
    warmup: float,
    duration: float,
) -> Measurement:
    metadata = processes.auth_metadata()
    bodies = [request_bytes(case, db.workspace_id, i, db.rows) for i in ids]
    stub = server.channel.unary_unary(bodies[0][0], None, None)
    latencies: list[float] = []
    errors = 0
    first_error = ""
    begin = time.monotonic() + warmup
    end = begin + duration

    async def caller(index: int) -> None:
        nonlocal errors, first_error
        i = index * len(bodies) // concurrency
        while (started := time.monotonic()) < end:
            try:
                await stub(bodies[i % len(bodies)][1], metadata=metadata, timeout=10)
            except grpc.aio.AioRpcError as exc:
                errors += 1
                first_error = first_error or f"{exc.code().name}: {exc.details()}"[:300]
            i += 1
            finished = time.monotonic()
            if begin <= finished < end:
                latencies.append(finished - started)

    await asyncio.gather(*(caller(n) for n in range(concurrency)))
    latencies.sort()
    count = len(latencies)
    return Measurement(
        case=case,
        server=server.label,
        round=round_,
        calls=count,
        errors=errors,
        rps=count / duration,
        p50_ms=latencies[count // 2] * 1000 if count else 0.0,
        p99_ms=latencies[min(count - 1, int(count * 0.99))] * 1000 if count else 0.0,
        first_error=first_error,
    )


def table(measurements: Sequence[Measurement], concurrency: int) -> str:
    """Per case: median rps and p99 of each server, and the median per-round ratio of each
    against `direct`."""
    lines = [
        f"{concurrency} callers; medians over rounds; ratios are per round against direct",
        f"{'case':<9} {'direct':>8} {'d-mode':>8} {'pgb':>8}  {'mode/dir':>8} {'pgb/dir':>8}"
        f"  {'p99 dir':>8} {'p99 mode':>8} {'p99 pgb':>8}",
    ]
    for case in CASES:
        ours = [m for m in measurements if m.case == case]
        if not ours:
            continue
        by = {label: {m.round: m for m in ours if m.server == label} for label in SERVERS}

        def ratio(
            label: str,
            by: dict[str, dict[int, Measurement]] = by,
        ) -> float:
            direct = by["direct"]
            values = [m.rps / direct[r].rps for r, m in by[label].items() if direct[r].rps]
            return statistics.median(values) if values else float("nan")

        def median(label: str, field: str, by: dict[str, dict[int, Measurement]] = by) -> float:
            values = [getattr(m, field) for m in by[label].values()]
            return statistics.median(values) if values else float("nan")

        lines.append(
            f"{case:<9} {median('direct', 'rps'):>8,.0f} {median('direct-mode', 'rps'):>8,.0f} "
            f"{median('pgbouncer', 'rps'):>8,.0f}  {ratio('direct-mode'):>8.3f} "
            f"{ratio('pgbouncer'):>8.3f}  {median('direct', 'p99_ms'):>8.1f} "
            f"{median('direct-mode', 'p99_ms'):>8.1f} {median('pgbouncer', 'p99_ms'):>8.1f}"
        )
    return "\n".join(lines)


# -- the statements alone ------------------------------------------------------------


async def sql_figures(
    db: database.BenchDatabase, bouncer_url: str, ids: Sequence[int], seconds: float
) -> str:
    """Point-select latency on one connection, no gRPC, as the service runs it: normal mode
    (statement cache; BEGIN and the workspace setting, the select, COMMIT) against PgBouncer
    mode (no cache, so parse and execute are two round trips; the role and statement_timeout
    set in the BEGIN script), direct and through PgBouncer."""
    workspace = uuid.UUID(db.workspace_id)
    statement = f'SELECT * FROM "public"."{database.TABLE}" WHERE "workspace_id" = $1 AND "id" = $2'
    normal_script = begin_script(workspace)
    mode_script = begin_script(
        workspace,
        prelude="SET LOCAL ROLE raptorflow_app; SET LOCAL statement_timeout = 30000",
    )
    normal = await asyncpg.connect(db.url, server_settings={"role": "raptorflow_app"})
    mode = await asyncpg.connect(db.url, statement_cache_size=0)
    pooled = await asyncpg.connect(bouncer_url, statement_cache_size=0)

    def transaction(conn: asyncpg.Connection, script: str) -> Variant:
        @contextlib.asynccontextmanager
        async def opened() -> AsyncIterator[Call]:
            async def call(i: int) -> None:
                await conn.execute(script)
                await conn.fetch(statement, workspace, i)
                await conn.execute("COMMIT")

            yield call

        return opened

    variants = {
        "normal mode, direct": transaction(normal, normal_script),
        "  + SET LOCAL role, statement_timeout": transaction(normal, mode_script),
        "  + statement cache off": transaction(mode, normal_script),
        "PgBouncer mode, direct": transaction(mode, mode_script),
        "PgBouncer mode, through PgBouncer": transaction(pooled, mode_script),
    }
    try:
        medians = await time_variants(variants, ids, seconds)
    finally:
        for conn in (normal, mode, pooled):
            await conn.close()
    return per_call_table(
        "point select alone, one connection, no gRPC (median us per call):",
        medians,
        "normal mode, direct",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pgbouncer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--duration", type=float, default=3.0, help="counted seconds (3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="uncounted seconds (0.5)")
    parser.add_argument("--concurrency", type=int, default=32, help="callers (default 32)")
    parser.add_argument("--rows", type=int, default=10_000, help="rows in bench_items (10000)")
    parser.add_argument("--sql", action="store_true", help="also time the statements alone")
    parser.add_argument("--only-sql", action="store_true", help="only time the statements")
    parser.add_argument("--quick", action="store_true", help="2 short rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 2, 1.5, 0.3
    return args


async def run(args: argparse.Namespace, server_url: str) -> int:
    log_dir = Path(tempfile.mkdtemp(prefix="raptorflow-bench-pgbouncer-logs-"))
    failed = True
    try:
        async with contextlib.AsyncExitStack() as exits:
            print(f"creating the benchmark database ({args.rows} rows)", file=sys.stderr)
            db = await database.create(server_url, args.rows)
            exits.push_async_callback(database.drop, db)
            await database.add_workload_tables(db)
            port = await exits.enter_async_context(pgbouncer(server_url, QUERY_POOL))
            ids = random.Random(7).choices(range(1, args.rows + 1), k=ID_SAMPLE)
            if args.only_sql:
                await _provision_app_role(db)
                print(await sql_figures(db, through(db.url, port), ids, args.duration / 2))
                failed = False
                return 0
            query_urls = {
                "direct": db.url,
                "direct-mode": db.url,
                "pgbouncer": through(db.url, port),
            }
            mode = ["--pgbouncer", "true", "--direct-database-url", db.url]
            flags = {"direct": [], "direct-mode": mode, "pgbouncer": mode}
            servers: dict[str, Server] = {}
            for label in SERVERS:
                server = await start_server(label, query_urls[label], flags[label], log_dir)
                exits.push_async_callback(server.process.stop)
                exits.push_async_callback(server.channel.close, None)
                servers[label] = server
            measurements: list[Measurement] = []
            for case in CASES:  # warm-up: connections, catalog, PgBouncer's server pool
                for label in SERVERS:
                    await measure(servers[label], db, case, args.concurrency, -1, ids, 0.2, 0.5)
            for round_ in range(args.rounds):
                order = SERVERS[round_ % 3 :] + SERVERS[: round_ % 3]
                for case in CASES:
                    for label in order:
                        m = await measure(
                            servers[label],
                            db,
                            case,
                            args.concurrency,
                            round_,
                            ids,
                            args.warmup,
                            args.duration,
                        )
                        errors = f"  errors={m.errors} ({m.first_error})" if m.errors else ""
                        print(
                            f"  round {round_ + 1}/{args.rounds} {case:<9} {label:<11} "
                            f"{m.rps:>8,.0f} rps  p99 {m.p99_ms:6.1f} ms{errors}",
                            file=sys.stderr,
                            flush=True,
                        )
                        measurements.append(m)
            print(table(measurements, args.concurrency))
            if args.sql:
                print()
                print(await sql_figures(db, through(db.url, port), ids, args.duration / 2))
        failed = False
    finally:
        if failed:
            print(f"logs kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    return 0


async def _provision_app_role(db: database.BenchDatabase) -> None:
    """What a server's start-up does for `--only-sql`: the app role, the table granted."""
    conn = await asyncpg.connect(db.url)
    try:
        await migrations.apply_migrations(conn, migrations.bundled_migrations())
        await migrations.provision_app_role(conn, "raptorflow_app", "public")
        await migrations.grant_tables(conn, "raptorflow_app", "public", [database.TABLE])
    finally:
        await conn.close()


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
