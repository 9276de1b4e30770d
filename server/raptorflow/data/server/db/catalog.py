"""The exposed tables' shape, read from PostgreSQL's catalog.

Every table and column name in a request is looked up here before it reaches
SQL, so a name that is not in the catalog never becomes an identifier.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

import asyncpg
from raptorflow.data.server.db.connections import Connection
from raptorflow.data.server.errors import ServiceError, invalid_argument

log = logging.getLogger(__name__)

WORKSPACE_COLUMN = "workspace_id"


class Kind(enum.Enum):
    """How a column's values travel: mirrors `ValueKind` in value.proto."""

    BOOL = 1
    INT64 = 2
    DOUBLE = 3
    STRING = 4
    BYTES = 5
    TIMESTAMP = 6
    DATE = 7
    UUID = 8
    DECIMAL = 9
    JSON = 10
    ARRAY = 11
    VECTOR = 12


_SCALAR_KINDS: Mapping[str, Kind] = {
    "bool": Kind.BOOL,
    "int2": Kind.INT64,
    "int4": Kind.INT64,
    "int8": Kind.INT64,
    "float4": Kind.DOUBLE,
    "float8": Kind.DOUBLE,
    "numeric": Kind.DECIMAL,
    "text": Kind.STRING,
    "varchar": Kind.STRING,
    "bpchar": Kind.STRING,
    "name": Kind.STRING,
    "bytea": Kind.BYTES,
    "timestamptz": Kind.TIMESTAMP,
    "timestamp": Kind.TIMESTAMP,
    "date": Kind.DATE,
    "uuid": Kind.UUID,
    "json": Kind.JSON,
    "jsonb": Kind.JSON,
}

INT_BOUNDS: Mapping[str, tuple[int, int]] = {
    "int2": (-(2**15), 2**15 - 1),
    "int4": (-(2**31), 2**31 - 1),
    "int8": (-(2**63), 2**63 - 1),
}


@dataclass(frozen=True)
class Column:
    """One column and how its values are converted."""

    name: str
    database_type: str
    """`format_type` text, safe to splice: it comes from the catalog, quoted by PostgreSQL."""
    bind_type: str
    """The type without its modifier (`character varying`, not `character varying(40)`), which
    bound values are cast to: the column then checks length and precision on assignment,
    where an explicit cast to the modified type would silently truncate."""
    type_name: str
    """pg_type.typname (`int4`, `_text`, ...)."""
    kind: Kind
    element_kind: Kind | None
    element_type_name: str
    nullable: bool
    has_default: bool
    generated: bool
    as_text: bool
    """True for types this API does not model: read as `::text`, written as text cast back."""

    @functools.cached_property
    def quoted(self) -> str:
        # Cached: the compiler splices it into every statement, several times over.
        return quote_ident(self.name)


