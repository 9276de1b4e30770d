"""Fuzzing: every method of every served service answers random and malformed requests with a
defined status, stays up, and leaks no connection.

The methods come from the generated descriptors (every `*_pb2` module of
raptorflow.data.v1), checked against the services the server registers. Each
method gets the seed corpus first (tests/fuzz_corpus, see its README), then
hypothesis-generated requests (`fuzz_strategies.py`): random messages built from
the descriptors, and raw bytes that do not decode as one. Everything is sent as
bytes through generic multicallables, so nothing on the client side encodes or
checks it.

Every answer must be a status of the service's own making: OK, or an error
with the service's ErrorInfo (never UNKNOWN or INTERNAL, never a deadline the
client had to enforce); no response or message carries the secret of a table
no request may reach; after each call no connection of the service is busy or
held, and a StartJob that started a job gets it cancelled and waited for.
Streams are read for a few messages, then cancelled. The same requests without a
token, and calls with fuzzed tokens (claims of any JSON type and size, other keys
and algorithms, two headers), must end UNAUTHENTICATED or PERMISSION_DENIED (or
OK, for a token that happens to be good), never worse. A bystander workspace
outside the fuzzing namespace must end the run as it began. The run prints its
figures (requests per method, statuses seen) at the end; `pytest -s` shows them,
and RAPTORFLOW_FUZZ_REPORT=<file> also writes them as JSON.

Hypothesis runs derandomized with capped examples, so CI sees the same requests
each time and the module takes about a minute on two cores.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import hashlib
import hmac
import importlib
import json
import os
import pathlib
import pkgutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import grpc
import pytest
import raptorflow.data.v1
from conftest import CAMPAIGN_COLUMNS, ODD_TABLE, SECRET
from fake_grpc import serve
from fuzz_strategies import Vocabulary, request_streams, workspace_in_namespace
from google.protobuf import message_factory, text_format
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from messages import Row, v
from pg_activity import service_backends
from raptorflow.data.server import app
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.sync import capture
from raptorflow.data.v1 import (
    job_pb2,
    maintenance_service_pb2,
    memory_sync_service_pb2,
    memory_sync_service_pb2_grpc,
    monitoring_service_pb2,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)
from tokens import ADMIN_TOKEN, TEST_JWT_SECRET, authorized_channel

CORPUS = pathlib.Path(__file__).parent / "fuzz_corpus"
DOMAIN = "data.raptorflow.dev"
DETAILS_KEY = "grpc-status-details-bin"
# Never the answer to anything: UNKNOWN is an exception nobody mapped, INTERNAL a bug.
UNDEFINED = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
# A unary call that takes this long hangs; the server's own deadlines are far shorter.
CALL_TIMEOUT = 20.0
# Streams: read this many messages, waiting at most this long for each, then cancel.
STREAM_MESSAGES = 3
STREAM_WAIT = 1.0
# How long the service may take to hand back a connection after a call ended.
IDLE_WITHIN = 10.0
CANCELLED_BY_FUZZER = "CANCELLED (by the fuzzer, stream still open)"

WORKSPACE = workspace_in_namespace("fuzz-a")
OTHER_WORKSPACE = workspace_in_namespace("fuzz-b")
# The tables with change capture, as test_sync installs it.
CAPTURED = ("campaigns", "campaign_events")
# A workspace outside the fuzzing namespace, seeded with rows no fuzzed request may change.
BYSTANDER = str(uuid.uuid4())


def served_services() -> list[ServiceDescriptor]:
    """Every service of the generated raptorflow.data.v1 modules."""
    services = []
    for module_info in pkgutil.iter_modules(raptorflow.data.v1.__path__):
        if module_info.name.endswith("_pb2"):
            module = importlib.import_module(f"raptorflow.data.v1.{module_info.name}")
            services.extend(module.DESCRIPTOR.services_by_name.values())
    return sorted(services, key=lambda s: s.full_name)


SERVICES = served_services()
METHODS = [method for service in SERVICES for method in service.methods]
UNARY = [m for m in METHODS if not m.client_streaming and not m.server_streaming]
STREAMING = [m for m in METHODS if m.client_streaming or m.server_streaming]

VOCABULARY = Vocabulary(
    workspaces=(WORKSPACE, OTHER_WORKSPACE),
    # Exposed tables several times over: drawn more often than the names that only fail.
    tables=(
        *("campaigns", "campaign_events", ODD_TABLE) * 3,
        "internal_secrets",
        "public.campaigns",
        '"campaigns"',
        "CAMPAIGNS",
        "pg_catalog.pg_authid",
        "raptorflow_data.jobs",
        "raptorflow_data.memory_records",
        "information_schema.tables",
    ),
    columns=(
        *CAMPAIGN_COLUMNS,
        "kind",
        "happened_at",
        "counts",
        "info",
        "note",
        "address",
        "small",
        "ratio",
        "big",
        "campaign_id",
        "select",
        "drop table x; --",
        "secret",
        "*",
        "ctid",
        "xmin",
        "tableoid",
        "id; --",
        "NAME",
    ),
)


def method_path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def method_id(method: MethodDescriptor) -> str:
    return f"{method.containing_service.name}.{method.name}"


# ---------------------------------------------------------------------------
# Figures


@dataclasses.dataclass
class Figures:
    """What the run tried and saw, per method."""

    calls: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    messages: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    statuses: dict[str, collections.Counter[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    reasons: dict[str, collections.Counter[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    jobs_started: int = 0
    started_at: float = dataclasses.field(default_factory=time.monotonic)

    def record(self, method: MethodDescriptor, sent: int, status: str, reason: str = "") -> None:
        name = method_id(method)
        self.calls[name] += 1
        self.messages[name] += sent
        self.statuses[name][status] += 1
        if reason:
            self.reasons[name][f"{status} {reason}"] += 1

    def totals(self) -> collections.Counter[str]:
        total: collections.Counter[str] = collections.Counter()
        for seen in self.statuses.values():
            total.update(seen)
        return total

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": sum(self.calls.values()),
            "messages": sum(self.messages.values()),
            "jobs_started_and_cancelled": self.jobs_started,
            "statuses": dict(self.totals().most_common()),
            "crashes": sum(self.totals()[c.name] for c in UNDEFINED),
            "seconds": round(time.monotonic() - self.started_at, 1),
            "methods": {
                name: {
                    "requests": self.calls[name],
                    "statuses": dict(self.statuses[name]),
                    "reasons": dict(self.reasons[name].most_common()),
                }
                for name in sorted(self.calls)
            },
        }

    def summary(self) -> str:
        report = self.as_dict()
        lines = [
            f"fuzzing: {report['requests']} requests ({report['messages']} messages) to "
            f"{len(report['methods'])} methods in {report['seconds']} s; "
            f"{report['crashes']} crashes (UNKNOWN/INTERNAL); "
            f"{report['jobs_started_and_cancelled']} jobs started and cancelled",
            "statuses: " + ", ".join(f"{k} {n}" for k, n in report["statuses"].items()),
        ]
        for name, figures in report["methods"].items():
            seen = ", ".join(f"{k} {n}" for k, n in sorted(figures["statuses"].items()))
            lines.append(f"  {name:<42} {figures['requests']:>5}  {seen}")
        return "\n".join(lines)


FIGURES = Figures()


@pytest.fixture(scope="module", autouse=True)
def fuzz_report() -> Iterator[None]:
    yield
    print("\n" + FIGURES.summary())
    target = os.environ.get("RAPTORFLOW_FUZZ_REPORT")
    if target:
        pathlib.Path(target).write_text(json.dumps(FIGURES.as_dict(), indent=2) + "\n")


# ---------------------------------------------------------------------------
# Calls


@dataclasses.dataclass
class Outcome:
    """How one call ended."""

    code: grpc.StatusCode
    details: str
    trailing: tuple[tuple[str, str | bytes], ...]
    responses: list[bytes]
    cancelled_by_fuzzer: bool = False

    @property
    def label(self) -> str:
        return CANCELLED_BY_FUZZER if self.cancelled_by_fuzzer else self.code.name

    @property
    def reason(self) -> str:
        """The ErrorInfo reason, when the status carries one."""
        for key, value in self.trailing:
            if key == DETAILS_KEY and isinstance(value, bytes):
                info = error_details_pb2.ErrorInfo()
                for detail in status_pb2.Status.FromString(value).details:
                    if detail.Unpack(info):
                        return info.reason
        return ""


async def _ended(call: Any, responses: list[bytes], cancelled: bool) -> Outcome:
    return Outcome(
        await call.code(),
        await call.details() or "",
        tuple(await call.trailing_metadata() or ()),
        responses,
        cancelled,
    )


async def send(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    payloads: list[bytes],
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> Outcome:
    """Sends `payloads` as they are (the first only, unless requests stream); reads at most
    STREAM_MESSAGES responses of a response stream, then cancels it."""
    path = method_path(method)
    if method.client_streaming and method.server_streaming:
        raise NotImplementedError("no bidirectional method yet; teach the fuzzer to drive one")
    options: dict[str, Any] = {"timeout": CALL_TIMEOUT, "metadata": metadata}
    if method.client_streaming:
        call: Any = channel.stream_unary(path)(iter(payloads), **options)
    elif method.server_streaming:
        call = channel.unary_stream(path)(payloads[0], **options)
    else:
        call = channel.unary_unary(path)(payloads[0], **options)
    if not method.server_streaming:
        try:
            return await _ended(call, [await call], False)
        except grpc.aio.AioRpcError:
            return await _ended(call, [], False)
    responses: list[bytes] = []
    cancelled = False
    try:
        while len(responses) < STREAM_MESSAGES:
            message = await asyncio.wait_for(call.read(), STREAM_WAIT)
            if message is grpc.aio.EOF:
                break
            responses.append(message)
        else:
            cancelled = call.cancel()
    except TimeoutError:
        # The timed-out read has cancelled the call already (grpc.aio cancels a call whose
        # read is cancelled); this makes sure.
        call.cancel()
        cancelled = True
    except grpc.aio.AioRpcError:
        pass
    return await _ended(call, responses, cancelled)


def rich_status(outcome: Outcome) -> tuple[status_pb2.Status, error_details_pb2.ErrorInfo]:
    raw = [value for key, value in outcome.trailing if key == DETAILS_KEY]
    assert len(raw) == 1, f"{outcome.code.name} carries no single {DETAILS_KEY}"
    assert isinstance(raw[0], bytes)
    status = status_pb2.Status.FromString(raw[0])
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in status.details), "no ErrorInfo"
    return status, info


def check_outcome(method: MethodDescriptor, outcome: Outcome) -> None:
    """A defined answer: OK, a cancel of ours, or an error of the service's own making."""
    shown = f"{method.full_name} answered {outcome.code.name}: {outcome.details!r}"
    assert outcome.code not in UNDEFINED, shown
    secret = SECRET.encode()
    assert all(secret not in r for r in outcome.responses), f"{method.full_name} leaked SECRET"
    assert SECRET not in outcome.details, shown
    output = message_factory.GetMessageClass(method.output_type)
    for response in outcome.responses:
        output.FromString(response)  # raises if the server sent something else
    if outcome.code == grpc.StatusCode.OK or outcome.cancelled_by_fuzzer:
        return
    # A deadline the client had to enforce is a hang; UNAVAILABLE or CANCELLED without
    # the service's status is a dropped connection or a crashed handler.
    status, info = rich_status(outcome)
    assert info.domain == DOMAIN, shown
    assert info.reason, shown
    assert status.code == outcome.code.value[0], shown
    assert status.message == outcome.details, shown


