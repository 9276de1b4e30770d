"""examples/consumer.py runs as a separate process against a real server and does what it says.

The example writes columns the shared test tables lack (`campaigns.settings`,
`campaign_events.at`), so it gets a schema of its own shaped as its docstring
describes, served by a server of its own.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from uuid import UUID

import asyncpg
import pytest
from conftest import start_server
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from tokens import mint

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "consumer.py"
SCHEMA = "consumer_example"

EXAMPLE_SCHEMA_SQL = f"""
CREATE SCHEMA {SCHEMA};
CREATE TABLE {SCHEMA}.campaigns (
    id bigserial PRIMARY KEY,
    workspace_id uuid NOT NULL,
    name text NOT NULL,
    status text,
    budget numeric(14, 2),
    tags text[],
    settings jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, name)
);
CREATE TABLE {SCHEMA}.campaign_events (
    id bigserial PRIMARY KEY,
    workspace_id uuid NOT NULL,
    kind text NOT NULL,
    at timestamptz NOT NULL
);
"""


@pytest.fixture(scope="module")
async def example_server(
    settings: Settings, db: asyncpg.Connection
) -> AsyncIterator[RunningServer]:
    await db.execute(EXAMPLE_SCHEMA_SQL)
    running = await start_server(settings, schema=SCHEMA)
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


async def _run_example(server: RunningServer, workspace: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--target",
        server.address,
        "--workspace",
        workspace,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # An agent of this one workspace: the example needs no more.
        env={**os.environ, "RAPTORFLOW_DATA_TOKEN": mint("agent", [workspace])},
    )
    # communicate() keeps this loop, and with it the in-process server, running.
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, stderr.decode()
    assert stderr == b""
    return stdout.decode()


async def test_consumer_example_runs_against_a_real_server(
    example_server: RunningServer, db: asyncpg.Connection, workspace: str
) -> None:
    now = datetime.now(UTC)
    await db.executemany(
        f"INSERT INTO {SCHEMA}.campaigns (workspace_id, name, status, budget, created_at)"
        " VALUES ($1, $2, $3, $4, $5)",
        [
            (UUID(workspace), "Stale", "active", Decimal("10.00"), now - timedelta(days=200)),
            (UUID(workspace), "Recent", "active", Decimal("99.90"), now - timedelta(days=1)),
            (UUID(workspace), "Paused", "paused", None, now - timedelta(days=2)),
            (UUID(workspace), "Unset", None, None, now - timedelta(days=3)),
        ],
    )

    first = (await _run_example(example_server, workspace)).splitlines()

    assert "failed:" not in "\n".join(first)
    assert first[0] == "tables: campaign_events, campaigns"
    spring = await db.fetchrow(
        f"SELECT * FROM {SCHEMA}.campaigns WHERE workspace_id = $1 AND name = 'Spring launch'",
        UUID(workspace),
    )
    assert spring is not None
    assert first[1] == f"created {spring['id']}"
    assert spring["budget"] == Decimal("1200.50")
    assert spring["tags"] == ["email", "q2"]
    assert spring["settings"] == '{"channel": "email", "daily_cap": 500}'
    assert first[2] == "archived 1 campaigns"
    # The newest active campaigns with their budgets, then the count, then the idle ones.
    assert [line.split()[1:] for line in first[3:5]] == [
        ["Spring", "launch", "1200.50"],
        ["Recent", "99.90"],
    ]
    assert first[5] == "2 active campaigns"
    assert sorted(line.split()[2] for line in first[6:]) == ["Paused", "Unset"]
    assert all(line.startswith("idle: ") for line in first[6:])

    statuses = dict(
        await db.fetch(
            f"SELECT name, status FROM {SCHEMA}.campaigns WHERE workspace_id = $1",
            UUID(workspace),
        )
    )
    assert statuses["Stale"] == "archived"
    assert statuses["Recent"] == "active"
    sweeps = await db.fetch(
        f"SELECT kind FROM {SCHEMA}.campaign_events WHERE workspace_id = $1", UUID(workspace)
    )
    assert [row["kind"] for row in sweeps] == ["archive_sweep"]

    # A second run finds its campaign already there and still reports.
    second = (await _run_example(example_server, workspace)).splitlines()
    assert second[1] == "'Spring launch' exists already (UNIQUE_VIOLATION)"
    assert second[2:] == first[3:]
