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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from editserve.editing.arch import MLP_HALVES, get_module, spec_for
from editserve.editing.gated import GatedNeuron
from editserve.editing.model import fingerprint
from editserve.editing.requests import EditRequest
from editserve.errors import InvalidRequestError, PatchStateError, UnknownArchitectureError
from editserve.patches import Patch, WeightDelta, applied_patches

log = logging.getLogger(__name__)

_SLOTS_ATTR = "_editserve_slots"          # model attribute: {layer: (first neuron index, slot count)}
_NARROW_ATTR = "_editserve_narrowed"      # model attribute: the layers `own_view` narrows now
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


def free_slots(model: torch.nn.Module, layer: int, n: int = 1) -> list[int]:
    """The `n` lowest slot neurons of layer `layer` whose gate, up and down weights are all zero now."""
    free = []
    for neuron in slot_range(model, layer):
        if _is_free(model, layer, neuron):
            free.append(neuron)
            if len(free) == n:
                return free
    total = len(slot_range(model, layer))
    remedy = ("; revert gated edits to free slots, or name another method (alphaedit, rome and memit edit the "
              "layer's own neurons)")
    if not free:
        raise PatchStateError(f"layer {layer} has no free neuron slot ({total} slots, all taken){remedy}")
    raise PatchStateError(f"layer {layer} has {len(free)} free neuron slot(s) of {total}; {n} are needed{remedy}")


def free_slot(model: torch.nn.Module, layer: int) -> int:
    """The lowest free slot neuron of layer `layer` (`free_slots`)."""
    return free_slots(model, layer, 1)[0]


def neurons_patch(model: torch.nn.Module, layer: int, neurons: Sequence[int], gated: Sequence[GatedNeuron],
                  requests: Sequence[EditRequest], hparams: dict[str, Any]) -> Patch:
    """The patch that writes `gated[i]` into slot neuron `neurons[i]` of layer `layer` (each free): one
    rank-n delta per projection, the one-hot slot columns E [I+E, n] against G, U [d, n] and V [d, n]."""
    if not neurons or len(neurons) != len(gated) or len(set(neurons)) != len(neurons):
        raise InvalidRequestError(f"one distinct slot per neuron is needed, got slots {list(neurons)!r} for "
                                  f"{len(gated)} neuron(s)")
    for neuron in neurons:
        if neuron not in slot_range(model, layer):
            raise InvalidRequestError(f"neuron {neuron!r} is not a slot of layer {layer} ({slot_range(model, layer)})")
        if not _is_free(model, layer, neuron):
            raise PatchStateError(f"slot neuron {neuron} of layer {layer} is taken")
    spec = spec_for(model)
    gate, _, _ = _projections(model, layer)
    e = torch.zeros(gate.out_features, len(neurons))                          # [I+E, n]
    e[list(neurons), range(len(neurons))] = 1.0
    mlp = spec.mlp_name(layer)
    cols = lambda ts: torch.stack([t.detach().float().reshape(-1) for t in ts], 1).contiguous()   # noqa: E731  [d, n]
    deltas = (WeightDelta(f"{mlp}.gate_proj.weight", layer, e, cols([n.g for n in gated])),
              WeightDelta(f"{mlp}.up_proj.weight", layer, e.clone(), cols([n.u for n in gated])),
              WeightDelta(f"{mlp}.down_proj.weight", layer, cols([n.v for n in gated]), e.clone()))
    # The slots are in the deltas (the one-hot columns), not in the hyper-parameters: a rebase recomputes
    # the edit with these into whichever slots are free then.
    return Patch(deltas=deltas, requests=tuple(requests), method="gated", hparams={**hparams, "layer": layer},
                 model_fingerprint=fingerprint(model), family=spec.family)


def neuron_patch(model: torch.nn.Module, layer: int, neuron: int, gated: GatedNeuron, request: EditRequest,
                 hparams: dict[str, Any]) -> Patch:
    """The patch that writes `gated` into slot neuron `neuron` of layer `layer` (which must be free)."""
    return neurons_patch(model, layer, [neuron], [gated], [request], hparams)


