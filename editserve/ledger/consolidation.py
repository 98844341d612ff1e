"""Consolidation as a ledger operation: the patches committed since the last consolidation replaced
by one least-disturbance patch.

A long ledger's damage to ordinary text grows with the sum of its patches, not with any one of
them (docs/lifelong.md, session 7). `plan_consolidation` takes the *constituents* — the active
patches at a version that carry preserved-keys blocks at every layer they touch (what AlphaEdit,
and since session 5 every method, stores with a commit) and are not consolidated already — and,
per layer, re-solves their summed update S = Σ U Vᵀ with `editserve.editing.consolidate` on every
committed key (theirs and the earlier consolidations'): S P, the same outputs on every committed
key, the least change tr(ΔW A ΔWᵀ) on ordinary keys. Earlier consolidated patches are *held*: left
as they are, which is what re-solving them again would give (`consolidate_increment`; `whole=True`
takes them in and re-solves everything, after the statistics or the ridge changed). The result is
one `Patch`:

- ``method`` "consolidated"; its ``requests`` are the constituents' requests in ledger order (so
  the retention probe, the retention gate and ``ledger show`` still see every committed fact);
  ``hparams`` record the ridge and the constituents' digests;
- one `WeightDelta` per layer the constituents touch, of their summed rank there (at most d_out;
  float32 factors, solved in float64): a consolidation stores what it replaces, not a full-rank
  update per consolidation;
- its preserved-keys blocks are the constituents' blocks, in order, tagged with its digest, so
  the state at the new version has exactly the keys of the state before it.

Active patches without keys at a layer they touch stay as they are (they are neither summed nor
removed); the consolidated update leaves what they do untouched.

`Ledger.consolidate` writes a plan as one version of kind ``consolidate``: the constituents
removed, the new patch added (last in summation order). Nothing is subtracted and nothing old is
rewritten: a rollback to the version before restores that version's weights and keys exactly
(from base copies and checkpoints, like any rollback). A consolidated patch is never recomputed:
a rebase that would have to (an unkeyed patch below one) is refused with the consolidation named
(`Ledger.consolidated_into`, `Ledger.inactive_patch_error`). A plain revert of the consolidation
version removes every fact it holds. Reverting a constituent's version takes its facts out of the
consolidated patch (below); a rebase of it does the same and then recomputes the patches committed
after the last consolidation (`Ledger.plan_rebase(..., removal=)`).

One fact out of a consolidation (`plan_fact_removal`, `check_fact_removal`,
`Ledger.revert_consolidated`): reverting a version whose patch a consolidation took in re-solves
the consolidated patch without that patch's facts — every other committed key (the holder's and
the other active patches') keeps the holder's output on it, the
reverted facts' keys get the layer's output from before (`resolve_without`) — checks that the
reverted facts are gone and the others hold, and writes one revert version that swaps the
consolidated patch for the re-solved one (``hparams["without"]`` lists what was taken out, so
`provenance` still tells which request and key block came from which commit).

`check_consolidation` scores the constituents' facts on a model before and after (the retention
outcome of `editserve.editing.retention.facts_hold`) so that the caller can refuse a plan that
breaks any: the solve keeps each layer's output on the *stored* keys (the mean key of each
request over its prefixes), not on every prefix, so the check is a measurement, not a formality.

Pure ledger logic plus torch; statistics come from the caller (`covariances`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from editserve.editing.alphaedit import KeyBlock, PreservedKeys
from editserve.editing.consolidate import (ConsolidateParams, Consolidated, consolidate_increment, require_statistics,
                                           resolve_without)
from editserve.editing.requests import EditRequest
from editserve.editing.retention import CommittedFact
from editserve.errors import InvalidRequestError
from editserve.ledger.errors import ConsolidationError, RevertError
from editserve.patches import Patch, WeightDelta

log = logging.getLogger(__name__)

CONSOLIDATED_METHOD = "consolidated"
# {layer: C [d_in, d_in]} for the layers asked for (the model's key statistics)
Covariances = Callable[[tuple[int, ...]], Mapping[int, torch.Tensor]]


@dataclass(frozen=True)
class LayerConsolidation:
    """What consolidation did at one weight."""

    name: str
    layer: int
    n_patches: int             # constituents that touch it
    n_keys: int                # committed keys kept there (the new factor's rank is at most this)
    penalty_before: float      # tr(ΔW A ΔWᵀ) of the constituents' sum
    penalty_after: float       # the same for the consolidated update

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "layer": self.layer, "n_patches": self.n_patches, "n_keys": self.n_keys,
                "penalty_before": self.penalty_before, "penalty_after": self.penalty_after}


@dataclass(frozen=True)
class ConsolidationPlan:
    """A consolidation computed at version `head`; nothing is written until `Ledger.consolidate`."""

    head: int
    constituents: tuple[tuple[str, int], ...]      # (patch digest, version that added it), ledger order
    patch: Patch
    keys: PreservedKeys                            # the constituents' blocks, tagged with patch.digest
    layers: tuple[LayerConsolidation, ...]
    params: ConsolidateParams
    held: tuple[tuple[str, int], ...] = ()         # earlier consolidated patches kept as they are (their keys kept)

    def details(self) -> dict[str, Any]:
        """The JSON recorded with the version (and shown by ``ledger show``)."""
        return {"constituents": [{"patch": d, "version": v} for d, v in self.constituents],
                "held": [{"patch": d, "version": v} for d, v in self.held],
                "ridge": self.params.ridge, "layers": [x.to_dict() for x in self.layers],
                "patch": self.patch.digest}


def _own_rows(v: torch.Tensor, width: int, layer: int) -> torch.Tensor:
    """V [d_in, r] cut to the keys' `width` rows: a layer with neuron slots has keys of its own neurons
    only, and a covariance method's factors there have zero rows for the slots (`slots.pad_to_slots`)."""
    if v.shape[0] == width:
        return v
    if v.shape[0] < width or bool(v[width:].any()):
        raise ConsolidationError(f"layer {layer}: factors of {v.shape[0]} rows do not fit keys of width {width} "
                                 "(a patch that writes neuron slots cannot be consolidated; nothing was changed)")
    return v[:width]


