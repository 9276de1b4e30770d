"""deploy/kubernetes: the manifests parse and match Kubernetes' schemas, and they match the
server: every variable they set is a real setting, the probes reach the ports those
settings open and name health entries a real server (started with the manifests' own
settings) serves, and the pod's termination grace covers preStop, drain and grace."""

from __future__ import annotations

import asyncio
import re
import secrets
import signal
import sys
import time
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from raptorflow.data.server import config
from raptorflow.data.server.health import READINESS
from raptorflow.data.server.maintenance.jobs import CLOSE_WAIT_SECONDS
from server_process import QUICK_RECONNECT, command_environment, free_port
from test_dockerfile import stages
from tokens import TEST_JWT_SECRET

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "deploy" / "kubernetes"
# gRPC probes are GA from 1.27; also the newest schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.27", kubernetes_validate.latest_version())
# Time the pod needs after the grace period: jobs closing (CLOSE_WAIT_SECONDS), the
# health port and the pools; the margin is what is left before the kubelet's SIGKILL.
MARGIN_SECONDS = 5.0
SERVED = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SECRET_VARIABLES = {
    "DATABASE_URL",
    "RAPTORFLOW_OWNER_DATABASE_URL",
    "RAPTORFLOW_JWT_SECRET",
    "RAPTORFLOW_TOKEN_KEY",
}


def documents() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        with path.open(encoding="utf-8") as file:
            found += [(path, doc) for doc in yaml.safe_load_all(file) if doc is not None]
    return found


def resources() -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] != "Kustomization"]


def one(kind: str) -> dict[str, Any]:
    found = [doc for doc in resources() if doc["kind"] == kind]
    assert len(found) == 1, (kind, len(found))
    return found[0]


def container() -> dict[str, Any]:
    containers = one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    found: dict[str, Any] = containers[0]
    return found


@dataclass(frozen=True)
class PodEnvironment:
    values: dict[str, str]
    """Every variable the container gets, the Secret's as placeholders."""
    from_secret: set[str]


def pod_environment() -> PodEnvironment:
    """The container's environment: its ConfigMaps (envFrom) then its own `env` entries."""
    maps = {
        doc["metadata"]["name"]: doc["data"] for doc in resources() if doc["kind"] == "ConfigMap"
    }
    values: dict[str, str] = {}
    from_secret: set[str] = set()
    spec = container()
    for source in spec.get("envFrom", []):
        assert "configMapRef" in source, source
        values.update(maps[source["configMapRef"]["name"]])
    for entry in spec.get("env", []):
        if "value" in entry:
            values[entry["name"]] = str(entry["value"])
        else:
            assert "secretKeyRef" in entry["valueFrom"], entry
            from_secret.add(entry["name"])
            values[entry["name"]] = f"<secret {entry['valueFrom']['secretKeyRef']['key']}>"
    return PodEnvironment(values, from_secret)


def server_settings() -> config.Settings:
    """The settings `serve` would run with in the pod (args over env, as the CLI does)."""
    from raptorflow.data.server import cli

    args = container().get("args") or ["serve"]
    namespace = cli._parser().parse_args(args)
    environment = {k: v for k, v in pod_environment().values.items() if k not in SECRET_VARIABLES}
    return config.load(namespace, environment)


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def container_ports() -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container()["ports"]}


def probes() -> dict[str, dict[str, Any]]:
    spec = container()
    return {kind: spec[f"{kind}Probe"] for kind in ("startup", "liveness", "readiness")}


