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


def rome_factors(cov: torch.Tensor, key: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-one factors (U [d_out,1], V [d_in,1]) float32 with U Vᵀ = δ uᵀ / (uᵀ k*).

    cov [d_in, d_in], key [d_in], delta [d_out].
    """
    c = cov.to(torch.float64)
    k = key.to(torch.float64)
    u = torch.linalg.solve(c, k)                                  # [d_in]
    denom = torch.dot(u, k)
    if not torch.isfinite(denom) or denom.abs() < 1e-30:
        raise NonFiniteError(f"ROME solve is degenerate: uᵀk* = {denom.item()!r}")
    left = (delta.to(torch.float64) / denom)[:, None]             # [d_out, 1]
    right = u[:, None]                                            # [d_in, 1]
    return left.float(), right.float()
