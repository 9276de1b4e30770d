"""Select and Count: every filter operator, ordering, keyset pagination and page tokens."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import json
import math
import random
import re
import uuid
from collections.abc import Sequence
from typing import Any

import grpc
import pytest
from conftest import CAMPAIGN_COLUMNS, start_server
from google.protobuf import timestamp_pb2
from messages import NULL, Value, all_of, any_of, cond, negate, v
from raptorflow.data.v1 import (
    query_pb2,
    value_pb2,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)
from statuses import rpc_error
from tokens import authorized_channel

pb = workspace_service_pb2
q = query_pb2


def json_value(doc: object) -> Value:
    return Value(json_value=json.dumps(doc))


# ---------------------------------------------------------------------------
# The data set, and an independent evaluator of filters with SQL's three-valued logic


@dataclasses.dataclass(frozen=True)
class Campaign:
    name: str
    status: str | None
    priority: int | None
    score: float | None
    active: bool | None
    meta: Any


CAMPAIGNS = [
    Campaign("alpha", "active", 1, 1.5, True, {"tier": "gold", "labels": ["a", "b"]}),
    Campaign("Beta", "paused", 2, None, False, {"tier": "silver"}),
    Campaign("gamma", "active", None, 2.5, None, None),
    Campaign("delta", None, 2, 0.0, True, {"tier": "gold", "n": 1}),
    Campaign("epsilon", "done", 5, -1.0, False, {"tier": "bronze"}),
    Campaign("zeta", "paused", 3, 2.5, True, {}),
    Campaign("eta", "active", 1, None, None, {"tier": "gold", "nested": {"x": 1, "y": 2}}),
    Campaign("theta_1", "paused", None, 10.0, True, None),
    Campaign("theta%2", "done", 0, 3.25, False, {"tier": "silver", "labels": ["b"]}),
    Campaign("iota", None, None, None, None, None),
    Campaign("KAPPA", "active", 4, 0.5, True, None),
]


def _operand(value: Value) -> Any:
    which = value.WhichOneof("kind")
    if which == "json_value":
        return json.loads(value.json_value)
    return getattr(value, which)  # type: ignore[arg-type]


def _like(pattern: str, text: str, *, fold: bool) -> bool:
    regex, chars = "", iter(pattern)
    for ch in chars:
        if ch == "\\":
            regex += re.escape(next(chars, "\\"))
        elif ch == "%":
            regex += ".*"
        elif ch == "_":
            regex += "."
        else:
            regex += re.escape(ch)
    return re.fullmatch(regex, text, re.DOTALL | (re.IGNORECASE if fold else 0)) is not None


def _contains(doc: Any, part: Any) -> bool:
    """PostgreSQL's jsonb @> for the shapes used here."""
    if isinstance(part, dict):
        return isinstance(doc, dict) and all(
            k in doc and _contains(doc[k], pv) for k, pv in part.items()
        )
    if isinstance(part, list):
        return isinstance(doc, list) and all(any(_contains(d, p) for d in doc) for p in part)
    return doc == part and type(doc) is type(part)


def holds(f: q.Filter, row: Any) -> bool | None:
    """The filter's SQL truth value for `row`: True, False or None (unknown)."""
    kind = f.WhichOneof("kind")
    if kind == "group":
        results = [holds(child, row) for child in f.group.filters]
        if f.group.operator == q.GROUP_OPERATOR_AND:
            return False if False in results else None if None in results else True
        return True if True in results else None if None in results else False
    if kind == "negation":
        inner = holds(f.negation.filter, row)
        return None if inner is None else not inner
    c = f.condition
    cell = getattr(row, c.column)
    if c.operator == q.OPERATOR_IS_NULL:
        return cell is None
    if c.operator == q.OPERATOR_IS_NOT_NULL:
        return cell is not None
    if cell is None:
        return None
    if c.operator == q.OPERATOR_IN:
        return cell in [_operand(x) for x in c.values]
    operand = _operand(c.value)
    match c.operator:
        case q.OPERATOR_EQ:
            return cell == operand
        case q.OPERATOR_NEQ:
            return cell != operand
        case q.OPERATOR_GT:
            return cell > operand
        case q.OPERATOR_GTE:
            return cell >= operand
        case q.OPERATOR_LT:
            return cell < operand
        case q.OPERATOR_LTE:
            return cell <= operand
        case q.OPERATOR_LIKE:
            return _like(operand, cell, fold=False)
        case q.OPERATOR_ILIKE:
            return _like(operand, cell, fold=True)
        case q.OPERATOR_JSON_CONTAINS:
            return _contains(cell, operand)
    raise AssertionError(c.operator)


