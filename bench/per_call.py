"""Per-call latency of statement variants on one connection, rounds alternating.

The "statements alone" figures of `bench.row_security` and `bench.pgbouncer`:
each variant is timed for `seconds` per round, the order reversed every other
round so that neither end of the list is favoured by the machine warming up or
cooling down, and the per-round figures are medianed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager

Call = Callable[[int], Awaitable[None]]
"""One call of a variant, given the id to look up."""
Variant = Callable[[], AbstractAsyncContextManager[Call]]
"""Opens what a variant's calls run in (an open transaction, say) and gives its call."""


async def time_variants(
    variants: Mapping[str, Variant], ids: Sequence[int], seconds: float, rounds: int = 6
) -> dict[str, float]:
    """Median microseconds per call of each variant, in the order given."""
    results: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(rounds):
        names = list(variants)
        if round_ % 2:
            names.reverse()
        for name in names:
            async with variants[name]() as call:
                count, started = 0, time.perf_counter()
                while time.perf_counter() - started < seconds:
                    await call(ids[count % len(ids)])
                    count += 1
                results[name].append((time.perf_counter() - started) / count * 1e6)
    return {name: statistics.median(values) for name, values in results.items()}


def per_call_table(title: str, medians: Mapping[str, float], base: str) -> str:
    """`title`, then each variant's median and its ratio to `base`'s."""
    width = max(len(name) for name in medians) + 2
    lines = [title]
    for name, median in medians.items():
        lines.append(f"  {name:<{width}} {median:7.1f} us  x{median / medians[base]:.2f}")
    return "\n".join(lines)
