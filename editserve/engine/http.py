"""HTTP surface of the control plane on vLLM's API server, and the served-version header.

Routes (JSON; errors are ``{"error": {"type", "message"}}`` with a 4xx/5xx status):

=====================================  ===============================================================
``POST /editserve/v1/edit``            ``{"requests": [{"prompt", "subject", "target_new",
                                       "target_true"?}], "method"?, "layers"?, "hparams"?,
                                       "expected_head"?, "caller"?, "idempotency_key"?,
                                       "probes"?: [{"prompt", "target", "other"?, "kind"?}],
                                       "gate"?: true | {"min_efficacy"?, "min_paraphrase"?,
                                       "max_ns_drop"?, "max_canary_kl"?}, "dry_run"?}``
``POST /editserve/v1/rollback``        ``{"version", "expected_head"?, "caller"?}``
``POST /editserve/v1/sync``            serve the ledger head if it moved outside this server
``GET  /editserve/v1/status``          served version, ledger head, swap counters, workers, sidecar
``GET  /editserve/v1/checksums``       live per-rank checksums (``?name=`` repeatable)
=====================================  ===============================================================

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

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from editserve.editing.requests import EditRequest
from editserve.engine.control import VERSION_HEADER, VERSION_START_HEADER
from editserve.errors import EditserveError, InvalidRequestError

log = logging.getLogger(__name__)

PREFIX = "/editserve/v1"
# Routes that produce no model output: not held during swaps, no version header.
UNTRACKED_PREFIXES = ("/editserve/", "/metrics", "/health", "/ping", "/version", "/docs", "/openapi.json",
                      "/redoc", "/load", "/is_sleeping", "/server_info")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def status_for(exc: EditserveError) -> int:
    """HTTP status of an editserve error."""
    from editserve.engine.errors import EngineStateUnknown, ParityError, SidecarError, SwapFailed
    from editserve.ledger import LedgerConflict, PatchNotFound, VersionNotFound

    from editserve.control.errors import ProbeRejected

    if isinstance(exc, LedgerConflict):
        return 409
    if isinstance(exc, ProbeRejected):
        return 422
    if isinstance(exc, (VersionNotFound, PatchNotFound)):
        return 404
    if isinstance(exc, (SwapFailed, EngineStateUnknown, SidecarError)):
        return 503
    if isinstance(exc, ParityError):
        return 500
    if isinstance(exc, ValueError):
        return 400
    return 500


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

        async def send_with_version(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                epoch, version = control.version_mark()
                headers = list(message.get("headers", []))
                headers.append((VERSION_HEADER.encode(), str(version).encode()))
                if epoch != start_epoch:
                    headers.append((VERSION_START_HEADER.encode(), str(start_version).encode()))
                message["headers"] = headers
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                control.completion_done(spanned=control.version_mark()[0] != start_epoch)
            await send(message)

        await self.app(scope, receive, send_with_version)


def _requests_from(body: dict[str, Any]) -> list[EditRequest]:
    raw = body.get("requests")
    if raw is None and "prompt" in body:
        raw = [{k: body[k] for k in ("prompt", "subject", "target_new", "target_true") if k in body}]
    if not isinstance(raw, list) or not raw:
        raise InvalidRequestError("the body needs 'requests': a non-empty list of {prompt, subject, target_new}")
    out = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict):
            raise InvalidRequestError(f"requests[{i}] must be an object, got {r!r}")
        unknown = set(r) - {"prompt", "subject", "target_new", "target_true"}
        if unknown:
            raise InvalidRequestError(f"requests[{i}] has unknown field(s) {sorted(unknown)}")
        try:
            out.append(EditRequest(**r))
        except TypeError as exc:
            raise InvalidRequestError(f"requests[{i}] is incomplete: {exc}") from exc
    return out


def _gate_from(value: Any) -> Any:
    """The probe gate asked for by an edit body: absent/false → none, true → the default
    thresholds, an object → those thresholds (the rest default; none looser than the server's
    bounds, `editserve.control.probe.LOOSEST_THRESHOLDS`)."""
    from dataclasses import fields

    from editserve.control.probe import DEFAULT_THRESHOLDS, LOOSEST_THRESHOLDS, GateConfig, Thresholds

    if value is None or value is False:
        return None
    if value is True:
        return GateConfig()
    if not isinstance(value, dict):
        raise InvalidRequestError(f"gate must be true or an object of thresholds, got {value!r}")
    known = {f.name for f in fields(Thresholds)}
    unknown = set(value) - known
    if unknown:
        raise InvalidRequestError(f"gate has unknown threshold(s) {sorted(unknown)}; known: {sorted(known)}")
    thresholds = Thresholds(**{**{k: getattr(DEFAULT_THRESHOLDS, k) for k in known}, **value})
    thresholds.within(LOOSEST_THRESHOLDS)
    return GateConfig(thresholds=thresholds)


def _optional_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{key} must be an integer, got {value!r}")
    return value


def install_routes(app: Any) -> None:
    """Add the routes, the middleware and a shutdown hook for the control plane to `app`."""
    from editserve.engine.sidecar import ProbePrompt

    router = APIRouter(prefix=PREFIX)

    def control_of(request: Request) -> Any:
        control = getattr(request.app.state, "editserve", None)
        if control is None:
            from editserve.engine.errors import PluginSetupError

            raise PluginSetupError("the editserve control plane is not running on this server")
        return control

    def error(exc: EditserveError) -> JSONResponse:
        detail: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
        report = getattr(exc, "report", None)
        if isinstance(report, dict):                  # ProbeRejected: the gate's report
            detail["report"] = report
        return JSONResponse({"error": detail}, status_code=status_for(exc))

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError as exc:
            raise InvalidRequestError(f"the request body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise InvalidRequestError(f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    @router.post("/edit")
    async def edit(request: Request) -> JSONResponse:
        try:
            control = control_of(request)
            body = await body_of(request)
            probes = []
            for i, p in enumerate(body.get("probes") or []):
                if not isinstance(p, dict) or not {"prompt", "target"} <= set(p):
                    raise InvalidRequestError(f"probes[{i}] must be an object with 'prompt' and 'target'")
                probes.append(ProbePrompt(prompt=str(p["prompt"]), target=str(p["target"]),
                                          other=p.get("other"), kind=str(p.get("kind", "paraphrase"))))
            layers = body.get("layers")
            if layers is not None and (not isinstance(layers, list)
                                       or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
                raise InvalidRequestError(f"layers must be a list of integers, got {layers!r}")
            hparams = body.get("hparams")
            if hparams is not None and not isinstance(hparams, dict):
                raise InvalidRequestError(f"hparams must be an object, got {hparams!r}")
            dry_run = body.get("dry_run", False)
            if not isinstance(dry_run, bool):
                raise InvalidRequestError(f"dry_run must be true or false, got {dry_run!r}")
            change = await control.edit(
                _requests_from(body), method=str(body.get("method", "rome")), layers=layers, hparams=hparams,
                expected_head=_optional_int(body, "expected_head"), caller=body.get("caller") or "http",
                idempotency_key=body.get("idempotency_key"), probes=probes, gate=_gate_from(body.get("gate")),
                dry_run=dry_run)
        except EditserveError as exc:
            log.warning("edit refused or failed: %s: %s", type(exc).__name__, exc)
            return error(exc)
        return JSONResponse(change.to_dict())

    @router.post("/rollback")
    async def rollback(request: Request) -> JSONResponse:
        try:
            control = control_of(request)
            body = await body_of(request)
            version = _optional_int(body, "version")
            if version is None:
                raise InvalidRequestError("the body needs 'version'")
            change = await control.rollback(version, expected_head=_optional_int(body, "expected_head"),
                                            caller=body.get("caller") or "http")
        except EditserveError as exc:
            log.warning("rollback refused or failed: %s: %s", type(exc).__name__, exc)
            return error(exc)
        return JSONResponse(change.to_dict())

    @router.post("/sync")
    async def sync(request: Request) -> JSONResponse:
        try:
            change = await control_of(request).follow()
        except EditserveError as exc:
            return error(exc)
        return JSONResponse({"changed": change is not None, **(change.to_dict() if change else {})})

    @router.get("/status")
    async def status(request: Request) -> JSONResponse:
        try:
            return JSONResponse(await control_of(request).status())
        except EditserveError as exc:
            return error(exc)

    @router.get("/checksums")
    async def checksums(request: Request) -> JSONResponse:
        try:
            names = request.query_params.getlist("name") or None
            sums = await control_of(request).engine_checksums(names)
        except EditserveError as exc:
            return error(exc)
        return JSONResponse({n: {str(r): s for r, s in per.items()} for n, per in sums.items()})

    app.include_router(router)
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
                    await control.close()

    app.router.lifespan_context = lifespan
