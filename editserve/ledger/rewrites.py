"""The writes that rewrite the active patches of the head rather than append one: a revert (with a
rebase of the later patches, `plan_rebase`), a revert out of a consolidation (`revert_consolidated`)
and a consolidation (`consolidate`), with what they need to find a fact a consolidation took in
(`consolidated_into`, `inactive_patch_error`).

`HistoryRewrites` is a part of `editserve.ledger.ledger.Ledger` (a mixin; it uses the ledger's
``_store`` and ``_objects``, its reads — `head`, `active_ids`, `patch`, `_active_with_origin`,
`_resolve_version` — and its write guards `_refuse_damaged` and `_idempotent_hit`). Each write is
one version appended by one transaction, its blobs and key states durable first; nothing old is
rewritten, so a rollback to the version before restores it exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from editserve.editing.alphaedit import PreservedKeys
from editserve.editing.arch import Layout
from editserve.errors import InvalidRequestError
from editserve.ledger.consolidation import CONSOLIDATED_METHOD, ConsolidationPlan, RemovalPlan
from editserve.ledger.errors import ConsolidationError, RevertError
from editserve.ledger.records import (RebasedPatch, RebaseOutcome, RebasePlan, RebaseStep, RevertResult, json_safe,
                                      request_digest)
from editserve.ledger.store import (ADD, EVENT_CONSOLIDATE, EVENT_REVERT, KIND_CONSOLIDATE, KIND_REVERT, REMOVE,
                                    NewVersion, VersionRecord)
from editserve.patches import Patch

log = logging.getLogger("editserve.ledger.ledger")


class HistoryRewrites:
    """See the module docstring."""

    _store: Any
    _objects: Any

    def _rebase_split(self, rec: VersionRecord, ids: list[str], head: int,
                      removal: RemovalPlan | None) -> tuple[tuple[str, ...], int]:
        """(the active patches a rebase of `rec` keeps as they are, the index in `ids` of the first it
        recomputes) at `head`; refuses what cannot be rebased (`RevertError`, nothing changed)."""
        if removal is None:
            if rec.patch not in ids:
                raise self.inactive_patch_error(rec.version, rec.patch, head)
            idx = ids.index(rec.patch)
            if idx == len(ids) - 1:
                raise RevertError(f"the patch of version {rec.version} ({rec.patch[:12]}) is the last active patch "
                                  f"at version {head}: no later patch to rebase (revert it without rebase)")
            return tuple(ids[:idx]), idx + 1
        if (removal.version, removal.head, removal.removed) != (rec.version, head, rec.patch) or (
                removal.holder not in ids):
            raise RevertError(f"the removal plan was computed for taking version {removal.version} out of "
                              f"{removal.holder[:12]} at head {removal.head}, not version {rec.version} at head "
                              f"{head}; nothing was changed")
        last = max(i for i, d in enumerate(ids) if self.patch(d).method == CONSOLIDATED_METHOD)
        return tuple(d for d in ids[:last + 1] if d != removal.holder), last + 1

    def plan_rebase(self, version: int, rebase: Callable[[RebaseStep], Patch | RebaseOutcome],
                    expected_head: int | None = None, removal: RemovalPlan | None = None) -> RebasePlan:
        """Recompute, with the callable `rebase`, every patch active at `expected_head` (default: the
        head) after the one `version` added, on the new base; nothing is written. Each `RebaseStep`
        carries the preserved-keys states of its old and new contexts (rebuilt from the blocks stored
        per patch, the recomputed ones included). Raises `RevertError` if `version` added no patch,
        its patch is not active at the head, or no patch follows it (nothing to rebase).

        When a consolidation took the patch in, `removal` is that consolidated patch re-solved without
        it (`editserve.ledger.consolidation.plan_fact_removal` at the same head: every other committed
        key keeps its output, which is the consolidation's recompute); the patches after the last
        consolidated one are then recomputed on the new base that holds the re-solved patch in place
        of its holder (there may be none). Consolidated patches themselves are never recomputed."""
        head = self.head() if expected_head is None else self._resolve_version(expected_head)
        rec = self._store.version(self._resolve_version(version))
        if rec.patch is None:
            raise RevertError(f"version {rec.version} ({rec.kind}) added no patch; there is nothing to revert")
        self._refuse_damaged(head)
        chain = self._active_with_origin(head)
        ids = [d for d, _ in chain]
        kept, start = self._rebase_split(rec, ids, head, removal)
        new_context = [self.patch(d) for d in kept]
        keys = self._objects.keys_of(ids)
        new_blocks = [b for d in kept for b in keys[d].blocks]
        if removal is not None:
            new_context.append(removal.patch)
            new_blocks += list(removal.keys.blocks)
        outcomes: list[RebaseOutcome] = []
        rebased: list[RebasedPatch] = []
        for digest, origin in chain[start:]:
            origin_rec = self._store.version(origin)
            old = self.patch(digest)
            if old.method == CONSOLIDATED_METHOD:
                raise RevertError(f"the patch of version {origin} ({digest[:12]}) consolidates earlier patches and "
                                  "cannot be recomputed on a new base; roll back to a version before the "
                                  f"consolidation (version {origin_rec.parent}) and revert there, or revert "
                                  "without rebase")
            # What was below the old patch in the version that added it (for a patch a rebase
            # added, the kept and earlier recomputed patches of that version, not its parent's).
            at_origin = list(self.active_ids(origin))
            below = at_origin[:at_origin.index(digest)]
            old_context = tuple(self.patch(d) for d in below)
            old_keys = self._objects.keys_of(below)
            old_preserved = PreservedKeys(tuple(b for d in below for b in old_keys[d].blocks))
            step = RebaseStep(version=origin, old_patch=old, old_context=old_context,
                              new_context=tuple(new_context), old_probe_report=self._first_report(digest, origin_rec),
                              old_preserved=old_preserved, new_preserved=PreservedKeys(tuple(new_blocks)))
            outcome = rebase(step)
            if isinstance(outcome, Patch):
                outcome = RebaseOutcome(patch=outcome)
            if not isinstance(outcome, RebaseOutcome):
                raise RevertError(f"the rebase callable returned {type(outcome).__name__}, not a Patch or RebaseOutcome")
            self._objects.check(outcome.patch)
            own = outcome.keys.for_patch(outcome.patch.digest) if outcome.keys is not None else PreservedKeys()
            outcome = RebaseOutcome(patch=outcome.patch, metrics_before=dict(outcome.metrics_before),
                                    metrics_after=dict(outcome.metrics_after), keys=own if own.blocks else None)
            before = outcome.metrics_before or dict(origin_rec.probe_report or {})
            rebased.append(RebasedPatch(original_version=origin, old_patch=digest, new_patch=outcome.patch.digest,
                                        metrics_before=json_safe(before, "metrics_before"),
                                        metrics_after=json_safe(outcome.metrics_after, "metrics_after")))
            new_context.append(outcome.patch)
            new_blocks += list(own.blocks)
            outcomes.append(outcome)
        plan = RebasePlan(version=rec.version, head=head, removed_patch=rec.patch, kept=kept,
                          replaced=tuple(ids[start:]), outcomes=tuple(outcomes), rebased=tuple(rebased),
                          removal=removal)
        if len(set(plan.final)) != len(plan.final):
            raise RevertError("rebasing produced a patch identical to one already active; nothing was changed")
        return plan

    def _consolidation_path(self, digest: str, version: int) -> list[VersionRecord]:
        """The consolidations that took patch `digest` in, from the one that removed it to the one whose
        patch is active at `version`; [] when no active consolidation holds it. Follows the chain's
        operations: the version that removed a patch, if a consolidation, added the patch holding it."""
        active = {d for d, _ in self._active_with_origin(version)}
        removed_by = {d: v for v, op, d in self._store.chain_ops(version) if op == REMOVE}
        path: list[VersionRecord] = []
        leaf = digest
        while digest not in active and digest in removed_by:
            rec = self._store.version(removed_by[digest])
            if rec.patch is None or not (rec.kind == KIND_CONSOLIDATE or (
                    rec.kind == KIND_REVERT and (rec.details.get("consolidation") or {}).get("old_patch") == digest
                    and rec.details.get("removed_patch") != leaf)):
                return []           # reverted (plainly, or taken out of its consolidation)
            path.append(rec)
            digest = rec.patch
        return path if digest in active else []

    def consolidated_into(self, digest: str, version: int | None = None) -> int | None:
        """The version that added the consolidated patch active at `version` (default: the head)
        that holds patch `digest` among its constituents, directly or through an earlier
        consolidation it took in; None when no active consolidation holds it (one read of the
        chain's operations and one version record per consolidation followed)."""
        path = self._consolidation_path(digest, self._resolve_version(version))
        return path[-1].version if path else None

    def inactive_patch_error(self, version: int, digest: str, head: int) -> RevertError:
        """The refusal for reverting `version`, whose patch `digest` is not active at `head`: when a
        consolidation holds it, the error names that version and the two ways to revert the fact —
        roll back to the last version where the patch itself was active (before the first
        consolidation that took it in), or revert the consolidation active now."""
        msg = f"the patch of version {version} ({digest[:12]}) is not active at version {head}"
        path = self._consolidation_path(digest, head)
        if path:
            holder, first = path[-1].version, path[0]
            through = f" (through version {first.version})" if first.version != holder else ""
            msg += (f": version {holder} consolidated it with other patches into one{through}; to undo this fact "
                    f"alone, take it out of the consolidation (a served revert does; locally `editserve ledger "
                    f"revert {version} --from-consolidation`), or roll back to version {first.parent} (before it "
                    f"was consolidated) and revert version {version} there, or revert version {holder} to remove "
                    "every fact it holds")
        return RevertError(msg)

    def _first_report(self, digest: str, rec: VersionRecord) -> dict[str, Any] | None:
        """The probe report of the commit a patch descends from: a patch that an earlier rebase
        recomputed has none of its own, so follow ``details["rebased"]`` back to the original."""
        seen = set()
        while rec.probe_report is None and rec.kind == KIND_REVERT and rec.version not in seen:
            seen.add(rec.version)
            entry = next((r for r in rec.details.get("rebased", []) if r.get("new_patch") == digest), None)
            if entry is None:
                break
            digest, rec = entry["old_patch"], self._store.version(int(entry["original_version"]))
        return rec.probe_report

    def revert(self, version: int, caller: str = "local",
               rebase: Callable[[RebaseStep], Patch | RebaseOutcome] | RebasePlan | None = None,
               expected_head: int | None = None, idempotency_key: str | None = None,
               probe_report: dict[str, Any] | None = None) -> RevertResult:
        """Create a new version equal to the head without the patch that `version` added.

        With `rebase`, every patch active after it is recomputed in order (`plan_rebase`, by the
        callable, which receives a `RebaseStep` and returns the new `Patch` or a `RebaseOutcome`
        with metrics), or `rebase` is a `RebasePlan` computed earlier at the same head; the new
        version holds the recomputed patches (and their preserved-keys blocks) in place of the old
        ones. The head must still be `expected_head` (default: the head when called) when the
        version is written. A repeated `idempotency_key` returns the first call's result.
        """
        head = self.head() if expected_head is None else self._resolve_version(expected_head)
        rec = self._store.version(self._resolve_version(version))
        if rec.patch is None:
            raise RevertError(f"version {rec.version} ({rec.kind}) added no patch; there is nothing to revert")
        request = request_digest(KIND_REVERT, str(rec.version), "rebase" if rebase is not None else "plain")
        hit = self._idempotent_hit(idempotency_key, request)
        if hit is not None:
            done = self._store.version(hit)
            rebased = tuple(RebasedPatch(**{k: r[k] for k in ("original_version", "old_patch", "new_patch",
                                                              "metrics_before", "metrics_after")})
                            for r in done.details.get("rebased", []))
            return RevertResult(version=hit, reverted_version=rec.version, removed_patch=rec.patch,
                                rebased=rebased, created=False)
        self._refuse_damaged(head)
        ids = list(self.active_ids(head))
        plan: RebasePlan | None = None
        if isinstance(rebase, RebasePlan):
            plan = rebase
            kept, start = self._rebase_split(rec, ids, head, plan.removal)
            if (plan.version, plan.head, plan.removed_patch, plan.kept, plan.replaced) != (
                    rec.version, head, rec.patch, kept, tuple(ids[start:])):
                raise RevertError(f"the rebase plan was computed for reverting version {plan.version} at head "
                                  f"{plan.head}, not version {rec.version} at head {head}; nothing was changed")
        elif rec.patch not in ids:
            raise self.inactive_patch_error(rec.version, rec.patch, head)
        elif rebase is not None:
            plan = self.plan_rebase(rec.version, rebase, expected_head=head)
        removal = plan.removal if plan is not None else None
        if removal is not None:
            # the consolidated patch that held it, re-solved without it, takes its place
            self._objects.check(removal.patch)
            if removal.keys.blocks and {b.tag for b in removal.keys.blocks} != {removal.patch.digest}:
                raise RevertError("the removal plan's preserved-keys blocks are not tagged with its patch")
            ops: list[tuple[str, str]] = [(REMOVE, removal.holder), (ADD, removal.patch.digest)]
        else:
            ops = [(REMOVE, rec.patch)]
        new_patches = ([removal.patch] if removal is not None else []) + (list(plan.patches) if plan else [])
        rebased = list(plan.rebased) if plan is not None else []
        if plan is not None:
            ops += [(REMOVE, d) for d in plan.replaced]
            ops += [(ADD, p.digest) for p in plan.patches]
        bases = self._objects.bases_for(new_patches, None, Layout.OUT_IN)
        records = [self._objects.write_patch(p) for p in new_patches]
        key_states = {o.patch.digest: o.keys for o in plan.outcomes} if plan is not None else {}
        states = self._objects.write_keys(key_states)
        if removal is not None:
            states += self._write_removal_keys(removal)
        if states:
            self._store.add_patch_states(states)
        details: dict[str, Any] = {"reverted": rec.version, "removed_patch": rec.patch,
                                   "rebased": [r.to_dict() for r in rebased]}
        if plan is not None:
            details["mode"] = "rebase"
        if removal is not None:
            details["consolidation"] = removal.details()["consolidation"]
        new = NewVersion(parent=head, kind=KIND_REVERT, patch=removal.patch.digest if removal is not None else None,
                         ops=tuple(ops), caller=caller,
                         probe_report=None if probe_report is None else json_safe(probe_report, "probe_report"),
                         idempotency_key=idempotency_key, request_digest=request, details=details,
                         event_kind=EVENT_REVERT, event_details=details)
        number, created = self._store.append_version(new, head, records, bases)
        for p in new_patches:
            self._objects.remember(p)
        log.info("version %d: reverted version %d (patch %s)%s by %s", number, rec.version, rec.patch[:12],
                 f", rebased {len(rebased)} later patch(es)" if plan is not None else "", caller)
        return RevertResult(version=number, reverted_version=rec.version, removed_patch=rec.patch,
                            rebased=tuple(rebased), created=created)

    def _append_replacement(self, patch: Patch, keys: PreservedKeys, head: int, kind: str, event_kind: str,
                            ops: tuple[tuple[str, str], ...], details: dict[str, Any], caller: str,
                            probe_report: dict[str, Any] | None, idempotency_key: str | None,
                            request: str, key_parts: tuple[str, ...] = ()) -> tuple[int, bool]:
        """One version on `head` that adds `patch` (with its preserved-keys blocks) by `ops` (a
        consolidation, a revert out of one): blobs and key state durable first, then the version.
        `key_parts`: the patches whose blocks, in order, `keys` are (a consolidation's constituents),
        stored as a reference to them instead of a copy (checked first: nothing is written if `keys`
        are not exactly their blocks)."""
        states = (self._objects.write_keys_by_reference(patch.digest, keys, key_parts) if key_parts
                  else self._objects.write_keys({patch.digest: keys}))
        bases = self._objects.bases_for([patch], None, Layout.OUT_IN)
        record = self._objects.write_patch(patch)
        if states:
            self._store.add_patch_states(states)
        new = NewVersion(parent=head, kind=kind, patch=patch.digest, ops=ops, caller=caller,
                         probe_report=None if probe_report is None else json_safe(probe_report, "probe_report"),
                         idempotency_key=idempotency_key, request_digest=request, details=details,
                         event_kind=event_kind, event_details=details)
        number, created = self._store.append_version(new, head, [record], bases)
        self._objects.remember(patch)
        return number, created

    def _write_removal_keys(self, removal: RemovalPlan) -> list[Any]:
        """The key state of a consolidated patch re-solved without a fact: a reference to the
        committed patches whose blocks it keeps (`RemovalPlan.key_parts`; checked to be exactly
        them, else `ConsolidationError` and nothing written), or a copy for a plan without them."""
        if removal.key_parts:
            return self._objects.write_keys_by_reference(removal.patch.digest, removal.keys, removal.key_parts)
        return self._objects.write_keys({removal.patch.digest: removal.keys})

    def revert_consolidated(self, plan: RemovalPlan, caller: str = "local", idempotency_key: str | None = None,
                            probe_report: dict[str, Any] | None = None) -> RevertResult:
        """Write `plan` (`editserve.ledger.consolidation.plan_fact_removal`) as one revert version on
        top of `plan.head`: the consolidated patch that holds the reverted version's patch removed,
        the same patch re-solved without that patch's facts added (with its preserved keys). Raises
        `LedgerConflict` if the head moved, `RevertError` if the holder is no longer active there. A
        repeated `idempotency_key` returns the first call's result; nothing old is rewritten, so a
        rollback to `plan.head` restores it exactly."""
        if not isinstance(plan, RemovalPlan):
            raise InvalidRequestError(f"expected a RemovalPlan, got {type(plan).__name__}")
        self._objects.check(plan.patch)
        digest = plan.patch.digest
        request = request_digest(KIND_REVERT, str(plan.version), "consolidated")
        hit = self._idempotent_hit(idempotency_key, request)
        if hit is not None:
            return RevertResult(version=hit, reverted_version=plan.version, removed_patch=plan.removed, rebased=(),
                                created=False)
        self._refuse_damaged(plan.head)
        active = set(self.active_ids(plan.head))
        if plan.holder not in active:
            raise RevertError(f"the consolidated patch {plan.holder[:12]} of the plan is not active at version "
                              f"{plan.head}; nothing was changed")
        if digest in active:
            raise RevertError(f"patch {digest[:12]} is already active at version {plan.head}")
        if plan.keys.blocks and {b.tag for b in plan.keys.blocks} != {digest}:
            raise RevertError("the plan's preserved-keys blocks are not tagged with its patch")
        number, created = self._append_replacement(
            plan.patch, plan.keys, plan.head, KIND_REVERT, EVENT_REVERT, ((REMOVE, plan.holder), (ADD, digest)),
            plan.details(), caller, probe_report, idempotency_key, request, key_parts=plan.key_parts)
        log.info("version %d: reverted version %d (patch %s) out of consolidated patch %s → %s by %s", number,
                 plan.version, plan.removed[:12], plan.holder[:12], digest[:12], caller)
        return RevertResult(version=number, reverted_version=plan.version, removed_patch=plan.removed, rebased=(),
                            created=created)

    def consolidate(self, plan: ConsolidationPlan, caller: str = "local", idempotency_key: str | None = None,
                    probe_report: dict[str, Any] | None = None) -> int:
        """Write `plan` (`editserve.ledger.consolidation.plan_consolidation`) as one version on top of
        `plan.head`: its constituents removed, its patch added with its preserved-keys blocks. Raises
        `LedgerConflict` if the head moved since the plan, `ConsolidationError` if a constituent is no
        longer active there. A repeated `idempotency_key` returns the first call's version."""
        if not isinstance(plan, ConsolidationPlan):
            raise InvalidRequestError(f"expected a ConsolidationPlan, got {type(plan).__name__}")
        self._objects.check(plan.patch)
        digest = plan.patch.digest
        request = request_digest(KIND_CONSOLIDATE, str(plan.head), digest)
        hit = self._idempotent_hit(idempotency_key, request)
        if hit is not None:
            return hit
        self._refuse_damaged(plan.head)
        active = set(self.active_ids(plan.head))
        gone = [d[:12] for d, _ in plan.constituents + plan.held if d not in active]
        if gone:
            raise ConsolidationError(f"patch(es) {gone} of the plan are not active at version {plan.head}; "
                                     "nothing was changed")
        if digest in active:
            raise ConsolidationError(f"patch {digest[:12]} is already active at version {plan.head}")
        if {b.tag for b in plan.keys.blocks} != {digest}:
            raise ConsolidationError("the plan's preserved-keys blocks are not tagged with its patch")
        ops = tuple((REMOVE, d) for d, _ in plan.constituents) + ((ADD, digest),)
        number, _ = self._append_replacement(plan.patch, plan.keys, plan.head, KIND_CONSOLIDATE, EVENT_CONSOLIDATE, ops,
                                             plan.details(), caller, probe_report, idempotency_key, request,
                                             key_parts=tuple(d for d, _ in plan.constituents))
        log.info("version %d: consolidated %d patches into %s by %s", number, len(plan.constituents), digest[:12],
                 caller)
        return number
