"""The leak watchdog: reclaims query-pool connections held longer than `leak_seconds`.

A call that keeps its connection past the limit (a bug, or a statement that
outlives any sensible deadline) would otherwise shrink the pool for good. The
watchdog terminates such a connection, which gives its slot back to the pool
at once, cancels its backend's query, and logs a WARNING naming the holder (the
RPC method, or the background task) and how long it held it. A hold is
reclaimed at the second check that finds it over the limit, so GetStatus lists
it (`held_connections`) for at least one check interval first. Sync snapshots
hold their connection on purpose for as long as the client reads, and say so
(`Database.connection(..., long_lived=True)`): they are never reclaimed.
"""

from __future__ import annotations

import logging

from raptorflow.data.server.db.activity import Hold
from raptorflow.data.server.db.connections import Database

log = logging.getLogger(__name__)


def check_interval(leak_seconds: float) -> float:
    """How often the watchdog looks: a quarter of the limit, at least every 0.2 s."""
    return max(0.2, leak_seconds / 4)


class LeakWatchdog:
    """Finds and reclaims leaked connections; counts them."""

    def __init__(self, database: Database, leak_seconds: float) -> None:
        self._database = database
        self.leak_seconds = leak_seconds
        self.reclaimed = 0
        """Connections reclaimed since the server started."""
        # Holds found over the limit by the previous check.
        self._suspects: set[Hold] = set()

    async def reclaim_once(self) -> int:
        """Reclaims connections over the limit at this check and the last; how many."""
        reclaimed = 0
        over = self._database.holds_over(self.leak_seconds)
        suspects, self._suspects = self._suspects, set(over)
        for hold in over:
            if hold not in suspects:
                continue  # listed in the status view until the next check
            self._suspects.discard(hold)
            held = hold.held_seconds()
            pid = await self._database.reclaim(hold)
            if pid is None:
                continue  # released while the watchdog was at an earlier one
            reclaimed += 1
            self.reclaimed += 1
            log.warning(
                "reclaimed a query-pool connection held %.1f s by %s (backend pid %d): "
                "its query was cancelled and its slot released",
                held,
                hold.holder,
                pid,
                extra={"holder": hold.holder, "held_seconds": round(held, 3), "backend_pid": pid},
            )
        return reclaimed
