"""The SQL compiler: typed request messages in, SQL text with bound parameters out.

The only place that writes SQL for workspace queries. Identifiers come from the
catalog (`Table`, `Column`) and are always quoted; every value a caller sends
becomes a `$n` parameter. Every statement is scoped to one workspace: reads,
updates and deletes carry `workspace_id = $1`, inserts write it into each row,
and upserts only ever update rows of that workspace.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from raptorflow.data.server.db import values
from raptorflow.data.server.db.catalog import WORKSPACE_COLUMN, Column, Kind, Table
from raptorflow.data.server.errors import invalid_argument
from raptorflow.data.v1 import query_pb2, value_pb2, workspace_service_pb2

MAX_FILTER_DEPTH = 16
MAX_IN_VALUES = 10_000
# PostgreSQL accepts at most 65,535 bind parameters; stay well below for VALUES chunks.
MAX_PARAMETERS = 32_000

_COMPARISONS: Mapping[int, str] = {
    query_pb2.OPERATOR_EQ: "=",
    query_pb2.OPERATOR_NEQ: "<>",
    query_pb2.OPERATOR_GT: ">",
    query_pb2.OPERATOR_GTE: ">=",
    query_pb2.OPERATOR_LT: "<",
    query_pb2.OPERATOR_LTE: "<=",
}
_TARGET = '"target"'


@dataclass(frozen=True)
class Statement:
    """One SQL statement and how to read its result."""

    sql: str
    args: tuple[object, ...]
    output: tuple[Column, ...] = ()
    """The result's columns, in order."""


@dataclass(frozen=True)
class SelectPlan:
    """A page read: the statement, plus where the sort keys sit in each row."""

    statement: Statement
    visible: int
    """How many leading result columns the caller asked for; the rest only feed the cursor."""
    key_positions: tuple[int, ...]
    """Result positions of the sort keys, for the next page's cursor."""
    page_size: int
    paginated: bool
    """False when the table has no primary key, so no total order exists to resume from."""


class _Params:
    """Collects bound values and hands out their `$n` placeholders."""

    def __init__(self, workspace: object) -> None:
        self.values: list[object] = [workspace]

    def add(self, value: object) -> str:
        self.values.append(value)
        return f"${len(self.values)}"

    def typed(self, column: Column, value: object) -> str:
        """A placeholder for a value compared with or written to `column`."""
        placeholder = self.add(value)
        if column.as_text:
            return f"CAST({placeholder}::text AS {column.bind_type})"
        return placeholder


def workspace_value(table: Table, workspace_id: str, field_path: str = "workspace_id") -> object:
    """The workspace id as bound for this table's workspace column."""
    if not workspace_id:
        raise invalid_argument(field_path, "a workspace id is required", reason="INVALID_UUID")
    parsed = values.parse_uuid(workspace_id, field_path)
    if table.workspace_column.kind is Kind.UUID:
        return parsed
    return str(parsed)


def _text_of(column: Column) -> str:
    """An unmodelled column's value in its text form."""
    if column.type_name == "inet":
        # inet's cast to text always adds the netmask ("10.0.0.1/32"); abbrev() prints
        # what the type's output function does ("10.0.0.1").
        return f"abbrev({column.quoted})"
    return f"{column.quoted}::text"


def select_expr(column: Column) -> str:
    """How a column is read: as itself, or in text form for types the API does not model."""
    if column.as_text:
        return f"{_text_of(column)} AS {column.quoted}"
    return column.quoted


def _unique_columns(table: Table, names: Sequence[str], field_path: str) -> list[Column]:
    seen: set[str] = set()
    out = []
    for i, name in enumerate(names):
        column = table.column(name, f"{field_path}[{i}]")
        if name in seen:
            raise invalid_argument(f"{field_path}[{i}]", f"column {name!r} is named twice")
        seen.add(name)
        out.append(column)
    return out


def returning_columns(
    table: Table, names: Sequence[str], field_path: str = "returning"
) -> tuple[Column, ...]:
    if list(names) == ["*"]:
        return table.columns
    return tuple(_unique_columns(table, names, field_path))


def _returning_sql(columns: Sequence[Column]) -> str:
    if not columns:
        return ""
    return " RETURNING " + ", ".join(select_expr(c) for c in columns)


# ---------------------------------------------------------------------------
# Filters


