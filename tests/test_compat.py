"""The old integration layer's names (`raptorflow.data.client.compat`), end to end.

Every name runs against the real server and PostgreSQL, configured the way
old code is: through the environment. The health rules (what makes a status
degraded or unhealthy) are checked against a scripted MonitoringService, and
the singletons across event loops, since grpc.aio channels are bound to one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from conftest import start_server
from fake_grpc import serve
from raptorflow.data import client as rf
from raptorflow.data.client import compat
from raptorflow.data.server import cli
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.v1 import job_pb2, monitoring_service_pb2, monitoring_service_pb2_grpc
from tokens import ADMIN_TOKEN

NOTES = "compat_notes"
EVENTS = "compat_events"  # exposed, without change capture
PAIRS = "compat_pairs"  # a primary key of several text columns
ROWS = 300
POOL_MAX = 6

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {NOTES} (
    id bigserial PRIMARY KEY,
    workspace_id uuid NOT NULL,
    title text NOT NULL,
    amount numeric(10, 2),
    created_at timestamptz NOT NULL DEFAULT now(),
    payload bytea,
    meta jsonb,
    tags text[]
);
CREATE TABLE IF NOT EXISTS {EVENTS} (
    id bigserial PRIMARY KEY,
    workspace_id uuid NOT NULL,
    kind text NOT NULL
);
CREATE TABLE IF NOT EXISTS {PAIRS} (
    workspace_id uuid NOT NULL,
    first_part text NOT NULL,
    second_part text NOT NULL,
    note text,
    PRIMARY KEY (workspace_id, first_part, second_part)
);
"""


@pytest.fixture(scope="module")
def captured(database_url: str) -> None:
    async def create() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(SCHEMA)
        finally:
            await conn.close()

    asyncio.run(create())
    sync_tables = f"{NOTES},{PAIRS}"
    assert cli.main(["migrate", "--database-url", database_url, "--sync-tables", sync_tables]) == 0


@pytest.fixture(scope="module")
def backup_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compat-backups")


@pytest.fixture(scope="module")
async def compat_server(
    settings: Settings, captured: None, backup_dir: Path
) -> AsyncIterator[RunningServer]:
    # Its own pool size, so that holding all but one connection is over the 80 % target
    # while the server's own checks still find a free one; slow queries out of the way.
    running = await start_server(
        settings,
        backup_dir=str(backup_dir),
        pool_max_size=POOL_MAX,
        slow_query_seconds=60.0,
    )
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


