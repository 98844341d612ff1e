"""Spare neuron slots: one SwiGLU MLP widened by E zero neurons, and gated neurons (editing/gated.py)
written into them as ordinary low-rank patches.

A gated neuron adds silu(g·x)·(u·x)·δ to one layer's MLP, which is one more neuron of the MLP's own
SwiGLU form. Widen that MLP once (intermediate width I → I + E; the extra gate and up rows and down
columns are zero, and a zero neuron adds silu(0)·0 = 0), and neuron s is three rank-1 deltas:

    gate_proj.weight [I+E, d] += e_{I+s} gᵀ
    up_proj.weight   [I+E, d] += e_{I+s} uᵀ
    down_proj.weight [d, I+E] += δ e_{I+s}ᵀ

So a `Patch` carries a gated edit: the ledger, rollback from base copies (a freed slot is zero again,
bit for bit), checksums and the swap protocol need no new patch kind, and the shapes are fixed from
the start (what CUDA graphs and packed CPU kernels need). `widen_mlp` widens a Hugging Face
llama-family model in place; the engine does the same to vLLM's merged gate_up_proj at load
(editserve.engine.neuron_slots).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from editserve.editing.arch import MLP_HALVES, get_module, spec_for
from editserve.editing.gated import GatedNeuron
from editserve.editing.model import fingerprint
from editserve.editing.requests import EditRequest
from editserve.errors import InvalidRequestError, PatchStateError, UnknownArchitectureError
from editserve.patches import Patch, WeightDelta, applied_patches

log = logging.getLogger(__name__)

_SLOTS_ATTR = "_editserve_slots"          # model attribute: {layer: (first neuron index, slot count)}
PROJ = (*MLP_HALVES, "down_proj")


def _projections(model: torch.nn.Module, layer: int) -> tuple[torch.nn.Linear, torch.nn.Linear, torch.nn.Linear]:
    mlp = get_module(model, spec_for(model).mlp_name(layer))
    mods = tuple(getattr(mlp, p, None) for p in PROJ)
    if not all(isinstance(m, torch.nn.Linear) and m.bias is None for m in mods):
        raise UnknownArchitectureError(f"layer {layer}'s MLP ({type(mlp).__name__}) is not a bias-free SwiGLU "
                                       f"with {', '.join(PROJ)}: it has no neuron slots")
    return mods  # type: ignore[return-value]


def widen_mlp(model: torch.nn.Module, layer: int, slots: int) -> range:
    """Give layer `layer`'s MLP `slots` zero neurons (in place, before any patch is applied); returns
    the neuron indices of the slots. The model computes what it did, up to float rounding."""
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise InvalidRequestError(f"slots must be a positive integer, got {slots!r}")
    have = getattr(model, _SLOTS_ATTR, {})
    if layer in have:
        raise PatchStateError(f"layer {layer}'s MLP already has {have[layer][1]} slots")
    if applied := applied_patches(model):
        raise PatchStateError(f"cannot widen layer {layer}'s MLP while {len(applied)} patch(es) are applied: their "
                              "base copies have the old shape; widen first, then apply")
    fingerprint(model)                                   # of the base weights, taken before the widening
    gate, up, down = _projections(model, layer)
    width = gate.out_features                            # I
    with torch.no_grad():
        for lin in (gate, up):                           # [I, d] -> [I+E, d]
            lin.weight = torch.nn.Parameter(torch.cat([lin.weight, lin.weight.new_zeros(slots, lin.in_features)]),
                                            requires_grad=lin.weight.requires_grad)
            lin.out_features = width + slots
        down.weight = torch.nn.Parameter(torch.cat([down.weight, down.weight.new_zeros(down.out_features, slots)], 1),
                                         requires_grad=down.weight.requires_grad)    # [d, I] -> [d, I+E]
        down.in_features = width + slots
    object.__setattr__(model, _SLOTS_ATTR, {**have, layer: (width, slots)})
    log.info("layer %d MLP widened by %d neuron slots (%d -> %d)", layer, slots, width, width + slots)
    return range(width, width + slots)


def slot_range(model: torch.nn.Module, layer: int) -> range:
    """The neuron indices of layer `layer`'s slots (empty when it was not widened)."""
    width, slots = getattr(model, _SLOTS_ATTR, {}).get(layer, (0, 0))
    return range(width, width + slots)


def own_neurons(model: torch.nn.Module, layer: int, width: int) -> int:
    """How many of layer `layer`'s `width` MLP neurons are the model's own (all but its slots): the
    columns of the down-projection whose change is damage (norm growth, drift). A slot neuron's
    columns are new weights, quiet off their subject, whose size says nothing of damage."""
    return slot_range(model, layer).start or width


def _is_free(model: torch.nn.Module, layer: int, neuron: int) -> bool:
    gate, up, down = _projections(model, layer)
    return not (gate.weight[neuron].any() or up.weight[neuron].any() or down.weight[:, neuron].any())


def free_slot(model: torch.nn.Module, layer: int) -> int:
    """The lowest slot neuron of layer `layer` whose gate, up and down weights are all zero now."""
    for n in slot_range(model, layer):
        if _is_free(model, layer, n):
            return n
    raise PatchStateError(f"layer {layer} has no free neuron slot ({len(slot_range(model, layer))} slots, all taken)")


def neuron_patch(model: torch.nn.Module, layer: int, neuron: int, gated: GatedNeuron, request: EditRequest,
                 hparams: dict[str, Any]) -> Patch:
    """The patch that writes `gated` into slot neuron `neuron` of layer `layer` (which must be free)."""
    if neuron not in slot_range(model, layer):
        raise InvalidRequestError(f"neuron {neuron!r} is not a slot of layer {layer} ({slot_range(model, layer)})")
    if not _is_free(model, layer, neuron):
        raise PatchStateError(f"slot neuron {neuron} of layer {layer} is taken")
    spec = spec_for(model)
    gate, _, _ = _projections(model, layer)
    e = torch.zeros(gate.out_features, 1)
    e[neuron] = 1.0                                                           # [I+E, 1]
    mlp = spec.mlp_name(layer)
    col = lambda t: t.detach().float().reshape(-1, 1).clone()                 # noqa: E731  [d, 1]
    deltas = (WeightDelta(f"{mlp}.gate_proj.weight", layer, e, col(gated.g)),
              WeightDelta(f"{mlp}.up_proj.weight", layer, e.clone(), col(gated.u)),
              WeightDelta(f"{mlp}.down_proj.weight", layer, col(gated.v), e.clone()))
    # The slot is in the deltas (the one-hot rows), not in the hyper-parameters: a rebase recomputes the
    # edit with these into whichever slot is free then.
    return Patch(deltas=deltas, requests=(request,), method="gated", hparams={**hparams, "layer": layer},
                 model_fingerprint=fingerprint(model), family=spec.family)


def slot_of(patch: Patch) -> int:
    """The slot neuron a gated patch writes (its gate delta's one-hot row)."""
    gate = next((d for d in patch.deltas if d.name.endswith(".gate_proj.weight")), None)
    if patch.method != "gated" or gate is None:
        raise InvalidRequestError(f"patch {patch.digest[:12]} ({patch.method}) is not a gated neuron")
    return int(gate.u.reshape(-1).abs().argmax())
