"""Bearer-token authentication of calls: a grpc.aio channel interceptor that adds the
``authorization`` metadata to every call, also those made through the raw stubs."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any, TypeAlias

import grpc
import grpc.aio

TokenSource: TypeAlias = str | Callable[[], str]
"""A bearer token, or a function returning the current one (called once per call, so a
token refreshed elsewhere is picked up without a new channel)."""

AUTHORIZATION = "authorization"
"""The metadata key the server reads the token from."""


def authorization_value(token: str) -> str:
    """The ``authorization`` metadata value for `token` ("Bearer <token>")."""
    return f"Bearer {token}"


class _Bearer:
    """Adds the token to a call's metadata (the four interceptor kinds share this)."""

    def __init__(self, token: TokenSource) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata()
        for key, value in details.metadata or ():
            metadata.add(key, value)
        if AUTHORIZATION not in metadata:
            token = self._token if isinstance(self._token, str) else self._token()
            metadata.add(AUTHORIZATION, authorization_value(token))
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
        )


# grpc-stubs declares the interceptor classes generic; at run time they are plain classes.
class _UnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _UnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> AsyncIterator[Any] | Any:
        return await continuation(self._details(client_call_details), request)


class _StreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Iterable[Any] | AsyncIterable[Any],
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Iterable[Any] | AsyncIterable[Any],
    ) -> AsyncIterator[Any] | Any:
        return await continuation(self._details(client_call_details), request_iterator)


def bearer_auth(token: TokenSource) -> list[Any]:
    """Interceptors that send ``authorization: Bearer <token>`` on every call of a channel.

    Pass them as the channel's `interceptors`::

        channel = grpc.aio.insecure_channel(target, interceptors=bearer_auth(token))

    Four objects, one per call kind: grpc.aio files each interceptor under the
    first kind it implements only. A call whose own metadata already carries
    ``authorization`` keeps it.
    """
    return [_UnaryUnary(token), _UnaryStream(token), _StreamUnary(token), _StreamStream(token)]