def _padded(r: Consolidated, rows: int) -> Consolidated:
    """`r` with V given zero rows up to `rows` (the slot rows cut by `_own_rows`)."""
    if r.v.shape[0] == rows:
        return r
    return replace(r, v=torch.cat([r.v, r.v.new_zeros(rows - r.v.shape[0], r.v.shape[1])]).contiguous())


def _covered(patch: Patch, keys: PreservedKeys) -> bool:
    """Whether `keys` has a block at every layer `patch` touches."""
    have = set(keys.layers)
    return all(d.layer in have for d in patch.deltas)


def consolidatable(ledger: Any, digest: str) -> bool:
    """Whether consolidation can take patch `digest`: it has preserved-keys blocks at every layer
    it touches (AlphaEdit's patches, MEMIT's and ROME's computed with keys; not ROME's without)."""
    keys = ledger.patch_keys(digest)
    return bool(keys.blocks) and _covered(ledger.patch(digest), keys)


def constituents_at(ledger: Any, version: int) -> list[tuple[str, int]]:
    """The active patches at `version` that consolidation can take (`consolidatable`; ledger order)."""
    return [(d, v) for d, v in ledger.active_origins(version) if consolidatable(ledger, d)]


def plan_consolidation(ledger: Any, covariances: Covariances, params: ConsolidateParams = ConsolidateParams(),
                       expected_head: int | None = None, whole: bool = False) -> ConsolidationPlan:
    """Consolidate the patches committed since the last consolidation at `expected_head` (default:
    the head) on every committed key (module docstring); nothing is written. `whole`: take the
    earlier consolidated patches in too and re-solve everything (after the statistics or the ridge
    changed; the new patch then has rank min(N, d_out) again). Raises `ConsolidationError` when
    fewer than two active patches carry keys or none of them is new since the last consolidation."""
    if not isinstance(whole, bool):
        raise InvalidRequestError(f"whole must be a boolean, got {whole!r}")
    if params.across_layers:
        raise ConsolidationError("a ledger consolidation keeps each layer's outputs on the committed keys; "
                                 "across_layers (measured to break committed facts, docs/lifelong.md) is not offered")
    head = ledger.head() if expected_head is None else expected_head
    keyed = constituents_at(ledger, head)
    if len(keyed) < 2:
        raise ConsolidationError(f"version {head} has {len(keyed)} active patch(es) with preserved keys at every "
                                 "layer they touch; consolidation needs at least 2 (nothing was changed)")
    held = [] if whole else [(d, v) for d, v in keyed if ledger.patch(d).method == CONSOLIDATED_METHOD]
    chosen = [x for x in keyed if x not in held]
    if not chosen:
        raise ConsolidationError(f"every active patch with preserved keys at version {head} is consolidated already; "
                                 "nothing was committed since the last consolidation (nothing was changed)")
    patches = [ledger.patch(d) for d, _ in chosen]
    state = PreservedKeys(tuple(b for d, _ in keyed for b in ledger.patch_keys(d).blocks))   # every committed key
    blocks = [b for d, _ in chosen for b in ledger.patch_keys(d).blocks]
    names: dict[int, str] = {}
    factors: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}   # layer → ([U], [V]) of the new patches
    kept: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}   # layer → the held patches' (U, V) (penalties only)
    touching: dict[int, int] = {}
    for p, new in [(p, True) for p in patches] + [(ledger.patch(d), False) for d, _ in held]:
        for d in p.deltas:
            if not new and d.layer not in factors:
                continue                               # a held patch's layer that nothing new touches
            if names.setdefault(d.layer, d.name) != d.name:
                raise ConsolidationError(f"layer {d.layer} is edited through two weights ({names[d.layer]!r} and "
                                         f"{d.name!r}); consolidation takes one weight per layer")
            if new:
                us, vs = factors.setdefault(d.layer, ([], []))
                us.append(d.u)
                vs.append(d.v)
                touching[d.layer] = touching.get(d.layer, 0) + 1
            else:
                kept.setdefault(d.layer, []).append((d.u, d.v))
    layers = tuple(sorted(factors))
    covs = covariances(layers)
    require_statistics(layers, covs)
    result = {}
    for layer in layers:
        width, v = int(covs[layer].shape[0]), torch.cat(factors[layer][1], 1)
        held_uv = [u.double() @ _own_rows(hv, width, layer).double().T for u, hv in kept.get(layer, [])]
        result[layer] = _padded(consolidate_increment(torch.cat(factors[layer][0], 1), _own_rows(v, width, layer),
                                                      state.keys(layer), covs[layer], layer, params,
                                                      held=sum(held_uv) if held_uv else None), v.shape[0])
    first = patches[0]
    patch = Patch(
        deltas=tuple(WeightDelta(name=names[layer], layer=layer, u=r.u, v=r.v) for layer, r in sorted(result.items())),
        requests=tuple(r for p in patches for r in p.requests),
        method=CONSOLIDATED_METHOD,
        hparams={"ridge": params.ridge, "constituents": [d for d, _ in chosen]},
        model_fingerprint=first.model_fingerprint,
        family=first.family,
    )
    own = PreservedKeys(tuple(KeyBlock(patch.digest, b.layer, b.keys) for b in blocks))
    report = tuple(LayerConsolidation(name=names[layer], layer=layer, n_patches=touching[layer], n_keys=r.n_keys,
                                      penalty_before=r.penalty_before, penalty_after=r.penalty_after)
                   for layer, r in sorted(result.items()))
    log.info("consolidation at version %d: %d patches → %s (%d consolidated before kept); %s", head, len(chosen),
             patch.digest[:12], len(held),
             ", ".join(f"layer {x.layer}: {x.n_keys} keys, tr {x.penalty_before:.3g}→{x.penalty_after:.3g}"
                       for x in report))
    return ConsolidationPlan(head=head, constituents=tuple(chosen), patch=patch, keys=own, layers=report,
                             params=params, held=tuple(held))


