"""Whether the server's memory stays flat over a long run of unary calls.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench.memory
    python -m bench.memory --calls 100000 --sample-every 10000 --concurrency 32

One run: a fresh database on DATABASE_URL's server with `bench_items` (10,000
rows, `bench/database.py`) and the service started as a process of its own
(`raptorflow-data serve`, defaults on). This process then makes `--calls`
point-select calls as `bench/load.py` does (pre-serialized requests of random
existing ids, raw response bytes, `--concurrency` callers sharing one channel,
one admin token), and reads the server's resident memory (VmRSS of
/proc/PID/status) before the first call and after every `--sample-every`
completed calls, then once more after `--idle` seconds without calls.

Flat means: from the sample at `--warmup-calls` (20,000) to the last, RSS grows
by at most `--flat-mib` (4 MiB). The first calls fill caches that are meant to
stay (prepared statements, the catalog, token and plan caches, the allocator's
arenas), so growth before that point is warm-up, not a leak. Also printed: the
least-squares slope over the samples from the warm-up on, in KiB per 10,000
calls; a leak of even 100 bytes per call shows as about 1,000 KiB per 10,000.
Exit status 1 when the run is not flat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import uvloop
from raptorflow.data.v1 import query_pb2, value_pb2, workspace_service_pb2

from bench import database, processes
from bench.followers import proc_status

_SERVICE = workspace_service_pb2.DESCRIPTOR.services_by_name["WorkspaceService"]
SELECT = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['Select'].name}"


def point_select(workspace_id: str, row_id: int) -> bytes:
    """The call of `python -m bench`'s select case: one row by primary key, every column."""
    return workspace_service_pb2.SelectRequest(
        workspace_id=workspace_id,
        table=database.TABLE,
        filter=query_pb2.Filter(
            condition=query_pb2.Condition(
                column="id",
                operator=query_pb2.OPERATOR_EQ,
                value=value_pb2.Value(int64_value=row_id),
            )
        ),
        page_size=1,
    ).SerializeToString()


def slope_kib_per_10k(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of (calls, RSS KiB) points, in KiB per 10,000 calls."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    cov = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return cov / var * 10_000


async def drive(
    address: str,
    pid: int,
    bench_db: database.BenchDatabase,
    args: argparse.Namespace,
) -> tuple[list[dict[str, Any]], int, str]:
    """Makes the calls; the RSS samples, the error count and the first error."""
    rng = random.Random(6)
    requests = [
        point_select(bench_db.workspace_id, rng.randint(1, bench_db.rows)) for _ in range(10_000)
    ]
    metadata = processes.auth_metadata()
    started = time.perf_counter()
    samples = [{"calls": 0, "seconds": 0.0, **proc_status(pid)}]
    issued = done = errors = 0
    first_error = ""
    async with grpc.aio.insecure_channel(address) as channel:
        # No serializers: raw request bytes out, raw response bytes in.
        method = channel.unary_unary(SELECT, None, None)

        async def caller() -> None:
            nonlocal issued, done, errors, first_error
            while issued < args.calls:
                request = requests[issued % len(requests)]
                issued += 1
                try:
                    await method(request, metadata=metadata)
                except grpc.aio.AioRpcError as exc:
                    errors += 1
                    first_error = first_error or f"{exc.code().name}: {exc.details()}"
                done += 1
                if done % args.sample_every == 0:
                    # Synchronous and small (one /proc read): no call waits on it for long.
                    seconds = time.perf_counter() - started
                    samples.append({"calls": done, "seconds": seconds, **proc_status(pid)})

        await asyncio.gather(*(caller() for _ in range(args.concurrency)))
    await asyncio.sleep(args.idle)
    samples.append(
        {"calls": done, "seconds": time.perf_counter() - started, "idle": True, **proc_status(pid)}
    )
    return samples, errors, first_error


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server_url = os.environ.get("DATABASE_URL")
    if not server_url:
        raise SystemExit("set DATABASE_URL to a PostgreSQL server (a database is created there)")
    bench_db = await database.create(server_url, args.rows)
    server = None
    try:
        with tempfile.TemporaryDirectory(prefix="raptorflow-bench-memory-") as logs:
            server = await processes.start_data_server(bench_db.url, Path(logs))
            samples, errors, first_error = await drive(server.address, server.pid, bench_db, args)
            server.check_alive()
    finally:
        if server is not None:
            await server.stop()
        await database.drop(bench_db)
    counted = [s for s in samples if not s.get("idle")]
    after_warmup = [(s["calls"], s["VmRSS"]) for s in counted if s["calls"] >= args.warmup_calls]
    growth_kib = after_warmup[-1][1] - after_warmup[0][1] if after_warmup else 0
    return {
        "settings": vars(args).copy(),
        "samples": samples,
        "errors": errors,
        "first_error": first_error,
        "growth_after_warmup_kib": growth_kib,
        "slope_kib_per_10k_calls": slope_kib_per_10k(after_warmup),
        "flat": growth_kib <= args.flat_mib * 1024 and errors == 0,
    }


def print_result(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"{'calls':>8} {'seconds':>8} {'calls/s':>8} {'RSS MiB':>8} {'HWM MiB':>8} {'fds':>5}")
    previous = None
    for s in result["samples"]:
        rate = ""
        if previous is not None and s["seconds"] > previous["seconds"] and not s.get("idle"):
            rate = f"{(s['calls'] - previous['calls']) / (s['seconds'] - previous['seconds']):,.0f}"
        label = "idle" if s.get("idle") else f"{s['calls']:,}"
        print(
            f"{label:>8} {s['seconds']:>8.1f} {rate:>8} {s['VmRSS'] / 1024:>8.1f} "
            f"{s['VmHWM'] / 1024:>8.1f} {s['fds']:>5}"
        )
        previous = s
    verdict = "flat" if result["flat"] else "NOT flat"
    print(
        f"after {args.warmup_calls:,} calls: RSS grew {result['growth_after_warmup_kib']:,} KiB, "
        f"slope {result['slope_kib_per_10k_calls']:,.0f} KiB per 10,000 calls; {verdict} "
        f"(at most {args.flat_mib:g} MiB); {result['errors']} errors"
        + (f" ({result['first_error']})" if result["first_error"] else "")
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--sample-every", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--warmup-calls", type=int, default=20_000)
    parser.add_argument("--flat-mib", type=float, default=4.0)
    parser.add_argument("--idle", type=float, default=2.0, help="seconds before the last sample")
    parser.add_argument("--quick", action="store_true", help="20,000 calls, a sample every 2,000")
    parser.add_argument("--output", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.sample_every, args.warmup_calls = 20_000, 2_000, 4_000
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run(args))
    print_result(result, args)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if result["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
