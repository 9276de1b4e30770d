"""A bounded soak: steady load across every service on two replicas, with faults injected on
a schedule, and a report of what survived. Not part of CI's default run.

    make soak                                                     # 10 minutes
    make soak SOAK_ARGS="--minutes 1"                             # a quick look
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench.soak --minutes 10

One run: a fresh database on DATABASE_URL's server with `soak_items` (change
capture installed), a TCP proxy process with one proxy per replica, and two
`raptorflow-data serve` replicas (metrics on, one shared --token-key, the bench
JWT secret), each reaching PostgreSQL through its own proxy. The load (bench/soak_load.py),
through the client library on one round_robin channel over both replicas and
through the raw stubs: inserts with unique tags, updates, ExecuteBatch,
selects and counts; memory upserts and searches; GetStatus; analyze and
vacuum jobs waited to their end; ExportBackup now and then; one following
sync stream per workspace that resumes from its last token after every
error; and calls cancelled or timed out at random moments (`--cancels`,
1,000 per minute by default), as a trickle and in bursts. Every
`--fault-interval` seconds a fault (bench/soak_faults.py), in rotation:
database cut at both proxies for `--cut-seconds`; pg_terminate_backend of
every backend of the service; one replica SIGTERMed and started again; a
burst of `--cancel-burst` cancelled calls. After each, and at the end: both
replicas SERVING again (time to heal), then, with the load held, no query of
the service running in pg_stat_activity, every pool connection idle and no
connection held past the leak limit or reclaimed.

At the end: each acknowledged insert's tag is present exactly once (lost,
duplicated); each row's counter is at least its last acknowledged update and
at most the last one sent; each acknowledged memory record exists; each
follower's copy equals its workspace's rows, with no change delivered twice;
the replicas' connections through their proxies are the pool plus the same
fixed few as at the start. Prints a report and writes bench/results/soak.json;
exits 1 on a lost or duplicated write or change, a leaked connection, an
UNKNOWN or INTERNAL status (client or server side), a replica that did not
exit 0 on SIGTERM, or a fault that did not heal.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import itertools
import os
import re
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import asyncpg
from raptorflow.data.client import ClientConfig, DataClient
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.connections import (
    JOB_POOL_MAX_SIZE,
    owner_pool_max_size,
)

from bench import database, processes, report
from bench.soak_faults import (
    APPLICATION_NAME,
    QUICK_RECONNECT,
    SERVICE_BACKENDS,
    SERVING,
    SETTLE_SECONDS,
    Faults,
    HealCheck,
    ProxyProcess,
    Replica,
    heal_check,
    wait_readiness,
)
from bench.soak_load import (
    SCHEMA_SQL,
    TABLE,
    Call,
    Follower,
    Ledger,
    Load,
    new_workspaces,
    percentile,
)
from bench.sync import install

FAILING_STATUSES = {"UNKNOWN", "INTERNAL"}
BEYOND_POOL_BOUND = owner_pool_max_size(Settings()) + JOB_POOL_MAX_SIZE + 2
"""The most connections a replica opens besides its query pool: the owner pool, the job
pool, the LISTEN connection and the health session."""
OUTPUT = report.RESULTS / "soak.json"


def overlaps(call: Call, windows: Sequence[tuple[float, float]]) -> bool:
    return any(call.started < end and call.ended > start for start, end in windows)


def call_figures(calls: Sequence[Call], windows: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Calls by kind; statuses during faults and outside; latency outside faults."""
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    during: collections.Counter[str] = collections.Counter()
    outside: collections.Counter[str] = collections.Counter()
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    for call in calls:
        if call.kind.startswith("cancel_"):
            continue
        by_kind[call.kind][call.status] += 1
        in_fault = overlaps(call, windows)
        if call.status != "OK":
            (during if in_fault else outside)[call.status] += 1
        elif not in_fault:
            latencies[call.kind].append(call.ended - call.started)
            latencies["all"].append(call.ended - call.started)
    return {
        "by_kind": {
            kind: {"calls": sum(c.values()), "ok": c["OK"], "errors": sum(c.values()) - c["OK"]}
            for kind, c in sorted(by_kind.items())
        },
        "errors_during_faults": dict(during.most_common()),
        "errors_outside_faults": dict(outside.most_common()),
        "latency_outside_faults_ms": {
            kind: {
                "calls": len(values),
                "p50": percentile(values, 0.5) * 1000,
                "p99": percentile(values, 0.99) * 1000,
            }
            for kind, values in sorted(latencies.items())
        },
    }