async def wait_until_idle(server: RunningServer, db: asyncpg.Connection) -> None:
    """Waits until the service holds no pool connection and runs nothing in PostgreSQL;
    fails if that does not happen within IDLE_WITHIN seconds."""
    started = time.monotonic()
    while True:
        holds = server.database.holds_over(0.0)
        in_use = server.database.pool_stats()["in_use"]
        busy = [
            (r["state"], r["query"])
            for r in (await service_backends(db)).values()
            if r["state"] != "idle"
        ]
        if not holds and not in_use and not busy:
            return
        assert time.monotonic() - started < IDLE_WITHIN, (
            f"the service still holds connections: holds {holds}, in use {in_use}, busy {busy}"
        )
        await asyncio.sleep(0.02)


class Fuzzer:
    """Sends requests to the module's server and checks every answer and the server after it."""

    def __init__(
        self, server: RunningServer, channel: grpc.aio.Channel, db: asyncpg.Connection
    ) -> None:
        self.server = server
        self.channel = channel
        self.db = db
        self.jobs: list[str] = []
        """Jobs fuzzed StartJob calls started (each cancelled and waited for at once)."""

    async def check(self, method: MethodDescriptor, payloads: list[bytes]) -> Outcome:
        outcome = await send(self.channel, method, payloads)
        FIGURES.record(method, len(payloads), outcome.label, outcome.reason)
        check_outcome(method, outcome)
        if method.name == "StartJob" and outcome.code == grpc.StatusCode.OK:
            await self.cancel_job(
                maintenance_service_pb2.StartJobResponse.FromString(outcome.responses[0]).job.job_id
            )
        await wait_until_idle(self.server, self.db)
        return outcome

    async def cancel_job(self, job_id: str) -> None:
        """Cancels a job a fuzzed StartJob started and waits until it has ended."""
        FIGURES.jobs_started += 1
        self.jobs.append(job_id)
        cancel = self.channel.unary_unary(
            "/raptorflow.data.v1.MaintenanceService/CancelJob",
            request_serializer=maintenance_service_pb2.CancelJobRequest.SerializeToString,
            response_deserializer=maintenance_service_pb2.CancelJobResponse.FromString,
        )
        get = self.channel.unary_unary(
            "/raptorflow.data.v1.MaintenanceService/GetJob",
            request_serializer=maintenance_service_pb2.GetJobRequest.SerializeToString,
            response_deserializer=maintenance_service_pb2.GetJobResponse.FromString,
        )
        await cancel(maintenance_service_pb2.CancelJobRequest(job_id=job_id), timeout=10)
        final = (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED)
        started = time.monotonic()
        while True:
            job = (await get(maintenance_service_pb2.GetJobRequest(job_id=job_id), timeout=10)).job
            if job.state in final:
                return
            assert time.monotonic() - started < 30, f"job {job_id} did not end: {job}"
            await asyncio.sleep(0.05)