@dataclass(frozen=True)
class Table:
    """One exposed table."""

    schema: str
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    unique_keys: tuple[tuple[str, ...], ...]
    by_name: Mapping[str, Column] = field(repr=False, compare=False)

    @functools.cached_property
    def qualified(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    @property
    def workspace_column(self) -> Column:
        return self.by_name[WORKSPACE_COLUMN]

    def column(self, name: str, field_path: str) -> Column:
        """The named column, or INVALID_ARGUMENT naming `field_path`."""
        found = self.by_name.get(name)
        if found is None:
            raise invalid_argument(
                field_path,
                f"table {self.name!r} has no column {name!r}",
                reason="UNKNOWN_COLUMN",
                metadata={"table": self.name, "column": name[:200]},
            )
        return found


def quote_ident(name: str) -> str:
    """Quotes an identifier the way PostgreSQL's quote_ident does (always quoted)."""
    return '"' + name.replace('"', '""') + '"'


def _kind_of(type_name: str, category: str, type_type: str) -> tuple[Kind, bool]:
    if type_name in _SCALAR_KINDS:
        return _SCALAR_KINDS[type_name], False
    if type_name == "vector":  # pgvector, exchanged in its text form "[1,2,3]"
        return Kind.VECTOR, True
    if type_name == "citext":
        return Kind.STRING, False
    return Kind.STRING, True


_COLUMNS_SQL = """
SELECT c.relname AS table_name,
       a.attname AS column_name,
       format_type(a.atttypid, a.atttypmod) AS database_type,
       format_type(a.atttypid, -1) AS bind_type,
       t.typname AS type_name,
       t.typcategory::text AS category,
       t.typtype::text AS type_type,
       et.typname AS element_type_name,
       NOT a.attnotnull AS nullable,
       (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '') AS has_default,
       (a.attgenerated <> '' OR a.attidentity = 'a') AS generated
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_catalog.pg_type et ON et.oid = t.typelem AND t.typcategory = 'A'
WHERE n.nspname = $1
  AND c.relkind IN ('r', 'p')
  AND EXISTS (
      SELECT 1 FROM pg_catalog.pg_attribute w
      WHERE w.attrelid = c.oid AND w.attname = 'workspace_id' AND NOT w.attisdropped)
ORDER BY c.relname, a.attnum
"""

_UNIQUE_KEYS_SQL = """
SELECT c.relname AS table_name,
       i.indisprimary AS is_primary,
       ARRAY(
           SELECT a.attname
           FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
           JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
           ORDER BY k.ord) AS columns
FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_class c ON c.oid = i.indrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND i.indisunique AND i.indisvalid
  AND i.indpred IS NULL AND i.indexprs IS NULL
ORDER BY c.relname, NOT i.indisprimary, i.indexrelid
"""


def _make_column(row: asyncpg.Record) -> Column:
    type_name: str = row["type_name"]
    element_kind: Kind | None = None
    element_type_name = ""
    as_text = False
    if row["category"] == "A" and row["element_type_name"] is not None:
        element_type_name = row["element_type_name"]
        element_kind, element_as_text = _kind_of(element_type_name, "", "")
        if element_as_text or element_kind in (Kind.JSON, Kind.VECTOR):
            # Arrays of unmodelled types travel whole, in PostgreSQL's array text form.
            kind, element_kind, as_text = Kind.STRING, None, True
        elif element_type_name == "float4":
            kind, element_kind = Kind.VECTOR, None
        else:
            kind = Kind.ARRAY
    else:
        kind, as_text = _kind_of(type_name, row["category"], row["type_type"])
    return Column(
        name=row["column_name"],
        database_type=row["database_type"],
        bind_type=row["bind_type"],
        type_name=type_name,
        kind=kind,
        element_kind=element_kind,
        element_type_name=element_type_name,
        nullable=row["nullable"],
        has_default=row["has_default"],
        generated=row["generated"],
        as_text=as_text,
    )


class Catalog:
    """The exposed tables, by name; replaced whole on reload so readers never see half a load."""

    def __init__(self, tables: Mapping[str, Table]) -> None:
        self._tables = dict(tables)

    @property
    def tables(self) -> Mapping[str, Table]:
        return self._tables

    def table(self, name: str, field_path: str = "table") -> Table:
        """The exposed table, or INVALID_ARGUMENT naming `field_path`."""
        found = self._tables.get(name)
        if found is None:
            raise invalid_argument(
                field_path,
                f"no exposed table named {name!r}" if name else "a table name is required",
                reason="UNKNOWN_TABLE",
                metadata={"table": name[:200]},
            )
        return found


async def load_catalog(conn: Connection, schema: str, only: Iterable[str] = ()) -> Catalog:
    """Reads the exposed tables of `schema` (all with a workspace_id column, or `only` those)."""
    wanted = set(only)
    columns: dict[str, list[Column]] = {}
    for row in await conn.fetch(_COLUMNS_SQL, schema):
        if wanted and row["table_name"] not in wanted:
            continue
        columns.setdefault(row["table_name"], []).append(_make_column(row))
    primary: dict[str, tuple[str, ...]] = {}
    unique: dict[str, list[tuple[str, ...]]] = {}
    for row in await conn.fetch(_UNIQUE_KEYS_SQL, schema):
        key = tuple(row["columns"])
        if row["is_primary"]:
            primary[row["table_name"]] = key
        keys = unique.setdefault(row["table_name"], [])
        if key not in keys:
            keys.append(key)
    tables = {
        name: Table(
            schema=schema,
            name=name,
            columns=tuple(cols),
            primary_key=primary.get(name, ()),
            unique_keys=tuple(unique.get(name, ())),
            by_name={c.name: c for c in cols},
        )
        for name, cols in columns.items()
    }
    return Catalog(tables)


def named_twice(field_path: str, name: str) -> ServiceError:
    return invalid_argument(
        field_path, f"table {name!r} is named more than once", reason="DUPLICATE_TABLE"
    )


class CatalogCache:
    """The current catalog, reloaded on a timer and (throttled) on an unknown table name."""

    def __init__(
        self, load: Callable[[], Awaitable[Catalog]], *, min_reload_interval: float = 1.0
    ) -> None:
        self._load = load
        self._catalog = Catalog({})
        self._loaded_at = float("-inf")
        self._min_reload_interval = min_reload_interval
        self._lock = asyncio.Lock()

    @property
    def current(self) -> Catalog:
        return self._catalog

    async def reload(self) -> Catalog:
        async with self._lock:
            self._catalog = await self._load()
            self._loaded_at = time.monotonic()
            return self._catalog

    async def table(self, name: str, field_path: str = "table") -> Table:
        """The exposed table; reloads once if it is unknown, then INVALID_ARGUMENT."""
        found = self._catalog.tables.get(name)
        if found is not None:
            return found
        if name and time.monotonic() - self._loaded_at >= self._min_reload_interval:
            await self.reload()
        return self._catalog.table(name, field_path)

    async def tables(
        self, names: Iterable[str], field_path: str, errors: list[ServiceError]
    ) -> list[Table]:
        """The exposed tables `names` lists, in order. Each unknown or repeated name adds
        its INVALID_ARGUMENT (at `field_path[index]`) to `errors` instead, so a caller
        reports every bad field at once."""
        tables: list[Table] = []
        seen: set[str] = set()
        for index, name in enumerate(names):
            path = f"{field_path}[{index}]"
            if name in seen:
                errors.append(named_twice(path, name))
                continue
            seen.add(name)
            try:
                tables.append(await self.table(name, path))
            except ServiceError as error:
                errors.append(error)
        return tables

    async def refresh_forever(self, interval: float) -> None:
        """Reloads every `interval` seconds; a failed reload keeps the last good catalog."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
            except Exception as exc:  # the next tick retries; serving goes on meanwhile
                log.warning("catalog reload failed: %s", exc)
