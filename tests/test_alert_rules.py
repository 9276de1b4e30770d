"""deploy/prometheus/alerts.yaml: every metric and label an alert uses is one a real server
exports, each of the users' figures has its alert at its threshold, and promtool (when
installed) accepts the rules and passes their unit tests in alerts_test.yaml.

The metric names come from a small PromQL tokenizer (`selectors`): identifiers that are
not functions, keywords or grouping labels, with their label matchers. The unit tests at
the top show it on expressions with known answers, and that a misspelt name fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import start_server
from google.protobuf import descriptor_pool
from prometheus_client.parser import text_string_to_metric_families
from raptorflow.data.server.app import SERVED_SERVICES, RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.server.health import NOT_SERVING, READINESS, SERVING
from raptorflow.data.server.observability.interceptor import DURATION_BOUNDS
from raptorflow.data.server.observability.monitoring import UTILIZATION_TARGET
from raptorflow.data.v1 import (
    job_pb2,
    maintenance_service_pb2,
    maintenance_service_pb2_grpc,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)
from test_kubernetes_manifests import server_settings as pod_settings
from tokens import authorized_channel

RULES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = RULES_DIR / "alerts.yaml"
RULE_TESTS = RULES_DIR / "alerts_test.yaml"
# Series Prometheus makes itself, and the labels it adds to every scraped series.
PROMETHEUS_SERIES = {"up": {"job", "instance"}}
TARGET_LABELS = {"job", "instance"}

# -- a small PromQL reader ----------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
      | (?P<range>\[[^\]]*\])
      | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w:]))
      | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
      | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
      | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=(){},])
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "atan2"}
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str


@dataclass
class Selector:
    metric: str
    matchers: list[Matcher] = field(default_factory=list)


@dataclass
class Expression:
    selectors: list[Selector]
    grouping: set[str]
    """Labels named in by/without/on/ignoring/group_* lists."""


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    expr = expr.rstrip()
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None or match.end() == position:
            raise ValueError(f"cannot read PromQL at {expr[position : position + 20]!r}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


def _string_value(token: str) -> str:
    if token.startswith("`"):
        return token[1:-1]
    # Go-style escapes: "\\." is the two characters \. of a regex.
    return re.sub(r"\\(.)", r"\1", token[1:-1])


def selectors(expr: str) -> Expression:
    """The metric selectors and grouping labels of a PromQL expression."""
    tokens = _tokens(expr)
    found: list[Selector] = []
    grouping: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "ident" and text in _GROUPING and following == "(":
            i += 2
            while tokens[i][1] != ")":
                if tokens[i][0] == "ident":
                    grouping.add(tokens[i][1])
                i += 1
        elif kind == "ident" and (
            following == "("
            or text in _KEYWORDS
            or (text in _AGGREGATIONS and following in {"by", "without"})
        ):
            pass  # a function, an aggregation or an operator keyword
        elif kind == "ident":
            selector = Selector(text)
            if following == "{":
                i += 2
                while tokens[i][1] != "}":
                    if tokens[i][1] == ",":
                        i += 1
                        continue
                    label, op, value = tokens[i][1], tokens[i + 1][1], tokens[i + 2][1]
                    selector.matchers.append(Matcher(label, op, _string_value(value)))
                    i += 3
            found.append(selector)
        i += 1
    return Expression(found, grouping)


def test_the_promql_reader_finds_names_matchers_and_grouping() -> None:
    read = selectors(
        'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{m=~"/x\\\\..+", '
        "c!=\"OK\"}[5m]))) > 1 and on (instance) b == 0 or absent(c{s='x'}) unless d offset 5m"
    )
    assert [s.metric for s in read.selectors] == ["a_bucket", "b", "c", "d"]
    assert read.selectors[0].matchers == [Matcher("m", "=~", "/x\\..+"), Matcher("c", "!=", "OK")]
    assert read.selectors[2].matchers == [Matcher("s", "=", "x")]
    assert read.grouping == {"job", "le", "instance"}
    with pytest.raises(ValueError, match="cannot read"):
        selectors("rate(x[5m]) > 0.8 ;")


# -- the rules -----------------------------------------------------------------------------


def rules() -> dict[str, dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    found: dict[str, dict[str, Any]] = {}
    for group in document["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] not in found, rule["alert"]
            found[rule["alert"]] = rule
    return found


def threshold(rule: dict[str, Any]) -> tuple[str, float]:
    """The expression's final comparison: ('>', 0.8)."""
    match = re.search(r"(>=|<=|==|!=|>|<)\s*(\d+(?:\.\d+)?)\s*$", rule["expr"].strip())
    assert match, rule["expr"]
    return match.group(1), float(match.group(2))