@dataclasses.dataclass(frozen=True)
class Dataset:
    workspace: str
    ids: dict[str, int]


@pytest.fixture(scope="module")
async def campaigns(stub) -> Dataset:
    workspace = str(uuid.uuid4())
    columns = ["name", "status", "priority", "score", "active", "meta"]
    rows = []
    for c in CAMPAIGNS:
        cells = [
            v(c.name),
            NULL if c.status is None else v(c.status),
            NULL if c.priority is None else v(c.priority),
            NULL if c.score is None else v(c.score),
            NULL if c.active is None else v(c.active),
            NULL if c.meta is None else json_value(c.meta),
        ]
        rows.append(value_pb2.Row(values=cells))
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace, table="campaigns", columns=columns, rows=rows, returning=["id"]
        )
    )
    ids = [r.values[0].int64_value for r in inserted.returning.rows]
    assert ids == sorted(ids)
    return Dataset(workspace, {c.name: i for c, i in zip(CAMPAIGNS, ids, strict=True)})


async def select_names(stub, workspace: str, **request: Any) -> list[str]:
    page = await stub.Select(
        pb.SelectRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name"],
            page_size=1000,
            **request,
        )
    )
    assert list(page.columns) == ["name"]
    assert page.next_page_token == ""
    return [r.values[0].string_value for r in page.rows]


def expected_names(f: q.Filter) -> list[str]:
    return [c.name for c in CAMPAIGNS if holds(f, c) is True]


ID_ORDER = [q.OrderBy(column="id")]

FILTERS = {
    "eq text": cond("status", q.OPERATOR_EQ, v("active")),
    "eq bool": cond("active", q.OPERATOR_EQ, v(True)),
    "eq double": cond("score", q.OPERATOR_EQ, v(2.5)),
    "neq skips nulls": cond("status", q.OPERATOR_NEQ, v("active")),
    "gt int": cond("priority", q.OPERATOR_GT, v(1)),
    "gte int": cond("priority", q.OPERATOR_GTE, v(2)),
    "lt double": cond("score", q.OPERATOR_LT, v(1.5)),
    "lte double": cond("score", q.OPERATOR_LTE, v(2.5)),
    "gt double by int64": cond("score", q.OPERATOR_GT, v(2)),
    "lt text": cond("status", q.OPERATOR_LT, v("e")),
    "in int": cond("priority", q.OPERATOR_IN, values=[v(1), v(3), v(99)]),
    "in text": cond("status", q.OPERATOR_IN, values=[v("done"), v("paused")]),
    "in bool": cond("active", q.OPERATOR_IN, values=[v(False)]),
    "is null": cond("score", q.OPERATOR_IS_NULL),
    "is not null": cond("meta", q.OPERATOR_IS_NOT_NULL),
    "like prefix": cond("name", q.OPERATOR_LIKE, v("theta%")),
    "like escaped underscore": cond("name", q.OPERATOR_LIKE, v("theta\\_%")),
    "like escaped percent": cond("name", q.OPERATOR_LIKE, v("%\\%%")),
    "like one character": cond("name", q.OPERATOR_LIKE, v("_eta")),
    "like is case sensitive": cond("name", q.OPERATOR_LIKE, v("beta")),
    "ilike": cond("name", q.OPERATOR_ILIKE, v("BETA")),
    "ilike wildcard": cond("name", q.OPERATOR_ILIKE, v("%A")),
    "json contains": cond("meta", q.OPERATOR_JSON_CONTAINS, json_value({"tier": "gold"})),
    "json contains nested": cond(
        "meta", q.OPERATOR_JSON_CONTAINS, json_value({"nested": {"x": 1}})
    ),
    "json contains array element": cond(
        "meta", q.OPERATOR_JSON_CONTAINS, json_value({"labels": ["b"]})
    ),
    "json contains empty object": cond("meta", q.OPERATOR_JSON_CONTAINS, json_value({})),
    "and": all_of(
        cond("status", q.OPERATOR_EQ, v("active")), cond("priority", q.OPERATOR_GTE, v(1))
    ),
    "or": any_of(cond("status", q.OPERATOR_EQ, v("done")), cond("score", q.OPERATOR_IS_NULL)),
    "not skips unknown": negate(cond("status", q.OPERATOR_EQ, v("active"))),
    "not is null": negate(cond("status", q.OPERATOR_IS_NULL)),
    "single-member group": all_of(cond("active", q.OPERATOR_EQ, v(False))),
    "nested": all_of(
        any_of(
            cond("status", q.OPERATOR_EQ, v("active")),
            cond("status", q.OPERATOR_EQ, v("paused")),
        ),
        negate(any_of(cond("priority", q.OPERATOR_IS_NULL), cond("score", q.OPERATOR_LT, v(1.0)))),
    ),
    "deeply nested": any_of(
        all_of(
            negate(negate(cond("name", q.OPERATOR_ILIKE, v("%ta%")))),
            any_of(
                cond("meta", q.OPERATOR_JSON_CONTAINS, json_value({"tier": "gold"})),
                all_of(
                    cond("active", q.OPERATOR_IS_NOT_NULL),
                    negate(cond("active", q.OPERATOR_EQ, v(True))),
                ),
            ),
        ),
        cond("name", q.OPERATOR_IN, values=[v("iota"), v("KAPPA")]),
    ),
}


