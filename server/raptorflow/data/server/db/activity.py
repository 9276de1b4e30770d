"""What the database edge records about its own use, for the status view and the watchdog.

Who holds which query-pool connection (`Hold`, attributed through
`current_caller`), statements slower than the threshold (`SlowStatement`), the
latest database check and the pool's figures. Plain data: `connections.py`
records it, `observability/` reads it; no gRPC here.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    from raptorflow.data.server.db.connections import Connection


# Who a connection is acquired for: the RPC method, set per call by the RPC
# interceptor (observability/interceptor.py). Empty outside a call; then the
# asyncio task's name stands in. A plain string, so this layer needs no gRPC.
current_caller: contextvars.ContextVar[str] = contextvars.ContextVar(
    "raptorflow_current_caller", default=""
)


def caller_name() -> str:
    """The RPC method this code runs for, or the name of its asyncio task."""
    caller = current_caller.get()
    if caller:
        return caller
    task = asyncio.current_task()
    return task.get_name() if task is not None else "unknown"


class Hold:
    """One acquisition of a query-pool connection, from acquire until release or reclaim."""

    __slots__ = ("acquired_at", "connection", "holder", "long_lived", "reclaimed")

    def __init__(self, holder: str, connection: Connection, long_lived: bool) -> None:
        self.holder = holder
        """The RPC method or background task that holds it."""
        self.connection = connection
        self.acquired_at = time.monotonic()
        """When it was acquired, on the monotonic clock."""
        self.long_lived = long_lived
        """Held on purpose for as long as a stream runs: never counted as a leak."""
        self.reclaimed = False
        """The leak watchdog took it back; the holder must not release it again."""

    def held_seconds(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.acquired_at

    def acquire_time(self) -> float:
        """When it was acquired, as a Unix time."""
        return time.time() - self.held_seconds()

    def backend_pid(self) -> int:
        """The PostgreSQL backend of the connection; 0 once it is no longer held."""
        try:
            return int(self.connection.get_server_pid())
        except (asyncpg.InterfaceError, AttributeError):
            return 0


@dataclass(frozen=True)
class SlowStatement:
    """A statement that ran at least `slow_query_seconds`: its text, never its values."""

    statement: str
    """The SQL text with its $n placeholders, at most `MAX_STATEMENT_CHARS` characters."""
    caller: str
    """The RPC method (or background task) it ran for."""
    seconds: float
    end_time: float
    """When it ended, as a Unix time."""
    sqlstate: str
    """The SQLSTATE it failed with; empty if it succeeded (or failed without one)."""


@dataclass(frozen=True)
class DatabaseCheck:
    """The outcome of the latest check on the session connection."""

    reachable: bool
    seconds: float
    """How long the check took (including a reconnect, if it needed one)."""
    check_time: float
    """When it ran, as a Unix time."""
    server_version: str
    """PostgreSQL's server_version, read once per session connection; empty until known."""


@dataclass(frozen=True)
class PoolSnapshot:
    """The query pool's figures at one moment."""

    size: int
    in_use: int
    idle: int
    waiting: int
    max_size: int


MAX_STATEMENT_CHARS = 1000
