"""The candidate operations of the control plane: stage, list, compare, promote, discard.

`Operations` (editserve/control/operations.py) checks the role and delegates here; these
functions audit (logger ``editserve.audit``) and publish on the event hub like the others.

Roles (docs/candidates.md): ``candidates`` viewer; ``stage`` editor (with a traffic share > 0:
admin, since default traffic then sees it); ``compare`` editor (it scores on the sidecar);
``discard`` editor (commits nothing); ``promote`` admin (commits a version without the gate:
the patch passed the gate when it was first computed, like ``import``).

Promote and discard are idempotent: a repeated call returns the first call's outcome
(remembered for the process's life, bounded to `MAX_OUTCOMES`).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editserve.candidates.staging import Candidate, Candidates, CandidatesDisabled, CandidateNotFound

log = logging.getLogger(__name__)
audit = logging.getLogger("editserve.audit")

MAX_OUTCOMES = 256


@dataclass(frozen=True)
class Outcome:
    """What became of a candidate: ``promoted`` (with the version) or ``discarded``."""

    candidate: str
    outcome: str
    version: int | None
    patch_id: str

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "outcome": self.outcome, "version": self.version,
                "patch_id": self.patch_id}


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


async def stage(engine: Any, caller: str, ref: str | int | None, export: tuple[bytes, bytes] | None,
                share: float | None) -> Candidate:
    """Stage a ledger patch (`ref`: digest prefix or the version that added it) or an uploaded
    patch export (`export`: manifest JSON, factors) as a candidate."""
    from editserve.ledger.transfer import read_patch_export

    cands = candidates_of(engine)
    with tempfile.TemporaryDirectory(prefix="editserve-stage-") as tmp:
        src = Path(tmp) / "patch"
        if export is not None:
            src.mkdir()
            (src / "manifest.json").write_bytes(export[0])
            (src / "patch.safetensors").write_bytes(export[1])
        else:
            await asyncio.to_thread(engine.ledger.export_patch, ref, src)
        patch = await asyncio.to_thread(read_patch_export, engine.ledger, src)
        cand = await cands.stage(patch, src, caller, share)
    audit.info("audit: stage of patch %s by %s → candidate %s (%s, rank %d, share %.3f, head %d)",
               cand.patch_id[:12], caller, cand.id, cand.model, cand.rank, cand.share, cand.staged_at_head)
    return cand


async def promote(engine: Any, caller: str, cid: str) -> Outcome:
    """Commit the candidate's patch as the next version (the normal import swap), then unload it."""
    book = _outcomes(engine)
    if cid in book:
        return book[cid]
    cands = candidates_of(engine)
    cand = cands.get(cid)
    head = await cands.check_applies(cand)
    cands.begin_promotion(cid)                    # share routing stops; its model name now means the head
    try:
        change = await engine.import_patch(cands.patch_dir(cid), caller=caller, expected_head=head,
                                           idempotency_key=f"promote-candidate-{cid}-{cand.patch_id[:16]}")
    except BaseException:
        cands.end_promotion(cid)
        raise
    await cands.unload(cid)
    out = _remember(engine, Outcome(candidate=cid, outcome="promoted", version=int(change.version),
                                    patch_id=cand.patch_id))
    audit.info("audit: promote of candidate %s (patch %s) by %s → version %d", cid, cand.patch_id[:12], caller,
               out.version)
    return out


async def discard(engine: Any, caller: str, cid: str) -> Outcome:
    """Unload the candidate; commits nothing."""
    book = _outcomes(engine)
    if cid in book:
        return book[cid]
    cands = candidates_of(engine)
    cand = cands.get(cid)
    await cands.unload(cid)
    out = _remember(engine, Outcome(candidate=cid, outcome="discarded", version=None, patch_id=cand.patch_id))
    audit.info("audit: discard of candidate %s (patch %s) by %s", cid, cand.patch_id[:12], caller)
    return out


def listing(engine: Any) -> list[dict[str, Any]]:
    return [c.to_dict() for c in candidates_of(engine).list()]


__all__ = ["CandidateNotFound", "Outcome", "discard", "listing", "promote", "stage"]
