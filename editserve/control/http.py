"""The HTTP adapter of the control plane: ``/editserve/v1/*`` routes → `Operations`.

Every route needs ``Authorization: Bearer <token>`` with the role of its operation
(`editserve.control.principals.OPERATION_ROLES`, the same table as gRPC): 401 without a valid
token, 403 with too low a role. A request body is the JSON form (proto3 JSON mapping, field
names as in ``protos/editserve/v1/editserve.proto``) of the gRPC request message of the same
operation, validated by the same code (`editserve.control.validate`); an edit may give
``hparams`` as an object instead of ``hparams_json``. Unknown fields are refused (400), and so
is ``caller``: the audit log records the authenticated principal. Errors are
``{"error": {"type", "message", "code"}}`` with the HTTP status of `editserve.control.errors`
(``code``: the gRPC status name of the same row); a gate rejection adds ``"report"``.

=====================================  ======  ===============================================
route                                  role    body / query → response
=====================================  ======  ===============================================
``POST /editserve/v1/edit``            editor  ``EditRequest`` → the version change (with the
                                               probe report); header ``x-editserve-operation-id``
                                               names its progress events
``POST /editserve/v1/probe``           editor  ``ProbeRequest`` → ``ProbeResponse``
``POST /editserve/v1/trace``           editor  ``TraceRequest`` → ``TraceResponse``
``POST /editserve/v1/rollback``        admin   ``RollbackRequest`` → the version change
``POST /editserve/v1/revert``          admin   ``RevertRequest`` → the version change
``POST /editserve/v1/rebase``          admin   ``RebaseRequest`` → ``{"change", "reverted_version",
                                               "removed_patch", "rebased": [{"original_version",
                                               "old_patch", "new_patch", "metrics_before",
                                               "metrics_after", "changes"}]}``
``POST /editserve/v1/consolidate``     admin   ``ConsolidateRequest`` → ``{"change",
                                               "constituent_versions", "layers": [{"name", "layer",
                                               "n_patches", "n_keys", "penalty_before",
                                               "penalty_after"}], "facts", "held_before",
                                               "held_after"}``
``POST /editserve/v1/import``          admin   ``ImportPatchRequest`` (bytes base64) → change
``POST /editserve/v1/sync``            admin   ``{}`` → ``{"changed", …change}``
``GET  /editserve/v1/status``          viewer  served version, ledger head, counters, sidecar
``GET  /editserve/v1/checksums``       viewer  ``?name=`` (repeatable, ≤ 256, deduplicated)
``GET  /editserve/v1/versions``        viewer  ``?limit=`` → ``ListVersionsResponse``
``GET  /editserve/v1/versions/{n}``    viewer  → ``VersionInfo``
``GET  /editserve/v1/diff``            viewer  ``?a=&b=`` → ``DiffResponse``
``GET  /editserve/v1/export``          viewer  ``?ref=`` or ``?version=`` → ``ExportPatchResponse``
``GET  /editserve/v1/candidates``      viewer  → staged candidates, routed requests per side
``POST /editserve/v1/candidates``      editor  ``StageCandidateRequest`` → the candidate (admin
                                               when its share > 0)
``POST …/candidates/{id}/compare``     editor  ``{"items": [ProbeItem]}`` → head vs candidate
``POST …/candidates/{id}/promote``     admin   → ``{"candidate", "outcome", "version", …}``
``POST …/candidates/{id}/discard``     editor  → ``{"candidate", "outcome", …}``
=====================================  ======  ===============================================

The candidate routes answer plain JSON (numbers as numbers; docs/candidates.md) rather than the
proto JSON mapping of their gRPC replies.

The event stream is gRPC only (``WatchEvents``); HTTP edits publish their progress to it too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request               # module level: FastAPI resolves the endpoints' annotations here

from editserve.control import convert, validate
from editserve.control.errors import RequestTooLarge, status_of
from editserve.control.operations import Operations, operation_id
from editserve.control.principals import Principal, bearer_token
from editserve.errors import EditserveError, InvalidRequestError

log = logging.getLogger(__name__)

PREFIX = "/editserve/v1"
MAX_BODY_BYTES = 96 << 20                  # an import's factors, base64-encoded
OPERATION_HEADER = "x-editserve-operation-id"

Handler = Callable[[Operations, Principal, Any], Awaitable[Any]]


def _no_bool_numbers(data: Any, descriptor: Any, path: str = "") -> None:
    """protobuf's JSON parser reads ``true`` as 1 in a number field (``{"share": true}`` would stage
    to all traffic): refuse a JSON boolean anywhere a number is expected, naming the field."""
    from google.protobuf.descriptor import FieldDescriptor as F

    if not isinstance(data, dict):
        return
    numeric = {F.TYPE_DOUBLE, F.TYPE_FLOAT, F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_INT32, F.TYPE_FIXED64,
               F.TYPE_FIXED32, F.TYPE_UINT32, F.TYPE_SFIXED32, F.TYPE_SFIXED64, F.TYPE_SINT32, F.TYPE_SINT64}
    for key, value in data.items():
        field = descriptor.fields_by_name.get(key) or next(
            (f for f in descriptor.fields if f.json_name == key), None)
        if field is None:
            continue
        values = value if isinstance(value, list) else [value]
        if field.type in numeric and any(isinstance(v, bool) for v in values):
            raise InvalidRequestError(f"{path}{key} must be a number, got {json.dumps(value)}")
        if field.type == F.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry:
            for v in values:
                _no_bool_numbers(v, field.message_type, f"{path}{key}.")


def _message(data: dict[str, Any], cls: Any) -> Any:
    from google.protobuf import json_format

    _no_bool_numbers(data, cls.DESCRIPTOR)
    try:
        return json_format.ParseDict(data, cls())
    except json_format.ParseError as exc:
        raise InvalidRequestError(f"bad {cls.DESCRIPTOR.name}: {exc}".replace("\n", " ")) from None


def _to_json(msg: Any) -> Any:
    from google.protobuf import json_format

    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


async def _plain_body(request: Any) -> dict[str, Any]:
    """The request's JSON object body: bounded in size, and never naming its own caller."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise RequestTooLarge(f"the request body is {length} bytes; the limit is {MAX_BODY_BYTES}")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise RequestTooLarge(f"the request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        body = json.loads(raw or b"{}")
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequestError(f"the request body is not UTF-8 JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    if "caller" in body:
        raise InvalidRequestError("'caller' is not accepted: the audit log records the authenticated token's "
                                  f"principal (got caller={body['caller']!r})")
    return body


async def _body(request: Any, cls: Any) -> Any:
    """The request's body as the proto message `cls` (the JSON form of the gRPC request)."""
    body = await _plain_body(request)
    if "hparams" in body:
        hp = body.pop("hparams")
        if not isinstance(hp, dict):
            raise InvalidRequestError(f"hparams must be an object, got {hp!r}")
        body["hparams_json"] = json.dumps(hp)
    return _message(body, cls)


def _query(request: Any, cls: Any, repeated: tuple[str, ...] = ()) -> Any:
    data: dict[str, Any] = {}
    for key in request.query_params.keys():
        values = request.query_params.getlist(key)
        if key in repeated:
            data[key] = values
        elif len(values) != 1:
            raise InvalidRequestError(f"query parameter {key!r} is given {len(values)} times")
        else:
            data[key] = values[0]
    return _message(data, cls)


def error_response(exc: EditserveError) -> Any:
    from fastapi.responses import JSONResponse

    status = status_of(exc)
    detail: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc), "code": status.grpc}
    report = getattr(exc, "report", None)
    if isinstance(report, dict):                  # ProbeRejected: the gate's report
        detail["report"] = report
    return JSONResponse({"error": detail}, status_code=status.http)


