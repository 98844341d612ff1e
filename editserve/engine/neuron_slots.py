"""Spare neuron slots inside a served vLLM model: layer L's MLP widened by E zero neurons at load.

The Hugging Face side (`editserve.editing.slots`) widens a SwiGLU MLP from I to I + E neurons
and writes a gated edit into a slot as three rank-1 deltas of ``gate_proj``, ``up_proj`` and
``down_proj``. vLLM keeps that MLP as two layers (``LlamaMLP``):

    gate_up_proj  MergedColumnParallelLinear  weight [2I, d]  rows: gate (I) then up (I)
    down_proj     RowParallelLinear           weight [d, I]

Widening them the same way gives ``gate_up_proj`` [2(I+E), d] = gate rows, E zero rows, up rows,
E zero rows, and ``down_proj`` [d, I+E] with E zero columns: ``SiluAndMul`` splits the merged
output in halves, so slot s of the gate half and slot s of the up half meet in neuron I + s, and
a zero neuron adds silu(0)·0·0 = 0. The Hugging Face ``gate_proj``/``up_proj`` weights of that
layer are then exactly the two halves of the merged weight (`half_of`), so the worker writes
them as views, like any other edited matrix.

The widening runs once per layer after the checkpoint is loaded and before vLLM processes the
weights (`install_widening` wraps ``UnquantizedLinearMethod.process_weights_after_loading``):
on CPU before the GEMM kernel is packed (the slot layer's ``gate_up_proj`` keeps a dense master,
like the editable down-projections), on a GPU before CUDA graphs are captured. Shapes are
fixed from then on, so swaps stay in-place writes.

``EDITSERVE_NEURON_SLOTS`` names the layers and slot counts, e.g. ``"5:1024"`` or
``"5:1024,7:256"``; unset or empty means none. Slots need tensor-parallel size 1 for now (a
rank's slice of a widened matrix is two ranges, which the swap protocol does not carry) and
unquantised weights; anything else is refused at load with a typed error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch

from editserve.editing.arch import ARCHITECTURES, MLP_HALVES
from editserve.errors import InvalidRequestError, PatchMismatchError

log = logging.getLogger(__name__)

SLOTS_ENV = "EDITSERVE_NEURON_SLOTS"
HALVES = MLP_HALVES                 # the merged gate_up_proj holds gate rows, then up rows
_MARK = "_editserve_widening"
_WIDENED_ATTR = "_editserve_slots"  # on a widened vLLM layer: (neurons before, slots)


def _slot_patterns() -> tuple[tuple[re.Pattern[str], str], ...]:
    """(pattern, "gate_up_proj" | "down_proj") for the vLLM MLP projections of every architecture
    with a merged gate/up projection (the templates of `editserve.editing.arch`); group 1 is the layer."""
    templates = {(spec.vllm_gate_up_proj, "gate_up_proj") for spec in ARCHITECTURES if spec.vllm_gate_up_proj}
    templates |= {(spec.vllm_down_proj, "down_proj") for spec in ARCHITECTURES if spec.vllm_gate_up_proj}
    return tuple((re.compile(r"(?:^|\.)" + re.escape(t).replace(r"\{\}", r"(\d+)") + "$"), kind)
                 for t, kind in sorted(templates))


_PREFIXES = _slot_patterns()


def parse_slots(text: str | None) -> dict[int, int]:
    """``"5:1024,7:256"`` → {5: 1024, 7: 256}; None or blank → {} (no slots)."""
    if text is None or not text.strip():
        return {}
    slots: dict[int, int] = {}
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", part)
        if m is None:
            raise InvalidRequestError(f"{SLOTS_ENV} (--neuron-slots) must be LAYER:SLOTS pairs like '5:1024,7:256', got {text!r}")
        layer, count = int(m.group(1)), int(m.group(2))
        if count < 1:
            raise InvalidRequestError(f"{SLOTS_ENV}: layer {layer} needs at least one slot, got {count}")
        if layer in slots:
            raise InvalidRequestError(f"{SLOTS_ENV} names layer {layer} twice in {text!r}")
        slots[layer] = count
    return slots


def slots_from_env(environ: Mapping[str, str]) -> dict[int, int]:
    return parse_slots(environ.get(SLOTS_ENV))


def slot_layer_of(prefix: str) -> tuple[int, str] | None:
    """(layer, "gate_up_proj" | "down_proj") of a vLLM MLP projection's prefix, else None."""
    for pattern, kind in _PREFIXES:
        m = pattern.search(prefix)
        if m is not None:
            return int(m.group(1)), kind
    return None


