"""Measures every RPC: a grpc.aio server interceptor that times each call until it ends.

Each call, once it has ended (a stream: once it finished or failed), is
recorded with its full method name, its final status code and its duration:
an abort keeps its code (INVALID_ARGUMENT from `rpc_errors`, say), a call its
client cancelled is CANCELLED, one cut off by its deadline DEADLINE_EXCEEDED,
an exception that escaped the handler UNKNOWN. The record feeds the status
view's latency window (`latency.py`), the Prometheus counters and histograms
(`metrics.py`), and a log line at INFO on the `raptorflow.data.rpc` logger
(for every call, or only for failed and slow ones: `RpcLog`) with the fields
`method`, `workspace` (the request's `workspace_id`, for methods with a single
request that has that field; never any other field of a request), `status`
and `duration_ms`.

While a call runs, its method name is in `db.activity.current_caller`, so
the database layer can say who holds a connection or ran a slow statement.

An interceptor only sees the handler lookup, so the measuring happens in a
wrapper around each handler's behaviour, built once per method and reused.
Per call that costs two clock reads, a context-variable set and a few counter
updates; a log record costs more than all of those together (about 15 % of a
point select's throughput), which is why only failed and slow calls are logged
by default.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import inspect
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from raptorflow.data.server.auth.principal import current_principal
from raptorflow.data.server.db.activity import current_caller
from raptorflow.data.server.handler_wrapping import (
    Behavior,
    Handler,
    WrappingInterceptor,
    behavior_of,
    rebuilt,
)
from raptorflow.data.server.observability.latency import MethodWindow, SliceClock

rpc_log = logging.getLogger("raptorflow.data.rpc")

_OK = grpc.StatusCode.OK
_CANCELLED = grpc.StatusCode.CANCELLED
_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
_UNKNOWN = grpc.StatusCode.UNKNOWN
_INFO = logging.INFO
# A workspace id longer than a UUID is logged cut short: it is the caller's text.
_MAX_WORKSPACE_CHARS = 64

# Upper bounds (seconds) of the Prometheus duration histogram's buckets; +Inf follows.
DURATION_BOUNDS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class RpcLog(enum.Enum):
    """Which calls get a log line (the `rpc_log` setting)."""

    ALL = "all"
    """Every call."""
    ERRORS = "errors"
    """Calls that ended with a status other than OK, or took at least the slow-query
    threshold."""
    OFF = "off"
    """None."""


@dataclass(frozen=True)
class LogPolicy:
    """When a finished call is logged."""

    mode: RpcLog = RpcLog.ERRORS
    slow_seconds: float = 0.5

    def wants(self, ok: bool, seconds: float) -> bool:
        if self.mode is RpcLog.ERRORS:
            return not ok or seconds >= self.slow_seconds
        return self.mode is RpcLog.ALL


class CodeCounts:
    """Calls of one method that ended with one status code: a histogram of their durations."""

    __slots__ = ("buckets", "seconds")

    def __init__(self) -> None:
        self.buckets = [0] * (len(DURATION_BOUNDS) + 1)
        """Calls per bucket (not cumulative); the last is over the highest bound."""
        self.seconds = 0.0
        """Their durations summed."""


class MethodCalls:
    """What is known about one RPC method's calls: the latency window and counts by code."""

    __slots__ = ("_ok", "by_code", "has_workspace", "log_policy", "method", "window")

    def __init__(
        self, method: str, clock: SliceClock, has_workspace: bool, log_policy: LogPolicy
    ) -> None:
        self.method = method
        self.log_policy = log_policy
        self.window = MethodWindow(clock)
        # OK's counts are also kept apart: most calls end OK, and hashing a
        # StatusCode (an Enum: its __hash__ is Python code) costs more than the rest.
        self._ok = CodeCounts()
        self.by_code: dict[grpc.StatusCode, CodeCounts] = {_OK: self._ok}
        self.has_workspace = has_workspace

    def finish(self, code: grpc.StatusCode, started: float, request: Any) -> None:
        """Records a call that started at `started` (perf_counter) and ended now."""
        now = time.perf_counter()
        seconds = now - started
        ok = code is _OK
        self.window.add(seconds, not ok, now)
        if ok:
            counts = self._ok
        else:
            found = self.by_code.get(code)
            counts = self.by_code[code] = found or CodeCounts()
        counts.buckets[bisect.bisect_left(DURATION_BOUNDS, seconds)] += 1
        counts.seconds += seconds
        if self.log_policy.wants(ok, seconds) and rpc_log.isEnabledFor(_INFO):
            status = "OK" if ok else code.name
            milliseconds = seconds * 1000
            extra: dict[str, object] = {
                "method": self.method,
                "status": status,
                "duration_ms": round(milliseconds, 3),
            }
            if self.has_workspace and request is not None:
                # A request that did not decode is a `Malformed`, without the field.
                workspace = getattr(request, "workspace_id", "")
                if workspace:
                    extra["workspace"] = workspace[:_MAX_WORKSPACE_CHARS]
            # Set by the authorization interceptor inside this one, in the same task.
            principal = current_principal.get()
            if principal is not None:
                extra["caller"] = principal.subject
            rpc_log.info("%s %s %.1f ms", self.method, status, milliseconds, extra=extra)


