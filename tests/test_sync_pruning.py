"""Pruning of the change log: retention, acknowledged consumers, expiry, and the
RESNAPSHOT_REQUIRED answer to a token whose changes are gone. Each test runs a
server of its own with short settings and prunes on demand (`prune_once`)."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import grpc
import pytest
from conftest import start_server
from raptorflow.data.server import cli
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.server.sync.pruning import prune_once
from raptorflow.data.v1 import memory_sync_service_pb2
from statuses import rpc_error
from test_sync import TABLES, Replica, Stub, insert_campaigns, read_all, request
from tokens import authorized_channel

pb = memory_sync_service_pb2
ENTRIES = "SELECT count(*) FROM raptorflow_data.change_log WHERE workspace_id = $1"


@pytest.fixture(scope="module")
def captured(database_url: str) -> None:
    code = cli.main(["migrate", "--database-url", database_url, "--sync-tables", ",".join(TABLES)])
    assert code == 0


async def acknowledge(stub: Stub, workspace: str, consumer: str, token: str) -> None:
    await stub.AcknowledgeSync(
        pb.AcknowledgeSyncRequest(workspace_id=workspace, consumer_id=consumer, resume_token=token)
    )


async def must_resnapshot(stub: Stub, workspace: str, token: str) -> None:
    failure = await rpc_error(read_all(stub, request(workspace, token=token)))
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "RESNAPSHOT_REQUIRED"


async def test_a_token_older_than_the_retained_log_must_resnapshot(
    db: asyncpg.Connection, settings: Settings, captured: None, workspace: str
) -> None:
    running = await start_server(settings, sync_retention_seconds=0.3, sync_prune_seconds=3600.0)
    try:
        async with authorized_channel(running.address) as channel:
            stub = Stub(channel)
            old = await read_all(stub, request(workspace))
            await insert_campaigns(db, workspace, "pruned away")
            await asyncio.sleep(0.4)
            assert await prune_once(running.database, running.settings) >= 1
            assert await db.fetchval(ENTRIES, workspace) == 0
            await must_resnapshot(stub, workspace, old.token)
            # Starting again without a token works, and shows the row.
            fresh = await read_all(stub, request(workspace))
            assert list(fresh.names().values()) == ["pruned away"]
    finally:
        await running.stop(grace=0)


async def test_live_consumers_hold_back_pruning_until_they_expire(
    db: asyncpg.Connection, settings: Settings, captured: None, workspace: str
) -> None:
    expiry = 1.5
    running: RunningServer = await start_server(
        settings, sync_consumer_expiry_seconds=expiry, sync_prune_seconds=3600.0
    )
    try:
        async with authorized_channel(running.address) as channel:
            stub = Stub(channel)
            a = await read_all(stub, request(workspace, consumer_id="a"))
            b = await read_all(stub, request(workspace, consumer_id="b"))
            await acknowledge(stub, workspace, "a", a.token)
            await acknowledge(stub, workspace, "b", b.token)
            b_acknowledged = time.monotonic()
            await insert_campaigns(db, workspace, "c1")
            a = await read_all(stub, request(workspace, token=a.token), a)
            await acknowledge(stub, workspace, "a", a.token)

            # b has not applied c1: its entry stays, and b's token still resumes.
            await prune_once(running.database, running.settings)
            assert await db.fetchval(ENTRIES, workspace) == 1
            assert [c.row["name"] for c in (await read_all_from(stub, workspace, b)).changes] == [
                "c1"
            ]

            # b goes silent; a keeps acknowledging. Once b expired, a alone counts.
            async with asyncio.timeout(10.0):
                while True:
                    await acknowledge(stub, workspace, "a", a.token)
                    if time.monotonic() - b_acknowledged > expiry:
                        await prune_once(running.database, running.settings)
                        if await db.fetchval(ENTRIES, workspace) == 0:
                            break
                        # Another transaction of the cluster held a's snapshot back:
                        # move a on to a newer position and try again.
                        a = await read_all(stub, request(workspace, token=a.token), a)
                    await asyncio.sleep(0.3)
            await must_resnapshot(stub, workspace, b.token)
            assert (await read_all_from(stub, workspace, a)).rows == a.rows
    finally:
        await running.stop(grace=0)


async def read_all_from(stub: Stub, workspace: str, start: Replica) -> Replica:
    """A copy of `start`, resumed without a consumer id (which would count as alive)."""
    replica = Replica()
    for message in start.messages:
        replica.apply(message)
    before = len(replica.changes)
    resumed = await read_all(stub, request(workspace, token=start.token), replica)
    resumed.changes = resumed.changes[before:]
    return resumed


@pytest.mark.parametrize(
    ("consumer", "token", "field"),
    [("", "t", "consumer_id"), ("c" * 129, "t", "consumer_id"), ("c", "", "resume_token")],
)
async def test_bad_acknowledgements_are_invalid_argument(
    channel: grpc.aio.Channel, captured: None, consumer: str, token: str, field: str
) -> None:
    failure = await rpc_error(acknowledge(Stub(channel), str(uuid.uuid4()), consumer, token))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.fields == [field]
