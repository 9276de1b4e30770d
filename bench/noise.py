"""How much CPU other jobs on the machine used while a benchmark measured: the noise flag.

A measurement on a shared 2-core machine is only worth its ratio when little
else ran beside it. `Window` reads the CPU time of every process in /proc at
the start and end of a measured window, leaves out this process, its
descendants (the servers, pg_dump) and the backends of the benchmark's
database, and turns the rest into cores used. Processes that both start and
end inside the window are missed, and PostgreSQL's own background processes
(checkpointer, WAL writer, autovacuum) count as foreign even when this run
made their work, so the figure is a flag for noisy rounds, not an account.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _processes() -> dict[int, tuple[int, float, bytes]]:
    """Every process: pid -> (parent pid, CPU seconds, title)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            title = (entry / "cmdline").read_bytes()
        except OSError:  # it ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # After the command name: ppid is field 4, utime 14, stime 15 (1-based, man proc).
        cpu = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        out[int(entry.name)] = (int(fields[1]), cpu, title)
    return out


def _ours(processes: dict[int, tuple[int, float, bytes]], database: str) -> set[int]:
    """This process, its descendants, and the backends of `database`."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    ours = set()
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        ours.add(pid)
        todo.extend(children.get(pid, ()))
    marker = f" {database} ".encode()
    for pid, (_, _, title) in processes.items():
        if title.startswith(b"postgres:") and marker in title:
            ours.add(pid)
    return ours


class Window:
    """Foreign CPU over one measured window: `start()`, then `cores()` at its end."""

    def __init__(self, database: str) -> None:
        self.database = database
        self._before: dict[int, float] = {}
        self._started = 0.0

    def start(self) -> None:
        processes = _processes()
        ours = _ours(processes, self.database)
        self._before = {pid: cpu for pid, (_, cpu, _) in processes.items() if pid not in ours}
        self._started = time.monotonic()

    def cores(self) -> float:
        """Cores the other processes used on average since `start()`."""
        elapsed = time.monotonic() - self._started
        processes = _processes()
        ours = _ours(processes, self.database)
        used = 0.0
        for pid, (_, cpu, _) in processes.items():
            if pid not in ours:
                # A process new since the start ran all its CPU time inside the window.
                used += cpu - self._before.get(pid, 0.0)
        return max(0.0, used / elapsed) if elapsed > 0 else 0.0
