"""The fluent, Supabase-style query builder that turns chained calls into WorkspaceService requests.

Builders are immutable: every method returns a new builder, so a partly built
query can be kept and extended in several directions without surprises::

    active = client.workspace(ws).table("campaigns").select("id", "name").eq("status", "active")
    newest = await active.order("created_at", desc=True).limit(20).execute()
    named = await active.like("name", "Spring%").execute()

Values are converted when a method is called, so a bad value fails at the line
that passed it, not later inside `execute()`.
"""

# `timeout` is the gRPC deadline sent along with each call (the server cancels the
# statement when it passes), which asyncio.timeout around the await cannot express.

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self, TypeAlias

from google.protobuf import text_format
from google.protobuf.message import Message
from raptorflow.data.client._config import USE_CLIENT_DEFAULT, MetadataLike, Timeout
from raptorflow.data.client._values import Json, Row, ValueLike, from_value, to_value
from raptorflow.data.v1 import query_pb2, value_pb2, workspace_service_pb2

if TYPE_CHECKING:
    from raptorflow.data.client._client import DataClient

# --------------------------------------------------------------------------
# Filters


def _condition(
    column: str,
    operator: query_pb2.Operator.ValueType,
    value: ValueLike = None,
    *,
    has_operand: bool = True,
) -> query_pb2.Filter:
    condition = query_pb2.Condition(column=column, operator=operator)
    if has_operand:
        if value is None:
            # SQL's `x = NULL` is never true; the service rejects a null
            # operand, and saying why here saves a round trip.
            raise ValueError(
                f"cannot compare column {column!r} with None; use is_null() or is_not_null()"
            )
        condition.value.CopyFrom(_converted(value, f"value for column {column!r}"))
    return query_pb2.Filter(condition=condition)


def _converted(value: ValueLike, what: str) -> value_pb2.Value:
    try:
        return to_value(value)
    except (TypeError, ValueError, OverflowError) as err:
        # Same exception type, but naming the column or row, which the bare
        # conversion error cannot know.
        raise type(err)(f"{what}: {err}") from err


def eq(column: str, value: ValueLike) -> query_pb2.Filter:
    """`column = value`."""
    return _condition(column, query_pb2.OPERATOR_EQ, value)


def neq(column: str, value: ValueLike) -> query_pb2.Filter:
    """`column <> value`; rows where the column is NULL do not match."""
    return _condition(column, query_pb2.OPERATOR_NEQ, value)


def gt(column: str, value: ValueLike) -> query_pb2.Filter:
    """`column > value`."""
    return _condition(column, query_pb2.OPERATOR_GT, value)


def gte(column: str, value: ValueLike) -> query_pb2.Filter:
    """`column >= value`."""
    return _condition(column, query_pb2.OPERATOR_GTE, value)


def lt(column: str, value: ValueLike) -> query_pb2.Filter:
    """`column < value`."""
    return _condition(column, query_pb2.OPERATOR_LT, value)


def lte(column: str, value: ValueLike) -> query_pb2.Filter:
    """`column <= value`."""
    return _condition(column, query_pb2.OPERATOR_LTE, value)


def in_(column: str, values: Iterable[ValueLike]) -> query_pb2.Filter:
    """`column IN (values)`. Raises ValueError for no values: an empty IN matches nothing,
    which is almost always a bug upstream, so it is not sent."""
    if isinstance(values, str | bytes):
        # A str is an Iterable of its characters; matching "abc" against
        # "a", "b", "c" is never what the caller meant.
        raise TypeError(
            f"in_({column!r}, ...) takes a list of values, not a single {type(values).__name__}"
        )
    condition = query_pb2.Condition(column=column, operator=query_pb2.OPERATOR_IN)
    for index, value in enumerate(values):
        condition.values.append(_converted(value, f"value {index} for column {column!r}"))
    if not condition.values:
        raise ValueError(f"in_({column!r}, ...) needs at least one value")
    return query_pb2.Filter(condition=condition)


