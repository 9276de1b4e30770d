"""The client library's own cost per call: what agents pay in their process, before the network.

    python -m bench.client [--calls 5000] [--concurrency 1] [--rows 1,100]

The benchmark's echo server (`python -m bench.echo`, a process of its own)
answers Select with a fixed response (1 or 100 rows of five columns, as the
service encodes them), so this process's CPU time is the client's alone. Each
line makes the same calls a different way and reports this process's CPU
microseconds per call and the wall time per call (at concurrency 1, the
latency):

- raw: pre-serialized request bytes, raw response bytes (the load generator's way);
- stub: the generated stub, a request message, the token in call metadata;
- stub + bearer_auth: the generated stub on a channel with `bearer_auth()` interceptors;
- DataClient: the query builder, `.execute()`, rows decoded to dicts.

The difference between "stub" and "DataClient" is the client library's budget:
building the request, merging defaults, and decoding the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import uvloop
from raptorflow.data.client import ClientConfig, DataClient, bearer_auth
from raptorflow.data.client._values import to_value
from raptorflow.data.v1 import workspace_service_pb2, workspace_service_pb2_grpc

from bench import processes

WORKSPACE = "6f1c1f4e-8a43-4c4e-9d2b-0f7c1b1f0a11"
SERVICE = "raptorflow.data.v1.WorkspaceService"
TOKEN = "x" * 300  # about the size of a real JWT; the echo server does not check it


def response_bytes(rows: int) -> bytes:
    """A SelectResponse of `rows` rows of (id, workspace_id, name, score, created_at)."""
    response = workspace_service_pb2.SelectResponse(
        columns=["id", "workspace_id", "name", "score", "created_at"]
    )
    for i in range(rows):
        row = response.rows.add()
        for value in (i, WORKSPACE, f"name {i}", i * 0.5, i):
            row.values.append(to_value(value))
    return response.SerializeToString()


async def _measure(
    label: str, call: Callable[[], Awaitable[object]], calls: int, concurrency: int
) -> dict[str, Any]:
    for _ in range(200):  # warm-up
        await call()
    latencies: list[float] = []

    async def caller(count: int) -> None:
        for _ in range(count):
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller(calls // concurrency) for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    done = len(latencies)
    latencies.sort()
    return {
        "case": label,
        "cpu_us_per_call": round(cpu / done * 1e6, 1),
        "wall_us_per_call": round(wall / done * 1e6, 1),
        "p50_us": round(statistics.median(latencies) * 1e6, 1),
        "p99_us": round(latencies[int(done * 0.99)] * 1e6, 1),
    }


async def _run(target: str, rows: int, calls: int, concurrency: int) -> list[dict[str, Any]]:
    method = f"/{SERVICE}/Select"
    request = workspace_service_pb2.SelectRequest(workspace_id=WORKSPACE, table="items")
    raw_request = request.SerializeToString()
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    results = []
    async with grpc.aio.insecure_channel(target) as channel:
        raw = channel.unary_unary(method)
        results.append(
            await _measure(
                "raw bytes", lambda: raw(raw_request, metadata=metadata), calls, concurrency
            )
        )
        stub = workspace_service_pb2_grpc.WorkspaceServiceStub(channel)
        results.append(
            await _measure(
                "generated stub",
                lambda: stub.Select(request, metadata=metadata),
                calls,
                concurrency,
            )
        )
    async with grpc.aio.insecure_channel(target, interceptors=bearer_auth(TOKEN)) as channel:
        intercepted = workspace_service_pb2_grpc.WorkspaceServiceStub(channel)
        results.append(
            await _measure(
                "generated stub + bearer_auth()",
                lambda: intercepted.Select(request),
                calls,
                concurrency,
            )
        )
    async with DataClient(ClientConfig(target, token=TOKEN)) as client:
        table = client.workspace(WORKSPACE).table("items")
        results.append(
            await _measure(
                "DataClient select().eq().execute()",
                lambda: table.select().eq("id", 1).limit(rows).execute(),
                calls,
                concurrency,
            )
        )
    return results


async def _run_against_echo(rows: int, calls: int, concurrency: int) -> list[dict[str, Any]]:
    """`_run` against `python -m bench.echo` (in a process of its own) answering `rows` rows."""
    with tempfile.TemporaryDirectory(prefix="raptorflow-bench-client-") as scratch:
        response = Path(scratch) / "response.bin"
        response.write_bytes(response_bytes(rows))
        server = await processes.start_echo_server(response, Path(scratch))
        try:
            return await _run(server.address, rows, calls, concurrency)
        finally:
            await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rows", default="1,100", help="response sizes, comma-separated")
    args = parser.parse_args()
    for rows in (int(r) for r in args.rows.split(",")):
        results = uvloop.run(_run_against_echo(rows, args.calls, args.concurrency))
        print(f"\n{rows} row(s) per response, concurrency {args.concurrency}, {args.calls} calls")
        header = ("client path", "cpu us/call", "wall us/call", "p50 us", "p99 us")
        print(f"{header[0]:36s} {header[1]:>12s} {header[2]:>13s} {header[3]:>8s} {header[4]:>8s}")
        base = results[1]["cpu_us_per_call"]
        for i, r in enumerate(results):
            extra = f"   (+{r['cpu_us_per_call'] - base:.0f} us over the stub)" if i >= 2 else ""
            print(
                f"{r['case']:36s} {r['cpu_us_per_call']:12.1f} {r['wall_us_per_call']:13.1f}"
                f" {r['p50_us']:8.1f} {r['p99_us']:8.1f}{extra}"
            )


if __name__ == "__main__":
    main()
