"""The HTTP side of the engine plugin: the control routes and the served-version header.

The ``/editserve/v1/*`` control routes (authenticated, validated: `editserve.control.http`,
the same operations, roles and limits as gRPC; see docs/security.md) are mounted by
`install_routes`, which imports ``editserve.control`` lazily (``engine`` never imports
``control`` at module import time).

The OpenAI-compatible routes are untouched; a middleware adds to every response of a route
that can produce model output (``/v1/*`` and the rest, except `UNTRACKED_PREFIXES`)
``x-editserve-version`` (the served version when the response started) and, when a swap
completed while the request was in flight (possible in ``keep`` pause mode, where its tokens
may come from both versions), ``x-editserve-version-start`` (the version when it was
admitted); it counts the completion in ``editserve_completions_total{versions="one"|
"spanning"}``. Requests that arrive during a swap are held until it ends (the paused engine
would queue them anyway), so a request's start version is well defined; in ``wait`` mode the
swap first waits for every admitted request to finish, so no request spans a swap. For a
streamed response the header goes out with the first chunk (the version at the start).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from starlette.requests import Request

from editserve.engine.control import VERSION_HEADER, VERSION_START_HEADER

log = logging.getLogger(__name__)

# Routes that produce no model output: not held during swaps, no version header.
UNTRACKED_PREFIXES = ("/editserve/", "/metrics", "/health", "/ping", "/version", "/docs", "/openapi.json",
                      "/redoc", "/load", "/is_sleeping", "/server_info")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class VersionHeaderMiddleware:
    """Pure ASGI middleware (streaming-safe) adding the served-version headers to ``/v1/*``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope.get("type") != "http" or path.startswith(UNTRACKED_PREFIXES):
            await self.app(scope, receive, send)
            return
        control = getattr(getattr(scope.get("app"), "state", None), "editserve", None)
        if control is None:
            await self.app(scope, receive, send)
            return
        start_epoch, start_version = await control.admit()
        try:
            await self._run(control, start_epoch, start_version, scope, receive, send)
        finally:
            control.release()

    async def _run(self, control: Any, start_epoch: int, start_version: int, scope: Scope, receive: Receive,
                   send: Send) -> None:
        candidate = None
        candidates = getattr(control, "candidates", None)
        if candidates is not None:                      # only with --candidates N (docs/candidates.md)
            from editserve.candidates.routing import route, wants_routing

            if wants_routing(candidates, scope):
                receive, candidate = await route(candidates, scope, receive)
                if control.metrics is not None:
                    control.metrics.record_served_by(candidate is not None)

        async def send_with_version(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                epoch, version = control.version_mark()
                headers = list(message.get("headers", []))
                label = str(version) if candidate is None else candidate.label(version)
                headers.append((VERSION_HEADER.encode(), label.encode()))
                if epoch != start_epoch:
                    headers.append((VERSION_START_HEADER.encode(), str(start_version).encode()))
                message["headers"] = headers
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                control.completion_done(spanned=control.version_mark()[0] != start_epoch)
            await send(message)

        await self.app(scope, receive, send_with_version)


READY_PATH = "/editserve/v1/ready"


async def ready(request: Request) -> Any:
    """Readiness for a load balancer, unauthenticated like /health: 200 ``{"ready": true}`` once this
    replica serves the ledger head (after start) and lags it by at most EDITSERVE_MAX_SKEW versions,
    else 503 ``{"ready": false}``. It reveals nothing else (docs/fleet.md)."""
    from fastapi.responses import JSONResponse

    control = getattr(request.app.state, "editserve", None)
    fleet = getattr(control, "fleet", None)
    ok = bool(fleet is not None and fleet.readiness()[0])
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


def install_routes(app: Any) -> None:
    """Add the control routes, the version middleware and a shutdown hook to `app`."""
    from editserve.control.http import router
    from editserve.control.server import GrpcSettings

    GrpcSettings.from_env()                       # refuse an insecure gRPC address before the model loads
    app.add_api_route(READY_PATH, ready, methods=["GET"])
    app.include_router(router())
    app.add_middleware(VersionHeaderMiddleware)
    _chain_shutdown(app)


def _chain_shutdown(app: Any) -> None:
    """Close the control plane (and its sidecar process) when the server's lifespan ends."""
    original = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(inner_app: Any) -> AsyncIterator[Any]:
        async with original(inner_app) as state:
            try:
                yield state
            finally:
                control = getattr(inner_app.state, "editserve", None)
                if control is not None:
                    candidates = getattr(control, "candidates", None)
                    if candidates is not None:          # adapters and their temp files (docs/candidates.md)
                        await candidates.close()
                    await control.close()

    app.router.lifespan_context = lifespan
