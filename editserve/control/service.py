"""The ``editserve.v1.EditService`` servicer: a thin adapter from messages to `Operations`.

Each method validates its message into a typed request (`editserve.control.validate`), calls
the transport-neutral operation (`editserve.control.operations`) with the principal the
interceptor authenticated (`editserve.control.interceptors.CURRENT_PRINCIPAL`) and converts the
result (`editserve.control.convert`). Authentication, roles and error → status mapping happen
in the interceptor.

An Edit's progress events carry an operation id: the one the caller sent in the metadata key
``editserve-operation-id`` (so that it can follow its own edit on a ``WatchEvents`` stream it
opened first), else a random one. Stages, in order: accepted, compute, keys, values, solve,
probe, swap, commit, then committed | dry_run (or a ``rejected`` event); a Rebase's: accepted,
rebase (one per recomputed patch), swap, committed. A ``WatchEvents``
stream starts with one ``watching`` event (id 0, ``details_json`` ``{"after_event": N}``), sent
once the stream receives server-local events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from editserve.control import convert, validate
from editserve.control.events import Event
from editserve.control.gen import pb2, pb2_grpc
from editserve.control.interceptors import current_principal
from editserve.control.operations import Operations, operation_id

OPERATION_KEY = "editserve-operation-id"


def _operation_id(context: Any) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == OPERATION_KEY:
            return operation_id(value if isinstance(value, str) else value.decode("latin-1"))
    return operation_id(None)


class EditService(pb2_grpc.EditServiceServicer):
    def __init__(self, ops: Operations) -> None:
        self.ops = ops

    async def Edit(self, request: Any, context: Any) -> Any:
        args = validate.edit_args(request, self.ops.n_layers(), self.ops.default_method())
        change = await self.ops.edit(current_principal(), args, _operation_id(context))
        gate = (change.probe_report or {}).get("gate")
        return pb2.EditResponse(change=convert.change_to_pb(change, committed=not args.dry_run),
                                report=convert.report_to_pb(gate) if gate else None)

    async def Rollback(self, request: Any, context: Any) -> Any:
        return convert.change_to_pb(await self.ops.rollback(current_principal(), validate.rollback_args(request)))

    async def Revert(self, request: Any, context: Any) -> Any:
        return convert.change_to_pb(await self.ops.revert(current_principal(), validate.revert_args(request)))

    async def Rebase(self, request: Any, context: Any) -> Any:
        args = validate.rebase_args(request)
        return convert.rebase_to_pb(await self.ops.rebase(current_principal(), args, _operation_id(context)))

    async def Consolidate(self, request: Any, context: Any) -> Any:
        args = validate.consolidate_args(request)
        return convert.consolidate_to_pb(await self.ops.consolidate(current_principal(), args, _operation_id(context)))

    async def ImportPatch(self, request: Any, context: Any) -> Any:
        args = validate.import_args(request)
        return convert.change_to_pb(await self.ops.import_patch(current_principal(), args))

    async def ListVersions(self, request: Any, context: Any) -> Any:
        infos, head = await self.ops.versions(current_principal(), validate.list_limit(request.limit))
        return pb2.ListVersionsResponse(versions=[convert.version_to_pb(v, head) for v in infos], head=head)

    async def GetVersion(self, request: Any, context: Any) -> Any:
        info, head = await self.ops.version(current_principal(), validate.version_number("version", request.version))
        return convert.version_to_pb(info, head)

    async def Diff(self, request: Any, context: Any) -> Any:
        a, b = validate.version_number("a", request.a), validate.version_number("b", request.b)
        return convert.diff_to_pb(await self.ops.diff(current_principal(), a, b))

    async def Probe(self, request: Any, context: Any) -> Any:
        return convert.scores_to_pb(await self.ops.probe(current_principal(), validate.probe_items(request.items)))

    async def Trace(self, request: Any, context: Any) -> Any:
        return convert.traced_to_pb(await self.ops.trace(current_principal(), validate.trace_args(request)))

    async def Status(self, request: Any, context: Any) -> Any:
        return convert.status_to_pb(await self.ops.status(current_principal()))

    async def WatchEvents(self, request: Any, context: Any) -> AsyncIterator[Any]:
        since = validate.since_id(request.since_id)
        async for e in self.ops.events(current_principal(), since, bool(request.include_history)):
            yield convert.local_event_to_pb(e) if isinstance(e, Event) else convert.event_to_pb(e)

    async def ExportPatch(self, request: Any, context: Any) -> Any:
        patch_id, files = await self.ops.export(current_principal(), validate.export_ref(request))
        return convert.export_to_pb(patch_id, files)

    # -- candidates (editserve.candidates; docs/candidates.md) ---------------------------------

    async def ListCandidates(self, request: Any, context: Any) -> Any:
        from editserve.candidates.wire import listing_to_pb

        return listing_to_pb(await self.ops.candidates(current_principal()))

    async def StageCandidate(self, request: Any, context: Any) -> Any:
        from editserve.candidates.validate import stage_args
        from editserve.candidates.wire import candidate_to_pb

        args = stage_args(request, self.ops.n_layers(), self.ops.default_method())
        return candidate_to_pb(await self.ops.stage(current_principal(), args, _operation_id(context)))

    async def PromoteCandidate(self, request: Any, context: Any) -> Any:
        from editserve.candidates.validate import candidate_id
        from editserve.candidates.wire import outcome_to_pb

        return outcome_to_pb(await self.ops.promote(current_principal(), candidate_id(request.candidate)))

    async def DiscardCandidate(self, request: Any, context: Any) -> Any:
        from editserve.candidates.validate import candidate_id
        from editserve.candidates.wire import outcome_to_pb

        return outcome_to_pb(await self.ops.discard(current_principal(), candidate_id(request.candidate)))

    async def CompareCandidate(self, request: Any, context: Any) -> Any:
        from editserve.candidates.validate import compare_args
        from editserve.candidates.wire import comparison_to_pb

        cid, items = compare_args(request)
        return comparison_to_pb(await self.ops.compare(current_principal(), cid, items))