def test_the_evaluator_follows_sql_semantics():
    """Anchors for the evaluator the filter tests compare against."""
    assert expected_names(FILTERS["neq skips nulls"]) == [
        "Beta",
        "epsilon",
        "zeta",
        "theta_1",
        "theta%2",
    ]
    assert expected_names(FILTERS["not skips unknown"]) == expected_names(
        FILTERS["neq skips nulls"]
    )
    assert expected_names(FILTERS["like escaped underscore"]) == ["theta_1"]
    assert expected_names(FILTERS["like one character"]) == ["Beta", "zeta"]
    assert expected_names(FILTERS["json contains"]) == ["alpha", "delta", "eta"]
    # Beta and eta: NOT (false OR unknown) is unknown; KAPPA: score < 1.
    assert expected_names(FILTERS["nested"]) == ["alpha", "zeta"]


@pytest.mark.parametrize("name", list(FILTERS))
async def test_filter(stub, campaigns, name):
    f = FILTERS[name]
    expected = expected_names(f)
    assert await select_names(stub, campaigns.workspace, filter=f, order_by=ID_ORDER) == expected
    counted = await stub.Count(
        pb.CountRequest(workspace_id=campaigns.workspace, table="campaigns", filter=f)
    )
    assert counted.count == len(expected)


def test_filters_are_not_all_empty_or_full():
    # Each filter case must separate rows, or it could not catch a broken operator.
    for name, f in FILTERS.items():
        if name == "like is case sensitive":
            assert expected_names(f) == []
            continue
        assert 0 < len(expected_names(f)) < len(CAMPAIGNS), name


async def test_count(stub, campaigns, other_workspace):
    total = await stub.Count(pb.CountRequest(workspace_id=campaigns.workspace, table="campaigns"))
    assert total.count == len(CAMPAIGNS)
    none = await stub.Count(pb.CountRequest(workspace_id=other_workspace, table="campaigns"))
    assert none.count == 0
    some = await stub.Count(
        pb.CountRequest(
            workspace_id=campaigns.workspace,
            table="campaigns",
            filter=cond("active", q.OPERATOR_EQ, v(True)),
        )
    )
    assert some.count == 5


async def test_select_every_column_in_table_order(stub, campaigns):
    page = await stub.Select(
        pb.SelectRequest(
            workspace_id=campaigns.workspace,
            table="campaigns",
            filter=cond("name", q.OPERATOR_EQ, v("eta")),
        )
    )
    assert list(page.columns) == CAMPAIGN_COLUMNS
    (row,) = page.rows
    cells = dict(zip(page.columns, row.values, strict=True))
    assert cells["id"] == v(campaigns.ids["eta"])
    assert cells["workspace_id"] == Value(uuid_value=campaigns.workspace)
    assert cells["priority"] == v(1)
    assert cells["score"] == NULL
    assert json.loads(cells["meta"].json_value) == CAMPAIGNS[6].meta


