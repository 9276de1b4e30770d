"""`sync/fanout.py` on its own: wake-ups reach only their workspace, and a shared read is
only joined by callers woken before it started (no wake-up is lost by sharing)."""

from __future__ import annotations

import asyncio

import pytest
from raptorflow.data.server.sync.fanout import SharedReads, Wakeups


async def settle() -> None:
    """Lets every task that is ready run until it waits."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_wake_ups_reach_only_their_workspace() -> None:
    wakeups = Wakeups()
    a, b = wakeups.subscribe("a"), wakeups.subscribe("b")
    wakeups.wake("a")
    assert a.event.is_set()
    assert not b.event.is_set()
    assert a.woken_at > b.woken_at
    wakeups.wake_all()
    assert b.event.is_set()
    wakeups.unsubscribe("a", a)
    wakeups.unsubscribe("b", b)
    assert wakeups.workspaces() == []
    assert len(wakeups) == 0


async def test_a_read_is_shared_only_with_callers_woken_before_it_started() -> None:
    wakeups = Wakeups()
    reads: list[int] = []
    release = asyncio.Event()

    async def read() -> int:
        reads.append(len(reads))
        await release.wait()
        return len(reads)

    shared: SharedReads[str, int] = SharedReads(wakeups.tick)
    early = wakeups.tick()
    first = asyncio.ensure_future(shared.get("k", read, started_after=early))
    await settle()
    joined = asyncio.ensure_future(shared.get("k", read, started_after=early))
    await settle()
    assert reads == [0], "a caller woken before the read started shares it"
    late = wakeups.tick()  # woken after the read started: its change may be missing
    own = asyncio.ensure_future(shared.get("k", read, started_after=late))
    await settle()
    assert reads == [0, 1]
    release.set()
    assert {await first, await joined, await own} == {2}
    assert shared.started == 2


async def test_a_kept_result_serves_late_callers_woken_before_it_started() -> None:
    wakeups = Wakeups()
    calls = 0

    async def read() -> int:
        nonlocal calls
        calls += 1
        return calls

    shared: SharedReads[None, int] = SharedReads(wakeups.tick, keep_result=True)
    woken = wakeups.tick()
    assert await shared.get(None, read, started_after=woken) == 1
    assert await shared.get(None, read, started_after=woken) == 1
    assert await shared.get(None, read, started_after=wakeups.tick()) == 2


async def test_stopped_reads_give_every_caller_the_error_not_a_cancellation() -> None:
    wakeups = Wakeups()
    started = asyncio.Event()

    async def read() -> int:
        started.set()
        await asyncio.Event().wait()
        return 0

    shared: SharedReads[str, int] = SharedReads(wakeups.tick)
    callers = [asyncio.ensure_future(shared.get("k", read)) for _ in range(3)]
    await started.wait()
    shared.cancel_all(lambda: RuntimeError("stopped"))
    for caller in callers:
        with pytest.raises(RuntimeError, match="stopped"):
            await caller
    assert shared.started == 1


async def test_a_read_stopped_before_it_began_gives_its_callers_the_error_too() -> None:
    # A stream woken just before shutdown creates the read task; close() cancels it in the
    # same loop turn, before its first step, so `_run` never sees the cancellation.
    began = False

    async def read() -> int:
        nonlocal began
        began = True
        return 0

    shared: SharedReads[str, int] = SharedReads(Wakeups().tick)
    callers = [asyncio.ensure_future(shared.get("k", read)) for _ in range(2)]
    await asyncio.sleep(0)  # the callers created the read and wait on it; it has not run
    shared.cancel_all(lambda: RuntimeError("stopped"))
    for caller in callers:
        with pytest.raises(RuntimeError, match="stopped"):
            await caller
    assert not began
    # Later callers get the error at once, without starting a read.
    with pytest.raises(RuntimeError, match="stopped"):
        await shared.get("k", read)
    assert shared.started == 1


async def test_a_caller_cancelled_itself_still_gets_its_cancellation() -> None:
    shared: SharedReads[str, int] = SharedReads(Wakeups().tick)
    caller = asyncio.ensure_future(shared.get("k", asyncio.Event().wait))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    caller.cancel()
    shared.cancel_all(lambda: RuntimeError("stopped"))
    with pytest.raises(asyncio.CancelledError):
        await caller
