"""The part every wrapping interceptor shares: find a handler's behaviour, hand back a wrapper.

A grpc.aio interceptor sees only the handler lookup, so one that acts on calls
hands back a new handler around the original behaviour. `WrappingInterceptor`
builds that once per method and reuses it while gRPC returns the same handler;
subclasses say how to wrap (`wrap`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

Behavior = Callable[..., Any]
# grpc-stubs makes the handler generic; at run time it is a plain class.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

_FACTORIES: dict[tuple[bool, bool], Callable[..., Handler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def streaming(handler: Handler) -> tuple[bool, bool]:
    """(request streaming, response streaming)."""
    return bool(handler.request_streaming), bool(handler.response_streaming)


def behavior_of(handler: Handler) -> Behavior | None:
    """The function that serves the handler's calls."""
    behaviors: dict[tuple[bool, bool], Behavior | None] = {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }
    return behaviors[streaming(handler)]


def rebuilt(
    handler: Handler, behavior: Behavior, request_deserializer: Any | None = None
) -> Handler:
    """A handler of the same kind and serializers that calls `behavior` instead."""
    return _FACTORIES[streaming(handler)](
        behavior,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class WrappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Hands back each method's handler wrapped by `wrap`, built once per method."""

    def __init__(self) -> None:
        # By method: the handler gRPC found and the wrapper handed back for it.
        self._handlers: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._handlers.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self.wrap(method, handler)
        self._handlers[method] = (handler, wrapped)
        return wrapped

    def wrap(self, method: str, handler: Handler) -> Any:
        """The handler to hand back for `method` (the same one to leave it alone)."""
        raise NotImplementedError
