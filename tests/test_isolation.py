"""No request of one workspace reads, counts, changes or deletes another workspace's rows."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import grpc
import pytest
from conftest import ODD_TABLE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from messages import NULL, Row, Value, any_of, cond, negate, v
from raptorflow.data.v1 import query_pb2, workspace_service_pb2
from statuses import rpc_error

pb = workspace_service_pb2
q = query_pb2


def ws_eq(workspace: str, op: int = q.OPERATOR_EQ) -> q.Filter:
    return cond("workspace_id", op, Value(uuid_value=workspace))


# name, status, priority, score, active, meta
ROWS = [
    ("alpha", "active", 1, 1.5, True, {"tier": "gold"}),
    ("beta", "paused", 2, None, False, {"tier": "silver", "n": [1, 2]}),
    ("gamma", None, None, 2.5, None, None),
    ("delta", "done", 0, -1.0, True, {}),
    ("ab%_x", "active", 7, 0.0, False, {"tier": "gold", "deep": {"k": "v"}}),
]
CAMPAIGN_COLUMNS = ["name", "status", "priority", "score", "active", "meta"]


def _campaign_row(spec: tuple[Any, ...]) -> Row:
    *scalars, meta = spec
    return Row(
        values=[
            *(v(x) for x in scalars),
            NULL if meta is None else Value(json_value=json.dumps(meta)),
        ]
    )


async def seed(stub, workspace: str) -> list[int]:
    """The same campaigns in every workspace, one event per campaign and two odd rows."""
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=CAMPAIGN_COLUMNS,
            rows=[_campaign_row(r) for r in ROWS],
            returning=["id"],
        )
    )
    ids = [r.values[0].int64_value for r in inserted.returning.rows]
    await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaign_events",
            columns=["campaign_id", "kind"],
            rows=[Row(values=[v(i), v("opened")]) for i in ids],
        )
    )
    base = uuid.UUID(workspace).int % 10**12 * 10
    await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table=ODD_TABLE,
            columns=["id", "select", "drop table x; --"],
            rows=[Row(values=[v(base + i), v("s"), v("d")]) for i in range(2)],
        )
    )
    return ids


async def snapshot(db, workspace: str) -> dict[str, list[str]]:
    """Every row of the workspace in every table, as PostgreSQL holds it."""
    out = {}
    for table in ("campaigns", "campaign_events", '"Odd ""Name"" table"'):
        records = await db.fetch(
            f"SELECT to_jsonb(t)::text AS r FROM {table} t WHERE workspace_id = $1 ORDER BY id",
            workspace,
        )
        out[table] = [r["r"] for r in records]
    return out


@dataclasses.dataclass
class Pair:
    mine: str
    theirs: str
    my_ids: list[int]
    their_ids: list[int]
    their_rows: dict[str, list[str]]


@pytest.fixture
async def pair(stub, db, workspace, other_workspace) -> Pair:
    my_ids = await seed(stub, workspace)
    their_ids = await seed(stub, other_workspace)
    return Pair(workspace, other_workspace, my_ids, their_ids, await snapshot(db, other_workspace))


async def assert_untouched(db, pair: Pair) -> None:
    assert await snapshot(db, pair.theirs) == pair.their_rows


def ids_of(rows: Any) -> list[int]:
    return [r.values[0].int64_value for r in rows]


# ---------------------------------------------------------------------------
# Reads


ALL = "all of mine"
NONE = "none"
FILTERS = {
    "their workspace": (ws_eq("theirs"), NONE),
    "my workspace": (ws_eq("mine"), ALL),
    "not my workspace": (negate(ws_eq("mine")), NONE),
    "neq my workspace": (ws_eq("mine", q.OPERATOR_NEQ), NONE),
    "workspace in both": (
        cond(
            "workspace_id",
            q.OPERATOR_IN,
            values=(Value(uuid_value="mine"), Value(uuid_value="theirs")),
        ),
        ALL,
    ),
    "their workspace or anything": (
        any_of(ws_eq("theirs"), cond("name", q.OPERATOR_IS_NOT_NULL)),
        ALL,
    ),
    "workspace is not null": (cond("workspace_id", q.OPERATOR_IS_NOT_NULL), ALL),
    "workspace gt nil": (ws_eq("00000000-0000-0000-0000-000000000000", q.OPERATOR_GT), ALL),
    "their ids": (cond("id", q.OPERATOR_IN, values=()), NONE),
    "name like anything": (cond("name", q.OPERATOR_LIKE, v("%")), ALL),
}


def _bind(f: q.Filter, pair: Pair) -> q.Filter:
    """The filter with the placeholders "mine"/"theirs" and their ids filled in."""
    bound = q.Filter()
    bound.CopyFrom(f)

    def fill(node: q.Filter) -> None:
        kind = node.WhichOneof("kind")
        if kind == "group":
            for child in node.group.filters:
                fill(child)
        elif kind == "negation":
            fill(node.negation.filter)
        else:
            c = node.condition
            for value in [c.value, *c.values]:
                if value.uuid_value == "mine":
                    value.uuid_value = pair.mine
                elif value.uuid_value == "theirs":
                    value.uuid_value = pair.theirs
            if c.column == "id" and c.operator == q.OPERATOR_IN:
                c.values.extend(v(i) for i in pair.their_ids)

    fill(bound)
    return bound


@pytest.mark.parametrize("name", list(FILTERS))
async def test_select_and_count_see_only_their_own_rows(stub, db, pair, name):
    f, expected = FILTERS[name]
    f = _bind(f, pair)
    page = await stub.Select(
        pb.SelectRequest(
            workspace_id=pair.mine,
            table="campaigns",
            columns=["id", "workspace_id"],
            filter=f,
            order_by=[q.OrderBy(column="id")],
        )
    )
    wanted = pair.my_ids if expected == ALL else []
    assert ids_of(page.rows) == wanted
    assert {r.values[1].uuid_value for r in page.rows} <= {pair.mine}
    counted = await stub.Count(pb.CountRequest(workspace_id=pair.mine, table="campaigns", filter=f))
    assert counted.count == len(wanted)
    await assert_untouched(db, pair)


async def test_unfiltered_reads_and_pages(stub, pair):
    for table in ("campaigns", "campaign_events", ODD_TABLE):
        request = pb.SelectRequest(
            workspace_id=pair.mine, table=table, columns=["workspace_id"], page_size=1
        )
        seen = []
        while True:
            page = await stub.Select(request)
            seen.extend(r.values[0].uuid_value for r in page.rows)
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
        assert seen == [pair.mine] * (len(ROWS) if table != ODD_TABLE else 2)
        counted = await stub.Count(pb.CountRequest(workspace_id=pair.mine, table=table))
        assert counted.count == len(seen)


# ---------------------------------------------------------------------------
# Writes


async def test_unfiltered_update_changes_only_own_rows(stub, db, pair):
    updated = await stub.Update(
        pb.UpdateRequest(
            workspace_id=pair.mine,
            table="campaigns",
            values={"status": v("mine now"), "priority": v(42)},
            allow_unfiltered=True,
            returning=["id", "workspace_id"],
        )
    )
    assert updated.affected_count == len(ROWS)
    assert sorted(ids_of(updated.returning.rows)) == pair.my_ids
    assert {r.values[1].uuid_value for r in updated.returning.rows} == {pair.mine}
    await assert_untouched(db, pair)


async def test_update_filtered_to_other_workspace_changes_nothing(stub, db, pair):
    for f in (
        ws_eq(pair.theirs),
        cond("id", q.OPERATOR_IN, values=tuple(v(i) for i in pair.their_ids)),
    ):
        updated = await stub.Update(
            pb.UpdateRequest(
                workspace_id=pair.mine, table="campaigns", values={"status": v("x")}, filter=f
            )
        )
        assert updated.affected_count == 0
        deleted = await stub.Delete(
            pb.DeleteRequest(workspace_id=pair.mine, table="campaigns", filter=f)
        )
        assert deleted.affected_count == 0
    await assert_untouched(db, pair)


async def test_update_cannot_move_or_collide_into_other_workspace(stub, db, pair):
    moved = await rpc_error(
        stub.Update(
            pb.UpdateRequest(
                workspace_id=pair.mine,
                table="campaigns",
                values={"workspace_id": Value(uuid_value=pair.theirs)},
                allow_unfiltered=True,
            )
        )
    )
    assert (moved.code, moved.reason, moved.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "WORKSPACE_MISMATCH",
        ['values["workspace_id"]'],
    )
    collided = await rpc_error(
        stub.Update(
            pb.UpdateRequest(
                workspace_id=pair.mine,
                table="campaigns",
                values={"id": v(pair.their_ids[0])},
                filter=cond("id", q.OPERATOR_EQ, v(pair.my_ids[0])),
            )
        )
    )
    assert (collided.code, collided.reason) == (grpc.StatusCode.ALREADY_EXISTS, "UNIQUE_VIOLATION")
    await assert_untouched(db, pair)


async def test_unfiltered_delete_deletes_only_own_rows(stub, db, pair):
    for table, count in ((ODD_TABLE, 2), ("campaign_events", len(ROWS)), ("campaigns", len(ROWS))):
        deleted = await stub.Delete(
            pb.DeleteRequest(
                workspace_id=pair.mine,
                table=table,
                allow_unfiltered=True,
                returning=["workspace_id"],
            )
        )
        assert deleted.affected_count == count
        assert [r.values[0].uuid_value for r in deleted.returning.rows] == [pair.mine] * count
    assert await snapshot(db, pair.mine) == {
        "campaigns": [],
        "campaign_events": [],
        '"Odd ""Name"" table"': [],
    }
    await assert_untouched(db, pair)


@pytest.mark.parametrize("action", [pb.CONFLICT_ACTION_UPDATE, pb.CONFLICT_ACTION_IGNORE])
async def test_upsert_on_other_workspaces_primary_key_leaves_it_unchanged(stub, db, pair, action):
    mine_before = await snapshot(db, pair.mine)

    async def upsert(request: pb.UpsertRequest) -> None:
        if action == pb.CONFLICT_ACTION_UPDATE:
            # Row-level security (on by default) refuses to update a row the caller may
            # not see; a plain insert of that key is ALREADY_EXISTS as well.
            refused = await rpc_error(stub.Upsert(request))
            assert (refused.code, refused.reason) == (
                grpc.StatusCode.ALREADY_EXISTS,
                "UNIQUE_VIOLATION",
            )
            return
        upserted = await stub.Upsert(request)
        assert upserted.affected_count == 0
        assert list(upserted.returning.rows) == []

    await upsert(
        pb.UpsertRequest(
            workspace_id=pair.mine,
            table="campaigns",
            columns=["id", "name", "status", "priority"],
            rows=[Row(values=[v(pair.their_ids[0]), v("hijack"), v("stolen"), v(666)])],
            conflict_columns=["id"],
            on_conflict=action,
            returning=["*"],
        )
    )
    await assert_untouched(db, pair)
    assert await snapshot(db, pair.mine) == mine_before
    # The odd table's primary key too, with every column overwritten.
    odd_id = json.loads(pair.their_rows['"Odd ""Name"" table"'][0])["id"]
    await upsert(
        pb.UpsertRequest(
            workspace_id=pair.mine,
            table=ODD_TABLE,
            columns=["id", "select", "drop table x; --"],
            rows=[Row(values=[v(odd_id), v("hijack"), v("hijack")])],
            conflict_columns=["id"],
            on_conflict=action,
        )
    )
    await assert_untouched(db, pair)


async def test_upsert_on_names_other_workspace_uses_inserts_own_rows(
    stub, db, workspace, other_workspace
):
    their_ids = await seed(stub, other_workspace)
    theirs = await snapshot(db, other_workspace)
    upserted = await stub.Upsert(
        pb.UpsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "status"],
            rows=[Row(values=[v(r[0]), v("mine")]) for r in ROWS],
            conflict_columns=["workspace_id", "name"],
            on_conflict=pb.CONFLICT_ACTION_UPDATE,
            returning=["id", "workspace_id"],
        )
    )
    assert upserted.affected_count == len(ROWS)
    assert not set(ids_of(upserted.returning.rows)) & set(their_ids)
    assert {r.values[1].uuid_value for r in upserted.returning.rows} == {workspace}
    assert await snapshot(db, other_workspace) == theirs


async def test_insert_naming_other_workspace_is_refused(stub, db, pair):
    mine_before = await snapshot(db, pair.mine)
    for table, columns, cells in (
        ("campaigns", ["workspace_id", "name"], [Value(uuid_value=pair.theirs), v("sneaky")]),
        (
            "campaign_events",
            ["kind", "workspace_id"],
            [v("sneaky"), Value(string_value=pair.theirs)],
        ),
    ):
        failure = await rpc_error(
            stub.Insert(
                pb.InsertRequest(
                    workspace_id=pair.mine, table=table, columns=columns, rows=[Row(values=cells)]
                )
            )
        )
        assert (failure.code, failure.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "WORKSPACE_MISMATCH",
        )
    await assert_untouched(db, pair)
    assert await snapshot(db, pair.mine) == mine_before


async def test_batch_stays_in_its_workspace(stub, db, pair):
    refused = await rpc_error(
        stub.ExecuteBatch(
            pb.ExecuteBatchRequest(
                workspace_id=pair.mine,
                operations=[
                    pb.BatchOperation(
                        delete=pb.DeleteRequest(table="campaigns", allow_unfiltered=True)
                    ),
                    pb.BatchOperation(
                        delete=pb.DeleteRequest(
                            workspace_id=pair.theirs, table="campaigns", allow_unfiltered=True
                        )
                    ),
                ],
            )
        )
    )
    assert (refused.code, refused.reason, refused.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "WORKSPACE_MISMATCH",
        ["operations[1].delete.workspace_id"],
    )
    await assert_untouched(db, pair)
    assert len((await snapshot(db, pair.mine))["campaigns"]) == len(ROWS)
    done = await stub.ExecuteBatch(
        pb.ExecuteBatchRequest(
            workspace_id=pair.mine,
            operations=[
                pb.BatchOperation(
                    update=pb.UpdateRequest(
                        table="campaigns", values={"status": v("batch")}, allow_unfiltered=True
                    )
                ),
                pb.BatchOperation(
                    upsert=pb.UpsertRequest(
                        table="campaigns",
                        columns=["id", "name"],
                        rows=[Row(values=[v(i), v(f"hijack {i}")]) for i in pair.their_ids],
                        conflict_columns=["id"],
                        on_conflict=pb.CONFLICT_ACTION_IGNORE,
                    )
                ),
                pb.BatchOperation(
                    delete=pb.DeleteRequest(table="campaigns", filter=ws_eq(pair.theirs))
                ),
                pb.BatchOperation(
                    delete=pb.DeleteRequest(table="campaign_events", allow_unfiltered=True)
                ),
            ],
        )
    )
    assert [r.WhichOneof("result") for r in done.results] == [
        "update",
        "upsert",
        "delete",
        "delete",
    ]
    counts = [getattr(r, r.WhichOneof("result")).affected_count for r in done.results]
    assert counts == [len(ROWS), 0, 0, len(ROWS)]
    await assert_untouched(db, pair)
    # Updating their rows by key fails the whole batch (row-level security), own
    # changes before it included.
    mine = await snapshot(db, pair.mine)
    hijack = await rpc_error(
        stub.ExecuteBatch(
            pb.ExecuteBatchRequest(
                workspace_id=pair.mine,
                operations=[
                    pb.BatchOperation(
                        update=pb.UpdateRequest(
                            table="campaigns", values={"status": v("again")}, allow_unfiltered=True
                        )
                    ),
                    pb.BatchOperation(
                        upsert=pb.UpsertRequest(
                            table="campaigns",
                            columns=["id", "name"],
                            rows=[Row(values=[v(pair.their_ids[0]), v("hijack")])],
                            conflict_columns=["id"],
                            on_conflict=pb.CONFLICT_ACTION_UPDATE,
                        )
                    ),
                ],
            )
        )
    )
    assert hijack.code == grpc.StatusCode.ALREADY_EXISTS
    await assert_untouched(db, pair)
    assert await snapshot(db, pair.mine) == mine


# ---------------------------------------------------------------------------
# Random filters: whatever workspace A asks, workspace B's rows never show up or change

WS_A = str(uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001"))
WS_B = str(uuid.UUID("bbbbbbbb-0000-4000-8000-000000000002"))


@pytest.fixture(scope="module")
async def random_pair(stub, db) -> None:
    for workspace in (WS_A, WS_B):
        await db.execute("DELETE FROM campaigns WHERE workspace_id = $1", workspace)
        await db.execute('DELETE FROM "Odd ""Name"" table" WHERE workspace_id = $1', workspace)
        await seed(stub, workspace)


_texts = st.lists(
    st.sampled_from(["a", "e", "t", "A", "%", "_", "\\%", "\\_", "ab", "gold"]), max_size=4
).map("".join)
_uuids = st.sampled_from(
    [WS_A, WS_B, "00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff"]
)
_json = st.sampled_from(
    [{}, {"tier": "gold"}, {"tier": "silver"}, {"n": [1]}, {"deep": {"k": "v"}}, [], 1]
).map(json.dumps)
_COMPARE = [
    q.OPERATOR_EQ,
    q.OPERATOR_NEQ,
    q.OPERATOR_GT,
    q.OPERATOR_GTE,
    q.OPERATOR_LT,
    q.OPERATOR_LTE,
]
_SCALARS: dict[str, st.SearchStrategy[Value]] = {
    "id": st.integers(min_value=-1, max_value=2**40).map(v),
    "workspace_id": _uuids.map(lambda u: Value(uuid_value=u)),
    "name": st.one_of(st.sampled_from([r[0] for r in ROWS]), _texts).map(v),
    "status": st.sampled_from(["active", "paused", "done", "zzz", ""]).map(v),
    "priority": st.integers(min_value=-2, max_value=8).map(v),
    "score": st.one_of(st.sampled_from([-1.0, 0.0, 1.5, 2.5]), st.floats(-5, 5)).map(v),
    "active": st.booleans().map(v),
}


@st.composite
def _conditions(draw: st.DrawFn) -> q.Filter:
    column = draw(st.sampled_from([*_SCALARS, "meta"]))
    if column == "meta":
        op = draw(st.sampled_from([q.OPERATOR_JSON_CONTAINS, q.OPERATOR_EQ, q.OPERATOR_IS_NULL]))
        if op == q.OPERATOR_IS_NULL:
            return cond(column, op)
        return cond(column, op, Value(json_value=draw(_json)))
    kinds = ["compare", "in", "null"] + (["like"] if column in ("name", "status") else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "null":
        return cond(column, draw(st.sampled_from([q.OPERATOR_IS_NULL, q.OPERATOR_IS_NOT_NULL])))
    if kind == "in":
        return cond(
            column,
            q.OPERATOR_IN,
            values=tuple(draw(st.lists(_SCALARS[column], min_size=1, max_size=4))),
        )
    if kind == "like":
        op = draw(st.sampled_from([q.OPERATOR_LIKE, q.OPERATOR_ILIKE]))
        return cond(column, op, v(draw(_texts)))
    return cond(column, draw(st.sampled_from(_COMPARE)), draw(_SCALARS[column]))


def _groups(children: st.SearchStrategy[q.Filter]) -> st.SearchStrategy[q.Filter]:
    group = st.builds(
        lambda op, fs: q.Filter(group=q.FilterGroup(operator=op, filters=fs)),
        st.sampled_from([q.GROUP_OPERATOR_AND, q.GROUP_OPERATOR_OR]),
        st.lists(children, min_size=1, max_size=3),
    )
    return st.one_of(group, children.map(negate))


FILTER_STRATEGY = st.recursive(_conditions(), _groups, max_leaves=8)


@settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(f=FILTER_STRATEGY)
async def test_random_filters_never_cross_workspaces(stub, db, random_pair, f):
    theirs = await snapshot(db, WS_B)
    mine = {
        r["id"] for r in await db.fetch("SELECT id FROM campaigns WHERE workspace_id = $1", WS_A)
    }
    page = await stub.Select(
        pb.SelectRequest(
            workspace_id=WS_A,
            table="campaigns",
            columns=["id", "workspace_id"],
            filter=f,
            page_size=1000,
        )
    )
    selected = set(ids_of(page.rows))
    assert selected <= mine
    assert {r.values[1].uuid_value for r in page.rows} <= {WS_A}
    counted = await stub.Count(pb.CountRequest(workspace_id=WS_A, table="campaigns", filter=f))
    assert counted.count == len(selected)

    updated = await stub.Update(
        pb.UpdateRequest(
            workspace_id=WS_A,
            table="campaigns",
            values={"score": v(9.5)},
            filter=f,
            returning=["id", "workspace_id"],
        )
    )
    assert set(ids_of(updated.returning.rows)) <= mine
    assert updated.affected_count == len(updated.returning.rows)

    deleted = await stub.Delete(
        pb.DeleteRequest(
            workspace_id=WS_A,
            table="campaigns",
            filter=f,
            returning=["workspace_id", *CAMPAIGN_COLUMNS],
        )
    )
    assert {r.values[0].uuid_value for r in deleted.returning.rows} <= {WS_A}
    assert deleted.affected_count == len(deleted.returning.rows)
    assert await snapshot(db, WS_B) == theirs
    if deleted.returning.rows:
        # Put the deleted rows back, so later examples have rows of A to match.
        await stub.Insert(
            pb.InsertRequest(
                workspace_id=WS_A,
                table="campaigns",
                columns=CAMPAIGN_COLUMNS,
                rows=[Row(values=r.values[1:]) for r in deleted.returning.rows],
            )
        )