def pre_stop_seconds() -> float:
    pre_stop = container()["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] in {"sleep", "/bin/sleep"}, command
    assert len(command) == 2, command
    return float(command[1])


def pod_labels() -> dict[str, str]:
    labels: dict[str, str] = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


# -- static checks --------------------------------------------------------------------


def test_every_document_matches_the_kubernetes_schemas() -> None:
    docs = documents()
    assert {doc["kind"] for _, doc in docs} >= {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
        "Kustomization",
    }
    for path, doc in docs:
        if doc["kind"] == "Kustomization":
            continue
        for version in KUBERNETES_VERSIONS:
            # Strict: an unknown or misspelt field fails, not only a wrong type.
            kubernetes_validate.validate(doc, version, strict=True)
        assert doc["metadata"]["name"], path


def test_the_schema_check_can_fail() -> None:
    deployment = one("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["servce"] = (
        READINESS
    )
    with pytest.raises(kubernetes_validate.ValidationError, match="servce"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    (image,) = kustomization["images"]
    with (REPO / "pyproject.toml").open("rb") as file:
        version = tomllib.load(file)["project"]["version"]
    # The image tag is the release the manifests were written for.
    assert image["newTag"] == version
    assert container()["image"] == f"{image['name']}:{version}"


def test_every_variable_is_a_real_setting_and_secrets_come_from_a_secret() -> None:
    known = {setting.env for setting in config.SETTINGS}
    environment = pod_environment()
    assert set(environment.values) - known == set()
    assert environment.from_secret == SECRET_VARIABLES
    # And none of those sits in plain text in a ConfigMap.
    config_map = one("ConfigMap")["data"]
    assert not SECRET_VARIABLES & set(config_map)
    # Every value parses as the setting it names.
    settings = server_settings()
    assert settings.shutdown_grace_seconds > 0
    assert settings.health_listen
    assert settings.metrics_listen


def test_probes_reach_the_ports_the_settings_open() -> None:
    settings = server_settings()
    ports = container_ports()
    assert ports["grpc"] == port_of(settings.listen)
    assert ports["metrics"] == port_of(settings.metrics_listen)
    assert ports["health"] == port_of(settings.health_listen)
    # The probes use the plaintext health port: they keep working with TLS on 50051.
    for kind, probe in probes().items():
        assert probe["grpc"]["port"] == ports["health"], kind
    assert probes()["liveness"]["grpc"].get("service", "") == ""
    assert probes()["startup"]["grpc"].get("service", "") == ""
    assert probes()["readiness"]["grpc"]["service"] == READINESS
    # Addresses bound to every interface, or the kubelet and other pods cannot reach them.
    for address in (settings.listen, settings.health_listen, settings.metrics_listen):
        assert address.startswith("0.0.0.0:"), address
    annotations = one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]


def test_probe_budgets_fit_start_up_and_shutdown() -> None:
    settings = server_settings()
    found = probes()

    def budget(probe: dict[str, Any]) -> float:
        return float(probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3))

    # The health port opens after the database answered (retried for connect_retry_seconds)
    # and migrations ran: the startup probe waits at least that long.
    assert budget(found["startup"]) > settings.connect_retry_seconds
    # During shutdown "" is NOT_SERVING too: liveness must not kill the pod before it drained.
    assert budget(found["liveness"]) > (
        settings.shutdown_drain_seconds + settings.shutdown_grace_seconds
    )


def test_termination_grace_covers_pre_stop_drain_and_grace() -> None:
    settings = server_settings()
    pod = one("Deployment")["spec"]["template"]["spec"]
    needed = (
        pre_stop_seconds()
        + settings.shutdown_drain_seconds
        + settings.shutdown_grace_seconds
        + CLOSE_WAIT_SECONDS
    )
    assert pod["terminationGracePeriodSeconds"] >= needed + MARGIN_SECONDS, needed
    # The drain keeps health NOT_SERVING long enough for at least one readiness probe.
    assert settings.shutdown_drain_seconds >= probes()["readiness"]["periodSeconds"]


def test_labels_and_selectors_agree() -> None:
    labels = pod_labels()
    deployment = one("Deployment")
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["replicas"] >= 2
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    budget = pdb["spec"].get("maxUnavailable", 0) or (
        deployment["spec"]["replicas"] - pdb["spec"]["minAvailable"]
    )
    # A drain may take some replicas, never all of them.
    assert 1 <= budget < deployment["spec"]["replicas"]
    services = [doc for doc in resources() if doc["kind"] == "Service"]
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1, "one headless Service for client-side round_robin"
    assert headless[0]["spec"].get("publishNotReadyAddresses", False) is False
    ports = container_ports()
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports or target in ports.values(), port
            assert ports.get(target, target) == ports["grpc"], "Services expose gRPC only"
    for spread in deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
        assert spread["labelSelector"]["matchLabels"].items() <= labels.items()


def test_the_pod_runs_as_the_images_user_with_resources() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    dockerfile = stages((REPO / "Dockerfile").read_text(encoding="utf-8"))[-1]
    user = dockerfile.last("USER")
    assert user is not None
    uid, _, gid = user.arguments.partition(":")
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == int(uid)
    assert security["runAsGroup"] == int(gid or uid)
    own = container()["securityContext"]
    assert own["allowPrivilegeEscalation"] is False
    assert own["capabilities"]["drop"] == ["ALL"]
    limits = container()["resources"]["limits"]
    requests = container()["resources"]["requests"]
    assert {"cpu", "memory"} <= requests.keys()
    assert "memory" in limits
    assert _bytes(requests["memory"]) <= _bytes(limits["memory"])


def _bytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", quantity)
    assert match, quantity
    return (
        int(match.group(1)) * {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}[match.group(2)]
    )


# -- against a real server started with the manifests' settings ---------------------------


@dataclass
class Pod:
    """`raptorflow-data serve` run with the pod's environment, on free loopback ports."""

    process: asyncio.subprocess.Process
    grpc_address: str
    health_address: str


