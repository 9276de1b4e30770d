"""Server settings: one frozen dataclass, filled from flags, then environment, then defaults.

Every setting has a command-line flag and an environment variable; the table
`SETTINGS` is the single place that names them, so `serve --help`, the README
and the environment cannot drift apart.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Settings:
    """How one server process runs."""

    listen: str = "127.0.0.1:50051"
    """Address the gRPC port binds, HOST:PORT; port 0 picks a free port."""
    workers: int = 1
    """Server processes sharing the gRPC port (SO_REUSEPORT) under one supervisor. The query
    pool (pool_min_size, pool_max_size) and the job slots (max_running_jobs) are split among
    them, so those stay totals of the replica; pool_max_size must be at least workers."""
    database_url: str = ""
    """Connection string for queries (the application role)."""
    owner_database_url: str = ""
    """Connection string of the tables' owner, for migrations, catalog reloads, maintenance and
    the job history; empty uses direct_database_url, or else database_url."""
    direct_database_url: str = ""
    """Connection string that reaches PostgreSQL itself, never through PgBouncer, as the query
    role's user: the LISTEN connections of sync streams and jobs use it. Empty uses
    database_url, or, with pgbouncer, owner_database_url."""
    pgbouncer: bool = False
    """database_url leads through PgBouncer in transaction pooling mode: the query pool keeps no
    prepared statements, runs every statement in an explicit transaction and sets its role and
    statement_timeout per transaction (SET LOCAL), never per session. Needs
    direct_database_url or owner_database_url for what cannot be pooled (LISTEN, migrations)."""
    app_role: str = "raptorflow_app"
    """With a single (owner) URL: the non-owner role queries run as, created by migrations.
    Empty runs queries as the URL's own user."""
    schema: str = "public"
    """Schema whose tables (those with a workspace_id column) are exposed."""
    tables: tuple[str, ...] = ()
    """Exposed tables; empty exposes every table of the schema with a workspace_id column."""
    pool_min_size: int = 2
    """Connections the query pool keeps open."""
    pool_max_size: int = 10
    """Most connections the query pool opens."""
    acquire_timeout: float = 5.0
    """Seconds a call waits for a pool connection before RESOURCE_EXHAUSTED."""
    statement_timeout: float = 30.0
    """Upper bound, in seconds, on any statement; a call's shorter deadline wins."""
    connect_timeout: float = 5.0
    """Seconds one connection attempt may take."""
    connect_retry_seconds: float = 30.0
    """Seconds start-up keeps retrying an unreachable database before giving up."""
    health_interval: float = 2.0
    """Seconds between background database checks that drive readiness."""
    health_timeout: float = 2.0
    """Seconds one database check may take before it counts as failed."""
    shutdown_drain_seconds: float = 0.0
    """On SIGTERM, seconds to stay up while NOT_SERVING so load balancers deregister."""
    shutdown_grace_seconds: float = 10.0
    """On SIGTERM, seconds in-flight unary calls get to finish."""
    reflection: bool = True
    """Serve gRPC server reflection (grpcurl list/describe)."""
    token_key: bytes = b""
    """Key that signs page tokens; replicas must share it. Empty: a random key per process."""
    dev_disable_auth: bool = False
    """Development only: serve every call without a bearer token, as an admin of every
    workspace. Logged loudly at start-up; never set it where anyone else can reach the port."""
    jwt_secret: bytes = b""
    """Shared secret that verifies HS256 bearer tokens (text, or base64:...); empty accepts no
    HS256 token."""
    jwt_public_key_file: str = ""
    """PEM file of the public key (RSA or EC) that verifies RS256 or ES256 bearer tokens."""
    jwt_jwks_file: str = ""
    """JWKS (JSON Web Key Set) file whose keys, chosen by the token's kid, verify RS256 or ES256
    bearer tokens; reread when it changes."""
    jwt_issuer: str = "raptorflow"
    """The iss every bearer token must carry."""
    jwt_audience: str = "raptorflow-data"
    """The aud every bearer token must carry (one of, when it is a list)."""
    jwt_leeway_seconds: float = 30.0
    """Clock skew, in seconds, allowed when checking a token's exp and nbf."""
    tls_cert_file: str = ""
    """PEM certificate chain of the gRPC port; with tls_key_file it turns TLS on. Reloaded when
    the file changes, without a restart."""
    tls_key_file: str = ""
    """PEM private key of tls_cert_file."""
    tls_client_ca_file: str = ""
    """PEM CA bundle that client certificates must chain to; setting it requires mutual TLS."""
    health_listen: str = ""
    """HOST:PORT of an extra plaintext port that serves only grpc.health.v1 (for Kubernetes'
    gRPC probes, which speak neither TLS nor auth); empty: none."""
    row_security: bool = True
    """Keep the row-level security net: the exposed tables and raptorflow_data.memory_records get
    policies keyed on the per-transaction workspace setting, which every workspace call sets (one
    transaction per call: two round trips more). Off removes the service's policies again at
    start-up and every catalog reload; every replica on one database must use the same value."""
    max_streams_per_caller: int = 100
    """Most streaming calls one caller (a token's subject) may have open at once."""
    default_page_size: int = 100
    """Rows a select returns when the request gives no page size."""
    max_page_size: int = 1000
    """Most rows a select returns; larger page sizes are lowered to it."""
    max_rows_per_request: int = 50_000
    """Most rows one insert or upsert may carry."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest request or response message, in bytes."""
    catalog_refresh_seconds: float = 30.0
    """Seconds between reloads of the exposed tables' shape from the catalog."""
    sync_poll_seconds: float = 3.0
    """Seconds between fallback polls of the change log that wake sync streams a NOTIFY missed
    (also the keepalive of the LISTEN connection)."""
    sync_checkpoint_seconds: float = 5.0
    """Least seconds between CHECKPOINT messages of a following sync stream whose position moved
    without changes for it."""
    sync_prune_seconds: float = 60.0
    """Seconds between prunings of the change log."""
    sync_retention_seconds: float = 604800.0
    """Seconds a change-log entry is kept at most, acknowledged or not (default 7 days)."""
    sync_consumer_expiry_seconds: float = 86400.0
    """Seconds after its last acknowledgement (or stream start) a named sync consumer stops
    holding back pruning."""
    log_level: str = "INFO"
    """Python logging level name."""
    log_format: str = "text"
    """Log line format: "text" for people, "json" for one JSON object per line."""
    rpc_log: str = "errors"
    """Which calls get a log line (method, workspace, status, duration): "all", "errors" (calls
    that failed or took at least slow_query_seconds) or "off"."""
    metrics_listen: str = ""
    """HOST:PORT of the Prometheus metrics HTTP endpoint; empty turns metrics off, port 0 picks
    a free port."""
    latency_window_seconds: float = 300.0
    """Seconds of recent calls the status view's latency percentiles cover."""
    slow_query_seconds: float = 0.5
    """Statements running at least this many seconds are listed as slow queries."""
    leak_seconds: float = 60.0
    """Seconds a call may hold a pool connection before it counts as leaked and the watchdog
    reclaims it (cancels its query and frees the slot)."""
    backup_dir: str = ""
    """Directory backup files are written to and restored from; empty turns file backups off."""
    backup_timeout: float = 3600.0
    """Upper bound, in seconds, on one backup or restore (streamed or a file job), whose COPY
    statements may outlast statement_timeout; a call's shorter deadline wins."""
    job_lease_seconds: float = 15.0
    """Seconds a running job's lease lasts; its replica renews it, and a job whose lease ran out
    is marked failed."""
    max_running_jobs: int = 2
    """Most maintenance jobs one replica runs at once; later ones wait, queued."""
    job_history_seconds: float = 2592000.0
    """Seconds finished jobs are kept in the job history (default 30 days)."""
    schedules: str = ""
    """Scheduled jobs, as JSON: [{"name", "cron" or "interval_seconds", "job": JobSpec in
    proto3 JSON}]; a value starting with @ names a file holding that JSON."""
    retention_rules: str = ""
    """Retention rules, as JSON: [{"table", "column" (a timestamp column), "max_age_seconds",
    "batch_size"}]; a value starting with @ names a file holding that JSON."""

    @property
    def effective_owner_url(self) -> str:
        return self.owner_database_url or self.direct_database_url or self.database_url

    @property
    def listen_url(self) -> str:
        """Where LISTEN connections go: a session of their own, which PgBouncer's transaction
        pooling cannot give; empty when pgbouncer is on and no direct URL is set."""
        if self.direct_database_url:
            return self.direct_database_url
        return self.owner_database_url if self.pgbouncer else self.database_url

    @property
    def query_role(self) -> str:
        """The role queries switch to, or '' when the query URL is already the app role."""
        return "" if self.owner_database_url else self.app_role


