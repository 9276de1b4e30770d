"""Backup and restore of 100,000 rows: the service's ExportBackup/RestoreBackup next to
pg_dump, pg_restore and psql on the same table, measured in one run.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench.backup [--rows N]

One run: a fresh database on DATABASE_URL's server with `bench_backup_rows` (id
uuid primary key, workspace_id uuid indexed, body text of about 100 characters,
attrs jsonb, created_at timestamptz, counter integer), N rows of one workspace;
the service started as a process of its own (`raptorflow-data serve`). Then
one warm-up round (dropped) and `--rounds` rounds, the cases of each kind
taking turns (the order rotating each round):

- dump: `ExportBackup` of the workspace, consumed by a grpc.aio client in this
  process (the bytes stay in memory); `pg_dump --data-only --table
  --format=custom` (compressed, its default) and `--format=plain` to a file;
- load, each into the emptied table (TRUNCATE, not timed): `RestoreBackup` of
  that export, streamed from memory; `pg_restore --data-only` of the custom
  dump; `psql -f` of the plain dump.

Every load is checked (row count) after it is timed. Prints medians, rows per
second and each case's time over the service's in the same round (medianed:
the service's rows per second over the case's), writes
bench/results/backup.json and drops the database. The client runs on uvloop,
as the service does.

pg_dump, pg_restore and psql come from $PG_BIN when set; otherwise from the
first of /usr/lib/postgresql/MAJOR/bin, the embedded PostgreSQL's own binaries
(`pgserver`, which `make bench` uses when DATABASE_URL is unset) and /usr/bin
whose pg_dump is at least the server's major version (pg_dump refuses a newer
server).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import uvloop
from raptorflow.data.client import bearer_auth
from raptorflow.data.v1 import job_pb2, maintenance_service_pb2, maintenance_service_pb2_grpc

from bench import database, noise, processes, report

pb = maintenance_service_pb2
TABLE = "bench_backup_rows"

SCHEMA_SQL = f"""
CREATE TABLE {TABLE} (
    id uuid PRIMARY KEY,
    workspace_id uuid NOT NULL,
    body text,
    attrs jsonb,
    created_at timestamptz,
    counter integer
);
CREATE INDEX ON {TABLE} (workspace_id);
"""

FILL_SQL = f"""
INSERT INTO {TABLE} (id, workspace_id, body, attrs, created_at, counter)
SELECT gen_random_uuid(), $1,
       repeat(md5(n::text), 3) || ' row ' || n,
       jsonb_build_object('n', n, 'tag', 'tag-' || (n % 100), 'score', n * 0.5,
                          'flags', jsonb_build_array(n % 2 = 0, n % 3 = 0)),
       timestamptz '2024-01-01 00:00:00+00' + n * interval '1 second',
       n
FROM generate_series(1, $2) AS n
"""

DUMPS = ["ExportBackup", "pg_dump -Fc", "pg_dump -Fp"]
LOADS = ["RestoreBackup", "pg_restore -Fc", "psql -f (plain)"]

# The measured ratios (the service's rows per second over a tool's), by the ids
# bench/suite.py and bench/check.py know them by.
RATIO_IDS = {
    "pg_dump -Fc": "export_vs_pg_dump_custom",
    "pg_dump -Fp": "export_vs_pg_dump_plain",
    "pg_restore -Fc": "restore_vs_pg_restore",
    "psql -f (plain)": "restore_vs_psql",
}
PROGRAMS = ("pg_dump", "pg_restore", "psql")


def _major_version(program: Path) -> int:
    try:
        out = subprocess.run(
            [str(program), "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    found = re.search(r"\) (\d+)", out)
    return int(found.group(1)) if found else 0


def _embedded_bin() -> Path | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs on a missing XDG_RUNTIME_DIR
            from pgserver._commands import POSTGRES_BIN_PATH
    except ImportError:
        return None
    return Path(POSTGRES_BIN_PATH)


def pg_bin(server_major: int) -> Path:
    """The directory of pg_dump, pg_restore and psql to use against this server."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    candidates = [
        Path(f"/usr/lib/postgresql/{server_major}/bin"),
        _embedded_bin(),
        Path("/usr/bin"),
    ]
    for directory in candidates:
        if (
            directory is not None
            and all((directory / p).exists() for p in PROGRAMS)
            and _major_version(directory / "pg_dump") >= server_major
        ):
            return directory
    raise SystemExit(
        f"no pg_dump of PostgreSQL {server_major} or newer found; set PG_BIN to its directory"
    )