def _condition(table: Table, cond: query_pb2.Condition, params: _Params, path: str) -> str:
    column = table.column(cond.column, f"{path}.column")
    op = cond.operator
    has_value = cond.HasField("value")
    if op == query_pb2.OPERATOR_IN:
        if has_value:
            raise invalid_argument(f"{path}.value", "OPERATOR_IN takes `values`, not `value`")
        if not cond.values:
            raise invalid_argument(f"{path}.values", "OPERATOR_IN needs at least one value")
        if len(cond.values) > MAX_IN_VALUES:
            raise invalid_argument(
                f"{path}.values", f"OPERATOR_IN takes at most {MAX_IN_VALUES} values"
            )
        if column.kind in (Kind.ARRAY, Kind.VECTOR):
            raise invalid_argument(
                f"{path}.operator", "OPERATOR_IN does not apply to array columns"
            )
        items = []
        for i, v in enumerate(cond.values):
            if v.WhichOneof("kind") == "null_value":
                raise invalid_argument(
                    f"{path}.values[{i}]", "null never matches; use OPERATOR_IS_NULL"
                )
            items.append(values.to_db(column, v, f"{path}.values[{i}]"))
        placeholder = params.add(items)
        if column.as_text:
            return f"{column.quoted} = ANY(CAST({placeholder}::text[] AS {column.bind_type}[]))"
        if column.kind is Kind.JSON:
            return f"{column.quoted}::jsonb = ANY({placeholder}::jsonb[])"
        return f"{column.quoted} = ANY({placeholder}::{column.bind_type}[])"
    if cond.values:
        raise invalid_argument(f"{path}.values", "only OPERATOR_IN takes `values`")
    if op in (query_pb2.OPERATOR_IS_NULL, query_pb2.OPERATOR_IS_NOT_NULL):
        if has_value:
            raise invalid_argument(f"{path}.value", "IS NULL operators take no value")
        return f"{column.quoted} IS {'NOT ' if op == query_pb2.OPERATOR_IS_NOT_NULL else ''}NULL"
    if op not in _COMPARISONS and op not in (
        query_pb2.OPERATOR_LIKE,
        query_pb2.OPERATOR_ILIKE,
        query_pb2.OPERATOR_JSON_CONTAINS,
    ):
        raise invalid_argument(f"{path}.operator", "an operator is required")
    if not has_value:
        raise invalid_argument(f"{path}.value", "this operator needs a value")
    if cond.value.WhichOneof("kind") == "null_value":
        raise invalid_argument(f"{path}.value", "null never matches; use OPERATOR_IS_NULL")
    value_path = f"{path}.value"
    if op in (query_pb2.OPERATOR_LIKE, query_pb2.OPERATOR_ILIKE):
        if column.kind is not Kind.STRING:
            raise invalid_argument(
                f"{path}.operator", f"LIKE applies to text columns, not {column.database_type}"
            )
        if cond.value.WhichOneof("kind") != "string_value":
            raise invalid_argument(value_path, "a LIKE pattern is a string_value")
        keyword = "LIKE" if op == query_pb2.OPERATOR_LIKE else "ILIKE"
        lhs = _text_of(column) if column.as_text else column.quoted
        return f"{lhs} {keyword} {params.add(cond.value.string_value)}"
    if op == query_pb2.OPERATOR_JSON_CONTAINS:
        if column.kind is not Kind.JSON:
            raise invalid_argument(
                f"{path}.operator", "JSON contains applies to json and jsonb columns"
            )
        bound_json = params.add(values.to_db(column, cond.value, value_path))
        return f"{column.quoted}::jsonb @> {bound_json}::jsonb"
    bound = values.to_db(column, cond.value, value_path)
    if column.kind is Kind.JSON:  # `json` has no comparison operators; jsonb compares as values
        return f"{column.quoted}::jsonb {_COMPARISONS[op]} {params.add(bound)}::jsonb"
    return f"{column.quoted} {_COMPARISONS[op]} {params.typed(column, bound)}"


def _filter(table: Table, f: query_pb2.Filter, params: _Params, path: str, depth: int) -> str:
    if depth > MAX_FILTER_DEPTH:
        raise invalid_argument(path, f"filters nest at most {MAX_FILTER_DEPTH} levels deep")
    which = f.WhichOneof("kind")
    if which == "condition":
        return _condition(table, f.condition, params, f"{path}.condition")
    if which == "group":
        group = f.group
        if group.operator not in (query_pb2.GROUP_OPERATOR_AND, query_pb2.GROUP_OPERATOR_OR):
            raise invalid_argument(f"{path}.group.operator", "a group operator is required")
        if not group.filters:
            raise invalid_argument(f"{path}.group.filters", "a group needs at least one filter")
        joiner = " AND " if group.operator == query_pb2.GROUP_OPERATOR_AND else " OR "
        parts = [
            _filter(table, child, params, f"{path}.group.filters[{i}]", depth + 1)
            for i, child in enumerate(group.filters)
        ]
        return "(" + joiner.join(parts) + ")"
    if which == "negation":
        if not f.negation.HasField("filter"):
            raise invalid_argument(f"{path}.negation.filter", "a negation needs a filter")
        inner = _filter(table, f.negation.filter, params, f"{path}.negation.filter", depth + 1)
        return f"(NOT {inner})"
    raise invalid_argument(path, "a filter must set condition, group or negation")


