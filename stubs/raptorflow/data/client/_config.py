"""Connection settings of the RaptorFlow Data client and the channel options built from them."""

import enum
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from importlib import resources
from typing import Any, Final, TypeAlias

import grpc

MetadataValue: TypeAlias = str | bytes
"""A metadata value: text, or bytes for keys ending in ``-bin``."""

MetadataLike: TypeAlias = Mapping[str, MetadataValue] | Sequence[tuple[str, MetadataValue]]
"""Call metadata, as a mapping or as (key, value) pairs (pairs may repeat a key)."""


class UseClientDefault(enum.Enum):
    """The type of `USE_CLIENT_DEFAULT`."""

    USE_CLIENT_DEFAULT = "USE_CLIENT_DEFAULT"


USE_CLIENT_DEFAULT: Final = UseClientDefault.USE_CLIENT_DEFAULT
"""Passed as `timeout`, uses `ClientConfig.timeout`.

A sentinel rather than None because None already means "no deadline", which
long-running jobs need to be able to ask for.
"""

Timeout: TypeAlias = float | UseClientDefault | None
"""A per-call timeout in seconds, None for no deadline, or `USE_CLIENT_DEFAULT`.

At most `MAX_TIMEOUT_SECONDS`; more (or NaN, or infinity) raises ValueError at the
call. Zero or less is a deadline that has already passed."""

MAX_TIMEOUT_SECONDS: Final = 36_525 * 86_400.0
"""The longest timeout a `ClientConfig` or a call may give: 100 years, in seconds.

gRPC carries a deadline as 64-bit nanoseconds on the clock, which overflows a few
billion seconds ahead; every call sent with such a deadline used to fail at once
with DEADLINE_EXCEEDED. For no deadline, give None."""

SERVICE_NAME: Final = "raptorflow.data.v1.WorkspaceService"

_PACKAGE: Final = __name__.rpartition(".")[0]

# Large enough for a full page of 1,000 rows carrying 1536-dimension float
# embeddings (about 6 MiB); gRPC's own 4 MiB default would fail such pages.
_DEFAULT_MAX_RECEIVE_BYTES: Final = 64 * 1024 * 1024

# gRPC stops retrying a call once its buffered request outgrows this size (the
# default is 256 KiB), which would silently disable ABORTED retries for large
# batches, the calls that need them most.
_RETRY_BUFFER_BYTES: Final = 16 * 1024 * 1024

_USER_AGENT: Final = "raptorflow-data-client/0.1.0"