async def seed_workspace(channel: grpc.aio.Channel, workspace: str) -> None:
    """Rows in every test table, and memory records, for fuzzed requests to find."""
    tables = workspace_service_pb2_grpc.WorkspaceServiceStub(channel)
    inserted = await tables.Insert(
        workspace_service_pb2.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "status", "priority", "score"],
            rows=[Row(values=[v(f"c{i}"), v("active"), v(i), v(i / 2)]) for i in range(5)],
            returning=["id"],
        ),
        timeout=10,
    )
    ids = [r.values[0].int64_value for r in inserted.returning.rows]
    await tables.Insert(
        workspace_service_pb2.InsertRequest(
            workspace_id=workspace,
            table="campaign_events",
            columns=["campaign_id", "kind"],
            rows=[Row(values=[v(i), v("opened")]) for i in ids],
        ),
        timeout=10,
    )
    base = uuid.UUID(workspace).int % 10**12 * 10
    await tables.Insert(
        workspace_service_pb2.InsertRequest(
            workspace_id=workspace,
            table=ODD_TABLE,
            columns=["id", "select"],
            rows=[Row(values=[v(base + i), v("s")]) for i in range(2)],
        ),
        timeout=10,
    )
    memory = memory_sync_service_pb2_grpc.MemorySyncServiceStub(channel)

    async def batches() -> Any:
        yield memory_sync_service_pb2.UpsertMemoryRecordsRequest(
            workspace_id=workspace,
            records=[
                memory_sync_service_pb2.MemoryRecord(
                    id=f"m{i}", kind="fact", content="remembered", embedding=[1.0, float(i)]
                )
                for i in range(3)
            ],
        )

    await memory.UpsertMemoryRecords(batches(), timeout=10)


