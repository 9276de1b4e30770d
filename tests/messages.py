"""Builders of request messages: Values from Python scalars, Rows, Filters, requests."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import struct_pb2
from raptorflow.data.v1 import query_pb2, value_pb2, workspace_service_pb2

Value = value_pb2.Value
Row = value_pb2.Row
NULL = Value(null_value=struct_pb2.NULL_VALUE)


def v(x: object) -> Value:
    """The Value of a Python None, bool, int, float or str."""
    if x is None:
        return NULL
    if isinstance(x, bool):
        return Value(bool_value=x)
    if isinstance(x, int):
        return Value(int64_value=x)
    if isinstance(x, float):
        return Value(double_value=x)
    if isinstance(x, str):
        return Value(string_value=x)
    raise TypeError(x)


def row(*cells: object) -> Row:
    """A Row of Values, each given as a Value or as a Python scalar for `v`."""
    return Row(values=[c if isinstance(c, Value) else v(c) for c in cells])


def cond(
    column: str, op: int, value: Value | None = None, values: Sequence[Value] = ()
) -> query_pb2.Filter:
    c = query_pb2.Condition(column=column, operator=op, values=values)
    if value is not None:
        c.value.CopyFrom(value)
    return query_pb2.Filter(condition=c)


def eq(column: str, x: object) -> query_pb2.Filter:
    """`column = x`, x a Value or a Python scalar for `v`."""
    return cond(column, query_pb2.OPERATOR_EQ, x if isinstance(x, Value) else v(x))


def all_of(*filters: query_pb2.Filter) -> query_pb2.Filter:
    return query_pb2.Filter(
        group=query_pb2.FilterGroup(operator=query_pb2.GROUP_OPERATOR_AND, filters=filters)
    )


def any_of(*filters: query_pb2.Filter) -> query_pb2.Filter:
    return query_pb2.Filter(
        group=query_pb2.FilterGroup(operator=query_pb2.GROUP_OPERATOR_OR, filters=filters)
    )


def negate(f: query_pb2.Filter) -> query_pb2.Filter:
    return query_pb2.Filter(negation=query_pb2.Negation(filter=f))


def update_request(workspace: str, row_id: int, status: str) -> workspace_service_pb2.UpdateRequest:
    """Sets the status of the campaign with id `row_id`."""
    return workspace_service_pb2.UpdateRequest(
        workspace_id=workspace,
        table="campaigns",
        values={"status": v(status)},
        filter=eq("id", row_id),
    )
