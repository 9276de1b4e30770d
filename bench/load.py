"""The load generator: one worker process driving concurrent callers, steered over stdin.

    python -m bench.load    # reads one JSON command per line, answers one JSON line each

`python -m bench` starts one or more of these and sends every worker the same
command with a shared start time on the monotonic clock (system-wide on
Linux), so several processes load a server together. A command names a target:

- `grpc`: `concurrency` callers share the worker's channels to `address`, each
  making sequential unary Select calls with raw, pre-serialized request bytes
  (no serialization on the client, so the client spends as little of the
  shared CPU as it can) and reading the raw response bytes.
- `asyncpg`: `concurrency` tasks share one asyncpg pool of `pool_size`
  connections, each running the point-select SQL the service itself compiles.

Callers start at `start_at`; calls completing during the `warmup` seconds after
it are not counted. Calls completing in the `duration` seconds after that are
counted, with their latencies. The answer: `calls`, `errors`, the first error
text, and the latencies in microseconds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from array import array
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import uvloop
from raptorflow.data.v1 import query_pb2, value_pb2, workspace_service_pb2

from bench.processes import auth_metadata

_SERVICE = workspace_service_pb2.DESCRIPTOR.services_by_name["WorkspaceService"]
METHOD = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['Select'].name}"

Call = Callable[[int], Awaitable[object]]


async def _no_reset(connection: asyncpg.Connection) -> None:
    # The same pool reset as the service (db/connections.py): none.
    return None


class Worker:
    """Keeps channels and pools open across commands, as a long-lived client would."""

    def __init__(self) -> None:
        self._channels: dict[tuple[str, int], list[grpc.aio.Channel]] = {}
        self._pools: dict[tuple[str, int], asyncpg.Pool] = {}

    async def close(self) -> None:
        for channels in self._channels.values():
            for channel in channels:
                await channel.close()
        for pool in self._pools.values():
            await pool.close()

    def _grpc_calls(self, command: dict[str, Any]) -> tuple[list[Call], int]:
        key = (command["address"], int(command.get("channels", 1)))
        channels = self._channels.get(key)
        if channels is None:
            # A local subchannel pool gives each channel its own HTTP/2 connection;
            # otherwise channels with equal arguments share one.
            options = [("grpc.use_local_subchannel_pool", 1)] if key[1] > 1 else []
            channels = [grpc.aio.insecure_channel(key[0], options=options) for _ in range(key[1])]
            self._channels[key] = channels
        requests = [
            point_select(command["workspace_id"], command["table"], i).SerializeToString()
            for i in command["ids"]
        ]
        methods = [channel.unary_unary(METHOD) for channel in channels]
        # The echo server gets the same token, so both carry the same bytes.
        metadata = auth_metadata()

        def bind(method: Any) -> Call:
            def call(i: int) -> Awaitable[object]:
                return method(  # type: ignore[no-any-return]
                    requests[i % len(requests)], metadata=metadata
                )

            return call

        return [bind(m) for m in methods], len(requests)

    async def _asyncpg_calls(self, command: dict[str, Any]) -> tuple[list[Call], int]:
        key = (command["dsn"], int(command["pool_size"]))
        pool = self._pools.get(key)
        if pool is None:
            pool = await asyncpg.create_pool(
                key[0],
                min_size=key[1],
                max_size=key[1],
                reset=_no_reset,
                server_settings=command.get("server_settings") or {},
            )
            self._pools[key] = pool
        sql: str = command["sql"]
        # The argument order of the compiled statement: workspace, id, LIMIT.
        workspace = uuid.UUID(command["workspace_id"])
        args = [(workspace, i, int(command["limit"])) for i in command["ids"]]

        async def call(i: int) -> object:
            async with pool.acquire() as conn:
                return await conn.fetch(sql, *args[i % len(args)])

        return [call], len(args)

    async def run(self, command: dict[str, Any]) -> dict[str, Any]:
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
            # Callers start at different places in the shared list of random ids.
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


def point_select(workspace_id: str, table: str, row_id: int) -> workspace_service_pb2.SelectRequest:
    """The benchmark's call: one row by primary key, every column, page size 1."""
    return workspace_service_pb2.SelectRequest(
        workspace_id=workspace_id,
        table=table,
        filter=query_pb2.Filter(
            condition=query_pb2.Condition(
                column="id",
                operator=query_pb2.OPERATOR_EQ,
                value=value_pb2.Value(int64_value=row_id),
            )
        ),
        page_size=1,
    )


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