def metrics_of(rule: dict[str, Any]) -> set[str]:
    return {s.metric for s in selectors(rule["expr"]).selectors}


def _duration(text: str) -> float:
    match = re.fullmatch(r"(\d+)([smhd])", text)
    assert match, text
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def test_every_rule_is_complete() -> None:
    for name, rule in rules().items():
        assert re.fullmatch(r"Raptorflow[A-Z][A-Za-z0-9]+", name), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["description"], name
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, name
        selectors(rule["expr"])  # readable


def test_each_figure_has_its_alert_at_its_threshold() -> None:
    found = rules()
    # Pool utilisation over 80 %: the server's own target.
    pool = found["RaptorflowPoolUtilizationHigh"]
    assert metrics_of(pool) == {"raptorflow_pool_utilization"}
    assert threshold(pool) == (">", UTILIZATION_TARGET) == (">", 0.8)
    # p99 latency over 1 s, from the duration histogram; 1 s is one of its bucket bounds,
    # so the quantile around the threshold is not an interpolation across a wide bucket.
    latency = found["RaptorflowRpcLatencyP99High"]
    assert metrics_of(latency) == {"raptorflow_rpc_duration_seconds_bucket"}
    assert re.match(r"histogram_quantile\(0\.99,", latency["expr"].strip())
    assert threshold(latency) == (">", 1.0)
    assert 1.0 in DURATION_BOUNDS
    assert "le" in selectors(latency["expr"]).grouping
    # Any leaked connection: held over the limit now, or reclaimed lately.
    assert metrics_of(found["RaptorflowConnectionHeldOverLimit"]) == {
        "raptorflow_pool_held_over_limit"
    }
    assert threshold(found["RaptorflowConnectionHeldOverLimit"]) == (">", 0)
    assert "for" not in found["RaptorflowConnectionHeldOverLimit"]
    assert metrics_of(found["RaptorflowConnectionReclaimed"]) == {
        "raptorflow_pool_reclaimed_connections_total"
    }
    assert threshold(found["RaptorflowConnectionReclaimed"]) == (">", 0)
    # Scheduled maintenance success under 95 %, from scheduled runs only.
    scheduled = found["RaptorflowScheduledMaintenanceFailing"]
    assert metrics_of(scheduled) == {"raptorflow_scheduled_jobs_total"}
    assert threshold(scheduled) == ("<", 0.95)
    # Readiness NOT_SERVING, on the health name the readiness probe uses; waiting longer
    # than the pods' shutdown (drain + grace) keeps rolling updates quiet.
    readiness = found["RaptorflowReadinessNotServing"]
    (selector,) = selectors(readiness["expr"]).selectors
    assert selector.metric == "raptorflow_health_serving"
    assert selector.matchers == [Matcher("service", "=", READINESS)]
    assert threshold(readiness) == ("==", 0)
    pod = pod_settings()
    assert _duration(readiness["for"]) > (pod.shutdown_drain_seconds + pod.shutdown_grace_seconds)


def test_the_latency_alert_covers_exactly_the_unary_methods() -> None:
    """Streams last as long as their clients keep them: the alert leaves out every
    streaming method of the served services, and no unary one."""
    (selector,) = selectors(rules()["RaptorflowRpcLatencyP99High"]["expr"]).selectors
    include = [m.value for m in selector.matchers if m.label == "method" and m.op == "=~"]
    exclude = [m.value for m in selector.matchers if m.label == "method" and m.op == "!~"]
    pool = descriptor_pool.Default()
    unary, streaming = set(), set()
    for service_name in SERVED_SERVICES:
        for method in pool.FindServiceByName(service_name).methods:
            full = f"/{service_name}/{method.name}"
            (streaming if method.client_streaming or method.server_streaming else unary).add(full)
    assert unary
    assert streaming

    def alerted(method: str) -> bool:
        # PromQL regex matchers are anchored at both ends.
        return all(re.fullmatch(r, method) for r in include) and not any(
            re.fullmatch(r, method) for r in exclude
        )

    assert {m for m in unary | streaming if alerted(m)} == unary
    for other in ("/grpc.health.v1.Health/Watch", "/grpc.health.v1.Health/Check"):
        assert not alerted(other)


