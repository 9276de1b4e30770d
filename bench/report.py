"""Turning rounds of measurements into medians, ratios, a table and bench/results/latest.json."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Measurement:
    """One target of one workload at one concurrency for one round."""

    case: str
    """`<workload>.<target>`, such as `point_select.service` or `count.echo`."""
    workload: str
    target: str
    """`service`, `echo` or `asyncpg`."""
    concurrency: int
    round: int
    calls: int
    errors: int
    duration: float
    rps: float
    p50_ms: float
    p99_ms: float
    process_cpu_us_per_call: float | None
    """CPU time of the process doing the work (the server; for asyncpg the worker) per call."""
    client_cpu_us_per_call: float | None
    """CPU time of the load workers per call (gRPC targets)."""
    machine_cpu_busy: float
    """Fraction of all cores busy during the counted window (client, server, PostgreSQL)."""
    foreign_cpu_cores: float
    """Cores used meanwhile by processes outside this run (other jobs on the machine): noise."""
    first_error: str = ""
    ratio_to_echo: float | None = None
    """rps / the same workload's echo rps in the same round."""
    ratio_to_asyncpg: float | None = None
    """rps / the same workload's asyncpg rps in the same round."""
    p99_ratio_to_echo: float | None = None
    """p99 / the same workload's echo p99 in the same round."""


@dataclass
class Summary:
    """The medians of one target of one workload at one concurrency over all rounds."""

    case: str
    workload: str
    target: str
    concurrency: int
    rounds: int
    rps_median: float
    rps_min: float
    rps_max: float
    p50_ms: float
    p99_ms: float
    ratio_to_echo: float | None
    """Median over rounds of rps / echo rps of the same workload and round."""
    ratio_to_asyncpg: float | None
    """Median over rounds of rps / asyncpg rps of the same workload and round."""
    p99_ratio_to_echo: float | None
    """Median over rounds of p99 / echo p99 of the same workload and round."""
    process_cpu_us_per_call: float | None
    client_cpu_us_per_call: float | None
    machine_cpu_busy: float
    foreign_cpu_cores: float
    errors: int
    measurements: list[Measurement] = field(default_factory=list)