def is_null(column: str) -> query_pb2.Filter:
    """`column IS NULL`."""
    return _condition(column, query_pb2.OPERATOR_IS_NULL, has_operand=False)


def is_not_null(column: str) -> query_pb2.Filter:
    """`column IS NOT NULL`."""
    return _condition(column, query_pb2.OPERATOR_IS_NOT_NULL, has_operand=False)


def like(column: str, pattern: str) -> query_pb2.Filter:
    """`column LIKE pattern`, where `%` matches any run of characters and `_` one."""
    return _condition(column, query_pb2.OPERATOR_LIKE, pattern)


def ilike(column: str, pattern: str) -> query_pb2.Filter:
    """`column ILIKE pattern`: LIKE ignoring case."""
    return _condition(column, query_pb2.OPERATOR_ILIKE, pattern)


def contains(column: str, document: object) -> query_pb2.Filter:
    """`column @> document` for a `json`/`jsonb` column: the column contains the JSON
    document (a dict, list or scalar, sent as JSON whatever its Python type)."""
    wrapped = document if isinstance(document, Json) else Json(document)
    return _condition(column, query_pb2.OPERATOR_JSON_CONTAINS, wrapped)


def _group(
    operator: query_pb2.GroupOperator.ValueType, filters: Sequence[query_pb2.Filter]
) -> query_pb2.Filter:
    if not filters:
        raise ValueError("a filter group needs at least one filter")
    return query_pb2.Filter(group=query_pb2.FilterGroup(operator=operator, filters=filters))


def all_of(*filters: query_pb2.Filter) -> query_pb2.Filter:
    """Every filter holds (AND)."""
    return _group(query_pb2.GROUP_OPERATOR_AND, filters)


def any_of(*filters: query_pb2.Filter) -> query_pb2.Filter:
    """At least one filter holds (OR)."""
    return _group(query_pb2.GROUP_OPERATOR_OR, filters)


def not_(condition: query_pb2.Filter) -> query_pb2.Filter:
    """The filter does not hold (NOT)."""
    return query_pb2.Filter(negation=query_pb2.Negation(filter=condition))


# --------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class SelectResult:
    """One page of a select."""

    data: list[Row]
    """The rows of this page, each a dict by column name."""
    columns: list[str]
    """The column names, in the order of each row's keys."""
    next_page_token: str
    """Passed to `page_token()`, reads the next page; "" when this is the last page."""


@dataclass(frozen=True)
class MutationResult:
    """The outcome of an insert, upsert, update or delete."""

    data: list[Row]
    """The `returning` columns of each row written or deleted; empty when none were asked for."""
    columns: list[str]
    """The column names of `data`."""
    count: int
    """The number of rows inserted, updated or deleted."""


def _rows(columns: Sequence[str], rows: Iterable[value_pb2.Row]) -> list[Row]:
    return [
        dict(zip(columns, (from_value(value) for value in row.values), strict=True)) for row in rows
    ]


def _mutation_result(
    response: workspace_service_pb2.InsertResponse
    | workspace_service_pb2.UpsertResponse
    | workspace_service_pb2.UpdateResponse
    | workspace_service_pb2.DeleteResponse,
) -> MutationResult:
    columns = list(response.returning.columns)
    return MutationResult(
        data=_rows(columns, response.returning.rows),
        columns=columns,
        count=response.affected_count,
    )


# --------------------------------------------------------------------------
# Builders


def _column_names(names: str | Sequence[str]) -> tuple[str, ...]:
    # Supabase takes "id, name" as one string; splitting on commas keeps ported
    # code working, and wrapping a lone str stops it being split into letters.
    if isinstance(names, str):
        names = (names,)
    parts = (part.strip() for name in names for part in name.split(","))
    return tuple(part for part in parts if part)


