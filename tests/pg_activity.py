"""The service's backends as PostgreSQL's pg_stat_activity shows them, for tests that
hold a lock from their own connection and watch the service's statements wait on it."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg

# Inside a transaction PostgreSQL keeps serving one snapshot of pg_stat_activity
# (all but the wait event columns); a lock-holding connection must drop it.
CLEAR_SNAPSHOT = "SELECT pg_stat_clear_snapshot()"
# Every connection of the service to the test database, whatever its pool.
SERVICE_BACKENDS = """
SELECT pid, client_port, state, wait_event_type, backend_type,
       xact_start IS NOT NULL AS in_transaction, left(query, 120) AS query
FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'raptorflow-data'
"""


async def service_backends(db: asyncpg.Connection) -> dict[int, asyncpg.Record]:
    """The service's connections to the test database now, by backend pid."""
    await db.execute(CLEAR_SNAPSHOT)
    return {r["pid"]: r for r in await db.fetch(SERVICE_BACKENDS)}


async def assert_no_new_backends(db: asyncpg.Connection, before: set[int]) -> None:
    """Every service connection opened since `before` was taken is gone (polled: a backend
    lingers in pg_stat_activity for a moment after its client closed it)."""
    deadline = time.monotonic() + 5.0
    while new := set(await service_backends(db)) - before:
        assert time.monotonic() < deadline, f"connections were left open: {new}"
        await asyncio.sleep(0.05)


async def wait_for_lock_waits(
    db: asyncpg.Connection, count: int = 1, within: float = 5.0
) -> list[int]:
    """Waits until at least `count` of the service's backends wait for a lock; their pids."""
    started = time.monotonic()
    while True:
        waiting = [
            pid for pid, r in (await service_backends(db)).items() if r["wait_event_type"] == "Lock"
        ]
        if len(waiting) >= count:
            return waiting
        assert time.monotonic() - started < within, (
            f"fewer than {count} backends of the service waited for a lock within {within} s"
        )
        await asyncio.sleep(0.02)


async def wait_for_statement_lock_wait(
    db: asyncpg.Connection, statement: str, within: float = 10.0
) -> None:
    """Waits until a backend (of any role or pool) running `statement` waits for a lock."""
    started = time.monotonic()
    while True:
        await db.execute(CLEAR_SNAPSHOT)
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE $1",
            statement + "%",
        )
        if waiting:
            return
        assert time.monotonic() - started < within, f"{statement} never waited for a lock"
        await asyncio.sleep(0.02)


async def insert_row(db: asyncpg.Connection, workspace: str, name: str) -> int:
    """A campaign named `name` with status 'original', written directly; its id."""
    row_id: int = await db.fetchval(
        "INSERT INTO campaigns (workspace_id, name, status) VALUES ($1, $2, 'original')"
        " RETURNING id",
        uuid.UUID(workspace),
        name,
    )
    return row_id


async def lock_row(db: asyncpg.Connection, row_id: int) -> None:
    """Locks the row until the caller's transaction ends, so an Update of it waits."""
    await db.execute("SELECT 1 FROM campaigns WHERE id = $1 FOR UPDATE", row_id)
