"""The ``editserve.v1.EditService`` servicer: translates messages to `ControlPlane` calls.

Authentication, roles and error → status mapping happen in `editserve.control.interceptors`;
validation in `editserve.control.validate`. Server-local events (rejections, edit progress)
go through `EventHub` to ``WatchEvents`` together with the ledger's audit log.

An Edit's progress events carry an operation id: the one the caller sent in the metadata key
``editserve-operation-id`` (so that it can follow its own edit on a ``WatchEvents`` stream it
opened first), else a random one. Stages, in order: accepted, compute, keys, values, solve,
probe, swap, commit, then committed | dry_run (or a ``rejected`` event). A ``WatchEvents``
stream starts with one ``watching`` event (id 0, ``details_json`` ``{"after_event": N}``), sent
once the stream receives server-local events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from editserve.control import auth, convert, validate
from editserve.control.errors import ProbeRejected
from editserve.control.gen import pb2, pb2_grpc
from editserve.control.probe import DEFAULT_THRESHOLDS, LOOSEST_THRESHOLDS
from editserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

EVENT_POLL_S = 0.25
MAX_EXPORT_BYTES = 64 << 20
OPERATION_KEY = "editserve-operation-id"
OPERATION_RE = validate.re.compile(r"[A-Za-z0-9._:-]{1,64}")


class EventHub:
    """Fan-out of server-local events to the open WatchEvents streams (bounded queues)."""

    def __init__(self, queue_size: int = 1000) -> None:
        self._queues: set[asyncio.Queue[Any]] = set()
        self._queue_size = queue_size

    def subscribe(self) -> asyncio.Queue[Any]:
        q: asyncio.Queue[Any] = asyncio.Queue(self._queue_size)
        self._queues.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Any]) -> None:
        self._queues.discard(q)

    def publish(self, event: Any) -> None:
        for q in list(self._queues):
            if q.full():
                q.get_nowait()                  # a slow watcher loses its oldest local event
            q.put_nowait(event)


def _caller() -> str:
    principal = auth.CURRENT_PRINCIPAL.get()
    if principal is None:
        raise InvalidRequestError("no authenticated caller for this call")
    return principal.caller


def _operation_id(context: Any) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == OPERATION_KEY:
            if not isinstance(value, str) or not OPERATION_RE.fullmatch(value):
                raise InvalidRequestError(f"metadata {OPERATION_KEY} {value!r} must be 1-64 characters of "
                                          "[A-Za-z0-9._:-]")
            return value
    return uuid.uuid4().hex[:12]


class EditService(pb2_grpc.EditServiceServicer):
    def __init__(self, control: Any, hub: EventHub | None = None) -> None:
        self.control = control
        self.hub = hub or EventHub()

    def _n_layers(self) -> int | None:
        m = getattr(self.control, "metrics", None)
        return int(m.n_layers) if m is not None and getattr(m, "n_layers", None) else None

    def _progress(self, op: str, caller: str, stage: str, progress: float, message: str = "",
                  version: int = -1) -> None:
        self.hub.publish(pb2.Event(kind="progress", operation_id=op, caller=caller, ts=time.time(),
                                   progress=progress, message=f"{stage}: {message}" if message else stage,
                                   version=version, from_version=-1))

    async def Edit(self, request: Any, context: Any) -> Any:
        args = validate.edit_args(request, self._n_layers())
        caller = _caller()
        op = _operation_id(context)
        loop, loop_thread = asyncio.get_running_loop(), threading.get_ident()

        def progress(stage: str, fraction: float, message: str) -> None:
            if threading.get_ident() == loop_thread:          # in order with the events published here
                self._progress(op, caller, stage, fraction, message)
            else:                                             # from the thread waiting on the sidecar
                loop.call_soon_threadsafe(self._progress, op, caller, stage, fraction, message)

        self._progress(op, caller, "accepted", 0.0, f"{len(args.requests)} fact(s), method {args.method}")
        try:
            change = await self.control.edit(
                list(args.requests), method=args.method, layers=args.layers, expected_head=args.expected_head,
                caller=caller, idempotency_key=args.idempotency_key, gate=args.gate, dry_run=args.dry_run,
                progress=progress)
        except ProbeRejected as exc:
            self.hub.publish(pb2.Event(kind="rejected", operation_id=op, caller=caller, ts=time.time(),
                                       message=str(exc), details_json=json.dumps(exc.report, default=str),
                                       version=-1, from_version=-1))
            raise
        gate = (change.probe_report or {}).get("gate")
        self._progress(op, caller, "dry_run" if args.dry_run else "committed", 1.0, version=change.version)
        return pb2.EditResponse(change=convert.change_to_pb(change, committed=not args.dry_run),
                                report=convert.report_to_pb(gate) if gate else None)

    async def Rollback(self, request: Any, context: Any) -> Any:
        version = validate.version_number("version", request.version)
        expected = request.expected_head if request.HasField("expected_head") else None
        change = await self.control.rollback(version, expected_head=expected, caller=_caller())
        return convert.change_to_pb(change)

    async def Revert(self, request: Any, context: Any) -> Any:
        version = validate.version_number("version", request.version)
        expected = request.expected_head if request.HasField("expected_head") else None
        key = request.idempotency_key or None
        if key is not None and not validate.KEY_RE.fullmatch(key):
            raise InvalidRequestError(f"idempotency_key {key!r} must be characters of [A-Za-z0-9._:-]")
        change = await self.control.revert(version, caller=_caller(), expected_head=expected, idempotency_key=key)
        return convert.change_to_pb(change)

    async def ListVersions(self, request: Any, context: Any) -> Any:
        ledger = self.control.ledger
        infos = await asyncio.to_thread(ledger.versions)
        head = await asyncio.to_thread(ledger.head)
        if request.limit:
            infos = infos[-int(request.limit):]
        return pb2.ListVersionsResponse(versions=[convert.version_to_pb(v, head) for v in infos], head=head)

    async def GetVersion(self, request: Any, context: Any) -> Any:
        version = validate.version_number("version", request.version)
        ledger = self.control.ledger
        info = await asyncio.to_thread(ledger.version, version)
        return convert.version_to_pb(info, await asyncio.to_thread(ledger.head))

    async def Diff(self, request: Any, context: Any) -> Any:
        a = validate.version_number("a", request.a)
        b = validate.version_number("b", request.b)
        d = await asyncio.to_thread(self.control.ledger.diff, a, b)
        return convert.diff_to_pb(d)

    async def Probe(self, request: Any, context: Any) -> Any:
        items = validate.probe_items(request.items)
        scored = await self.control.score(items)
        scores = []
        for r in scored.rows:
            s = pb2.ProbeScore(prompt=r["prompt"], target=r["target"], target_logprob=r["target_logprob"],
                               other=r["other"], top_token=r["top_token"])
            if r["other_logprob"] is not None:
                s.other_logprob = r["other_logprob"]
            scores.append(s)
        return pb2.ProbeResponse(version=scored.version, scores=scores)

    async def Trace(self, request: Any, context: Any) -> Any:
        a = validate.trace_args(request)
        traced = await self.control.trace(a.prompt, a.subject, target=a.target, kind=a.kind, samples=a.samples,
                                          seed=a.seed, window=a.window, noise_scale=a.noise_scale)
        r = traced.result
        return pb2.TraceResponse(version=traced.version, result_json=json.dumps(r), png=traced.png,
                                 p_clean=r["p_clean"], p_corrupted=r["p_corrupted"],
                                 top_mlp_layers=[int(x) for x in r["top_mlp_layers"]], seconds=r["seconds"])

    async def Status(self, request: Any, context: Any) -> Any:
        st = await self.control.status()
        return pb2.StatusResponse(
            model=str(self.control.settings.model or ""), family=st.get("family") or "",
            served_version=st["served_version"] if st["served_version"] is not None else -1,
            ledger_head=st["ledger_head"] if st["ledger_head"] is not None else -1,
            sidecar_in_sync=bool(st["sidecar"]["in_sync"]), sidecar_alive=bool(st["sidecar"]["alive"]),
            active_patches=len(await asyncio.to_thread(self.control.ledger.active_ids, st["served_version"]))
            if st["served_version"] is not None else 0,
            tensor_parallel_size=int(st["tensor_parallel_size"]), swaps_ok=st["swaps_ok"],
            swaps_failed=st["swaps_failed"], parity_failures=st["parity_failures"], degraded=st["degraded"] or "",
            threshold_bounds=pb2.ThresholdBounds(defaults=convert.thresholds_to_pb(DEFAULT_THRESHOLDS),
                                                 loosest=convert.thresholds_to_pb(LOOSEST_THRESHOLDS)),
            ledger_root=st.get("ledger_root") or "")

    async def WatchEvents(self, request: Any, context: Any) -> AsyncIterator[Any]:
        if request.since_id < 0:
            raise InvalidRequestError(f"since_id must be >= 0, got {request.since_id}")
        ledger = self.control.ledger
        local = self.hub.subscribe()
        try:
            if request.since_id == 0 and not request.include_history:
                existing = await asyncio.to_thread(ledger.events, 0)
                last = existing[-1].id if existing else 0
            else:
                last = int(request.since_id)
            yield pb2.Event(id=0, kind="watching", ts=time.time(), version=-1, from_version=-1,
                            message=f"ledger events after #{last} and this server's events from now on",
                            details_json=json.dumps({"after_event": last}))
            while True:
                for e in await asyncio.to_thread(ledger.events, last):
                    last = max(last, e.id)
                    yield convert.event_to_pb(e)
                try:
                    yield await asyncio.wait_for(local.get(), EVENT_POLL_S)
                    while not local.empty():
                        yield local.get_nowait()
                except asyncio.TimeoutError:
                    continue
        finally:
            self.hub.unsubscribe(local)

    async def ExportPatch(self, request: Any, context: Any) -> Any:
        ledger = self.control.ledger
        if request.ref:
            ref: str | int = request.ref
            if not validate.re.fullmatch(r"[0-9a-f]{4,64}", request.ref):
                raise InvalidRequestError(f"ref {request.ref!r} must be a patch digest or a prefix of >= 4 hex digits")
        else:
            ref = validate.version_number("version", request.version)
        with tempfile.TemporaryDirectory(prefix="editserve-export-") as tmp:
            out = await asyncio.to_thread(ledger.export_patch, ref, Path(tmp) / "patch")
            manifest = (out / "manifest.json").read_bytes()
            factors = (out / "patch.safetensors").read_bytes()
        patch_id = json.loads(manifest).get("digest", "")
        return pb2.ExportPatchResponse(patch_id=patch_id, manifest_json=manifest, factors=factors)

    async def ImportPatch(self, request: Any, context: Any) -> Any:
        from editserve.ledger.errors import ImportRejected

        if not request.manifest_json or not request.factors:
            raise ImportRejected("an import needs both manifest_json and factors (got "
                                 f"{len(request.manifest_json)} and {len(request.factors)} bytes)")
        try:
            manifest = json.loads(request.manifest_json.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ImportRejected(f"manifest_json is not UTF-8 JSON: {exc}") from None
        if not isinstance(manifest, dict):
            raise ImportRejected(f"manifest_json must be a JSON object, got {type(manifest).__name__}")
        expected = request.expected_head if request.HasField("expected_head") else None
        if expected is not None and expected < 0:
            raise InvalidRequestError(f"expected_head must be a version number >= 0, got {expected}")
        key = request.idempotency_key or None
        if key is not None and not validate.KEY_RE.fullmatch(key):
            raise InvalidRequestError(f"idempotency_key {key!r} must be characters of [A-Za-z0-9._:-]")
        with tempfile.TemporaryDirectory(prefix="editserve-import-") as tmp:
            src = Path(tmp)
            (src / "manifest.json").write_bytes(request.manifest_json)
            (src / "patch.safetensors").write_bytes(request.factors)
            change = await self.control.import_patch(src, caller=_caller(), expected_head=expected,
                                                     idempotency_key=key)
        return convert.change_to_pb(change)