def _brief(value: object) -> str:
    if isinstance(value, Message):
        return f"<{text_format.MessageToString(value, as_one_line=True)}>"
    if isinstance(value, tuple | list):
        return "(" + ", ".join(_brief(item) for item in value) + ")"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key!r}: {_brief(item)}" for key, item in value.items()) + "}"
    return repr(value)


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class _TableOperation:
    _client: DataClient
    _workspace_id: str
    _table: str

    def __repr__(self) -> str:
        # The dataclass repr prints protos over many lines; one line per
        # builder keeps logs and debugger views readable.
        fields = ", ".join(
            f"{field.name.lstrip('_')}={_brief(getattr(self, field.name))}"
            for field in dataclasses.fields(self)
            if field.name != "_client"
        )
        return f"{type(self).__name__}({fields})"


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class _Filtered(_TableOperation):
    _filters: tuple[query_pb2.Filter, ...] = ()

    def where(self, *filters: query_pb2.Filter) -> Self:
        """Adds filters built with `eq`, `any_of`, `not_`...; all filters must hold (AND)."""
        copies = []
        for condition in filters:
            # Copied so that changing the caller's message later does not
            # change this (immutable) builder.
            copy = query_pb2.Filter()
            copy.CopyFrom(condition)
            copies.append(copy)
        return dataclasses.replace(self, _filters=self._filters + tuple(copies))

    def eq(self, column: str, value: ValueLike) -> Self:
        """Only rows where `column = value`."""
        return self.where(_condition(column, query_pb2.OPERATOR_EQ, value))

    def neq(self, column: str, value: ValueLike) -> Self:
        """Only rows where `column <> value` (NULL does not match)."""
        return self.where(_condition(column, query_pb2.OPERATOR_NEQ, value))

    def gt(self, column: str, value: ValueLike) -> Self:
        """Only rows where `column > value`."""
        return self.where(_condition(column, query_pb2.OPERATOR_GT, value))

    def gte(self, column: str, value: ValueLike) -> Self:
        """Only rows where `column >= value`."""
        return self.where(_condition(column, query_pb2.OPERATOR_GTE, value))

    def lt(self, column: str, value: ValueLike) -> Self:
        """Only rows where `column < value`."""
        return self.where(_condition(column, query_pb2.OPERATOR_LT, value))

    def lte(self, column: str, value: ValueLike) -> Self:
        """Only rows where `column <= value`."""
        return self.where(_condition(column, query_pb2.OPERATOR_LTE, value))

    def in_(self, column: str, values: Iterable[ValueLike]) -> Self:
        """Only rows where `column` equals one of `values` (at least one)."""
        return self.where(in_(column, values))

    def is_null(self, column: str) -> Self:
        """Only rows where `column IS NULL`."""
        return self.where(is_null(column))

    def is_not_null(self, column: str) -> Self:
        """Only rows where `column IS NOT NULL`."""
        return self.where(is_not_null(column))

    def like(self, column: str, pattern: str) -> Self:
        """Only rows where `column LIKE pattern` (`%` any run, `_` one character)."""
        return self.where(like(column, pattern))

    def ilike(self, column: str, pattern: str) -> Self:
        """Only rows where `column ILIKE pattern` (LIKE ignoring case)."""
        return self.where(ilike(column, pattern))

    def contains(self, column: str, document: object) -> Self:
        """Only rows whose JSON `column` contains `document` (PostgreSQL `@>`)."""
        return self.where(contains(column, document))

    def _filter(self) -> query_pb2.Filter | None:
        if not self._filters:
            return None
        if len(self._filters) == 1:
            return self._filters[0]
        return _group(query_pb2.GROUP_OPERATOR_AND, self._filters)


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class _Returning(_TableOperation):
    # Supabase returns the written rows by default ("representation"); doing
    # the same keeps `result.data[0]["id"]` in ported code working.
    _returning: tuple[str, ...] = ("*",)

    def returning(self, *columns: str) -> Self:
        """The columns to return for each row written or deleted; "*" for all,
        none to return only the count."""
        return dataclasses.replace(self, _returning=_column_names(columns))


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class SelectQuery(_Filtered):
    """A select being built; `await execute()` reads one page."""

    _columns: tuple[str, ...] = ()
    _order_by: tuple[query_pb2.OrderBy, ...] = ()
    _page_size: int = 0
    _page_token: str = ""

    def order(self, column: str, *, desc: bool = False) -> Self:
        """Sorts by `column`; repeat for further keys. The primary key always
        breaks ties, so pages never skip or repeat rows."""
        key = query_pb2.OrderBy(column=column, descending=desc)
        return dataclasses.replace(self, _order_by=(*self._order_by, key))

    def limit(self, count: int) -> Self:
        """At most `count` rows per page (the server lowers it to its maximum,
        1,000 by default). `execute()` reads one page; `pages()` and `stream()`
        read every matching row, `count` at a time."""
        if count < 1:
            raise ValueError(f"limit must be at least 1, not {count}")
        return dataclasses.replace(self, _page_size=count)

    def page_token(self, token: str) -> Self:
        """Continues from `SelectResult.next_page_token` of the same query."""
        return dataclasses.replace(self, _page_token=token)

    def to_request(self) -> workspace_service_pb2.SelectRequest:
        """The SelectRequest this builder sends."""
        return workspace_service_pb2.SelectRequest(
            workspace_id=self._workspace_id,
            table=self._table,
            columns=self._columns,
            filter=self._filter(),
            order_by=self._order_by,
            page_size=self._page_size,
            page_token=self._page_token,
        )

    async def execute(
        self, *, timeout: Timeout = USE_CLIENT_DEFAULT, metadata: MetadataLike | None = None
    ) -> SelectResult:
        """Reads one page."""
        response = await self._client._call(
            self._client.stub.Select, self.to_request(), timeout=timeout, metadata=metadata
        )
        columns = list(response.columns)
        return SelectResult(
            data=_rows(columns, response.rows),
            columns=columns,
            next_page_token=response.next_page_token,
        )

    async def pages(
        self, *, timeout: Timeout = USE_CLIENT_DEFAULT, metadata: MetadataLike | None = None
    ) -> AsyncIterator[SelectResult]:
        """Reads page after page until the last; `timeout` applies to each page."""
        query = self
        while True:
            page = await query.execute(timeout=timeout, metadata=metadata)
            yield page
            if not page.next_page_token:
                return
            query = query.page_token(page.next_page_token)

    async def stream(
        self, *, timeout: Timeout = USE_CLIENT_DEFAULT, metadata: MetadataLike | None = None
    ) -> AsyncIterator[Row]:
        """Every matching row, reading page after page; `timeout` applies to each page."""
        async for page in self.pages(timeout=timeout, metadata=metadata):
            for row in page.data:
                yield row


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class CountQuery(_Filtered):
    """A count being built; `await execute()` returns the number of matching rows."""

    def to_request(self) -> workspace_service_pb2.CountRequest:
        """The CountRequest this builder sends."""
        return workspace_service_pb2.CountRequest(
            workspace_id=self._workspace_id, table=self._table, filter=self._filter()
        )

    async def execute(
        self, *, timeout: Timeout = USE_CLIENT_DEFAULT, metadata: MetadataLike | None = None
    ) -> int:
        """Counts the matching rows of the workspace."""
        response = await self._client._call(
            self._client.stub.Count, self.to_request(), timeout=timeout, metadata=metadata
        )
        return response.count


