"""The benchmark's own database: created fresh on DATABASE_URL's server, filled, dropped after."""

from __future__ import annotations

import urllib.parse
import uuid
from dataclasses import dataclass

import asyncpg

TABLE = "bench_items"

SCHEMA_SQL = f"""
CREATE TABLE {TABLE} (
    id bigint PRIMARY KEY,
    workspace_id uuid NOT NULL,
    name text,
    score double precision,
    created_at timestamptz
);
"""

# Fixed-width names, so every point-select response has the same size.
FILL_SQL = f"""
INSERT INTO {TABLE} (id, workspace_id, name, score, created_at)
SELECT n, $1, 'item-' || lpad(n::text, 8, '0'), n / 10000.0,
       timestamptz '2024-01-01 00:00:00+00' + n * interval '1 minute'
FROM generate_series(1, $2) AS n;
"""


def with_database(url: str, database: str) -> str:
    """`url` pointing at another database on the same server (keeps host, socket, options)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


@dataclass(frozen=True)
class BenchDatabase:
    """A database made for one benchmark run."""

    server_url: str
    name: str
    url: str
    workspace_id: str
    rows: int


async def create_empty(server_url: str, rows: int) -> BenchDatabase:
    """A fresh database with no tables yet, for `rows` rows of one (new) workspace."""
    name = f"raptorflow_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return BenchDatabase(server_url, name, with_database(server_url, name), str(uuid.uuid4()), rows)


async def create(server_url: str, rows: int) -> BenchDatabase:
    """A fresh database with `rows` rows of one workspace in `bench_items`."""
    database = await create_empty(server_url, rows)
    conn = await asyncpg.connect(database.url)
    try:
        await conn.execute(SCHEMA_SQL)
        await conn.execute(FILL_SQL, uuid.UUID(database.workspace_id), rows)
        await conn.execute(f"VACUUM ANALYZE {TABLE}")
    finally:
        await conn.close()
    return database


async def drop(database: BenchDatabase) -> None:
    admin = await asyncpg.connect(database.server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)')
    finally:
        await admin.close()
