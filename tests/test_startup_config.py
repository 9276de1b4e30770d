"""Bad maintenance configuration stops start-up cleanly: SystemExit, and no connection left open."""

from __future__ import annotations

import asyncpg
import pytest
from conftest import start_server
from pg_activity import assert_no_new_backends, service_backends
from raptorflow.data.server.config import Settings


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("retention_rules", '[{"table": "x"}]', "RAPTORFLOW_RETENTION_RULES"),
        ("schedules", '[{"name": "a", "cron": "not cron", "job": {}}]', "RAPTORFLOW_SCHEDULES"),
        ("schedules", "{not json", "RAPTORFLOW_SCHEDULES"),
    ],
)
async def test_bad_configuration_exits_without_leaking_connections(
    settings: Settings, db: asyncpg.Connection, setting: str, value: str, message: str
) -> None:
    before = set(await service_backends(db))
    with pytest.raises(SystemExit, match=message):
        await start_server(settings, **{setting: value})
    await assert_no_new_backends(db, before)