def _row_set(
    rows: Mapping[str, ValueLike] | Sequence[Mapping[str, ValueLike]],
) -> tuple[tuple[str, ...], tuple[value_pb2.Row, ...]]:
    """The column list (union of keys, first seen first) and the rows in that order."""
    row_list = [rows] if isinstance(rows, Mapping) else list(rows)
    if not row_list:
        raise ValueError("no rows to write; pass a dict or a non-empty list of dicts")
    columns = tuple(dict.fromkeys(key for row in row_list for key in row))
    converted = []
    for index, row in enumerate(row_list):
        missing = [column for column in columns if column not in row]
        if missing:
            # Filling the gap with NULL would override the column's default,
            # and leaving it out is impossible in one multi-row statement, so
            # the caller decides.
            raise ValueError(
                f"row {index} has no value for {', '.join(map(repr, missing))}, which other "
                "rows give; give every row the same keys (None for NULL), or write the rows "
                "in separate calls"
            )
        converted.append(
            value_pb2.Row(
                values=[
                    _converted(row[column], f"row {index}, column {column!r}") for column in columns
                ]
            )
        )
    return columns, tuple(converted)


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class InsertQuery(_Returning):
    """An insert being built; `await execute()` writes the rows."""

    _columns: tuple[str, ...]
    _rows: tuple[value_pb2.Row, ...]

    def to_request(self) -> workspace_service_pb2.InsertRequest:
        """The InsertRequest this builder sends."""
        return workspace_service_pb2.InsertRequest(
            workspace_id=self._workspace_id,
            table=self._table,
            columns=self._columns,
            rows=self._rows,
            returning=self._returning,
        )

    def _batch_operation(self) -> workspace_service_pb2.BatchOperation:
        return workspace_service_pb2.BatchOperation(insert=self.to_request())

    async def execute(
        self, *, timeout: Timeout = USE_CLIENT_DEFAULT, metadata: MetadataLike | None = None
    ) -> MutationResult:
        """Inserts the rows, all or none."""
        response = await self._client._call(
            self._client.stub.Insert, self.to_request(), timeout=timeout, metadata=metadata
        )
        return _mutation_result(response)


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class UpsertQuery(_Returning):
    """An upsert being built; `await execute()` writes the rows."""

    _columns: tuple[str, ...]
    _rows: tuple[value_pb2.Row, ...]
    _conflict_columns: tuple[str, ...]
    _on_conflict: workspace_service_pb2.ConflictAction.ValueType
    _update_columns: tuple[str, ...] = ()

    def to_request(self) -> workspace_service_pb2.UpsertRequest:
        """The UpsertRequest this builder sends."""
        return workspace_service_pb2.UpsertRequest(
            workspace_id=self._workspace_id,
            table=self._table,
            columns=self._columns,
            rows=self._rows,
            conflict_columns=self._conflict_columns,
            on_conflict=self._on_conflict,
            update_columns=self._update_columns,
            returning=self._returning,
        )

    def _batch_operation(self) -> workspace_service_pb2.BatchOperation:
        return workspace_service_pb2.BatchOperation(upsert=self.to_request())

    async def execute(
        self, *, timeout: Timeout = USE_CLIENT_DEFAULT, metadata: MetadataLike | None = None
    ) -> MutationResult:
        """Inserts the rows, updating or skipping those that conflict."""
        response = await self._client._call(
            self._client.stub.Upsert, self.to_request(), timeout=timeout, metadata=metadata
        )
        return _mutation_result(response)