async def workspace_rows(db: asyncpg.Connection, workspace: str) -> dict[str, list[str]]:
    """Every row of a workspace, in every table and the memory records, as PostgreSQL has it."""
    out = {}
    for table in (
        "campaigns",
        "campaign_events",
        '"Odd ""Name"" table"',
        "raptorflow_data.memory_records",
    ):
        records = await db.fetch(
            f"SELECT to_jsonb(t)::text AS r FROM {table} t WHERE workspace_id = $1 ORDER BY 1",
            uuid.UUID(workspace),
        )
        out[table] = [r["r"] for r in records]
    return out


@pytest.fixture(scope="module")
async def bystander(
    server: RunningServer, channel: grpc.aio.Channel, db: asyncpg.Connection
) -> dict[str, list[str]]:
    """Seeds the fuzzing workspaces and a bystander outside them; the bystander's rows.
    Change capture goes on the tables sync streams read (as test_sync has it), so a
    fuzzed Sync gets past its precondition."""
    await capture.install(server.database, server.settings, ",".join(CAPTURED))
    for workspace in (WORKSPACE, OTHER_WORKSPACE, BYSTANDER):
        await seed_workspace(channel, workspace)
    return await workspace_rows(db, BYSTANDER)


@pytest.fixture(scope="module")
def fuzzer(
    server: RunningServer,
    channel: grpc.aio.Channel,
    db: asyncpg.Connection,
    bystander: dict[str, list[str]],
) -> Fuzzer:
    return Fuzzer(server, channel, db)


