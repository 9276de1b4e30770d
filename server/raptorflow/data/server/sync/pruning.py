"""Pruning of the change log: what every live consumer acknowledged, and what is too old.

Runs on the owner pool, in bounded batches of their own transactions, and on
one replica at a time (a transaction-level advisory lock others skip on). Each
batch raises the workspace's pruned mark (`change_log_pruned.max_xid`) in the
same statement that deletes, which is what lets a stream refuse a token whose
changes are gone (RESNAPSHOT_REQUIRED) instead of silently skipping them.
"""

from __future__ import annotations

import logging

from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.connections import Database
from raptorflow.data.server.sync import sql

log = logging.getLogger(__name__)

BATCH = 5_000
"""Most entries one pruning transaction deletes."""
MAX_BATCHES = 200
"""Most batches of each kind one run deletes; the next run goes on."""
LOCK_KEY = 0x52_46_44_53_59_4E  # "RFDSYN": one replica prunes at a time


async def prune_once(database: Database, settings: Settings) -> int:
    """Prunes what can be pruned now; the number of entries deleted."""
    deleted = 0
    async with database.owner_pool.acquire() as conn:
        for statement, seconds in (
            (sql.PRUNE_EXPIRED, settings.sync_retention_seconds),
            (sql.PRUNE_ACKNOWLEDGED, settings.sync_consumer_expiry_seconds),
        ):
            for _ in range(MAX_BATCHES):
                async with conn.transaction():
                    if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", LOCK_KEY):
                        return deleted  # another replica is pruning
                    await conn.execute(sql.CUSTOM_PLANS)
                    count = int(await conn.fetchval(statement, seconds, BATCH))
                deleted += count
                if count < BATCH:
                    break
        await conn.execute(
            sql.FORGET_CONSUMERS,
            settings.sync_consumer_expiry_seconds + settings.sync_retention_seconds,
        )
    if deleted:
        log.info("pruned %d change-log entries", deleted)
    return deleted