def _require_filter(query: _Filtered, allow_unfiltered: bool, verb: str) -> None:
    if not query._filters and not allow_unfiltered:
        # One forgotten .eq() would otherwise touch every row of the workspace.
        raise ValueError(
            f"{verb} without a filter would change every row of table {query._table!r}; "
            "add a filter, or call .all_rows() if that is what you mean"
        )


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class UpdateQuery(_Filtered, _Returning):
    """An update being built; needs a filter or `.all_rows()`."""

    _values: Mapping[str, value_pb2.Value]
    _allow_unfiltered: bool = False

    def all_rows(self) -> Self:
        """Allows updating every row of the workspace when no filter is given."""
        return dataclasses.replace(self, _allow_unfiltered=True)

    def to_request(self) -> workspace_service_pb2.UpdateRequest:
        """The UpdateRequest this builder sends. Raises ValueError if it has
        neither a filter nor `.all_rows()`."""
        _require_filter(self, self._allow_unfiltered, "update")
        return workspace_service_pb2.UpdateRequest(
            workspace_id=self._workspace_id,
            table=self._table,
            values=self._values,
            filter=self._filter(),
            allow_unfiltered=self._allow_unfiltered,
            returning=self._returning,
        )

    def _batch_operation(self) -> workspace_service_pb2.BatchOperation:
        return workspace_service_pb2.BatchOperation(update=self.to_request())

    async def execute(
        self, *, timeout: Timeout = USE_CLIENT_DEFAULT, metadata: MetadataLike | None = None
    ) -> MutationResult:
        """Updates the matching rows."""
        response = await self._client._call(
            self._client.stub.Update, self.to_request(), timeout=timeout, metadata=metadata
        )
        return _mutation_result(response)


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class DeleteQuery(_Filtered, _Returning):
    """A delete being built; needs a filter or `.all_rows()`."""

    _allow_unfiltered: bool = False

    def all_rows(self) -> Self:
        """Allows deleting every row of the workspace when no filter is given."""
        return dataclasses.replace(self, _allow_unfiltered=True)

    def to_request(self) -> workspace_service_pb2.DeleteRequest:
        """The DeleteRequest this builder sends. Raises ValueError if it has
        neither a filter nor `.all_rows()`."""
        _require_filter(self, self._allow_unfiltered, "delete")
        return workspace_service_pb2.DeleteRequest(
            workspace_id=self._workspace_id,
            table=self._table,
            filter=self._filter(),
            allow_unfiltered=self._allow_unfiltered,
            returning=self._returning,
        )

    def _batch_operation(self) -> workspace_service_pb2.BatchOperation:
        return workspace_service_pb2.BatchOperation(delete=self.to_request())

    async def execute(
        self, *, timeout: Timeout = USE_CLIENT_DEFAULT, metadata: MetadataLike | None = None
    ) -> MutationResult:
        """Deletes the matching rows."""
        response = await self._client._call(
            self._client.stub.Delete, self.to_request(), timeout=timeout, metadata=metadata
        )
        return _mutation_result(response)


