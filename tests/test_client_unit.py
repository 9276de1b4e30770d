"""Tests of the typed client that need no RaptorFlow server and no database.

Value conversion, the builder's exact request protos, the service config and
the error tree are checked directly; the call path (defaults, retries, errors
on the wire, pagination) against a scripted in-process grpc.aio servicer.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import grpc
import grpc.aio
import pytest
from fake_grpc import Failure, Received, fail, received, serve
from google.protobuf import any_pb2, struct_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from raptorflow.data import client as rf
from raptorflow.data.client import _config, _errors
from raptorflow.data.v1 import (
    query_pb2,
    value_pb2,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)

WS = "0a700930-722d-4b2c-b5c1-1b2d7cdb954e"
OTHER_WS = "5f0c6b1e-9d7a-4c1e-8f61-0d3b1c2a4e55"
SERVICE = workspace_service_pb2.DESCRIPTOR.services_by_name["WorkspaceService"]

# --------------------------------------------------------------------------
# Values


ROUND_TRIPS: list[object] = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    1.5,
    -0.0,
    math.inf,
    "",
    "héllo, wörld ✓",
    b"",
    b"\x00\xff\x10",
    datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=UTC),
    datetime(1, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC),
    date(2024, 2, 29),
    date(1, 1, 1),
    UUID("123e4567-e89b-12d3-a456-426614174000"),
    Decimal("12.50"),
    Decimal("-1E-3"),
    Decimal("123456789012345678901234567890.000000000000000001"),
    {"a": [1, 2.5, None, True], "b": {"c": "d"}, "é": "ü"},
    {},
    [1, 2, 3],
    ["a", None, "c"],
    [],
]


@pytest.mark.parametrize("obj", ROUND_TRIPS, ids=repr)
def test_value_round_trip(obj: object) -> None:
    value = rf.to_value(obj)  # type: ignore[arg-type]
    # Through the wire format too, so nothing depends on Python-side state.
    back = rf.from_value(value_pb2.Value.FromString(value.SerializeToString()))
    assert back == obj
    assert type(back) is type(obj)


def test_bool_is_not_sent_as_int() -> None:
    assert rf.to_value(True) == value_pb2.Value(bool_value=True)
    assert rf.to_value(1) == value_pb2.Value(int64_value=1)


def test_nan_round_trips() -> None:
    back = rf.from_value(rf.to_value(math.nan))
    assert isinstance(back, float)
    assert math.isnan(back)
    assert rf.from_value(rf.to_value(Decimal("NaN"))).is_nan()  # type: ignore[union-attr]


@pytest.mark.parametrize("number", [2**63, -(2**63) - 1, 10**30])
def test_int_outside_int64_is_rejected(number: int) -> None:
    with pytest.raises(OverflowError, match="Decimal"):
        rf.to_value(number)


def test_bytes_like_values_become_bytes() -> None:
    assert rf.to_value(bytearray(b"ab")) == value_pb2.Value(bytes_value=b"ab")
    assert rf.to_value(memoryview(b"cd")) == value_pb2.Value(bytes_value=b"cd")


def test_timestamp_keeps_microseconds_and_normalises_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    moment = datetime(2024, 5, 1, 14, 30, 0, 123_456, tzinfo=plus_two)
    value = rf.to_value(moment)
    assert value.timestamp_value.seconds == int(
        datetime(2024, 5, 1, 12, 30, tzinfo=UTC).timestamp()
    )
    assert value.timestamp_value.nanos == 123_456_000
    back = rf.from_value(value)
    assert back == moment
    assert isinstance(back, datetime)
    assert back.tzinfo is UTC


def test_naive_datetime_is_rejected_with_a_hint() -> None:
    with pytest.raises(ValueError, match=r"tzinfo=timezone\.utc"):
        rf.to_value(datetime(2024, 5, 1, 12, 0))


def test_date_is_not_mistaken_for_datetime() -> None:
    assert rf.to_value(date(2024, 5, 1)) == value_pb2.Value(
        date_value=value_pb2.Date(year=2024, month=5, day=1)
    )


def test_uuid_and_decimal_are_sent_as_text() -> None:
    uid = UUID("123e4567-e89b-12d3-a456-426614174000")
    assert rf.to_value(uid) == value_pb2.Value(uuid_value=str(uid))
    assert rf.to_value(Decimal("12.50")) == value_pb2.Value(decimal_value="12.50")
    with pytest.raises(ValueError, match="signalling"):
        rf.to_value(Decimal("sNaN"))


def test_json_documents() -> None:
    assert rf.to_value({"b": 1, "a": [True, None]}) == value_pb2.Value(
        json_value='{"b":1,"a":[true,null]}'
    )
    # A list or str needs Json() to be JSON rather than an array or text.
    assert rf.to_value(rf.Json(["x", 1])) == value_pb2.Value(json_value='["x",1]')
    assert rf.to_value(rf.Json("x")) == value_pb2.Value(json_value='"x"')
    assert rf.from_value(value_pb2.Value(json_value='["x",1]')) == ["x", 1]
    assert rf.from_value(value_pb2.Value(json_value="null")) is None
    with pytest.raises(ValueError, match="JSON"):
        rf.to_value({"x": math.nan})


def test_vector() -> None:
    value = rf.to_value(rf.Vector([0.5, -1.25, 3]))
    assert value == value_pb2.Value(vector_value=value_pb2.FloatVector(values=[0.5, -1.25, 3.0]))
    assert rf.from_value(value) == [0.5, -1.25, 3.0]


def test_array_elements_are_converted() -> None:
    when = datetime(2024, 1, 1, tzinfo=UTC)
    value = rf.to_value((1, None, when, {"k": "v"}))
    assert [element.WhichOneof("kind") for element in value.array_value.values] == [
        "int64_value",
        "null_value",
        "timestamp_value",
        "json_value",
    ]
    assert rf.to_value([]) == value_pb2.Value(array_value=value_pb2.ArrayValue())


@pytest.mark.parametrize("nested", [[[1, 2]], [(1,)], [rf.Vector([1.0])]])
def test_nested_arrays_are_rejected(nested: Any) -> None:
    with pytest.raises(ValueError, match="one-dimensional"):
        rf.to_value(nested)


@pytest.mark.parametrize("obj", [object(), {1, 2}, timedelta(seconds=1), 1 + 2j])
def test_unsupported_types_are_rejected(obj: Any) -> None:
    with pytest.raises(TypeError, match="text form"):
        rf.to_value(obj)


def test_value_without_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="no kind"):
        rf.from_value(value_pb2.Value())


# --------------------------------------------------------------------------
# Builders: exact request protos


@pytest.fixture
async def client() -> AsyncIterator[rf.DataClient]:
    # Never connected: building requests needs the client object only.
    async with rf.DataClient("127.0.0.1:1") as data_client:
        yield data_client


@pytest.fixture
def ws(client: rf.DataClient) -> rf.Workspace:
    return client.workspace(WS)


def _string(text: str) -> value_pb2.Value:
    return value_pb2.Value(string_value=text)


def _cond(
    column: str, operator: query_pb2.Operator.ValueType, value: value_pb2.Value | None = None
) -> query_pb2.Filter:
    return query_pb2.Filter(
        condition=query_pb2.Condition(column=column, operator=operator, value=value)
    )


def test_issue_example_builds_the_expected_select(ws: rf.Workspace) -> None:
    query = (
        ws.table("campaigns")
        .select("id", "name")
        .eq("status", "active")
        .order("created_at", desc=True)
        .limit(20)
    )
    assert query.to_request() == workspace_service_pb2.SelectRequest(
        workspace_id=WS,
        table="campaigns",
        columns=["id", "name"],
        filter=_cond("status", query_pb2.OPERATOR_EQ, _string("active")),
        order_by=[query_pb2.OrderBy(column="created_at", descending=True)],
        page_size=20,
    )


def test_workspace_id_is_canonicalised(client: rf.DataClient) -> None:
    assert client.workspace(WS.upper()).id == WS
    assert client.workspace(UUID(WS)).id == WS
    with pytest.raises(ValueError, match="not a UUID"):
        client.workspace("workspace-1")


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        ((), []),
        (("*",), []),
        (("id, name",), ["id", "name"]),
        (("id", "name , status"), ["id", "name", "status"]),
    ],
)
def test_select_columns(ws: rf.Workspace, columns: tuple[str, ...], expected: list[str]) -> None:
    assert list(ws.table("t").select(*columns).to_request().columns) == expected


def test_select_star_with_names_is_rejected(ws: rf.Workspace) -> None:
    with pytest.raises(ValueError, match="every column"):
        ws.table("t").select("*", "id")


@pytest.mark.parametrize(
    ("method", "operator"),
    [
        ("eq", query_pb2.OPERATOR_EQ),
        ("neq", query_pb2.OPERATOR_NEQ),
        ("gt", query_pb2.OPERATOR_GT),
        ("gte", query_pb2.OPERATOR_GTE),
        ("lt", query_pb2.OPERATOR_LT),
        ("lte", query_pb2.OPERATOR_LTE),
        ("like", query_pb2.OPERATOR_LIKE),
        ("ilike", query_pb2.OPERATOR_ILIKE),
    ],
)
def test_comparison_methods_and_constructors(
    ws: rf.Workspace, method: str, operator: query_pb2.Operator.ValueType
) -> None:
    expected = _cond("name", operator, _string("x%"))
    built = getattr(ws.table("t").select(), method)("name", "x%").to_request().filter
    assert built == expected
    assert getattr(rf, method)("name", "x%") == expected


def test_operand_free_and_list_filters(ws: rf.Workspace) -> None:
    assert rf.is_null("a") == _cond("a", query_pb2.OPERATOR_IS_NULL)
    assert rf.is_not_null("a") == _cond("a", query_pb2.OPERATOR_IS_NOT_NULL)
    assert not rf.is_null("a").condition.HasField("value")
    assert ws.table("t").count().in_("id", [1, 2]).to_request().filter == query_pb2.Filter(
        condition=query_pb2.Condition(
            column="id",
            operator=query_pb2.OPERATOR_IN,
            values=[value_pb2.Value(int64_value=1), value_pb2.Value(int64_value=2)],
        )
    )


def test_contains_always_sends_json(ws: rf.Workspace) -> None:
    json_list = value_pb2.Value(json_value='["a"]')
    assert rf.contains("tags", ["a"]) == _cond("tags", query_pb2.OPERATOR_JSON_CONTAINS, json_list)
    assert ws.table("t").select().contains("meta", {"k": 1}).to_request().filter == _cond(
        "meta", query_pb2.OPERATOR_JSON_CONTAINS, value_pb2.Value(json_value='{"k":1}')
    )


def test_bad_filter_operands_fail_early() -> None:
    with pytest.raises(ValueError, match="is_null"):
        rf.eq("a", None)
    with pytest.raises(ValueError, match="at least one"):
        rf.in_("a", [])
    with pytest.raises(TypeError, match="list of values"):
        rf.in_("a", "abc")
    with pytest.raises(ValueError, match="at least one"):
        rf.any_of()
    with pytest.raises(ValueError, match=r"column 'a'.*naive"):
        rf.gt("a", datetime(2024, 1, 1))


def test_several_filters_are_joined_with_and_in_order(ws: rf.Workspace) -> None:
    nested = rf.any_of(rf.eq("status", "paused"), rf.not_(rf.is_null("owner")))
    request = ws.table("t").select().gte("n", 1).where(nested).to_request()
    assert request.filter == query_pb2.Filter(
        group=query_pb2.FilterGroup(
            operator=query_pb2.GROUP_OPERATOR_AND,
            filters=[
                _cond("n", query_pb2.OPERATOR_GTE, value_pb2.Value(int64_value=1)),
                query_pb2.Filter(
                    group=query_pb2.FilterGroup(
                        operator=query_pb2.GROUP_OPERATOR_OR,
                        filters=[
                            _cond("status", query_pb2.OPERATOR_EQ, _string("paused")),
                            query_pb2.Filter(
                                negation=query_pb2.Negation(
                                    filter=_cond("owner", query_pb2.OPERATOR_IS_NULL)
                                )
                            ),
                        ],
                    )
                ),
            ],
        )
    )
    assert rf.all_of(rf.eq("a", 1)).group.operator == query_pb2.GROUP_OPERATOR_AND


def test_builders_are_immutable(ws: rf.Workspace) -> None:
    base = ws.table("t").select("id").eq("a", 1)
    before = base.to_request()
    narrowed = base.eq("b", 2).order("id").limit(5).page_token("tok")
    assert base.to_request() == before
    assert narrowed.to_request().page_token == "tok"
    assert len(narrowed.to_request().filter.group.filters) == 2

    condition = rf.eq("a", 1)
    query = ws.table("t").select().where(condition)
    condition.condition.column = "changed"
    assert query.to_request().filter.condition.column == "a"


def test_order_is_repeatable_and_limit_checked(ws: rf.Workspace) -> None:
    request = ws.table("t").select().order("a").order("b", desc=True).to_request()
    assert list(request.order_by) == [
        query_pb2.OrderBy(column="a"),
        query_pb2.OrderBy(column="b", descending=True),
    ]
    with pytest.raises(ValueError, match="at least 1"):
        ws.table("t").select().limit(0)


def test_count_request(ws: rf.Workspace) -> None:
    assert ws.table("t").count().is_null("x").to_request() == workspace_service_pb2.CountRequest(
        workspace_id=WS, table="t", filter=_cond("x", query_pb2.OPERATOR_IS_NULL)
    )


def test_insert_columns_are_the_union_of_keys_in_first_seen_order(ws: rf.Workspace) -> None:
    request = ws.table("t").insert([{"b": 1, "a": "x"}, {"a": "y", "b": None}]).to_request()
    assert request == workspace_service_pb2.InsertRequest(
        workspace_id=WS,
        table="t",
        columns=["b", "a"],
        rows=[
            value_pb2.Row(values=[value_pb2.Value(int64_value=1), _string("x")]),
            value_pb2.Row(values=[value_pb2.Value(null_value=struct_pb2.NULL_VALUE), _string("y")]),
        ],
        returning=["*"],
    )


def test_insert_single_row_and_returning(ws: rf.Workspace) -> None:
    table = ws.table("t")
    assert len(table.insert({"a": 1}).to_request().rows) == 1
    assert list(table.insert({"a": 1}, returning=()).to_request().returning) == []
    assert list(table.insert({"a": 1}, returning="id, a").to_request().returning) == ["id", "a"]
    assert list(table.insert({"a": 1}).returning("id").to_request().returning) == ["id"]
    assert list(table.insert({"a": 1}).returning().to_request().returning) == []


def test_insert_rows_with_different_keys_are_rejected(ws: rf.Workspace) -> None:
    with pytest.raises(ValueError, match=r"row 0 has no value for 'c'"):
        ws.table("t").insert([{"a": 1}, {"a": 2, "c": 3}])
    with pytest.raises(ValueError, match="no rows"):
        ws.table("t").insert([])
    with pytest.raises(OverflowError, match=r"row 1, column 'a'"):
        ws.table("t").insert([{"a": 1}, {"a": 2**64}])


def test_upsert_request(ws: rf.Workspace) -> None:
    request = (
        ws.table("t")
        .upsert({"slug": "s", "n": 1}, on_conflict="workspace_id, slug", update_columns=["n"])
        .to_request()
    )
    assert request == workspace_service_pb2.UpsertRequest(
        workspace_id=WS,
        table="t",
        columns=["slug", "n"],
        rows=[value_pb2.Row(values=[_string("s"), value_pb2.Value(int64_value=1)])],
        conflict_columns=["workspace_id", "slug"],
        on_conflict=workspace_service_pb2.CONFLICT_ACTION_UPDATE,
        update_columns=["n"],
        returning=["*"],
    )
    ignored = ws.table("t").upsert([{"id": 1}], on_conflict=["id"], ignore_duplicates=True)
    assert ignored.to_request().on_conflict == workspace_service_pb2.CONFLICT_ACTION_IGNORE
    with pytest.raises(ValueError, match="no effect"):
        ws.table("t").upsert(
            {"id": 1}, on_conflict="id", ignore_duplicates=True, update_columns="a"
        )
    with pytest.raises(ValueError, match="unique key"):
        ws.table("t").upsert({"id": 1}, on_conflict=())


def test_update_request(ws: rf.Workspace) -> None:
    request = ws.table("t").update({"status": "done", "n": 2}).eq("id", 7).to_request()
    assert request == workspace_service_pb2.UpdateRequest(
        workspace_id=WS,
        table="t",
        values={"status": _string("done"), "n": value_pb2.Value(int64_value=2)},
        filter=_cond("id", query_pb2.OPERATOR_EQ, value_pb2.Value(int64_value=7)),
        returning=["*"],
    )
    with pytest.raises(ValueError, match="at least one column"):
        ws.table("t").update({})


def test_unfiltered_update_and_delete_need_all_rows(ws: rf.Workspace) -> None:
    with pytest.raises(ValueError, match=r"\.all_rows\(\)"):
        ws.table("t").update({"a": 1}).to_request()
    with pytest.raises(ValueError, match=r"\.all_rows\(\)"):
        ws.table("t").delete().to_request()
    assert ws.table("t").update({"a": 1}).all_rows().to_request().allow_unfiltered
    request = ws.table("t").delete().all_rows().returning().to_request()
    assert request == workspace_service_pb2.DeleteRequest(
        workspace_id=WS, table="t", allow_unfiltered=True
    )


def test_delete_request(ws: rf.Workspace) -> None:
    assert ws.table("t").delete().lt("n", 0).returning("id").to_request() == (
        workspace_service_pb2.DeleteRequest(
            workspace_id=WS,
            table="t",
            filter=_cond("n", query_pb2.OPERATOR_LT, value_pb2.Value(int64_value=0)),
            returning=["id"],
        )
    )


def test_builder_repr_is_one_line(ws: rf.Workspace) -> None:
    text = repr(ws.table("campaigns").select("id").eq("status", "active"))
    assert "\n" not in text
    assert text.startswith("SelectQuery(workspace_id=")
    assert "OPERATOR_EQ" in text


async def test_batch_is_checked_before_sending(client: rf.DataClient) -> None:
    ws = client.workspace(WS)
    with pytest.raises(ValueError, match="at least one"):
        await ws.batch()
    foreign = client.workspace(OTHER_WS).table("t").insert({"a": 1})
    with pytest.raises(ValueError, match="operation 0 was built for workspace"):
        await ws.batch(foreign)
    with pytest.raises(ValueError, match="all_rows"):
        await ws.batch(ws.table("t").delete())


# --------------------------------------------------------------------------
# Config


def test_service_config_covers_every_method_with_the_right_policy() -> None:
    config = rf.ClientConfig("localhost:1")
    options = dict(config.channel_arguments())
    service_config = json.loads(options["grpc.service_config"])
    retried: dict[str, set[str]] = {}
    for method_config in service_config["methodConfig"]:
        policy = method_config["retryPolicy"]
        assert 2 <= policy["maxAttempts"] <= 5
        for name in method_config["name"]:
            # MemorySyncService's policies: tests/test_client_memory_unit.py.
            if name["service"] == SERVICE.full_name:
                retried[name["method"]] = set(policy["retryableStatusCodes"])
    reads = {"DescribeTables", "Select", "Count"}
    assert set(retried) == {method.name for method in SERVICE.methods}
    for method, codes in retried.items():
        # Writes retry only what the server guarantees was rolled back.
        assert codes == ({"UNAVAILABLE", "ABORTED"} if method in reads else {"ABORTED"})
    assert options["grpc.enable_retries"] == 1
    assert "loadBalancingConfig" not in service_config


def test_config_options() -> None:
    config = rf.ClientConfig(
        "localhost:1",
        enable_retries=False,
        max_send_message_bytes=1024,
        max_receive_message_bytes=None,
        load_balancing_policy="round_robin",
        channel_options=[("grpc.enable_retries", 1), ("grpc.keepalive_time_ms", 30_000)],
    )
    options = config.channel_arguments()
    keys = [key for key, _ in options]
    assert len(keys) == len(set(keys))
    as_dict = dict(options)
    # An explicit channel option wins over what the config derives.
    assert as_dict["grpc.enable_retries"] == 1
    assert as_dict["grpc.keepalive_time_ms"] == 30_000
    assert as_dict["grpc.max_send_message_length"] == 1024
    assert "grpc.max_receive_message_length" not in as_dict
    service_config = json.loads(as_dict["grpc.service_config"])
    assert service_config["loadBalancingConfig"] == [{"round_robin": {}}]


def test_config_is_frozen() -> None:
    config = rf.ClientConfig("localhost:1")
    with pytest.raises(AttributeError):
        config.timeout = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "timeout", [0, -1.0, math.nan, math.inf, 1e10, 1e300, rf.MAX_TIMEOUT_SECONDS * 1.01]
)
def test_config_refuses_a_timeout_grpc_cannot_send(timeout: float) -> None:
    # inf or 1e10 used to be accepted, and then every call failed at once with
    # DEADLINE_EXCEEDED (gRPC's deadline, int64 nanoseconds, overflowed).
    with pytest.raises(ValueError, match=r"ClientConfig\.timeout=.* None sets no deadline"):
        rf.ClientConfig("localhost:1", timeout=timeout)


def test_config_takes_no_deadline_and_up_to_the_longest_timeout() -> None:
    assert rf.MAX_TIMEOUT_SECONDS == 100 * 365.25 * 86_400
    for timeout in (None, 0.001, 1, 1e9, rf.MAX_TIMEOUT_SECONDS):
        assert rf.ClientConfig("localhost:1", timeout=timeout).timeout == timeout
    with pytest.raises(TypeError, match="timeout"):
        rf.ClientConfig("localhost:1", timeout=True)
    with pytest.raises(TypeError, match="timeout"):
        rf.ClientConfig("localhost:1", timeout="10")  # type: ignore[arg-type]


def test_call_metadata_replaces_defaults_by_key() -> None:
    merged = _config.merge_metadata(
        {"Authorization": "Bearer a", "x-agent": "one"},
        [("authorization", "Bearer b"), ("x-trace", "t")],
    )
    assert merged == [("x-agent", "one"), ("authorization", "Bearer b"), ("x-trace", "t")]
    assert _config.merge_metadata((("a", "1"),), None) == [("a", "1")]


# --------------------------------------------------------------------------
# Errors


def _packed(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _rich_status() -> status_pb2.Status:
    return status_pb2.Status(
        code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
        message="column 'nme' is not in table 'campaigns'",
        details=[
            _packed(
                error_details_pb2.ErrorInfo(
                    reason="UNKNOWN_COLUMN",
                    domain="data.raptorflow.dev",
                    metadata={"table": "campaigns", "column": "nme"},
                )
            ),
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field="filter.condition.column",
                            description="no column 'nme' in table 'campaigns'",
                        )
                    ]
                )
            ),
            # Kinds the client does not unpack are skipped, not fatal.
            _packed(error_details_pb2.RetryInfo()),
        ],
    )


def _rpc_error(
    code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str | bytes], ...] = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details, "debug"
    )


def test_error_details_are_unpacked_from_trailing_metadata() -> None:
    status = _rich_status()
    err = _rpc_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        status.message,
        (("grpc-status-details-bin", status.SerializeToString()),),
    )
    error = rf.from_rpc_error(err)
    assert isinstance(error, rf.InvalidArgument)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == status.message
    assert error.reason == "UNKNOWN_COLUMN"
    assert error.domain == rf.ERROR_DOMAIN
    assert error.metadata == {"table": "campaigns", "column": "nme"}
    assert error.field_violations == (
        rf.FieldViolation("filter.condition.column", "no column 'nme' in table 'campaigns'"),
    )
    assert error.field_violations[0].field == "filter.condition.column"
    assert error.status == status
    assert error.__cause__ is err
    text = str(error)
    assert text.startswith("INVALID_ARGUMENT: column 'nme'")
    assert "[UNKNOWN_COLUMN]" in text
    assert "filter.condition.column: no column" in text


def test_error_without_details() -> None:
    error = rf.from_rpc_error(_rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert isinstance(error, rf.Unavailable)
    assert (error.message, error.reason, error.field_violations) == ("connection refused", "", ())
    assert error.status is None


def test_undecodable_details_fall_back_to_the_status_message() -> None:
    err = _rpc_error(
        grpc.StatusCode.ABORTED, "deadlock", (("grpc-status-details-bin", b"\xff\xff\xff"),)
    )
    error = rf.from_rpc_error(err)
    assert isinstance(error, rf.Aborted)
    assert error.message == "deadlock"


def test_one_error_class_per_status_code() -> None:
    classes = {code: _errors.error_class(code) for code in grpc.StatusCode}
    failures = {code: cls for code, cls in classes.items() if code is not grpc.StatusCode.OK}
    assert len(set(failures.values())) == len(failures) == 16
    for code, cls in failures.items():
        assert issubclass(cls, rf.DataError)
        assert cls.code is code
        assert isinstance(rf.from_rpc_error(_rpc_error(code, "x")), cls)
    assert classes[grpc.StatusCode.OK] is rf.UnknownError


def test_error_tree_is_drawn_in_the_module_docstring() -> None:
    doc = _errors.__doc__ or ""
    for cls in set(map(_errors.error_class, grpc.StatusCode)) | {rf.DataError}:
        assert cls.__name__ in doc
        if cls is not rf.DataError:
            assert cls.code.name in doc


# --------------------------------------------------------------------------
# Calls, against a scripted in-process servicer


@dataclass
class _Script:
    """What the fake servicer answers: failures first, then the response."""

    failures: list[Failure] = field(default_factory=list)
    respond: Callable[[Any], Message] | None = None


class _FakeWorkspaceService(workspace_service_pb2_grpc.WorkspaceServiceServicer):
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.scripts: dict[str, _Script] = {}

    async def _handle(self, method: str, request: Any, context: Any) -> Any:
        self.received.append(received(method, request, context))
        script = self.scripts.get(method, _Script())
        if script.failures:
            await fail(context, script.failures.pop(0))
        assert script.respond is not None, f"no response scripted for {method}"
        return script.respond(request)

    async def DescribeTables(self, request: Any, context: Any) -> Any:
        return await self._handle("DescribeTables", request, context)

    async def Select(self, request: Any, context: Any) -> Any:
        return await self._handle("Select", request, context)

    async def Count(self, request: Any, context: Any) -> Any:
        return await self._handle("Count", request, context)

    async def Insert(self, request: Any, context: Any) -> Any:
        return await self._handle("Insert", request, context)

    async def Upsert(self, request: Any, context: Any) -> Any:
        return await self._handle("Upsert", request, context)

    async def Update(self, request: Any, context: Any) -> Any:
        return await self._handle("Update", request, context)

    async def Delete(self, request: Any, context: Any) -> Any:
        return await self._handle("Delete", request, context)

    async def ExecuteBatch(self, request: Any, context: Any) -> Any:
        return await self._handle("ExecuteBatch", request, context)


@dataclass
class _Fake:
    service: _FakeWorkspaceService
    target: str


@pytest.fixture(scope="module")
async def fake_server() -> AsyncIterator[_Fake]:
    service = _FakeWorkspaceService()
    async with serve(
        lambda server: workspace_service_pb2_grpc.add_WorkspaceServiceServicer_to_server(
            service, server
        )
    ) as target:
        yield _Fake(service, target)


@pytest.fixture
def fake(fake_server: _Fake) -> _Fake:
    fake_server.service.received.clear()
    fake_server.service.scripts.clear()
    return fake_server


def _rows(*rows: tuple[Any, ...]) -> list[value_pb2.Row]:
    return [value_pb2.Row(values=[rf.to_value(cell) for cell in row]) for row in rows]


def _config_for(fake: _Fake, **overrides: Any) -> rf.ClientConfig:
    defaults: dict[str, Any] = {"timeout": 5.0, "metadata": {"authorization": "Bearer cfg"}}
    return rf.ClientConfig(fake.target, **(defaults | overrides))


async def test_select_returns_typed_rows_and_sends_defaults(fake: _Fake) -> None:
    created = datetime(2024, 5, 1, 12, 0, 0, 5, tzinfo=UTC)
    fake.service.scripts["Select"] = _Script(
        respond=lambda _: workspace_service_pb2.SelectResponse(
            columns=["id", "created_at", "tags"],
            rows=_rows((1, created, ["a", "b"]), (2, None, [])),
            next_page_token="next",
        )
    )
    async with rf.DataClient(_config_for(fake)) as client:
        query = client.workspace(WS).table("campaigns").select("id").eq("status", "active")
        result = await query.execute()
        await query.execute(timeout=1.5, metadata={"Authorization": "Bearer call", "x-k": "v"})
    assert result == rf.SelectResult(
        data=[
            {"id": 1, "created_at": created, "tags": ["a", "b"]},
            {"id": 2, "created_at": None, "tags": []},
        ],
        columns=["id", "created_at", "tags"],
        next_page_token="next",
    )
    first, second = fake.service.received
    assert first.request == query.to_request()
    assert first.metadata["authorization"] == "Bearer cfg"
    # The grpc-timeout header rounds the deadline up, hence the slack.
    assert first.time_remaining is not None
    assert 4.0 < first.time_remaining < 5.5
    assert second.metadata["authorization"] == "Bearer call"
    assert second.metadata["x-k"] == "v"
    assert second.time_remaining is not None
    assert 0.5 < second.time_remaining < 2.0


async def test_no_deadline_when_timeout_is_none(fake: _Fake) -> None:
    fake.service.scripts["Count"] = _Script(
        respond=lambda _: workspace_service_pb2.CountResponse(count=42)
    )
    async with rf.DataClient(_config_for(fake, timeout=None)) as client:
        assert await client.workspace(WS).table("t").count().execute() == 42
        await client.workspace(WS).table("t").count().execute(timeout=None)
    for call in fake.service.received:
        assert call.time_remaining is None


async def test_a_call_timeout_grpc_cannot_send_fails_before_sending(fake: _Fake) -> None:
    fake.service.scripts["Count"] = _Script(
        respond=lambda _: workspace_service_pb2.CountResponse(count=42)
    )
    async with rf.DataClient(_config_for(fake)) as client:
        count = client.workspace(WS).table("t").count()
        for timeout in (math.inf, math.nan, 1e10):
            with pytest.raises(ValueError, match="None sets no deadline"):
                await count.execute(timeout=timeout)
        assert fake.service.received == []
        # The longest one there is goes out as a deadline (which gRPC's grpc-timeout
        # header caps, at about three years: far ahead anyway).
        assert await count.execute(timeout=rf.MAX_TIMEOUT_SECONDS) == 42
    (call,) = fake.service.received
    assert call.time_remaining is not None
    assert call.time_remaining > 1e7


async def test_pages_and_stream_follow_page_tokens(fake: _Fake) -> None:
    def respond(request: workspace_service_pb2.SelectRequest) -> Message:
        page = {"": (1, "p2"), "p2": (2, "p3"), "p3": (3, "")}[request.page_token]
        return workspace_service_pb2.SelectResponse(
            columns=["id"], rows=_rows((page[0],)), next_page_token=page[1]
        )

    fake.service.scripts["Select"] = _Script(respond=respond)
    async with rf.DataClient(_config_for(fake)) as client:
        query = client.workspace(WS).table("t").select("id").limit(1)
        pages = [page async for page in query.pages()]
        rows = [row async for row in query.stream()]
    assert [page.next_page_token for page in pages] == ["p2", "p3", ""]
    assert rows == [{"id": 1}, {"id": 2}, {"id": 3}]
    tokens = [received.request.page_token for received in fake.service.received]  # type: ignore[attr-defined]
    assert tokens == ["", "p2", "p3"] * 2


async def test_mutations_and_describe(fake: _Fake) -> None:
    returning = value_pb2.RowSet(columns=["id"], rows=_rows((10,), (11,)))
    fake.service.scripts["Insert"] = _Script(
        respond=lambda _: workspace_service_pb2.InsertResponse(
            affected_count=2, returning=returning
        )
    )
    fake.service.scripts["Delete"] = _Script(
        respond=lambda _: workspace_service_pb2.DeleteResponse(affected_count=3)
    )
    fake.service.scripts["DescribeTables"] = _Script(
        respond=lambda request: workspace_service_pb2.DescribeTablesResponse(
            tables=[workspace_service_pb2.TableDescription(name=name) for name in request.tables]
        )
    )
    async with rf.DataClient(_config_for(fake)) as client:
        table = client.workspace(WS).table("t")
        inserted = await table.insert([{"a": 1}, {"a": 2}], returning="id").execute()
        deleted = await table.delete().eq("a", 1).returning().execute()
        tables = await client.describe_tables("t", "u")
    assert inserted == rf.MutationResult(data=[{"id": 10}, {"id": 11}], columns=["id"], count=2)
    assert deleted == rf.MutationResult(data=[], columns=[], count=3)
    assert [table.name for table in tables] == ["t", "u"]


async def test_batch_sends_one_request_and_returns_results_in_order(fake: _Fake) -> None:
    fake.service.scripts["ExecuteBatch"] = _Script(
        respond=lambda _: workspace_service_pb2.ExecuteBatchResponse(
            results=[
                workspace_service_pb2.BatchResult(
                    update=workspace_service_pb2.UpdateResponse(affected_count=4)
                ),
                workspace_service_pb2.BatchResult(
                    insert=workspace_service_pb2.InsertResponse(
                        affected_count=1,
                        returning=value_pb2.RowSet(columns=["id"], rows=_rows((9,))),
                    )
                ),
            ]
        )
    )
    async with rf.DataClient(_config_for(fake)) as client:
        ws = client.workspace(WS)
        update = ws.table("t").update({"s": "x"}).eq("id", 1).returning()
        insert = ws.table("log").insert({"kind": "sweep"}, returning="id")
        updated, inserted = await ws.batch(update, insert)
    assert (updated.count, inserted.data) == (4, [{"id": 9}])
    (received,) = fake.service.received
    assert received.request == workspace_service_pb2.ExecuteBatchRequest(
        workspace_id=WS,
        operations=[
            workspace_service_pb2.BatchOperation(update=update.to_request()),
            workspace_service_pb2.BatchOperation(insert=insert.to_request()),
        ],
    )


async def test_rich_error_from_the_server(fake: _Fake) -> None:
    fake.service.scripts["Select"] = _Script(failures=[_rich_status()])
    async with rf.DataClient(_config_for(fake)) as client:
        with pytest.raises(rf.InvalidArgument) as caught:
            await client.workspace(WS).table("campaigns").select().eq("nme", 1).execute()
    assert caught.value.reason == "UNKNOWN_COLUMN"
    assert caught.value.field_violations[0].field == "filter.condition.column"
    assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)


async def test_reads_retry_unavailable_and_aborted(fake: _Fake) -> None:
    fake.service.scripts["Select"] = _Script(
        failures=[grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED],
        respond=lambda _: workspace_service_pb2.SelectResponse(),
    )
    async with rf.DataClient(_config_for(fake)) as client:
        result = await client.workspace(WS).table("t").select().execute()
    assert result.data == []
    assert len(fake.service.received) == 3


async def test_writes_retry_aborted_only(fake: _Fake) -> None:
    fake.service.scripts["Insert"] = _Script(
        failures=[grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE],
        respond=lambda _: workspace_service_pb2.InsertResponse(affected_count=1),
    )
    async with rf.DataClient(_config_for(fake)) as client:
        insert = client.workspace(WS).table("t").insert({"a": 1})
        # ABORTED was retried; UNAVAILABLE is not, as the write may have landed.
        with pytest.raises(rf.Unavailable):
            await insert.execute()
    assert len(fake.service.received) == 2


async def test_retries_can_be_disabled(fake: _Fake) -> None:
    fake.service.scripts["Count"] = _Script(
        failures=[grpc.StatusCode.UNAVAILABLE],
        respond=lambda _: workspace_service_pb2.CountResponse(count=1),
    )
    async with rf.DataClient(_config_for(fake, enable_retries=False)) as client:
        with pytest.raises(rf.Unavailable, match="scripted UNAVAILABLE"):
            await client.workspace(WS).table("t").count().execute()
    assert len(fake.service.received) == 1


async def test_connect_waits_for_the_channel(fake: _Fake) -> None:
    client = await rf.DataClient.connect(fake.target, timeout=5)
    try:
        assert client.channel.get_state() is grpc.ChannelConnectivity.READY
        assert client.config.target == fake.target
        assert isinstance(client.stub, workspace_service_pb2_grpc.WorkspaceServiceStub)
    finally:
        await client.close()


async def test_connect_to_nothing_raises_unavailable() -> None:
    # Port 1 on loopback refuses connections, so this fails fast and offline.
    started = asyncio.get_running_loop().time()
    with pytest.raises(rf.Unavailable, match="could not connect"):
        await rf.DataClient.connect("127.0.0.1:1", timeout=0.3)
    assert asyncio.get_running_loop().time() - started < 5