def router() -> Any:
    """The ``/editserve/v1`` routes (the control plane is ``app.state.editserve``)."""
    from fastapi import APIRouter
    from fastapi.responses import JSONResponse

    from editserve.control.gen import pb2

    api = APIRouter(prefix=PREFIX)

    def ops_of(request: Request) -> Operations:
        control = getattr(request.app.state, "editserve", None)
        if control is None:
            from editserve.engine.errors import PluginSetupError

            raise PluginSetupError("the editserve control plane is not running on this server")
        return Operations.of(control)

    def route(method: str, path: str, operation: str, handler: Handler) -> None:
        async def endpoint(request: Request) -> JSONResponse:
            what = f"{request.method} {request.url.path}"
            try:
                ops = ops_of(request)
                who = ops.authenticate(operation, bearer_token(request.headers.get("authorization")), what, "http")
                result = await handler(ops, who, request)
            except EditserveError as exc:
                if status_of(exc).http >= 500:
                    log.warning("%s failed: %s: %s", what, type(exc).__name__, exc)
                return error_response(exc)
            return JSONResponse(result)

        endpoint.__name__ = f"editserve_{operation}"
        api.add_api_route(path, endpoint, methods=[method])

    async def edit(ops: Operations, who: Principal, request: Any) -> Any:
        args = validate.edit_args(await _body(request, pb2.EditRequest), ops.n_layers(), ops.default_method())
        op = operation_id(request.headers.get(OPERATION_HEADER))
        return (await ops.edit(who, args, op)).to_dict()

    async def rollback(ops: Operations, who: Principal, request: Any) -> Any:
        return (await ops.rollback(who, validate.rollback_args(await _body(request, pb2.RollbackRequest)))).to_dict()

    async def revert(ops: Operations, who: Principal, request: Any) -> Any:
        return (await ops.revert(who, validate.revert_args(await _body(request, pb2.RevertRequest)))).to_dict()

    async def rebase(ops: Operations, who: Principal, request: Any) -> Any:
        args = validate.rebase_args(await _body(request, pb2.RebaseRequest))
        op = operation_id(request.headers.get(OPERATION_HEADER))
        return (await ops.rebase(who, args, op)).to_dict()

    async def consolidate(ops: Operations, who: Principal, request: Any) -> Any:
        args = validate.consolidate_args(await _body(request, pb2.ConsolidateRequest))
        op = operation_id(request.headers.get(OPERATION_HEADER))
        return (await ops.consolidate(who, args, op)).to_dict()

    async def import_(ops: Operations, who: Principal, request: Any) -> Any:
        args = validate.import_args(await _body(request, pb2.ImportPatchRequest))
        return (await ops.import_patch(who, args)).to_dict()

    async def sync(ops: Operations, who: Principal, request: Any) -> Any:
        change = await ops.sync(who)
        return {"changed": change is not None, **(change.to_dict() if change else {})}

    async def probe(ops: Operations, who: Principal, request: Any) -> Any:
        msg = await _body(request, pb2.ProbeRequest)
        return _to_json(convert.scores_to_pb(await ops.probe(who, validate.probe_items(msg.items))))

    async def trace(ops: Operations, who: Principal, request: Any) -> Any:
        args = validate.trace_args(await _body(request, pb2.TraceRequest))
        return _to_json(convert.traced_to_pb(await ops.trace(who, args)))

    async def status(ops: Operations, who: Principal, request: Any) -> Any:
        return await ops.status(who)

    async def checksums(ops: Operations, who: Principal, request: Any) -> Any:
        unknown = set(request.query_params.keys()) - {"name"}
        if unknown:
            raise InvalidRequestError(f"unknown query parameter(s) {sorted(unknown)}; only 'name' is accepted")
        names = validate.checksum_names(request.query_params.getlist("name"))
        sums = await ops.checksums(who, names)
        return {n: {str(r): s for r, s in per.items()} for n, per in sums.items()}

    async def versions(ops: Operations, who: Principal, request: Any) -> Any:
        msg = _query(request, pb2.ListVersionsRequest)
        infos, head = await ops.versions(who, validate.list_limit(msg.limit))
        return _to_json(pb2.ListVersionsResponse(versions=[convert.version_to_pb(v, head) for v in infos], head=head))

    async def version(ops: Operations, who: Principal, request: Any) -> Any:
        raw = request.path_params["version"]
        try:
            n = int(raw)
        except ValueError:
            raise InvalidRequestError(f"version {raw!r} must be an integer") from None
        info, head = await ops.version(who, validate.version_number("version", n))
        return _to_json(convert.version_to_pb(info, head))

    async def diff(ops: Operations, who: Principal, request: Any) -> Any:
        msg = _query(request, pb2.DiffRequest)
        a, b = validate.version_number("a", msg.a), validate.version_number("b", msg.b)
        return _to_json(convert.diff_to_pb(await ops.diff(who, a, b)))

    async def export(ops: Operations, who: Principal, request: Any) -> Any:
        ref = validate.export_ref(_query(request, pb2.ExportPatchRequest))
        patch_id, files = await ops.export(who, ref)
        return _to_json(convert.export_to_pb(patch_id, files))

    async def candidates(ops: Operations, who: Principal, request: Any) -> Any:
        return (await ops.candidates(who)).to_dict()

    async def stage(ops: Operations, who: Principal, request: Any) -> Any:
        from editserve.candidates.validate import stage_args

        body = await _plain_body(request)
        edit_body = body.get("edit")
        if isinstance(edit_body, dict) and "hparams" in edit_body:   # as on /edit: an object for hparams_json
            hp = edit_body.pop("hparams")
            if not isinstance(hp, dict):
                raise InvalidRequestError(f"edit.hparams must be an object, got {hp!r}")
            edit_body["hparams_json"] = json.dumps(hp)
        args = stage_args(_message(body, pb2.StageCandidateRequest), ops.n_layers(), ops.default_method())
        return (await ops.stage(who, args, request.headers.get(OPERATION_HEADER))).to_dict()

    async def compare(ops: Operations, who: Principal, request: Any) -> Any:
        from editserve.candidates.validate import compare_args

        body = await _plain_body(request)
        body["candidate"] = request.path_params["cid"]
        cid, items = compare_args(_message(body, pb2.CompareCandidateRequest))
        return (await ops.compare(who, cid, items)).to_dict()

    async def promote(ops: Operations, who: Principal, request: Any) -> Any:
        from editserve.candidates.validate import candidate_id

        return (await ops.promote(who, candidate_id(request.path_params["cid"]))).to_dict()

    async def discard(ops: Operations, who: Principal, request: Any) -> Any:
        from editserve.candidates.validate import candidate_id

        return (await ops.discard(who, candidate_id(request.path_params["cid"]))).to_dict()

    handlers: dict[str, Handler] = {
        "candidates": candidates, "stage": stage, "promote": promote, "discard": discard, "compare": compare,
        "edit": edit, "probe": probe, "trace": trace, "rollback": rollback, "revert": revert, "rebase": rebase,
        "consolidate": consolidate, "import": import_,
        "sync": sync, "status": status, "checksums": checksums, "versions": versions, "version": version,
        "diff": diff, "export": export}
    for method, path, operation in ROUTES:
        route(method, path, operation, handlers[operation])
    return api


# The routes and their operations, for the docs and the tests (method, path, operation).
ROUTES: tuple[tuple[str, str, str], ...] = (
    ("POST", "/edit", "edit"), ("POST", "/probe", "probe"), ("POST", "/trace", "trace"),
    ("POST", "/rollback", "rollback"), ("POST", "/revert", "revert"), ("POST", "/rebase", "rebase"),
    ("POST", "/consolidate", "consolidate"), ("POST", "/import", "import"),
    ("POST", "/sync", "sync"), ("GET", "/status", "status"), ("GET", "/checksums", "checksums"),
    ("GET", "/versions", "versions"), ("GET", "/versions/{version}", "version"), ("GET", "/diff", "diff"),
    ("GET", "/export", "export"),
    ("GET", "/candidates", "candidates"), ("POST", "/candidates", "stage"),
    ("POST", "/candidates/{cid}/promote", "promote"), ("POST", "/candidates/{cid}/discard", "discard"),
    ("POST", "/candidates/{cid}/compare", "compare"))