Mutation: TypeAlias = InsertQuery | UpsertQuery | UpdateQuery | DeleteQuery
"""A write that `Workspace.batch` can run."""


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class TableQuery(_TableOperation):
    """One table of one workspace; each method starts an operation on it."""

    def select(self, *columns: str) -> SelectQuery:
        """Reads `columns` (all with none or "*"); "id, name" is split as Supabase does."""
        names = _column_names(columns)
        if names == ("*",):
            names = ()
        elif "*" in names:
            raise ValueError('"*" selects every column and cannot be combined with names')
        return SelectQuery(
            _client=self._client,
            _workspace_id=self._workspace_id,
            _table=self._table,
            _columns=names,
        )

    def count(self) -> CountQuery:
        """Counts the rows that match the filters added next."""
        return CountQuery(
            _client=self._client, _workspace_id=self._workspace_id, _table=self._table
        )

    def insert(
        self,
        rows: Mapping[str, ValueLike] | Sequence[Mapping[str, ValueLike]],
        *,
        returning: str | Sequence[str] = "*",
    ) -> InsertQuery:
        """Inserts one row (a dict) or several (a list of dicts with the same keys).

        Columns left out of every row take their defaults; `workspace_id` is
        filled in by the server. Raises ValueError if rows give different keys.
        `returning` names the columns to return ("*" all, () none).
        """
        columns, converted = _row_set(rows)
        return InsertQuery(
            _client=self._client,
            _workspace_id=self._workspace_id,
            _table=self._table,
            _columns=columns,
            _rows=converted,
            _returning=_column_names(returning),
        )

    def upsert(
        self,
        rows: Mapping[str, ValueLike] | Sequence[Mapping[str, ValueLike]],
        *,
        on_conflict: str | Sequence[str],
        ignore_duplicates: bool = False,
        update_columns: str | Sequence[str] = (),
        returning: str | Sequence[str] = "*",
    ) -> UpsertQuery:
        """Inserts rows, or updates the existing rows they conflict with.

        `on_conflict` names the columns of a unique key ("id" or "workspace_id, slug");
        with `ignore_duplicates` conflicting rows are skipped instead; otherwise
        `update_columns` limits what is overwritten (default: every written column
        that is not a conflict column).
        """
        conflict_columns = _column_names(on_conflict)
        if not conflict_columns:
            raise ValueError("on_conflict needs the columns of a unique key")
        overwritten = _column_names(update_columns)
        if ignore_duplicates and overwritten:
            raise ValueError("update_columns has no effect with ignore_duplicates=True")
        columns, converted = _row_set(rows)
        return UpsertQuery(
            _client=self._client,
            _workspace_id=self._workspace_id,
            _table=self._table,
            _columns=columns,
            _rows=converted,
            _conflict_columns=conflict_columns,
            _on_conflict=(
                workspace_service_pb2.CONFLICT_ACTION_IGNORE
                if ignore_duplicates
                else workspace_service_pb2.CONFLICT_ACTION_UPDATE
            ),
            _update_columns=overwritten,
            _returning=_column_names(returning),
        )

    def update(self, values: Mapping[str, ValueLike]) -> UpdateQuery:
        """Sets columns to `values` in the rows matching the filters added next."""
        if not values:
            raise ValueError("update needs at least one column to set")
        converted = {
            column: _converted(value, f"value for column {column!r}")
            for column, value in values.items()
        }
        return UpdateQuery(
            _client=self._client,
            _workspace_id=self._workspace_id,
            _table=self._table,
            _values=converted,
        )

    def delete(self) -> DeleteQuery:
        """Deletes the rows matching the filters added next."""
        return DeleteQuery(
            _client=self._client, _workspace_id=self._workspace_id, _table=self._table
        )


