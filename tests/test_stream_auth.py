"""Authorization over the life of a stream: a token that expires while a stream is open,
and the limit of concurrent streams per caller.

The module's server allows no clock skew (jwt_leeway_seconds=0), so a token's
`exp` is exactly when its streams end, and at most two streams per caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import grpc
import pytest
from conftest import start_server
from job_helpers import analyze, create_lock_table, locked, next_job, watch_to_end
from raptorflow.data.server import cli
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.v1 import (
    job_pb2,
    maintenance_service_pb2,
    maintenance_service_pb2_grpc,
    memory_sync_service_pb2,
    memory_sync_service_pb2_grpc,
)
from statuses import error_reason, rpc_error
from tokens import ADMIN_TOKEN, bearer, mint

pb = memory_sync_service_pb2
mnt = maintenance_service_pb2
SyncStub = memory_sync_service_pb2_grpc.MemorySyncServiceStub
MaintenanceStub = maintenance_service_pb2_grpc.MaintenanceServiceStub
SyncCall = grpc.aio.UnaryStreamCall[pb.SyncRequest, pb.SyncResponse]
TABLES = ("campaigns", "campaign_events")
LOCKED = "stream_auth_locked"
MAX_STREAMS = 2
EXPIRES_IN = 2.0
"""Seconds until the expiring tokens expire."""
LATE = 5.0
"""How long after expiry a stream may still end (a generous bound: the CI machine is slow)."""


@pytest.fixture(scope="module")
def captured(database_url: str) -> None:
    """Change capture on the sync tables, as `migrate --sync-tables` installs it (idempotent)."""
    assert (
        cli.main(["migrate", "--database-url", database_url, "--sync-tables", ",".join(TABLES)])
        == 0
    )


@pytest.fixture(scope="module")
async def server(settings: Settings, captured: None) -> AsyncIterator[RunningServer]:
    running = await start_server(
        settings, jwt_leeway_seconds=0.0, max_streams_per_caller=MAX_STREAMS
    )
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


@pytest.fixture(scope="module")
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    """A channel without a token of its own: each call brings its own."""
    async with grpc.aio.insecure_channel(server.address) as plain:
        yield plain


@pytest.fixture(scope="module")
def sync(channel: grpc.aio.Channel) -> SyncStub:
    return SyncStub(channel)


@pytest.fixture(scope="module")
def maintenance(channel: grpc.aio.Channel) -> MaintenanceStub:
    return MaintenanceStub(channel)


def follow(workspace: str, resume_token: str = "") -> pb.SyncRequest:
    return pb.SyncRequest(
        workspace_id=workspace, tables=["campaigns"], follow=True, resume_token=resume_token
    )


def names(message: pb.SyncResponse) -> list[str]:
    """The `name` of every row a CHANGES message carries."""
    assert message.event == pb.SYNC_EVENT_CHANGES
    (column,) = [c for c in message.rows.columns if c.name == "name"]
    which = column.WhichOneof("values")
    assert which is not None
    values: list[str] = list(getattr(column, which).values)
    return values


class Follower:
    """What a consumer of one sync stream (and its resumption) has seen."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sequences: set[int] = set()
        self.resume_token = ""
        self.snapshot_done = False

    def apply(self, message: pb.SyncResponse) -> None:
        assert message.resume_token
        self.resume_token = message.resume_token
        if message.event == pb.SYNC_EVENT_SNAPSHOT_DONE:
            self.snapshot_done = True
        elif message.event == pb.SYNC_EVENT_CHANGES:
            repeated = self.sequences.intersection(message.sequences)
            assert not repeated, f"changes delivered twice: {sorted(repeated)}"
            self.sequences.update(message.sequences)
            self.names.extend(names(message))

    async def read_until(self, call: SyncCall, done: Callable[[], bool], within: float) -> None:
        async with asyncio.timeout(within):
            while not done():
                message = await call.read()
                assert message is not grpc.aio.EOF, "the stream ended"
                assert isinstance(message, pb.SyncResponse)
                self.apply(message)

    async def read_to_the_end(self, call: SyncCall) -> None:
        """Until the stream fails (raises its AioRpcError); it must not end cleanly."""
        await self.read_until(call, lambda: False, within=EXPIRES_IN + LATE + 5.0)


class Writer:
    """Inserts a campaign row every few milliseconds, in its own transactions, until stopped."""

    def __init__(self, db: asyncpg.Connection, workspace: str) -> None:
        self.db = db
        self.workspace = uuid.UUID(workspace)
        self.written: list[str] = []
        self._stop = asyncio.Event()
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            name = f"w{len(self.written):04d}"
            await self.db.execute(
                "INSERT INTO campaigns (workspace_id, name) VALUES ($1, $2)", self.workspace, name
            )
            self.written.append(name)
            self._progress.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.05)

    async def wrote(self, count: int) -> None:
        """Returns once `count` rows are written."""
        async with asyncio.timeout(10.0):
            while len(self.written) < count:
                self._progress.clear()
                await self._progress.wait()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


