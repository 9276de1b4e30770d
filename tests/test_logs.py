"""Structured logs: one JSON object per line, one line per call with method, workspace,
status and duration, and never a row value."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from conftest import start_server
from messages import eq, row, update_request
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.server.observability.interceptor import LogPolicy, RpcLog
from raptorflow.data.server.observability.logs import JsonFormatter
from raptorflow.data.v1 import (
    monitoring_service_pb2,
    monitoring_service_pb2_grpc,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)

ws = workspace_service_pb2
SERVICE = "/raptorflow.data.v1.WorkspaceService/"


class Lines(logging.Handler):
    """Keeps each record as the line the JSON formatter makes of it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> Iterator[Lines]:
    """JSON lines of every record of the server's loggers during one test."""
    handler = Lines()
    logger = logging.getLogger("raptorflow")
    caplog.set_level(logging.INFO, logger="raptorflow")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
async def server(settings: Settings) -> AsyncIterator[RunningServer]:
    """This module's server logs every call (the default logs failed and slow calls only)."""
    running = await start_server(settings, rpc_log="all")
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


@pytest.mark.parametrize(
    ("mode", "ok", "seconds", "logged"),
    [
        (RpcLog.ALL, True, 0.001, True),
        (RpcLog.ERRORS, True, 0.001, False),
        (RpcLog.ERRORS, False, 0.001, True),
        (RpcLog.ERRORS, True, 0.5, True),
        (RpcLog.OFF, False, 9.0, False),
    ],
)
def test_log_policy_picks_the_calls_that_get_a_line(
    mode: RpcLog, ok: bool, seconds: float, logged: bool
) -> None:
    assert LogPolicy(mode, slow_seconds=0.5).wants(ok, seconds) is logged


@pytest.fixture(scope="module")
def workspaces(channel: grpc.aio.Channel) -> workspace_service_pb2_grpc.WorkspaceServiceStub:
    return workspace_service_pb2_grpc.WorkspaceServiceStub(channel)


async def test_one_json_line_per_call_without_row_values(
    lines: Lines,
    server: RunningServer,
    channel: grpc.aio.Channel,
    workspaces: workspace_service_pb2_grpc.WorkspaceServiceStub,
    workspace: str,
) -> None:
    secret_name = f"secret-name-{uuid.uuid4().hex}"
    secret_status = f"secret-status-{uuid.uuid4().hex}"
    inserted = await workspaces.Insert(
        ws.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "status"],
            rows=[row(secret_name, "draft")],
            returning=["id"],
        )
    )
    row_id = inserted.returning.rows[0].values[0].int64_value
    selected = await workspaces.Select(
        ws.SelectRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name"],
            filter=eq("name", secret_name),
        )
    )
    assert selected.rows[0].values[0].string_value == secret_name
    await workspaces.Update(update_request(workspace, row_id, secret_status))
    # Refused calls too: a duplicate (PostgreSQL's detail line repeats the value) ...
    with pytest.raises(grpc.aio.AioRpcError) as duplicate:
        await workspaces.Insert(
            ws.InsertRequest(
                workspace_id=workspace,
                table="campaigns",
                columns=["name"],
                rows=[row(secret_name)],
            )
        )
    assert duplicate.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # ... and a bad request.
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await workspaces.Select(
            ws.SelectRequest(
                workspace_id="not-a-uuid", table="campaigns", filter=eq("name", secret_name)
            )
        )
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await monitoring_service_pb2_grpc.MonitoringServiceStub(channel).GetStatus(
        monitoring_service_pb2.GetStatusRequest()
    )

    records = [json.loads(line) for line in lines.lines]
    assert all("\n" not in line for line in lines.lines)
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys()
        assert record["time"].endswith("Z")
    calls = [r for r in records if r["logger"] == "raptorflow.data.rpc"]
    assert [(c["method"].removeprefix(SERVICE), c["status"]) for c in calls] == [
        ("Insert", "OK"),
        ("Select", "OK"),
        ("Update", "OK"),
        ("Insert", "ALREADY_EXISTS"),
        ("Select", "INVALID_ARGUMENT"),
        ("/raptorflow.data.v1.MonitoringService/GetStatus", "OK"),
    ]
    for call in calls:
        assert call["level"] == "INFO"
        assert isinstance(call["duration_ms"], float)
        assert 0 <= call["duration_ms"] < 10_000
    assert [c.get("workspace") for c in calls] == [workspace] * 4 + ["not-a-uuid", None]
    # The caller is the token's subject (the channel fixture's admin token).
    assert {c.get("caller") for c in calls} == {"test-admin"}
    everything = "\n".join(lines.lines)
    assert secret_name not in everything
    assert secret_status not in everything


def test_json_formatter_keeps_extra_fields_and_tracebacks() -> None:
    logger = logging.getLogger("raptorflow.test")
    try:
        raise ValueError("broken")
    except ValueError:
        record = logger.makeRecord(
            "raptorflow.test",
            logging.ERROR,
            __file__,
            1,
            "failed %s after %d tries",
            ("twice", 2),
            sys.exc_info(),
            extra={"method": "/x.Y/Z", "duration_ms": 1.5, "odd": object()},
        )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed twice after 2 tries"
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "raptorflow.test"
    assert entry["method"] == "/x.Y/Z"
    assert entry["duration_ms"] == 1.5
    assert entry["odd"].startswith("<object object")
    assert "ValueError: broken" in entry["exception"]
    assert "msg" not in entry
    assert "args" not in entry


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_setup_writes_json_lines_to_stderr() -> None:
    done = run_python(
        "import logging, sys\n"
        "from raptorflow.data.server.observability import logs\n"
        "logs.setup('info', 'json')\n"
        "logging.getLogger('raptorflow.data.rpc').info('call', extra={'status': 'OK'})\n"
        "logging.getLogger('other').debug('not at debug')\n"
    )
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    assert len(entries) == 1
    assert entries[0]["status"] == "OK"
    assert entries[0]["logger"] == "raptorflow.data.rpc"


def test_unknown_log_format_is_refused() -> None:
    done = run_python(
        "from raptorflow.data.server.observability import logs\nlogs.setup('INFO', 'xml')\n"
    )
    assert done.returncode == 1
    assert "RAPTORFLOW_LOG_FORMAT" in done.stderr