async def test_columns_come_in_request_order(stub, campaigns):
    page = await stub.Select(
        pb.SelectRequest(
            workspace_id=campaigns.workspace,
            table="campaigns",
            columns=["score", "name", "id"],
            filter=cond("name", q.OPERATOR_EQ, v("zeta")),
        )
    )
    assert list(page.columns) == ["score", "name", "id"]
    assert list(page.rows[0].values) == [v(2.5), v("zeta"), v(campaigns.ids["zeta"])]


# ---------------------------------------------------------------------------
# Ordering


def sort_rows(rows: Sequence[Any], keys: Sequence[tuple[str, bool]]) -> list[Any]:
    """PostgreSQL's order: NULLs last ascending, first descending; ties broken by `id`."""
    out = list(rows)
    for attr, desc in reversed([*keys, ("id", False)]):
        out.sort(
            key=lambda r, a=attr: (
                getattr(r, a) is None,
                0 if getattr(r, a) is None else getattr(r, a),
            ),
            reverse=desc,
        )
    return out


@dataclasses.dataclass(frozen=True)
class Named:
    id: int
    name: str
    status: str | None
    priority: int | None
    score: float | None
    active: bool | None


ORDERS = {
    "status, priority desc, score": [("status", False), ("priority", True), ("score", False)],
    "score desc": [("score", True)],
    "active, priority": [("active", False), ("priority", False)],
    "priority desc, id desc": [("priority", True), ("id", True)],
}


@pytest.mark.parametrize("name", list(ORDERS))
async def test_order_by_several_columns(stub, campaigns, name):
    keys = ORDERS[name]
    named = [
        Named(campaigns.ids[c.name], c.name, c.status, c.priority, c.score, c.active)
        for c in CAMPAIGNS
    ]
    expected = [r.name for r in sort_rows(named, keys)]
    order_by = [q.OrderBy(column=c, descending=d) for c, d in keys]
    assert await select_names(stub, campaigns.workspace, order_by=order_by) == expected


async def test_order_by_nulls_placement(stub, campaigns):
    ascending = await select_names(stub, campaigns.workspace, order_by=[q.OrderBy(column="score")])
    descending = await select_names(
        stub, campaigns.workspace, order_by=[q.OrderBy(column="score", descending=True)]
    )
    nulls = ["Beta", "eta", "iota"]  # score is NULL; ties in id order
    assert ascending[-3:] == nulls
    assert descending[:3] == nulls
    assert ascending[:2] == ["epsilon", "delta"]
    assert descending[3:5] == ["theta_1", "theta%2"]


# ---------------------------------------------------------------------------
# Keyset pagination


@dataclasses.dataclass(frozen=True)
class Paged:
    id: int
    name: str
    status: str | None
    priority: int | None
    score: float | None
    active: bool | None
    created_at: int
    budget: decimal.Decimal | None
    starts_on: dt.date | None
    external_id: uuid.UUID | None


@pytest.fixture(scope="module")
async def paged(stub) -> tuple[str, list[Paged]]:
    """45 rows whose sort keys tie often and are often NULL."""
    workspace = str(uuid.uuid4())
    rng = random.Random(20240229)
    specs = []
    uuids = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(3)]
    for i in range(45):
        specs.append(
            {
                "name": f"p{i:02d}",
                "status": rng.choice([None, "a", "b"]),
                "priority": rng.choice([None, 0, 1, 2]),
                "score": rng.choice([None, -1.0, 0.5, 2.0]),
                "active": rng.choice([None, True, False]),
                "created_at": rng.choice([0, 1_000_000, 1_700_000_000]),
                "budget": rng.choice([None, decimal.Decimal("1.50"), decimal.Decimal("-3.00")]),
                "starts_on": rng.choice([None, dt.date(2024, 2, 29), dt.date(1999, 12, 31)]),
                "external_id": rng.choice([None, *uuids]),
            }
        )

    def cell(key: str, x: Any) -> Value:
        if x is None:
            return NULL
        if key == "created_at":
            return Value(timestamp_value=timestamp_pb2.Timestamp(seconds=x, nanos=123_000))
        if key == "budget":
            return Value(decimal_value=str(x))
        if key == "starts_on":
            return Value(date_value=value_pb2.Date(year=x.year, month=x.month, day=x.day))
        if key == "external_id":
            return Value(uuid_value=str(x))
        return v(x)

    columns = list(specs[0])
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=columns,
            rows=[value_pb2.Row(values=[cell(k, s[k]) for k in columns]) for s in specs],
            returning=["id"],
        )
    )
    ids = [r.values[0].int64_value for r in inserted.returning.rows]
    return workspace, [Paged(id=i, **s) for i, s in zip(ids, specs, strict=True)]


