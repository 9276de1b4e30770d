"""asyncpg codecs that carry dates and timestamps exactly, as PostgreSQL's own integers.

asyncpg's default codecs write `datetime.max` and `date.max` as PostgreSQL's
`infinity` (and the minimums as `-infinity`) and read them back the same way, so
the real values 9999-12-31T23:59:59.999999 and 0001-01-01T00:00:00 would be
stored as infinity, and values beyond Python's years 1 to 9999 fail to decode.
The query pool exchanges the integers instead; `values.py` converts them, so
every finite value is exact and the rest are answered with OUT_OF_RANGE.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import asyncpg

TIMESTAMP_INFINITY = 2**63 - 1
TIMESTAMP_MINUS_INFINITY = -(2**63)
DATE_INFINITY = 2**31 - 1
DATE_MINUS_INFINITY = -(2**31)


class PgTimestamp(NamedTuple):
    """A `timestamp` or `timestamptz` value as PostgreSQL stores it."""

    microseconds: int
    """Microseconds since 2000-01-01 00:00:00 (UTC for `timestamptz`); ± infinity at the ends."""


class PgDate(NamedTuple):
    """A `date` value as PostgreSQL stores it."""

    days: int
    """Days since 2000-01-01; ± infinity at the ends of int32."""


async def register(connection: asyncpg.Connection[Any]) -> None:
    """Installs the codecs on a new connection (the query pool's `init`)."""
    for type_name in ("timestamp", "timestamptz"):
        await connection.set_type_codec(
            type_name,
            schema="pg_catalog",
            encoder=tuple,
            decoder=PgTimestamp._make,
            format="tuple",
        )
    await connection.set_type_codec(
        "date", schema="pg_catalog", encoder=tuple, decoder=PgDate._make, format="tuple"
    )
