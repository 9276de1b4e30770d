"""Point-select throughput of the service against a bare grpc.aio echo server, side by side.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench [options]
    make bench BENCH_ARGS="--concurrency 1,32,256"

One run: create a fresh database on DATABASE_URL's server with `bench_items`
(10,000 rows of one workspace), start the service (`python -m
raptorflow.data.server serve`) and the echo server (`python -m bench.echo`) as
processes of their own, start the load workers (`python -m bench.load`), then,
for each concurrency: one discarded warm-up pass over the cases, and `--rounds`
rounds in which the cases take turns (the order rotating each round), each
measured for `--duration` seconds after `--warmup` seconds. Timings on a shared
2-core machine drift by 20-30 % between runs, so the figure that matters is the
ratio of two cases measured next to each other in the same round. Prints a
table, writes bench/results/latest.json, stops everything and drops the
database.

`--profile PATH` then loads the echo server and the service once more to read
their per-thread CPU, and samples the service with py-spy, printing where its
CPU time goes (see bench/profile.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from raptorflow.data.client import bearer_auth
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db import compiler
from raptorflow.data.server.db.catalog import load_catalog
from raptorflow.data.v1 import workspace_service_pb2

from bench import cases, database, processes, profile, report
from bench.load import METHOD, point_select

# How many ids the callers cycle through; random, so PostgreSQL reads across the table.
ID_SAMPLE = 4096
# Lead time for the workers to receive a command and build their requests.
START_LEAD = 0.3


def _parse_levels(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return levels


def _parse_cases(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in cases.BY_NAME]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"cases are {', '.join(cases.BY_NAME)}")
    return names


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
    parser.add_argument(
        "--cases",
        type=_parse_cases,
        default=[c.name for c in cases.ALL],
        help=f"comma-separated subset of {','.join(cases.BY_NAME)} (default all)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=1,
        help="load worker processes sharing the callers of the gRPC cases (default 1)",
    )
    parser.add_argument(
        "--channels", type=int, default=1, help="gRPC channels per load worker (default 1)"
    )
    parser.add_argument(
        "--rows", type=int, default=10_000, help="rows in bench_items (default 10000)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run of about 20 s: 2 short rounds"
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
        help="afterwards, profile the service under point-select load with py-spy into PATH "
        "(.svg flame graph, .json speedscope, anything else collapsed stacks)",
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
    return args


class Bench:
    """Everything one run owns: the database, the servers, the workers, the measurements."""

    def __init__(self, args: argparse.Namespace, db: database.BenchDatabase, log_dir: Path):
        self.args = args
        self.db = db
        self.log_dir = log_dir
        self.data_server: processes.ServerProcess | None = None
        self.echo_server: processes.ServerProcess | None = None
        self.workers: list[processes.LoadWorker] = []
        self.ids = random.Random(7).choices(range(1, db.rows + 1), k=ID_SAMPLE)
        self.sql = ""
        self.limit = 0
        self.query_settings: dict[str, str] = {}

    async def start(self, exits: contextlib.AsyncExitStack) -> None:
        self.data_server = await processes.start_data_server(self.db.url, self.log_dir)
        exits.push_async_callback(self.data_server.stop)
        response_file = self.log_dir / "select_response.bin"
        response_file.write_bytes(await self._capture_response())
        if "echo" in self.args.cases:
            self.echo_server = await processes.start_echo_server(response_file, self.log_dir)
            exits.push_async_callback(self.echo_server.stop)
        await self._compile_sql()
        for index in range(max(1, self.args.clients)):
            worker = await processes.LoadWorker.start(index, self.log_dir)
            exits.push_async_callback(worker.stop)
            self.workers.append(worker)

    async def _capture_response(self) -> bytes:
        """One real point-select response, raw: the echo server answers with these bytes."""
        assert self.data_server is not None
        request = point_select(self.db.workspace_id, database.TABLE, self.ids[0])
        async with grpc.aio.insecure_channel(
            self.data_server.address, interceptors=bearer_auth(processes.bench_token())
        ) as channel:
            raw: bytes = await channel.unary_unary(METHOD)(request.SerializeToString(), timeout=10)
        response = workspace_service_pb2.SelectResponse.FromString(raw)
        if len(response.rows) != 1 or len(response.columns) != 5:
            raise RuntimeError(f"the point select did not return one full row: {response}")
        return raw

    async def _compile_sql(self) -> None:
        """The statement the service runs for a point select, compiled by its own compiler."""
        conn = await asyncpg.connect(self.db.url)
        try:
            catalog = await load_catalog(conn, "public", [database.TABLE])
        finally:
            await conn.close()
        request = point_select(self.db.workspace_id, database.TABLE, self.ids[0])
        plan = compiler.compile_select(
            catalog.table(database.TABLE), request, page_size=1, cursor=None
        )
        statement = plan.statement
        if len(statement.args) != 3 or statement.args[1] != self.ids[0]:
            raise RuntimeError(f"unexpected point-select arguments: {statement.args}")
        self.sql = statement.sql
        self.limit = int(statement.args[2])  # type: ignore[call-overload]
        # The service's query connections: its role and statement timeout (db/connections.py).
        settings = Settings(database_url=self.db.url)
        self.query_settings = {
            "application_name": "raptorflow-bench-asyncpg",
            "statement_timeout": str(int(settings.statement_timeout * 1000)),
        }
        if settings.query_role:
            self.query_settings["role"] = settings.query_role

    def _commands(
        self, case: cases.Case, concurrency: int, warmup: float, duration: float
    ) -> list[tuple[processes.LoadWorker, dict[str, Any]]]:
        start_at = time.monotonic() + START_LEAD
        timing = {"start_at": start_at, "warmup": warmup, "duration": duration}
        if case.target == "asyncpg":
            # One process, like the service: the pool's size is the service's pool_max_size.
            return [
                (
                    self.workers[0],
                    {
                        "target": "asyncpg",
                        "dsn": self.db.url,
                        "pool_size": Settings().pool_max_size,
                        "server_settings": self.query_settings,
                        "sql": self.sql,
                        "workspace_id": self.db.workspace_id,
                        "limit": self.limit,
                        "ids": self.ids,
                        "concurrency": concurrency,
                        **timing,
                    },
                )
            ]
        server = self.echo_server if case.name == "echo" else self.data_server
        assert server is not None
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
                            "address": server.address,
                            "channels": self.args.channels,
                            "workspace_id": self.db.workspace_id,
                            "table": database.TABLE,
                            "ids": self.ids,
                            "concurrency": callers,
                            **timing,
                        },
                    )
                )
        return out

    def _loaded_pid(self, case: cases.Case) -> int:
        if case.target == "asyncpg":
            return self.workers[0].pid
        server = self.echo_server if case.name == "echo" else self.data_server
        assert server is not None
        return server.pid

    async def measure(
        self, case: cases.Case, concurrency: int, round_: int, warmup: float, duration: float
    ) -> report.Measurement:
        commands = self._commands(case, concurrency, warmup, duration)
        for worker, command in commands:
            await worker.send(command)
        begin = float(commands[0][1]["start_at"]) + warmup
        pid = self._loaded_pid(case)
        await _sleep_until(begin)
        client_pids = [w.pid for w, _ in commands if w.pid != pid]
        # Everything this run started, plus its database's backends: the rest is foreign load.
        ours = {
            *(w.pid for w in self.workers),
            *(s.pid for s in (self.data_server, self.echo_server) if s is not None),
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
            case=case.name,
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
        selected = [cases.BY_NAME[name] for name in args.cases]
        measurements = []
        for concurrency in args.concurrency:
            # Connections, pools, caches and the JIT-less interpreter's own warm state.
            for case in selected:
                m = await self.measure(case, concurrency, -1, args.warmup, min(args.duration, 1.0))
                _progress(m, "warm-up")
            for round_ in range(args.rounds):
                shift = round_ % len(selected)
                for case in selected[shift:] + selected[:shift]:
                    m = await self.measure(case, concurrency, round_, args.warmup, args.duration)
                    _progress(m, f"round {round_ + 1}/{args.rounds}")
                    measurements.append(m)
        return measurements

    async def _loaded_window(
        self, case: cases.Case, concurrency: int, seconds: float, during: Any = None
    ) -> tuple[dict[str, float], dict[str, float], int, Any]:
        """Loads `case` and reads its server's per-thread CPU around a `seconds` window.

        `during`, if given, is a coroutine function run at the window's start (py-spy).
        """
        pid = self._loaded_pid(case)
        commands = self._commands(case, concurrency, 1.0, seconds)
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
        parts = []
        loaded = [cases.ECHO, cases.SELECT] if self.echo_server else [cases.SELECT]
        for case in loaded:
            before, after, calls, _ = await self._loaded_window(case, concurrency, seconds)
            title = f"{case.name} server at concurrency {concurrency}, {calls / seconds:,.0f} rps"
            parts.append(
                profile.summarize_threads(title, self._loaded_pid(case), before, after, calls)
            )
        assert self.data_server is not None
        pid = self.data_server.pid

        async def sample() -> str:
            return await profile.record(pid, path, seconds, native=native)

        _, _, calls, failure = await self._loaded_window(cases.SELECT, concurrency, seconds, sample)
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
        f"  {label:<11} {m.case:<8} c={m.concurrency:<4} {m.rps:>9,.0f} rps  "
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
            bench = Bench(args, db, log_dir)
            await bench.start(exits)
            print(
                f"service {bench.data_server.address if bench.data_server else '-'}, "
                f"echo {bench.echo_server.address if bench.echo_server else '-'}, "
                f"{len(bench.workers)} load worker(s) x {args.channels} channel(s)",
                file=sys.stderr,
            )
            measurements = await bench.run()
            summaries = report.summarize(measurements, args.cases)
            doc = report.document(
                summaries,
                {
                    "rounds": args.rounds,
                    "duration_s": args.duration,
                    "warmup_s": args.warmup,
                    "concurrency": args.concurrency,
                    "cases": {name: cases.BY_NAME[name].summary for name in args.cases},
                    "commands": {name: cases.BY_NAME[name].command for name in args.cases},
                    "load_workers": len(bench.workers),
                    "channels_per_worker": args.channels,
                    "rows": args.rows,
                    "service_pool_max_size": Settings().pool_max_size,
                    "quick": args.quick,
                },
                await _postgres_version(db.url),
            )
            report.write(doc, args.output)
            print(report.table(summaries))
            print(f"\nwrote {args.output} ({time.monotonic() - started:.0f} s)", file=sys.stderr)
            if args.profile:
                print("\nprofiling the service under point-select load", file=sys.stderr)
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
