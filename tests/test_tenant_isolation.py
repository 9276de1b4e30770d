"""Property-based tenant isolation: whatever workspace A's caller sends, nothing of workspace
B is returned to it, changed by it, or counted for it.

Two workspaces hold the same kind of rows (campaigns, their events, rows of the odd
table, memory records), and each row carries its workspace's secret, a string no
generated request contains. Each caller has a token of its own workspace only.
Hypothesis generates what A sends: selects and counts with random tables (also
internal_secrets and tables of other schemas), columns, filters, orders and page sizes;
page tokens issued in A, replayed in B's requests, in A's requests with other
parameters, and tampered with; updates, deletes, inserts, upserts and batches with
values taken from both workspaces (B's ids, names and workspace id); memory record
searches, upserts and deletes naming B's ids and source rows; and any of these with B's
workspace id through A's token. Every example checks, against a superuser connection:

- every row A gets back is one of A's rows, and no response or error A sees holds B's
  secret;
- a count equals the rows the same select returns, all of them A's;
- B's rows, events, odd rows and memory records are byte for byte what they were;
- A's token on B's workspace is PERMISSION_DENIED (when the server checks tokens).

Derandomized, with capped examples: the module runs in well under a minute.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

import asyncpg
import grpc
import pytest
from conftest import ODD_TABLE
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from messages import Row, Value, cond, negate, v
from raptorflow.data.server.app import RunningServer
from raptorflow.data.v1 import (
    memory_sync_service_pb2,
    memory_sync_service_pb2_grpc,
    query_pb2,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)
from tokens import authorized_channel, mint

pb = workspace_service_pb2
mpb = memory_sync_service_pb2
q = query_pb2

_NAMESPACE = uuid.UUID("0c7f3d5e-91a4-4b6e-8a0d-6f5b2e9c1d23")
A = str(uuid.uuid5(_NAMESPACE, "tenant-a"))
B = str(uuid.uuid5(_NAMESPACE, "tenant-b"))
# Strings only the rows of one workspace hold; no generated request contains them.
SECRETS = {A: f"secret-of-a-{uuid.uuid4().hex}", B: f"secret-of-b-{uuid.uuid4().hex}"}
ODD_SQL = '"Odd ""Name"" table"'
TABLE_SQL = {"campaigns": "campaigns", "campaign_events": "campaign_events", ODD_TABLE: ODD_SQL}
EXPOSED = tuple(TABLE_SQL)
# Names no request may reach, or that only look like an exposed table.
UNREACHABLE = (
    "internal_secrets",
    "public.campaigns",
    "public.internal_secrets",
    "pg_catalog.pg_authid",
    "pg_authid",
    "information_schema.tables",
    "raptorflow_data.memory_records",
    "raptorflow_data.jobs",
    "raptorflow_data.change_log",
    "memory_records",
    '"campaigns"',
    "Campaigns",
    "campaigns ",
    "campaigns;",
)
COLUMNS = {
    "campaigns": (
        "id",
        "workspace_id",
        "name",
        "status",
        "priority",
        "budget",
        "score",
        "active",
        "created_at",
        "external_id",
        "payload",
        "meta",
        "tags",
    ),
    "campaign_events": ("id", "workspace_id", "campaign_id", "kind", "note", "small", "info"),
    ODD_TABLE: ("id", "workspace_id", "select", "drop table x; --"),
}
ODD_COLUMNS = ("secret", "ctid", "xmin", "oid", "tableoid", "Name", "id ", "*", "")
EMBEDDING = [1.0, 0.5, 0.25]
UNDEFINED = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


# ---------------------------------------------------------------------------
# The two workspaces


@dataclasses.dataclass
class Tenant:
    """One workspace, its caller's channel and stubs, and what it holds."""

    workspace: str
    channel: grpc.aio.Channel
    tables: workspace_service_pb2_grpc.WorkspaceServiceStub
    memory: memory_sync_service_pb2_grpc.MemorySyncServiceStub
    ids: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    names: list[str] = dataclasses.field(default_factory=list)
    record_ids: list[str] = dataclasses.field(default_factory=list)

    @property
    def secret(self) -> str:
        return SECRETS[self.workspace]

    def __repr__(self) -> str:
        return f"Tenant({self.workspace}, ids={self.ids})"


@dataclasses.dataclass
class Tenants:
    a: Tenant
    b: Tenant
    b_rows: dict[str, list[str]]
    """B's rows as they were seeded."""
    enforces_auth: bool

    def __repr__(self) -> str:
        # Hypothesis prints the fixture with every falsifying example: keep it short.
        return f"Tenants(a={self.a!r}, b={self.b!r})"


