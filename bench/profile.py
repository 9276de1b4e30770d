"""Where the service's CPU time goes under a workload's load: per-thread CPU and py-spy samples.

    python -m bench --cases point_select --profile /tmp/select.txt [--profile-native]

Two views of the same window:

- Per-thread CPU from /proc (exact, no overhead): the event-loop thread that
  runs every Python handler, the gRPC completion-queue poller thread, and
  gRPC core's `event_engine` threads, in CPU microseconds per call.
- py-spy samples of the event-loop thread (`py-spy record --nonblocking
  --format raw`, collapsed stacks that speedscope or flamegraph.pl read). Each
  sample is put in the layer of its innermost frame that belongs to one (so
  asyncio code called by asyncpg counts as asyncpg). Without `--native`,
  Cython and C code (uvloop, the grpc.aio server loop in cygrpc, asyncpg's
  protocol, upb) has no Python frame and shows up as "event loop + C/Cython";
  `--profile-native` splits that part too, but py-spy then stops the process
  for every sample and the service slows several times over.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

# (layer, pattern on the frame's file or function): the first match, innermost first, wins.
LAYERS: Sequence[tuple[str, re.Pattern[str]]] = (
    ("value encoding (db/values.py)", re.compile(r"server/db/values\.py")),
    (
        "SQL compiler, catalog, page tokens",
        re.compile(r"server/db/(compiler|catalog|page_tokens)\.py"),
    ),
    ("pool wrapper (db/connections.py)", re.compile(r"server/db/connections\.py")),
    ("memory store (memory/)", re.compile(r"server/memory/")),
    ("servicer + error wrapper", re.compile(r"server/services/")),
    ("auth and observability interceptors", re.compile(r"server/(auth|observability)/")),
    ("asyncpg", re.compile(r"asyncpg/|\((protocol|pgproto|recordobj|record)\.c[:)]")),
    ("protobuf (upb)", re.compile(r"_message\.abi3|google/protobuf/")),
    ("gRPC (cygrpc, grpc.aio)", re.compile(r"grpc/")),
    ("uvloop", re.compile(r"uvloop/|\((loop|core|linux|stream|timer|handle)\.c[:)]")),
)
UNATTRIBUTED = "event loop + C/Cython (no Python frame)"

# Inclusive time of these frames of the event-loop thread (function name prefix, file part).
INCLUSIVE: Sequence[tuple[str, str, str]] = (
    ("the call below grpc.aio (interceptors + handler)", "_coroutine.", "observability/"),
    ("WorkspaceServicer.* (all of our handler)", "WorkspaceServicer.", "services/"),
    ("MemorySyncServicer.* (all of our handler)", "MemorySyncServicer.", "services/"),
    ("  CatalogCache.table", "CatalogCache.table ", "db/catalog.py"),
    ("  compile_* (SQL compiler)", "compile_", "db/compiler.py"),
    ("  MemoryStore.* (validation, arguments, results)", "MemoryStore.", "memory/store.py"),
    ("  Database.workspace_connection (BEGIN, COMMIT)", "Database.workspace_connection ", "db/"),
    ("  Database.connection (acquire + release)", "Database.connection ", "db/connections.py"),
    ("    asyncpg Pool.acquire / release", "Pool.", "asyncpg/pool.py"),
    ("  asyncpg Connection.fetch*", "Connection.fetch", "asyncpg/connection.py"),
    ("  asyncpg Connection.execute", "Connection.execute ", "asyncpg/connection.py"),
    ("    asyncio.timeout (fetch timeout=)", "timeout ", "asyncio/timeouts.py"),
    ("  encode_rows", "encode_rows ", "db/values.py"),
    ("    values.setter (per call)", "setter ", "db/values.py"),
)


def _frame_file(frame: str) -> str:
    match = re.search(r"\(([^()]*)\)$", frame)
    return match.group(1) if match else frame


def _is_idle(frames: Sequence[str]) -> bool:
    # Native stacks end in the wait itself when py-spy cannot tell idleness.
    return bool(frames) and frames[-1].split(" ", 1)[0] in {"epoll_wait", "epoll_pwait"}


def read_collapsed(text: str) -> list[tuple[list[str], int]]:
    samples = []
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if stack and count.isdigit():
            samples.append((stack.split(";"), int(count)))
    return samples


def _layer(frames: Sequence[str]) -> str:
    for frame in reversed(frames):
        if frame.startswith("Runner.run ") and "asyncio/runners.py" in frame:
            return UNATTRIBUTED
        for name, pattern in LAYERS:
            if pattern.search(frame):
                return name
    return UNATTRIBUTED


def summarize_samples(samples: Iterable[tuple[list[str], int]]) -> str:
    threads: collections.Counter[str] = collections.Counter()
    layers: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    main_total = 0
    for frames, count in samples:
        if _is_idle(frames):
            threads["idle (waiting in epoll)"] += count
            continue
        if any(f.startswith("Thread.run ") for f in frames):
            threads["other threads (gRPC poller)"] += count
            continue
        threads["event-loop thread"] += count
        main_total += count
        layers[_layer(frames)] += count
        for label, prefix, file_part in INCLUSIVE:
            if any(f.startswith(prefix) and file_part in _frame_file(f) for f in frames):
                inclusive[label] += count
    total = sum(threads.values())
    lines = [f"py-spy samples: {total} (busy samples only unless marked idle)"]
    lines += [f"  {share(n, total)}  {name}" for name, n in threads.most_common()]
    lines.append(f"event-loop thread by layer (innermost frame that belongs to one), {main_total}:")
    lines += [f"  {share(n, main_total)}  {name}" for name, n in layers.most_common()]
    lines.append(
        "event-loop thread, inclusive time of our call path (lower bounds: a nonblocking"
        " sample can miss outer frames, and the shielded release runs as a task of its own):"
    )
    lines += [f"  {share(inclusive[label], main_total)}  {label}" for label, _, _ in INCLUSIVE]
    return "\n".join(lines)


def summarize_file(path: Path) -> str:
    return summarize_samples(read_collapsed(path.read_text()))


def share(part: float, whole: float) -> str:
    return f"{part / whole:6.1%}" if whole else "     -"


def summarize_threads(
    title: str, pid: int, before: Mapping[str, float], after: Mapping[str, float], calls: int
) -> str:
    """CPU per call of each group of threads, from two `thread_cpu_seconds` readings."""
    groups: collections.defaultdict[str, float] = collections.defaultdict(float)
    for key, seconds in after.items():
        name, tid = key.rsplit(":", 1)
        used = seconds - before.get(key, 0.0)
        if int(tid) == pid:
            groups["event-loop thread (all Python handlers)"] += used
        elif name.startswith("event_engine"):
            groups["gRPC core event_engine threads"] += used
        elif name.startswith("python"):
            groups["gRPC completion-queue poller thread"] += used
        else:
            groups[f"other ({name})"] += used
    total = sum(groups.values())
    lines = [f"{title}: CPU per call by thread (/proc), {calls} calls"]
    for name, used in sorted(groups.items(), key=lambda item: -item[1]):
        per_call = used / calls * 1e6 if calls else 0.0
        lines.append(f"  {per_call:7.1f} us  {share(used, total)}  {name}")
    per_call_total = total / calls * 1e6 if calls else 0.0
    lines.append(f"  {per_call_total:7.1f} us  total")
    return "\n".join(lines)


async def record(pid: int, path: Path, seconds: float, *, native: bool = False) -> str:
    """Runs py-spy on `pid` for `seconds`, writing collapsed stacks to `path`.

    Returns "" on success, otherwise what went wrong (py-spy missing, ptrace refused...).
    """
    py_spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if not py_spy:
        return "py-spy is not installed: .venv/bin/pip install py-spy"
    command = [
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        # Native sampling stops the process for each sample: sample less often.
        "50" if native else "200",
        "--format",
        "raw",
        "--output",
        str(path),
    ]
    command += ["--native"] if native else ["--nonblocking"]
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        text = output.decode(errors="replace").strip()
        return f"py-spy failed after {time.monotonic() - started:.0f} s: {text[-2000:]}"
    return ""
