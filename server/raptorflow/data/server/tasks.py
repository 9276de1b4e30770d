"""Stopping background tasks: cancel them all, then wait until each has ended."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancels every task (None entries are skipped), then waits for each to end.

    All are cancelled before the first wait, so they wind down together; a
    task's own CancelledError is not raised here.
    """
    pending = [task for task in tasks if task is not None]
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task