# ---------------------------------------------------------------------------
# The seed corpus


@dataclasses.dataclass(frozen=True)
class Seed:
    """One corpus case: the requests it sends, and the statuses it may end with (any
    defined one when empty)."""

    name: str
    payloads: tuple[bytes, ...]
    expect: tuple[str, ...] = ()


STREAM_SEPARATOR = "#---"
PLACEHOLDERS = {"${WORKSPACE}": WORKSPACE, "${OTHER_WORKSPACE}": OTHER_WORKSPACE}


def _text_seed(method: MethodDescriptor, path: pathlib.Path) -> Seed:
    text = path.read_text()
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    expect: tuple[str, ...] = ()
    for line in text.splitlines():
        if line.startswith("# expect:"):
            expect = tuple(code.strip() for code in line.split(":", 1)[1].split(","))
            assert all(code in grpc.StatusCode.__members__ for code in expect), path
    parts = text.split("\n" + STREAM_SEPARATOR + "\n")
    assert len(parts) == 1 or method.client_streaming, f"{path}: only request streams take parts"
    cls = message_factory.GetMessageClass(method.input_type)
    payloads = tuple(text_format.Parse(part, cls()).SerializeToString() for part in parts)
    return Seed(f"{path.parent.name}/{path.name}", payloads, expect)


def seeds(method: MethodDescriptor) -> list[Seed]:
    """The corpus cases of `method`: its own (text and raw), then the raw ones of every method."""
    found = []
    own = CORPUS / method.containing_service.full_name / method.name
    for path in sorted(own.glob("*")) if own.is_dir() else []:
        if path.suffix == ".txtpb":
            found.append(_text_seed(method, path))
        elif path.suffix == ".bin":
            found.append(Seed(f"{method.name}/{path.name}", (path.read_bytes(),)))
        else:
            raise AssertionError(f"{path}: corpus files are .txtpb or .bin")
    for path in sorted((CORPUS / "all").glob("*.bin")):
        found.append(Seed(f"all/{path.name}", (path.read_bytes(),)))
    return found


def test_the_fuzzed_services_are_the_served_ones() -> None:
    assert {s.full_name for s in SERVICES} == set(app.SERVED_SERVICES)
    assert len(METHODS) >= 22


def test_the_corpus_names_only_methods_that_exist() -> None:
    known = {(m.containing_service.full_name, m.name) for m in METHODS}
    for service_dir in CORPUS.iterdir():
        if service_dir.is_file() or service_dir.name == "all":
            continue
        for method_dir in service_dir.iterdir():
            assert (service_dir.name, method_dir.name) in known, f"{method_dir}: no such method"


@pytest.mark.parametrize("method", METHODS, ids=method_id)
async def test_seed_corpus(fuzzer: Fuzzer, method: MethodDescriptor) -> None:
    for seed in seeds(method):
        outcome = await fuzzer.check(method, list(seed.payloads))
        if seed.expect:
            assert outcome.code.name in seed.expect, (
                f"{seed.name}: {outcome.code.name} {outcome.details!r}, expected {seed.expect}"
            )


# ---------------------------------------------------------------------------
# Generated requests

# Examples per method: the module runs in about 25 s on a developer's machine and within
# about a minute on a loaded two-core CI runner.
UNARY_EXAMPLES = 90
STREAMING_EXAMPLES = 40
UNAUTHENTICATED_EXAMPLES = 4
TOKEN_EXAMPLES = 120
FUZZ_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)