async def seed(db: asyncpg.Connection, tenant: Tenant) -> None:
    """The workspace's rows, written directly (as the superuser): campaigns, an event of
    each, two odd rows and three memory records, each carrying the workspace's secret."""
    workspace = uuid.UUID(tenant.workspace)
    letter = "a" if tenant.workspace == A else "b"
    secret = tenant.secret
    for table in (*TABLE_SQL.values(), "raptorflow_data.memory_records"):
        await db.execute(f"DELETE FROM {table} WHERE workspace_id = $1", workspace)
    tenant.names = [f"{letter}-campaign-{i}" for i in range(4)]
    campaigns = await db.fetch(
        "INSERT INTO campaigns (workspace_id, name, status, priority, score, active, meta, "
        "payload, tags) SELECT $1, n, $2, p, p * 1.5, p % 2 = 0, jsonb_build_object('owner', "
        "$3::text, 'secret', $2::text), convert_to($2, 'UTF8'), ARRAY[$3::text, $2] "
        "FROM unnest($4::text[]) WITH ORDINALITY AS t(n, p) RETURNING id",
        workspace,
        secret,
        letter,
        tenant.names,
    )
    ids = [r["id"] for r in campaigns]
    events = await db.fetch(
        "INSERT INTO campaign_events (workspace_id, campaign_id, kind, note, info) "
        "SELECT $1, c, 'opened', $2::text, json_build_object('secret', $2::text) "
        "FROM unnest($3::bigint[]) AS c RETURNING id",
        workspace,
        secret[:40],
        ids,
    )
    base = 10**12 + (1 if letter == "a" else 2) * 1000
    odd = await db.fetch(
        f'INSERT INTO {ODD_SQL} (id, workspace_id, "select", "drop table x; --") '
        "SELECT $1::bigint + i, $2, $3, $3 FROM generate_series(0, 1) AS i RETURNING id",
        base,
        workspace,
        secret,
    )
    tenant.ids = {
        "campaigns": ids,
        "campaign_events": [r["id"] for r in events],
        ODD_TABLE: [r["id"] for r in odd],
    }
    tenant.record_ids = [f"{letter}-record-{i}" for i in range(3)]
    await db.executemany(
        "INSERT INTO raptorflow_data.memory_records (workspace_id, id, kind, content, metadata,"
        " source_table, source_row_id, embedding) VALUES ($1, $2, 'fact', $3, $4::jsonb,"
        " 'campaigns', $5, $6)",
        [
            (
                workspace,
                record_id,
                secret,
                json.dumps({"owner": letter, "secret": secret}),
                str(ids[i]),
                [*EMBEDDING[:2], float(i)],
            )
            for i, record_id in enumerate(tenant.record_ids)
        ],
    )


async def rows_of(db: asyncpg.Connection, workspace: str) -> dict[str, list[str]]:
    """Every row of the workspace, as PostgreSQL holds it."""
    out = {}
    for table in (*TABLE_SQL.values(), "raptorflow_data.memory_records"):
        records = await db.fetch(
            f"SELECT to_jsonb(t)::text AS r FROM {table} t WHERE workspace_id = $1 ORDER BY 1",
            uuid.UUID(workspace),
        )
        out[table] = [r["r"] for r in records]
    return out


async def _checks_tokens(address: str) -> bool:
    async with authorized_channel(address, token=None) as bare:
        try:
            await workspace_service_pb2_grpc.WorkspaceServiceStub(bare).Count(
                pb.CountRequest(workspace_id=A, table="campaigns"), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


@pytest.fixture(scope="module")
async def tenants(server: RunningServer, db: asyncpg.Connection) -> AsyncIterator[Tenants]:
    roles = ["agent", "memory"]
    async with (
        authorized_channel(server.address, mint(roles, [A], subject="tenant-a")) as channel_a,
        authorized_channel(server.address, mint(roles, [B], subject="tenant-b")) as channel_b,
    ):
        made = []
        for workspace, channel in ((A, channel_a), (B, channel_b)):
            tenant = Tenant(
                workspace,
                channel,
                workspace_service_pb2_grpc.WorkspaceServiceStub(channel),
                memory_sync_service_pb2_grpc.MemorySyncServiceStub(channel),
            )
            await seed(db, tenant)
            made.append(tenant)
        yield Tenants(made[0], made[1], await rows_of(db, B), await _checks_tokens(server.address))


# ---------------------------------------------------------------------------
# Checking what A sees

# What the examples got, by property: proof that they reach the database, not only the
# checks in front of it (`test_the_properties_were_exercised` asserts on it).
SEEN: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)


def saw(prop: str, what: str) -> None:
    SEEN[prop][what] += 1


@dataclasses.dataclass
class Answer:
    """A call's outcome: the response, or the status it failed with."""

    response: Any = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""
    reason: str = ""
    raw: bytes = b""
    """Everything the caller received, serialized, to look for the other's secret in."""


