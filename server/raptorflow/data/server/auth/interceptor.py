"""The one place calls are authenticated and authorized: a grpc.aio server interceptor.

Every call of a method outside `policy.OPEN_SERVICES` must carry
``authorization: Bearer <JWT>``; the token is verified (`tokens.TokenVerifier`),
then the method's `policy.Rule` is checked: a role first, then every workspace
the request names, on each message of a request stream too. Refusals end the
call before the servicer runs: UNAUTHENTICATED for a missing or bad token,
PERMISSION_DENIED for a role or workspace the token lacks, RESOURCE_EXHAUSTED
for a caller over its limit of open streams.

A response stream (a memory sync follower, a job watch, a backup) is ended with
UNAUTHENTICATED (reason TOKEN_EXPIRED) when its token expires: the caller
resumes with a fresh token from where it was (a sync stream from its resume
token).

Install it inside the measuring interceptor (so refusals are measured too) and
outside the request-decoding one: a request that does not decode gets
UNAUTHENTICATED without a token and INVALID_ARGUMENT with one.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from raptorflow.data.server.auth.policy import (
    RULES,
    Rule,
    check_role,
    check_workspaces,
    is_open,
    permission_denied,
)
from raptorflow.data.server.auth.principal import DEVELOPMENT, Principal, current_principal
from raptorflow.data.server.auth.tokens import TokenVerifier, unauthenticated
from raptorflow.data.server.config import Settings
from raptorflow.data.server.errors import Code, ServiceError
from raptorflow.data.server.handler_wrapping import (
    Behavior,
    Handler,
    WrappingInterceptor,
    behavior_of,
    rebuilt,
)
from raptorflow.data.server.services.requests import Malformed
from raptorflow.data.server.services.status import abort_with

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

AUTHORIZATION = "authorization"


def _token_expired() -> ServiceError:
    return unauthenticated("TOKEN_EXPIRED", "the bearer token expired while the stream was open")


class Authorization(WrappingInterceptor):
    """Authenticates and authorizes every call (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        if settings.dev_disable_auth:
            self._verifier: TokenVerifier | None = None
        else:
            self._verifier = TokenVerifier(settings)
        self._max_streams = settings.max_streams_per_caller
        self._open_streams: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self._verifier is not None

    def open_streams(self, subject: str) -> int:
        """The streaming calls `subject` has open now."""
        return self._open_streams.get(subject, 0)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        if is_open(handler_call_details.method):
            return await continuation(handler_call_details)
        return await super().intercept_service(continuation, handler_call_details)

    def wrap(self, method: str, handler: Handler) -> Any:
        behavior = behavior_of(handler)
        if behavior is None:
            return handler
        rule = RULES.get(method)
        if rule is None:
            # A method without a rule is closed to everyone until it gets one.
            return rebuilt(handler, _refuse_all(handler, method))
        generator = inspect.isasyncgenfunction(behavior)
        if handler.request_streaming:
            wrapper = (self._streaming_generator if generator else self._streaming)(
                behavior, rule, method
            )
        else:
            wrapper = (self._unary_generator if generator else self._unary)(behavior, rule, method)
        return rebuilt(handler, wrapper)

    # -- per call ----------------------------------------------------------------

    def authenticate(self, context: Context) -> Principal:
        """The caller's principal from its bearer token; UNAUTHENTICATED without a valid one."""
        if self._verifier is None:
            return DEVELOPMENT
        header: str | bytes | None = None
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION:
                if header is not None:
                    raise unauthenticated(
                        "TOKEN_MALFORMED", "the call carries more than one authorization header"
                    )
                header = value
        if header is None:
            raise unauthenticated(
                "TOKEN_MISSING", "the call needs an 'authorization: Bearer <token>' header"
            )
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthenticated(
                "TOKEN_MALFORMED", "the authorization header is not 'Bearer <token>'"
            )
        try:
            return self._verifier.verify(token)
        except ServiceError:
            raise
        except Exception:  # a token PyJWT or our claim checks did not foresee
            log.warning("a bearer token failed verification unexpectedly", exc_info=True)
            raise unauthenticated("TOKEN_MALFORMED", "the bearer token does not decode") from None

    def _admit(self, context: Context, rule: Rule, method: str, request: Any) -> Principal:
        """The authenticated caller, if its role (and, given a `request`, the workspaces
        it names) are allowed; request streams pass None and check each message later."""
        principal = self.authenticate(context)
        # Before the checks, so the call's log line names who was refused too.
        current_principal.set(principal)
        check_role(principal, rule, method)
        if rule.scope is not None and request is not None and not isinstance(request, Malformed):
            check_workspaces(principal, rule.scope, request)
        return principal

    def _open_stream(self, principal: Principal, context: Context) -> None:
        subject = principal.subject
        count = self._open_streams.get(subject, 0)
        if count >= self._max_streams:
            raise ServiceError(
                Code.RESOURCE_EXHAUSTED,
                "TOO_MANY_STREAMS",
                f"this caller already has {count} streaming calls open (the limit is "
                f"{self._max_streams}); close one first",
            )
        self._open_streams[subject] = count + 1
        context.add_done_callback(
            functools.partial(self._close_stream, subject)  # type: ignore[arg-type]
        )

    def _close_stream(self, subject: str, _context: object) -> None:
        count = self._open_streams.get(subject, 0) - 1
        if count > 0:
            self._open_streams[subject] = count
        else:
            self._open_streams.pop(subject, None)

    # -- wrappers by kind ----------------------------------------------------------

    def _unary(self, behavior: Behavior, rule: Rule, method: str) -> Behavior:
        async def guarded(request: Any, context: Context) -> Any:
            try:
                self._admit(context, rule, method, request)
            except ServiceError as error:
                await abort_with(context, error)
            return await behavior(request, context)

        return guarded

    def _unary_generator(self, behavior: Behavior, rule: Rule, method: str) -> Behavior:
        async def guarded(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                principal = self._admit(context, rule, method, request)
                self._open_stream(principal, context)
            except ServiceError as error:
                await abort_with(context, error)
            async for response in _until_expiry(behavior(request, context), principal, context):
                yield response

        return guarded

    def _checked_requests(
        self, requests: AsyncIterator[Any], principal: Principal, rule: Rule, context: Context
    ) -> AsyncIterator[Any]:
        scope = rule.scope
        path = rule.message_path

        async def checked() -> AsyncIterator[Any]:
            index = 0
            async for request in requests:
                try:
                    if time.time() >= principal.expires_at:
                        raise _token_expired()
                    if scope is not None and not isinstance(request, Malformed):
                        prefix = f"{path}[{index}]" if path else ""
                        check_workspaces(principal, scope, request, prefix)
                except ServiceError as error:
                    await abort_with(context, error)
                index += 1
                yield request

        return checked()

    def _streaming(self, behavior: Behavior, rule: Rule, method: str) -> Behavior:
        async def guarded(requests: AsyncIterator[Any], context: Context) -> Any:
            try:
                principal = self._admit(context, rule, method, None)
                self._open_stream(principal, context)
            except ServiceError as error:
                await abort_with(context, error)
            return await behavior(
                self._checked_requests(requests, principal, rule, context), context
            )

        return guarded

    def _streaming_generator(self, behavior: Behavior, rule: Rule, method: str) -> Behavior:
        async def guarded(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            try:
                principal = self._admit(context, rule, method, None)
                self._open_stream(principal, context)
            except ServiceError as error:
                await abort_with(context, error)
            stream = behavior(self._checked_requests(requests, principal, rule, context), context)
            async for response in _until_expiry(stream, principal, context):
                yield response

        return guarded


async def _until_expiry(
    stream: AsyncIterator[Any], principal: Principal, context: Context
) -> AsyncIterator[Any]:
    """The stream's messages until it ends or the principal's token expires (then the call
    ends UNAUTHENTICATED, reason TOKEN_EXPIRED, and the stream is closed)."""
    if math.isinf(principal.expires_at):
        async for response in stream:
            yield response
        return
    loop = asyncio.get_running_loop()
    expires = loop.time() + (principal.expires_at - time.time())
    expired = False
    try:
        while True:
            try:
                async with asyncio.timeout_at(expires):
                    response = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                expired = True
                break
            yield response
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
    if expired:
        await abort_with(context, _token_expired())


def _refuse_all(handler: Handler, method: str) -> Behavior:
    error = permission_denied("METHOD_NOT_ALLOWED", f"{method} has no access rule")
    if handler.response_streaming:

        async def refuse_stream(_request: Any, context: Context) -> AsyncIterator[Any]:
            await abort_with(context, error)
            yield None  # pragma: no cover - abort raises

        return refuse_stream

    async def refuse(_request: Any, context: Context) -> Any:
        await abort_with(context, error)

    return refuse
