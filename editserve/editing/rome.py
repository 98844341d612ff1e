"""ROME: a rank-one update of one layer's down-projection (Meng et al. 2022, arXiv 2202.05262).

With k* the prefix-averaged key, δ the optimised change of the MLP output, and C = E[kkᵀ]:

    u  = C⁻¹ k*                       [d_in]   (float64 solve)
    ΔW = δ uᵀ / (uᵀ k*)               [d_out, d_in]   so that ΔW k* = δ exactly

The same averaged k* is used in the numerator and the denominator, and δ was optimised for
exactly those prefixed prompts (the r-ROME fix of ROME's model collapse, Gupta et al. 2024).
"""

from __future__ import annotations

import torch

from editserve.errors import NonFiniteError


def rome_direction(cov: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """u = C⁻¹ k* [d_in] float64."""
    return torch.linalg.solve(cov.to(torch.float64), key.to(torch.float64))


def prompt_scales(u: torch.Tensor, key: torch.Tensor, prompt_keys: torch.Tensor) -> torch.Tensor:
    """uᵀk_i / uᵀk* [..., n_prompts]: how much of δ the rank-one update gives each prompt's key."""
    return (prompt_keys.to(torch.float64) @ u / torch.dot(u, key.to(torch.float64))).float()


def rome_factors(u: torch.Tensor, key: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-one factors (U [d_out,1], V [d_in,1]) float32 with U Vᵀ = δ uᵀ / (uᵀ k*).

    u = `rome_direction(C, k*)` [d_in], key k* [d_in], delta [d_out].
    """
    k = key.to(torch.float64)
    u = u.to(torch.float64)
    denom = torch.dot(u, k)
    if not torch.isfinite(denom) or denom.abs() < 1e-30:
        raise NonFiniteError(f"ROME solve is degenerate: uᵀk* = {denom.item()!r}")
    left = (delta.to(torch.float64) / denom)[:, None]             # [d_out, 1]
    right = u[:, None]                                            # [d_in, 1]
    return left.float(), right.float()
