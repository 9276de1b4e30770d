"""Turns a request that does not decode into INVALID_ARGUMENT: a grpc.aio server interceptor.

grpc.aio (1.85) deserializes a unary request before any handler or wrapper of
ours runs, and answers a `DecodeError` there with UNKNOWN ("Unexpected
DecodeError"), a status this service promises never to send. A request-streaming
handler meets the error while reading, where `rpc_errors` would call it INTERNAL.
So every handler this interceptor hands back deserializes with a `RequestDecoder`,
which returns a `Malformed` value instead of raising, and its behaviour aborts the
call with INVALID_ARGUMENT (reason MALFORMED_REQUEST) when it gets one: a unary
request before the handler runs, a request stream at the first such message. The
abort sends the status at once, so whatever the handler does with the exception
afterwards cannot change it.

Install it inside the measuring interceptor, so that one records these calls too.
Handlers are wrapped once per method and reused; per call the cost is one
isinstance check (per message, for request streams and response streams, one
more async generator step).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from raptorflow.data.server.errors import Code, ServiceError
from raptorflow.data.server.handler_wrapping import (
    Behavior,
    Handler,
    WrappingInterceptor,
    behavior_of,
    rebuilt,
)
from raptorflow.data.server.services.status import abort_with

REASON = "MALFORMED_REQUEST"

Context = grpc.aio.ServicerContext[Any, Any]


class Malformed:
    """What a `RequestDecoder` returns for bytes that do not decode, and why (kept for
    debugging; never sent to the caller)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class RequestDecoder:
    """A request deserializer that never raises: bytes that do not decode give `Malformed`."""

    __slots__ = ("_from_string", "message_class")

    def __init__(self, message_class: Any, from_string: Callable[[bytes], Any]) -> None:
        self.message_class = message_class
        """The request message class, when the handler's deserializer is its `FromString`
        (the measuring interceptor reads the message's fields from it); else None."""
        self._from_string = from_string

    def __call__(self, data: bytes) -> Any:
        try:
            return self._from_string(data)
        except Exception as exc:  # DecodeError, or whatever a hand-written one raises
            return Malformed(f"{type(exc).__name__}: {exc}")


def _error(type_name: str) -> ServiceError:
    return ServiceError(
        Code.INVALID_ARGUMENT, REASON, f"the request does not decode as {type_name}"
    )


def _unary(behavior: Behavior, error: ServiceError) -> Behavior:
    async def checked(request: Any, context: Context) -> Any:
        if isinstance(request, Malformed):
            await abort_with(context, error)
        return await behavior(request, context)

    return checked


def _unary_generator(behavior: Behavior, error: ServiceError) -> Behavior:
    async def checked(request: Any, context: Context) -> AsyncIterator[Any]:
        if isinstance(request, Malformed):
            await abort_with(context, error)
        async for response in behavior(request, context):
            yield response

    return checked


async def _checked_requests(
    requests: AsyncIterator[Any], context: Context, error: ServiceError
) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Malformed):
            await abort_with(context, error)
        yield request


def _streaming(behavior: Behavior, error: ServiceError) -> Behavior:
    async def checked(requests: AsyncIterator[Any], context: Context) -> Any:
        return await behavior(_checked_requests(requests, context, error), context)

    return checked


def _streaming_generator(behavior: Behavior, error: ServiceError) -> Behavior:
    async def checked(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        async for response in behavior(_checked_requests(requests, context, error), context):
            yield response

    return checked


class RequestDecoding(WrappingInterceptor):
    """The interceptor: hands back each method's handler with a `RequestDecoder` and a
    behaviour that aborts on `Malformed`, built once per method."""

    def wrap(self, method: str, handler: Handler) -> Any:
        return _wrap(handler)


def _wrap(handler: grpc.RpcMethodHandler[Any, Any]) -> Any:
    deserializer = handler.request_deserializer
    if deserializer is None:
        return handler  # the handler takes raw bytes: nothing can fail to decode
    behavior = behavior_of(handler)
    if behavior is None:
        return handler
    # Generated handlers deserialize with `RequestClass.FromString`.
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    type_name = getattr(descriptor, "full_name", None) or "the method's request message"
    error = _error(type_name)
    generator = inspect.isasyncgenfunction(behavior)
    if not generator and not inspect.iscoroutinefunction(behavior):
        return handler  # a synchronous handler: this server has none
    if handler.request_streaming:
        checked = (_streaming_generator if generator else _streaming)(behavior, error)
    else:
        checked = (_unary_generator if generator else _unary)(behavior, error)
    return rebuilt(handler, checked, RequestDecoder(message_class, deserializer))
