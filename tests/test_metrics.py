"""Prometheus metrics on the HTTP port: RPC counts and durations by method and code,
pool gauges, reclaimed connections and job outcomes; off unless a port is given."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from conftest import start_server
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.connections import Deadline
from raptorflow.data.v1 import job_pb2, workspace_service_pb2, workspace_service_pb2_grpc
from tokens import authorized_channel

ws = workspace_service_pb2
SELECT = "/raptorflow.data.v1.WorkspaceService/Select"
COUNT = "/raptorflow.data.v1.WorkspaceService/Count"


@pytest.fixture(scope="module")
async def running(settings: Settings) -> AsyncIterator[RunningServer]:
    server = await start_server(settings, metrics_listen="127.0.0.1:0")
    try:
        yield server
    finally:
        await server.stop(grace=1.0)


@pytest.fixture(scope="module")
async def workspaces(
    running: RunningServer,
) -> AsyncIterator[workspace_service_pb2_grpc.WorkspaceServiceStub]:
    async with authorized_channel(running.address) as ch:
        yield workspace_service_pb2_grpc.WorkspaceServiceStub(ch)


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


async def scrape(running: RunningServer) -> dict[str, list[Sample]]:
    """Every sample on the metrics port, by sample name."""
    port = running.monitoring.metrics_port
    assert port
    status, content_type, text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    found = [s.value for s in samples.get(name, []) if labels.items() <= s.labels.items()]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


async def test_rpc_counts_and_durations_by_method_and_code(
    running: RunningServer,
    workspaces: workspace_service_pb2_grpc.WorkspaceServiceStub,
    workspace: str,
) -> None:
    for _ in range(3):
        await workspaces.Select(
            ws.SelectRequest(workspace_id=workspace, table="campaigns", columns=["name"])
        )
    await workspaces.Count(ws.CountRequest(workspace_id=workspace, table="campaigns"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await workspaces.Select(ws.SelectRequest(workspace_id="not-a-uuid", table="campaigns"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    samples = await scrape(running)
    assert value(samples, "raptorflow_rpc_total", method=SELECT, code="OK") >= 3
    assert value(samples, "raptorflow_rpc_total", method=SELECT, code="INVALID_ARGUMENT") >= 1
    assert value(samples, "raptorflow_rpc_total", method=COUNT, code="OK") >= 1
    ok_select = {"method": SELECT, "code": "OK"}
    count = value(samples, "raptorflow_rpc_duration_seconds_count", **ok_select)
    assert count == value(samples, "raptorflow_rpc_total", **ok_select)
    assert value(samples, "raptorflow_rpc_duration_seconds_bucket", le="+Inf", **ok_select) == count
    assert 0 < value(samples, "raptorflow_rpc_duration_seconds_sum", **ok_select) < 60
    buckets = [
        s.value
        for s in samples["raptorflow_rpc_duration_seconds_bucket"]
        if ok_select.items() <= s.labels.items()
    ]
    assert buckets == sorted(buckets)  # cumulative


async def test_pool_gauges_follow_held_connections(running: RunningServer) -> None:
    async with (
        running.database.connection(Deadline(None)),
        running.database.connection(Deadline(None)),
    ):
        samples = await scrape(running)
        in_use = value(samples, "raptorflow_pool_in_use")
        assert in_use >= 2
        assert value(samples, "raptorflow_pool_max_size") == running.settings.pool_max_size
        assert value(samples, "raptorflow_pool_utilization") == pytest.approx(
            in_use / running.settings.pool_max_size
        )
        size = value(samples, "raptorflow_pool_size")
        assert value(samples, "raptorflow_pool_idle") == size - in_use
        assert value(samples, "raptorflow_pool_waiting") == 0
    samples = await scrape(running)
    assert value(samples, "raptorflow_pool_in_use") < in_use
    assert value(samples, "raptorflow_pool_held_over_limit") == 0
    assert value(samples, "raptorflow_pool_reclaimed_connections_total") == 0
    assert value(samples, "raptorflow_database_up") == 1
    assert value(samples, "raptorflow_database_check_latency_seconds") > 0
    assert "raptorflow_slow_queries_total" in samples


async def test_job_outcomes_are_counted_by_kind_and_state(running: RunningServer) -> None:
    running.monitoring.record_job("vacuum", job_pb2.JOB_STATE_SUCCEEDED)
    running.monitoring.record_job("vacuum", job_pb2.JOB_STATE_SUCCEEDED)
    running.monitoring.record_job("backup_to_file", "JOB_STATE_FAILED")
    samples = await scrape(running)
    assert value(samples, "raptorflow_jobs_total", kind="vacuum", state="succeeded") == 2
    assert value(samples, "raptorflow_jobs_total", kind="backup_to_file", state="failed") == 1


async def test_metrics_are_off_without_a_port(settings: Settings) -> None:
    server = await start_server(settings)
    try:
        assert server.monitoring.metrics_port is None
    finally:
        await server.stop(grace=1.0)


async def test_each_server_has_its_own_registry_and_port(
    settings: Settings, running: RunningServer
) -> None:
    other = await start_server(settings, metrics_listen="127.0.0.1:0")
    port = other.monitoring.metrics_port
    try:
        assert port not in (None, running.monitoring.metrics_port)
        mine = await scrape(running)
        theirs = await scrape(other)
        # The other server has served no Select yet; this one has.
        assert any(s.labels.get("method") == SELECT for s in mine["raptorflow_rpc_total"])
        assert not any(
            s.labels.get("method") == SELECT for s in theirs.get("raptorflow_rpc_total", [])
        )
    finally:
        await other.stop(grace=1.0)
    # Stopped: its port no longer answers.
    assert other.monitoring.metrics_port is None
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
