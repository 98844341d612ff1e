"""Consolidation as a ledger operation: many active patches replaced by one least-disturbance patch.

A long ledger's damage to ordinary text grows with the sum of its patches, not with any one of
them (docs/lifelong.md, session 7). `plan_consolidation` takes the *constituents* — the active
patches at a version that carry preserved-keys blocks at every layer they touch (what AlphaEdit,
and since session 5 every method, stores with a commit) — and, per layer, re-solves their summed
update ΔW = Σ U Vᵀ with `editserve.editing.consolidate`: the same outputs on every committed key,
the least change tr(ΔW A ΔWᵀ) on ordinary keys. The result is one `Patch`:

- ``method`` "consolidated"; its ``requests`` are the constituents' requests in ledger order (so
  the retention probe, the retention gate and ``ledger show`` still see every committed fact);
  ``hparams`` record the ridge and the constituents' digests;
- one `WeightDelta` per consolidated layer, rank = the number of committed keys there (float32
  factors, solved in float64);
- its preserved-keys blocks are the constituents' blocks, in order, tagged with its digest, so
  the state at the new version has exactly the keys of the state before it.

Active patches without keys at a layer they touch stay as they are (they are neither summed nor
removed); the consolidated update leaves what they do untouched.

`Ledger.consolidate` writes a plan as one version of kind ``consolidate``: the constituents
removed, the new patch added (last in summation order). Nothing is subtracted and nothing old is
rewritten: a rollback to the version before restores that version's weights and keys exactly
(from base copies and checkpoints, like any rollback). A revert *through* a consolidated patch
with rebase is refused (its constituents' requests would have to be recomputed one by one);
roll back to the version before the consolidation instead. A plain revert of the consolidation
version removes every fact it holds. Reverting a constituent's version is refused with the
consolidation that holds it named (`Ledger.consolidated_into`, `Ledger.inactive_patch_error`).

`check_consolidation` scores the constituents' facts on a model before and after (the retention
outcome of `editserve.editing.retention.facts_hold`) so that the caller can refuse a plan that
breaks any: the solve keeps each layer's output on the *stored* keys (the mean key of each
request over its prefixes), not on every prefix, so the check is a measurement, not a formality.

Pure ledger logic plus torch; statistics come from the caller (`covariances`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from editserve.editing.alphaedit import KeyBlock, PreservedKeys
from editserve.editing.consolidate import ConsolidateParams, consolidate
from editserve.editing.retention import CommittedFact
from editserve.ledger.errors import ConsolidationError
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

    def details(self) -> dict[str, Any]:
        """The JSON recorded with the version (and shown by ``ledger show``)."""
        return {"constituents": [{"patch": d, "version": v} for d, v in self.constituents],
                "ridge": self.params.ridge, "layers": [x.to_dict() for x in self.layers],
                "patch": self.patch.digest}


def _covered(patch: Patch, keys: PreservedKeys) -> bool:
    """Whether `keys` has a block at every layer `patch` touches."""
    have = set(keys.layers)
    return all(d.layer in have for d in patch.deltas)


def constituents_at(ledger: Any, version: int) -> list[tuple[str, int]]:
    """The active patches at `version` that consolidation can take: those with preserved-keys
    blocks at every layer they touch (ledger order)."""
    chain = ledger.active_origins(version)
    keys = {d: ledger.patch_keys(d) for d, _ in chain}
    return [(d, v) for d, v in chain if keys[d].blocks and _covered(ledger.patch(d), keys[d])]


def plan_consolidation(ledger: Any, covariances: Covariances, params: ConsolidateParams = ConsolidateParams(),
                       expected_head: int | None = None) -> ConsolidationPlan:
    """Consolidate the constituents active at `expected_head` (default: the head); nothing is written.
    Raises `ConsolidationError` when fewer than two active patches carry keys (nothing to gain)."""
    if params.across_layers:
        raise ConsolidationError("a ledger consolidation keeps each layer's outputs on the committed keys; "
                                 "across_layers (measured to break committed facts, docs/lifelong.md) is not offered")
    head = ledger.head() if expected_head is None else expected_head
    chosen = constituents_at(ledger, head)
    if len(chosen) < 2:
        raise ConsolidationError(f"version {head} has {len(chosen)} active patch(es) with preserved keys at every "
                                 "layer they touch; consolidation needs at least 2 (nothing was changed)")
    patches = [ledger.patch(d) for d, _ in chosen]
    blocks = [b for d, _ in chosen for b in ledger.patch_keys(d).blocks]
    state = PreservedKeys(tuple(blocks))
    names: dict[int, str] = {}
    sums: dict[int, torch.Tensor] = {}                 # layer → Σ U Vᵀ [d_out, d_in] float64
    touching: dict[int, int] = {}
    for p in patches:
        for d in p.deltas:
            if names.setdefault(d.layer, d.name) != d.name:
                raise ConsolidationError(f"layer {d.layer} is edited through two weights ({names[d.layer]!r} and "
                                         f"{d.name!r}); consolidation takes one weight per layer")
            term = d.u.double() @ d.v.double().T
            sums[d.layer] = sums[d.layer] + term if d.layer in sums else term
            touching[d.layer] = touching.get(d.layer, 0) + 1
    layers = tuple(sorted(sums))
    keys = {layer: state.keys(layer) for layer in layers}
    covs = covariances(layers)
    result = consolidate(sums, keys, covs, params)
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
    log.info("consolidation at version %d: %d patches → %s; %s", head, len(chosen), patch.digest[:12],
             ", ".join(f"layer {x.layer}: {x.n_keys} keys, tr {x.penalty_before:.3g}→{x.penalty_after:.3g}"
                       for x in report))
    return ConsolidationPlan(head=head, constituents=tuple(chosen), patch=patch, keys=own, layers=report,
                             params=params)


@dataclass(frozen=True)
class ConsolidationCheck:
    """The constituents' facts scored with the head's weights and with the consolidated ones."""

    facts: tuple[CommittedFact, ...]   # every constituent fact (target_true "": checked greedily)
    held_before: int
    held_after: int
    broken: tuple[str, ...]            # facts that held before and not after (described)

    def to_dict(self) -> dict[str, Any]:
        return {"n_facts": len(self.facts), "held_before": self.held_before, "held_after": self.held_after,
                "broken": list(self.broken)}

    def probe_report(self) -> dict[str, Any]:
        """The report stored with the consolidation version: this check, and one efficacy row per
        fact with a known replaced object (what the retention probe reads a request's replaced
        object from when the request itself names none, `editserve.editing.retention.with_replaced_objects`)."""
        rows = [{"kind": "efficacy", "prompt": f.prompt, "target_new": f.target_new, "target_true": f.target_true}
                for f in self.facts if f.target_true]
        return {"consolidation": self.to_dict(), "gate": {"rows": rows}}


def check_consolidation(model: torch.nn.Module, tok: Any, ledger: Any, plan: ConsolidationPlan) -> ConsolidationCheck:
    """Score every constituent fact (against its replaced object, from its request or else from the
    committing version's gate rows; where none is known, whether the model answers its new target
    greedily: `editserve.editing.retention.facts_hold`) on `model` with the patches active at `plan.head`, then with
    the consolidated set. `model` holds no patch or exactly the head's active patches (a sidecar
    serving the head: nothing is rebuilt for "before"), and holds the same afterwards (bases
    restored: nothing subtracted), so the check costs two merges of the touched weights."""
    from editserve.editing.retention import facts_hold, with_replaced_objects
    from editserve.patches import applied_patches, hold_patches

    found = applied_patches(model)
    before_set = [ledger.patch(d) for d in ledger.active_ids(plan.head)]
    if found and [p.digest for p in found] != [p.digest for p in before_set]:
        raise ConsolidationError(f"check_consolidation needs a model with no patch merged or with exactly the "
                                 f"patches active at version {plan.head}; it holds {len(found)} other patch(es)")
    origin = dict(plan.constituents)
    facts = with_replaced_objects(
        [CommittedFact(version=origin[d], prompt=r.text, subject=r.subject, target_new=r.target_new,
                       target_true=r.target_true or "") for d in origin for r in ledger.patch(d).requests],
        lambda v: ledger.version(v).probe_report)
    after_set = [p for p in before_set if p.digest not in origin] + [plan.patch]
    try:
        hold_patches(model, before_set)
        before = facts_hold(model, tok, facts)
        hold_patches(model, after_set)
        after = facts_hold(model, tok, facts)
    finally:
        hold_patches(model, found)
    broken = tuple(f.describe() for f, b, a in zip(facts, before, after) if b[0] and not a[0])
    return ConsolidationCheck(facts=tuple(facts), held_before=sum(b[0] for b in before),
                              held_after=sum(a[0] for a in after), broken=broken)


def refuse_broken(check: ConsolidationCheck, max_drop: float = 0.0) -> None:
    """Raise `ConsolidationError` naming the broken facts when more than `max_drop` of those that
    held before no longer hold."""
    if check.held_before and len(check.broken) > max_drop * check.held_before:
        shown = "; ".join(check.broken[:5]) + (f"; and {len(check.broken) - 5} more" if len(check.broken) > 5 else "")
        raise ConsolidationError(f"consolidation would break {len(check.broken)} of {check.held_before} committed "
                                 f"facts that hold now (allowed {max_drop:.0%}): {shown}; nothing was changed")

