"""The row-level security net below the service (db/row_security.py).

Superusers and table owners bypass row-level security, so every check that the
net holds runs through the service's own application connections (the query
pool, role raptorflow_app) and first proves that they are neither. The owner
path is proved with an owner that is not a superuser, in a database of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Sequence

import asyncpg
import grpc
import pytest
from conftest import start_server, with_database
from job_helpers import wait_for_job
from messages import eq, row, v
from raptorflow.data.server.app import RunningServer, run_migrations
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db import row_security
from raptorflow.data.server.db.connections import (
    WORKSPACE_SETTING,
    Database,
    Deadline,
    begin_script,
)
from raptorflow.data.server.sync import capture
from raptorflow.data.v1 import (
    job_pb2,
    maintenance_service_pb2,
    maintenance_service_pb2_grpc,
    memory_sync_service_pb2,
    memory_sync_service_pb2_grpc,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)
from tokens import authorized_channel

pb = workspace_service_pb2
mpb = maintenance_service_pb2
spb = memory_sync_service_pb2
NO_DEADLINE = Deadline(None)
FINAL = {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}

NOTES = "rls_notes"
TEXT_NOTES = "rls_text_notes"
SCHEMA = f"""
CREATE TABLE {NOTES} (
    id bigserial PRIMARY KEY,
    workspace_id uuid NOT NULL,
    body text NOT NULL
);
-- A text workspace column: the policy casts the setting to the column's own type.
CREATE TABLE {TEXT_NOTES} (
    id bigserial PRIMARY KEY,
    workspace_id text NOT NULL,
    body text NOT NULL
);
"""
PROTECTED = ("campaigns", NOTES, TEXT_NOTES)


@pytest.fixture(scope="module")
async def tables(database_url: str) -> AsyncIterator[None]:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(SCHEMA)
        yield
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {NOTES}, {TEXT_NOTES}")
        await conn.close()


@pytest.fixture(scope="module")
async def server(settings: Settings, tables: None) -> AsyncIterator[RunningServer]:
    """This module's server (row_security on, the default), started after its tables exist.

    Its catalog reloads only when a test asks: a timed reload would put the net back
    while a test runs a server with it off on the same database.
    """
    assert settings.row_security
    running = await start_server(settings, catalog_refresh_seconds=3600.0)
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


@pytest.fixture(scope="module")
def memory(channel: grpc.aio.Channel) -> memory_sync_service_pb2_grpc.MemorySyncServiceStub:
    return memory_sync_service_pb2_grpc.MemorySyncServiceStub(channel)


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two workspaces with rows of their own in every protected table."""

    a: uuid.UUID
    b: uuid.UUID


async def seed(db: asyncpg.Connection, workspace: uuid.UUID, count: int) -> None:
    for i in range(count):
        await db.execute(
            f"INSERT INTO {NOTES} (workspace_id, body) VALUES ($1, $2)", workspace, f"note {i}"
        )
        await db.execute(
            f"INSERT INTO {TEXT_NOTES} (workspace_id, body) VALUES ($1, $2)",
            str(workspace),
            f"note {i}",
        )
        await db.execute(
            "INSERT INTO raptorflow_data.memory_records (workspace_id, id, kind, embedding)"
            " VALUES ($1, $2, 'note', '{1,0}')",
            workspace,
            f"record {i}",
        )


@pytest.fixture
async def pair(db: asyncpg.Connection) -> Pair:
    """Workspace a with 2 rows in each table, b with 3 (written by the superuser)."""
    found = Pair(uuid.uuid4(), uuid.uuid4())
    await seed(db, found.a, 2)
    await seed(db, found.b, 3)
    return found


async def workspaces_of(conn: asyncpg.Connection | object, table: str) -> list[str]:
    """The workspace of every row a deliberately unscoped statement returns."""
    rows = await conn.fetch(f"SELECT workspace_id::text FROM {table}")  # type: ignore[attr-defined]
    return sorted(r[0] for r in rows)


# -- the net is there, and the connections it binds are bound by it --------------------


async def test_query_connections_are_neither_superuser_nor_owner_nor_bypassrls(
    server: RunningServer,
) -> None:
    async with server.database.connection(NO_DEADLINE) as conn:
        role = await conn.fetchrow(
            "SELECT current_user AS name, rolsuper, rolbypassrls FROM pg_roles"
            " WHERE rolname = current_user"
        )
        owners = await conn.fetch(
            "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class"
            " WHERE oid = ANY($1::regclass[])",
            [*PROTECTED, "raptorflow_data.memory_records"],
        )
    assert role is not None
    assert role["name"] == server.settings.app_role
    assert not role["rolsuper"]
    assert not role["rolbypassrls"]
    assert role["name"] not in {r[0] for r in owners}


