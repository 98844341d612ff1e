"""The gRPC server interceptor: request decoding, authentication and roles, error → status.

For every call of ``editserve.v1.EditService`` it

1. decodes the request itself, so that a malformed message (e.g. a string field that is not
   UTF-8) is answered INVALID_ARGUMENT naming the message type, not INTERNAL;
2. authenticates the bearer token and checks the call's role through the shared
   `editserve.control.operations.Operations.authenticate` (the same table as the HTTP routes:
   `editserve.control.principals`); the principal goes to the servicer in `CURRENT_PRINCIPAL`;
3. maps errors to status codes with the one table of `editserve.control.errors`; a
   `ProbeRejected` also carries the full report in the trailing metadata
   ``editserve-probe-report-bin`` (a serialised ``ProbeReport``). Unexpected exceptions are
   logged and answered INTERNAL with their type only.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from editserve.control.auth import SERVICE_PREFIX, metadata_token
from editserve.control.errors import AuthError, ProbeRejected, status_code
from editserve.control.principals import GRPC_OPERATIONS, Principal
from editserve.errors import EditserveError, InvalidRequestError

log = logging.getLogger(__name__)

REPORT_KEY = "editserve-probe-report-bin"

# The authenticated principal of the call being served (set per call task by the interceptor).
CURRENT_PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("editserve_principal",
                                                                                     default=None)


def current_principal() -> Principal:
    principal = CURRENT_PRINCIPAL.get()
    if principal is None:
        raise InvalidRequestError("no authenticated caller for this call")
    return principal


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
    def __init__(self, ops: Any, type_names: dict[str, str]) -> None:
        self.ops = ops                           # editserve.control.operations.Operations
        self.type_names = type_names             # method name → request message full name

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        name = method[len(SERVICE_PREFIX):]
        metadata = details.invocation_metadata
        ops = self.ops
        decode = _guarded(handler.request_deserializer, self.type_names.get(name, "request"))

        def check(request: Any) -> Principal:
            operation = GRPC_OPERATIONS.get(name, name)
            principal = ops.authenticate(operation, metadata_token(metadata), name, "grpc")
            if isinstance(request, _BadMessage):
                raise InvalidRequestError(request.why)
            return principal

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    token = CURRENT_PRINCIPAL.set(check(request))
                    try:
                        return await inner(request, context)
                    finally:
                        CURRENT_PRINCIPAL.reset(token)
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
                    CURRENT_PRINCIPAL.set(check(request))
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
