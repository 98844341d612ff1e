"""The server interceptor of the control plane: request decoding, authentication, roles, errors.

For every call of ``editserve.v1.EditService`` it

1. decodes the request itself, so that a malformed message (e.g. a string field that is not
   UTF-8) is answered INVALID_ARGUMENT naming the message type, not INTERNAL;
2. checks the bearer token and the call's role (`editserve.control.auth`): UNAUTHENTICATED /
   PERMISSION_DENIED; the principal is put in `auth.CURRENT_PRINCIPAL` for the audit log;
3. maps editserve errors to status codes (`editserve.control.errors.status_code`) with the
   error's message; a `ProbeRejected` also carries the full report in the trailing metadata
   ``editserve-probe-report-bin`` (a serialised ``ProbeReport``). Unexpected exceptions are
   logged and answered INTERNAL with their type only.

The service methods only translate messages.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from editserve.control import auth
from editserve.control.errors import AuthError, ProbeRejected, status_code
from editserve.errors import EditserveError

log = logging.getLogger(__name__)

REPORT_KEY = "editserve-probe-report-bin"


class _BadMessage:
    def __init__(self, why: str) -> None:
        self.why = why


def _guarded(deserializer: Callable[[bytes], Any] | None, type_name: str) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserializer(data) if deserializer else data
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return _BadMessage(f"the request is not a valid {type_name} (string fields must be UTF-8): {exc}")
    return decode


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    code = status_code(exc)
    if code is grpc.StatusCode.INTERNAL and not isinstance(exc, EditserveError):
        log.error("%s failed unexpectedly", method, exc_info=exc)
        message = f"internal error ({type(exc).__name__}); see the server log"
    else:
        message = str(exc)
        if not isinstance(exc, AuthError):
            log.info("%s refused: %s: %s", method, type(exc).__name__, message)
    if isinstance(exc, ProbeRejected) and exc.report:
        from editserve.control.convert import report_to_pb

        context.set_trailing_metadata(((REPORT_KEY, report_to_pb(exc.report).SerializeToString()),))
    await context.abort(code, message)


class ControlInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: auth.TokenTable, type_names: dict[str, str]) -> None:
        self.tokens = tokens
        self.type_names = type_names             # method name → request message full name

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith(auth.SERVICE_PREFIX):
            return handler
        name = method[len(auth.SERVICE_PREFIX):]
        metadata = details.invocation_metadata
        tokens = self.tokens
        decode = _guarded(handler.request_deserializer, self.type_names.get(name, "request"))

        def check(request: Any) -> auth.Principal:
            principal = auth.authenticate(tokens, method, metadata)
            if isinstance(request, _BadMessage):
                from editserve.errors import InvalidRequestError

                raise InvalidRequestError(request.why)
            return principal

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    token = auth.CURRENT_PRINCIPAL.set(check(request))
                    try:
                        return await inner(request, context)
                    finally:
                        auth.CURRENT_PRINCIPAL.reset(token)
                except Exception as exc:  # every error becomes a status (abort raises its own)
                    if isinstance(exc, grpc.aio.AbortError):
                        raise
                    await _abort_for(exc, context, name)

            return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=decode,
                                                       response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                # No reset of the principal here: a stream the client cancels is closed from another
                # context (the event loop finalises the generator), where a reset would fail; the call
                # runs in its own task, so the value does not outlive it anyway.
                try:
                    auth.CURRENT_PRINCIPAL.set(check(request))
                except Exception as exc:
                    await _abort_for(exc, context, name)
                    return
                items = inner_stream(request, context)
                try:
                    async for item in items:
                        yield item
                except Exception as exc:
                    if isinstance(exc, grpc.aio.AbortError):
                        raise
                    await _abort_for(exc, context, name)
                finally:
                    close = getattr(items, "aclose", None)
                    if close is not None:
                        await close()                # the service's own clean-up (e.g. unsubscribe) runs now

            return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=decode,
                                                        response_serializer=handler.response_serializer)
        return handler