@pytest.fixture
def env(compat_server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The old code's configuration: the environment names the server."""
    monkeypatch.setenv(compat.TARGET_ENV, compat_server.address)
    monkeypatch.setenv(compat.TOKEN_ENV, ADMIN_TOKEN)
    monkeypatch.delenv(compat.WORKSPACE_ENV, raising=False)
    compat.configure(None)
    yield compat_server.address
    compat.configure(None)


async def _fill(db: asyncpg.Connection, workspace: str, rows: int = ROWS) -> None:
    await db.execute(
        f"""
        INSERT INTO {NOTES} (workspace_id, title, amount, payload, meta, tags)
        SELECT $1::uuid, 'note ' || i, i * 0.25, decode(lpad(to_hex(i), 4, '0'), 'hex'),
               jsonb_build_object('i', i), ARRAY['a', NULL]
        FROM generate_series(1, $2) AS i
        """,
        uuid.UUID(workspace),
        rows,
    )
    await db.execute(
        f"INSERT INTO {EVENTS} (workspace_id, kind) VALUES ($1, 'created')", uuid.UUID(workspace)
    )


# --------------------------------------------------------------------------
# Configuration and event loops


def test_configuration_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(compat.TARGET_ENV, raising=False)
    monkeypatch.delenv(compat.TIMEOUT_ENV, raising=False)
    monkeypatch.delenv(compat.TOKEN_ENV, raising=False)
    compat.configure(None)
    assert compat.client_config() == rf.ClientConfig(compat.DEFAULT_TARGET)
    monkeypatch.setenv(compat.TARGET_ENV, "data.internal:7000")
    monkeypatch.setenv(compat.TIMEOUT_ENV, "2.5")
    monkeypatch.setenv(compat.TOKEN_ENV, "a.jwt.token")
    assert compat.client_config() == rf.ClientConfig(
        "data.internal:7000", timeout=2.5, token="a.jwt.token"
    )
    monkeypatch.setenv(compat.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=compat.TIMEOUT_ENV):
        compat.client_config()
    # "inf" (or 1e10) used to pass, and then every call failed at once with
    # DEADLINE_EXCEEDED: gRPC cannot send such a deadline.
    for refused in ("inf", "Infinity", "nan", "1e10", "1e300", "0", "-5"):
        monkeypatch.setenv(compat.TIMEOUT_ENV, refused)
        with pytest.raises(ValueError, match=f"{compat.TIMEOUT_ENV}='{refused}' .*100 years"):
            compat.client_config()
    monkeypatch.setenv(compat.TIMEOUT_ENV, str(rf.MAX_TIMEOUT_SECONDS))
    assert compat.client_config().timeout == rf.MAX_TIMEOUT_SECONDS
    compat.configure("elsewhere:1")
    try:
        assert compat.client_config().target == "elsewhere:1"
    finally:
        compat.configure(None)


async def test_singletons_work_across_event_loops(env: str) -> None:
    # Each asyncio.run is a new loop, as each test module (or script run) has:
    # nothing loop-bound may survive in the module's singletons. The new loops
    # run in threads, since this loop has to keep serving the in-process server.
    first = await asyncio.to_thread(asyncio.run, compat.check_database_health())
    second = await compat.get_database_monitor().get_current_status()
    third = await asyncio.to_thread(asyncio.run, compat.get_database_service().health_check())
    fourth = await compat.check_database_health()
    assert first["status"] == fourth["status"] == "healthy"
    assert second["overall_status"] == third["status"] == "healthy"
    assert compat.get_database_service() is compat.get_database_service()
    assert compat.get_database_integration() is compat.get_database_integration()
    assert compat.get_database_monitor() is compat.get_database_monitor()


# --------------------------------------------------------------------------
# Health and status against the real server


async def test_check_database_health_and_the_status_dicts(env: str) -> None:
    health = await compat.check_database_health()
    assert health["status"] == "healthy"
    status = await compat.get_database_integration().get_system_status()
    assert health["details"]["database"] == status["database"]
    assert status["status"] == status["overall_health"] == "healthy"
    assert status["database"]["reachable"] is True
    assert status["database"]["server_version"]
    assert status["pool"]["max_size"] == POOL_MAX
    assert status["components"]["connection_pool"]["total"] == status["pool"]["size"]
    current = await compat.get_database_monitor().get_current_status()
    assert current["overall_status"] == "healthy"
    assert set(current["checks"]) == {
        "database",
        "connection_pool",
        "query_performance",
        "held_connections",
        "schedules",
    }
    assert current["alerts"] == []
    for document in (health, status, current):
        json.dumps(document)  # JSON-ready, timestamps included


async def _status_when(predicate: Any) -> dict[str, Any]:
    status: dict[str, Any] = {}
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:
        status = await compat.get_database_integration().get_system_status()
        if predicate(status):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"the status never got there: {status['pool']}")


async def test_get_system_status_reflects_the_pool(
    env: str, db: asyncpg.Connection, workspace: str
) -> None:
    await _fill(db, workspace, 3)
    held = POOL_MAX - 1
    tasks: list[asyncio.Task[Any]] = []
    async with compat.DatabaseConnection(workspace) as connection:
        async with db.transaction():
            # Every select now waits for the lock, holding its pool connection.
            await db.execute(f"LOCK TABLE {NOTES} IN ACCESS EXCLUSIVE MODE")
            tasks = [
                asyncio.create_task(connection.table(NOTES).select("*").execute())
                for _ in range(held)
            ]
            busy = await _status_when(lambda s: s["pool"]["in_use"] >= held)
        done = await asyncio.gather(*tasks)
    assert [len(result.data) for result in done] == [3] * held
    assert busy["status"] == "degraded"
    assert busy["pool"]["utilization"] > busy["pool"]["utilization_target"] == 0.8
    assert any("utilization" in alert["message"] for alert in busy["alerts"])
    calm = await _status_when(lambda s: s["pool"]["in_use"] == 0)
    assert calm["status"] == "healthy"
    assert calm["pool"]["peak_utilization"] >= held / POOL_MAX


# --------------------------------------------------------------------------
# DatabaseConnection


