"""CPU cost of each layer of a point select, measured inside one process, without gRPC.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench.parts

Complements `python -m bench`: there the service is one number; here the same
call is taken apart. Each line runs many times on uvloop and reports CPU
microseconds per call (this process's CPU time, so PostgreSQL's share is not
in it) at 1 and 32 concurrent tasks:

- the synchronous pieces of `WorkspaceServicer.Select` alone, in a tight loop
  (warm caches: in the middle of a busy event loop each costs about twice that);
- a ladder: asyncpg alone (pool acquire, fetch, release, as the `asyncpg` case
  does), then with the service's `Database.connection()` wrapper and fetch
  timeout, then plus encoding the row and building the response, then plus
  compiling the SQL per call; last, `WorkspaceServicer.Select` itself, called
  with a stand-in context: the whole handler without the gRPC server.

The difference between two rungs is the cost of one layer; the echo server's
CPU per call (from `python -m bench`) plus the last line approximates the
service's CPU per call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import uvloop
from raptorflow.data.server.app import run_migrations
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db import compiler, migrations, values
from raptorflow.data.server.db.catalog import Catalog, CatalogCache, Column, load_catalog
from raptorflow.data.server.db.connections import Database, Deadline
from raptorflow.data.server.db.page_tokens import PageTokenCodec
from raptorflow.data.server.services.workspace import WorkspaceServicer
from raptorflow.data.v1 import workspace_service_pb2

from bench import database
from bench.load import point_select


class _Context:
    """The little of grpc.aio.ServicerContext that a successful Select touches."""

    def time_remaining(self) -> float | None:
        return None


def respond(
    columns: Sequence[Column], records: Sequence[Any], visible: int
) -> workspace_service_pb2.SelectResponse:
    """The response as `WorkspaceServicer.Select` builds it: in place, rows encoded into it."""
    response = workspace_service_pb2.SelectResponse()
    response.columns.extend(c.name for c in columns[:visible])
    values.encode_rows(response.rows, columns, records, visible)
    return response


def _sync_cost(function: Callable[[], object], calls: int) -> float:
    """Median over three passes of CPU microseconds per call."""
    costs = []
    for _ in range(3):
        started = time.process_time()
        for _ in range(calls):
            function()
        costs.append((time.process_time() - started) / calls * 1e6)
    return statistics.median(costs)


async def _async_cost(
    call: Callable[[int], Awaitable[object]], concurrency: int, calls: int
) -> float:
    per_task = max(1, calls // concurrency)

    async def task(offset: int) -> None:
        for i in range(per_task):
            await call(offset + i)

    await asyncio.gather(*(task(n * per_task) for n in range(concurrency)))  # warm-up
    costs = []
    for _ in range(3):
        started = time.process_time()
        await asyncio.gather(*(task(n * per_task) for n in range(concurrency)))
        costs.append((time.process_time() - started) / (per_task * concurrency) * 1e6)
    return statistics.median(costs)


async def measure(server_url: str, calls: int) -> list[tuple[Any, ...]]:
    """(label, CPU us per call) for the sync pieces; (label, at 1 task, at 32) for the rest."""
    db = await database.create(server_url, 10_000)
    lines: list[tuple[Any, ...]] = []
    try:
        settings = Settings(database_url=db.url)
        data = Database(settings)
        await data.open_owner()
        await run_migrations(settings, data)

        async def load() -> Catalog:
            # As the service's loader does: read the table, grant it to the query role.
            async with data.owner_pool.acquire() as conn:
                if settings.query_role:
                    await migrations.grant_tables(
                        conn, settings.query_role, settings.schema, [database.TABLE]
                    )
                return await load_catalog(conn, settings.schema, [database.TABLE])

        catalog = CatalogCache(load)
        await catalog.reload()
        await data.open_queries()
        try:
            table = catalog.current.table(database.TABLE)
            ids = random.Random(7).choices(range(1, db.rows + 1), k=4096)
            requests = [point_select(db.workspace_id, database.TABLE, i) for i in ids]
            raw = requests[0].SerializeToString()
            plan = compiler.compile_select(table, requests[0], page_size=1, cursor=None)
            statement = plan.statement
            async with data.connection(Deadline(None)) as conn:
                records = await conn.fetch(statement.sql, *statement.args)
            response = respond(statement.output, records, plan.visible)
            parse = workspace_service_pb2.SelectRequest.FromString

            def compile_once() -> object:
                return compiler.compile_select(table, requests[0], page_size=1, cursor=None)

            def encode_once() -> object:
                return respond(statement.output, records, plan.visible)

            def serialize_once() -> object:
                return response.SerializeToString()

            lines += [
                ("SelectRequest.FromString", _sync_cost(lambda: parse(raw), calls)),
                ("compiler.compile_select", _sync_cost(compile_once, calls)),
                ("SelectResponse + encode_rows (1 row, 5 cols)", _sync_cost(encode_once, calls)),
                ("SelectResponse.SerializeToString()", _sync_cost(serialize_once, calls)),
            ]
            pool = data.query_pool
            sql, workspace, limit = statement.sql, statement.args[0], statement.args[2]

            async def raw_fetch(i: int) -> object:
                async with pool.acquire() as conn:
                    return await conn.fetch(sql, workspace, ids[i % len(ids)], limit)

            async def wrapped_fetch(i: int) -> object:
                deadline = Deadline(None)
                async with data.connection(deadline) as conn:
                    return await conn.fetch(
                        sql, workspace, ids[i % len(ids)], limit, timeout=deadline.timeout(30.0)
                    )

            async def fetch_and_encode(i: int) -> object:
                rows = await wrapped_fetch(i)
                return respond(statement.output, rows, plan.visible)

            async def compile_fetch_and_encode(i: int) -> object:
                compiled = compiler.compile_select(
                    table, requests[i % len(requests)], page_size=1, cursor=None
                ).statement
                deadline = Deadline(None)
                async with data.connection(deadline) as conn:
                    rows = await conn.fetch(
                        compiled.sql, *compiled.args, timeout=deadline.timeout(30.0)
                    )
                return respond(compiled.output, rows, plan.visible)

            servicer = WorkspaceServicer(settings, data, catalog, PageTokenCodec(b"k" * 32))
            context: Any = _Context()

            async def handler(i: int) -> object:
                return await servicer.Select(requests[i % len(requests)], context)

            for label, call in (
                ("asyncpg: pool.acquire + fetch + release", raw_fetch),
                ("+ Database.connection(), fetch(timeout=)", wrapped_fetch),
                ("+ encode_rows, SelectResponse", fetch_and_encode),
                ("+ compile_select per call", compile_fetch_and_encode),
                ("WorkspaceServicer.Select, no gRPC", handler),
            ):
                costs = [await _async_cost(call, c, calls) for c in (1, 32)]
                lines.append((label, *costs))
        finally:
            await data.close()
    finally:
        await database.drop(db)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.parts", description=__doc__)
    parser.add_argument(
        "--calls", type=int, default=10_000, help="calls per pass (three passes per line)"
    )
    args = parser.parse_args()
    server_url = os.environ.get("DATABASE_URL", "")
    if not server_url:
        print("error: set DATABASE_URL", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        lines = runner.run(measure(server_url, args.calls))
    print(f"{'CPU us per call':<46} {'1 task':>8} {'32 tasks':>9}")
    for label, *costs in lines:
        print(f"  {label:<44}" + "".join(f" {c:>8.1f}" for c in costs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
