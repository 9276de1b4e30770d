"""The whole benchmark suite in one run: unary calls, bulk insert, sync, backup, memory,
and a summary of every target of issue 6 with its measured ratio, pass or miss.

    make bench                                  # embedded PostgreSQL when DATABASE_URL is unset
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench.suite [--quick]

Runs each part as a child process of this one, one after the other (they would
share the two cores otherwise), each with its own fresh database on
DATABASE_URL's server and its own servers, and each writing its own JSON:

    unary   python -m bench         --output DIR/latest.json  unary RPCs vs bare echo, asyncpg
    bulk    python -m bench.bulk    --output DIR/bulk.json    Insert of 10,000 rows vs COPY
    sync    python -m bench.sync    --output DIR/sync.json    snapshot vs cursor and COPY out
    backup  python -m bench.backup  --output DIR/backup.json  ExportBackup/Restore vs pg_dump
    memory  python -m bench.memory  --output DIR/memory.json  server RSS over 100,000 calls

and, only when `--parts` names it, `followers` (python -m bench.followers
--output DIR/followers.json: 1,000 idle following streams). DIR is
bench/results unless `--results-dir` says otherwise. `--quick` is passed
to every part (fewer, shorter rounds of the same workloads, so the ratios
compare with a full run's). Then merges everything into DIR/suite.json: the
ratios by id, the targets with pass or miss, and each part's own document in
full; and prints the summary. A missed target does not fail the run; a part
that fails does (exit status 1), after the others have run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import report


@dataclass(frozen=True)
class Part:
    name: str
    module: str
    output: str
    """The part's JSON file in the results directory."""
    about: str
    default: bool = True
    """Whether a run without --parts includes it."""
    verdict_status: bool = False
    """Whether the part exits 1 for a missed target (a result, not a failure) when it
    has written its JSON."""


PARTS = (
    Part("unary", "bench", "latest.json", "unary RPCs next to a bare echo server and asyncpg"),
    Part("bulk", "bench.bulk", "bulk.json", "Insert of 10,000 rows next to copy_records_to_table"),
    Part("sync", "bench.sync", "sync.json", "Sync snapshot next to a cursor and COPY out"),
    Part("backup", "bench.backup", "backup.json", "ExportBackup/RestoreBackup next to pg_dump"),
    Part(
        "memory",
        "bench.memory",
        "memory.json",
        "the server's RSS over 100,000 point-select calls",
        verdict_status=True,
    ),
    Part(
        "followers",
        "bench.followers",
        "followers.json",
        "1,000 idle following sync streams: pool, backends, memory",
        default=False,
    ),
)
BY_NAME = {part.name: part for part in PARTS}


@dataclass(frozen=True)
class Target:
    """A target of issue 6 that is a ratio measured side by side."""

    ratio: str
    """The id of the ratio in suite.json's `ratios`."""
    title: str
    goal: float
    higher_is_better: bool = True

    def met(self, value: float) -> bool:
        return value >= self.goal if self.higher_is_better else value <= self.goal


TARGETS = (
    Target(
        "point_select_c32_rps_vs_echo",
        "point select RPCs/s at 32 callers over the bare echo server's",
        0.8,
    ),
    Target(
        "point_select_c32_p99_vs_echo",
        "point select p99 latency at 32 callers over the echo server's",
        1.5,
        higher_is_better=False,
    ),
    Target(
        "snapshot_vs_cursor",
        "Sync snapshot rows/s over an asyncpg cursor's (100,000 rows)",
        1.0,
    ),
    Target(
        "bulk_insert_vs_copy",
        "bulk Insert rows/s (client library) over copy_records_to_table's",
        0.5,
    ),
)