async def test_every_protected_table_has_the_policies_and_forced_rls(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    rows = await db.fetch(
        "SELECT c.oid::regclass::text AS name, c.relrowsecurity, c.relforcerowsecurity,"
        " ARRAY(SELECT polname::text FROM pg_policy WHERE polrelid = c.oid ORDER BY 1) AS pols"
        " FROM pg_class AS c WHERE c.oid = ANY($1::regclass[])",
        [*PROTECTED, "raptorflow_data.memory_records"],
    )
    assert len(rows) == 4
    for found in rows:
        assert found["relrowsecurity"], found["name"]
        assert found["relforcerowsecurity"], found["name"]
        assert found["pols"] == sorted(
            [row_security.ALL_WORKSPACES_POLICY, row_security.WORKSPACE_POLICY]
        ), found["name"]


async def test_queries_that_no_policy_binds_are_reported_at_start(
    settings: Settings, tables: None, caplog: pytest.LogCaptureFixture
) -> None:
    # No app role with a superuser URL: queries run as the superuser, past every policy.
    running = await start_server(settings, app_role="")
    try:
        assert "row security is on, but queries run as" in caplog.text
    finally:
        await running.stop(grace=1.0)


async def test_foreign_keys_that_cross_workspaces_are_reported_at_start(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # The test schema's campaign_events.campaign_id references campaigns (id) alone.
    running = await start_server(settings)
    try:
        key = "campaign_events_campaign_id_fkey of campaign_events references public.campaigns"

        def warnings() -> list[str]:
            # Other modules' tables in the session database may have such keys too.
            return [r.getMessage() for r in caplog.records if key in r.getMessage()]

        assert len(warnings()) == 1
        assert "without workspace_id" in warnings()[0]
        # Once per key and process, not at every catalog reload.
        await running.catalog.reload()
        assert len(warnings()) == 1
    finally:
        await running.stop(grace=1.0)


# -- (1) an unscoped statement through the application connection ------------------------


@pytest.mark.parametrize("table", [NOTES, TEXT_NOTES, "raptorflow_data.memory_records"])
async def test_an_unscoped_statement_sees_its_workspace_only(
    server: RunningServer, pair: Pair, table: str
) -> None:
    async with server.database.workspace_connection(NO_DEADLINE, pair.a) as conn:
        assert await workspaces_of(conn, table) == [str(pair.a)] * 2
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 2
    async with server.database.workspace_connection(NO_DEADLINE, pair.b) as conn:
        assert await workspaces_of(conn, table) == [str(pair.b)] * 3


@pytest.mark.parametrize("table", [NOTES, TEXT_NOTES, "raptorflow_data.memory_records"])
async def test_without_a_workspace_a_statement_sees_nothing(
    server: RunningServer, pair: Pair, table: str
) -> None:
    async with server.database.connection(NO_DEADLINE) as conn:
        assert await workspaces_of(conn, table) == []
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0


async def test_the_workspace_does_not_outlive_its_transaction(
    server: RunningServer, pair: Pair
) -> None:
    # One physical connection: scoped, then not.
    async with server.database.query_pool.acquire() as conn:
        await conn.execute(begin_script(pair.a, readonly=True))
        assert await workspaces_of(conn, NOTES) == [str(pair.a)] * 2
        await conn.execute("COMMIT")
        assert await conn.fetchval("SELECT current_setting($1, true)", WORKSPACE_SETTING) == ""
        assert await workspaces_of(conn, NOTES) == []
        # A failed transaction leaves nothing behind either.
        await conn.execute(begin_script(pair.b))
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.execute("SELECT 1 / 0")
        await conn.execute("ROLLBACK")
        assert await workspaces_of(conn, NOTES) == []


async def test_writes_into_another_workspace_are_refused_or_reach_nothing(
    server: RunningServer, db: asyncpg.Connection, pair: Pair
) -> None:
    before = await db.fetch(f"SELECT * FROM {NOTES} WHERE workspace_id = $1 ORDER BY id", pair.b)
    database = server.database
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with database.workspace_connection(NO_DEADLINE, pair.a) as conn:
            await conn.execute(
                f"INSERT INTO {NOTES} (workspace_id, body) VALUES ($1, 'planted')", pair.b
            )
    async with database.workspace_connection(NO_DEADLINE, pair.a) as conn:
        assert (
            await conn.execute(
                f"UPDATE {NOTES} SET body = 'hijacked' WHERE workspace_id = $1", pair.b
            )
            == "UPDATE 0"
        )
        assert (
            await conn.execute(f"DELETE FROM {NOTES} WHERE workspace_id = $1", pair.b) == "DELETE 0"
        )
        # Unscoped ones change this workspace's rows only.
        assert await conn.execute(f"UPDATE {NOTES} SET body = body || '!'") == "UPDATE 2"
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with database.workspace_connection(NO_DEADLINE, pair.a) as conn:
            await conn.execute(f"UPDATE {NOTES} SET workspace_id = $1", pair.b)
    # Nor without a workspace at all.
    async with database.connection(NO_DEADLINE) as conn:
        assert await conn.execute(f"DELETE FROM {NOTES}") == "DELETE 0"
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                f"INSERT INTO {NOTES} (workspace_id, body) VALUES ($1, 'planted')", pair.b
            )
    assert (
        await db.fetch(f"SELECT * FROM {NOTES} WHERE workspace_id = $1 ORDER BY id", pair.b)
        == before
    )
    assert await db.fetchval(f"SELECT count(*) FROM {NOTES} WHERE body = 'planted'") == 0
    assert (
        await db.fetchval(
            f"SELECT count(*) FROM {NOTES} WHERE workspace_id = $1 AND body LIKE '%!'", pair.a
        )
        == 2
    )


async def test_a_failed_block_rolls_back_whole_and_leaves_no_transaction_open(
    server: RunningServer, db: asyncpg.Connection, pair: Pair
) -> None:
    async def insert_then_fail() -> None:
        async with server.database.workspace_connection(NO_DEADLINE, pair.a) as conn:
            await conn.execute(f"INSERT INTO {NOTES} (workspace_id, body) VALUES ($1, 'x')", pair.a)
            for _ in range(2):
                await conn.execute(
                    f"INSERT INTO {NOTES} (id, workspace_id, body) VALUES (-1, $1, 'y')", pair.a
                )

    with pytest.raises(asyncpg.UniqueViolationError):
        await insert_then_fail()
    assert await db.fetchval(f"SELECT count(*) FROM {NOTES} WHERE workspace_id = $1", pair.a) == 2
    async with asyncio.timeout(5.0):
        while True:
            await db.execute("SELECT pg_stat_clear_snapshot()")
            open_transactions = await db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'raptorflow-data' AND state LIKE 'idle in transaction%'"
            )
            if not open_transactions and not server.database.pool_stats()["in_use"]:
                break
            await asyncio.sleep(0.02)