# Facts of earlier consolidated patches a consolidation's check scores (spread evenly over them); every
# fact of the patches it takes in is scored. Scoring is the check's cost (bench/consolidation_check.py:
# 4.1 s per 100 facts and pass on SmolLM2 on this 2-core CPU), so without a bound every automatic
# consolidation would cost more as the ledger grows.
HELD_CHECK_SAMPLE = 200


@dataclass(frozen=True)
class ConsolidationCheck:
    """The constituents' facts scored with the head's weights and with the consolidated ones."""

    facts: tuple[CommittedFact, ...]   # the facts scored (target_true "": checked greedily)
    held_before: int
    held_after: int
    broken: tuple[str, ...]            # facts that held before and not after (described)
    unscored: int = 0                  # earlier consolidations' facts left out of the sample (HELD_CHECK_SAMPLE)

    def to_dict(self) -> dict[str, Any]:
        return {"n_facts": len(self.facts), "held_before": self.held_before, "held_after": self.held_after,
                "broken": list(self.broken), "unscored": self.unscored}

    def probe_report(self) -> dict[str, Any]:
        """The report stored with the consolidation version: this check, and one efficacy row per
        fact with a known replaced object (what the retention probe reads a request's replaced
        object from when the request itself names none, `editserve.editing.retention.with_replaced_objects`)."""
        rows = [{"kind": "efficacy", "prompt": f.prompt, "target_new": f.target_new, "target_true": f.target_true}
                for f in self.facts if f.target_true]
        return {"consolidation": self.to_dict(), "gate": {"rows": rows}}


