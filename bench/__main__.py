"""The service against its ceilings, side by side, for every unary and short-call workload.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench [options]
    make bench BENCH_ARGS="--concurrency 1,32,256"

One run: create a fresh database on DATABASE_URL's server with `bench_items`
(10,000 rows of one workspace) and `bench_events`, start the service
(`python -m raptorflow.data.server serve`, its defaults on: authentication, row
security, monitoring), fill the memory records the memory workloads use,
capture one real response of each workload from the service, start one echo
server per workload answering those bytes (`python -m bench.echo`), check that
the asyncpg ceiling's statements return what the service returned, start the
load workers (`python -m bench.load`). Then, for each concurrency: one
discarded warm-up pass over every (workload, target), and `--rounds` rounds in
which, workload by workload, the service and its ceilings take turns (the order
rotating each round), each measured for `--duration` seconds after `--warmup`
seconds. Timings on a shared 2-core machine drift by 20-30 % between runs, so
the figures that matter are ratios of targets measured next to each other in
the same round. Prints a table, writes bench/results/latest.json, stops
everything and drops the database. The workloads are described in
bench/cases.py and bench/README.md.

`--profile PATH` then loads the echo server and the service once more with the
first selected workload to read their per-thread CPU, and samples the service
with py-spy, printing where its CPU time goes (see bench/profile.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db import codecs
from raptorflow.data.server.db.catalog import load_catalog
from raptorflow.data.server.db.connections import ALL_WORKSPACES_SETTING
from raptorflow.data.server.memory import queries
from raptorflow.data.v1 import memory_sync_service_pb2, workspace_service_pb2

from bench import cases, database, processes, profile, report

# Lead time for the workers to receive a command and start their callers.
START_LEAD = 0.3
# Rows per statement when filling memory records before the run.
FILL_RECORDS = 990

TARGET_COMMANDS = {
    "service": (
        "python -m raptorflow.data.server serve --listen 127.0.0.1:PORT "
        "--database-url BENCH_DB_URL --jwt-secret SECRET"
    ),
    "echo": (
        "python -m bench.echo --listen 127.0.0.1:PORT --method METHOD "
        "--response-file CAPTURED_RESPONSE.bin   (one per workload)"
    ),
    "asyncpg": "python -m bench.load   (target asyncpg; one worker process, no gRPC)",
}


def _parse_levels(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return levels


def _subset(choices: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        # In the canonical order, each once: the table and the rounds follow it.
        return [c for c in choices if c in names]

    return parse


def _rows(text: str) -> int:
    rows = int(text)
    if rows < cases.MIN_ROWS:
        raise argparse.ArgumentTypeError(f"at least {cases.MIN_ROWS} (the count's range)")
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument(
        "--duration", type=float, default=3.0, help="counted seconds per measurement (default 3)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=0.5,
        help="uncounted seconds at the start of each measurement (default 0.5)",
    )
    parser.add_argument(
        "--concurrency",
        type=_parse_levels,
        default=[32],
        help="concurrent callers, comma-separated levels (default 32)",
    )
    workloads = [w.name for w in cases.ALL]
    parser.add_argument(
        "--cases",
        type=_subset(workloads),
        default=workloads,
        help=f"comma-separated subset of the workloads {','.join(workloads)} (default all)",
    )
    parser.add_argument(
        "--targets",
        type=_subset(cases.TARGETS),
        default=list(cases.TARGETS),
        help=f"comma-separated subset of {','.join(cases.TARGETS)} (default all)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=1,
        help="load worker processes sharing the callers of the gRPC targets (default 1)",
    )
    parser.add_argument(
        "--channels", type=int, default=1, help="gRPC channels per load worker (default 1)"
    )
    parser.add_argument(
        "--rows",
        type=_rows,
        default=10_000,
        help=f"rows in bench_items (default 10000, at least {cases.MIN_ROWS})",
    )
    parser.add_argument(
        "--search-records",
        type=int,
        default=250,
        help=f"memory records (of {cases.DIMENSION} floats) memory_search searches (default 250)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run of about 2 minutes: 2 short rounds"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=report.RESULTS / "latest.json",
        help="where the JSON results go (default bench/results/latest.json)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="PATH",
        help="afterwards, profile the service under the first selected workload with py-spy "
        "into PATH (collapsed stacks)",
    )
    parser.add_argument(
        "--profile-seconds", type=float, default=10.0, help="py-spy sampling time (default 10)"
    )
    parser.add_argument(
        "--profile-concurrency",
        type=int,
        default=32,
        help="concurrent callers while profiling (default 32)",
    )
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="py-spy --native: splits C/Cython time too, but slows the service several times",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 2, 1.0, 0.5
    if args.search_records < cases.TOP_K:
        parser.error(f"--search-records must be at least {cases.TOP_K}")
    return args


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise RuntimeError(what)


def _check_response(workload: str, raw: bytes) -> str:
    """Refuses a captured response that is not the workload's normal answer; describes it."""
    ws, mem = workspace_service_pb2, memory_sync_service_pb2
    if workload in (cases.POINT_SELECT.name, cases.LIST_SELECT.name):
        select = ws.SelectResponse.FromString(raw)
        rows = 1 if workload == cases.POINT_SELECT.name else cases.PAGE_SIZE
        _check(
            len(select.rows) == rows and len(select.columns) == 5,
            f"{workload}: expected {rows} full rows, got {select}",
        )
        _check(
            workload == cases.POINT_SELECT.name or bool(select.next_page_token),
            f"{workload}: no next_page_token",
        )
        return f"{len(select.rows)} row(s)"
    if workload == cases.COUNT.name:
        count = ws.CountResponse.FromString(raw).count
        _check(count == cases.COUNT_SPAN, f"count: counted {count}, not {cases.COUNT_SPAN}")
        return f"count {count}"
    if workload == cases.INSERT.name:
        insert = ws.InsertResponse.FromString(raw)
        _check(
            insert.affected_count == 1 and len(insert.returning.rows) == 1,
            f"insert: {insert}",
        )
        return "1 row inserted, its id returned"
    if workload == cases.BATCH.name:
        batch = ws.ExecuteBatchResponse.FromString(raw)
        _check(
            [r.update.affected_count or r.insert.affected_count for r in batch.results] == [1, 1],
            f"batch: {batch}",
        )
        return "1 row updated, 1 inserted"
    if workload == cases.MEMORY_UPSERT.name:
        upsert = mem.UpsertMemoryRecordsResponse.FromString(raw)
        records = cases.UPSERT_BATCHES * cases.RECORDS_PER_BATCH
        _check(
            upsert.updated_count == records and upsert.batch_count == cases.UPSERT_BATCHES,
            f"memory_upsert: expected {records} records updated, got {upsert}",
        )
        return f"{records} records updated in {upsert.batch_count} batches"
    search = mem.SearchMemoryRecordsResponse.FromString(raw)
    _check(len(search.results) == cases.TOP_K, f"memory_search: {len(search.results)} results")
    return f"{len(search.results)} records"


