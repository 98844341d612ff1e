"""Helpers shared by the ledger tests: small synthetic patches and their base weight."""

from __future__ import annotations

import hashlib

import torch

from editserve.editing.requests import EditRequest
from editserve.patches import Patch, WeightDelta

FP = hashlib.sha256(b"synthetic test model").hexdigest()
NAME = "model.layers.0.mlp.down_proj.weight"
NAME2 = "model.layers.1.mlp.down_proj.weight"
SHAPE = (64, 32)          # (d_out, d_in)


def base_weights(shape: tuple[int, int] = SHAPE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {NAME: torch.randn(shape, generator=g), NAME2: torch.randn(shape, generator=g)}


def synth_patch(seed: int, names: tuple[str, ...] = (NAME,), shape: tuple[int, int] = SHAPE, rank: int = 1,
                scale: float = 0.05, fp: str = FP) -> Patch:
    g = torch.Generator().manual_seed(seed)
    deltas = tuple(WeightDelta(name=n, layer=int(n.split(".")[2]), u=torch.randn(shape[0], rank, generator=g) * scale,
                               v=torch.randn(shape[1], rank, generator=g)) for n in names)
    req = EditRequest(prompt="{} is located in the city of", subject=f"Landmark {seed}", target_new=" Rome")
    return Patch(deltas=deltas, requests=(req,), method="rome", hparams={"layer": 0, "seed": seed},
                 model_fingerprint=fp, family="llama")


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
