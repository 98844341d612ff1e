"""A patch difference as a PEFT LoRA adapter directory that vLLM loads per request.

An edit's ΔW = U Vᵀ on a down-projection is exactly a LoRA with B = U [d_out, r] and
A = Vᵀ [r, d_in] and scale alpha / r = 1. A candidate's difference from the head (patches
added with sign +1, patches removed with sign −1) becomes one adapter: per touched weight
the factors are concatenated, B = [±U₁ | ±U₂ | …], A = [V₁ᵀ; V₂ᵀ; …], zero-padded to one
rank for all weights (PEFT's config has one ``r``); alpha = r so the scale is exactly 1.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from editserve.errors import InvalidRequestError
from editserve.patches import Patch

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TARGET_MODULE = "down_proj"


class RankTooLarge(InvalidRequestError):
    """The candidate's rank exceeds the engine's ``--max-lora-rank``."""

    def __init__(self, rank: int, max_rank: int) -> None:
        super().__init__(f"the candidate needs LoRA rank {rank}, above the engine's max_lora_rank {max_rank} "
                         f"(restart with a larger --max-lora-rank or stage fewer patches)")
        self.rank = rank
        self.max_rank = max_rank


@dataclass(frozen=True)
class AdapterFactors:
    """Per weight (Hugging Face name) the LoRA factors A [r, d_in] and B [d_out, r], float32."""

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    rank: int

    @property
    def weight_names(self) -> tuple[str, ...]:
        return tuple(sorted(self.a))


def factors_of(signed: Sequence[tuple[int, Patch]]) -> AdapterFactors:
    """The adapter factors of Σ sign · U Vᵀ over the given patches (applied in order)."""
    us: dict[str, list[torch.Tensor]] = {}
    vs: dict[str, list[torch.Tensor]] = {}
    for sign, patch in signed:
        if sign not in (1, -1):
            raise InvalidRequestError(f"sign must be +1 or -1, got {sign!r}")
        for d in patch.deltas:
            if not d.name.endswith(f".{TARGET_MODULE}.weight"):
                raise InvalidRequestError(f"patch {patch.digest[:12]} ({patch.method}) changes {d.name!r}; a candidate "
                                          f"is a LoRA adapter on the {TARGET_MODULE} weights only (a gated neuron "
                                          "cannot be staged: commit it)")
            us.setdefault(d.name, []).append(d.u * float(sign))     # [d_out, r_i]
            vs.setdefault(d.name, []).append(d.v)                   # [d_in, r_i]
    if not us:
        raise InvalidRequestError("the candidate changes no weight (no patch added or removed)")
    ranks = {n: sum(int(u.shape[1]) for u in us[n]) for n in us}
    rank = max(ranks.values())
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for name in us:
        u = torch.cat(us[name], dim=1)                               # [d_out, r_n]
        v = torch.cat(vs[name], dim=1)                               # [d_in, r_n]
        pad = rank - u.shape[1]
        if pad:
            u = torch.cat([u, u.new_zeros(u.shape[0], pad)], dim=1)
            v = torch.cat([v, v.new_zeros(v.shape[0], pad)], dim=1)
        b[name] = u.contiguous()                                     # [d_out, rank]
        a[name] = v.T.contiguous()                                   # [rank, d_in]
    return AdapterFactors(a=a, b=b, rank=rank)


def peft_key(weight_name: str, which: str) -> str:
    """``model.layers.5.mlp.down_proj.weight`` → ``base_model.model.model.layers.5.mlp.down_proj.lora_A.weight``."""
    if not weight_name.endswith(".weight"):
        raise InvalidRequestError(f"weight name {weight_name!r} does not end in '.weight'")
    return f"base_model.model.{weight_name[:-len('.weight')]}.lora_{which}.weight"


def write_adapter(factors: AdapterFactors, directory: Path, base_model: str, max_rank: int | None = None) -> Path:
    """Write a PEFT adapter directory (config + safetensors); `RankTooLarge` above `max_rank`."""
    from safetensors.torch import save_file

    if max_rank is not None and factors.rank > max_rank:
        raise RankTooLarge(factors.rank, max_rank)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name in factors.weight_names:
        tensors[peft_key(name, "A")] = factors.a[name]
        tensors[peft_key(name, "B")] = factors.b[name]
    save_file(tensors, str(directory / WEIGHTS_FILE))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": factors.rank, "lora_alpha": factors.rank, "lora_dropout": 0.0, "bias": "none",
              "target_modules": [TARGET_MODULE], "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": False, "modules_to_save": None}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return directory