class Run:
    """The database, the service and the dumps of one run."""

    def __init__(
        self, url: str, workspace: str, rows: int, files: Path, address: str, programs: Path
    ) -> None:
        self.url = url
        self.programs = programs
        self.workspace = workspace
        self.rows = rows
        self.files = files
        self.address = address
        self.backup: list[pb.ExportBackupResponse] = []
        self.sizes: dict[str, int] = {}

    # -- dumps -------------------------------------------------------------------------

    async def export(self, stub: maintenance_service_pb2_grpc.MaintenanceServiceStub) -> None:
        request = pb.ExportBackupRequest(
            scope=job_pb2.BackupScope(workspace_id=self.workspace, tables=[TABLE])
        )
        self.backup = [message async for message in stub.ExportBackup(request, timeout=600)]
        manifest = self.backup[-1].manifest
        if manifest.tables[0].row_count != self.rows:
            raise RuntimeError(f"the export holds {manifest.tables[0].row_count} rows")
        self.sizes["ExportBackup"] = manifest.data_bytes

    async def pg_dump(self, fmt: str) -> None:
        target = self.files / f"dump.{fmt}"
        await _run(
            self.programs / "pg_dump",
            "--data-only",
            f"--table=public.{TABLE}",
            f"--format={fmt}",
            f"--file={target}",
            f"--dbname={self.url}",
        )
        self.sizes[f"pg_dump -F{fmt[0]}"] = target.stat().st_size

    # -- loads -------------------------------------------------------------------------

    async def restore(self, stub: maintenance_service_pb2_grpc.MaintenanceServiceStub) -> None:
        requests = [_request(m) for m in self.backup]
        response = await stub.RestoreBackup(iter(requests), timeout=600)
        if response.tables[0].row_count != self.rows:
            raise RuntimeError(f"the restore loaded {response.tables[0].row_count} rows")

    async def pg_restore(self) -> None:
        await _run(
            self.programs / "pg_restore",
            "--data-only",
            "--exit-on-error",
            f"--dbname={self.url}",
            str(self.files / "dump.custom"),
        )

    async def psql(self) -> None:
        await _run(
            self.programs / "psql",
            "--quiet",
            "--no-psqlrc",
            "--set=ON_ERROR_STOP=1",
            f"--file={self.files / 'dump.plain'}",
            f"--dbname={self.url}",
        )

    async def empty(self, conn: asyncpg.Connection) -> None:
        await conn.execute(f"TRUNCATE {TABLE}")

    async def check(self, conn: asyncpg.Connection) -> None:
        count = await conn.fetchval(f"SELECT count(*) FROM {TABLE}")
        if count != self.rows:
            raise RuntimeError(f"{count} rows after a load, not {self.rows}")


def _request(message: pb.ExportBackupResponse) -> pb.RestoreBackupRequest:
    kind = message.WhichOneof("part")
    if kind == "header":
        return pb.RestoreBackupRequest(header=message.header)
    if kind == "chunk":
        return pb.RestoreBackupRequest(chunk=message.chunk)
    return pb.RestoreBackupRequest(manifest=message.manifest)