def memory_targets(parts: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's memory target, which is no ratio: bench.memory's and bench.followers'
    own verdicts, when they ran and gave one."""
    out = []
    memory = (parts.get("memory") or {}).get("result")
    if memory is not None:
        calls = memory.get("settings", {}).get("calls", 0)
        out.append(
            {
                "ratio": None,
                "title": f"server RSS flat over {calls:,} point-select calls (KiB grown)",
                "goal": memory.get("settings", {}).get("flat_mib", 0) * 1024,
                "higher_is_better": False,
                "value": memory.get("growth_after_warmup_kib"),
                "met": memory.get("flat"),
            }
        )
    else:
        out.append(_not_run("server RSS flat over a 100,000-call run", "python -m bench.memory"))
    followers = (parts.get("followers") or {}).get("result")
    verdict = next(
        (
            followers[k]
            for k in ("pass", "passed", "flat")
            if isinstance(followers, dict) and k in followers
        ),
        None,
    )
    if followers is not None and verdict is not None:
        out.append(
            {
                "ratio": None,
                "title": "1,000 idle followers: no pool connection held, RSS flat",
                "goal": None,
                "higher_is_better": True,
                "value": None,
                "met": bool(verdict),
            }
        )
    else:
        where = "see its own table" if followers is not None else "--parts ...,followers"
        out.append(
            _not_run(
                "1,000 idle followers hold no pool connection, RSS flat",
                f"python -m bench.followers ({where})",
            )
        )
    return out


def _not_run(title: str, where: str) -> dict[str, Any]:
    return {
        "ratio": None,
        "title": title,
        "goal": None,
        "higher_is_better": True,
        "value": None,
        "met": None,
        "where": where,
    }


# A part whose measurements ran beside other jobs using more than this many cores
# (median) is flagged as noisy: on 2 cores its ratios may be off by far more than
# the noise bands of bench/check.py.
NOISY_CORES = 0.25

# Ratios of one ceiling over another: they say how fast the ceilings are, not how
# the service does, so bench/check.py does not hold the service to them.
CEILING_RATIOS = frozenset(
    {"copy_out_vs_cursor", "bulk_unnest_vs_copy", "bulk_executemany_vs_copy"}
)

TITLES = {
    "bulk_insert_raw_vs_copy": "bulk Insert rows/s (raw stub, pre-serialized) over COPY's",
    "bulk_unnest_vs_copy": "asyncpg unnest INSERT (the service's SQL) over COPY (ceilings)",
    "bulk_executemany_vs_copy": "asyncpg executemany over COPY (ceilings)",
    "snapshot_vs_copy_out": "Sync snapshot rows/s over binary COPY out's",
    "columnbatch_vs_cursor": "cursor + ColumnBatch encoding over the bare cursor",
    "copy_out_vs_cursor": "binary COPY out over the cursor (ceilings)",
    "export_vs_pg_dump_custom": "ExportBackup rows/s over pg_dump -Fc's",
    "export_vs_pg_dump_plain": "ExportBackup rows/s over pg_dump -Fp's",
    "restore_vs_pg_restore": "RestoreBackup rows/s over pg_restore's",
    "restore_vs_psql": "RestoreBackup rows/s over psql -f's (plain dump)",
}


# The unary part's ratio ids: workload, callers, kind.
UNARY_RATIO = re.compile(r"(.+)_c(\d+)_(rps_vs_echo|rps_vs_asyncpg|p99_vs_echo)")


def higher_is_better(ratio: str) -> bool:
    """Whether a bigger value of this ratio is the better one (latency ratios are not)."""
    return not ratio.endswith("_p99_vs_echo")


def title(ratio: str) -> str:
    for target in TARGETS:
        if target.ratio == ratio:
            return target.title
    found = UNARY_RATIO.fullmatch(ratio)
    if found:
        what = {
            "rps_vs_echo": "RPCs/s over echo's",
            "rps_vs_asyncpg": "RPCs/s over asyncpg's",
            "p99_vs_echo": "p99 over echo's",
        }
        return f"{found[1]} at {found[2]} callers: {what[found[3]]}"
    return TITLES.get(ratio, ratio)


# -- gathering the ratios of each part -------------------------------------------------


def unary_ratios(doc: Mapping[str, Any]) -> dict[str, float]:
    """`<workload>_c<callers>_{rps_vs_echo,rps_vs_asyncpg,p99_vs_echo}` from bench's JSON."""
    out: dict[str, float] = {}
    entries = doc.get("ratios")
    if isinstance(entries, list):  # one entry per workload and concurrency
        for entry in entries:
            prefix = f"{entry['workload']}_c{entry['concurrency']}"
            for key, suffix in (
                ("ratio_to_echo", "rps_vs_echo"),
                ("ratio_to_asyncpg", "rps_vs_asyncpg"),
                ("p99_ratio_to_echo", "p99_vs_echo"),
            ):
                if entry.get(key) is not None:
                    out[f"{prefix}_{suffix}"] = float(entry[key])
        return out
    # The first layout: cases echo, select (the point select) and asyncpg.
    results = {(r["case"], r["concurrency"]): r for r in doc.get("results", [])}
    for (case, concurrency), summary in results.items():
        echo = results.get(("echo", concurrency))
        if case != "select" or echo is None:
            continue
        prefix = f"point_select_c{concurrency}"
        out[f"{prefix}_rps_vs_echo"] = float(summary["ratio_to_echo"])
        echo_p99 = {m["round"]: m["p99_ms"] for m in echo["measurements"]}
        out[f"{prefix}_p99_vs_echo"] = statistics.median(
            m["p99_ms"] / echo_p99[m["round"]] for m in summary["measurements"]
        )
    return out


def part_noise(name: str, doc: Mapping[str, Any]) -> dict[str, float] | None:
    """Median and max cores other jobs used while the part measured (bench/noise.py)."""
    if name != "unary":
        found = doc.get("foreign_cpu_cores")
        return dict(found) if isinstance(found, dict) else None
    cores = [
        m["foreign_cpu_cores"]
        for summary in doc.get("results", [])
        for m in summary.get("measurements", [])
        if m.get("foreign_cpu_cores") is not None
    ]
    return {"median": statistics.median(cores), "max": max(cores)} if cores else None


def noisy(suite_doc: Mapping[str, Any]) -> list[str]:
    """The parts that measured while other jobs used more than NOISY_CORES (median)."""
    return [
        name
        for name, part in suite_doc["parts"].items()
        if part.get("foreign_cpu_cores") and part["foreign_cpu_cores"]["median"] > NOISY_CORES
    ]


def part_ratios(name: str, doc: Mapping[str, Any]) -> dict[str, float]:
    if name == "unary":
        return unary_ratios(doc)
    return {key: float(value) for key, value in doc.get("ratios", {}).items()}


# -- running ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="every part's --quick (a few minutes in all)"
    )
    parser.add_argument(
        "--parts",
        default=",".join(p.name for p in PARTS if p.default),
        help=f"comma-separated subset of {','.join(BY_NAME)} "
        f"(default {','.join(p.name for p in PARTS if p.default)})",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=report.RESULTS,
        help="where each part's JSON and suite.json go (default bench/results)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="run nothing: merge the parts' JSON already in the results directory "
        "(say, after running one part again by hand) into suite.json",
    )
    parser.add_argument(
        "--part-args",
        action="append",
        default=[],
        metavar="PART=ARGS",
        help='more arguments for one part, e.g. unary="--concurrency 1,32,256" (repeatable)',
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or not names:
        parser.error(f"the parts are {', '.join(BY_NAME)}")
    args.parts = [BY_NAME[n] for n in names]
    extra: dict[str, list[str]] = {}
    for item in args.part_args:
        name, sep, text = item.partition("=")
        if not sep or name not in BY_NAME:
            parser.error(f"--part-args takes PART=ARGS with PART one of {', '.join(BY_NAME)}")
        extra.setdefault(name, []).extend(shlex.split(text))
    args.part_args = extra
    return args


def command(part: Part, output: Path, quick: bool, extra: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        part.module,
        "--output",
        str(output),
        *(["--quick"] if quick else []),
        *extra,
    ]


def run_part(part: Part, argv: list[str]) -> tuple[int, float]:
    """Runs one part with this terminal as its stdout and stderr; its status and seconds."""
    print(f"\n=== {part.name}: {part.about}\n$ {shlex.join(argv)}", file=sys.stderr, flush=True)
    started = time.monotonic()
    status = subprocess.run(argv, check=False).returncode
    return status, time.monotonic() - started


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def summary_table(doc: Mapping[str, Any]) -> str:
    """Every target with pass or miss, then the other ratios, the figures and the noise."""
    ratios: dict[str, float] = doc["ratios"]
    lines = [
        f"issue 6 targets ({'quick run, ' if doc['settings']['quick'] else ''}"
        f"{doc['machine']['cpus']} cpus, {doc['machine']['cpu_model']}, "
        f"commit {doc['git_commit'][:12]}{' dirty' if doc['git_dirty'] else ''}):",
        f"  {'target':66} {'goal':>7} {'measured':>9}  result",
    ]
    for target in doc["targets"]:
        goal = (
            ""
            if target["goal"] is None
            else f"{'>=' if target['higher_is_better'] else '<='} {target['goal']:g}"
        )
        result = {True: "pass", False: "MISS", None: "not measured"}[target["met"]]
        if target.get("where"):
            result += f": {target['where']}"
        value = target["value"]
        shown = _value(value) if target["ratio"] or value is None else f"{value:,.0f}"
        lines.append(f"  {target['title']:66} {goal:>7} {shown:>9}  {result}")
    unary: dict[tuple[str, int], dict[str, float]] = {}
    others = []
    for ratio, value in ratios.items():
        found = UNARY_RATIO.fullmatch(ratio)
        if found:
            unary.setdefault((found[1], int(found[2])), {})[found[3]] = value
        elif ratio not in {t.ratio for t in TARGETS}:
            others.append(ratio)
    if unary:
        lines.append(
            "unary workloads, the service over its ceilings (medians of per-round ratios):"
        )
        lines.append(
            f"  {'workload':16} {'callers':>7} {'rps/echo':>9} {'rps/asyncpg':>12} {'p99/echo':>9}"
        )
        for (workload, callers), kinds in unary.items():
            cells = [
                _value(kinds.get(kind)).rjust(width)
                for kind, width in (("rps_vs_echo", 9), ("rps_vs_asyncpg", 12), ("p99_vs_echo", 9))
            ]
            lines.append(f"  {workload:16} {callers:>7} " + " ".join(cells))
    if others:
        lines.append(
            "bulk, sync and backup (informational): the service over a ceiling, "
            "or two ceilings where marked"
        )
        lines.extend(f"  {title(r):66} {'':>7} {_value(ratios[r]):>9}" for r in others)
    sync_doc = (doc["parts"].get("sync") or {}).get("result") or {}
    delivery = sync_doc.get("commit_to_delivery")
    if delivery:
        lines.append(
            f"sync commit to delivery: median {delivery['median_ms']:.2f} ms, "
            f"p99 {delivery['p99_ms']:.2f} ms"
        )
    loads = [
        f"{name} {p['foreign_cpu_cores']['median']:.2f}/{p['foreign_cpu_cores']['max']:.2f}"
        for name, p in doc["parts"].items()
        if p.get("foreign_cpu_cores")
    ]
    if loads:
        lines.append("cores other jobs used while measuring (median/max): " + ", ".join(loads))
    if noisy(doc):
        lines.append(
            f"NOISY: {', '.join(noisy(doc))} measured beside other jobs using more than "
            f"{NOISY_CORES} cores (median); their ratios are not to be trusted"
        )
    failed = [name for name, p in doc["parts"].items() if p["failed"]]
    if failed:
        lines.append(f"FAILED parts: {', '.join(failed)} (their ratios are missing)")
    lines.append("(ratios drift from run to run: bench/check.py's BANDS are the measured noise)")
    return "\n".join(lines)


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the parts, writes suite.json and returns it."""
    results_dir: Path = args.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    parts: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    first_doc: dict[str, Any] | None = None
    started = time.monotonic()
    for part in args.parts:
        output = results_dir / part.output
        argv = command(part, output, args.quick, args.part_args.get(part.name, []))
        if args.merge:
            status, seconds = (0 if output.exists() else 1), 0.0
        else:
            # A stale file must not pass for this run's result.
            output.unlink(missing_ok=True)
            status, seconds = run_part(part, argv)
        # A part failed when it wrote nothing, or exited non-zero for another reason
        # than a verdict (bench.memory exits 1 when the RSS grew).
        failed = not output.exists() or (status != 0 and not part.verdict_status)
        doc: dict[str, Any] | None = None
        if not failed:
            doc = json.loads(output.read_text())
            ratios.update(part_ratios(part.name, doc))
            first_doc = first_doc or doc
        parts[part.name] = {
            "command": shlex.join(argv),
            "output": str(output),
            "exit_status": status,
            "failed": failed,
            "seconds": round(seconds, 1),
            "foreign_cpu_cores": part_noise(part.name, doc) if doc else None,
            "result": doc,
        }
    run = first_doc or report.run_info("")
    targets = []
    for target in TARGETS:
        value = ratios.get(target.ratio)
        targets.append(
            {
                "ratio": target.ratio,
                "title": target.title,
                "goal": target.goal,
                "higher_is_better": target.higher_is_better,
                "value": value,
                "met": None if value is None else target.met(value),
            }
        )
    targets.extend(memory_targets(parts))
    suite = {
        **report.run_info(run.get("machine", {}).get("postgresql", "")),
        "settings": {
            "quick": args.quick,
            "parts": [p.name for p in args.parts],
            "seconds": round(time.monotonic() - started, 1),
        },
        "targets": targets,
        "ratios": ratios,
        "parts": parts,
    }
    report.write(report.rounded(suite), results_dir / "suite.json")
    return suite


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.merge and not os.environ.get("DATABASE_URL"):
        print("error: set DATABASE_URL (or run `make bench`)", file=sys.stderr)
        return 2
    suite = run_suite(args)
    print()
    print(summary_table(suite))
    print(f"\nwrote {args.results_dir / 'suite.json'}", file=sys.stderr)
    return 1 if any(p["failed"] for p in suite["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