@pytest.mark.parametrize("method", UNARY, ids=method_id)
@settings(FUZZ_SETTINGS, max_examples=UNARY_EXAMPLES)
@given(data=st.data())
async def test_fuzz_unary(fuzzer: Fuzzer, method: MethodDescriptor, data: st.DataObject) -> None:
    payloads = data.draw(request_streams(method.input_type, VOCABULARY, False), label="request")
    await fuzzer.check(method, payloads)


@pytest.mark.parametrize("method", STREAMING, ids=method_id)
@settings(FUZZ_SETTINGS, max_examples=STREAMING_EXAMPLES)
@given(data=st.data())
async def test_fuzz_streaming(
    fuzzer: Fuzzer, method: MethodDescriptor, data: st.DataObject
) -> None:
    payloads = data.draw(
        request_streams(method.input_type, VOCABULARY, method.client_streaming), label="requests"
    )
    await fuzzer.check(method, payloads)


# ---------------------------------------------------------------------------
# Without a token


async def _enforces_auth(address: str) -> bool:
    async with authorized_channel(address, token=None) as bare:
        call = bare.unary_unary("/raptorflow.data.v1.MonitoringService/GetStatus")(
            monitoring_service_pb2.GetStatusRequest().SerializeToString(), timeout=10
        )
        try:
            await call
        except grpc.aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


async def finish(call: Any, streaming: bool) -> None:
    """Awaits a unary call, or reads a response stream to its end."""
    if streaming:
        async for _ in call:
            pass
    else:
        await call


@pytest.mark.parametrize("method", METHODS, ids=method_id)
@settings(FUZZ_SETTINGS, max_examples=UNAUTHENTICATED_EXAMPLES)
@given(data=st.data(), header=st.sampled_from([None, "", "Bearer", "Bearer x.y.z", "Basic Zm9v"]))
async def test_without_a_valid_token_every_method_is_unauthenticated(
    fuzzer: Fuzzer, method: MethodDescriptor, data: st.DataObject, header: str | None
) -> None:
    if not await _enforces_auth(fuzzer.server.address):
        pytest.skip("the server does not check tokens yet")
    payloads = data.draw(
        request_streams(method.input_type, VOCABULARY, method.client_streaming), label="requests"
    )
    metadata = () if header is None else (("authorization", header),)
    async with grpc.aio.insecure_channel(fuzzer.server.address) as bare:
        path = method_path(method)
        if method.client_streaming:
            call: Any = bare.stream_unary(path)(iter(payloads), timeout=10, metadata=metadata)
        elif method.server_streaming:
            call = bare.unary_stream(path)(payloads[0], timeout=10, metadata=metadata)
        else:
            call = bare.unary_unary(path)(payloads[0], timeout=10, metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await finish(call, method.server_streaming)
    FIGURES.record(method, len(payloads), f"{refused.value.code().name} (no valid token)")
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value.details()
    await wait_until_idle(fuzzer.server, fuzzer.db)


# ---------------------------------------------------------------------------
# Fuzzed tokens

# Any JSON a token's claims may hold, including what Python's json writes and reads but
# JSON does not have (NaN, infinities) and integers past any float.
_JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.sampled_from([10**400, -(10**400), 2**63, 2**64]),
        st.floats(),
        st.text(max_size=12),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=5,
)
_NOW = int(time.time())
# Claims a token may carry instead of good ones.
_FUZZED_CLAIMS: dict[str, st.SearchStrategy[Any]] = {
    "sub": st.one_of(st.just(""), st.just("s" * 20_000), _JSON),
    "iss": _JSON,
    "aud": st.one_of(st.just(["x", "raptorflow-data"]), _JSON),
    "exp": st.one_of(st.integers(_NOW - 10**6, _NOW + 10**6), _JSON),
    "nbf": st.one_of(st.integers(_NOW - 10**6, _NOW + 10**6), _JSON),
    "iat": _JSON,
    "role": st.one_of(st.sampled_from(["job", "memory", "root", "ADMIN"]), _JSON),
    "roles": st.one_of(st.lists(st.sampled_from(["agent", "admin", "x"]), max_size=3), _JSON),
    "workspaces": st.one_of(
        st.lists(st.one_of(st.just(WORKSPACE), st.text(max_size=40), _JSON), max_size=4),
        st.just([WORKSPACE.upper(), "*", ""]),
        _JSON,
    ),
}