def _where(table: Table, params: _Params, f: query_pb2.Filter | None, path: str = "filter") -> str:
    scope = f"{table.workspace_column.quoted} = $1"
    if f is None:
        return scope
    return f"{scope} AND {_filter(table, f, params, path, 1)}"


# ---------------------------------------------------------------------------
# Reads


def compile_count(table: Table, request: workspace_service_pb2.CountRequest) -> Statement:
    params = _Params(workspace_value(table, request.workspace_id))
    where = _where(table, params, request.filter if request.HasField("filter") else None)
    return Statement(f"SELECT count(*) FROM {table.qualified} WHERE {where}", tuple(params.values))


def compile_select(
    table: Table,
    request: workspace_service_pb2.SelectRequest,
    *,
    page_size: int,
    cursor: Sequence[value_pb2.Value] | None,
) -> SelectPlan:
    """A page of rows; `cursor` holds the previous page's last sort-key values."""
    params = _Params(workspace_value(table, request.workspace_id))
    visible = (
        list(table.columns)
        if not request.columns
        else _unique_columns(table, request.columns, "columns")
    )
    keys: list[tuple[Column, bool]] = []
    for i, order in enumerate(request.order_by):
        column = table.column(order.column, f"order_by[{i}].column")
        if column.kind is Kind.JSON:
            raise invalid_argument(f"order_by[{i}].column", "JSON columns cannot be ordered")
        if any(c.name == column.name for c, _ in keys):
            raise invalid_argument(
                f"order_by[{i}].column", f"column {column.name!r} is ordered twice"
            )
        keys.append((column, order.descending))
    paginated = bool(table.primary_key)
    for name in table.primary_key:
        if not any(c.name == name for c, _ in keys):
            keys.append((table.by_name[name], False))
    output = list(visible)
    key_positions = []
    for column, _ in keys:
        position = next((i for i, c in enumerate(output) if c.name == column.name), None)
        if position is None:
            position = len(output)
            output.append(column)
        key_positions.append(position)

    where = _where(table, params, request.filter if request.HasField("filter") else None)
    if cursor is not None:
        if not paginated or len(cursor) != len(keys):
            raise invalid_argument(
                "page_token", "the page token does not fit this table", reason="INVALID_PAGE_TOKEN"
            )
        where += " AND " + _after(keys, cursor, params)
    order_sql = ", ".join(f"{c.quoted}{' DESC' if desc else ''}" for c, desc in keys)
    sql = f"SELECT {', '.join(select_expr(c) for c in output)} FROM {table.qualified} WHERE {where}"
    if order_sql:
        sql += f" ORDER BY {order_sql}"
    sql += f" LIMIT {params.add(page_size + 1)}"
    return SelectPlan(
        Statement(sql, tuple(params.values), tuple(output)),
        visible=len(visible),
        key_positions=tuple(key_positions),
        page_size=page_size,
        paginated=paginated,
    )


def _after(
    keys: Sequence[tuple[Column, bool]], cursor: Sequence[value_pb2.Value], params: _Params
) -> str:
    """Rows strictly after the cursor in the sort order; NULLs sort as the largest value.

    An OR of "equal on the first i keys and after on key i", written so that a
    NULL cursor value behaves as PostgreSQL sorts it (ASC NULLS LAST, DESC
    NULLS FIRST).
    """
    bound: list[tuple[Column, bool, str | None]] = []
    for (column, desc), value in zip(keys, cursor, strict=True):
        db_value = values.to_db(column, value, "page_token")
        placeholder = None if db_value is None else params.typed(column, db_value)
        bound.append((column, desc, placeholder))
    disjuncts = []
    for i, (column, desc, placeholder) in enumerate(bound):
        if placeholder is None:
            after = f"{column.quoted} IS NOT NULL" if desc else None
        elif desc:
            after = f"{column.quoted} < {placeholder}"
        else:
            after = f"({column.quoted} > {placeholder} OR {column.quoted} IS NULL)"
        if after is None:
            continue
        equal = [
            f"{c.quoted} IS NULL" if p is None else f"{c.quoted} = {p}" for c, _, p in bound[:i]
        ]
        disjuncts.append("(" + " AND ".join([*equal, after]) + ")")
    return "(" + " OR ".join(disjuncts) + ")" if disjuncts else "FALSE"