async def walk(
    stub, request: pb.SelectRequest, page_size: int, page_rows: int | None = None
) -> tuple[list[value_pb2.Row], int]:
    """Every page of `request` and how many there were; checks each page is full."""
    rows: list[value_pb2.Row] = []
    token = ""
    pages = 0
    while True:
        page_request = pb.SelectRequest()
        page_request.CopyFrom(request)
        page_request.page_size = page_size
        page_request.page_token = token
        page = await stub.Select(page_request)
        pages += 1
        rows.extend(page.rows)
        if not page.next_page_token:
            break
        assert len(page.rows) == (page_rows or page_size)
        token = page.next_page_token
        assert pages < 1000
    return rows, pages


PAGED_ORDERS = {
    "id only": [],
    "status, score desc": [("status", False), ("score", True)],
    "priority desc, active": [("priority", True), ("active", False)],
    "created_at desc": [("created_at", True)],
    "budget, starts_on desc": [("budget", False), ("starts_on", True)],
    "external_id desc, score, active desc": [
        ("external_id", True),
        ("score", False),
        ("active", True),
    ],
}


@pytest.mark.parametrize("order", list(PAGED_ORDERS))
async def test_pagination_returns_every_row_once_in_order(stub, paged, order):
    workspace, rows = paged
    keys = PAGED_ORDERS[order]
    expected = [r.name for r in sort_rows(rows, keys)]
    request = pb.SelectRequest(
        workspace_id=workspace,
        table="campaigns",
        # The sort keys are not among the columns: the cursor still carries them.
        columns=["name"],
        order_by=[q.OrderBy(column=c, descending=d) for c, d in keys],
    )
    everything, pages = await walk(stub, request, 1000)
    assert pages == 1
    assert [r.values[0].string_value for r in everything] == expected
    for page_size in (1, 4, 7, 45):
        walked, pages = await walk(stub, request, page_size)
        assert [r.values[0].string_value for r in walked] == expected, page_size
        assert pages == math.ceil(len(expected) / page_size)


async def test_pagination_with_a_filter_and_all_columns(stub, paged):
    workspace, rows = paged
    f = any_of(cond("status", q.OPERATOR_IS_NULL), cond("score", q.OPERATOR_GTE, v(0.5)))
    matching = [r for r in rows if r.status is None or (r.score is not None and r.score >= 0.5)]
    request = pb.SelectRequest(
        workspace_id=workspace,
        table="campaigns",
        filter=f,
        order_by=[q.OrderBy(column="score", descending=True), q.OrderBy(column="status")],
    )
    walked, _ = await walk(stub, request, 3)
    expected = sort_rows(matching, [("score", True), ("status", False)])
    assert [r.values[0].int64_value for r in walked] == [r.id for r in expected]
    assert len(walked) == len(matching) > 3


async def test_page_size_zero_is_the_default_and_larger_is_lowered(settings, paged):
    workspace, rows = paged
    running = await start_server(settings, default_page_size=3, max_page_size=5)
    try:
        async with authorized_channel(running.address) as channel:
            small = workspace_service_pb2_grpc.WorkspaceServiceStub(channel)
            request = pb.SelectRequest(workspace_id=workspace, table="campaigns", columns=["id"])
            default = await small.Select(request)
            assert [r.values[0].int64_value for r in default.rows] == [r.id for r in rows[:3]]
            assert default.next_page_token
            request.page_size = 1000
            lowered = await small.Select(request)
            assert [r.values[0].int64_value for r in lowered.rows] == [r.id for r in rows[:5]]
            request.page_size = 2
            two = await small.Select(request)
            assert len(two.rows) == 2
            walked, pages = await walk(small, request, 0, page_rows=3)
            assert [r.values[0].int64_value for r in walked] == [r.id for r in rows]
            assert pages == 15
    finally:
        await running.stop(grace=0.5)


