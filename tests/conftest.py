"""Fixtures: one real PostgreSQL database per test session, one real server per test module.

PostgreSQL is the server DATABASE_URL names (CI, `make test`), or, when it is
unset, a throwaway pgserver cluster started here. Either way the session runs
in a database of its own, created at the start and dropped at the end, so
parallel runs and the developer's own data never meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import tempfile
import urllib.parse
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import grpc
import pytest
from raptorflow.data.server import app
from raptorflow.data.server.config import Settings
from raptorflow.data.v1 import maintenance_service_pb2_grpc, workspace_service_pb2_grpc
from tokens import TEST_JWT_SECRET, authorized_channel

# The one row of internal_secrets, a table no request may reach: no response carries it.
SECRET = "do not leak"
# A table whose name and columns need quoting.
ODD_TABLE = 'Odd "Name" table'

SCHEMA_SQL = f"""
CREATE TABLE campaigns (
    id bigserial PRIMARY KEY,
    workspace_id uuid NOT NULL,
    name text NOT NULL,
    status text,
    priority integer CHECK (priority IS NULL OR priority >= 0),
    budget numeric(14, 2),
    score double precision,
    active boolean,
    created_at timestamptz NOT NULL DEFAULT now(),
    starts_on date,
    external_id uuid,
    payload bytea,
    meta jsonb,
    tags text[],
    embedding real[],
    UNIQUE (workspace_id, name)
);
CREATE INDEX ON campaigns (workspace_id, created_at);

CREATE TABLE campaign_events (
    id bigserial PRIMARY KEY,
    workspace_id uuid NOT NULL,
    campaign_id bigint REFERENCES campaigns (id) ON DELETE CASCADE,
    kind text NOT NULL,
    happened_at timestamp,
    counts bigint[],
    info json,
    note varchar(40),
    address inet,
    small smallint,
    ratio real,
    big numeric
);

CREATE TABLE "Odd ""Name"" table" (
    id bigint PRIMARY KEY,
    workspace_id uuid NOT NULL,
    "select" text,
    "drop table x; --" text
);

-- No workspace_id column: never exposed.
CREATE TABLE internal_secrets (id integer PRIMARY KEY, secret text NOT NULL);
INSERT INTO internal_secrets VALUES (1, '{SECRET}');
"""
# The columns of campaigns in table order, as `SELECT *` and `RETURNING *` give them.
CAMPAIGN_COLUMNS = [
    "id",
    "workspace_id",
    "name",
    "status",
    "priority",
    "budget",
    "score",
    "active",
    "created_at",
    "starts_on",
    "external_id",
    "payload",
    "meta",
    "tags",
    "embedding",
]


def with_database(url: str, database: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


@contextlib.contextmanager
def embedded_postgres(prefix: str = "raptorflow-pg-") -> Iterator[str]:
    """A throwaway pgserver cluster (PostgreSQL 16 with pgvector); yields its superuser URL."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver only keeps a lock file there.
        warnings.simplefilter("ignore")
        import pgserver

    with tempfile.TemporaryDirectory(prefix=prefix) as data_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(data_dir, cleanup_mode="stop")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A superuser URL of a running PostgreSQL (DATABASE_URL, or a pgserver cluster)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    with embedded_postgres() as embedded_url:
        yield embedded_url


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    """A fresh database with the test tables, dropped after the session."""
    name = f"raptorflow_test_{uuid.uuid4().hex[:12]}"
    url = with_database(server_url, name)

    async def create() -> None:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(SCHEMA_SQL)
        finally:
            await conn.close()

    async def drop() -> None:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(create())
    try:
        yield url
    finally:
        asyncio.run(drop())


@pytest.fixture(scope="session")
def settings(database_url: str) -> Settings:
    """Settings tuned so health checks, grace periods and timeouts run short in tests."""
    return Settings(
        listen="127.0.0.1:0",
        database_url=database_url,
        pool_min_size=1,
        pool_max_size=4,
        acquire_timeout=2.0,
        statement_timeout=10.0,
        connect_timeout=2.0,
        connect_retry_seconds=5.0,
        health_interval=0.2,
        health_timeout=1.0,
        shutdown_grace_seconds=2.0,
        token_key=b"test-page-token-key",
        catalog_refresh_seconds=5.0,
        jwt_secret=TEST_JWT_SECRET,
    )


async def start_server(settings: Settings, **changes: Any) -> app.RunningServer:
    return await app.start(dataclasses.replace(settings, **changes))


@pytest.fixture(scope="module")
async def server(settings: Settings) -> AsyncIterator[app.RunningServer]:
    """A real grpc.aio server on 127.0.0.1:0, shared by one test module."""
    running = await start_server(settings)
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


@pytest.fixture(scope="module")
async def channel(server: app.RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    """A channel that sends an admin token of every workspace on every call."""
    async with authorized_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.aio.Channel) -> workspace_service_pb2_grpc.WorkspaceServiceStub:
    return workspace_service_pb2_grpc.WorkspaceServiceStub(channel)


@pytest.fixture(scope="module")
def maintenance(channel: grpc.aio.Channel) -> maintenance_service_pb2_grpc.MaintenanceServiceStub:
    return maintenance_service_pb2_grpc.MaintenanceServiceStub(channel)


@pytest.fixture(scope="module")
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct superuser connection, to check what the service really wrote."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def workspace() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def other_workspace() -> str:
    return str(uuid.uuid4())