def percentile(sorted_values: Sequence[int], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values; 0 when there are none."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return float(sorted_values[rank])


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(numerator: float, denominator: float | None) -> float | None:
    return numerator / denominator if denominator else None


def summarize(
    measurements: Sequence[Measurement],
    workload_order: Sequence[str],
    target_order: Sequence[str],
) -> list[Summary]:
    """Medians per (workload, concurrency, target), ratios taken round by round first."""
    same_round = {(m.workload, m.concurrency, m.round, m.target): m for m in measurements}
    for m in measurements:
        echo = same_round.get((m.workload, m.concurrency, m.round, "echo"))
        ceiling = same_round.get((m.workload, m.concurrency, m.round, "asyncpg"))
        m.ratio_to_echo = _ratio(m.rps, echo.rps if echo else None)
        m.ratio_to_asyncpg = _ratio(m.rps, ceiling.rps if ceiling else None)
        m.p99_ratio_to_echo = _ratio(m.p99_ms, echo.p99_ms if echo else None)
    keys = sorted(
        {(m.workload, m.concurrency, m.target) for m in measurements},
        key=lambda k: (workload_order.index(k[0]), k[1], target_order.index(k[2])),
    )
    out = []
    for workload, concurrency, target in keys:
        group = [
            m
            for m in measurements
            if (m.workload, m.concurrency, m.target) == (workload, concurrency, target)
        ]
        out.append(
            Summary(
                case=group[0].case,
                workload=workload,
                target=target,
                concurrency=concurrency,
                rounds=len(group),
                rps_median=statistics.median(m.rps for m in group),
                rps_min=min(m.rps for m in group),
                rps_max=max(m.rps for m in group),
                p50_ms=statistics.median(m.p50_ms for m in group),
                p99_ms=statistics.median(m.p99_ms for m in group),
                ratio_to_echo=_median(m.ratio_to_echo for m in group),
                ratio_to_asyncpg=_median(m.ratio_to_asyncpg for m in group),
                p99_ratio_to_echo=_median(m.p99_ratio_to_echo for m in group),
                process_cpu_us_per_call=_median(m.process_cpu_us_per_call for m in group),
                client_cpu_us_per_call=_median(m.client_cpu_us_per_call for m in group),
                machine_cpu_busy=statistics.median(m.machine_cpu_busy for m in group),
                foreign_cpu_cores=statistics.median(m.foreign_cpu_cores for m in group),
                errors=sum(m.errors for m in group),
                measurements=group,
            )
        )
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(summaries: Sequence[Summary], descriptions: Mapping[str, str] | None = None) -> str:
    """One block per workload and concurrency: the service next to its ceilings."""
    header = (
        f"  {'target':<8} {'rps median':>11} {'rps min-max':>15} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'/echo':>6} {'/asyncpg':>8} {'p99/echo':>8} {'srv us/call':>11} "
        f"{'cli us/call':>11} {'machine cpu':>11} {'foreign':>7} {'errors':>6}"
    )
    lines: list[str] = []
    block: tuple[str, int] | None = None
    for s in summaries:
        if (s.workload, s.concurrency) != block:
            block = (s.workload, s.concurrency)
            if lines:
                lines.append("")
            about = (descriptions or {}).get(s.workload, "")
            lines.append(
                f"{s.workload} at {s.concurrency} callers" + (f": {about}" if about else "")
            )
            lines.extend([header, "  " + "-" * (len(header) - 2)])
        lines.append(
            f"  {s.target:<8} {s.rps_median:>11,.0f} "
            f"{f'{s.rps_min:,.0f}-{s.rps_max:,.0f}':>15} {s.p50_ms:>8.2f} {s.p99_ms:>8.2f} "
            f"{_fmt(s.ratio_to_echo, '.3f'):>6} {_fmt(s.ratio_to_asyncpg, '.3f'):>8} "
            f"{_fmt(s.p99_ratio_to_echo, '.2f'):>8} "
            f"{_fmt(s.process_cpu_us_per_call, '.0f'):>11} "
            f"{_fmt(s.client_cpu_us_per_call, '.0f'):>11} {s.machine_cpu_busy:>10.0%} "
            f"{s.foreign_cpu_cores:>7.2f} {s.errors:>6}"
        )
    return "\n".join(lines)


def ratios(summaries: Sequence[Summary]) -> list[dict[str, Any]]:
    """The service's figures next to its ceilings', one entry per workload and concurrency."""
    by_key = {(s.workload, s.concurrency, s.target): s for s in summaries}
    out = []
    for s in summaries:
        if s.target != "service":
            continue
        echo = by_key.get((s.workload, s.concurrency, "echo"))
        ceiling = by_key.get((s.workload, s.concurrency, "asyncpg"))
        out.append(
            {
                "workload": s.workload,
                "concurrency": s.concurrency,
                "service_rps": s.rps_median,
                "echo_rps": echo.rps_median if echo else None,
                "asyncpg_rps": ceiling.rps_median if ceiling else None,
                "ratio_to_echo": s.ratio_to_echo,
                "ratio_to_asyncpg": s.ratio_to_asyncpg,
                "service_p99_ms": s.p99_ms,
                "echo_p99_ms": echo.p99_ms if echo else None,
                "p99_ratio_to_echo": s.p99_ratio_to_echo,
                "errors": s.errors + sum(x.errors for x in (echo, ceiling) if x is not None),
            }
        )
    return out


def ratio_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary: one line per workload and concurrency."""
    header = (
        f"{'workload':<14} {'conc':>5} {'service rps':>11} {'echo rps':>9} {'asyncpg rps':>11} "
        f"{'svc/echo':>8} {'svc/asyncpg':>11} {'p99 svc ms':>10} {'p99 echo ms':>11} "
        f"{'p99/echo':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['workload']:<14} {r['concurrency']:>5} {r['service_rps']:>11,.0f} "
            f"{_fmt(r['echo_rps'], ',.0f'):>9} {_fmt(r['asyncpg_rps'], ',.0f'):>11} "
            f"{_fmt(r['ratio_to_echo'], '.3f'):>8} {_fmt(r['ratio_to_asyncpg'], '.3f'):>11} "
            f"{r['service_p99_ms']:>10.2f} {_fmt(r['echo_p99_ms'], '.2f'):>11} "
            f"{_fmt(r['p99_ratio_to_echo'], '.2f'):>8}"
        )
    return "\n".join(lines)


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def machine_info(postgres_version: str) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": postgres_version,
        "packages": {name: _version(name) for name in ("grpcio", "protobuf", "asyncpg", "uvloop")},
    }


def run_info(postgres_version: str) -> dict[str, Any]:
    """What every results document starts with: when, at which commit, on which machine."""
    status = _git("status", "--porcelain", "--", "server", "stubs")
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status),
        "machine": machine_info(postgres_version),
    }


def document(
    summaries: Sequence[Summary], settings: dict[str, Any], postgres_version: str
) -> dict[str, Any]:
    return {
        **run_info(postgres_version),
        "settings": settings,
        "ratios": rounded(ratios(summaries)),
        "results": [rounded(asdict(s)) for s in summaries],
    }


def rounded(value: Any) -> Any:
    """`value` with every float in it rounded to 4 places (the JSON stays readable)."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def write(doc: dict[str, Any], path: Path) -> None:
    """Writes through a temporary file (ignored by git), so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