# -- (2) the service end to end under the net ---------------------------------------------


async def test_workspace_rpcs_see_and_change_their_workspace_only(
    stub: workspace_service_pb2_grpc.WorkspaceServiceStub, db: asyncpg.Connection, pair: Pair
) -> None:
    a, b = str(pair.a), str(pair.b)
    selected = await stub.Select(pb.SelectRequest(workspace_id=a, table=NOTES))
    assert len(selected.rows) == 2
    assert (await stub.Count(pb.CountRequest(workspace_id=b, table=TEXT_NOTES))).count == 3
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=a, table=NOTES, columns=["body"], rows=[row("one"), row("two")]
        )
    )
    assert inserted.affected_count == 2
    updated = await stub.Update(
        pb.UpdateRequest(
            workspace_id=a, table=NOTES, values={"body": v("same")}, allow_unfiltered=True
        )
    )
    assert updated.affected_count == 4
    batch = await stub.ExecuteBatch(
        pb.ExecuteBatchRequest(
            workspace_id=a,
            operations=[
                pb.BatchOperation(
                    insert=pb.InsertRequest(table=TEXT_NOTES, columns=["body"], rows=[row("t")])
                ),
                pb.BatchOperation(delete=pb.DeleteRequest(table=NOTES, filter=eq("body", "same"))),
            ],
        )
    )
    assert batch.results[1].delete.affected_count == 4
    assert await db.fetchval(f"SELECT count(*) FROM {NOTES} WHERE workspace_id = $1", pair.a) == 0
    assert await db.fetchval(f"SELECT count(*) FROM {NOTES} WHERE workspace_id = $1", pair.b) == 3
    assert await db.fetchval(f"SELECT count(*) FROM {TEXT_NOTES} WHERE workspace_id = $1", a) == 3