async def test_page_size_zero_on_the_default_server(stub, paged):
    workspace, rows = paged
    page = await stub.Select(pb.SelectRequest(workspace_id=workspace, table="campaigns"))
    assert len(page.rows) == len(rows) == 45  # below the default of 100
    assert page.next_page_token == ""


async def test_negative_page_size_is_invalid_argument(stub, paged):
    workspace, _ = paged
    failure = await rpc_error(
        stub.Select(pb.SelectRequest(workspace_id=workspace, table="campaigns", page_size=-1))
    )
    assert (failure.code, failure.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["page_size"])


def _first_page_request(workspace: str) -> pb.SelectRequest:
    return pb.SelectRequest(
        workspace_id=workspace,
        table="campaigns",
        columns=["name", "score"],
        filter=cond("status", q.OPERATOR_IS_NOT_NULL),
        order_by=[q.OrderBy(column="score", descending=True)],
        page_size=4,
    )


async def _token(stub, workspace: str) -> tuple[pb.SelectRequest, str]:
    request = _first_page_request(workspace)
    page = await stub.Select(request)
    assert page.next_page_token
    request.page_token = page.next_page_token
    return request, page.next_page_token


def _changed(request: pb.SelectRequest, change: str, other_workspace: str) -> pb.SelectRequest:
    changed = pb.SelectRequest()
    changed.CopyFrom(request)
    match change:
        case "filter":
            changed.filter.CopyFrom(cond("status", q.OPERATOR_IS_NULL))
        case "no filter":
            changed.ClearField("filter")
        case "table":
            changed.table = "campaign_events"
            del changed.columns[:]
            changed.ClearField("filter")
            changed.order_by[0].column = "id"
        case "order":
            changed.order_by[0].descending = False
        case "extra order key":
            changed.order_by.append(q.OrderBy(column="name"))
        case "columns":
            changed.columns.append("id")
        case "column order":
            changed.columns[:] = ["score", "name"]
        case "workspace":
            changed.workspace_id = other_workspace
    return changed


@pytest.mark.parametrize(
    "change",
    [
        "filter",
        "no filter",
        "table",
        "order",
        "extra order key",
        "columns",
        "column order",
        "workspace",
    ],
)
async def test_page_token_is_bound_to_the_request(stub, paged, other_workspace, change):
    workspace, _ = paged
    request, _ = await _token(stub, workspace)
    failure = await rpc_error(stub.Select(_changed(request, change, other_workspace)))
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
        ["page_token"],
    )


async def test_page_token_survives_a_page_size_change(stub, paged):
    workspace, _ = paged
    request, _ = await _token(stub, workspace)
    whole = _first_page_request(workspace)
    whole.page_size = 1000
    everything = [r.values[0].string_value for r in (await stub.Select(whole)).rows]
    request.page_size = 7
    page = await stub.Select(request)
    assert [r.values[0].string_value for r in page.rows] == everything[4:11]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


@pytest.mark.parametrize(
    "tamper",
    [
        "flip a payload byte",
        "flip the last byte",
        "truncate",
        "append",
        "garbage",
        "not base64",
        "empty payload",
        "other version",
    ],
)
async def test_tampered_page_token_is_invalid_argument(stub, paged, tamper):
    workspace, _ = paged
    request, token = await _token(stub, workspace)
    raw = bytearray(_unb64(token))
    match tamper:
        case "flip a payload byte":
            raw[20] ^= 0x01
            forged = _b64(bytes(raw))
        case "flip the last byte":
            raw[-1] ^= 0x80
            forged = _b64(bytes(raw))
        case "truncate":
            forged = _b64(bytes(raw[:-1]))
        case "append":
            forged = _b64(bytes(raw) + b"\x00")
        case "garbage":
            forged = _b64(random.Random(1).randbytes(64))
        case "not base64":
            forged = "!!not a token!!"
        case "empty payload":
            forged = "AA"
        case _:
            raw[0] = 2
            forged = _b64(bytes(raw))
    request.page_token = forged
    failure = await rpc_error(stub.Select(request))
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
        ["page_token"],
    )


