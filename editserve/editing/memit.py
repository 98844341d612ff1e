"""MEMIT: many edits spread over a range of layers (Meng et al. 2023, arXiv 2210.07229).

δ is optimised on the residual stream at the last edit layer L. Layers are then updated in
order; at layer l, with K [d_in, n] the prefix-averaged keys (earlier layers' updates already
in effect) and R [d_out, n] the residual still missing at L divided by the number of layers
left:

    ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹      solved in float64
         = U Vᵀ with U = R, V = (λ C_l + K Kᵀ)⁻¹ K     (rank ≤ n)
"""

from __future__ import annotations

import torch


def memit_factors(cov: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor, cov_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (U [d_out,n], V [d_in,n]) float32 of ΔW = R Kᵀ(λC + KKᵀ)⁻¹.

    cov [d_in, d_in], keys [n, d_in], resid [n, d_out].
    """
    c = cov.to(torch.float64)
    k = keys.to(torch.float64).T                   # [d_in, n]
    a = cov_weight * c + k @ k.T                   # [d_in, d_in], symmetric positive definite
    v = torch.linalg.solve(a, k)                   # [d_in, n]
    u = resid.to(torch.float64).T                  # [d_out, n]
    return u.float(), v.float()