def _check_ceiling(workload: str, raw: bytes, result: Any) -> None:
    """Refuses an asyncpg ceiling whose first call does not return what the service returned."""
    ws, mem = workspace_service_pb2, memory_sync_service_pb2
    if workload in (cases.POINT_SELECT.name, cases.LIST_SELECT.name):
        expected = [r.values[0].int64_value for r in ws.SelectResponse.FromString(raw).rows]
        got = [row["id"] for row in result][: len(expected)]
        _check(got == expected, f"{workload}: asyncpg read ids {got[:5]}..., not {expected[:5]}")
    elif workload == cases.COUNT.name:
        expected_count = ws.CountResponse.FromString(raw).count
        got_count = result[0][0]
        _check(got_count == expected_count, f"count: asyncpg {got_count}, service {expected_count}")
    elif workload == cases.INSERT.name:
        _check(len(result) == 1, f"insert: asyncpg returned {result}")
    elif workload == cases.BATCH.name:
        _check(result == "INSERT 0 1", f"batch: asyncpg ended with {result}")
    elif workload == cases.MEMORY_UPSERT.name:
        _check(
            len(result) == cases.RECORDS_PER_BATCH and not any(r["inserted"] for r in result),
            f"memory_upsert: asyncpg {result}",
        )
    else:
        expected_ids = [
            r.record.id for r in mem.SearchMemoryRecordsResponse.FromString(raw).results
        ]
        got_ids = [row["id"] for row in result]
        _check(got_ids == expected_ids, f"memory_search: asyncpg {got_ids}, service {expected_ids}")


