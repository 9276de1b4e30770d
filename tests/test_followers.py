"""Many idle following sync streams on one server (issue 6): they hold no pool connection each,
a write reaches every one of them, and closing them leaves the pool idle and nothing open.

`python -m bench.followers` measures the same with 1,000 streams; this checks the behaviour
with 200, over the default per-caller stream limit (100), which the server here raises.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import asyncpg
import grpc
import pytest
from conftest import start_server
from pg_activity import service_backends
from raptorflow.data.server import cli
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.v1 import memory_sync_service_pb2, memory_sync_service_pb2_grpc
from tokens import authorized_channel

pb = memory_sync_service_pb2
Stub = memory_sync_service_pb2_grpc.MemorySyncServiceStub
Call = grpc.aio.UnaryStreamCall[pb.SyncRequest, pb.SyncResponse]
FOLLOWERS = 200
WORKSPACES = 4
TABLE = "campaigns"


@pytest.fixture(scope="module")
def captured(database_url: str) -> None:
    """Change capture on `campaigns`, installed as operators do."""
    assert cli.main(["migrate", "--database-url", database_url, "--sync-tables", TABLE]) == 0


async def eventually(check: Callable[[], object], what: str, within: float = 10.0) -> None:
    """Polls `check` until it is true; a guard against hanging, not a timing assertion."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.02)


async def read_until(call: Call, done: Callable[[pb.SyncResponse], bool]) -> list[pb.SyncResponse]:
    """The stream's messages up to and including the first one `done` accepts."""
    messages = []
    while True:
        message = await call.read()
        assert isinstance(message, pb.SyncResponse), "the stream ended"  # not grpc.aio.EOF
        messages.append(message)
        if done(message):
            return messages


def changed_names(messages: list[pb.SyncResponse]) -> list[str]:
    names: list[str] = []
    for message in messages:
        if message.event == pb.SYNC_EVENT_CHANGES:
            (column,) = [c for c in message.rows.columns if c.name == "name"]
            names.extend(column.string_values.values)
    return names


def query_pool_in_use(running: RunningServer) -> int:
    return running.database.pool_stats()["in_use"]


async def open_followers(stub: Stub, workspaces: list[str]) -> list[Call]:
    calls = [
        stub.Sync(
            pb.SyncRequest(
                workspace_id=workspaces[i % len(workspaces)], tables=[TABLE], follow=True
            )
        )
        for i in range(FOLLOWERS)
    ]
    await asyncio.wait_for(
        asyncio.gather(
            *(read_until(c, lambda m: m.event == pb.SYNC_EVENT_SNAPSHOT_DONE) for c in calls)
        ),
        30.0,
    )
    return calls


async def test_idle_followers_hold_a_handful_of_connections_and_closing_frees_everything(
    db: asyncpg.Connection, settings: Settings, captured: None
) -> None:
    # One token (one caller) for every stream: the per-caller limit must let 200 through.
    running = await start_server(
        settings, max_streams_per_caller=FOLLOWERS, sync_checkpoint_seconds=60.0
    )
    workspaces = [str(uuid.uuid4()) for _ in range(WORKSPACES)]
    streams = running.sync_streams
    try:
        await eventually(lambda: query_pool_in_use(running) == 0, "an idle pool at start")
        baseline = await service_backends(db)
        async with authorized_channel(running.address) as channel:
            stub = Stub(channel)
            for wave in range(2):  # the second wave: closing gave back every stream slot
                calls = await open_followers(stub, workspaces)
                # Once their first epochs are read, idle followers hold no connection.
                await eventually(
                    lambda: query_pool_in_use(running) == 0, "an idle pool under 200 followers"
                )
                assert streams.stats()["open_streams"] == FOLLOWERS
                assert streams.stats()["waiting_streams"] == FOLLOWERS
                assert running.database.pool_stats()["size"] <= settings.pool_max_size
                backends = await service_backends(db)
                opened = set(backends) - set(baseline)
                assert len(opened) <= settings.pool_max_size, (
                    f"{FOLLOWERS} idle followers opened {len(opened)} more backends"
                )

                # One transaction writes a row into every workspace: each follower gets
                # its own workspace's row, and only that one.
                async with db.transaction():
                    for n, workspace in enumerate(workspaces):
                        await db.execute(
                            f"INSERT INTO {TABLE} (workspace_id, name) VALUES ($1, $2)",
                            uuid.UUID(workspace),
                            f"wave {wave} row {n}",
                        )
                received = await asyncio.wait_for(
                    asyncio.gather(
                        *(read_until(c, lambda m: m.event == pb.SYNC_EVENT_CHANGES) for c in calls)
                    ),
                    30.0,
                )
                for i, messages in enumerate(received):
                    assert changed_names(messages) == [f"wave {wave} row {i % WORKSPACES}"]
                await eventually(
                    lambda: query_pool_in_use(running) == 0, "an idle pool after the write"
                )
                assert streams.stats()["open_streams"] == FOLLOWERS

                for call in calls:
                    call.cancel()
                await eventually(
                    lambda: streams.stats()["open_streams"] == 0, "every stream closed"
                )
                assert streams.stats()["waiting_streams"] == 0
                await eventually(
                    lambda: query_pool_in_use(running) == 0, "an idle pool after closing"
                )
                snapshot = running.database.pool_snapshot()
                assert snapshot is not None
                assert snapshot.waiting == 0
                after = await service_backends(db)
                assert len(set(after) - set(baseline)) <= settings.pool_max_size
                busy = [r for r in after.values() if r["state"] != "idle"]
                # The only backend that may be busy is one answering a health check.
                assert len(busy) <= 1, busy
    finally:
        await running.stop(grace=0)