def widened(layer: torch.nn.Module) -> tuple[int, int] | None:
    """(neurons before widening, slots) of a widened vLLM layer, else None."""
    return getattr(layer, _WIDENED_ATTR, None)


def widen_layer(layer: torch.nn.Module, kind: str, slots: int) -> None:
    """Widen one loaded vLLM projection in place (a new zero-padded weight parameter)."""
    prefix = str(getattr(layer, "prefix", "?"))
    if widened(layer) is not None:
        raise PatchMismatchError(f"{prefix} is already widened")
    tp_size = int(getattr(layer, "tp_size", 1))
    if tp_size != 1:
        raise PatchMismatchError(f"{SLOTS_ENV} needs tensor-parallel size 1; {prefix} is split over {tp_size} ranks")
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.is_meta or weight.numel() == 0:
        raise PatchMismatchError(f"{prefix} has no loaded 2-D weight to widen (quantised or not loaded?)")
    if getattr(layer, "bias", None) is not None:
        raise PatchMismatchError(f"{prefix} has a bias; neuron slots need a bias-free SwiGLU MLP")
    w = weight.detach()
    if kind == "gate_up_proj":
        width = int(w.shape[0]) // 2                                        # I
        pad = w.new_zeros(slots, w.shape[1])
        new = torch.cat([w[:width], pad, w[width:], pad])                   # [2(I+E), d]
        layer.output_size = layer.output_size_per_partition = 2 * (width + slots)
        layer.output_sizes = [width + slots] * 2
        layer.output_partition_sizes = [width + slots] * 2
    elif kind == "down_proj":
        width = int(w.shape[1])                                             # I
        new = torch.cat([w, w.new_zeros(w.shape[0], slots)], 1)             # [d, I+E]
        layer.input_size = layer.input_size_per_partition = width + slots
    else:
        raise PatchMismatchError(f"{prefix}: cannot widen a {kind!r}")
    layer.register_parameter("weight", torch.nn.Parameter(new.contiguous(), requires_grad=False))
    setattr(layer, _WIDENED_ATTR, (width, slots))
    log.info("editserve widened %s by %d neuron slots (%d -> %d neurons)", prefix, slots, width, width + slots)


def half_of(weight: torch.Tensor, half: str) -> torch.Tensor:
    """The gate or up rows of a merged ``gate_up_proj`` weight, as a view that writes through."""
    rows = int(weight.shape[0])
    if rows % 2:
        raise PatchMismatchError(f"a merged gate_up_proj weight has an even number of rows, got {rows}")
    i = HALVES.index(half)
    return weight[i * rows // 2:(i + 1) * rows // 2]


def install_widening(slots: Mapping[int, int]) -> bool:
    """Wrap vLLM's ``UnquantizedLinearMethod.process_weights_after_loading`` so that the MLP
    projections of the slot layers are widened first; False if already installed or no slots."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    original = UnquantizedLinearMethod.process_weights_after_loading
    if not slots or getattr(original, _MARK, False):
        return False
    wanted = dict(slots)

    def process_weights_after_loading(self: object, layer: torch.nn.Module) -> None:
        hit = slot_layer_of(str(getattr(layer, "prefix", "")))
        if hit is not None and hit[0] in wanted and widened(layer) is None:
            widen_layer(layer, hit[1], wanted[hit[0]])
        original(self, layer)

    setattr(process_weights_after_loading, _MARK, True)
    process_weights_after_loading.__wrapped__ = original  # type: ignore[attr-defined]
    UnquantizedLinearMethod.process_weights_after_loading = process_weights_after_loading  # type: ignore[method-assign]
    return True