# ---------------------------------------------------------------------------
# Writes


def _insert_columns(
    table: Table, names: Sequence[str], rows: Sequence[value_pb2.Row], workspace: object
) -> tuple[list[Column], list[list[object]]]:
    """Validated columns (without workspace_id) and their values, column by column."""
    columns = _unique_columns(table, names, "columns")
    if not rows:
        raise invalid_argument("rows", "at least one row is required")
    for i, column in enumerate(columns):
        if column.generated:
            raise invalid_argument(
                f"columns[{i}]", f"column {column.name!r} is generated and cannot be written"
            )
    by_column: list[list[object]] = [[] for _ in columns]
    for r, row in enumerate(rows):
        if len(row.values) != len(columns):
            raise invalid_argument(
                f"rows[{r}].values", f"has {len(row.values)} values for {len(columns)} columns"
            )
        for j, (column, value) in enumerate(zip(columns, row.values, strict=True)):
            by_column[j].append(values.to_db(column, value, f"rows[{r}].values[{j}]"))
    # workspace_id may be given, but only as the request's own workspace.
    for j, column in enumerate(columns):
        if column.name == WORKSPACE_COLUMN:
            for r, given in enumerate(by_column[j]):
                if str(given) != str(workspace):
                    raise invalid_argument(
                        f"rows[{r}].values[{j}]",
                        "workspace_id must be the request's workspace",
                        reason="WORKSPACE_MISMATCH",
                    )
            del columns[j], by_column[j]
            break
    return columns, by_column


def _unnestable(column: Column) -> bool:
    # unnest() flattens multi-dimensional arrays, so array-valued columns go through VALUES.
    return column.as_text or column.kind not in (Kind.ARRAY, Kind.VECTOR)