def _scored_before_after(model: torch.nn.Module, tok: Any, facts: list[CommittedFact], before_set: list[Patch],
                         after_set: list[Patch], found: list[Patch]) -> tuple[list, list]:
    """`facts_hold` with `before_set` merged, then with `after_set`; the model holds `found` again
    afterwards, whatever happened (bases restored: nothing subtracted)."""
    from editserve.editing.retention import facts_hold
    from editserve.patches import hold_patches

    try:
        hold_patches(model, before_set)
        before = facts_hold(model, tok, facts)
        hold_patches(model, after_set)
        after = facts_hold(model, tok, facts)
    finally:
        hold_patches(model, found)
    return before, after


def _evenly(items: list[Any], n: int) -> list[Any]:
    """`n` of `items` spread evenly over them, in order (all of them when there are no more than `n`)."""
    if len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]


def check_consolidation(model: torch.nn.Module, tok: Any, ledger: Any, plan: ConsolidationPlan,
                        held_sample: int | None = HELD_CHECK_SAMPLE) -> ConsolidationCheck:
    """Score the committed facts of the plan — every constituent's, and of the kept consolidations'
    at most `held_sample` spread evenly over them (None: all; their patches do not change, and the
    re-solve keeps its outputs on their keys, so this bounds the check's cost at any ledger size)
    — (against its replaced object, from its request or else from the
    committing version's gate rows; where none is known, whether the model answers its new target
    greedily: `editserve.editing.retention.facts_hold`) on `model` with the patches active at `plan.head`, then with
    the consolidated set. `model` holds no patch or exactly the head's active patches (a sidecar
    serving the head: nothing is rebuilt for "before"), and holds the same afterwards (bases
    restored: nothing subtracted), so the check costs two merges of the touched weights."""
    from editserve.editing.retention import with_replaced_objects
    from editserve.patches import applied_patches

    found = applied_patches(model)
    before_set = [ledger.patch(d) for d in ledger.active_ids(plan.head)]
    if found and [p.digest for p in found] != [p.digest for p in before_set]:
        raise ConsolidationError(f"check_consolidation needs a model with no patch merged or with exactly the "
                                 f"patches active at version {plan.head}; it holds {len(found)} other patch(es)")
    def facts_of(pairs: tuple[tuple[str, int], ...]) -> list[tuple[int, EditRequest]]:
        return [(v, r) for d, v in pairs for r in ledger.patch(d).requests]

    held = facts_of(plan.held)
    if held_sample is not None:
        if isinstance(held_sample, bool) or not isinstance(held_sample, int) or held_sample < 0:
            raise InvalidRequestError(f"held_sample must be a whole number or None, got {held_sample!r}")
        sampled = _evenly(held, held_sample)
    else:
        sampled = held
    facts = with_replaced_objects(
        [CommittedFact(version=v, prompt=r.text, subject=r.subject, target_new=r.target_new,
                       target_true=r.target_true or "") for v, r in sampled + facts_of(plan.constituents)],
        lambda v: ledger.version(v).probe_report)
    gone = {d for d, _ in plan.constituents}           # the held consolidations stay in the set
    after_set = [p for p in before_set if p.digest not in gone] + [plan.patch]
    before, after = _scored_before_after(model, tok, facts, before_set, after_set, found)
    broken = tuple(f.describe() for f, b, a in zip(facts, before, after) if b[0] and not a[0])
    return ConsolidationCheck(facts=tuple(facts), held_before=sum(b[0] for b in before),
                              held_after=sum(a[0] for a in after), broken=broken, unscored=len(held) - len(sampled))