def slots_of(patch: Patch) -> list[int]:
    """The slot neurons a gated patch writes, in its requests' order (its gate delta's one-hot columns)."""
    gate = next((d for d in patch.deltas if d.name.endswith(".gate_proj.weight")), None)
    if patch.method != "gated" or gate is None:
        raise InvalidRequestError(f"patch {patch.digest[:12]} ({patch.method}) is not a gated neuron")
    return [int(i) for i in gate.u.abs().argmax(dim=0)]


def slot_of(patch: Patch) -> int:
    """The slot neuron of a one-fact gated patch."""
    slots = slots_of(patch)
    if len(slots) != 1:
        raise InvalidRequestError(f"patch {patch.digest[:12]} writes {len(slots)} slots {slots}, not one")
    return slots[0]


def _narrow(weight: torch.Tensor) -> torch.nn.Linear:
    """A bias-free Linear whose weight is `weight` (a view: it shares the wide projection's storage)."""
    out = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    out.weight = torch.nn.Parameter(weight, requires_grad=False)
    return out


@contextmanager
def own_view(model: torch.nn.Module, layers: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Within, each of `layers` that holds neuron slots shows only its own I neurons: its gate_proj,
    up_proj and down_proj are bias-free Linear views of their first I rows / columns (the same
    storage), and a forward hook on its MLP adds the slot neurons' output, so the model computes what
    it did (up to float rounding). What the covariance methods read is then of the own neurons: keys
    (the down-projection's input) [I], key statistics [I, I], a down-projection delta [d, I]
    (`pad_to_slots` widens it). Yields the layers narrowed here; layers narrowed by an enclosing
    `own_view` are left to it. The projections are restored on exit, whatever happens."""
    spec = spec_for(model)
    active: set[int] = getattr(model, _NARROW_ATTR, set())
    mine = tuple(sorted({int(layer) for layer in layers if slot_range(model, int(layer))} - active))
    saved, handles = [], []
    try:
        for layer in mine:
            mlp = get_module(model, spec.mlp_name(layer))
            gate, up, down = _projections(model, layer)
            width = slot_range(model, layer).start                                      # I
            saved.append((mlp, gate, up, down))

            def slot_output(_m: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor, mlp=mlp, gate=gate,
                            up=up, down=down, width=width) -> torch.Tensor:
                x = args[0]                                                             # [..., d]
                h = mlp.act_fn(F.linear(x, gate.weight[width:])) * F.linear(x, up.weight[width:])   # [..., E]
                return out + F.linear(h, down.weight[:, width:])

            mlp.gate_proj = _narrow(gate.weight[:width])                                # [I, d]
            mlp.up_proj = _narrow(up.weight[:width])                                    # [I, d]
            mlp.down_proj = _narrow(down.weight[:, :width])                             # [d, I]
            handles.append(mlp.register_forward_hook(slot_output))
        object.__setattr__(model, _NARROW_ATTR, active | set(mine))
        yield mine
    finally:
        for h in handles:
            h.remove()
        for mlp, gate, up, down in saved:
            mlp.gate_proj, mlp.up_proj, mlp.down_proj = gate, up, down
        object.__setattr__(model, _NARROW_ATTR, active)


def pad_to_slots(model: torch.nn.Module, delta: WeightDelta) -> WeightDelta:
    """A down-projection delta computed under `own_view` ([d, I]: V [I, r]) widened to its layer's
    full width ([d, I+E]: V with zero rows for the slots); any other delta unchanged."""
    slots = slot_range(model, delta.layer)
    if not slots or delta.name != spec_for(model).weight_name(delta.layer) or delta.v.shape[0] != slots.start:
        return delta
    v = torch.cat([delta.v, delta.v.new_zeros(len(slots), delta.v.shape[1])])          # [I+E, r]
    return WeightDelta(delta.name, delta.layer, delta.u, v.contiguous())