def test_every_alert_has_promtool_unit_tests_that_fire_and_stay_quiet() -> None:
    document = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    assert document["rule_files"] == [RULES.name]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in document["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fired == set(rules())
    assert quiet == set(rules())


# -- against a real server's /metrics -------------------------------------------------------


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body.decode()


@dataclass
class Exported:
    labels: dict[str, set[str]]
    """Sample name -> label names."""
    values: dict[tuple[str, str], set[str]]
    """(sample name, label) -> values seen."""
    samples: dict[str, list[tuple[dict[str, str], float]]]


async def scrape(running: RunningServer) -> Exported:
    port = running.monitoring.metrics_port
    assert port
    text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    exported = Exported({}, {}, {})
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            exported.labels.setdefault(sample.name, set()).update(sample.labels)
            exported.samples.setdefault(sample.name, []).append((sample.labels, sample.value))
            for label, value in sample.labels.items():
                exported.values.setdefault((sample.name, label), set()).add(value)
    return exported


def _schedule(name: str, table: str) -> dict[str, Any]:
    return {"name": name, "interval_seconds": 1, "job": {"analyze": {"tables": [table]}}}


GOOD_SCHEDULE = f"good-{uuid.uuid4().hex[:6]}"
BAD_SCHEDULE = f"bad-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
async def running(settings: Settings) -> AsyncIterator[RunningServer]:
    server = await start_server(
        dataclasses.replace(settings, pool_max_size=5),
        metrics_listen="127.0.0.1:0",
        schedules=json.dumps(
            [_schedule(GOOD_SCHEDULE, "campaigns"), _schedule(BAD_SCHEDULE, "no_such_table")]
        ),
    )
    try:
        yield server
    finally:
        await server.stop(grace=1.0)


def _count(exported: Exported, name: str, **labels: str) -> float:
    return sum(
        value
        for sample_labels, value in exported.samples.get(name, [])
        if labels.items() <= sample_labels.items()
    )


async def _until_scheduled_runs_ended(running: RunningServer) -> Exported:
    started = time.monotonic()
    name = "raptorflow_scheduled_jobs_total"
    while True:
        exported = await scrape(running)
        if (
            _count(exported, name, schedule=GOOD_SCHEDULE, state="succeeded") >= 1
            and _count(exported, name, schedule=BAD_SCHEDULE, state="failed") >= 1
        ):
            return exported
        assert time.monotonic() - started < 30.0, exported.samples.get(name)
        await asyncio.sleep(0.2)


async def _calls(running: RunningServer) -> None:
    """A few calls, so the per-method series exist."""
    async with authorized_channel(running.address) as channel:
        stub = workspace_service_pb2_grpc.WorkspaceServiceStub(channel)
        workspace = str(uuid.uuid4())
        for _ in range(3):
            await stub.Select(
                workspace_service_pb2.SelectRequest(workspace_id=workspace, table="campaigns")
            )
        await stub.Count(
            workspace_service_pb2.CountRequest(workspace_id=workspace, table="campaigns")
        )


async def test_every_metric_and_label_an_alert_uses_is_exported(running: RunningServer) -> None:
    await _calls(running)
    exported = await _until_scheduled_runs_ended(running)
    for name, rule in rules().items():
        expression = selectors(rule["expr"])
        for selector in expression.selectors:
            metric = selector.metric
            if metric in PROMETHEUS_SERIES:
                labels = PROMETHEUS_SERIES[metric]
            else:
                assert metric in exported.labels, f"{name}: {metric} is not exported"
                labels = exported.labels[metric] | TARGET_LABELS
            for matcher in selector.matchers:
                assert matcher.label in labels, f"{name}: {metric} has no label {matcher.label}"
                if metric in PROMETHEUS_SERIES or matcher.label in TARGET_LABELS:
                    continue
                seen = exported.values.get((metric, matcher.label), set())
                # The value (or regex) matches a value the server really gives that label:
                # a misspelt state or service name would match nothing, silently. (The
                # latency alert's !~ of streaming methods is checked against the descriptors.)
                if matcher.op in {"=", "!="}:
                    assert matcher.value in seen, (name, metric, matcher, seen)
                elif matcher.op == "=~":
                    assert any(re.fullmatch(matcher.value, v) for v in seen), (name, matcher, seen)
            # by (...) labels exist on what is grouped (or are added by Prometheus).
        inner = set().union(
            *(
                exported.labels.get(s.metric, PROMETHEUS_SERIES.get(s.metric, set()))
                for s in expression.selectors
            )
        )
        assert expression.grouping <= inner | TARGET_LABELS, (name, expression.grouping)


async def test_a_misspelt_name_or_value_would_be_caught(running: RunningServer) -> None:
    """The check above is not vacuous: names and values close to the real ones are absent."""
    exported = await scrape(running)
    assert "raptorflow_pool_utilisation" not in exported.labels
    assert "raptorflow_rpc_duration_seconds_bucket" in exported.labels
    assert "raptorflow_scheduled_jobs" not in exported.labels  # the counter ends in _total
    assert "ready" not in exported.values[("raptorflow_health_serving", "service")]
    assert "success" not in exported.values[("raptorflow_scheduled_jobs_total", "state")]


async def test_scheduled_runs_are_counted_by_schedule_and_manual_ones_are_not(
    running: RunningServer,
) -> None:
    exported = await _until_scheduled_runs_ended(running)
    name = "raptorflow_scheduled_jobs_total"
    # Every configured schedule's states are exported from the start, at 0 until one ends.
    assert {(labels["schedule"], labels["state"]) for labels, _ in exported.samples[name]} >= {
        (s, st) for s in (GOOD_SCHEDULE, BAD_SCHEDULE) for st in ("succeeded", "failed")
    }
    assert _count(exported, name, schedule=BAD_SCHEDULE, state="succeeded") == 0
    # A manual job is counted in raptorflow_jobs_total only.
    async with authorized_channel(running.address) as channel:
        stub = maintenance_service_pb2_grpc.MaintenanceServiceStub(channel)
        started = await stub.StartJob(
            maintenance_service_pb2.StartJobRequest(
                spec=job_pb2.JobSpec(vacuum=job_pb2.VacuumJob(tables=["campaigns"]))
            )
        )
        ended = {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED}
        deadline = time.monotonic() + 30.0
        while (
            await stub.GetJob(maintenance_service_pb2.GetJobRequest(job_id=started.job.job_id))
        ).job.state not in ended:
            assert time.monotonic() < deadline, "the manual vacuum did not end"
            await asyncio.sleep(0.1)
    after = await scrape(running)
    assert _count(after, "raptorflow_jobs_total", kind="vacuum") == 1
    assert not [labels for labels, _ in after.samples[name] if labels["schedule"] == ""]
    assert {labels["schedule"] for labels, _ in after.samples[name]} == {
        GOOD_SCHEDULE,
        BAD_SCHEDULE,
    }


async def test_health_gauge_follows_each_health_name(running: RunningServer) -> None:
    exported = await scrape(running)
    name = "raptorflow_health_serving"
    served = {labels["service"]: value for labels, value in exported.samples[name]}
    assert served == {"": 1.0, READINESS: 1.0, **dict.fromkeys(SERVED_SERVICES, 1.0)}
    # Readiness NOT_SERVING (as in a database outage; set directly, since the background
    # check would put it back at once while the database answers): liveness stays SERVING.
    await running.health.set(READINESS, NOT_SERVING)
    try:
        exported = await scrape(running)
        served = {labels["service"]: value for labels, value in exported.samples[name]}
        assert served[READINESS] == 0.0
        assert served[""] == 1.0
    finally:
        await running.health.set(READINESS, SERVING)


# -- promtool -------------------------------------------------------------------------------


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("RAPTORFLOW_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool is required (RAPTORFLOW_REQUIRE_PROMTOOL=1) but not on PATH")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


@pytest.mark.parametrize(
    "arguments",
    [("check", "rules", RULES.name), ("test", "rules", RULE_TESTS.name)],
    ids=["check", "unit-tests"],
)
def test_promtool_accepts_the_rules(arguments: tuple[str, ...]) -> None:
    result = subprocess.run(
        [_promtool(), *arguments],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_fails_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests notice a wrong threshold: alerts.yaml with 0.8 turned into 0.9."""
    promtool = _promtool()
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    text = RULES.read_text(encoding="utf-8")
    assert text.count("> 0.8") == 1
    (tmp_path / RULES.name).write_text(text.replace("> 0.8", "> 0.95"), encoding="utf-8")
    result = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "RaptorflowPoolUtilizationHigh" in result.stdout + result.stderr