async def _run(program: Path, *args: str) -> None:
    # subprocess.run in a thread, not uvloop's subprocesses: libuv forks, which runs
    # gRPC's fork handlers (and their log lines) with the channel's threads busy;
    # CPython spawns with vfork, which does not.
    process = await asyncio.to_thread(
        subprocess.run,
        [str(program), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    if process.returncode:
        stderr = process.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{program.name} failed: {stderr}")


async def _timed(action: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


async def measure(
    run: Run, rounds: int, database_name: str
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds, and foreign cores (bench/noise.py), per case per round; the first
    (warm-up) round is dropped."""
    timings: dict[str, list[float]] = {name: [] for name in DUMPS + LOADS}
    foreign: dict[str, list[float]] = {name: [] for name in DUMPS + LOADS}
    window = noise.Window(database_name)
    conn = await asyncpg.connect(run.url)
    try:
        async with grpc.aio.insecure_channel(
            run.address,
            options=[("grpc.max_receive_message_length", 64 << 20)],
            interceptors=bearer_auth(processes.bench_token()),
        ) as channel:
            stub = maintenance_service_pb2_grpc.MaintenanceServiceStub(channel)
            dumps: dict[str, Callable[[], Awaitable[None]]] = {
                "ExportBackup": lambda: run.export(stub),
                "pg_dump -Fc": lambda: run.pg_dump("custom"),
                "pg_dump -Fp": lambda: run.pg_dump("plain"),
            }
            loads: dict[str, Callable[[], Awaitable[None]]] = {
                "RestoreBackup": lambda: run.restore(stub),
                "pg_restore -Fc": run.pg_restore,
                "psql -f (plain)": run.psql,
            }
            for round_ in range(rounds + 1):
                for names, actions in ((DUMPS, dumps), (LOADS, loads)):
                    shift = round_ % len(names)
                    for name in names[shift:] + names[:shift]:
                        if actions is loads:
                            await run.empty(conn)
                        window.start()
                        seconds = await _timed(actions[name])
                        cores = window.cores()
                        if actions is loads:
                            await run.check(conn)
                        if round_:
                            timings[name].append(seconds)
                            foreign[name].append(cores)
                        label = f"round {round_}/{rounds}" if round_ else "warm-up"
                        print(
                            f"  {label:12} {name:18} {seconds:7.3f} s  foreign cpu {cores:4.2f}",
                            file=sys.stderr,
                            flush=True,
                        )
    finally:
        await conn.close()
    return timings, foreign


def summarize(
    timings: dict[str, list[float]], foreign: dict[str, list[float]], rows: int
) -> list[dict[str, Any]]:
    out = []
    for names in (DUMPS, LOADS):
        service = timings[names[0]]
        for name in names:
            seconds = timings[name]
            ratios = [s / base for s, base in zip(seconds, service, strict=True)]
            median = statistics.median(seconds)
            out.append(
                {
                    "case": name,
                    "median_seconds": median,
                    "min_seconds": min(seconds),
                    "max_seconds": max(seconds),
                    "rows_per_second": rows / median,
                    "time_over_service": statistics.median(ratios),
                    "foreign_cpu_cores": statistics.median(foreign[name]),
                    "seconds": seconds,
                }
            )
    return out


def print_table(results: list[dict[str, Any]], rows: int, sizes: dict[str, int]) -> None:
    print(f"\n{rows:,} rows, medians:")
    header = (
        f"  {'case':18} {'median s':>9} {'min-max s':>15} {'rows/s':>11} {'x service':>10} "
        f"{'foreign':>7}"
    )
    print(header)
    for r in results:
        spread = f"{r['min_seconds']:.3f}-{r['max_seconds']:.3f}"
        print(
            f"  {r['case']:18} {r['median_seconds']:9.3f} {spread:>15} "
            f"{r['rows_per_second']:11,.0f} {r['time_over_service']:10.2f} "
            f"{r['foreign_cpu_cores']:7.2f}"
        )
    print(
        "  (x service: the case's time over the service's in the same round, medianed; "
        "foreign: cores other jobs used meanwhile, noise when well above 0)"
    )
    print("  sizes: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items()))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.backup",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=100_000, help="rows (default 100000)")
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds (default 7)")
    parser.add_argument(
        "--quick", action="store_true", help="a short run: 3 rounds of the same rows"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=report.RESULTS / "backup.json",
        help="where the JSON results go (default bench/results/backup.json)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 3
    return args


async def main_async(args: argparse.Namespace) -> int:
    server_url = os.environ.get("DATABASE_URL", "")
    if not server_url:
        print("error: set DATABASE_URL (or run `make bench`)", file=sys.stderr)
        return 2
    started = time.monotonic()
    bench_db = await database.create_empty(server_url, args.rows)
    server = None
    try:
        conn = await asyncpg.connect(bench_db.url)
        try:
            postgres_version = str(await conn.fetchval("SHOW server_version"))
            programs = pg_bin(int(await conn.fetchval("SHOW server_version_num")) // 10000)
            await conn.execute(SCHEMA_SQL)
            await conn.execute(FILL_SQL, uuid.UUID(bench_db.workspace_id), args.rows)
            await conn.execute(f"VACUUM ANALYZE {TABLE}")
        finally:
            await conn.close()
        with tempfile.TemporaryDirectory(prefix="raptorflow-bench-backup-") as scratch:
            server = await processes.start_data_server(bench_db.url, Path(scratch))
            run = Run(
                bench_db.url,
                bench_db.workspace_id,
                args.rows,
                Path(scratch),
                server.address,
                programs,
            )
            timings, foreign = await measure(run, args.rounds, bench_db.name)
            sizes = run.sizes
        results = summarize(timings, foreign, args.rows)
        print_table(results, args.rows, sizes)
        doc = {
            **report.run_info(postgres_version),
            "settings": {
                "rows": args.rows,
                "rounds": args.rounds,
                "quick": args.quick,
                "table": TABLE,
                "programs": str(programs),
            },
            "sizes_bytes": sizes,
            "foreign_cpu_cores": {
                "median": statistics.median(c for cores in foreign.values() for c in cores),
                "max": max(c for cores in foreign.values() for c in cores),
            },
            "ratios": {
                RATIO_IDS[r["case"]]: r["time_over_service"]
                for r in results
                if r["case"] in RATIO_IDS
            },
            "results": results,
        }
        report.write(report.rounded(doc), args.output)
        print(f"wrote {args.output} ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    finally:
        if server is not None:
            await server.stop()
        await database.drop(bench_db)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # The service runs on uvloop; the client here does too.
    return uvloop.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
