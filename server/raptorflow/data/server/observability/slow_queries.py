"""The slowest recent statements over the slow-query threshold (at most `LIMIT`).

`Database` reports each query-pool statement that ran at least
`slow_query_seconds` (its SQL text with $n placeholders, never its values; the
workspace id of a transaction's BEGIN script shows as `$workspace`);
this keeps the slowest `LIMIT` of those that ended within the latency window.
"""

from __future__ import annotations

import time

from raptorflow.data.server.db.activity import SlowStatement

LIMIT = 50


class SlowQueries:
    """The slowest `LIMIT` statements that ended in the last `window_seconds`."""

    def __init__(self, window_seconds: float) -> None:
        self._window = window_seconds
        self._kept: list[SlowStatement] = []
        self.total = 0
        """Slow statements seen since start (exported as a counter)."""

    def add(self, statement: SlowStatement) -> None:
        self.total += 1
        self._expire()
        kept = self._kept
        if len(kept) < LIMIT:
            kept.append(statement)
            return
        fastest = min(range(len(kept)), key=lambda i: kept[i].seconds)
        if statement.seconds > kept[fastest].seconds:
            kept[fastest] = statement

    def slowest(self) -> list[SlowStatement]:
        """Slowest first."""
        self._expire()
        return sorted(self._kept, key=lambda s: s.seconds, reverse=True)

    def _expire(self) -> None:
        oldest = time.time() - self._window
        if any(s.end_time < oldest for s in self._kept):
            self._kept = [s for s in self._kept if s.end_time >= oldest]