async def test_memory_records_under_the_net(
    memory: memory_sync_service_pb2_grpc.MemorySyncServiceStub, db: asyncpg.Connection, pair: Pair
) -> None:
    a, b = str(pair.a), str(pair.b)
    record = spb.MemoryRecord(id="record 0", kind="note", embedding=[0.0, 1.0])
    upserted = await memory.UpsertMemoryRecords(
        iter([spb.UpsertMemoryRecordsRequest(workspace_id=a, records=[record])])
    )
    assert (upserted.inserted_count, upserted.updated_count) == (0, 1)
    found = await memory.SearchMemoryRecords(
        spb.SearchMemoryRecordsRequest(workspace_id=b, embedding=[0.0, 1.0], top_k=10)
    )
    assert sorted(r.record.id for r in found.results) == ["record 0", "record 1", "record 2"]
    assert all(list(r.record.embedding) == [1.0, 0.0] for r in found.results)
    deleted = await memory.DeleteMemoryRecords(
        spb.DeleteMemoryRecordsRequest(workspace_id=a, ids=["record 0", "record 1", "record 2"])
    )
    assert deleted.deleted_count == 2
    assert (
        await db.fetchval(
            "SELECT count(*) FROM raptorflow_data.memory_records WHERE workspace_id = $1", pair.b
        )
        == 3
    )


async def test_a_sync_snapshot_and_its_changes_under_the_net(
    server: RunningServer,
    memory: memory_sync_service_pb2_grpc.MemorySyncServiceStub,
    db: asyncpg.Connection,
    pair: Pair,
) -> None:
    await capture.install(server.database, server.settings, NOTES)
    request = spb.SyncRequest(workspace_id=str(pair.a), tables=[NOTES])
    messages = [m async for m in memory.Sync(request, timeout=20)]
    snapshot = [m for m in messages if m.event == spb.SYNC_EVENT_SNAPSHOT_ROWS]
    assert sum(m.rows.row_count for m in snapshot) == 2
    await db.execute(f"INSERT INTO {NOTES} (workspace_id, body) VALUES ($1, 'later')", pair.a)
    await db.execute(f"INSERT INTO {NOTES} (workspace_id, body) VALUES ($1, 'other')", pair.b)
    resumed = spb.SyncRequest(
        workspace_id=str(pair.a), tables=[NOTES], resume_token=messages[-1].resume_token
    )
    changes = [m async for m in memory.Sync(resumed, timeout=20)]
    assert [len(m.operations) for m in changes if m.event == spb.SYNC_EVENT_CHANGES] == [1]


# -- provisioning ------------------------------------------------------------------------


def test_the_begin_script_renders_a_uuid_and_nothing_else() -> None:
    workspace = uuid.UUID("6f1c2d3e-4a5b-4c6d-8e7f-8091a2b3c4d5")
    assert begin_script(workspace, isolation="repeatable_read", readonly=True, prelude="SET x") == (
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; "
        f"SET LOCAL {WORKSPACE_SETTING} = '6f1c2d3e-4a5b-4c6d-8e7f-8091a2b3c4d5'; SET x"
    )
    assert begin_script(None) == "BEGIN"
    with pytest.raises(TypeError):
        begin_script("6f1c2d3e-4a5b-4c6d-8e7f-8091a2b3c4d5'; DROP TABLE x; --")  # type: ignore[arg-type]


async def test_provisioning_changes_nothing_twice_and_repairs_drift(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    table = row_security.ProtectedTable.of(server.catalog.current.table(NOTES))
    async with server.database.owner_pool.acquire() as conn:
        assert await row_security.provision(conn, [table], enabled=True) == []
    # Someone disables the net by hand, leaves a stale policy of ours and adds one of theirs.
    await db.execute(f"ALTER TABLE {NOTES} NO FORCE ROW LEVEL SECURITY")
    await db.execute(f"DROP POLICY {row_security.WORKSPACE_POLICY} ON {NOTES}")
    await db.execute(f"CREATE POLICY raptorflow_stale ON {NOTES} USING (true)")
    await db.execute(f"CREATE POLICY theirs ON {NOTES} AS RESTRICTIVE USING (true)")
    try:
        await server.catalog.reload()
        pols = await db.fetchval(
            "SELECT array_agg(polname::text ORDER BY polname) FROM pg_policy"
            " WHERE polrelid = $1::regclass",
            NOTES,
        )
        assert pols == sorted(
            [row_security.ALL_WORKSPACES_POLICY, row_security.WORKSPACE_POLICY, "theirs"]
        )
        assert await db.fetchval(
            "SELECT relforcerowsecurity FROM pg_class WHERE oid = $1::regclass", NOTES
        )
    finally:
        await db.execute(f"DROP POLICY IF EXISTS theirs ON {NOTES}")


# -- (3) maintenance by an owner that is not a superuser ---------------------------------


def as_user(url: str, user: str, database: str) -> str:
    parts = urllib.parse.urlsplit(with_database(url, database))
    host = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}@{host}"))


