"""Regression tests for bugs found in review of issue 4 (maintenance and monitoring)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from conftest import start_server
from google.rpc import error_details_pb2, status_pb2
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.server.maintenance.schedule_config import ScheduleConfigError, load_schedules
from raptorflow.data.v1 import job_pb2, maintenance_service_pb2, maintenance_service_pb2_grpc
from tokens import authorized_channel

pb = maintenance_service_pb2


def _reason(error: grpc.aio.AioRpcError) -> str:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


@pytest.fixture(scope="module")
async def file_server(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    backup_dir: Path = tmp_path_factory.mktemp("review-backups")
    running = await start_server(settings, backup_dir=str(backup_dir))
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


async def test_an_overlong_backup_path_is_not_a_database_outage(
    file_server: RunningServer,
) -> None:
    # A file name longer than the file system allows used to escape as an OSError,
    # which the error map reads as "the database cannot be reached" (UNAVAILABLE).
    async with authorized_channel(file_server.address) as channel:
        stub = maintenance_service_pb2_grpc.MaintenanceServiceStub(channel)
        for spec in (
            job_pb2.JobSpec(backup_to_file=job_pb2.BackupToFileJob(path="x" * 300)),
            job_pb2.JobSpec(restore_from_file=job_pb2.RestoreFromFileJob(path="x" * 300)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.StartJob(pb.StartJobRequest(spec=spec), timeout=10)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value
            assert _reason(caught.value) == "BACKUP_FILE_ERROR"


def _task_names() -> set[str]:
    # Named tasks only: the module server's LISTEN loops keep making short-lived
    # anonymous ones (asyncio.wait_for), which come and go on their own.
    return {t.get_name() for t in asyncio.all_tasks() if not t.get_name().startswith("Task-")}


async def test_a_start_that_cannot_bind_leaves_nothing_running(
    settings: Settings, server: RunningServer
) -> None:
    # The metrics port of the failed start must be free again afterwards.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    metrics_port = probe.getsockname()[1]
    probe.close()
    before = _task_names()
    with pytest.raises(RuntimeError):
        # The gRPC port is taken (by the module's server): binding it fails after the
        # job runner, the leak watchdog and the metrics endpoint have started.
        await start_server(
            settings, listen=server.address, metrics_listen=f"127.0.0.1:{metrics_port}"
        )
    # Whatever the failed start began ends soon after (a loaded machine takes a few turns).
    started = time.monotonic()
    while left := _task_names() - before:
        assert time.monotonic() - started < 10.0, f"still running: {left}"
        await asyncio.sleep(0.05)
    with socket.socket() as again:
        again.bind(("127.0.0.1", metrics_port))


def test_a_schedules_file_that_is_not_utf8_is_a_configuration_error(tmp_path: Path) -> None:
    # Used to escape as a bare UnicodeDecodeError (a traceback at start-up) rather than
    # the setting's own error.
    file = tmp_path / "schedules.json"
    file.write_bytes(b"\xff\xfe[]")
    with pytest.raises(ScheduleConfigError, match="cannot read the schedules file"):
        load_schedules(f"@{file}")