async def test_database_connection_reads_its_workspace_only(
    env: str,
    db: asyncpg.Connection,
    workspace: str,
    other_workspace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await _fill(db, workspace, 5)
    await _fill(db, other_workspace, 7)
    async with compat.DatabaseConnection(workspace) as connection:
        result = await connection.table(NOTES).select("*").execute()
        odd = await connection.from_(NOTES).select("title").eq("title", "note 3").execute()
    assert len(result.data) == 5
    assert {row["workspace_id"] for row in result.data} == {uuid.UUID(workspace)}
    assert odd.data == [{"title": "note 3"}]
    monkeypatch.setenv(compat.WORKSPACE_ENV, other_workspace)
    async with compat.DatabaseConnection() as connection:
        assert connection.workspace_id == other_workspace
        result = await connection.table(NOTES).select("*").execute()
    assert len(result.data) == 7


def test_database_connection_needs_a_workspace_and_its_block(env: str) -> None:
    with pytest.raises(ValueError, match=compat.WORKSPACE_ENV):
        compat.DatabaseConnection()
    with pytest.raises(ValueError, match="not a UUID"):
        compat.DatabaseConnection("workspace-1")
    with pytest.raises(RuntimeError, match="async with"):
        compat.DatabaseConnection(str(uuid.uuid4())).table(NOTES)


# --------------------------------------------------------------------------
# sync_database_to_memory


class _RecordingController:
    """A memory controller in the old shape: async store_memory(key, value) -> bool."""

    def __init__(self) -> None:
        self.stored: dict[str, dict[str, Any]] = {}

    async def store_memory(
        self, key: str, value: Any, ttl: int = 3600, memory_type: str = "working"
    ) -> bool:
        json.dumps(value)  # what the old controller does with it
        self.stored[key] = value
        return True


class _PickyController:
    """A synchronous controller that refuses odd ids, as False (the old failure signal)."""

    def __init__(self) -> None:
        self.calls = 0

    def store_memory(self, key: str, value: dict[str, Any], /) -> bool:
        self.calls += 1
        return int(value["key"]) % 2 == 0


async def test_sync_database_to_memory_delivers_every_row(
    env: str, db: asyncpg.Connection, workspace: str, other_workspace: str
) -> None:
    await _fill(db, workspace)
    await _fill(db, other_workspace, 10)
    controller = _RecordingController()
    summary = await compat.sync_database_to_memory(workspace, controller)
    rows = await db.fetch(
        f"SELECT * FROM {NOTES} WHERE workspace_id = $1 ORDER BY id", uuid.UUID(workspace)
    )
    assert len(rows) == ROWS
    assert set(controller.stored) == {f"{workspace}:{NOTES}:{row['id']}" for row in rows}
    stored = controller.stored[f"{workspace}:{NOTES}:{rows[9]['id']}"]
    assert stored["workspace_id"] == workspace
    assert (stored["table"], stored["key"]) == (NOTES, str(rows[9]["id"]))
    assert stored["row"]["title"] == "note 10"
    assert stored["row"]["amount"] == "2.50"
    assert stored["row"]["meta"] == {"i": 10}
    assert stored["row"]["tags"] == ["a", None]
    assert stored["row"]["payload"] == "AAo="  # base64 of 0x000a
    assert stored["row"]["created_at"] == rows[9]["created_at"].isoformat()
    assert summary["status"] == "success"
    assert summary["tables"][NOTES] == {"status": "synced", "rows": ROWS, "failed": 0}
    # Left out, not failed: it has no change capture.
    assert summary["tables"][EVENTS] == {"status": "skipped", "reason": "SYNC_NOT_INSTALLED"}
    assert summary["rows_synced"] == ROWS
    assert NOTES in summary["sync_tables"]
    json.dumps(summary)
    # The token continues with the changes after the snapshot.
    await db.execute(
        f"INSERT INTO {NOTES} (workspace_id, title) VALUES ($1, 'later')", uuid.UUID(workspace)
    )
    async with rf.DataClient(rf.ClientConfig(env, token=ADMIN_TOKEN)) as client:
        later = [
            row["title"]
            async for batch in client.memory.sync(
                workspace,
                tables=summary["sync_tables"],
                resume_token=summary["resume_token"],
                follow=False,
            )
            if batch.event is rf.SyncEvent.CHANGES
            for row in batch.rows
        ]
    assert later == ["later"]


async def test_sync_database_to_memory_keys_of_several_columns_never_collide(
    env: str, db: asyncpg.Connection, workspace: str
) -> None:
    # Values joined by "," gave ("a,b", "c") and ("a", "b,c") one key, so the second
    # row overwrote the first in the memory store.
    for first, second in (("a,b", "c"), ("a", "b,c")):
        await db.execute(
            f"INSERT INTO {PAIRS} (workspace_id, first_part, second_part, note)"
            " VALUES ($1, $2, $3, $4)",
            uuid.UUID(workspace),
            first,
            second,
            f"{first}|{second}",
        )
    controller = _RecordingController()
    summary = await compat.sync_database_to_memory(workspace, controller, tables=[PAIRS])
    assert summary["tables"] == {PAIRS: {"status": "synced", "rows": 2, "failed": 0}}
    # A JSON array of the key's values, in key order.
    keys = {
        json.dumps([workspace, "a,b", "c"], separators=(",", ":")): "a,b|c",
        json.dumps([workspace, "a", "b,c"], separators=(",", ":")): "a|b,c",
    }
    assert set(controller.stored) == {f"{workspace}:{PAIRS}:{key}" for key in keys}
    for key, note in keys.items():
        stored = controller.stored[f"{workspace}:{PAIRS}:{key}"]
        assert (stored["key"], stored["row"]["note"]) == (key, note)
        assert json.loads(stored["key"])[1:] == note.split("|")


async def test_sync_database_to_memory_of_named_tables(
    env: str, db: asyncpg.Connection, workspace: str
) -> None:
    await _fill(db, workspace, 20)
    picky = _PickyController()
    summary = await compat.sync_database_to_memory(workspace, picky, tables=[NOTES], batch_size=7)
    assert picky.calls == 20
    assert summary["status"] == "partial"
    assert summary["tables"] == {NOTES: {"status": "synced", "rows": 20, "failed": 10}}
    assert (summary["rows_synced"], summary["rows_failed"]) == (10, 10)
    # A named table that cannot sync is an error, not a silent skip.
    with pytest.raises(rf.FailedPrecondition) as caught:
        await compat.sync_database_to_memory(workspace, picky, tables=[NOTES, EVENTS])
    assert caught.value.reason == "SYNC_NOT_INSTALLED"
    with pytest.raises(TypeError):
        await compat.sync_database_to_memory(workspace, picky, tables=NOTES)


# --------------------------------------------------------------------------
# backup_database and the database service


async def test_backup_database_produces_a_backup(
    env: str, db: asyncpg.Connection, workspace: str, backup_dir: Path
) -> None:
    await _fill(db, workspace, 40)
    result = await compat.backup_database(timeout=60)
    assert result["status"] == "success"
    file = backup_dir / result["path"]
    assert result["path"].startswith("raptorflow-")
    assert file.stat().st_size == result["bytes"]
    assert hashlib.sha256(file.read_bytes()).hexdigest() == result["sha256"]
    assert result["tables"][NOTES] == await db.fetchval(f"SELECT count(*) FROM {NOTES}")
    assert result["row_count"] == sum(result["tables"].values())
    assert result["backup_id"] == result["job_id"]
    json.dumps(result)
    # One workspace, named: it restores into that workspace.
    scoped = await compat.backup_database(
        workspace_id=workspace, tables=[NOTES], path=f"ws-{workspace}.rfbackup"
    )
    assert scoped["tables"] == {NOTES: 40}
    before = await db.fetch(f"SELECT * FROM {NOTES} WHERE workspace_id = $1", uuid.UUID(workspace))
    await db.execute(f"DELETE FROM {NOTES} WHERE workspace_id = $1", uuid.UUID(workspace))
    async with rf.DataClient(rf.ClientConfig(env, token=ADMIN_TOKEN)) as client:
        await client.maintenance.restore_from_path(backup_dir / scoped["path"])
    after = await db.fetch(f"SELECT * FROM {NOTES} WHERE workspace_id = $1", uuid.UUID(workspace))
    assert sorted(after) == sorted(before)


async def test_backup_database_without_a_backup_dir(server: RunningServer) -> None:
    with pytest.raises(rf.FailedPrecondition) as caught:
        await compat.backup_database(config=rf.ClientConfig(server.address, token=ADMIN_TOKEN))
    assert caught.value.reason == "BACKUP_DIR_NOT_SET"


async def test_database_service_as_the_old_jobs_call_it(env: str) -> None:
    service = await compat.get_database_service()  # the old jobs await it
    assert service is compat.get_database_service()
    health = await service.health_check()
    assert health["status"] == "healthy"
    statistics = await service.get_database_statistics()
    assert statistics["overall_health"] == "healthy"
    assert statistics["connection_pool"]["max_size"] == POOL_MAX
    tables = await service.get_table_list()
    assert {NOTES, EVENTS} <= set(tables)
    assert await service.get_index_list() == tables
    optimized = await service.optimize_table(NOTES)
    assert (optimized["status"], optimized["optimization_type"]) == ("success", "vacuum_analyze")
    assert optimized["tables"][0]["action"] == "VACUUM (ANALYZE)"
    analyzed = await service.update_table_statistics(EVENTS)
    assert [t["table"] for t in analyzed["tables"]] == [EVENTS]
    rebuilt = await service.rebuild_index(NOTES)
    assert rebuilt["status"] == "success"
    vacuumed = await service.vacuum_database()
    assert {NOTES, EVENTS} <= {t["table"] for t in vacuumed["tables"]}
    backup = await service.create_backup()
    assert backup["status"] == "success"
    with pytest.raises(rf.InvalidArgument):
        await service.optimize_table("no_such_table")
    integration = compat.get_database_integration()
    assert (await integration.initialize())["status"] == "success"
    await integration.shutdown()
    monitor = compat.get_database_monitor()
    await monitor.start_monitoring()
    await monitor.stop_monitoring()


# --------------------------------------------------------------------------
# Health rules, against a scripted MonitoringService


def _healthy() -> monitoring_service_pb2.GetStatusResponse:
    return monitoring_service_pb2.GetStatusResponse(
        replica="r1",
        pool=monitoring_service_pb2.PoolStatus(
            size=2, in_use=1, idle=1, max_size=10, utilization=0.1, utilization_target=0.8
        ),
        database=monitoring_service_pb2.DatabaseStatus(reachable=True, server_version="16.4"),
    )


def _with(change: Any) -> monitoring_service_pb2.GetStatusResponse:
    status = _healthy()
    change(status)
    return status


class _ScriptedMonitoring(monitoring_service_pb2_grpc.MonitoringServiceServicer):
    def __init__(self) -> None:
        self.status = _healthy()

    async def GetStatus(self, request: Any, context: Any) -> Any:
        return self.status


@pytest.fixture(scope="module")
async def scripted() -> AsyncIterator[tuple[_ScriptedMonitoring, str]]:
    service = _ScriptedMonitoring()
    async with serve(
        lambda server: monitoring_service_pb2_grpc.add_MonitoringServiceServicer_to_server(
            service, server
        )
    ) as target:
        yield service, target


def _down(status: monitoring_service_pb2.GetStatusResponse) -> None:
    status.database.reachable = False


def _over_target(status: monitoring_service_pb2.GetStatusResponse) -> None:
    status.pool.in_use, status.pool.utilization = 9, 0.9


def _waiting(status: monitoring_service_pb2.GetStatusResponse) -> None:
    status.pool.waiting = 2


def _leak(status: monitoring_service_pb2.GetStatusResponse) -> None:
    status.held_connections.add(holder="/raptorflow.data.v1.WorkspaceService/Select")


def _slow(status: monitoring_service_pb2.GetStatusResponse) -> None:
    for _ in range(6):
        status.slow_queries.add(statement="SELECT $1", duration_ms=700.0)


def _failing_schedule(status: monitoring_service_pb2.GetStatusResponse) -> None:
    status.schedules.add(
        name="nightly",
        run_count=10,
        success_count=9,
        success_rate=0.9,
        last_job=job_pb2.Job(state=job_pb2.JOB_STATE_RUNNING),
        last_finished_job=job_pb2.Job(state=job_pb2.JOB_STATE_FAILED),
    )


HEALTH_CASES = {
    "healthy": (_healthy(), "healthy", None),
    "database-down": (_with(_down), "unhealthy", "database"),
    "pool-over-target": (_with(_over_target), "degraded", "connection_pool"),
    "calls-waiting": (_with(_waiting), "degraded", "connection_pool"),
    "leak": (_with(_leak), "degraded", "held_connections"),
    "slow-queries": (_with(_slow), "degraded", "query_performance"),
    "schedule-failing": (_with(_failing_schedule), "degraded", "schedules"),
}


@pytest.mark.parametrize("name", list(HEALTH_CASES))
async def test_health_rules(
    scripted: tuple[_ScriptedMonitoring, str], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    service, target = scripted
    status, word, check = HEALTH_CASES[name]
    service.status = status
    monkeypatch.setenv(compat.TARGET_ENV, target)
    system = await compat.get_database_integration().get_system_status()
    current = await compat.get_database_monitor().get_current_status()
    health = await compat.check_database_health()
    assert system["status"] == health["status"] == word
    assert (
        current["overall_status"]
        == {
            "healthy": "healthy",
            "degraded": "warning",
            "unhealthy": "critical",
        }[word]
    )
    assert [alert["check"] for alert in current["alerts"]] == ([check] if check else [])
    if name == "schedule-failing":
        nightly = current["checks"]["schedules"]["schedules"]["nightly"]
        assert (nightly["last_state"], nightly["last_result"]) == ("RUNNING", "FAILED")
    json.dumps(system)


@pytest.fixture
def refused_address() -> Iterator[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


async def test_health_calls_never_raise_for_an_unreachable_service(
    refused_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(compat.TARGET_ENV, refused_address)
    monkeypatch.setenv(compat.TIMEOUT_ENV, "0.3")
    health = await compat.check_database_health()
    assert health["status"] == "unhealthy"
    assert "UNAVAILABLE" in health["reason"] or "DEADLINE_EXCEEDED" in health["reason"]
    current = await compat.get_database_monitor().get_current_status()
    assert current["overall_status"] == "critical"
    assert list(current["checks"]) == ["service"]
    system = await compat.get_database_integration().get_system_status()
    assert (system["status"], system["initialized"]) == ("unhealthy", False)
    assert (await compat.get_database_service().health_check())["status"] == "critical"
    assert (await compat.get_database_integration().initialize())["status"] == "failed"
    monkeypatch.setenv(compat.TIMEOUT_ENV, "never")
    assert (await compat.check_database_health())["status"] == "unhealthy"
    monkeypatch.setenv(compat.TIMEOUT_ENV, "inf")
    health = await compat.check_database_health()
    assert health["status"] == "unhealthy"
    assert compat.TIMEOUT_ENV in health["reason"]
    # Calls that move data do raise.
    monkeypatch.setenv(compat.TIMEOUT_ENV, "0.3")
    with pytest.raises((rf.Unavailable, rf.DeadlineExceeded)):
        await compat.backup_database()


@pytest.mark.parametrize("missing", ["no/such/ca.pem", "."])
async def test_health_calls_never_raise_for_an_unreadable_tls_file(
    refused_address: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, missing: str
) -> None:
    # A CA file not mounted yet (or a directory in its place): tls_credentials raises
    # OSError, which used to escape the health calls documented as "Never raises".
    path = tmp_path / missing
    monkeypatch.setenv(compat.TARGET_ENV, refused_address)
    monkeypatch.setenv(compat.TLS_CA_FILE_ENV, str(path))
    compat.configure(None)
    health = await compat.check_database_health()
    assert health["status"] == "unhealthy"
    assert str(path) in health["reason"]
    current = await compat.get_database_monitor().get_current_status()
    assert current["overall_status"] == "critical"
    assert str(path) in current["error"]
    system = await compat.get_database_integration().get_system_status()
    assert (system["status"], system["initialized"]) == ("unhealthy", False)
    assert (await compat.get_database_service().health_check())["status"] == "critical"
    statistics = await compat.get_database_service().get_database_statistics()
    assert statistics["overall_health"] == "unhealthy"
    assert (await compat.get_database_integration().initialize())["status"] == "failed"
    # Calls that move data do raise, with the file's error.
    with pytest.raises(OSError, match=re.escape(str(path))):
        await compat.backup_database()


async def test_a_closed_database_connection_keeps_no_client(env: str) -> None:
    async with compat.DatabaseConnection(str(uuid.uuid4())) as connection:
        assert connection.client.channel.get_state() is not grpc.ChannelConnectivity.SHUTDOWN
        with pytest.raises(RuntimeError, match="already open"):
            await connection.__aenter__()
    with pytest.raises(RuntimeError):
        connection.client  # noqa: B018