async def test_page_token_needs_the_same_signing_key(settings, stub, paged):
    workspace, _ = paged
    request, _ = await _token(stub, workspace)
    expected = await stub.Select(request)
    other = await start_server(settings, token_key=b"another key")
    same = await start_server(settings)
    try:
        async with (
            authorized_channel(other.address) as other_channel,
            authorized_channel(same.address) as same_channel,
        ):
            failure = await rpc_error(
                workspace_service_pb2_grpc.WorkspaceServiceStub(other_channel).Select(request)
            )
            assert (failure.code, failure.reason, failure.fields) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_PAGE_TOKEN",
                ["page_token"],
            )
            replica = workspace_service_pb2_grpc.WorkspaceServiceStub(same_channel)
            assert await replica.Select(request) == expected
    finally:
        await other.stop(grace=0.5)
        await same.stop(grace=0.5)


# ---------------------------------------------------------------------------
# Bad requests


def _nested(depth: int) -> q.Filter:
    """A chain of `depth` Filter messages, alternating groups and negations."""
    f = cond("status", q.OPERATOR_IS_NULL)
    for level in range(depth - 1):
        f = negate(f) if level % 2 else all_of(f)
    return f


def _path(depth: int) -> str:
    """The field path of the 17th Filter (the first one too deep) in `_nested(depth)`."""
    path = "filter"
    for level in range(depth - 2, depth - 2 - 16, -1):
        path += ".negation.filter" if level % 2 else ".group.filters[0]"
    return path


async def test_filter_depth_limit(stub, campaigns):
    sixteen = _nested(16)
    assert await select_names(stub, campaigns.workspace, filter=sixteen, order_by=ID_ORDER) == (
        expected_names(sixteen)
    )
    failure = await rpc_error(
        stub.Select(
            pb.SelectRequest(
                workspace_id=campaigns.workspace, table="campaigns", filter=_nested(17)
            )
        )
    )
    assert (failure.code, failure.fields) == (grpc.StatusCode.INVALID_ARGUMENT, [_path(17)])
    counted = await rpc_error(
        stub.Count(
            pb.CountRequest(workspace_id=campaigns.workspace, table="campaigns", filter=_nested(40))
        )
    )
    assert (counted.code, counted.fields) == (grpc.StatusCode.INVALID_ARGUMENT, [_path(40)])


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"filter": cond("nope", q.OPERATOR_IS_NULL)}, "filter.condition.column"),
        (
            {
                "filter": all_of(
                    cond("name", q.OPERATOR_IS_NULL),
                    negate(
                        any_of(
                            cond("status", q.OPERATOR_IS_NULL), cond("nope", q.OPERATOR_EQ, v(1))
                        )
                    ),
                )
            },
            "filter.group.filters[1].negation.filter.group.filters[1].condition.column",
        ),
        ({"order_by": [q.OrderBy(column="name"), q.OrderBy(column="nope")]}, "order_by[1].column"),
        ({"columns": ["id", "name", "nope"]}, "columns[2]"),
        ({"columns": ["Name"]}, "columns[0]"),
        ({"columns": ["secret"]}, "columns[0]"),
    ],
)
async def test_unknown_column(stub, campaigns, request_fields, field):
    failure = await rpc_error(
        stub.Select(
            pb.SelectRequest(workspace_id=campaigns.workspace, table="campaigns", **request_fields)
        )
    )
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_COLUMN",
        [field],
    )
    assert failure.metadata["table"] == "campaigns"
    assert failure.message.startswith(field + ": ")


async def test_unknown_column_in_count(stub, campaigns):
    failure = await rpc_error(
        stub.Count(
            pb.CountRequest(
                workspace_id=campaigns.workspace,
                table="campaigns",
                filter=any_of(cond("name", q.OPERATOR_IS_NULL), cond("nope", q.OPERATOR_IS_NULL)),
            )
        )
    )
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_COLUMN",
        ["filter.group.filters[1].condition.column"],
    )


