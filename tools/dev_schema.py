"""Creates a demo table in the embedded development database (`make run` without DATABASE_URL).

So that a newcomer's first `make run` can answer the README's grpcurl
walkthrough and client example at once: the `campaigns` table, the service's
migrations, and change capture on `campaigns` so a memory sync stream can
follow it (what `raptorflow-data migrate --sync-tables campaigns` does). It
only ever creates what is missing, and `make run` skips it when DATABASE_URL
names a database of your own.
"""

from __future__ import annotations

import asyncio
import os

import asyncpg
from raptorflow.data.server import cli

DEMO_TABLE = "campaigns"
DEMO_SQL = """
CREATE TABLE IF NOT EXISTS campaigns (
    id bigserial PRIMARY KEY,
    workspace_id uuid NOT NULL,
    name text NOT NULL,
    status text,
    budget numeric(14, 2),
    tags text[],
    meta jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, name)
);
"""


async def create_table() -> None:
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        await conn.execute(DEMO_SQL)
    finally:
        await conn.close()


def main() -> None:
    asyncio.run(create_table())
    # The documented command, in process: migrations, then the capture triggers (idempotent).
    status = cli.main(["migrate", "--sync-tables", DEMO_TABLE])
    if status:
        raise SystemExit(status)
    print(f"dev_schema: table {DEMO_TABLE} is ready in the embedded database, with change capture")


if __name__ == "__main__":
    main()