async def write_checks(admin: asyncpg.Connection, ledger: Ledger) -> dict[str, Any]:
    """Acknowledged writes against what the database holds."""
    present: dict[str, tuple[str, int]] = {
        r["tag"]: (r["ws"], r["n"])
        for r in await admin.fetch(
            f"SELECT tag, workspace_id::text AS ws, count(*) AS n FROM {TABLE} GROUP BY 1, 2"
        )
    }
    lost = [t for t, ws in ledger.acked_tags.items() if present.get(t, ("", 0))[0] != ws]
    duplicated = [t for t, (_, n) in present.items() if n > 1]
    unacked_applied = collections.Counter(
        status for t, status in ledger.unacked_tags.items() if t in present
    )
    unacked_not_applied = collections.Counter(
        status for t, status in ledger.unacked_tags.items() if t not in present
    )
    counters = {
        r["id"]: r["counter"] for r in await admin.fetch(f"SELECT id, counter FROM {TABLE}")
    }
    lost_updates = []
    for row_id, writes in ledger.rows.items():
        final = counters.get(row_id)
        if final is None or final < writes.acked or final > writes.attempted:
            lost_updates.append(
                f"row {row_id}: counter {final}, acked {writes.acked}, sent {writes.attempted}"
            )
    records = {
        r["id"]: r["ws"]
        for r in await admin.fetch(
            "SELECT id, workspace_id::text AS ws FROM raptorflow_data.memory_records"
        )
    }
    lost_records = [i for i, ws in ledger.memory_acked.items() if records.get(i) != ws]
    return {
        "inserts_acked": len(ledger.acked_tags),
        "inserts_lost": len(lost),
        "inserts_duplicated": len(duplicated),
        "inserts_failed_by_status": dict((unacked_applied + unacked_not_applied).most_common()),
        "failed_inserts_applied_by_status": dict(unacked_applied.most_common()),
        "updates_acked": ledger.updates_acked,
        "updates_lost": len(lost_updates),
        "update_anomalies": ledger.update_anomalies[:20],
        "memory_records_acked": len(ledger.memory_acked),
        "memory_records_lost": len(lost_records),
        "read_anomalies": ledger.read_anomalies[:20],
        "examples": {
            "lost": lost[:10],
            "duplicated": duplicated[:10],
            "lost_updates": lost_updates[:10],
            "lost_records": lost_records[:10],
        },
    }


async def follower_checks(
    admin: asyncpg.Connection, followers: Sequence[Follower], within: float
) -> dict[str, Any]:
    """Waits until every follower's copy equals its workspace's rows (or `within` passes)."""
    started = time.monotonic()
    while True:
        differences: dict[str, tuple[int, int]] = {}
        for follower in followers:
            rows = {
                r["id"]: (r["tag"], r["counter"])
                for r in await admin.fetch(
                    f"SELECT id, tag, counter FROM {TABLE} WHERE workspace_id = $1",
                    uuid.UUID(follower.workspace),
                )
            }
            missing = sum(1 for i, v in rows.items() if follower.view.get(i) != v)
            extra = sum(1 for i in follower.view if i not in rows)
            if missing or extra:
                differences[follower.name] = (missing, extra)
        if not differences or time.monotonic() - started > within:
            break
        await asyncio.sleep(0.5)
    return {
        "caught_up_seconds": round(time.monotonic() - started, 2),
        "delivered": sum(f.delivered for f in followers),
        "snapshot_rows": sum(f.snapshot_rows for f in followers),
        "lost": sum(m for m, _ in differences.values()),
        "extra": sum(e for _, e in differences.values()),
        "duplicated": sum(f.duplicates for f in followers),
        "out_of_sequence_order": sum(f.out_of_order for f in followers),
        "streams_opened": sum(f.streams for f in followers),
        "resnapshots": sum(f.resnapshots for f in followers),
        "acknowledged": sum(f.acknowledged for f in followers),
        "stream_errors": dict(sum((f.errors for f in followers), collections.Counter())),
        "failures": [f.failure for f in followers if f.failure][:3],
    }


