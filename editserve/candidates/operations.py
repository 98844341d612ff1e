"""The candidate operations of the control plane: stage, list, compare, promote, discard.

`Operations` (editserve/control/operations.py) checks the role and delegates here; these
functions audit (logger ``editserve.audit``) like the others. Both transports (HTTP routes,
gRPC RPCs) reach these through `Operations`.

Roles (docs/candidates.md): ``candidates`` viewer; ``stage`` editor (with a traffic share > 0:
admin, since default traffic then sees it; staging an edit also needs what the edit needs:
its dry run goes through `Operations.edit` and the probe gate); ``compare`` editor (it runs
prompts on the engine); ``discard`` editor (commits nothing); ``promote`` admin (commits a
version without a second gate run: the patch passed the gate when it was computed, like ``import``;
a ``to_version`` candidate is promoted by the rollback operation, with the rollback's role).

Promote and discard are idempotent: a repeated call returns the first call's outcome
(remembered for the process's life, bounded to `MAX_OUTCOMES`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editserve.candidates.compare import CompareItem, Comparison, gate_items
from editserve.candidates.compare import compare as compare_sides
from editserve.candidates.staging import (
    Candidate,
    CandidateConflict,
    Candidates,
    CandidatesDisabled,
    CandidateNotFound,
)
from editserve.patches import Patch

if TYPE_CHECKING:
    from editserve.ledger.transfer import PatchFiles

log = logging.getLogger(__name__)
audit = logging.getLogger("editserve.audit")

MAX_OUTCOMES = 256


@dataclass(frozen=True)
class Outcome:
    """What became of a candidate: ``promoted`` (with the version, committed as an ``import`` of
    its patch or as a ``rollback`` to its ``to_version``) or ``discarded``."""

    candidate: str
    outcome: str
    version: int | None
    patch_id: str
    committed_as: str = ""         # promoted: import | rollback

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "outcome": self.outcome, "version": self.version,
                "patch_id": self.patch_id, "committed_as": self.committed_as}


# (version, expected head) → the rollback's VersionChange: how a to_version candidate is promoted.
Rollback = Callable[[int, int], Awaitable[Any]]


def candidates_of(engine: Any) -> Candidates:
    cands = getattr(engine, "candidates", None)
    if cands is None:
        raise CandidatesDisabled("candidates are disabled on this server: start it with `editserve serve "
                                 "--candidates N` (or EDITSERVE_CANDIDATES=N)")
    return cands


def _outcomes(engine: Any) -> "OrderedDict[str, Outcome]":
    cands = candidates_of(engine)
    book = getattr(cands, "outcomes", None)
    if book is None:
        book = cands.outcomes = OrderedDict()
    return book


def _remember(engine: Any, out: Outcome) -> Outcome:
    book = _outcomes(engine)
    book[out.candidate] = out
    while len(book) > MAX_OUTCOMES:
        book.popitem(last=False)
    return out


def _report_of(engine: Any, digest: str) -> dict[str, Any] | None:
    """The probe report recorded with the (first) ledger version that added patch `digest`."""
    for info in engine.ledger.versions():
        if info.patch_id == digest and info.probe_report:
            return dict(info.probe_report)
    return None


def write_export(patch: Patch, model_fingerprint: str, dest: Path, keys: Any = None) -> Path:
    """A patch export directory (`editserve.ledger.transfer` format) of a patch the ledger does
    not hold (a dry run's), with its preserved-keys blocks (`keys`, a PreservedKeys) when it has
    some: what promote imports, so the promoted version holds the same key state as an edit."""
    from safetensors.torch import save

    from editserve.ledger.blobs import sha256_bytes
    from editserve.ledger.keystate import state_bytes
    from editserve.ledger.transfer import EXPORT_FORMAT, KEYS_FILE, MANIFEST_FILE, PATCH_FILE

    files = {PATCH_FILE: save(patch.tensors())}
    if keys is not None and keys.blocks:
        files[KEYS_FILE] = state_bytes(keys)
    manifest = patch.manifest()
    manifest["export"] = {"format": EXPORT_FORMAT, "kind": "patch", "model_fingerprint": model_fingerprint,
                          "source_version": None, "exported_at": time.time(),
                          "files": {n: {"sha256": sha256_bytes(d), "size": len(d)} for n, d in files.items()}}
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (dest / name).write_bytes(data)
    (dest / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return dest


def difference_probes(engine: Any, removed: Sequence[Patch], added: Sequence[Patch]) -> tuple[CompareItem, ...]:
    """The gate's prompts of the facts a ``to_version`` candidate removes (then those it adds back)."""
    items: list[CompareItem] = []
    for patch in (*removed, *added):
        items.extend(gate_items(patch.requests, _report_of(engine, patch.digest)))
    return tuple(items)


async def stage(engine: Any, caller: str, ref: str | int | None, export: PatchFiles | None,
                share: float | None, computed: Any = None, to_version: int | None = None) -> Candidate:
    """Stage a ledger patch (`ref`: digest prefix or the version that added it), an uploaded
    patch export (`export`: manifest JSON, factors, preserved keys), a dry run's patch (`computed`: the dry
    run's `VersionChange`, carrying the patch and its probe report), or an earlier version's
    difference from the head (`to_version`: the candidate serves that version) as a candidate."""
    from editserve.ledger.transfer import export_patch, read_patch_export

    cands = candidates_of(engine)
    if to_version is not None:
        cand = await cands.stage_to_version(to_version, caller, share,
                                            probes=lambda removed, added: difference_probes(engine, removed, added))
        audit.info("audit: stage of version %d (difference from head %d: %d patch(es) removed, %d added) by %s → "
                   "candidate %s (%s, rank %d, share %.3f)", to_version, cand.staged_at_head, len(cand.removed),
                   len(cand.added), caller, cand.id, cand.model, cand.rank, cand.share)
        return cand
    with tempfile.TemporaryDirectory(prefix="editserve-stage-") as tmp:
        src = Path(tmp) / "patch"
        report: dict[str, Any] | None = None
        if computed is not None:
            source = "dry_run"
            await asyncio.to_thread(write_export, computed.patch, engine.ledger.model_fingerprint, src,
                                    getattr(computed, "keys", None))
            report = computed.probe_report
        elif export is not None:
            source = "upload"
            await asyncio.to_thread(export.write, src)
        else:
            source = "ledger"
            await asyncio.to_thread(export_patch, engine.ledger, ref, src)
        patch = await asyncio.to_thread(read_patch_export, engine.ledger, src)
        if report is None and source != "upload":
            report = await asyncio.to_thread(_report_of, engine, patch.digest)
        cand = await cands.stage(patch, src, caller, share, source=source,
                                 probes=gate_items(patch.requests, report))
    audit.info("audit: stage of patch %s (%s) by %s → candidate %s (%s, rank %d, share %.3f, head %d)",
               cand.patch_id[:12], source, caller, cand.id, cand.model, cand.rank, cand.share, cand.staged_at_head)
    return cand


def outcome_of(engine: Any, cid: str) -> Outcome | None:
    """The remembered outcome of a promoted or discarded candidate (None: not promoted/discarded)."""
    return _outcomes(engine).get(cid)


async def promote(engine: Any, caller: str, cid: str, rollback: Rollback | None = None) -> Outcome:
    """Commit the candidate's patch as the next version (the normal import swap), or, for a
    ``to_version`` candidate, roll back to that version (`rollback`, default the engine's), then
    unload it. Its traffic goes to the head from the start, and the requests already on its
    adapter are drained before the swap (none of them sees the change twice)."""
    book = _outcomes(engine)
    if cid in book:
        return book[cid]
    cands = candidates_of(engine)
    cand = cands.get(cid)
    await cands.check_applies(cand)
    cands.begin_leaving(cid, promotion=True)
    try:
        await cands.drain(cid)
        head = await cands.check_applies(cand)          # the head may have moved while draining
        if cand.to_version is not None:
            if rollback is None:
                change = await engine.rollback(cand.to_version, expected_head=head, caller=caller)
            else:
                change = await rollback(cand.to_version, head)
            committed_as = "rollback"
        else:
            change = await engine.import_patch(cands.patch_dir(cid), caller=caller, expected_head=head,
                                               idempotency_key=f"promote-candidate-{cid}-{cand.patch_id[:16]}")
            committed_as = "import"
    except BaseException:
        cands.end_leaving(cid)
        raise
    await cands.unload(cid)
    out = _remember(engine, Outcome(candidate=cid, outcome="promoted", version=int(change.version),
                                    patch_id=cand.patch_id, committed_as=committed_as))
    if cand.to_version is not None:
        audit.info("audit: promote of candidate %s (to_version %d, staged at head %d) by %s → rollback to version %d",
                   cid, cand.to_version, cand.staged_at_head, caller, out.version)
    else:
        audit.info("audit: promote of candidate %s (patch %s) by %s → version %d", cid, cand.patch_id[:12], caller,
                   out.version)
    return out


async def discard(engine: Any, caller: str, cid: str) -> Outcome:
    """Unload the candidate (after draining its requests); commits nothing."""
    book = _outcomes(engine)
    if cid in book:
        return book[cid]
    cands = candidates_of(engine)
    cand = cands.get(cid)
    if cands.promoting(cid):
        raise CandidateConflict(f"candidate {cid} is being promoted; it cannot be discarded now")
    await cands.unload(cid)
    out = _remember(engine, Outcome(candidate=cid, outcome="discarded", version=None, patch_id=cand.patch_id))
    audit.info("audit: discard of candidate %s (%s) by %s", cid,
               f"patch {cand.patch_id[:12]}" if cand.to_version is None else f"to_version {cand.to_version}", caller)
    return out


async def compare(engine: Any, caller: str, cid: str, items: Sequence[CompareItem]) -> Comparison:
    """The candidate's gate prompts and `items`, scored on the head and on the candidate."""
    result = await compare_sides(candidates_of(engine), cid, items)
    audit.info("audit: compare of candidate %s by %s (%d prompts)", cid, caller, len(result.rows))
    return result


@dataclass(frozen=True)
class Listing:
    """The staged candidates with the requests routed to each, the served version, the requests
    left on the head while candidates were staged, and the bounds."""

    entries: tuple[tuple[Candidate, int], ...]
    served_version: int
    head_requests: int
    max_candidates: int
    max_rank: int

    def to_dict(self) -> dict[str, Any]:
        return {"candidates": [{**c.to_dict(), "routed_requests": n} for c, n in self.entries],
                "served_version": self.served_version, "head_requests": self.head_requests,
                "max_candidates": self.max_candidates, "max_rank": self.max_rank}


def listing(engine: Any) -> Listing:
    cands = candidates_of(engine)
    return Listing(entries=tuple((c, cands.routed(c.id)) for c in cands.list()),
                   served_version=int(engine.version_mark()[1]), head_requests=cands.head_routed,
                   max_candidates=cands.settings.max_candidates, max_rank=cands.settings.max_rank)


__all__ = ["CandidateNotFound", "Listing", "Outcome", "Rollback", "compare", "difference_probes", "discard", "listing",
           "outcome_of", "promote", "stage", "write_export"]