def allowed_drop(max_drop: Any) -> float:
    """`max_drop` checked: the share of the facts that hold now that a consolidation or a revert out
    of one may break, a number in [0, 1]; `InvalidRequestError` naming the value otherwise."""
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not (
            math.isfinite(max_drop) and 0.0 <= max_drop <= 1.0):
        raise InvalidRequestError(f"max_drop must be a share in [0, 1], got {max_drop!r}")
    return float(max_drop)


def _refuse_if_too_many(what: str, facts: str, broken: Sequence[str], held_before: int, max_drop: float) -> None:
    """Raise `ConsolidationError` "`what` would break N of M `facts` that hold now", naming the first
    five, when more than `max_drop` (checked by `allowed_drop`) of the `held_before` facts broke."""
    max_drop = allowed_drop(max_drop)
    if held_before and len(broken) > max_drop * held_before:
        shown = "; ".join(broken[:5]) + (f"; and {len(broken) - 5} more" if len(broken) > 5 else "")
        raise ConsolidationError(f"{what} would break {len(broken)} of {held_before} {facts} that hold now (allowed "
                                 f"{max_drop:.0%}): {shown}; nothing was changed")


def refuse_broken(check: ConsolidationCheck, max_drop: float = 0.0) -> None:
    """Raise `ConsolidationError` naming the broken facts when more than `max_drop` of those that
    held before no longer hold."""
    _refuse_if_too_many("consolidation", "committed facts", check.broken, check.held_before, max_drop)



# ------------------------------------------------------------------ one fact out of a consolidation