@dataclass(frozen=True)
class ClientConfig:
    """How a `DataClient` reaches the service and what it sends on every call."""

    target: str
    """The server address, "host:port" or any gRPC target ("dns:///data:50051")."""

    _: KW_ONLY

    token: str | Callable[[], str] | None = field(default=None, repr=False)
    """The bearer token (a JWT) sent as ``authorization: Bearer <token>`` on every call of the
    client (an ``authorization`` entry in `metadata` or a call's metadata wins); a function is
    called once per call, so a token refreshed elsewhere is picked up. Calls through
    `DataClient.stub` send only the metadata they are given: pass the header yourself, or
    build your own channel with `bearer_auth()`. None sends none (the server then answers
    UNAUTHENTICATED, unless it runs with authentication off for development)."""

    timeout: float | None = 10.0
    """Seconds a call may take, retries included, unless the call says otherwise: more
    than 0 and at most `MAX_TIMEOUT_SECONDS` (100 years). None sets no deadline. Anything
    else (0 or less, NaN, infinity, more than 100 years) raises ValueError here, when the
    config is created: gRPC cannot send it as a deadline, and every call would fail."""

    metadata: MetadataLike = ()
    """Metadata sent on every call, such as an authorization header. A call's own
    metadata replaces entries with the same key."""

    max_send_message_bytes: int | None = None
    """The largest request the client sends; None keeps gRPC's default (no limit)."""

    max_receive_message_bytes: int | None = _DEFAULT_MAX_RECEIVE_BYTES
    """The largest response the client accepts; None keeps gRPC's default (4 MiB)."""

    enable_retries: bool = True
    """Whether the retry policies of service_config.json apply. Reads retry
    UNAVAILABLE and ABORTED; writes retry ABORTED only, which the server returns
    after rolling the transaction back, so a retried write never applies twice."""

    channel_credentials: grpc.ChannelCredentials | None = None
    """TLS credentials, from `tls_credentials()` (or `grpc.ssl_channel_credentials()`); None
    connects without TLS."""

    channel_options: Sequence[tuple[str, Any]] = ()
    """Extra gRPC channel arguments, such as ("grpc.keepalive_time_ms", 30000).
    They override the options this config sets, key by key."""

    load_balancing_policy: str | None = None
    """The gRPC load-balancing policy, "pick_first" or "round_robin" (spread calls
    over every address a DNS name resolves to); None keeps gRPC's default.
    round_robin also watches each server's `readiness` health (the service config's
    healthCheckConfig) and sends nothing to one that is not SERVING: a replica that
    is draining for shutdown, or that cannot reach the database. pick_first ignores it."""

    def __post_init__(self) -> None:
        timeout = self.timeout
        if timeout is None:
            return
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise TypeError(
                f"ClientConfig.timeout is seconds (a float) or None, not {type(timeout).__name__}"
            )
        if not 0 < timeout <= MAX_TIMEOUT_SECONDS:
            raise ValueError(
                f"ClientConfig.timeout={timeout!r} is not a number of seconds above 0 and at"
                f" most {MAX_TIMEOUT_SECONDS:.0f} (100 years); None sets no deadline"
            )

    def service_config(self) -> dict[str, Any]:
        """The gRPC service config the channel gets: retry policies and load balancing."""
        text = resources.files(_PACKAGE).joinpath("service_config.json").read_text("utf-8")
        config: dict[str, Any] = json.loads(text)
        if self.load_balancing_policy is not None:
            config["loadBalancingConfig"] = [{self.load_balancing_policy: {}}]
        return config

    def channel_arguments(self) -> list[tuple[str, Any]]:
        """The channel arguments for `grpc.aio.insecure_channel` or `secure_channel`."""
        options: dict[str, Any] = {
            "grpc.service_config": json.dumps(self.service_config()),
            "grpc.enable_retries": int(self.enable_retries),
            "grpc.per_rpc_retry_buffer_size": _RETRY_BUFFER_BYTES,
            "grpc.primary_user_agent": _USER_AGENT,
        }
        if self.max_send_message_bytes is not None:
            options["grpc.max_send_message_length"] = self.max_send_message_bytes
        if self.max_receive_message_bytes is not None:
            options["grpc.max_receive_message_length"] = self.max_receive_message_bytes
        # A dict, so that an extra option replaces ours instead of being passed
        # twice, where which one gRPC honours is not documented.
        options.update(dict(self.channel_options))
        return list(options.items())


def check_call_timeout(seconds: float | None, name: str = "timeout") -> None:
    """Raises ValueError for a per-call timeout gRPC cannot send as a deadline: NaN,
    infinity or more than `MAX_TIMEOUT_SECONDS` (None, no deadline, and 0 or less, a
    deadline already passed, are fine)."""
    # One comparison on the way of every call; NaN and infinity fail it too.
    if seconds is not None and not seconds <= MAX_TIMEOUT_SECONDS:
        raise ValueError(
            f"{name}={seconds!r} is not a number of seconds up to {MAX_TIMEOUT_SECONDS:.0f}"
            " (100 years); None sets no deadline"
        )


def metadata_pairs(metadata: MetadataLike) -> list[tuple[str, MetadataValue]]:
    """Normalises metadata to (key, value) pairs with lower-case keys, as gRPC requires."""
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    return [(key.lower(), value) for key, value in items]


def merge_metadata(
    defaults: MetadataLike, overrides: MetadataLike | None
) -> list[tuple[str, MetadataValue]]:
    """The config's metadata with a call's metadata replacing entries of the same key."""
    pairs = metadata_pairs(defaults)
    if not overrides:
        return pairs
    extra = metadata_pairs(overrides)
    replaced = {key for key, _ in extra}
    return [pair for pair in pairs if pair[0] not in replaced] + extra