def _batch_result(result: workspace_service_pb2.BatchResult) -> MutationResult:
    match result.WhichOneof("result"):
        case "insert":
            return _mutation_result(result.insert)
        case "upsert":
            return _mutation_result(result.upsert)
        case "update":
            return _mutation_result(result.update)
        case "delete":
            return _mutation_result(result.delete)
        case None:
            raise ValueError("the server sent a batch result with no operation kind set")


@dataclass(frozen=True, eq=False)
class Workspace:
    """The tables of one workspace, from `DataClient.workspace()`."""

    _client: DataClient
    id: str
    """The workspace's id, a UUID in canonical text form."""

    def table(self, name: str) -> TableQuery:
        """One exposed table of this workspace."""
        return TableQuery(_client=self._client, _workspace_id=self.id, _table=name)

    def from_(self, name: str) -> TableQuery:
        """The same as `table()`, as Supabase spells it."""
        return self.table(name)

    async def batch(
        self,
        *operations: Mutation,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> list[MutationResult]:
        """Runs inserts, upserts, updates and deletes in one transaction, all or none.

        Build the operations with `table()` as usual but pass them here instead
        of calling `execute()`. Returns one result per operation, in order.
        Raises `Aborted` only if the retries of a serialization failure or
        deadlock ran out; a failing operation's field violations start with
        its index.
        """
        if not operations:
            raise ValueError("a batch needs at least one operation")
        for index, operation in enumerate(operations):
            if operation._workspace_id != self.id:
                raise ValueError(
                    f"operation {index} was built for workspace {operation._workspace_id}, "
                    f"not {self.id}"
                )
        request = workspace_service_pb2.ExecuteBatchRequest(
            workspace_id=self.id,
            operations=[operation._batch_operation() for operation in operations],
        )
        response = await self._client._call(
            self._client.stub.ExecuteBatch, request, timeout=timeout, metadata=metadata
        )
        return [_batch_result(result) for result in response.results]