@st.composite
def claims(draw: st.DrawFn) -> dict[str, Any]:
    """Good claims with up to three of them dropped or replaced by anything at all."""
    good: dict[str, Any] = {
        "sub": "fuzzed-caller",
        "iss": "raptorflow",
        "aud": "raptorflow-data",
        "exp": _NOW + 3600,
        "nbf": _NOW - 10,
        "role": draw(st.sampled_from(["agent", "memory", "admin"])),
        "workspaces": draw(st.sampled_from([[WORKSPACE], ["*"], [OTHER_WORKSPACE], []])),
    }
    for name in draw(st.lists(st.sampled_from(sorted(_FUZZED_CLAIMS)), max_size=3, unique=True)):
        if draw(st.integers(0, 3)):
            good[name] = draw(_FUZZED_CLAIMS[name])
        else:
            good.pop(name, None)
    return good


_SIGNERS = st.sampled_from(
    [
        ("HS256", TEST_JWT_SECRET),
        ("HS256", TEST_JWT_SECRET),
        ("HS256", TEST_JWT_SECRET),
        ("HS256", b"another-secret-of-at-least-32-bytes!"),
        ("HS384", TEST_JWT_SECRET),
        ("HS512", TEST_JWT_SECRET),
        ("none", None),
    ]
)
_HEADERS = st.one_of(
    st.none(),
    st.fixed_dictionaries({}, optional={"kid": _JSON, "typ": _JSON, "crit": _JSON}),
)
# What metadata may carry: printable ASCII (gRPC refuses anything else before sending).
_PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def signed(
    claims: dict[str, Any], algorithm: str, key: bytes | None, header: dict[str, Any]
) -> str:
    """A JWT signed (HMAC) as given, without PyJWT, which refuses to write most of these."""
    segments = [
        _b64(json.dumps({"alg": algorithm, "typ": "JWT", **header}).encode()),
        _b64(json.dumps(claims).encode()),
    ]
    signing_input = ".".join(segments).encode()
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
    signature = b"" if key is None else hmac.new(key, signing_input, digest[algorithm]).digest()
    return ".".join([*segments, _b64(signature)])


@st.composite
def authorization_headers(draw: st.DrawFn) -> tuple[tuple[str, str], ...]:
    """An authorization header (or two) holding a token that is anything but right."""
    shape = draw(st.sampled_from(["signed"] * 6 + ["segments", "text", "twice"]))
    if shape == "text":
        return (("authorization", draw(_PRINTABLE)),)
    if shape == "segments":
        parts = draw(st.lists(st.binary(max_size=40), min_size=1, max_size=4))
        encoded = ".".join(_b64(p) for p in parts)
        return (("authorization", "Bearer " + encoded),)
    algorithm, key = draw(_SIGNERS)
    token = signed(draw(claims()), algorithm, key, draw(_HEADERS) or {})
    scheme = draw(st.sampled_from(["Bearer", "bearer", "BEARER"]))
    header = (("authorization", f"{scheme} {token}"),)
    if shape == "twice":
        return (*header, ("authorization", f"Bearer {ADMIN_TOKEN}"))
    return header


TOKEN_TARGETS = [
    (SERVICE_METHOD, request)
    for SERVICE_METHOD, request in (
        (
            "raptorflow.data.v1.WorkspaceService.Count",
            workspace_service_pb2.CountRequest(workspace_id=WORKSPACE, table="campaigns"),
        ),
        (
            "raptorflow.data.v1.MemorySyncService.UpsertMemoryRecords",
            memory_sync_service_pb2.UpsertMemoryRecordsRequest(
                workspace_id=WORKSPACE,
                records=[
                    memory_sync_service_pb2.MemoryRecord(id="t", kind="fact", embedding=[1.0])
                ],
            ),
        ),
        (
            "raptorflow.data.v1.MemorySyncService.Sync",
            memory_sync_service_pb2.SyncRequest(workspace_id=WORKSPACE, tables=["campaigns"]),
        ),
        (
            "raptorflow.data.v1.MonitoringService.GetStatus",
            monitoring_service_pb2.GetStatusRequest(),
        ),
    )
]