async def answer(call: Awaitable[Any]) -> Answer:
    try:
        response = await call
    except grpc.aio.AioRpcError as error:
        failed = error
    else:
        return Answer(response, raw=response.SerializeToString())
    metadata: Any = failed.trailing_metadata() or ()
    trailer = b"".join(
        value
        for key, value in metadata
        if key == "grpc-status-details-bin" and isinstance(value, bytes)
    )
    reason = ""
    if trailer:
        info = error_details_pb2.ErrorInfo()
        for detail in status_pb2.Status.FromString(trailer).details:
            if detail.Unpack(info):
                reason = info.reason
    message = failed.details() or ""
    assert failed.code() not in UNDEFINED, message
    return Answer(None, failed.code(), message, reason, message.encode() + trailer)


def check_private(tenants: Tenants, got: Answer) -> None:
    """Nothing of B's reached A: not in a response, not in an error."""
    assert tenants.b.secret.encode() not in got.raw, f"B's secret reached A: {got}"
    assert B not in got.message, f"an error to A names B's workspace: {got.message}"


async def check_b_untouched(tenants: Tenants, db: asyncpg.Connection) -> None:
    now = await rows_of(db, B)
    if now != tenants.b_rows:
        # Put B back first, so hypothesis shrinks against the same B and reports the
        # smallest request that changes it (not a flaky failure).
        await restore(db, B, tenants.b_rows)
    assert now == tenants.b_rows, "a request of A changed B's rows"


async def restore(db: asyncpg.Connection, workspace: str, rows: dict[str, list[str]]) -> None:
    """Puts back the workspace's rows exactly as `rows_of` recorded them."""
    async with db.transaction():
        for table in (*TABLE_SQL.values(), "raptorflow_data.memory_records"):
            await db.execute(f"DELETE FROM {table} WHERE workspace_id = $1", uuid.UUID(workspace))
        for table, records in rows.items():
            columns = await db.fetch(
                "SELECT quote_ident(attname) AS c FROM pg_attribute WHERE attrelid = $1::regclass"
                " AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
                table,
            )
            names = ", ".join(c["c"] for c in columns)
            await db.execute(
                f"INSERT INTO {table} ({names}) SELECT {names} FROM "
                f"jsonb_populate_recordset(NULL::{table}, $1::jsonb)",
                "[" + ",".join(records) + "]",
            )


def returned_ids(rows: Sequence[Row], position: int = 0) -> set[int]:
    return {r.values[position].int64_value for r in rows}


# ---------------------------------------------------------------------------
# Strategies: values from both workspaces

# Ids of both workspaces' rows are only known once seeded: draw an index into them.
Slot = tuple[str, str, int]
"""(workspace, table, index) of a row whose id goes into a request."""


def _slots() -> st.SearchStrategy[Slot]:
    return st.tuples(st.sampled_from([A, B]), st.sampled_from(EXPOSED), st.integers(0, 3))


def _workspace_texts() -> st.SearchStrategy[str]:
    """Both workspace ids, in spellings a UUID parser accepts."""
    return st.sampled_from([A, B]).flatmap(
        lambda w: st.sampled_from([w, w.upper(), "{" + w + "}", w.replace("-", "")])
    )


@dataclasses.dataclass(frozen=True)
class IdValue:
    """A placeholder for the id of a seeded row, filled in when the request is built."""

    slot: Slot


Drawn = Value | IdValue


def _texts() -> st.SearchStrategy[str]:
    letters_names = [f"{letter}-campaign-{i}" for letter in "ab" for i in range(4)]
    return st.one_of(
        st.sampled_from([*letters_names, "a", "b", "%", "_", "%campaign%", "b-%", "", "opened"]),
        st.text(max_size=8),
    )


def _values(column: str) -> st.SearchStrategy[Drawn]:
    """Values for `column`, mostly of its type, taken from either workspace."""
    ints = st.integers(-2, 10**12 + 3000)
    if column in ("id", "campaign_id"):
        return st.one_of(_slots().map(IdValue), ints.map(v))
    if column == "workspace_id":
        return _workspace_texts().map(lambda w: Value(uuid_value=w))
    if column in ("priority", "small"):
        return st.integers(-1, 6).map(v)
    if column == "score":
        return st.floats(-10, 10).map(v)
    if column == "active":
        return st.booleans().map(v)
    if column in ("meta", "info"):
        return st.sampled_from(['{"owner": "b"}', '{"owner": "a"}', "{}", '{"x": 1}']).map(
            lambda text: Value(json_value=text)
        )
    if column == "external_id":
        return _workspace_texts().map(lambda w: Value(uuid_value=w))
    return _texts().map(v)


_COMPARE = [
    q.OPERATOR_EQ,
    q.OPERATOR_NEQ,
    q.OPERATOR_GT,
    q.OPERATOR_GTE,
    q.OPERATOR_LT,
    q.OPERATOR_LTE,
]


