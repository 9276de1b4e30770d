"""Turning rounds of measurements into medians, ratios, a table and bench/results/latest.json."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Measurement:
    """One case at one concurrency for one round."""

    case: str
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
    """CPU time of the load workers per call (gRPC cases)."""
    machine_cpu_busy: float
    """Fraction of all cores busy during the counted window (client, server, PostgreSQL)."""
    foreign_cpu_cores: float
    """Cores used meanwhile by processes outside this run (other jobs on the machine): noise."""
    first_error: str = ""
    ratio_to_echo: float | None = None


@dataclass
class Summary:
    """The medians of one case at one concurrency over all rounds."""

    case: str
    concurrency: int
    rounds: int
    rps_median: float
    rps_min: float
    rps_max: float
    p50_ms: float
    p99_ms: float
    ratio_to_echo: float | None
    """Median over rounds of rps / echo rps of the same round."""
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


def summarize(measurements: Sequence[Measurement], case_order: Sequence[str]) -> list[Summary]:
    echo = {(m.concurrency, m.round): m.rps for m in measurements if m.case == "echo"}
    for m in measurements:
        base = echo.get((m.concurrency, m.round))
        m.ratio_to_echo = m.rps / base if base else None
    keys = sorted(
        {(m.concurrency, m.case) for m in measurements},
        key=lambda k: (k[0], case_order.index(k[1])),
    )
    out = []
    for concurrency, case in keys:
        group = [m for m in measurements if m.case == case and m.concurrency == concurrency]
        ratios = [m.ratio_to_echo for m in group if m.ratio_to_echo is not None]
        cpu = [m.process_cpu_us_per_call for m in group if m.process_cpu_us_per_call is not None]
        client = [m.client_cpu_us_per_call for m in group if m.client_cpu_us_per_call is not None]
        out.append(
            Summary(
                case=case,
                concurrency=concurrency,
                rounds=len(group),
                rps_median=statistics.median(m.rps for m in group),
                rps_min=min(m.rps for m in group),
                rps_max=max(m.rps for m in group),
                p50_ms=statistics.median(m.p50_ms for m in group),
                p99_ms=statistics.median(m.p99_ms for m in group),
                ratio_to_echo=statistics.median(ratios) if ratios else None,
                process_cpu_us_per_call=statistics.median(cpu) if cpu else None,
                client_cpu_us_per_call=statistics.median(client) if client else None,
                machine_cpu_busy=statistics.median(m.machine_cpu_busy for m in group),
                foreign_cpu_cores=statistics.median(m.foreign_cpu_cores for m in group),
                errors=sum(m.errors for m in group),
                measurements=group,
            )
        )
    return out


def table(summaries: Sequence[Summary]) -> str:
    header = (
        f"{'case':<8} {'conc':>5} {'rps median':>11} {'rps min-max':>15} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'ratio/echo':>10} {'srv us/call':>11} {'cli us/call':>11} "
        f"{'machine cpu':>11} {'foreign':>7} {'errors':>6}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        ratio = f"{s.ratio_to_echo:.3f}" if s.ratio_to_echo is not None else "-"
        cpu = f"{s.process_cpu_us_per_call:.0f}" if s.process_cpu_us_per_call is not None else "-"
        client = f"{s.client_cpu_us_per_call:.0f}" if s.client_cpu_us_per_call is not None else "-"
        lines.append(
            f"{s.case:<8} {s.concurrency:>5} {s.rps_median:>11,.0f} "
            f"{f'{s.rps_min:,.0f}-{s.rps_max:,.0f}':>15} {s.p50_ms:>8.2f} {s.p99_ms:>8.2f} "
            f"{ratio:>10} {cpu:>11} {client:>11} {s.machine_cpu_busy:>10.0%} "
            f"{s.foreign_cpu_cores:>7.2f} {s.errors:>6}"
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