@settings(FUZZ_SETTINGS, max_examples=TOKEN_EXAMPLES)
@given(target=st.sampled_from(TOKEN_TARGETS), metadata=authorization_headers())
async def test_fuzzed_tokens_get_a_defined_status(
    fuzzer: Fuzzer, target: tuple[str, Any], metadata: tuple[tuple[str, str], ...]
) -> None:
    """Tokens with claims of every JSON type and size, other keys and algorithms, several
    headers: refused UNAUTHENTICATED or PERMISSION_DENIED (or served, when the token
    happens to be good), never UNKNOWN or INTERNAL."""
    if not await _enforces_auth(fuzzer.server.address):
        pytest.skip("the server does not check tokens yet")
    name, request = target
    method = next(m for m in METHODS if m.full_name == name)
    async with grpc.aio.insecure_channel(fuzzer.server.address) as bare:
        outcome = await send(bare, method, [request.SerializeToString()], metadata)
    FIGURES.record(method, 1, f"{outcome.label} (fuzzed token)", outcome.reason)
    if outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not outcome.reason:
        # gRPC itself refuses metadata past its limit (8 KiB) before any handler runs.
        assert sum(len(value) for _, value in metadata) > 8000, outcome
    else:
        check_outcome(method, outcome)
    await wait_until_idle(fuzzer.server, fuzzer.db)


# ---------------------------------------------------------------------------
# The checks themselves


SELECT = next(m for m in METHODS if m.full_name == "raptorflow.data.v1.WorkspaceService.Select")


async def _crash(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    raise RuntimeError("a handler bug")


async def _internal(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await context.abort(grpc.StatusCode.INTERNAL, "a mapped bug")
    raise AssertionError("unreachable")


async def _bare(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no details")
    raise AssertionError("unreachable")


async def _secret(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return workspace_service_pb2.SelectResponse(columns=[SECRET]).SerializeToString()


@pytest.mark.parametrize("behavior", [_crash, _internal, _bare, _secret])
async def test_the_checks_catch_what_they_are_for(behavior: Any) -> None:
    """A server that answers UNKNOWN (an unmapped exception), INTERNAL, an error without
    the service's details, or the secret fails `check_outcome`: the fuzz tests can fail."""
    handler = grpc.method_handlers_generic_handler(
        SELECT.containing_service.full_name,
        {SELECT.name: grpc.unary_unary_rpc_method_handler(behavior)},
    )
    async with (
        serve(lambda server: server.add_generic_rpc_handlers((handler,))) as target,
        grpc.aio.insecure_channel(target) as bare,
    ):
        outcome = await send(bare, SELECT, [b""])
    with pytest.raises(AssertionError):
        check_outcome(SELECT, outcome)


# ---------------------------------------------------------------------------
# After it all


async def test_the_server_is_up_idle_and_the_bystander_untouched(
    fuzzer: Fuzzer, bystander: dict[str, list[str]]
) -> None:
    health = health_pb2_grpc.HealthStub(fuzzer.channel)
    response = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    status = fuzzer.channel.unary_unary(
        "/raptorflow.data.v1.MonitoringService/GetStatus",
        request_serializer=monitoring_service_pb2.GetStatusRequest.SerializeToString,
        response_deserializer=monitoring_service_pb2.GetStatusResponse.FromString,
    )
    seen = await status(monitoring_service_pb2.GetStatusRequest(), timeout=10)
    assert seen.database.reachable
    await wait_until_idle(fuzzer.server, fuzzer.db)
    open_jobs = await fuzzer.db.fetchval(
        "SELECT count(*) FROM raptorflow_data.jobs WHERE state IN ('QUEUED', 'RUNNING')"
        " AND id = ANY($1::uuid[])",
        fuzzer.jobs,
    )
    assert open_jobs == 0
    assert await workspace_rows(fuzzer.db, BYSTANDER) == bystander
    totals = FIGURES.totals()
    assert sum(totals.values()) > 0
    assert all(totals[code.name] == 0 for code in UNDEFINED)
    # Every method was fuzzed.
    assert set(FIGURES.calls) >= {method_id(m) for m in METHODS}
    # The malformed requests reached the server as such.
    assert totals["INVALID_ARGUMENT"] > 0