def _conditions(table: str) -> st.SearchStrategy[Any]:
    columns = st.sampled_from([*COLUMNS.get(table, COLUMNS["campaigns"]) * 4, *ODD_COLUMNS[:2]])

    @st.composite
    def condition(draw: st.DrawFn) -> tuple[str, int, list[Drawn]]:
        column = draw(columns)
        kind = draw(st.sampled_from(["compare", "in", "null", "like", "contains"]))
        if kind == "null":
            return column, draw(st.sampled_from([q.OPERATOR_IS_NULL, q.OPERATOR_IS_NOT_NULL])), []
        if kind == "in":
            return column, q.OPERATOR_IN, draw(st.lists(_values(column), min_size=1, max_size=4))
        if kind == "like":
            op = draw(st.sampled_from([q.OPERATOR_LIKE, q.OPERATOR_ILIKE]))
            return column, op, [v(draw(_texts()))]
        if kind == "contains":
            return column, q.OPERATOR_JSON_CONTAINS, [draw(_values("meta"))]
        return column, draw(st.sampled_from(_COMPARE)), [draw(_values(column))]

    return condition()


def filters(table: str) -> st.SearchStrategy[Any]:
    """A filter tree as nested tuples (built into a Filter once ids are known)."""
    return st.recursive(
        _conditions(table).map(lambda c: ("cond", c)),
        lambda children: st.one_of(
            st.tuples(
                st.sampled_from([q.GROUP_OPERATOR_AND, q.GROUP_OPERATOR_OR]),
                st.lists(children, min_size=1, max_size=3),
            ).map(lambda g: ("group", g)),
            children.map(lambda c: ("not", c)),
        ),
        max_leaves=6,
    )


def resolve(tenants: Tenants, drawn: Drawn) -> Value:
    if isinstance(drawn, IdValue):
        workspace, table, index = drawn.slot
        owner = tenants.a if workspace == A else tenants.b
        ids = owner.ids[table]
        return v(ids[index % len(ids)])
    return drawn


def build_filter(tenants: Tenants, tree: Any) -> q.Filter:
    kind, body = tree
    if kind == "cond":
        column, op, drawn = body
        values = [resolve(tenants, d) for d in drawn]
        if op == q.OPERATOR_IN:
            return cond(column, op, values=values)
        return cond(column, op, values[0] if values else None)
    if kind == "not":
        return negate(build_filter(tenants, body))
    operator, children = body
    return q.Filter(
        group=q.FilterGroup(
            operator=operator, filters=[build_filter(tenants, child) for child in children]
        )
    )


def _maybe(strategy: st.SearchStrategy[Any], odds: int) -> st.SearchStrategy[Any]:
    """None one time in `odds`, else what `strategy` draws (st.none() | ... would draw None
    far more often: hypothesis favours the simpler branch)."""
    return st.integers(1, odds).flatmap(lambda roll: strategy if roll < odds else st.none())


def _tables() -> st.SearchStrategy[str]:
    """Mostly exposed tables; one time in five a name out of reach."""
    return st.integers(0, 4).flatmap(
        lambda roll: st.sampled_from(UNREACHABLE) if roll == 4 else st.sampled_from(EXPOSED)
    )


PROPERTY_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# ---------------------------------------------------------------------------
# Reads


@st.composite
def reads(draw: st.DrawFn) -> dict[str, Any]:
    table = draw(_tables())
    known = COLUMNS.get(table, COLUMNS["campaigns"])
    # Now and then a column no table has (a system column, another table's secret).
    names = st.sampled_from(known) if draw(st.integers(0, 5)) else st.sampled_from(ODD_COLUMNS)
    columns = draw(st.lists(names, max_size=3, unique=True))
    return {
        "table": table,
        "columns": ["id", *(c for c in columns if c != "id")],
        "filter": draw(_maybe(filters(table), 4)),
        "order_by": draw(
            st.lists(
                st.tuples(st.sampled_from(known), st.booleans()),
                max_size=2,
                unique_by=lambda o: o[0],
            )
        ),
        "page_size": draw(st.sampled_from([0, 1, 2, 3, 1000])),
    }


MAX_PAGES = 12