@pytest.mark.parametrize(
    ("f", "field"),
    [
        (cond("name", q.OPERATOR_UNSPECIFIED, v("x")), "filter.condition.operator"),
        (cond("name", q.OPERATOR_EQ), "filter.condition.value"),
        (cond("name", q.OPERATOR_EQ, NULL), "filter.condition.value"),
        (cond("name", q.OPERATOR_IS_NULL, v("x")), "filter.condition.value"),
        (cond("name", q.OPERATOR_IN), "filter.condition.values"),
        (cond("name", q.OPERATOR_IN, v("x")), "filter.condition.value"),
        (cond("name", q.OPERATOR_EQ, v("x"), [v("y")]), "filter.condition.values"),
        (cond("name", q.OPERATOR_IN, values=[v("x"), NULL]), "filter.condition.values[1]"),
        (cond("priority", q.OPERATOR_LIKE, v("1%")), "filter.condition.operator"),
        (cond("name", q.OPERATOR_LIKE, v(1)), "filter.condition.value"),
        (cond("name", q.OPERATOR_JSON_CONTAINS, json_value({})), "filter.condition.operator"),
        (cond("meta", q.OPERATOR_JSON_CONTAINS, Value(json_value="{")), "filter.condition.value"),
        (cond("priority", q.OPERATOR_EQ, v("1")), "filter.condition.value"),
        (q.Filter(), "filter"),
        (q.Filter(group=q.FilterGroup(operator=q.GROUP_OPERATOR_AND)), "filter.group.filters"),
        (
            q.Filter(group=q.FilterGroup(filters=[cond("name", q.OPERATOR_IS_NULL)])),
            "filter.group.operator",
        ),
        (q.Filter(negation=q.Negation()), "filter.negation.filter"),
    ],
)
async def test_malformed_filter_names_the_field(stub, campaigns, f, field):
    failure = await rpc_error(
        stub.Select(pb.SelectRequest(workspace_id=campaigns.workspace, table="campaigns", filter=f))
    )
    assert (failure.code, failure.fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field])


async def test_in_takes_at_most_ten_thousand_values(stub, campaigns):
    ids = list(campaigns.ids.values())
    many = [v(i) for i in range(-10_000 + len(ids), 0)] + [v(i) for i in ids]
    assert len(many) == 10_000
    names = await select_names(
        stub,
        campaigns.workspace,
        filter=cond("id", q.OPERATOR_IN, values=many),
        order_by=ID_ORDER,
    )
    assert names == [c.name for c in CAMPAIGNS]
    failure = await rpc_error(
        stub.Select(
            pb.SelectRequest(
                workspace_id=campaigns.workspace,
                table="campaigns",
                filter=cond("id", q.OPERATOR_IN, values=[*many, v(0)]),
            )
        )
    )
    assert (failure.code, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["filter.condition.values"],
    )


@pytest.mark.parametrize(
    ("request_fields", "field", "reason"),
    [
        ({"table": "nope"}, "table", "UNKNOWN_TABLE"),
        ({"table": ""}, "table", "UNKNOWN_TABLE"),
        ({"workspace_id": ""}, "workspace_id", "INVALID_UUID"),
        ({"workspace_id": "not-a-uuid"}, "workspace_id", "INVALID_UUID"),
        ({"columns": ["name", "name"]}, "columns[1]", "INVALID_ARGUMENT"),
        (
            {"order_by": [q.OrderBy(column="name"), q.OrderBy(column="name", descending=True)]},
            "order_by[1].column",
            "INVALID_ARGUMENT",
        ),
        ({"order_by": [q.OrderBy(column="meta")]}, "order_by[0].column", "INVALID_ARGUMENT"),
    ],
)
async def test_bad_select_request(stub, campaigns, request_fields, field, reason):
    request = {"workspace_id": campaigns.workspace, "table": "campaigns", **request_fields}
    failure = await rpc_error(stub.Select(pb.SelectRequest(**request)))
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        reason,
        [field],
    )


async def test_count_unknown_table(stub, campaigns):
    failure = await rpc_error(
        stub.Count(pb.CountRequest(workspace_id=campaigns.workspace, table="internal_secrets"))
    )
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_TABLE",
        ["table"],
    )


async def test_select_returns_no_sql(stub, campaigns):
    failure = await rpc_error(
        stub.Select(
            pb.SelectRequest(
                workspace_id=campaigns.workspace,
                table="campaigns",
                filter=cond("meta", q.OPERATOR_EQ, Value(json_value="[1")),
            )
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    for fragment in ("SELECT", "WHERE", "$1", 'campaigns"."'):
        assert fragment not in failure.message
