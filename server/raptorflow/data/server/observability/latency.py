"""Recent figures in bounded memory: RPC latency percentiles and peaks over a sliding window.

The window is cut into `SLICES` time slices. Each method keeps, per slice, a
call count, an error count, the slowest call and a histogram whose bucket edges
grow by `GROWTH` (4 %), so any percentile is exact to within 4 % however many
calls there were, and recording a call costs one logarithm and a few integer
additions. Slices older than the window are dropped as new ones start.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

SLICES = 30
GROWTH = 1.04
# Durations at or under FLOOR seconds share the lowest bucket.
FLOOR = 1e-5
_INV_FLOOR = 1 / FLOOR
_INV_LOG_GROWTH = 1 / math.log(GROWTH)


def bucket_of(seconds: float) -> int:
    """The histogram bucket of a duration: bucket b holds (FLOOR*GROWTH**b, FLOOR*GROWTH**(b+1)]."""
    if seconds <= FLOOR:
        return 0
    return int(math.log(seconds * _INV_FLOOR) * _INV_LOG_GROWTH)


def bucket_upper(bucket: int) -> float:
    return FLOOR * GROWTH ** (bucket + 1)


@dataclass(frozen=True)
class LatencySummary:
    """One method's calls in the window."""

    count: int
    errors: int
    p50: float
    p90: float
    p99: float
    max: float
    """Seconds, like the percentiles."""


class _Slice:
    __slots__ = ("buckets", "count", "errors", "index", "max")

    def __init__(self, index: int) -> None:
        self.index = index
        self.count = 0
        self.errors = 0
        self.max = 0.0
        self.buckets: dict[int, int] = {}


class SliceClock:
    """Maps monotonic times to slice numbers of a window."""

    def __init__(self, window_seconds: float) -> None:
        self.window_seconds = window_seconds
        self.slice_seconds = window_seconds / SLICES
        self._inv = 1 / self.slice_seconds

    def index(self, now: float) -> int:
        return int(now * self._inv)

    def oldest(self, now: float) -> int:
        """The oldest slice still (partly) in the window ending at `now`."""
        return self.index(now) - SLICES + 1


class MethodWindow:
    """Latency of one RPC method over the window."""

    __slots__ = ("_clock", "_current", "_slices")

    def __init__(self, clock: SliceClock) -> None:
        self._clock = clock
        self._current = _Slice(-1)
        self._slices: deque[_Slice] = deque(maxlen=SLICES)

    def add(self, seconds: float, error: bool, now: float) -> None:
        """Records one call that ended at `now` (monotonic) after `seconds`."""
        current = self._current
        index = self._clock.index(now)
        if current.index != index:
            current = self._current = _Slice(index)
            self._slices.append(current)
        current.count += 1
        if error:
            current.errors += 1
        current.max = max(current.max, seconds)
        bucket = bucket_of(seconds)
        buckets = current.buckets
        buckets[bucket] = buckets.get(bucket, 0) + 1

    def summary(self, now: float) -> LatencySummary | None:
        """The window ending at `now`; None when no call ended in it."""
        oldest = self._clock.oldest(now)
        # A copy first: the metrics endpoint reads from another thread.
        recent = [s for s in list(self._slices) if s.index >= oldest]
        count = sum(s.count for s in recent)
        if count == 0:
            return None
        merged: dict[int, int] = {}
        for s in recent:
            for bucket, n in list(s.buckets.items()):
                merged[bucket] = merged.get(bucket, 0) + n
        slowest = max(s.max for s in recent)
        p50, p90, p99 = _percentiles(merged, count, (0.5, 0.9, 0.99), slowest)
        return LatencySummary(count, sum(s.errors for s in recent), p50, p90, p99, slowest)


def _percentiles(
    buckets: dict[int, int], count: int, quantiles: tuple[float, ...], slowest: float
) -> list[float]:
    """Each quantile's value: the upper edge of the bucket holding its rank, capped at the max."""
    ranks = [max(1, math.ceil(q * count)) for q in quantiles]
    values: list[float] = []
    seen = 0
    ordered = sorted(buckets.items())
    position = 0
    for rank in ranks:
        while position < len(ordered) and seen + ordered[position][1] < rank:
            seen += ordered[position][1]
            position += 1
        bucket = ordered[min(position, len(ordered) - 1)][0]
        values.append(min(bucket_upper(bucket), slowest))
    return values


class WindowedPeak:
    """The highest of a sampled value over the window (per slice, the highest sample)."""

    def __init__(self, clock: SliceClock) -> None:
        self._clock = clock
        self._slices: deque[tuple[int, float]] = deque(maxlen=SLICES)

    def add(self, value: float, now: float) -> None:
        index = self._clock.index(now)
        if self._slices and self._slices[-1][0] == index:
            value = max(value, self._slices[-1][1])
            self._slices[-1] = (index, value)
        else:
            self._slices.append((index, value))

    def peak(self, now: float) -> float:
        oldest = self._clock.oldest(now)
        return max((v for i, v in list(self._slices) if i >= oldest), default=0.0)