@settings(PROPERTY_SETTINGS, max_examples=100)
@given(read=reads())
async def test_reads_see_and_count_only_their_own_rows(
    tenants: Tenants, db: asyncpg.Connection, read: dict[str, Any]
) -> None:
    a = tenants.a
    request = pb.SelectRequest(
        workspace_id=A,
        table=read["table"],
        columns=read["columns"],
        order_by=[q.OrderBy(column=c, descending=d) for c, d in read["order_by"]],
        page_size=read["page_size"],
    )
    if read["filter"] is not None:
        request.filter.CopyFrom(build_filter(tenants, read["filter"]))
    seen: list[int] = []
    for _ in range(MAX_PAGES):
        got = await answer(a.tables.Select(request, timeout=10))
        check_private(tenants, got)
        if got.code != grpc.StatusCode.OK:
            # Refused: an unreachable table, or a bad column, order or filter; at once, not
            # after some pages.
            assert got.code == grpc.StatusCode.INVALID_ARGUMENT, got
            assert not seen, "a later page failed"
            saw("reads", f"refused {got.reason}")
            return
        assert read["table"] in EXPOSED, f"{read['table']!r} was readable"
        seen.extend(returned_ids(got.response.rows))
        if not got.response.next_page_token:
            break
        request.page_token = got.response.next_page_token
    else:
        pytest.fail("more pages than rows")
    saw("reads", "rows" if seen else "no rows")
    mine = set(a.ids[read["table"]])
    assert set(seen) <= mine, f"rows of another workspace returned: {set(seen) - mine}"
    assert len(seen) == len(set(seen)), "a row came back twice across pages"
    counted = await answer(
        a.tables.Count(
            pb.CountRequest(workspace_id=A, table=read["table"], filter=request.filter)
            if request.HasField("filter")
            else pb.CountRequest(workspace_id=A, table=read["table"]),
            timeout=10,
        )
    )
    check_private(tenants, counted)
    assert counted.code == grpc.StatusCode.OK, counted
    assert counted.response.count == len(seen)
    # The same request in B's workspace sees none of A's rows (the mirror image).
    request.workspace_id = B
    request.page_token = ""
    theirs = await answer(tenants.b.tables.Select(request, timeout=10))
    if theirs.code == grpc.StatusCode.OK:
        assert not returned_ids(theirs.response.rows) & mine
        assert tenants.a.secret.encode() not in theirs.raw


async def test_tables_out_of_reach_are_refused_and_nothing_is_described(tenants: Tenants) -> None:
    for table in UNREACHABLE:
        got = await answer(
            tenants.a.tables.Select(pb.SelectRequest(workspace_id=A, table=table), timeout=10)
        )
        assert got.code == grpc.StatusCode.INVALID_ARGUMENT, (table, got)
        assert got.reason == "UNKNOWN_TABLE", (table, got)
        check_private(tenants, got)


# ---------------------------------------------------------------------------
# Page tokens


def _tamper(token: str, how: str, where: int) -> str:
    raw = token.encode()
    if how == "flip":
        i = where % len(raw)
        flipped = chr(raw[i] ^ 1) if chr(raw[i] ^ 1).isalnum() else "A"
        return token[:i] + flipped + token[i + 1 :]
    if how == "truncate":
        return token[: where % len(token)]
    if how == "extend":
        return token + "AAAA"
    if how == "reencode":
        padded = token + "=" * (-len(token) % 4)
        try:
            body = bytearray(base64.urlsafe_b64decode(padded))
        except ValueError:
            return token[::-1]
        if body:
            body[where % len(body)] ^= 0x80
        return base64.urlsafe_b64encode(bytes(body)).decode().rstrip("=")
    return token.swapcase()


@settings(PROPERTY_SETTINGS, max_examples=40)
@given(
    table=st.sampled_from(EXPOSED),
    order=st.sampled_from(["id", "workspace_id", None]),
    replay=st.sampled_from(["in B", "A's token on B", "other filter", "other table", "tampered"]),
    how=st.sampled_from(["flip", "truncate", "extend", "reencode", "case"]),
    where=st.integers(0, 10_000),
)
async def test_page_tokens_never_cross_workspaces(
    tenants: Tenants, table: str, order: str | None, replay: str, how: str, where: int
) -> None:
    """A token issued for A's request, replayed anywhere else, is refused: it never reads
    rows of B, nor rows of A with other parameters."""
    first = pb.SelectRequest(workspace_id=A, table=table, columns=["id"], page_size=1)
    if order is not None:
        first.order_by.add(column=order)
    page = await tenants.a.tables.Select(first, timeout=10)
    token = page.next_page_token
    assert token, "A has more than one row in every exposed table"
    replayed = pb.SelectRequest()
    replayed.CopyFrom(first)
    replayed.page_token = token
    caller = tenants.a
    expected = {grpc.StatusCode.INVALID_ARGUMENT}
    if replay == "in B":
        caller = tenants.b
        replayed.workspace_id = B
    elif replay == "A's token on B":
        replayed.workspace_id = B
        expected = (
            {grpc.StatusCode.PERMISSION_DENIED}
            if tenants.enforces_auth
            else {grpc.StatusCode.INVALID_ARGUMENT}
        )
    elif replay == "other filter":
        replayed.filter.CopyFrom(cond("id", q.OPERATOR_IS_NOT_NULL))
    elif replay == "other table":
        replayed.table = next(t for t in EXPOSED if t != table)
    else:
        replayed.page_token = _tamper(token, how, where)
        if replayed.page_token == token:
            return
    got = await answer(caller.tables.Select(replayed, timeout=10))
    saw("page tokens", f"{replay}: {got.code.name}")
    assert got.code in expected, (replay, got)
    if got.code == grpc.StatusCode.INVALID_ARGUMENT:
        assert got.reason == "INVALID_PAGE_TOKEN", got
    check_private(tenants, got)


