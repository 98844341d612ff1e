"""Architecture table: where each supported model family keeps the pieces ROME/MEMIT touch.

Everything is declared, nothing is inferred from tensor shapes. For each family:

- the container of transformer blocks and its per-layer submodules (MLP, attention);
- the MLP down-projection, whose *input* is the key k and whose weight W is edited;
- the orientation of that weight in Hugging Face and in vLLM:
    ``OUT_IN``  weight[d_out, d_in]  (torch.nn.Linear; ΔW = U Vᵀ)
    ``IN_OUT``  weight[d_in, d_out]  (GPT-2 Conv1D;    ΔW = V Uᵀ)
- the token embedding, final norm and unembedding (LM head) names.

Layer templates use ``{}`` for the layer index.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from editserve.errors import LayerOutOfRangeError, UnknownArchitectureError


# The two input projections of a SwiGLU MLP, in the order vLLM's merged gate_up_proj holds their rows.
MLP_HALVES = ("gate_proj", "up_proj")


class Layout(str, Enum):
    """Orientation of a 2-D projection weight relative to (d_out, d_in)."""

    OUT_IN = "out_in"  # weight[d_out, d_in]
    IN_OUT = "in_out"  # weight[d_in, d_out]


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    layers: str            # ModuleList of blocks
    mlp: str               # block MLP, output is the MLP's contribution to the residual
    attn: str              # block attention module
    down_proj: str         # module whose input is the key and whose weight is edited
    hf_layout: Layout      # orientation of down_proj.weight in Hugging Face
    vllm_layout: Layout    # orientation of the same weight inside vLLM
    vllm_down_proj: str    # parameter-owning module name inside vLLM's model
    base: str              # the body module whose output is the final-normed hidden state
    embed: str
    final_norm: str
    lm_head: str
    n_layers_attr: str = "num_hidden_layers"
    # vLLM's merged gate and up projection of a SwiGLU MLP (gate rows, then up rows), whose Hugging
    # Face halves are ``{mlp}.gate_proj`` / ``{mlp}.up_proj``; None for MLPs without one. Only layers
    # widened with neuron slots edit it (editserve.engine.neuron_slots).
    vllm_gate_up_proj: str | None = None

    def layer_name(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def down_proj_name(self, layer: int) -> str:
        return self.down_proj.format(layer)

    def weight_name(self, layer: int) -> str:
        """Hugging Face state-dict name of the edited weight at `layer`."""
        return self.down_proj.format(layer) + ".weight"

    def vllm_weight_name(self, layer: int) -> str:
        return self.vllm_down_proj.format(layer) + ".weight"

    def mlp_name(self, layer: int) -> str:
        return self.mlp.format(layer)

    def half_weight_name(self, layer: int, half: str) -> str:
        """Hugging Face name of the ``gate_proj`` or ``up_proj`` weight of layer `layer`."""
        return f"{self.mlp.format(layer)}.{half}.weight"

    def attn_name(self, layer: int) -> str:
        return self.attn.format(layer)


_LLAMA_LIKE = dict(
    base="model",
    layers="model.layers",
    mlp="model.layers.{}.mlp",
    attn="model.layers.{}.self_attn",
    down_proj="model.layers.{}.mlp.down_proj",
    hf_layout=Layout.OUT_IN,
    vllm_layout=Layout.OUT_IN,
    vllm_down_proj="model.layers.{}.mlp.down_proj",
    vllm_gate_up_proj="model.layers.{}.mlp.gate_up_proj",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
)

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(family="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), **_LLAMA_LIKE),
    ArchSpec(
        family="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        mlp="transformer.h.{}.mlp",
        attn="transformer.h.{}.attn",
        down_proj="transformer.h.{}.mlp.c_proj",
        hf_layout=Layout.IN_OUT,     # Conv1D stores [in, out]
        vllm_layout=Layout.OUT_IN,   # vLLM transposes Conv1D weights on load
        vllm_down_proj="transformer.h.{}.mlp.c_proj",
        base="transformer",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        n_layers_attr="n_layer",
    ),
    ArchSpec(
        family="gptj",
        model_types=("gptj",),
        layers="transformer.h",
        mlp="transformer.h.{}.mlp",
        attn="transformer.h.{}.attn",
        down_proj="transformer.h.{}.mlp.fc_out",
        hf_layout=Layout.OUT_IN,
        vllm_layout=Layout.OUT_IN,
        vllm_down_proj="transformer.h.{}.mlp.fc_out",
        base="transformer",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        n_layers_attr="n_layer",
    ),
    ArchSpec(
        family="gpt_neox",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        mlp="gpt_neox.layers.{}.mlp",
        attn="gpt_neox.layers.{}.attention",
        down_proj="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        hf_layout=Layout.OUT_IN,
        vllm_layout=Layout.OUT_IN,
        vllm_down_proj="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        base="gpt_neox",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",           # transformers >= 5 (was `embed_out` before)
    ),
)


def spec_for_model_type(model_type: str) -> ArchSpec:
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    known = sorted(t for s in ARCHITECTURES for t in s.model_types)
    raise UnknownArchitectureError(f"unknown architecture model_type={model_type!r}; supported: {known}")


def spec_for_family(family: str) -> ArchSpec:
    for spec in ARCHITECTURES:
        if spec.family == family:
            return spec
    raise UnknownArchitectureError(f"unknown architecture family {family!r}; supported: {[s.family for s in ARCHITECTURES]}")


def spec_for(model: torch.nn.Module) -> ArchSpec:
    """The table entry for a Hugging Face model (by ``config.model_type``)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnknownArchitectureError(f"model of class {type(model).__name__!r} has no config.model_type")
    return spec_for_model_type(model_type)


def num_layers(model: torch.nn.Module) -> int:
    spec = spec_for(model)
    return int(getattr(model.config, spec.n_layers_attr))


def check_layers(model: torch.nn.Module, layers: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Validate layer indices against the model depth; returns them as a sorted tuple."""
    n = num_layers(model)
    if len(layers) == 0:
        raise LayerOutOfRangeError("at least one edit layer is required, got none")
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
            raise LayerOutOfRangeError(f"layer {layer!r} is out of range for a model with {n} layers (0..{n - 1})")
    if len(set(layers)) != len(layers):
        raise LayerOutOfRangeError(f"duplicate layers in {list(layers)!r}")
    return tuple(sorted(layers))


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise UnknownArchitectureError(f"model has no submodule {name!r}") from exc


def edited_weight(model: torch.nn.Module, layer: int) -> torch.nn.Parameter:
    """The live down-projection weight edited at `layer` (HF layout, see `ArchSpec.hf_layout`)."""
    return get_module(model, spec_for(model).down_proj_name(layer)).weight


def to_out_in(weight: torch.Tensor, layout: Layout) -> torch.Tensor:
    """View a weight as [d_out, d_in] given its declared layout (no copy)."""
    return weight if layout is Layout.OUT_IN else weight.t()