class Bench:
    """Everything one run owns: the database, the servers, the workers, the measurements."""

    def __init__(self, args: argparse.Namespace, db: database.BenchDatabase, log_dir: Path):
        self.args = args
        self.db = db
        self.log_dir = log_dir
        self.spec = cases.Spec(db.workspace_id, db.rows, args.search_records)
        self.workloads = [cases.BY_NAME[name] for name in args.cases]
        self.targets: list[str] = args.targets
        self.data_server: processes.ServerProcess | None = None
        self.echo_servers: dict[str, processes.ServerProcess] = {}
        self.workers: list[processes.LoadWorker] = []
        self.admin: asyncpg.Connection | None = None
        self.search = cases.Search(queries.SEARCH_SQL, None)
        self.responses: dict[str, str] = {}
        self.server_args: list[str] = []
        # The ceiling's connections: the URL's user, as the owner pool connects (all
        # workspaces visible), with the service's statement timeout; no role switch.
        self.asyncpg_settings = {
            "application_name": "raptorflow-bench-asyncpg",
            "statement_timeout": str(int(Settings().statement_timeout * 1000)),
            ALL_WORKSPACES_SETTING: "on",
        }

    async def start(self, exits: contextlib.AsyncExitStack) -> None:
        streams = max(self.args.concurrency)
        if streams > Settings().max_streams_per_caller:
            # Every caller shares the bench token; the upsert streams count against its limit.
            self.server_args = ["--max-streams-per-caller", str(streams)]
        self.data_server = await processes.start_data_server(
            self.db.url, self.log_dir, extra_args=self.server_args
        )
        exits.push_async_callback(self.data_server.stop)
        self.admin = await asyncpg.connect(self.db.url, server_settings=self.asyncpg_settings)
        await codecs.register(self.admin)
        exits.push_async_callback(self.admin.close)
        # After the service's migrations: memory_records exists now.
        await self._fill_memory_records()
        self.search = await self._search_statement()
        catalog = await load_catalog(self.admin, "public", [database.TABLE, database.EVENTS_TABLE])
        async with grpc.aio.insecure_channel(self.data_server.address) as channel:
            for workload in self.workloads:
                raw = await self._capture(channel, workload)
                self.responses[workload.name] = _check_response(workload.name, raw)
                response_file = self.log_dir / f"{workload.name}_response.bin"
                response_file.write_bytes(raw)
                if "asyncpg" in self.targets:
                    plan = cases.plans(workload.name, self.spec, catalog, self.search)[0]
                    _check_ceiling(workload.name, raw, await self._run_plan(plan))
                if "echo" in self.targets:
                    echo = await processes.start_echo_server(
                        response_file,
                        self.log_dir,
                        method=workload.method,
                        name=f"echo-{workload.name}",
                    )
                    exits.push_async_callback(echo.stop)
                    self.echo_servers[workload.name] = echo
        for index in range(max(1, self.args.clients)):
            worker = await processes.LoadWorker.start(index, self.log_dir)
            exits.push_async_callback(worker.stop)
            self.workers.append(worker)
        await self._prepare_workers()

    async def _fill_memory_records(self) -> None:
        """Every record the upserts write (so each upsert updates), and the searched ones."""
        names = {w.name for w in self.workloads}
        batches: list[memory_sync_service_pb2.UpsertMemoryRecordsRequest] = []
        if cases.MEMORY_UPSERT.name in names:
            combined = memory_sync_service_pb2.UpsertMemoryRecordsRequest(
                workspace_id=self.spec.memory_workspace_id
            )
            for call in cases.memory_upsert_calls(self.spec):
                for batch in call:
                    if len(combined.records) + len(batch.records) > FILL_RECORDS:
                        batches.append(combined)
                        combined = memory_sync_service_pb2.UpsertMemoryRecordsRequest(
                            workspace_id=self.spec.memory_workspace_id
                        )
                    combined.records.extend(batch.records)
            batches.append(combined)
        if cases.MEMORY_SEARCH.name in names:
            batches.extend(cases.search_records(self.spec))
        assert self.admin is not None
        for batch in batches:
            await self.admin.fetch(queries.UPSERT_SQL, *cases.upsert_args(batch))
        if batches:
            await self.admin.execute("VACUUM ANALYZE raptorflow_data.memory_records")

    async def _search_statement(self) -> cases.Search:
        """The search statement the service chose at start-up (`MemoryStore.prepare`)."""
        assert self.admin is not None
        schema = await self.admin.fetchval(queries.VECTOR_COLUMN_SQL)
        if schema is not None:
            try:
                answer = await self.admin.fetchval(queries.vector_probe_sql(schema))
            except asyncpg.PostgresError:
                answer = None
            if answer == 6.0:
                return cases.Search(queries.vector_search_sql(schema), schema)
        return cases.Search(queries.SEARCH_SQL, None)

    def service_search_log(self) -> str:
        """The service's own start-up line about its search path, to confirm ours matches."""
        assert self.data_server is not None
        try:
            lines = self.data_server.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return next((line for line in lines if "memory search:" in line), "")

    async def _capture(self, channel: grpc.aio.Channel, workload: cases.Workload) -> bytes:
        """One real response of the workload, raw: its echo server answers with these bytes."""
        first = cases.serialized(workload.name, self.spec)[0]
        metadata = processes.auth_metadata()
        raw: bytes
        if workload.client_streaming:
            stream = channel.stream_unary(workload.method, None, None)
            raw = await stream(iter(first), metadata=metadata, timeout=30)
        else:
            unary = channel.unary_unary(workload.method, None, None)
            raw = await unary(first, metadata=metadata, timeout=30)
        return raw

    async def _run_plan(self, plan: cases.Plan) -> Any:
        """One asyncpg ceiling call on the admin connection (same settings as the ceiling's)."""
        assert self.admin is not None
        conn = self.admin
        result: Any = None
        async with contextlib.AsyncExitStack() as stack:
            if plan.transaction:
                await stack.enter_async_context(conn.transaction())
            for step in plan.steps:
                if step.fetch:
                    result = await conn.fetch(step.sql, *step.args)
                else:
                    result = await conn.execute(step.sql, *step.args)
        return result

    def _asyncpg_fields(self) -> dict[str, Any]:
        return {
            "dsn": self.db.url,
            # One process, like the service: the pool's size is the service's pool_max_size.
            "pool_size": Settings().pool_max_size,
            "server_settings": self.asyncpg_settings,
            "search": {"sql": self.search.sql, "pgvector_schema": self.search.pgvector_schema},
        }

    async def _prepare_workers(self) -> None:
        """Builds every worker's requests (and the asyncpg statements) before any measurement."""
        for index, worker in enumerate(self.workers):
            for workload in self.workloads:
                command: dict[str, Any] = {
                    "target": "prepare",
                    "workload": workload.name,
                    "spec": self.spec.to_json(),
                }
                if index == 0 and "asyncpg" in self.targets:
                    command.update(self._asyncpg_fields())
                await worker.send(command)
                await worker.receive(within=300)

    def _server(self, workload: cases.Workload, target: str) -> processes.ServerProcess:
        server = self.echo_servers.get(workload.name) if target == "echo" else self.data_server
        assert server is not None
        return server

    def _commands(
        self,
        workload: cases.Workload,
        target: str,
        concurrency: int,
        warmup: float,
        duration: float,
    ) -> list[tuple[processes.LoadWorker, dict[str, Any]]]:
        start_at = time.monotonic() + START_LEAD
        common = {
            "workload": workload.name,
            "spec": self.spec.to_json(),
            "start_at": start_at,
            "warmup": warmup,
            "duration": duration,
        }
        if target == "asyncpg":
            command = {"target": "asyncpg", "concurrency": concurrency, **common}
            return [(self.workers[0], {**command, **self._asyncpg_fields()})]
        address = self._server(workload, target).address
        out = []
        share, extra = divmod(concurrency, len(self.workers))
        for index, worker in enumerate(self.workers):
            callers = share + (1 if index < extra else 0)
            if callers:
                out.append(
                    (
                        worker,
                        {
                            "target": "grpc",
                            "address": address,
                            "channels": self.args.channels,
                            "concurrency": callers,
                            **common,
                        },
                    )
                )
        return out

    def _loaded_pid(self, workload: cases.Workload, target: str) -> int:
        if target == "asyncpg":
            return self.workers[0].pid
        return self._server(workload, target).pid

    async def _reset_tables(self, workload: cases.Workload) -> None:
        """Empties bench_events before an insert or batch measurement: every one starts alike."""
        if workload in (cases.INSERT, cases.BATCH):
            assert self.admin is not None
            await self.admin.execute(f"TRUNCATE {database.EVENTS_TABLE}")

    async def measure(
        self,
        workload: cases.Workload,
        target: str,
        concurrency: int,
        round_: int,
        warmup: float,
        duration: float,
    ) -> report.Measurement:
        await self._reset_tables(workload)
        commands = self._commands(workload, target, concurrency, warmup, duration)
        for worker, command in commands:
            await worker.send(command)
        begin = float(commands[0][1]["start_at"]) + warmup
        pid = self._loaded_pid(workload, target)
        await _sleep_until(begin)
        client_pids = [w.pid for w, _ in commands if w.pid != pid]
        # Everything this run started, plus its database's backends: the rest is foreign load.
        ours = {
            *(w.pid for w in self.workers),
            *(s.pid for s in (self.data_server, *self.echo_servers.values()) if s is not None),
            *processes.database_backends(self.db.name),
        }
        cpu_before, machine_before = processes.cpu_seconds(pid), _machine_ticks()
        client_before = processes.total_cpu_seconds(client_pids)
        ours_before = processes.total_cpu_seconds(ours)
        await _sleep_until(begin + duration)
        cpu_after, machine_after = processes.cpu_seconds(pid), _machine_ticks()
        client_after = processes.total_cpu_seconds(client_pids)
        ours_after = processes.total_cpu_seconds(ours)
        answers = [await worker.receive(within=duration + warmup + 60) for worker, _ in commands]
        calls = sum(a["calls"] for a in answers)
        errors = sum(a["errors"] for a in answers)
        latencies = sorted(x for a in answers for x in a["latencies_us"])
        busy = machine_after[0] - machine_before[0]
        total = machine_after[1] - machine_before[1]
        foreign = busy / _CLOCK_TICKS - (ours_after - ours_before)
        return report.Measurement(
            case=cases.case_name(workload.name, target),
            workload=workload.name,
            target=target,
            concurrency=concurrency,
            round=round_,
            calls=calls,
            errors=errors,
            duration=duration,
            rps=calls / duration,
            p50_ms=report.percentile(latencies, 0.50) / 1000,
            p99_ms=report.percentile(latencies, 0.99) / 1000,
            process_cpu_us_per_call=(cpu_after - cpu_before) / calls * 1e6 if calls else None,
            client_cpu_us_per_call=(
                (client_after - client_before) / calls * 1e6 if calls and client_pids else None
            ),
            machine_cpu_busy=busy / total if total else 0.0,
            foreign_cpu_cores=max(0.0, foreign / duration),
            first_error=next((a["first_error"] for a in answers if a["first_error"]), ""),
        )

    async def run(self) -> list[report.Measurement]:
        args = self.args
        measurements = []
        targets = self.targets
        for concurrency in args.concurrency:
            # Connections, pools, caches and the JIT-less interpreter's own warm state.
            for workload in self.workloads:
                for target in targets:
                    m = await self.measure(
                        workload, target, concurrency, -1, args.warmup, min(args.duration, 1.0)
                    )
                    _progress(m, "warm-up")
            for round_ in range(args.rounds):
                # Each workload's targets back to back, so its ratios compare neighbours.
                shift = round_ % len(targets)
                for workload in self.workloads:
                    for target in targets[shift:] + targets[:shift]:
                        m = await self.measure(
                            workload, target, concurrency, round_, args.warmup, args.duration
                        )
                        _progress(m, f"round {round_ + 1}/{args.rounds}")
                        measurements.append(m)
        return measurements

    async def _loaded_window(
        self,
        workload: cases.Workload,
        target: str,
        concurrency: int,
        seconds: float,
        during: Any = None,
    ) -> tuple[dict[str, float], dict[str, float], int, Any]:
        """Loads `target` with `workload` and reads its per-thread CPU around a `seconds` window.

        `during`, if given, is a coroutine function run at the window's start (py-spy).
        """
        await self._reset_tables(workload)
        pid = self._loaded_pid(workload, target)
        commands = self._commands(workload, target, concurrency, 1.0, seconds)
        for worker, command in commands:
            await worker.send(command)
        begin = float(commands[0][1]["start_at"]) + 1.0
        await _sleep_until(begin)
        before = processes.thread_cpu_seconds(pid)
        side = asyncio.ensure_future(during()) if during else None
        await _sleep_until(begin + seconds)
        after = processes.thread_cpu_seconds(pid)
        answers = [await worker.receive(within=seconds + 60) for worker, _ in commands]
        outcome = await side if side else None
        return before, after, sum(a["calls"] for a in answers), outcome

    async def profile(self, path: Path, seconds: float, *, native: bool) -> str:
        """Per-thread CPU of the echo server and the service, then py-spy on the service."""
        concurrency = self.args.profile_concurrency
        workload = self.workloads[0]
        parts = []
        loaded = [
            t for t in ("echo", "service") if t == "service" or workload.name in self.echo_servers
        ]
        for target in loaded:
            before, after, calls, _ = await self._loaded_window(
                workload, target, concurrency, seconds
            )
            title = (
                f"{workload.name}: {target} server at concurrency {concurrency}, "
                f"{calls / seconds:,.0f} rps"
            )
            parts.append(
                profile.summarize_threads(
                    title, self._loaded_pid(workload, target), before, after, calls
                )
            )
        assert self.data_server is not None
        pid = self.data_server.pid

        async def sample() -> str:
            return await profile.record(pid, path, seconds, native=native)

        _, _, calls, failure = await self._loaded_window(
            workload, "service", concurrency, seconds, sample
        )
        mode = "native, blocking" if native else "nonblocking"
        parts.append(f"py-spy ({mode}) on the service: {calls / seconds:,.0f} rps while sampled")
        if failure:
            parts.append(failure)
        else:
            parts.append(profile.summarize_file(path))
            parts.append(f"collapsed stacks: {path} (speedscope and flamegraph.pl read them)")
        return "\n\n".join(parts)