def _on_loopback(address: str) -> str:
    """The pod binds 0.0.0.0:PORT; the test binds a free loopback port instead."""
    assert address.startswith("0.0.0.0:"), address
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
async def pod(database_url: str) -> AsyncIterator[Pod]:
    values = dict(pod_environment().values)
    grpc_address = _on_loopback(values["RAPTORFLOW_LISTEN"])
    health_address = _on_loopback(values["RAPTORFLOW_HEALTH_LISTEN"])
    values |= {
        "RAPTORFLOW_LISTEN": grpc_address,
        "RAPTORFLOW_HEALTH_LISTEN": health_address,
        "RAPTORFLOW_METRICS_LISTEN": _on_loopback(values["RAPTORFLOW_METRICS_LISTEN"]),
        # The Secret's values: the test's database and token secret, a fresh page-token key.
        "DATABASE_URL": database_url,
        "RAPTORFLOW_OWNER_DATABASE_URL": "",
        "RAPTORFLOW_JWT_SECRET": TEST_JWT_SECRET.decode(),
        "RAPTORFLOW_TOKEN_KEY": secrets.token_hex(32),
    }
    assert set(values) == set(pod_environment().values)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "raptorflow.data.server",
        *(container().get("args") or ["serve"]),
        env={**command_environment(), **values},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield Pod(process, grpc_address, health_address)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def _status(health: health_pb2_grpc.HealthStub, service: str) -> int:
    response = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
    return int(response.status)


async def _wait_for(
    pod: Pod, health: health_pb2_grpc.HealthStub, service: str, wanted: int, within: float
) -> None:
    started = time.monotonic()
    while True:
        assert pod.process.returncode is None, "serve exited"
        assert time.monotonic() - started < within, f"{service!r} never reached {wanted}"
        try:
            if await _status(health, service) == wanted:
                return
        except grpc.aio.AioRpcError as error:
            # UNAVAILABLE before the port opens; NOT_FOUND: the probe names no entry.
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise
        await asyncio.sleep(0.1)


async def test_each_probe_names_a_health_entry_of_the_real_server(pod: Pod) -> None:
    settings = server_settings()
    startup_budget = probes()["startup"]["periodSeconds"] * probes()["startup"]["failureThreshold"]
    async with grpc.aio.insecure_channel(pod.health_address, options=QUICK_RECONNECT) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        # As the startup probe: the health port answers "" within the probe's budget.
        await _wait_for(pod, health, "", SERVED, within=max(startup_budget, 30.0))
        await _wait_for(pod, health, READINESS, SERVED, within=settings.health_interval + 20.0)
        listed = (await health.List(health_pb2.HealthListRequest(), timeout=2.0)).statuses
        for kind, probe in probes().items():
            service = probe["grpc"].get("service", "")
            # Known to the server (Check answers NOT_FOUND for a name it does not know).
            assert service in listed, (kind, service, sorted(listed))
            assert await _status(health, service) == SERVED, kind
        # A name that is not an entry is refused: the check above could fail.
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await _status(health, "ready")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        # The health-only port serves nothing else.
        stub = channel.unary_unary(
            "/raptorflow.data.v1.WorkspaceService/Select",
            request_serializer=lambda _: b"",
            response_deserializer=lambda data: data,
        )
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await stub(None, timeout=2.0)
        assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # The client port reports the same entries.
    async with grpc.aio.insecure_channel(pod.grpc_address) as channel:
        on_client_port = (
            await health_pb2_grpc.HealthStub(channel).List(
                health_pb2.HealthListRequest(), timeout=2.0
            )
        ).statuses
    assert set(on_client_port) == set(listed)


async def test_sigterm_drains_then_exits_before_the_kubelet_kills(pod: Pod) -> None:
    """After SIGTERM, readiness on the probe port turns NOT_SERVING while the process
    drains, and the process exits 0 well within terminationGracePeriodSeconds minus the
    preStop sleep that came before the SIGTERM (a hang bound, not a speed figure)."""
    settings = server_settings()
    grace_period = one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    async with grpc.aio.insecure_channel(pod.health_address, options=QUICK_RECONNECT) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await _wait_for(pod, health, READINESS, SERVED, within=60.0)
        pod.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # The drain keeps the port up, answering NOT_SERVING, for the kubelet to see.
        await _wait_for(pod, health, READINESS, NOT_SERVING, within=settings.shutdown_drain_seconds)
        assert await _status(health, "") == NOT_SERVING
    async with asyncio.timeout(grace_period - pre_stop_seconds()):
        _, stderr = await pod.process.communicate()
    exited_after = time.monotonic() - signalled
    assert pod.process.returncode == 0, stderr.decode()[-2000:]
    # It did wait for the drain (the sleep is the server's own, so this is no speed check).
    assert exited_after >= settings.shutdown_drain_seconds * 0.9