# ---------------------------------------------------------------------------
# Writes


# What an insert must give (NOT NULL without a default), the unique keys an upsert may
# name, and the columns no write should give most of the time.
REQUIRED = {"campaigns": ["name"], "campaign_events": ["kind"], ODD_TABLE: ["id"]}
UNIQUE_KEYS = {
    "campaigns": [["id"], ["name"], ["workspace_id", "name"]],
    "campaign_events": [["id"]],
    ODD_TABLE: [["id"]],
}
RARELY_WRITTEN = ("workspace_id", "created_at")


@st.composite
def writes(draw: st.DrawFn) -> dict[str, Any]:
    table = draw(
        st.integers(0, 9).flatmap(
            lambda roll: st.just("internal_secrets") if roll == 9 else st.sampled_from(EXPOSED)
        )
    )
    known = COLUMNS.get(table, COLUMNS["campaigns"])
    required = REQUIRED.get(table, ["name"])
    optional = [c for c in known if c not in (*required, *RARELY_WRITTEN)]
    written = [*required, *draw(st.lists(st.sampled_from(optional), max_size=2, unique=True))]
    if not draw(st.integers(0, 5)):
        written.append("workspace_id")  # only ever A's own, or refused
    updated = draw(st.lists(st.sampled_from(optional), min_size=1, max_size=2, unique=True))
    if not draw(st.integers(0, 5)):
        updated.append("workspace_id")
    return {
        "table": table,
        "kind": draw(st.sampled_from(["update", "delete", "insert", "upsert", "batch"])),
        "filter": draw(_maybe(filters(table), 6)),
        "allow_unfiltered": draw(st.booleans()),
        "columns": written,
        "values": {c: draw(_values(c)) for c in updated},
        "rows": [[draw(_values(c)) for c in written] for _ in range(draw(st.integers(1, 3)))],
        "conflict": draw(st.sampled_from(UNIQUE_KEYS.get(table, [["id"]]))),
        "on_conflict": draw(
            st.sampled_from([pb.CONFLICT_ACTION_UPDATE, pb.CONFLICT_ACTION_IGNORE])
        ),
        "batch_workspace": draw(st.sampled_from(["", "", A, B])),
    }


def build_write(tenants: Tenants, write: dict[str, Any], workspace: str) -> tuple[str, Any]:
    table = write["table"]
    columns = write["columns"]
    rows = [Row(values=[resolve(tenants, d) for d in row]) for row in write["rows"]]
    f = build_filter(tenants, write["filter"]) if write["filter"] is not None else None
    returning = ["*"] if table != "internal_secrets" else ["id"]
    if write["kind"] == "update":
        request = pb.UpdateRequest(
            workspace_id=workspace,
            table=table,
            values={c: resolve(tenants, d) for c, d in write["values"].items()},
            allow_unfiltered=write["allow_unfiltered"],
            returning=returning,
        )
        if f is not None:
            request.filter.CopyFrom(f)
        return "Update", request
    if write["kind"] == "delete":
        delete = pb.DeleteRequest(
            workspace_id=workspace,
            table=table,
            allow_unfiltered=write["allow_unfiltered"],
            returning=returning,
        )
        if f is not None:
            delete.filter.CopyFrom(f)
        return "Delete", delete
    if write["kind"] == "insert":
        return "Insert", pb.InsertRequest(
            workspace_id=workspace, table=table, columns=columns, rows=rows, returning=returning
        )
    upsert = pb.UpsertRequest(
        workspace_id=workspace,
        table=table,
        columns=columns,
        rows=rows,
        conflict_columns=write["conflict"],
        on_conflict=write["on_conflict"],
        returning=returning,
    )
    if write["kind"] == "upsert":
        return "Upsert", upsert
    upsert.workspace_id = write["batch_workspace"]
    inner = pb.UpdateRequest(
        workspace_id=write["batch_workspace"],
        table=table,
        values={c: resolve(tenants, d) for c, d in write["values"].items()},
        allow_unfiltered=True,
        returning=returning,
    )
    if f is not None:
        inner.filter.CopyFrom(f)
    return "ExecuteBatch", pb.ExecuteBatchRequest(
        workspace_id=workspace,
        operations=[pb.BatchOperation(upsert=upsert), pb.BatchOperation(update=inner)],
    )