# ---------------------------------------------------------------------------
# Expiry


async def test_a_sync_follower_ends_when_its_token_expires_and_resumes_without_loss(
    sync: SyncStub, db: asyncpg.Connection
) -> None:
    workspace = str(uuid.uuid4())
    expires = time.time() + EXPIRES_IN
    token = mint("memory", [workspace], subject="sync-expiring", exp=expires)
    follower = Follower()
    call = sync.Sync(follow(workspace), metadata=bearer(token))
    await follower.read_until(call, lambda: follower.snapshot_done, within=10.0)

    # Rows keep coming before, across and after the moment the token expires.
    writer = Writer(db, workspace)
    writer.start()
    try:
        failure = await rpc_error(follower.read_to_the_end(call))
        ended = time.time()
        assert (failure.code, failure.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED")
        assert ended >= expires - 0.05, "the stream ended before its token expired"
        assert ended < expires + LATE, "the stream outlived its token"
        assert follower.names, "no change arrived while the token was valid"
        # Written while no stream is open.
        await writer.wrote(len(writer.written) + 3)
    finally:
        await writer.stop()

    # The old token is refused outright now; a fresh one resumes where the stream was.
    stale = sync.Sync(follow(workspace, follower.resume_token), metadata=bearer(token))
    failure = await rpc_error(stale.read())
    assert (failure.code, failure.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED")
    fresh = mint("memory", [workspace], subject="sync-expiring")
    resumed = sync.Sync(follow(workspace, follower.resume_token), metadata=bearer(fresh))
    try:
        await follower.read_until(
            resumed, lambda: len(follower.names) >= len(writer.written), within=10.0
        )
    finally:
        resumed.cancel()
    assert follower.names == writer.written


@pytest.fixture(scope="module")
async def lock_table(server: RunningServer, db: asyncpg.Connection) -> AsyncIterator[str]:
    """A table of this module's own that a test locks, so a job on it keeps running."""
    await create_lock_table(db, LOCKED)
    await server.catalog.reload()
    try:
        yield LOCKED
    finally:
        await db.execute(f'DROP TABLE IF EXISTS "{LOCKED}"')
        await server.catalog.reload()


async def test_a_job_watch_ends_when_its_token_expires(
    maintenance: MaintenanceStub, db: asyncpg.Connection, lock_table: str
) -> None:
    admin = bearer(ADMIN_TOKEN)
    async with locked(db, lock_table):
        started = await maintenance.StartJob(
            mnt.StartJobRequest(spec=analyze(lock_table)), metadata=admin, timeout=10.0
        )
        job_id = started.job.job_id
        try:
            expires = time.time() + EXPIRES_IN
            token = mint("job", [], subject="watch-expiring", exp=expires)
            watch = maintenance.WatchJob(mnt.WatchJobRequest(job_id=job_id), metadata=bearer(token))
            first = await next_job(watch)
            assert first.job_id == job_id

            async def rest() -> None:
                async with asyncio.timeout(EXPIRES_IN + LATE + 5.0):
                    while (response := await watch.read()) is not grpc.aio.EOF:
                        assert isinstance(response, mnt.WatchJobResponse)
                        assert response.job.state not in (
                            job_pb2.JOB_STATE_SUCCEEDED,
                            job_pb2.JOB_STATE_FAILED,
                            job_pb2.JOB_STATE_CANCELLED,
                        )

            failure = await rpc_error(rest())
            ended = time.time()
            assert (failure.code, failure.reason) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "TOKEN_EXPIRED",
            )
            assert expires - 0.05 <= ended < expires + LATE
        finally:
            await maintenance.CancelJob(
                mnt.CancelJobRequest(job_id=job_id), metadata=admin, timeout=10.0
            )
    # Let the job end before the module drops its table.
    await watch_to_end(_AdminWatch(maintenance), job_id)


class _AdminWatch:
    """`watch_to_end` takes a stub; this one adds the admin token to WatchJob."""

    def __init__(self, stub: MaintenanceStub) -> None:
        self._stub = stub

    def WatchJob(self, request: mnt.WatchJobRequest, **kwargs: Any) -> Any:
        return self._stub.WatchJob(request, metadata=bearer(ADMIN_TOKEN), **kwargs)


async def test_a_request_stream_is_refused_once_its_token_expires(
    channel: grpc.aio.Channel, db: asyncpg.Connection
) -> None:
    """Each message of a request stream is checked: one sent after expiry ends the call,
    and what came before it stays written."""
    workspace = str(uuid.uuid4())
    expires = time.time() + EXPIRES_IN
    token = mint("memory", [workspace], subject="upsert-expiring", exp=expires)
    finished = asyncio.Event()

    def batch(record_id: str) -> pb.UpsertMemoryRecordsRequest:
        record = pb.MemoryRecord(id=record_id, kind="fact", embedding=[1.0, 2.0])
        return pb.UpsertMemoryRecordsRequest(workspace_id=workspace, records=[record])

    async def batches() -> AsyncIterator[pb.UpsertMemoryRecordsRequest]:
        yield batch("before")
        # Waiting for a moment on the clock, not for something to happen.
        await asyncio.sleep(max(0.0, expires - time.time()) + 0.1)
        yield batch("after")
        # Never half-close first: the status must arrive while the stream is still open.
        await finished.wait()

    stub = SyncStub(channel)
    try:
        failure = await rpc_error(
            stub.UpsertMemoryRecords(batches(), metadata=bearer(token), timeout=EXPIRES_IN + 10.0)
        )
    finally:
        finished.set()
    assert (failure.code, failure.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED")
    ids = await db.fetch(
        "SELECT id FROM raptorflow_data.memory_records WHERE workspace_id = $1 ORDER BY id",
        uuid.UUID(workspace),
    )
    assert [r["id"] for r in ids] == ["before"]


# ---------------------------------------------------------------------------
# Streams per caller


def too_many(error: grpc.aio.AioRpcError) -> bool:
    return (
        error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and error_reason(error) == "TOO_MANY_STREAMS"
    )


async def opened(open_call: Callable[[], SyncCall], within: float = 5.0) -> SyncCall:
    """A stream that the server admitted (its first message read); opened again while it
    is refused for too many streams, until a closed one's slot is given back."""
    deadline = time.monotonic() + within
    while True:
        call = open_call()
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as error:
            if too_many(error) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                continue
            raise
        assert isinstance(first, pb.SyncResponse)
        return call


async def assert_too_many(call: Any) -> None:
    """The stream call is refused with RESOURCE_EXHAUSTED, reason TOO_MANY_STREAMS."""

    async def first() -> None:
        await call.read()

    failure = await rpc_error(first())
    assert (failure.code, failure.reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TOO_MANY_STREAMS",
    ), failure.message


async def test_streams_per_caller_are_limited_and_given_back(
    sync: SyncStub, maintenance: MaintenanceStub
) -> None:
    workspace = str(uuid.uuid4())
    limited = bearer(mint(["memory", "job"], [workspace], subject="limited-caller"))
    another = bearer(mint("memory", [workspace], subject="another-caller"))
    open_calls: list[SyncCall] = []

    def follower(metadata: Any = limited) -> SyncCall:
        call = sync.Sync(follow(workspace), metadata=metadata, timeout=30.0)
        open_calls.append(call)
        return call

    try:
        a = await opened(follower)
        await opened(follower)  # b, open to the end
        # The limit is per caller, over every streaming method.
        await assert_too_many(follower())
        export = maintenance.ExportBackup(
            mnt.ExportBackupRequest(scope=job_pb2.BackupScope(workspace_id=workspace)),
            metadata=limited,
        )
        await assert_too_many(export)
        # Another caller is not affected.
        other = await opened(lambda: follower(another))
        other.cancel()

        # A stream the client cancels gives its slot back.
        a.cancel()
        c = await opened(follower)
        await assert_too_many(follower())

        # So does a stream that ends, well or with an error.
        c.cancel()
        ended = await opened(
            lambda: sync.Sync(
                pb.SyncRequest(workspace_id=workspace, tables=["campaigns"]), metadata=limited
            )
        )
        while await ended.read() is not grpc.aio.EOF:
            pass
        for _ in range(3):
            failed = sync.Sync(
                pb.SyncRequest(workspace_id=workspace, tables=["no_such_table"]), metadata=limited
            )
            failure = await rpc_error(failed.read())
            assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
        await opened(follower)  # d
        # b and d: exactly at the limit again, so no slot leaked or was given back twice.
        await assert_too_many(follower())
    finally:
        for call in open_calls:
            call.cancel()


async def test_refused_streams_take_no_slot(sync: SyncStub) -> None:
    workspace, elsewhere = str(uuid.uuid4()), str(uuid.uuid4())
    token = bearer(mint("memory", [workspace], subject="refused-caller"))
    for _ in range(MAX_STREAMS + 2):
        failure = await rpc_error(sync.Sync(follow(elsewhere), metadata=token).read())
        assert failure.reason == "WORKSPACE_NOT_GRANTED"
    calls = [
        await opened(lambda: sync.Sync(follow(workspace), metadata=token))
        for _ in range(MAX_STREAMS)
    ]
    for call in calls:
        call.cancel()
