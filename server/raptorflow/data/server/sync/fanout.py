"""How one server's follow streams share their wake-ups and their reads of the change log.

`Wakeups` routes each NOTIFY payload (a workspace id) to the streams of that
workspace only. `SharedReads` lets streams that need the same read at the same
time run it once: the current snapshot (`cur`) for every stream woken by the
same notification, and an epoch's page for every stream at the same position.

Both keep a logical clock. A wake-up stamps the waiter with the time it was
woken; a shared read is stamped when it starts. A stream may only join a read
that started after its last wake-up, so the snapshot it gets was taken after
the change that woke it had committed: no wake-up is ever lost by sharing.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Waiter:
    """One follow stream's wake-up: an event, and the clock time of its latest wake-up."""

    __slots__ = ("event", "woken_at")

    def __init__(self, now: int) -> None:
        self.event = asyncio.Event()
        self.woken_at = now


class Wakeups:
    """The follow streams of one server, by workspace."""

    def __init__(self) -> None:
        self._clock = itertools.count(1)
        self._by_workspace: dict[str, set[Waiter]] = {}

    def tick(self) -> int:
        """The next clock time; every call returns a larger one."""
        return next(self._clock)

    def subscribe(self, workspace: str) -> Waiter:
        waiter = Waiter(self.tick())
        self._by_workspace.setdefault(workspace, set()).add(waiter)
        return waiter

    def unsubscribe(self, workspace: str, waiter: Waiter) -> None:
        waiters = self._by_workspace.get(workspace)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._by_workspace[workspace]

    def wake(self, workspace: str) -> None:
        """Wakes the streams of one workspace (a NOTIFY payload, a poll's finding)."""
        waiters = self._by_workspace.get(workspace)
        if waiters:
            self._wake(waiters, self.tick())

    def wake_all(self) -> None:
        """Wakes every stream (after a LISTEN reconnect, a failed poll, shutdown)."""
        now = self.tick()
        for waiters in self._by_workspace.values():
            self._wake(waiters, now)

    @staticmethod
    def _wake(waiters: set[Waiter], now: int) -> None:
        for waiter in waiters:
            waiter.woken_at = now
            waiter.event.set()

    def workspaces(self) -> list[str]:
        return list(self._by_workspace)

    def __len__(self) -> int:
        return sum(len(w) for w in self._by_workspace.values())


class SharedReads(Generic[K, T]):
    """Single flight: callers asking for the same key while a read runs share its result.

    With `keep_result`, a finished read's result also serves later callers, as
    long as it started late enough for them (for a small result such as `cur`,
    so that streams woken together share it even if some get there late).
    """

    def __init__(self, clock: Callable[[], int], *, keep_result: bool = False) -> None:
        self._clock = clock
        self._keep_result = keep_result
        self._running: dict[K, tuple[int, asyncio.Task[T]]] = {}
        self._stopped: Callable[[], BaseException] | None = None
        self.started = 0
        """Reads started (not shared), for tests and stats."""

    async def get(
        self, key: K, read: Callable[[], Coroutine[Any, Any, T]], *, started_after: int = 0
    ) -> T:
        """The result of a read of `key` that started after clock time `started_after`."""
        if self._stopped is not None:
            raise self._stopped()
        entry = self._running.get(key)
        if entry is None or entry[0] <= started_after:
            task = asyncio.create_task(self._run(read))
            entry = (self._clock(), task)
            self._running[key] = entry
            self.started += 1
            task.add_done_callback(functools.partial(self._forget, key, entry))
        try:
            # Shielded: a caller that goes away must not cancel the read for the others.
            return await asyncio.shield(entry[1])
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            own = caller is not None and caller.cancelling() > 0
            if own or self._stopped is None or not entry[1].cancelled():
                raise
            # `cancel_all` cancelled a read that had not started yet, so `_run` never
            # saw it: the callers still get the error, not a cancellation they would
            # take for their own (a sync stream would end without a status, and hold
            # the server's stop for the whole grace period).
            raise self._stopped() from None

    async def _run(self, read: Callable[[], Coroutine[Any, Any, T]]) -> T:
        try:
            return await read()
        except asyncio.CancelledError:
            if self._stopped is None:
                raise
            # Stopped by `cancel_all`: every caller gets the error, not a cancellation
            # it would take for its own.
            raise self._stopped() from None

    def _forget(self, key: K, entry: tuple[int, asyncio.Task[T]], task: asyncio.Task[T]) -> None:
        failed = task.cancelled() or task.exception() is not None
        if self._running.get(key) is entry and (failed or not self._keep_result):
            del self._running[key]

    def cancel_all(self, error: Callable[[], BaseException]) -> None:
        """Stops every running read: their callers, and later ones, get `error()`."""
        self._stopped = error
        for _, task in list(self._running.values()):
            task.cancel()