def _insert_statements(
    table: Table,
    columns: Sequence[Column],
    by_column: Sequence[Sequence[object]],
    row_count: int,
    workspace: object,
    suffix: str,
    output: tuple[Column, ...],
) -> list[Statement]:
    target = ", ".join([table.workspace_column.quoted, *(c.quoted for c in columns)])
    head = f"INSERT INTO {table.qualified} AS {_TARGET} ({target})"
    if all(_unnestable(c) for c in columns):
        params = _Params(workspace)
        if not columns:
            source = f"SELECT $1 FROM generate_series(1, {params.add(row_count)}::integer)"
        else:
            arrays = []
            for column, column_values in zip(columns, by_column, strict=True):
                placeholder = params.add(list(column_values))
                element_type = "text" if column.as_text else column.bind_type
                arrays.append(f"{placeholder}::{element_type}[]")
            names = ", ".join(f"c{i}" for i in range(len(columns)))
            picks = ", ".join(
                f"CAST(u.c{i} AS {c.bind_type})" if c.as_text else f"u.c{i}"
                for i, c in enumerate(columns)
            )
            source = f"SELECT $1, {picks} FROM unnest({', '.join(arrays)}) AS u({names})"
        return [Statement(f"{head} {source}{suffix}", tuple(params.values), output)]
    per_row = len(columns)
    chunk = max(1, MAX_PARAMETERS // max(per_row, 1))
    statements = []
    for start in range(0, row_count, chunk):
        params = _Params(workspace)
        tuples = []
        for r in range(start, min(start + chunk, row_count)):
            cells = [params.typed(c, by_column[j][r]) for j, c in enumerate(columns)]
            tuples.append("($1, " + ", ".join(cells) + ")")
        statements.append(
            Statement(f"{head} VALUES {', '.join(tuples)}{suffix}", tuple(params.values), output)
        )
    return statements


def compile_insert(table: Table, request: workspace_service_pb2.InsertRequest) -> list[Statement]:
    workspace = workspace_value(table, request.workspace_id)
    columns, by_column = _insert_columns(table, request.columns, request.rows, workspace)
    output = returning_columns(table, request.returning)
    return _insert_statements(
        table, columns, by_column, len(request.rows), workspace, _returning_sql(output), output
    )


def compile_upsert(table: Table, request: workspace_service_pb2.UpsertRequest) -> list[Statement]:
    workspace = workspace_value(table, request.workspace_id)
    columns, by_column = _insert_columns(table, request.columns, request.rows, workspace)
    given = {c.name for c in columns} | {WORKSPACE_COLUMN}
    conflict = _unique_columns(table, request.conflict_columns, "conflict_columns")
    for i, column in enumerate(conflict):
        if column.name not in given:
            raise invalid_argument(
                f"conflict_columns[{i}]", f"column {column.name!r} is not among `columns`"
            )
    if conflict:
        named = {c.name for c in conflict}
        keys = [set(key) for key in table.unique_keys]
        if named not in keys:
            # Callers never write workspace_id themselves, so ("name",) means the
            # key (workspace_id, name) when that is the unique key the table has.
            if named | {WORKSPACE_COLUMN} not in keys:
                raise invalid_argument(
                    "conflict_columns",
                    "the conflict columns are not a unique key of the table",
                    reason="NOT_A_UNIQUE_KEY",
                )
            conflict = [table.workspace_column, *conflict]
    target = "(" + ", ".join(c.quoted for c in conflict) + ")" if conflict else ""
    action = request.on_conflict
    if action == workspace_service_pb2.CONFLICT_ACTION_UPDATE:
        if not conflict:
            raise invalid_argument(
                "conflict_columns", "CONFLICT_ACTION_UPDATE needs conflict columns"
            )
        if request.update_columns:
            updates = _unique_columns(table, request.update_columns, "update_columns")
            for i, column in enumerate(updates):
                if column.name == WORKSPACE_COLUMN or column.name not in given:
                    raise invalid_argument(
                        f"update_columns[{i}]",
                        f"column {column.name!r} cannot be updated from `columns`",
                    )
        else:
            names = {c.name for c in conflict}
            updates = [c for c in columns if c.name not in names]
        if updates:
            sets = ", ".join(f"{c.quoted} = EXCLUDED.{c.quoted}" for c in updates)
            ws = table.workspace_column.quoted
            # A conflicting row of another workspace is never overwritten.
            clause = (
                f" ON CONFLICT {target} DO UPDATE SET {sets} WHERE {_TARGET}.{ws} = EXCLUDED.{ws}"
            )
        else:
            clause = f" ON CONFLICT {target} DO NOTHING"
    elif action == workspace_service_pb2.CONFLICT_ACTION_IGNORE:
        clause = f" ON CONFLICT {target} DO NOTHING"
    else:
        raise invalid_argument(
            "on_conflict", "CONFLICT_ACTION_UPDATE or CONFLICT_ACTION_IGNORE is required"
        )
    output = returning_columns(table, request.returning)
    return _insert_statements(
        table,
        columns,
        by_column,
        len(request.rows),
        workspace,
        clause + _returning_sql(output),
        output,
    )


def _require_filter(has_filter: bool, allow_unfiltered: bool) -> None:
    if not has_filter and not allow_unfiltered:
        raise invalid_argument(
            "filter",
            "a filter is required; set allow_unfiltered to change every row of the workspace",
            reason="FILTER_REQUIRED",
        )


def compile_update(table: Table, request: workspace_service_pb2.UpdateRequest) -> Statement:
    params = _Params(workspace_value(table, request.workspace_id))
    has_filter = request.HasField("filter")
    _require_filter(has_filter, request.allow_unfiltered)
    if not request.values:
        raise invalid_argument("values", "at least one column value is required")
    sets = []
    for name in sorted(request.values):  # sorted: the same request shape gives the same SQL
        path = f'values["{name[:100]}"]'
        column = table.column(name, path)
        if column.name == WORKSPACE_COLUMN:
            raise invalid_argument(
                path, "workspace_id cannot be changed", reason="WORKSPACE_MISMATCH"
            )
        if column.generated:
            raise invalid_argument(path, f"column {name!r} is generated and cannot be written")
        sets.append(
            f"{column.quoted} = "
            f"{params.typed(column, values.to_db(column, request.values[name], path))}"
        )
    where = _where(table, params, request.filter if has_filter else None)
    output = returning_columns(table, request.returning)
    sql = (
        f"UPDATE {table.qualified} AS {_TARGET} SET {', '.join(sets)} "
        f"WHERE {where}{_returning_sql(output)}"
    )
    return Statement(sql, tuple(params.values), output)


def compile_delete(table: Table, request: workspace_service_pb2.DeleteRequest) -> Statement:
    params = _Params(workspace_value(table, request.workspace_id))
    has_filter = request.HasField("filter")
    _require_filter(has_filter, request.allow_unfiltered)
    where = _where(table, params, request.filter if has_filter else None)
    output = returning_columns(table, request.returning)
    sql = f"DELETE FROM {table.qualified} AS {_TARGET} WHERE {where}{_returning_sql(output)}"
    return Statement(sql, tuple(params.values), output)


def column_names(columns: Iterable[Column]) -> list[str]:
    return [c.name for c in columns]
