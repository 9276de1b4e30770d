"""The load generator: one worker process driving concurrent callers, steered over stdin.

    python -m bench.load    # reads one JSON command per line, answers one JSON line each

`python -m bench` starts one or more of these and sends every worker the same
command with a shared start time on the monotonic clock (system-wide on
Linux), so several processes load a server together. A command names a
workload (`bench/cases.py`), the `spec` its requests are built from, and a
target:

- `grpc`: `concurrency` callers share the worker's channels to `address`, each
  making sequential calls of the workload's method (unary, or a client stream
  of several messages) with raw, pre-serialized request bytes (no
  serialization on the client, so the client spends as little of the shared
  CPU as it can) and reading the raw response bytes. Every call carries the
  same metadata: the bench token, whichever server it goes to.
- `asyncpg`: `concurrency` tasks share one asyncpg pool of `pool_size`
  connections, each running the statements the service runs for the
  workload's requests (compiled by the service's own compiler).
- `prepare`: builds and keeps the workload's requests (and, given `dsn`, the
  asyncpg statements) ahead of the measurements; answers their number.

Requests are built once per workload and kept for the whole run. Callers
start at `start_at`; calls completing during the `warmup` seconds after it are
not counted. Calls completing in the `duration` seconds after that are
counted, with their latencies. The answer: `calls`, `errors`, the first error
text, and the latencies in microseconds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from array import array
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import uvloop
from raptorflow.data.server.db import codecs
from raptorflow.data.server.db.catalog import load_catalog

from bench import cases, database
from bench.cases import point_select
from bench.processes import auth_metadata

__all__ = ["Worker", "main", "point_select"]  # point_select: for bench/parts.py

Call = Callable[[int], Awaitable[object]]


async def _no_reset(connection: asyncpg.Connection) -> None:
    # The same pool reset as the service (db/connections.py): none.
    return None


async def _run_steps(conn: Any, steps: tuple[cases.Step, ...]) -> object:
    result: object = None
    for step in steps:
        if step.fetch:
            result = await conn.fetch(step.sql, *step.args)
        else:
            result = await conn.execute(step.sql, *step.args)
    return result


def _spec_key(command: dict[str, Any]) -> tuple[str, str]:
    return command["workload"], json.dumps(command["spec"], sort_keys=True)


class Worker:
    """Keeps channels, pools and built requests across commands, as a long-lived client would."""

    def __init__(self) -> None:
        self._channels: dict[tuple[str, int], list[grpc.aio.Channel]] = {}
        self._pools: dict[tuple[str, int, str], asyncpg.Pool] = {}
        self._requests: dict[tuple[str, str], list[Any]] = {}
        self._plans: dict[tuple[str, str], list[cases.Plan]] = {}

    async def close(self) -> None:
        for channels in self._channels.values():
            for channel in channels:
                await channel.close(None)
        for pool in self._pools.values():
            await pool.close()

    def _serialized(self, command: dict[str, Any]) -> list[Any]:
        key = _spec_key(command)
        found = self._requests.get(key)
        if found is None:
            found = self._requests[key] = cases.serialized(
                command["workload"], cases.Spec.from_json(command["spec"])
            )
        return found

    def _grpc_calls(self, command: dict[str, Any]) -> tuple[list[Call], int]:
        key = (command["address"], int(command.get("channels", 1)))
        channels = self._channels.get(key)
        if channels is None:
            # A local subchannel pool gives each channel its own HTTP/2 connection;
            # otherwise channels with equal arguments share one.
            options = [("grpc.use_local_subchannel_pool", 1)] if key[1] > 1 else []
            channels = [grpc.aio.insecure_channel(key[0], options=options) for _ in range(key[1])]
            self._channels[key] = channels
        workload = cases.BY_NAME[command["workload"]]
        requests = self._serialized(command)
        # The echo server gets the same token, so both carry the same bytes.
        metadata = auth_metadata()
        count = len(requests)

        def bind(channel: grpc.aio.Channel) -> Call:
            if workload.client_streaming:
                stream = channel.stream_unary(workload.method, None, None)

                def call_stream(i: int) -> Awaitable[object]:
                    return stream(iter(requests[i % count]), metadata=metadata)

                return call_stream
            unary = channel.unary_unary(workload.method, None, None)

            def call(i: int) -> Awaitable[object]:
                return unary(requests[i % count], metadata=metadata)

            return call

        return [bind(c) for c in channels], count

    async def _pool(self, command: dict[str, Any]) -> asyncpg.Pool:
        settings = command.get("server_settings") or {}
        key = (command["dsn"], int(command["pool_size"]), json.dumps(settings, sort_keys=True))
        pool = self._pools.get(key)
        if pool is None:
            pool = await asyncpg.create_pool(
                key[0],
                min_size=key[1],
                max_size=key[1],
                reset=_no_reset,
                # The service's codecs (timestamps and dates as PostgreSQL's integers).
                init=codecs.register,
                server_settings=settings,
            )
            self._pools[key] = pool
        return pool

    async def _built_plans(self, command: dict[str, Any], pool: asyncpg.Pool) -> list[cases.Plan]:
        key = _spec_key(command)
        found = self._plans.get(key)
        if found is None:
            async with pool.acquire() as conn:
                catalog = await load_catalog(
                    conn, "public", [database.TABLE, database.EVENTS_TABLE]
                )
            search = cases.Search(**command["search"])
            spec = cases.Spec.from_json(command["spec"])
            found = self._plans[key] = cases.plans(command["workload"], spec, catalog, search)
        return found

    async def _asyncpg_calls(self, command: dict[str, Any]) -> tuple[list[Call], int]:
        pool = await self._pool(command)
        plans = await self._built_plans(command, pool)
        count = len(plans)

        async def call(i: int) -> object:
            plan = plans[i % count]
            async with pool.acquire() as conn:
                if plan.transaction:
                    async with conn.transaction():
                        return await _run_steps(conn, plan.steps)
                return await _run_steps(conn, plan.steps)

        return [call], count

    async def prepare(self, command: dict[str, Any]) -> dict[str, Any]:
        answer = {"requests": len(self._serialized(command))}
        if command.get("dsn"):
            answer["plans"] = len(await self._built_plans(command, await self._pool(command)))
        return answer

    async def run(self, command: dict[str, Any]) -> dict[str, Any]:
        if command["target"] == "prepare":
            return await self.prepare(command)
        if command["target"] == "grpc":
            calls, variety = self._grpc_calls(command)
        else:
            calls, variety = await self._asyncpg_calls(command)
        concurrency = int(command["concurrency"])
        begin = float(command["start_at"]) + float(command["warmup"])
        end = begin + float(command["duration"])
        latencies = array("d")
        counted = 0
        errors = 0
        first_error = ""
        now = time.monotonic
        delay = float(command["start_at"]) - now()
        if delay > 0:
            await asyncio.sleep(delay)

        async def caller(index: int) -> None:
            nonlocal counted, errors, first_error
            call = calls[index % len(calls)]
            # Callers start at different places in the shared list of requests.
            i = index * variety // concurrency
            while True:
                started = now()
                if started >= end:
                    return
                try:
                    await call(i)
                except (grpc.aio.AioRpcError, asyncpg.PostgresError, OSError) as exc:
                    errors += 1
                    first_error = first_error or f"{type(exc).__name__}: {exc}"[:500]
                    continue
                finally:
                    i += 1
                finished = now()
                if begin <= finished < end:
                    counted += 1
                    latencies.append(finished - started)

        await asyncio.gather(*(caller(n) for n in range(concurrency)))
        return {
            "calls": counted,
            "errors": errors,
            "first_error": first_error,
            "duration": float(command["duration"]),
            "latencies_us": [round(x * 1e6) for x in latencies],
        }


async def _serve() -> None:
    worker = Worker()
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            command = json.loads(line)
            if command.get("target") == "exit":
                return
            try:
                answer = await worker.run(command)
            except Exception as exc:
                answer = {"failed": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        await worker.close()


def main() -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