async def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def _progress(m: report.Measurement, label: str) -> None:
    errors = f"  errors={m.errors} ({m.first_error})" if m.errors else ""
    print(
        f"  {label:<11} {m.workload:<14} {m.target:<8} c={m.concurrency:<4} {m.rps:>9,.0f} rps  "
        f"p50 {m.p50_ms:6.2f} ms  p99 {m.p99_ms:7.2f} ms  "
        f"foreign cpu {m.foreign_cpu_cores:4.2f}{errors}",
        file=sys.stderr,
        flush=True,
    )


async def _postgres_version(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        version: str = await conn.fetchval("SHOW server_version")
        return version
    finally:
        await conn.close()


def _settings(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    return {
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "concurrency": args.concurrency,
        "workloads": {
            w.name: {
                "method": w.method,
                "service": w.summary,
                "echo": f"the captured response ({bench.responses.get(w.name, '')})",
                "asyncpg": w.asyncpg_summary,
            }
            for w in bench.workloads
        },
        "targets": bench.targets,
        "cases": {w.name: w.summary for w in bench.workloads},
        "commands": {t: TARGET_COMMANDS[t] for t in bench.targets},
        "service_extra_args": bench.server_args,
        "load_workers": len(bench.workers),
        "channels_per_worker": args.channels,
        "rows": args.rows,
        "search_records": args.search_records,
        "embedding_dimension": cases.DIMENSION,
        "memory_search_pgvector": bench.search.pgvector_schema is not None,
        "service_memory_search_log": bench.service_search_log(),
        "service_pool_max_size": Settings().pool_max_size,
        "quick": args.quick,
    }


async def main_async(args: argparse.Namespace) -> int:
    server_url = os.environ.get("DATABASE_URL", "")
    if not server_url:
        print("error: set DATABASE_URL (or run `make bench`)", file=sys.stderr)
        return 2
    log_dir = Path(tempfile.mkdtemp(prefix="raptorflow-bench-"))
    started = time.monotonic()
    failed = True
    try:
        async with contextlib.AsyncExitStack() as exits:
            print(f"creating the benchmark database ({args.rows} rows)", file=sys.stderr)
            db = await database.create(server_url, args.rows)
            exits.push_async_callback(database.drop, db)
            await database.add_workload_tables(db)
            bench = Bench(args, db, log_dir)
            await bench.start(exits)
            search = (
                f"pgvector in {bench.search.pgvector_schema}"
                if bench.search.pgvector_schema
                else "plain SQL (no pgvector)"
            )
            print(
                f"service {bench.data_server.address if bench.data_server else '-'}, "
                f"{len(bench.echo_servers)} echo server(s), "
                f"{len(bench.workers)} load worker(s) x {args.channels} channel(s); "
                f"memory search: {search}",
                file=sys.stderr,
            )
            measurements = await bench.run()
            names = [w.name for w in bench.workloads]
            summaries = report.summarize(measurements, names, bench.targets)
            doc = report.document(
                summaries, _settings(args, bench), await _postgres_version(db.url)
            )
            report.write(doc, args.output)
            print(report.table(summaries, {w.name: w.summary for w in bench.workloads}))
            print()
            print(report.ratio_table(doc["ratios"]))
            print(f"\nwrote {args.output} ({time.monotonic() - started:.0f} s)", file=sys.stderr)
            if args.profile:
                print(f"\nprofiling the service under {names[0]} load", file=sys.stderr)
                print(
                    await bench.profile(
                        args.profile, args.profile_seconds, native=args.profile_native
                    )
                )
        failed = False
    finally:
        if failed:
            print(f"logs kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