async def sample_rss(replicas: Sequence[Replica], stop: asyncio.Event) -> None:
    while not stop.is_set():
        for replica in replicas:
            replica.sample_rss()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 2.0)


async def cancel_trickle(load: Load, target: int, started: float, duration: float) -> None:
    """Random cancels through the whole run, paced so that, with the bursts, `target` are
    made by the end."""
    ledger = load.ledger
    while not ledger.stop.is_set():
        await ledger.gate.wait()
        due = target * min(1.0, (time.monotonic() - started) / duration)
        if sum(ledger.cancels.values()) >= due:
            await asyncio.sleep(0.05)
            continue
        await load.cancel_burst(1, concurrency=1)


async def service_backends_after_stop(
    admin: asyncpg.Connection, database_name: str, within: float = 10.0
) -> int:
    """Backends of the service left once every replica exited (polled: PostgreSQL ends a
    backend a moment after its client closed the socket)."""
    deadline = time.monotonic() + within
    while True:
        left = int(await admin.fetchval(SERVICE_BACKENDS, database_name, APPLICATION_NAME))
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.1)


def log_errors(log_dir: Path) -> dict[str, int]:
    """ERROR lines of every replica's log, counted by their text with numbers and addresses
    blanked (an unmapped database error there is a server bug the statuses may not show)."""
    counts: collections.Counter[str] = collections.Counter()
    for log in sorted(log_dir.glob("replica-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            _, found, message = line.partition(" ERROR ")
            if found:
                counts[re.sub(r"0x[0-9a-f]+|\d+", "N", message)[:160]] += 1
    return dict(counts.most_common())


def connection_overhead(stats: dict[str, Any], pools: dict[int, Any]) -> dict[int, int]:
    """Per replica: connections through its proxy beyond its query pool's (LISTEN, health,
    owner pool)."""
    return {i: stats["open"][i] - m.pool_size for i, m in pools.items()}


async def run(args: argparse.Namespace) -> int:
    server_url = os.environ.get("DATABASE_URL", "")
    if not server_url:
        raise SystemExit("set DATABASE_URL to a PostgreSQL server (a database is created there)")
    duration = args.minutes * 60.0
    cancels_target = args.cancels if args.cancels is not None else int(1000 * args.minutes)
    fault_interval = args.fault_interval or min(45.0, max(8.0, duration / 5))
    log_dir = Path(args.log_dir)
    print(f"soak: {args.minutes:g} min, a fault every {fault_interval:g} s, logs in {log_dir}")

    bench_db = await database.create_empty(server_url, 0)
    setup = await asyncpg.connect(bench_db.url)
    try:
        await setup.execute(SCHEMA_SQL)
    finally:
        await setup.close()
    await install(bench_db.url, TABLE)
    postgres_version = ""
    proxy = await ProxyProcess.start(bench_db.url, args.replicas, log_dir / "proxy.log")
    token_key = "base64:" + base64.b64encode(secrets.token_bytes(32)).decode()
    replicas = [
        Replica(i, proxy.url(bench_db.url, i), token_key, log_dir, args.server_arg)
        for i in range(args.replicas)
    ]
    admin = await asyncpg.connect(
        bench_db.url, server_settings={"application_name": "raptorflow-soak"}
    )
    stop_sampling = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    client: DataClient | None = None
    doc: dict[str, Any] = {}
    try:
        postgres_version = str(await admin.fetchval("SHOW server_version"))
        for replica in replicas:
            await replica.start()
        target = "ipv4:" + ",".join(r.address for r in replicas)
        client = DataClient(
            ClientConfig(
                target,
                token=processes.bench_token(),
                load_balancing_policy="round_robin",
                channel_options=QUICK_RECONNECT,
                timeout=10.0,
            )
        )
        workspaces = new_workspaces(args.workspaces)
        ledger = Ledger()
        load = Load(client, processes.auth_metadata(), workspaces, ledger, pause=args.pause)
        followers = [Follower(client, ws, f"soak-follower-{i}") for i, ws in enumerate(workspaces)]
        stop_followers = asyncio.Event()
        baseline_pools = {r.index: await r.scrape() for r in replicas}
        baseline_overhead = connection_overhead(await proxy.command("stats"), baseline_pools)

        run_started = time.monotonic()
        tasks.append(asyncio.create_task(sample_rss(replicas, stop_sampling)))
        tasks += [asyncio.create_task(f.run(stop_followers)) for f in followers]
        workers = [
            *(load.writer(i) for i in range(args.writers)),
            *(load.reader(i) for i in range(args.readers)),
            *(load.memory(i) for i in range(2)),
            load.status(),
            load.jobs(every=20.0),
            load.backups(every=30.0),
            *(cancel_trickle(load, cancels_target, run_started, duration) for _ in range(4)),
        ]
        worker_tasks = [asyncio.create_task(w) for w in workers]
        faults = Faults(
            replicas,
            proxy,
            admin,
            bench_db.name,
            load,
            cut_seconds=args.cut_seconds,
            heal_within=60.0,
            run_started=run_started,
        )
        kinds = itertools.cycle(args.faults.split(","))
        end = run_started + duration
        last = run_started
        while True:
            next_at = last + fault_interval
            if next_at + 5.0 > end:
                break
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            kind = next(kinds)
            record = await faults.inject(kind, cancels=args.cancel_burst)
            clean = record.check.clean_after_seconds if record.check else None
            print(
                f"  {record.at_seconds:6.1f} s  {kind:<9} {record.target:<10}"
                f" outage {record.outage_seconds:5.1f} s  heal {_seconds(record.heal_seconds)}"
                f"  clean after {_seconds(clean)}  {'ok' if record.healed else 'NOT HEALED'}",
                flush=True,
            )
            last = time.monotonic()
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        remainder = cancels_target - sum(ledger.cancels.values())
        if remainder > 0:
            print(f"  final burst of {remainder} cancelled calls", flush=True)
            await load.cancel_burst(remainder)
        load_seconds = time.monotonic() - run_started
        ledger.stop.set()
        ledger.resume()
        _, pending = await asyncio.wait(worker_tasks, timeout=60.0)
        for task in pending:
            task.cancel()
        final_serving = await wait_readiness(replicas, SERVING, 60.0)
        final_check: HealCheck = await heal_check(ledger, replicas, admin, bench_db.name)
        sync = await follower_checks(admin, followers, within=60.0)
        stop_followers.set()
        for task in tasks[1:]:
            task.cancel()
        await asyncio.gather(*tasks[1:], return_exceptions=True)
        writes = await write_checks(admin, ledger)
        end_pools = {r.index: await r.scrape() for r in replicas}
        end_stats = await proxy.command("stats")
        end_overhead = connection_overhead(end_stats, end_pools)
        for replica in replicas:
            replica.sample_rss()
        stop_sampling.set()
        for replica in replicas:
            await replica.stop()
        left_after_stop = await faults.connections_left(replicas)
        backends_after_stop = await service_backends_after_stop(admin, bench_db.name)
        errors_logged = await asyncio.to_thread(log_errors, log_dir)
        doc = build_document(
            args=args,
            duration=load_seconds,
            cancels_target=cancels_target,
            fault_interval=fault_interval,
            ledger=ledger,
            faults=faults,
            replicas=replicas,
            final_serving=final_serving,
            final_check=final_check,
            sync=sync,
            writes=writes,
            baseline_overhead=baseline_overhead,
            end_overhead=end_overhead,
            left_after_stop=left_after_stop,
            backends_after_stop=backends_after_stop,
            errors_logged=errors_logged,
            postgres_version=postgres_version,
        )
    finally:
        stop_sampling.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if client is not None:
            await client.close()
        for replica in replicas:
            await replica.stop()
            await replica.close()
        await proxy.stop()
        await admin.close()
        if not args.keep_database:
            await database.drop(bench_db)
    print(render(doc))
    report.write(report.rounded(doc), Path(args.output))
    print(f"written {args.output}")
    return 0 if doc["verdict"]["passed"] else 1


def _seconds(value: float | None) -> str:
    return "  never" if value is None else f"{value:5.1f} s"


def build_document(
    *,
    args: argparse.Namespace,
    duration: float,
    cancels_target: int,
    fault_interval: float,
    ledger: Ledger,
    faults: Faults,
    replicas: Sequence[Replica],
    final_serving: dict[int, float | None],
    final_check: HealCheck,
    sync: dict[str, Any],
    writes: dict[str, Any],
    baseline_overhead: dict[int, int],
    end_overhead: dict[int, int],
    left_after_stop: int,
    backends_after_stop: int,
    errors_logged: dict[str, int],
    postgres_version: str,
) -> dict[str, Any]:
    calls = call_figures(ledger.calls, faults.windows)
    all_statuses = collections.Counter(c.status for c in ledger.calls)
    server_statuses: collections.Counter[str] = collections.Counter()
    for replica in replicas:
        for instance in replica.instances:
            server_statuses.update(instance.server_statuses)
    instances = [asdict(i) for r in replicas for i in r.instances]
    for item in instances:
        item.pop("started_at")
    left_after_exit = sum(
        int(r.detail.get("connections_left_after_exit", 0)) for r in faults.records
    )
    leaks = {
        "held_over_limit_max": max(i.held_over_limit_max for r in replicas for i in r.instances),
        "reclaimed": sum(i.reclaimed for r in replicas for i in r.instances),
        "connections_beyond_query_pool_at_start": baseline_overhead,
        "connections_beyond_query_pool_at_end": end_overhead,
        "connections_beyond_query_pool_bound": BEYOND_POOL_BOUND,
        "connections_left_after_restarts": left_after_exit,
        "connections_left_after_final_stop": left_after_stop,
        "backends_left_after_final_stop": backends_after_stop,
    }
    leaked = (
        leaks["held_over_limit_max"]
        + leaks["reclaimed"]
        + sum(max(0, n - BEYOND_POOL_BOUND) for n in end_overhead.values())
        + left_after_exit
        + left_after_stop
        + backends_after_stop
    )
    leaks["connections_leaked"] = leaked
    fault_list = []
    for record in faults.records:
        item = asdict(record)
        item["healed"] = record.healed
        fault_list.append(item)
    problems: list[str] = []
    for key in (
        "inserts_lost",
        "inserts_duplicated",
        "updates_lost",
        "memory_records_lost",
    ):
        if writes[key]:
            problems.append(f"{key}: {writes[key]}")
    misreported = {
        status: n
        for status, n in writes["failed_inserts_applied_by_status"].items()
        if status.startswith("UNAVAILABLE") and status != "UNAVAILABLE:COMMIT_OUTCOME_UNKNOWN"
    }
    if misreported:
        # UNAVAILABLE tells the caller nothing was written, unless its reason says the
        # COMMIT's outcome is unknown: a caller retrying these would write twice.
        problems.append(f"inserts that failed UNAVAILABLE were applied: {misreported}")
    if writes["update_anomalies"]:
        problems.append(f"update anomalies: {writes['update_anomalies'][:3]}")
    if writes["read_anomalies"]:
        problems.append(f"acknowledged inserts not read back: {writes['read_anomalies'][:3]}")
    for key in ("lost", "extra", "duplicated"):
        if sync[key]:
            problems.append(f"sync changes {key}: {sync[key]}")
    if sync["failures"]:
        problems.append("a follower failed with an exception")
    if leaked:
        problems.append(f"connections leaked: {leaked}")
    bad = {s: n for s, n in all_statuses.items() if s in FAILING_STATUSES or s.startswith("EXC")}
    if ledger.core_internal:
        # grpc.aio's own INTERNAL, not the server's: see GRPC_CORE_INTERNAL.
        bad["INTERNAL"] -= ledger.core_internal
        problems.append(
            f"client library: {ledger.core_internal} calls raised INTERNAL 'Internal error from"
            " Core', which grpc.aio makes up when a client-stream write meets the call's end"
            " (grpc/grpc#36066), in place of the status the server sent"
        )
    raw = {s: n for s, n in bad.items() if s.startswith("EXCEPTION:")}
    if raw:
        problems.append(f"client library: calls raised exceptions that are no DataError: {raw}")
    bad = {s: n for s, n in bad.items() if n and s not in raw}
    if bad:
        problems.append(f"client saw {bad}")
    bad_server = {s: n for s, n in server_statuses.items() if s in FAILING_STATUSES}
    if bad_server:
        problems.append(f"servers answered {bad_server}")
    for record in faults.records:
        if not record.healed:
            check = record.check
            problems.append(
                f"{record.kind} at {record.at_seconds:.0f} s did not heal: serving after"
                f" {record.serving_after}, clean after"
                f" {check.clean_after_seconds if check else None} s (bound {SETTLE_SECONDS} s),"
                f" first seen {check.first_seen[:3] if check else None}"
            )
        if record.kind == "restart" and record.detail.get("exit_status") != 0:
            problems.append(f"restart at {record.at_seconds:.0f} s: exit {record.detail}")
    final_clean = final_check.clean_after_seconds
    if (
        any(v is None for v in final_serving.values())
        or final_clean is None
        or final_clean > SETTLE_SECONDS
    ):
        problems.append(f"not clean at the end: {final_check.busy_backends or final_serving}")
    for replica in replicas:
        last = replica.instance
        if last.exit_status != 0:
            problems.append(f"replica {replica.index} exited {last.exit_status} at the end")
    return {
        **report.run_info(postgres_version),
        "settings": {
            "minutes": args.minutes,
            "replicas": args.replicas,
            "workspaces": args.workspaces,
            "writers": args.writers,
            "readers": args.readers,
            "pause_seconds": args.pause,
            "fault_interval_seconds": fault_interval,
            "cut_seconds": args.cut_seconds,
            "cancels_target": cancels_target,
            "cancel_burst": args.cancel_burst,
            "server_args": args.server_arg,
        },
        "duration_seconds": duration,
        "calls": {
            "total": sum(1 for c in ledger.calls if not c.kind.startswith("cancel_")),
            "per_second": sum(1 for c in ledger.calls if not c.kind.startswith("cancel_"))
            / duration,
            **calls,
        },
        "cancelled_or_timed_out": {
            "calls": sum(ledger.cancels.values()),
            "outcomes": dict(ledger.cancels.most_common()),
        },
        "statuses_client": dict(all_statuses.most_common()),
        "statuses_server": dict(server_statuses.most_common()),
        "writes": writes,
        "sync": sync,
        "jobs": dict(ledger.jobs.most_common()),
        "backups": {"exported": ledger.backups_ok, "bytes": ledger.backup_bytes},
        "memory_mib": instances,
        "connections": leaks,
        "faults": fault_list,
        "final_check": {"serving_after": final_serving, **asdict(final_check)},
        "unexpected_statuses": ledger.unexpected,
        "server_log_errors": errors_logged,
        "client_exceptions": ledger.exceptions[:5],
        "verdict": {"passed": not problems, "problems": problems},
    }


def render(doc: dict[str, Any]) -> str:
    """The report as text tables."""
    out: list[str] = []
    add = out.append
    calls = doc["calls"]
    add(
        f"\nsoak: {doc['duration_seconds']:.0f} s of load, {calls['total']:,} calls"
        f" ({calls['per_second']:.0f}/s), {len(doc['faults'])} faults"
    )
    add(f"\n{'calls by kind':<26} {'calls':>8} {'ok':>9} {'errors':>8} {'p50 ms':>8} {'p99 ms':>8}")
    latency = calls["latency_outside_faults_ms"]
    nan = {"p50": float("nan"), "p99": float("nan")}
    for kind, c in calls["by_kind"].items():
        lat = latency.get(kind, nan)
        add(
            f"  {kind:<24} {c['calls']:>8,} {c['ok']:>9,} {c['errors']:>8,}"
            f" {lat['p50']:>8.1f} {lat['p99']:>8.1f}"
        )
    lat = latency.get("all", nan)
    add(f"  {'all (latency outside faults)':<51} {lat['p50']:>8.1f} {lat['p99']:>8.1f}")
    add(f"\nerrors by status during faults:  {calls['errors_during_faults'] or 'none'}")
    add(f"errors by status outside faults: {calls['errors_outside_faults'] or 'none'}")
    cancelled = doc["cancelled_or_timed_out"]
    add(f"\ncalls cancelled or timed out at random: {cancelled['calls']:,} {cancelled['outcomes']}")
    add(f"statuses the servers answered: {doc['statuses_server']}")
    for line in doc["unexpected_statuses"][:5]:
        add(f"  unexpected: {line[:300]}")
    for message, count in list(doc["server_log_errors"].items())[:8]:
        add(f"  server log ERROR x{count}: {message}")
    w = doc["writes"]
    add(
        f"\nwrites: inserts acked {w['inserts_acked']:,}, lost {w['inserts_lost']},"
        f" duplicated {w['inserts_duplicated']}; updates acked {w['updates_acked']:,},"
        f" lost {w['updates_lost']}; memory records acked {w['memory_records_acked']:,},"
        f" lost {w['memory_records_lost']}"
    )
    add(
        f"  failed inserts by status: {w['inserts_failed_by_status'] or 'none'}"
        f" (applied anyway: {w['failed_inserts_applied_by_status'] or 'none'})"
    )
    s = doc["sync"]
    add(
        f"sync: changes delivered {s['delivered']:,}, lost {s['lost']},"
        f" duplicated {s['duplicated']}, extra {s['extra']}; streams opened"
        f" {s['streams_opened']}, errors {s['stream_errors'] or 'none'},"
        f" caught up in {s['caught_up_seconds']} s"
    )
    add(f"jobs: {doc['jobs']}; backups exported: {doc['backups']['exported']}")
    add(f"\n{'server memory (RSS MiB)':<22} {'pid':>8} {'start':>7} {'max':>7} {'end':>7}  exit")
    for i in doc["memory_mib"]:
        add(
            f"  replica {i['replica']:<12} {i['pid']:>8} {i['rss_start_mib']:>7.1f}"
            f" {i['rss_max_mib']:>7.1f} {i['rss_end_mib']:>7.1f}  {i['exit_status']}"
        )
    c = doc["connections"]
    add(
        f"connections leaked: {c['connections_leaked']} (held past the limit"
        f" {c['held_over_limit_max']}, reclaimed {c['reclaimed']}; beyond the query pool at"
        f" start {c['connections_beyond_query_pool_at_start']}, at end"
        f" {c['connections_beyond_query_pool_at_end']}, at most"
        f" {c['connections_beyond_query_pool_bound']}; left after restarts"
        f" {c['connections_left_after_restarts']}, after the final stop"
        f" {c['connections_left_after_final_stop']} through the proxies,"
        f" {c['backends_left_after_final_stop']} backends)"
    )
    add(
        f"\n{'faults':<12} {'at s':>6}  {'target':<10} {'outage s':>8}  {'not serving after s':<20}"
        f" {'serving again after s':<22} clean after s"
    )
    for f in doc["faults"]:
        ns = {k: _short(v) for k, v in f["not_serving_after"].items()} or "-"
        sa = {k: _short(v) for k, v in f["serving_after"].items()}
        check = f["check"] or {}
        add(
            f"  {f['kind']:<10} {f['at_seconds']:>6.1f}  {f['target']:<10}"
            f" {f['outage_seconds']:>8.1f}  {ns!s:<20} {sa!s:<22}"
            f" {_short(check.get('clean_after_seconds'))}"
            f"{'' if f['healed'] else '  NOT HEALED'}"
        )
    verdict = doc["verdict"]
    add("\nPASSED" if verdict["passed"] else "\nFAILED:\n  " + "\n  ".join(verdict["problems"]))
    return "\n".join(out)


def _short(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="load duration (default 10)")
    parser.add_argument("--replicas", type=int, default=2, help="server replicas (default 2)")
    parser.add_argument("--workspaces", type=int, default=3, help="workspaces, one follower each")
    parser.add_argument("--writers", type=int, default=4, help="writing workers (default 4)")
    parser.add_argument("--readers", type=int, default=4, help="reading workers (default 4)")
    parser.add_argument(
        "--pause", type=float, default=0.04, help="mean seconds between a worker's calls (0.04)"
    )
    parser.add_argument(
        "--fault-interval",
        type=float,
        default=0.0,
        help="seconds of steady load between faults (default: a fifth of the run, 8 to 45)",
    )
    parser.add_argument(
        "--faults",
        default=",".join(Faults.KINDS),
        help=f"fault kinds in their rotation (default {','.join(Faults.KINDS)})",
    )
    parser.add_argument(
        "--cut-seconds", type=float, default=5.0, help="how long a database cut lasts (5)"
    )
    parser.add_argument(
        "--cancels",
        type=int,
        default=None,
        help="calls cancelled or timed out at random over the run (default 1,000 per minute)",
    )
    parser.add_argument(
        "--cancel-burst", type=int, default=1000, help="calls per cancel fault (default 1000)"
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="one more `serve` argument for every replica (repeatable)",
    )
    parser.add_argument("--log-dir", default="", help="server logs (default: a temporary dir)")
    parser.add_argument("--keep-database", action="store_true", help="do not drop the database")
    parser.add_argument("--output", default=str(OUTPUT), help=f"JSON report (default {OUTPUT})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="raptorflow-soak-")
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
