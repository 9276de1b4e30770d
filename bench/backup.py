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
second and each case's time over the service's in the same round (medianed),
writes bench/results/backup.json and drops the database.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from raptorflow.data.client import bearer_auth
from raptorflow.data.v1 import job_pb2, maintenance_service_pb2, maintenance_service_pb2_grpc

from bench import database, processes, report

pb = maintenance_service_pb2
TABLE = "bench_backup_rows"
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/bin"))

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


class Run:
    """The database, the service and the dumps of one run."""

    def __init__(self, url: str, workspace: str, rows: int, files: Path, address: str) -> None:
        self.url = url
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
            PG_BIN / "pg_dump",
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
            PG_BIN / "pg_restore",
            "--data-only",
            "--exit-on-error",
            f"--dbname={self.url}",
            str(self.files / "dump.custom"),
        )

    async def psql(self) -> None:
        await _run(
            PG_BIN / "psql",
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
    process = await asyncio.create_subprocess_exec(
        str(program), *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await process.communicate()
    if process.returncode:
        raise RuntimeError(f"{program.name} failed: {stderr.decode(errors='replace')[-2000:]}")


async def _timed(action: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


async def measure(run: Run, rounds: int) -> dict[str, list[float]]:
    """Seconds per case per round; the first (warm-up) round is dropped."""
    timings: dict[str, list[float]] = {name: [] for name in DUMPS + LOADS}
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
                        seconds = await _timed(actions[name])
                        if actions is loads:
                            await run.check(conn)
                        if round_:
                            timings[name].append(seconds)
                        label = f"round {round_}/{rounds}" if round_ else "warm-up"
                        print(f"  {label:12} {name:18} {seconds:7.3f} s", flush=True)
    finally:
        await conn.close()
    return timings


def summarize(timings: dict[str, list[float]], rows: int) -> list[dict[str, Any]]:
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
                    "seconds": seconds,
                }
            )
    return out


def print_table(results: list[dict[str, Any]], rows: int, sizes: dict[str, int]) -> None:
    print(f"\n{rows:,} rows, medians:")
    header = f"  {'case':18} {'median s':>9} {'min-max s':>15} {'rows/s':>11} {'x service':>10}"
    print(header)
    for r in results:
        spread = f"{r['min_seconds']:.3f}-{r['max_seconds']:.3f}"
        print(
            f"  {r['case']:18} {r['median_seconds']:9.3f} {spread:>15} "
            f"{r['rows_per_second']:11,.0f} {r['time_over_service']:10.2f}"
        )
    print("  (x service: the case's time over the service's in the same round, medianed)")
    print("  sizes: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items()))


async def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.backup", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=report.RESULTS / "backup.json")
    args = parser.parse_args()
    server_url = os.environ.get("DATABASE_URL")
    if not server_url:
        raise SystemExit("set DATABASE_URL to a PostgreSQL server (a database is created there)")
    bench_db = await database.create_empty(server_url, args.rows)
    server = None
    try:
        conn = await asyncpg.connect(bench_db.url)
        try:
            postgres_version = str(await conn.fetchval("SHOW server_version"))
            await conn.execute(SCHEMA_SQL)
            await conn.execute(FILL_SQL, uuid.UUID(bench_db.workspace_id), args.rows)
            await conn.execute(f"VACUUM ANALYZE {TABLE}")
        finally:
            await conn.close()
        with tempfile.TemporaryDirectory(prefix="raptorflow-bench-backup-") as scratch:
            server = await processes.start_data_server(bench_db.url, Path(scratch))
            run = Run(bench_db.url, bench_db.workspace_id, args.rows, Path(scratch), server.address)
            timings = await measure(run, args.rounds)
            sizes = run.sizes
        results = summarize(timings, args.rows)
        print_table(results, args.rows, sizes)
        doc = {
            **report.run_info(postgres_version),
            "settings": {"rows": args.rows, "rounds": args.rounds, "table": TABLE},
            "sizes_bytes": sizes,
            "results": results,
        }
        report.write(report.rounded(doc), args.output)
        print(f"wrote {args.output}")
    finally:
        if server is not None:
            await server.stop()
        await database.drop(bench_db)


if __name__ == "__main__":
    asyncio.run(main())