def _failure_code(exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    """The status a call that raised `exc` ends with."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        # gRPC cancels the handler both when the client cancels and when the
        # deadline passes; only the remaining time tells them apart.
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0.01:
            return _DEADLINE_EXCEEDED
        return _CANCELLED
    code = context.code()  # set by context.abort (AbortError)
    return code if code is not None and code is not _OK else _UNKNOWN


def _has_workspace(handler: grpc.RpcMethodHandler[Any, Any]) -> bool:
    """Whether the method takes one request message with a string `workspace_id` field."""
    if handler.request_streaming:
        return False
    # Generated handlers deserialize with `RequestClass.FromString`; the request
    # decoding interceptor (`services/requests.py`) names the class it decodes.
    deserializer = handler.request_deserializer
    message_class = getattr(deserializer, "message_class", None) or getattr(
        deserializer, "__self__", None
    )
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    fields = getattr(descriptor, "fields_by_name", None)
    field = fields.get("workspace_id") if fields is not None else None
    return field is not None and field.type == field.TYPE_STRING


def _coroutine(calls: MethodCalls, behavior: Behavior, unary: bool) -> Behavior:
    method = calls.method

    async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        current_caller.set(method)
        code = _OK
        try:
            response = await behavior(request, context)
        except BaseException as exc:
            code = _failure_code(exc, context)
            raise
        else:
            code = context.code() or _OK  # a handler may set a code without aborting
            return response
        finally:
            calls.finish(code, started, request if unary else None)

    return observed


def _generator(calls: MethodCalls, behavior: Behavior, unary: bool) -> Behavior:
    method = calls.method

    async def observed(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        started = time.perf_counter()
        current_caller.set(method)
        code = _OK
        try:
            async for response in behavior(request, context):
                yield response
        except BaseException as exc:
            code = _failure_code(exc, context)
            raise
        else:
            code = context.code() or _OK
        finally:
            calls.finish(code, started, request if unary else None)

    return observed


class RpcObserver(WrappingInterceptor):
    """The interceptor: wraps each method's handler once, and records every call."""

    def __init__(self, clock: SliceClock, log_policy: LogPolicy) -> None:
        super().__init__()
        self._clock = clock
        self._log_policy = log_policy
        self.methods: dict[str, MethodCalls] = {}
        """Every method called so far, by full method name."""

    def wrap(self, method: str, handler: Handler) -> Any:
        behavior = behavior_of(handler)
        if behavior is None:
            return handler
        calls = self.methods.get(method)
        if calls is None:
            calls = self.methods[method] = MethodCalls(
                method, self._clock, _has_workspace(handler), self._log_policy
            )
        unary = not handler.request_streaming
        if inspect.isasyncgenfunction(behavior):
            observed = _generator(calls, behavior, unary)
        elif inspect.iscoroutinefunction(behavior):
            # Also a streaming handler that writes with context.write() and returns.
            observed = _coroutine(calls, behavior, unary)
        else:
            return handler  # a synchronous handler: this server has none
        return rebuilt(handler, observed)