@dataclass(frozen=True)
class _Setting:
    name: str
    env: str
    parse: Callable[[str], Any]


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _parse_tables(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return value

    return parse


def _parse_key(text: str) -> bytes:
    # A key given as text is used as its UTF-8 bytes; `base64:` marks binary keys.
    if text.startswith("base64:"):
        return base64.b64decode(text.removeprefix("base64:"))
    return text.encode()


_PARSERS: Mapping[type, Callable[[str], Any]] = {
    int: int,
    float: float,
    str: str,
    bool: _parse_bool,
}


def _settings_table() -> tuple[_Setting, ...]:
    special: Mapping[str, Callable[[str], Any]] = {
        "tables": _parse_tables,
        "token_key": _parse_key,
        "jwt_secret": _parse_key,
        "log_format": _choice("text", "json"),
        "rpc_log": _choice("all", "errors", "off"),
    }
    env_names = {"database_url": "DATABASE_URL"}
    table = []
    for f in dataclasses.fields(Settings):
        default_type = type(f.default)
        parse = special.get(f.name) or _PARSERS[default_type]
        env = env_names.get(f.name, f"RAPTORFLOW_{f.name.upper()}")
        table.append(_Setting(f.name, env, parse))
    return tuple(table)


SETTINGS = _settings_table()


def _help_texts() -> dict[str, str]:
    # Attribute docstrings are not kept at run time; read them from the source once.
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(Settings))
    body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
    texts: dict[str, str] = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            texts[node.target.id] = " ".join(following.value.value.split())
    return texts


def add_arguments(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """Adds one flag per setting (`--pool-max-size`, ...), defaulting to 'not given'."""
    helps = _help_texts()
    for setting in SETTINGS:
        if names is not None and setting.name not in names:
            continue
        flag = "--" + setting.name.replace("_", "-")
        parser.add_argument(
            flag,
            dest=setting.name,
            default=None,
            metavar=setting.env,
            help=f"{helps.get(setting.name, '')} [env {setting.env}]",
        )


def setting_document(value: str) -> str:
    """The text of a JSON-valued setting (schedules, retention rules): the value itself,
    or the content of the UTF-8 file that a value of the form '@path' names.

    Raises OSError or UnicodeDecodeError when that file cannot be read.
    """
    text = value.strip()
    if not text.startswith("@"):
        return text
    return Path(text[1:]).read_text(encoding="utf-8")


def load(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from flags (highest), then the environment, then the defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = getattr(args, setting.name, None) if args is not None else None
        if raw is None:
            raw = env.get(setting.env)
        if raw is None or (raw == "" and setting.name != "app_role"):
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as exc:
            raise SystemExit(f"invalid {setting.env}: {exc}") from exc
    return Settings(**values)
