"""Creates a demo table in the embedded development database (`make run` without DATABASE_URL).

So that a newcomer's first `make run` can answer the README's grpcurl
walkthrough and client example at once. It only ever creates what is missing,
and `make run` skips it when DATABASE_URL names a database of your own.
"""

from __future__ import annotations

import asyncio
import os

import asyncpg

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


async def main() -> None:
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        await conn.execute(DEMO_SQL)
    finally:
        await conn.close()
    print("dev_schema: table campaigns is ready in the embedded database")


if __name__ == "__main__":
    asyncio.run(main())
