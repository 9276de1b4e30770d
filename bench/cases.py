"""The measured cases: what each one loads, and the command that serves it.

Every case is measured with the same load generator (`bench/load.py`), under
the same concurrency, in the same run, alternating with the others.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    name: str
    target: str
    """`grpc` (load workers call a server process) or `asyncpg` (one worker queries directly)."""
    summary: str
    command: str
    """How the thing under load runs, as a shell command (ports and URLs filled in per run)."""


ECHO = Case(
    name="echo",
    target="grpc",
    summary=(
        "Ceiling: a bare grpc.aio server on uvloop answering Select with the captured bytes "
        "of a real point-select response (same size), no database."
    ),
    command="python -m bench.echo --listen 127.0.0.1:PORT --response-file RESPONSE.bin",
)
"""The bare grpc.aio ceiling; its calls per second are the denominator of every ratio."""

SELECT = Case(
    name="select",
    target="grpc",
    summary=(
        "The service: Select on bench_items with filter id = <random existing id>, "
        "every column, page_size 1."
    ),
    command=(
        "python -m raptorflow.data.server serve --listen 127.0.0.1:PORT --database-url BENCH_DB_URL"
    ),
)
"""The service under test, started exactly as `raptorflow-data serve` runs (uvloop)."""

ASYNCPG = Case(
    name="asyncpg",
    target="asyncpg",
    summary=(
        "Informational ceiling: the same SQL the service compiles, run by N tasks in one "
        "uvloop process on an asyncpg pool of the service's size (10), no-op reset."
    ),
    command="python -m bench.load   (target asyncpg; one worker process, no gRPC)",
)
"""asyncpg alone: what one Python process can get out of PostgreSQL for this lookup."""

ALL = (ECHO, SELECT, ASYNCPG)
BY_NAME = {case.name: case for case in ALL}