def provenance(ledger: Any, digest: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the committed patch each request of patch `digest` came from, the same for each of its
    preserved-keys blocks), in order. A patch that is not consolidated is its own origin; a
    consolidated one holds its constituents' requests and blocks in order (`plan_consolidation`),
    through earlier consolidations, less the patches reverted out of it (``hparams["without"]``,
    `plan_fact_removal`). A consolidated patch whose constituents are not all stored in this ledger
    (one imported from another ledger) is its own origin: here it is one unit, reverted whole.
    Raises `ConsolidationError` when the counts do not match what is stored."""
    patch = ledger.patch(digest)
    n_blocks = len(ledger.patch_keys(digest).blocks)
    constituents = list((patch.hparams or {}).get("constituents", [])) if patch.method == CONSOLIDATED_METHOD else []
    if not constituents or not all(ledger.has_patch(d) for d in constituents):
        return (digest,) * len(patch.requests), (digest,) * n_blocks
    requests: list[str] = []
    blocks: list[str] = []
    for d in constituents:
        r, b = provenance(ledger, d)
        requests += r
        blocks += b
    gone = set((patch.hparams or {}).get("without", []))
    requests = [d for d in requests if d not in gone]
    blocks = [d for d in blocks if d not in gone]
    if len(requests) != len(patch.requests) or len(blocks) != n_blocks:
        raise ConsolidationError(f"consolidated patch {digest[:12]} holds {len(patch.requests)} request(s) and "
                                 f"{n_blocks} key block(s), its constituents {len(requests)} and {len(blocks)}: "
                                 "which fact is which cannot be told (nothing was changed)")
    return tuple(requests), tuple(blocks)


@dataclass(frozen=True)
class RemovalPlan:
    """Patch `removed` (added by version `version`) taken out of the consolidated patch `holder`
    active at `head`: `patch` replaces `holder`; nothing is written until `Ledger.revert_consolidated`."""

    head: int
    version: int                                   # the reverted version
    removed: str                                   # its patch digest (a constituent of `holder`)
    holder: str                                    # the consolidated patch active at head that holds it
    holder_version: int                            # the version that added `holder`
    patch: Patch                                   # `holder` re-solved without `removed`'s facts
    keys: PreservedKeys                            # `holder`'s blocks less `removed`'s, tagged with patch.digest
    layers: tuple[LayerConsolidation, ...]
    params: ConsolidateParams
    key_parts: tuple[str, ...] = ()                # the committed patches whose blocks, in order, `keys` are:
                                                   # stored as a reference to them, not a copy (session 27)

    def details(self) -> dict[str, Any]:
        """The JSON recorded with the revert version."""
        return {"reverted": self.version, "removed_patch": self.removed, "mode": "consolidated",
                "consolidation": {"version": self.holder_version, "old_patch": self.holder,
                                  "new_patch": self.patch.digest, "ridge": self.params.ridge,
                                  "layers": [x.to_dict() for x in self.layers]},
                "rebased": []}


# {layer: [d_in, n]} keys of the given requests' bare prompts at the given layers, on the model holding the head
PromptKeys = Callable[[Sequence[EditRequest], tuple[int, ...]], Mapping[int, torch.Tensor]]


def plan_fact_removal(ledger: Any, covariances: Covariances, version: int,
                      params: ConsolidateParams | None = None,
                      expected_head: int | None = None, prompt_keys: PromptKeys | None = None) -> RemovalPlan:
    """Re-solve the consolidated patch that holds version `version`'s patch without that patch's
    facts (`editserve.editing.consolidate.resolve_without` at each layer: the other facts' keys keep
    their outputs, the removed facts' keys get the layer's output from before the consolidation;
    `params` default to the consolidation's own ridge); nothing is written. `prompt_keys`, when
    given, adds the reverted requests' bare-prompt keys (measured on the head) to the keys sent to
    zero: the stored key is averaged over prefixed copies of the prompt, and on its own it can leave
    the bare prompt answering the reverted object (measured, docs/lifelong.md "Session 13"). Raises `RevertError` when no active consolidation holds the patch."""
    head = ledger.head() if expected_head is None else expected_head
    info = ledger.version(version)
    removed = info.patch_id
    if removed is None:
        raise RevertError(f"version {version} ({info.kind}) added no patch; there is nothing to revert")
    if removed in ledger.active_ids(head):
        raise RevertError(f"the patch of version {version} ({removed[:12]}) is active at version {head} itself: "
                          "revert it directly")
    holder_version = ledger.consolidated_into(removed, head)
    if holder_version is None:
        raise ledger.inactive_patch_error(version, removed, head)
    holder = ledger.version(holder_version).patch_id
    old = ledger.patch(holder)
    if params is None:
        params = ConsolidateParams(ridge=float((old.hparams or {}).get("ridge", ConsolidateParams().ridge)))
    req_origin, block_origin = provenance(ledger, holder)
    if removed not in req_origin and removed not in block_origin:
        raise ConsolidationError(f"consolidated patch {holder[:12]} does not list patch {removed[:12]} among its "
                                 "constituents (nothing was changed)")
    if all(d == removed for d in req_origin):
        raise RevertError(f"every fact of the consolidated patch of version {holder_version} comes from version "
                          f"{version}: revert version {holder_version}")
    blocks = ledger.patch_keys(holder).blocks
    keep_blocks = [b for b, d in zip(blocks, block_origin) if d != removed]
    key_parts = tuple(dict.fromkeys(d for d in block_origin if d != removed))     # whole patches, in order
    # every other committed key keeps the holder's output too: since consolidations are incremental
    # the holder is one of several consolidated patches, and it acts on the others' keys
    others = [b for d, _ in constituents_at(ledger, head) if d != holder for b in ledger.patch_keys(d).blocks]
    layers = tuple(sorted({d.layer for d in old.deltas}))
    covs = covariances(layers)
    reverted = [r for r, d in zip(old.requests, req_origin) if d == removed]
    bare = prompt_keys(reverted, layers) if prompt_keys is not None and reverted else {}
    solved = {}
    for delta in old.deltas:
        mine = [(b, d == removed) for b, d in zip(blocks, block_origin) if b.layer == delta.layer]
        if not mine:
            raise ConsolidationError(f"consolidated patch {holder[:12]} has no committed keys at layer {delta.layer}")
        mine += [(b, False) for b in others if b.layer == delta.layer]
        extra = bare.get(delta.layer)                                                 # [d_in, n] or None
        keys = torch.cat([b.keys for b, _ in mine] + ([extra.float()] if extra is not None else []), dim=1)
        dropped = torch.cat([torch.full((b.keys.shape[1],), gone, dtype=torch.bool) for b, gone in mine]
                            + ([torch.ones(extra.shape[1], dtype=torch.bool)] if extra is not None else []))
        own_v = _own_rows(delta.v, int(covs[delta.layer].shape[0]), delta.layer).double()
        solved[delta.layer] = (delta.name, _padded(resolve_without(delta.u.double() @ own_v.T, keys, dropped,
                                                                   covs[delta.layer], delta.layer, params),
                                                   delta.v.shape[0]))
    hparams = dict(old.hparams or {})
    hparams["without"] = list(hparams.get("without", [])) + [removed]
    patch = Patch(
        deltas=tuple(WeightDelta(name=name, layer=layer, u=r.u, v=r.v) for layer, (name, r) in sorted(solved.items())),
        requests=tuple(r for r, d in zip(old.requests, req_origin) if d != removed),
        method=CONSOLIDATED_METHOD, hparams=hparams, model_fingerprint=old.model_fingerprint, family=old.family)
    own = PreservedKeys(tuple(KeyBlock(patch.digest, b.layer, b.keys) for b in keep_blocks))
    report = tuple(LayerConsolidation(name=name, layer=layer, n_patches=0, n_keys=r.n_keys,
                                      penalty_before=r.penalty_before, penalty_after=r.penalty_after)
                   for layer, (name, r) in sorted(solved.items()))
    log.info("version %d's patch %s taken out of consolidated patch %s at version %d → %s", version, removed[:12],
             holder[:12], head, patch.digest[:12])
    return RemovalPlan(head=head, version=version, removed=removed, holder=holder, holder_version=holder_version,
                       patch=patch, keys=own, layers=report, params=params, key_parts=key_parts)


def model_prompt_keys(model: torch.nn.Module, tok: Any) -> PromptKeys:
    """`PromptKeys` measured on `model` as it is (it must hold the head's patches): the
    down-projection input at each request's subject's last token in its bare prompt."""
    from editserve.editing.keys import compute_keys

    def keys(requests: Sequence[EditRequest], layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
        res = compute_keys(model, tok, list(requests), (), list(layers))
        return {layer: k.T.contiguous() for layer, k in res.keys.items()}       # [n, d_in] → [d_in, n]

    return keys


@dataclass(frozen=True)
class RemovalCheck:
    """The consolidated patch's facts scored before and after taking one patch's facts out."""

    kept: tuple[CommittedFact, ...]        # the facts that stay
    removed: tuple[CommittedFact, ...]     # the reverted patch's facts
    held_before: int                       # kept facts that held before
    held_after: int
    broken: tuple[str, ...]                # kept facts that held before and not after (described)
    still_held: tuple[str, ...]            # removed facts the model still gives after (described)

    def to_dict(self) -> dict[str, Any]:
        return {"n_kept": len(self.kept), "n_removed": len(self.removed), "held_before": self.held_before,
                "held_after": self.held_after, "broken": list(self.broken), "still_held": list(self.still_held)}

    def probe_report(self) -> dict[str, Any]:
        """The report stored with the revert version: this check, and one efficacy row per kept fact
        with a known replaced object (read by the retention probe, as `ConsolidationCheck.probe_report`)."""
        rows = [{"kind": "efficacy", "prompt": f.prompt, "target_new": f.target_new, "target_true": f.target_true}
                for f in self.kept if f.target_true]
        return {"revert": self.to_dict(), "gate": {"rows": rows}}

    def refuse(self, max_drop: float = 0.0) -> None:
        """Raise `ConsolidationError` when more than `max_drop` of the kept facts that held no longer
        do. A reverted fact that the model still gives is reported (`still_held`), not refused: the
        re-solve sends its keys to the output from before by construction, and what still answers
        it is another edit's reach — measured on the report stream: "Oslo is a twin city of → Tehran"
        kept "Porto is a twin city of" answering Tehran after Porto's own edit was taken out
        (docs/lifelong.md, "Session 13"). Refusing would leave the operator unable to revert."""
        _refuse_if_too_many("taking the reverted facts out of the consolidated patch", "other facts", self.broken,
                            self.held_before, max_drop)
        if self.still_held:
            log.warning("reverted out of the consolidation, still answered (by other edits' reach): %s",
                        "; ".join(self.still_held[:5]))


def check_fact_removal(model: torch.nn.Module, tok: Any, ledger: Any, plan: RemovalPlan) -> RemovalCheck:
    """Score the holder's facts on `model` with the patches active at `plan.head` and with the
    holder replaced by `plan.patch` (`facts_hold`, as `check_consolidation`: `model` holds no patch
    or exactly the head's, and holds the same afterwards)."""
    from editserve.editing.retention import with_replaced_objects
    from editserve.patches import applied_patches

    found = applied_patches(model)
    before_set = [ledger.patch(d) for d in ledger.active_ids(plan.head)]
    if found and [p.digest for p in found] != [p.digest for p in before_set]:
        raise ConsolidationError(f"check_fact_removal needs a model with no patch merged or with exactly the "
                                 f"patches active at version {plan.head}; it holds {len(found)} other patch(es)")
    origin_version = ledger.origin_versions(plan.head)
    req_origin, _ = provenance(ledger, plan.holder)
    facts = with_replaced_objects(
        [CommittedFact(version=origin_version.get(d, plan.holder_version), prompt=r.text, subject=r.subject,
                       target_new=r.target_new, target_true=r.target_true or "")
         for r, d in zip(ledger.patch(plan.holder).requests, req_origin)],
        lambda v: ledger.version(v).probe_report)
    gone = [d == plan.removed for d in req_origin]
    after_set = [p for p in before_set if p.digest != plan.holder] + [plan.patch]
    before, after = _scored_before_after(model, tok, facts, before_set, after_set, found)
    kept = [(f, b, a) for f, b, a, g in zip(facts, before, after, gone) if not g]
    out = [(f, a) for f, a, g in zip(facts, after, gone) if g]
    return RemovalCheck(kept=tuple(f for f, _, _ in kept), removed=tuple(f for f, _ in out),
                        held_before=sum(b[0] for _, b, _ in kept), held_after=sum(a[0] for _, _, a in kept),
                        broken=tuple(f.describe() for f, b, a in kept if b[0] and not a[0]),
                        still_held=tuple(f.describe() for f, a in out if a[0]))