def returned_workspaces(response: Any) -> set[str]:
    """The workspace ids in the rows a write returned (RETURNING *)."""
    sets = []
    if isinstance(response, pb.ExecuteBatchResponse):
        for result in response.results:
            sets.append(getattr(result, result.WhichOneof("result") or "insert").returning)
    else:
        sets.append(response.returning)
    found: set[str] = set()
    for row_set in sets:
        if "workspace_id" in row_set.columns:
            position = list(row_set.columns).index("workspace_id")
            found.update(r.values[position].uuid_value for r in row_set.rows)
    return found


@settings(PROPERTY_SETTINGS, max_examples=120)
@given(write=writes())
async def test_writes_change_only_their_own_rows(
    tenants: Tenants, db: asyncpg.Connection, write: dict[str, Any]
) -> None:
    await seed(db, tenants.a)
    method, request = build_write(tenants, write, A)
    before = await rows_of(db, A)
    got = await answer(getattr(tenants.a.tables, method)(request, timeout=10))
    check_private(tenants, got)
    if write["batch_workspace"] == B and method == "ExecuteBatch":
        # A batch of A naming B inside: refused whole, by the token or by the batch.
        assert got.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)
    if got.code == grpc.StatusCode.OK:
        assert returned_workspaces(got.response) <= {A}
        if method in ("Update", "Delete"):
            assert got.response.affected_count <= len(tenants.a.ids.get(write["table"], ()))
        changed = await rows_of(db, A) != before
        saw("writes", f"{method} OK, {'changed A' if changed else 'changed nothing'}")
    else:
        saw("writes", f"{method} {got.code.name} {got.reason}")
    await check_b_untouched(tenants, db)


# ---------------------------------------------------------------------------
# Memory records


@st.composite
def memory_calls(draw: st.DrawFn) -> dict[str, Any]:
    record_ids = [f"{letter}-record-{i}" for letter in "ab" for i in range(3)]
    return {
        "kind": draw(st.sampled_from(["search", "upsert", "delete"])),
        "ids": draw(
            st.lists(st.sampled_from([*record_ids, "x"]), min_size=1, max_size=4, unique=True)
        ),
        "source_rows": draw(st.lists(_slots().map(IdValue), max_size=3)),
        "source_table": draw(st.sampled_from(["", "campaigns", "internal_secrets"])),
        "metadata_contains": draw(st.sampled_from(["", '{"owner": "b"}', '{"owner": "a"}', "{}"])),
        "kinds": draw(st.lists(st.sampled_from(["fact", "note"]), max_size=2)),
        "top_k": draw(st.integers(1, 20)),
        "embedding": draw(
            st.sampled_from([EMBEDDING, [*EMBEDDING[:2], 2.0], [1.0, 0.0, 0.0], [1.0, 1.0]])
        ),
    }


def build_memory(tenants: Tenants, call: dict[str, Any], workspace: str) -> tuple[str, Any]:
    source_rows = [str(resolve(tenants, d).int64_value) for d in call["source_rows"]]
    if call["kind"] == "search":
        return "SearchMemoryRecords", mpb.SearchMemoryRecordsRequest(
            workspace_id=workspace,
            embedding=call["embedding"],
            top_k=call["top_k"],
            kinds=call["kinds"],
            source_table=call["source_table"],
            metadata_contains=call["metadata_contains"],
        )
    if call["kind"] == "delete":
        return "DeleteMemoryRecords", mpb.DeleteMemoryRecordsRequest(
            workspace_id=workspace,
            ids=call["ids"],
            source_table=call["source_table"] if source_rows else "",
            source_row_ids=source_rows if call["source_table"] else [],
        )
    records = [
        mpb.MemoryRecord(
            id=record_id,
            kind="fact",
            content="written by a",
            source_table="campaigns",
            source_row_id=source_rows[0] if source_rows else "",
            embedding=call["embedding"],
        )
        for record_id in call["ids"]
    ]
    return "UpsertMemoryRecords", mpb.UpsertMemoryRecordsRequest(
        workspace_id=workspace, records=records
    )


async def call_memory(tenant: Tenant, method: str, request: Any) -> Answer:
    stub = getattr(tenant.memory, method)
    if method != "UpsertMemoryRecords":
        return await answer(stub(request, timeout=10))

    async def batches() -> AsyncIterator[Any]:
        yield request

    return await answer(stub(batches(), timeout=10))