@dataclasses.dataclass
class Owned:
    """A database owned by a non-superuser role, its server, and direct connections."""

    running: RunningServer
    channel: grpc.aio.Channel
    superuser: asyncpg.Connection
    owner_url: str
    a: uuid.UUID
    b: uuid.UUID

    @property
    def maintenance(self) -> maintenance_service_pb2_grpc.MaintenanceServiceStub:
        return maintenance_service_pb2_grpc.MaintenanceServiceStub(self.channel)

    @property
    def workspaces(self) -> workspace_service_pb2_grpc.WorkspaceServiceStub:
        return workspace_service_pb2_grpc.WorkspaceServiceStub(self.channel)


OWNED_ITEMS = "items"
OWNED_SCHEMA = f"""
CREATE TABLE {OWNED_ITEMS} (
    id bigserial PRIMARY KEY,
    workspace_id uuid NOT NULL,
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""


@pytest.fixture(scope="module")
async def owned(settings: Settings, database_url: str) -> AsyncIterator[Owned]:
    suffix = uuid.uuid4().hex[:10]
    owner, app, name = f"rf_owner_{suffix}", f"rf_app_{suffix}", f"rf_owned_{suffix}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f"CREATE ROLE {owner} LOGIN NOSUPERUSER NOBYPASSRLS")
    await admin.execute(f"CREATE ROLE {app} LOGIN NOSUPERUSER NOBYPASSRLS")
    await admin.execute(f"CREATE DATABASE {name} OWNER {owner}")
    owner_url = as_user(database_url, owner, name)
    running: RunningServer | None = None
    try:
        conn = await asyncpg.connect(owner_url)
        try:
            await conn.execute(OWNED_SCHEMA)
        finally:
            await conn.close()
        rules = [{"table": OWNED_ITEMS, "column": "created_at", "max_age_seconds": 86400}]
        owned_settings = dataclasses.replace(
            settings,
            database_url=as_user(database_url, app, name),
            owner_database_url=owner_url,
            retention_rules=json.dumps(rules),
        )
        # Two URLs: the operator migrates, then grants the app role (query_role is empty).
        migrating = Database(owned_settings)
        try:
            await migrating.open_owner()
            await run_migrations(owned_settings, migrating)
        finally:
            await migrating.close()
        conn = await asyncpg.connect(owner_url)
        try:
            await conn.execute(
                f"GRANT USAGE ON SCHEMA raptorflow_data TO {app};"
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON {OWNED_ITEMS},"
                f" raptorflow_data.memory_records, raptorflow_data.sync_consumers TO {app};"
                f"GRANT SELECT ON raptorflow_data.change_log, raptorflow_data.change_log_pruned"
                f" TO {app};"
                f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {app};"
            )
        finally:
            await conn.close()
        running = await start_server(owned_settings)
        superuser = await asyncpg.connect(with_database(database_url, name))
        a, b = uuid.uuid4(), uuid.uuid4()
        for workspace, count in ((a, 4), (b, 6)):
            await superuser.execute(
                f"INSERT INTO {OWNED_ITEMS} (workspace_id, name, created_at)"
                " SELECT $1, 'item ' || g, now() - g * interval '12 hours'"
                " FROM generate_series(1, $2) g",
                workspace,
                count,
            )
        async with authorized_channel(running.address) as channel:
            yield Owned(running, channel, superuser, owner_url, a, b)
        await superuser.close()
    finally:
        if running is not None:
            await running.stop(grace=1.0)
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"DROP ROLE IF EXISTS {app}")
        await admin.execute(f"DROP ROLE IF EXISTS {owner}")
        await admin.close()


async def test_forced_rls_binds_the_owner_outside_its_maintenance_connections(
    owned: Owned,
) -> None:
    conn = await asyncpg.connect(owned.owner_url)
    try:
        assert not await conn.fetchval(
            "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user"
        )
        assert await conn.fetchval(
            f"SELECT relowner::regrole::text = current_user FROM pg_class"
            f" WHERE oid = '{OWNED_ITEMS}'::regclass"
        )
        # The owner's own session, without the all-workspaces flag: nothing.
        assert await conn.fetchval(f"SELECT count(*) FROM {OWNED_ITEMS}") == 0
        await conn.execute(f"SET {row_security.ALL_WORKSPACES_SETTING} = 'on'")
        assert await conn.fetchval(f"SELECT count(*) FROM {OWNED_ITEMS}") == 10
    finally:
        await conn.close()
    # The owner pool carries the flag; the query pool is bound to one workspace at a time.
    async with owned.running.database.owner_pool.acquire() as conn:
        assert await conn.fetchval(f"SELECT count(*) FROM {OWNED_ITEMS}") == 10
    async with owned.running.database.workspace_connection(NO_DEADLINE, owned.a) as conn:
        assert await conn.fetchval(f"SELECT count(*) FROM {OWNED_ITEMS}") == 4
    response = await owned.workspaces.Count(
        pb.CountRequest(workspace_id=str(owned.b), table=OWNED_ITEMS)
    )
    assert response.count == 6


async def export_rows(owned: Owned, workspace: str) -> dict[str, int]:
    request = mpb.ExportBackupRequest(
        scope=job_pb2.BackupScope(workspace_id=workspace, tables=[OWNED_ITEMS])
    )
    messages = [m async for m in owned.maintenance.ExportBackup(request, timeout=30)]
    manifest = messages[-1].manifest
    return {t.table: t.row_count for t in manifest.tables}


async def test_backups_of_an_owner_that_is_not_a_superuser(owned: Owned) -> None:
    assert await export_rows(owned, str(owned.a)) == {OWNED_ITEMS: 4}
    assert await export_rows(owned, "") == {OWNED_ITEMS: 10}


async def test_restore_by_an_owner_that_is_not_a_superuser(owned: Owned) -> None:
    request = mpb.ExportBackupRequest(
        scope=job_pb2.BackupScope(workspace_id=str(owned.a), tables=[OWNED_ITEMS])
    )
    messages = [m async for m in owned.maintenance.ExportBackup(request, timeout=30)]
    restore: list[mpb.RestoreBackupRequest] = []
    for message in messages:
        part = message.WhichOneof("part")
        assert part is not None
        restore.append(mpb.RestoreBackupRequest(**{part: getattr(message, part)}))
    restore[0].replace_existing = True
    response = await owned.maintenance.RestoreBackup(iter(restore), timeout=30)
    assert [t.row_count for t in response.tables] == [4]


async def run_job(owned: Owned, spec: job_pb2.JobSpec) -> job_pb2.Job:
    started = await owned.maintenance.StartJob(mpb.StartJobRequest(spec=spec), timeout=10)
    return await wait_for_job(owned.maintenance, started.job.job_id, FINAL, within=30)


async def test_vacuum_analyze_and_retention_of_an_owner_that_is_not_a_superuser(
    owned: Owned,
) -> None:
    vacuumed = await run_job(
        owned, job_pb2.JobSpec(vacuum=job_pb2.VacuumJob(tables=[OWNED_ITEMS], analyze=True))
    )
    assert vacuumed.state == job_pb2.JOB_STATE_SUCCEEDED, vacuumed
    analyzed = await run_job(
        owned, job_pb2.JobSpec(analyze=job_pb2.AnalyzeJob(tables=[OWNED_ITEMS]))
    )
    assert analyzed.state == job_pb2.JOB_STATE_SUCCEEDED, analyzed
    cleaned = await run_job(
        owned,
        job_pb2.JobSpec(retention_cleanup=job_pb2.RetentionCleanupJob(tables=[OWNED_ITEMS])),
    )
    assert cleaned.state == job_pb2.JOB_STATE_SUCCEEDED, cleaned
    # Rows were 12 h, 24 h, 36 h ... old: only the 12 h one of each workspace is under a day.
    left = await owned.superuser.fetch(
        f"SELECT workspace_id, count(*) FROM {OWNED_ITEMS} GROUP BY 1 ORDER BY 1"
    )
    assert dict(tuple(r) for r in left) == {owned.a: 1, owned.b: 1}


async def test_change_capture_of_an_owner_that_is_not_a_superuser(owned: Owned) -> None:
    await capture.install(owned.running.database, owned.running.settings, OWNED_ITEMS)
    rows = await owned.superuser.fetchval(f"SELECT count(*) FROM {OWNED_ITEMS}")
    before = await owned.superuser.fetchval(
        "SELECT count(*) FROM raptorflow_data.change_log WHERE operation = 'D'"
    )
    # A TRUNCATE from the owner's own session (no all-workspaces flag): the capture still
    # logs a delete of every row, of every workspace (migration 0005).
    conn = await asyncpg.connect(owned.owner_url)
    try:
        await conn.execute(f"TRUNCATE {OWNED_ITEMS}")
    finally:
        await conn.close()
    after = await owned.superuser.fetchval(
        "SELECT count(*) FROM raptorflow_data.change_log WHERE operation = 'D'"
    )
    assert rows > 0
    assert after - before == rows


async def test_a_table_the_owner_connection_does_not_own_is_refused_by_name(
    owned: Owned,
) -> None:
    await owned.superuser.execute(
        "CREATE TABLE not_owned (id bigint PRIMARY KEY, workspace_id uuid NOT NULL)"
    )
    try:
        with pytest.raises(RuntimeError, match=re.escape('cannot change "public"."not_owned"')):
            await owned.running.catalog.reload()
        assert "not_owned" not in owned.running.catalog.current.tables
    finally:
        await owned.superuser.execute("DROP TABLE not_owned")
    await owned.running.catalog.reload()


# -- (4) turning the net off --------------------------------------------------------------


async def protected_state(db: asyncpg.Connection, names: Sequence[str]) -> list[tuple[object, ...]]:
    rows = await db.fetch(
        "SELECT c.relrowsecurity, c.relforcerowsecurity,"
        " (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid"
        "  AND p.polname LIKE 'raptorflow\\_%') AS ours"
        " FROM pg_class AS c WHERE c.oid = ANY($1::regclass[]) ORDER BY c.oid",
        list(names),
    )
    return [tuple(r) for r in rows]


async def test_turning_row_security_off_removes_the_net_and_on_brings_it_back(
    server: RunningServer, settings: Settings, db: asyncpg.Connection, pair: Pair
) -> None:
    names = [*PROTECTED, "raptorflow_data.memory_records"]
    assert await protected_state(db, names) == [(True, True, 2)] * len(names)
    off = await start_server(settings, row_security=False)
    try:
        assert await protected_state(db, names) == [(False, False, 0)] * len(names)
        # The off server's connections run unscoped, as before the net, and see every row.
        async with off.database.workspace_connection(NO_DEADLINE, pair.a) as conn:
            assert not conn.is_in_transaction()
            assert (
                await conn.fetchval(
                    f"SELECT count(*) FROM {NOTES} WHERE workspace_id = ANY($1::uuid[])",
                    [pair.a, pair.b],
                )
                == 5
            )
        async with authorized_channel(off.address) as channel:
            stub = workspace_service_pb2_grpc.WorkspaceServiceStub(channel)
            response = await stub.Count(pb.CountRequest(workspace_id=str(pair.b), table=NOTES))
            assert response.count == 3
            batch = await stub.ExecuteBatch(
                pb.ExecuteBatchRequest(
                    workspace_id=str(pair.b),
                    operations=[
                        pb.BatchOperation(
                            insert=pb.InsertRequest(table=NOTES, columns=["body"], rows=[row("z")])
                        ),
                        pb.BatchOperation(
                            update=pb.UpdateRequest(
                                table=NOTES, values={"body": v("zz")}, filter=eq("body", "z")
                            )
                        ),
                    ],
                )
            )
            assert batch.results[1].update.affected_count == 1
    finally:
        await off.stop(grace=1.0)
        # This module's server (on) puts the net back at its next catalog load.
        await server.catalog.reload()
        async with server.database.owner_pool.acquire() as conn:
            await row_security.provision(conn, row_security.SERVICE_TABLES, enabled=True)
    assert await protected_state(db, names) == [(True, True, 2)] * len(names)
    async with server.database.workspace_connection(NO_DEADLINE, pair.b) as conn:
        assert await conn.fetchval(f"SELECT count(*) FROM {NOTES}") == 4