@settings(PROPERTY_SETTINGS, max_examples=60)
@given(call=memory_calls())
async def test_memory_records_never_cross_workspaces(
    tenants: Tenants, db: asyncpg.Connection, call: dict[str, Any]
) -> None:
    await seed(db, tenants.a)
    method, request = build_memory(tenants, call, A)
    got = await call_memory(tenants.a, method, request)
    check_private(tenants, got)
    saw("memory", f"{method} {got.code.name} {got.reason}")
    if got.code == grpc.StatusCode.OK:
        if method == "SearchMemoryRecords":
            for result in got.response.results:
                assert result.record.content != tenants.b.secret
                assert result.record.metadata.fields["owner"].string_value != "b"
        elif method == "DeleteMemoryRecords":
            assert got.response.deleted_count <= len(tenants.a.record_ids)
        else:
            assert got.response.inserted_count + got.response.updated_count == len(call["ids"])
    await check_b_untouched(tenants, db)


# ---------------------------------------------------------------------------
# A's token, B's workspace


@settings(PROPERTY_SETTINGS, max_examples=40)
@given(
    target=st.sampled_from(["read", "write", "memory"]),
    read=reads(),
    write=writes(),
    call=memory_calls(),
    spelling=st.sampled_from([str.lower, str.upper, lambda w: "{" + w + "}"]),
)
async def test_a_token_of_a_never_opens_b(
    tenants: Tenants,
    db: asyncpg.Connection,
    target: str,
    read: dict[str, Any],
    write: dict[str, Any],
    call: dict[str, Any],
    spelling: Any,
) -> None:
    if not tenants.enforces_auth:
        pytest.skip("the server does not check tokens yet")
    theirs = spelling(B)
    if target == "read":
        got = await answer(
            tenants.a.tables.Count(
                pb.CountRequest(workspace_id=theirs, table=read["table"]), timeout=10
            )
        )
    elif target == "write":
        method, request = build_write(tenants, write, theirs)
        got = await answer(getattr(tenants.a.tables, method)(request, timeout=10))
    else:
        method, request = build_memory(tenants, call, theirs)
        got = await call_memory(tenants.a, method, request)
    saw("A's token on B", f"{target} {got.code.name}")
    assert got.code == grpc.StatusCode.PERMISSION_DENIED, got
    check_private(tenants, got)
    await check_b_untouched(tenants, db)


async def test_b_has_rows_and_a_filter_naming_them_finds_none(
    tenants: Tenants, db: asyncpg.Connection
) -> None:
    """Sanity of the properties above: B's rows exist and A cannot see them by any filter
    naming them outright."""
    assert tenants.b_rows["campaigns"], "B has rows"
    got = await answer(
        tenants.a.tables.Select(
            pb.SelectRequest(
                workspace_id=A,
                table="campaigns",
                columns=["id"],
                filter=cond("id", q.OPERATOR_IN, values=[v(i) for i in tenants.b.ids["campaigns"]]),
            ),
            timeout=10,
        )
    )
    assert got.code == grpc.StatusCode.OK
    assert list(got.response.rows) == []
    nulls = await answer(
        tenants.a.tables.Count(
            pb.CountRequest(
                workspace_id=A, table="campaigns", filter=negate(cond("name", q.OPERATOR_IS_NULL))
            ),
            timeout=10,
        )
    )
    assert nulls.response.count == len(tenants.a.ids["campaigns"])
    await check_b_untouched(tenants, db)


def test_the_properties_were_exercised() -> None:
    """The examples above reached the database: reads that returned rows, writes that
    changed A, memory calls that succeeded. Printed with `pytest -s`."""
    for prop, outcomes in SEEN.items():
        print(f"{prop}: " + ", ".join(f"{k} {n}" for k, n in sorted(outcomes.items())))
    assert SEEN["reads"]["rows"] > 0
    assert sum(n for k, n in SEEN["writes"].items() if "changed A" in k) > 0
    assert sum(n for k, n in SEEN["memory"].items() if " OK " in k) > 0


@pytest.mark.xfail(
    strict=True,
    reason="campaign_events.campaign_id references campaigns (id), not (workspace_id, id): "
    "A's event may point at B's campaign (which tells A that the id exists, where a missing "
    "one is FOREIGN_KEY_VIOLATION), and B deleting that campaign then cascades into A's "
    "rows. Referential actions bypass row-level security, so only the schema (foreign keys "
    "that include workspace_id) or a catalog check can close it.",
)
async def test_a_row_of_a_cannot_reference_a_row_of_b(
    tenants: Tenants, db: asyncpg.Connection
) -> None:
    theirs = tenants.b.ids["campaigns"][0]
    got = await answer(
        tenants.a.tables.Insert(
            pb.InsertRequest(
                workspace_id=A,
                table="campaign_events",
                columns=["campaign_id", "kind"],
                rows=[Row(values=[v(theirs), v("pointing at b")])],
            ),
            timeout=10,
        )
    )
    await db.execute(
        "DELETE FROM campaign_events WHERE workspace_id = $1 AND kind = 'pointing at b'",
        uuid.UUID(A),
    )
    await check_b_untouched(tenants, db)
    assert (got.code, got.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "FOREIGN_KEY_VIOLATION",
    ), "A's row references B's campaign"
