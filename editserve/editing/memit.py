"""MEMIT: many edits spread over a range of layers (Meng et al. 2023, arXiv 2210.07229).

δ is optimised on the residual stream at the last edit layer L. Layers are then updated in
order; at layer l, with K [d_in, n] the prefix-averaged keys (earlier layers' updates already
in effect) and R [d_out, n] the residual still missing at L divided by the number of layers
left:

    ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹      solved in float64
         = U Vᵀ with U = R, V = (λ C_l + K Kᵀ)⁻¹ K     (rank ≤ n)

`keys="per_prompt"` fits every prompt's key (bare and each prefixed copy, m per request) instead
of their mean, each with weight 1/m, all asked for the request's residual:

    ΔW_l = Σ_r R_r (1/m Σ_j k_rj)ᵀ A⁻¹,   A = λ C_l + 1/m Σ_rj k_rj k_rjᵀ
         = U Vᵀ with U = R, V_r = A⁻¹ k̄_r                (still rank ≤ n)

so only A changes: it sees the spread of each request's keys over contexts, not only their mean.
What a later commit preserves (`preserved_columns`) is the same second moment: the m prompt keys
scaled by 1/√m, whose K Kᵀ is the 1/m Σ k kᵀ this fit used (with mean keys, the mean keys).
"""

from __future__ import annotations

import math

import torch


def key_second_moment(keys: torch.Tensor, prompt_keys: torch.Tensor | None = None) -> torch.Tensor:
    """[d_in, d_in] float64: K Kᵀ of the mean keys [n, d_in], or with prompt_keys [n, m, d_in] the mean over
    each request's m prompts of k kᵀ (summed over requests) — the "per_prompt" fit of MEMIT and AlphaEdit."""
    if prompt_keys is None:
        k = keys.to(torch.float64)
        return k.T @ k
    pk = prompt_keys.to(torch.float64).reshape(-1, prompt_keys.shape[-1])   # [n·m, d_in]
    return pk.T @ pk / prompt_keys.shape[1]


def preserved_columns(keys: torch.Tensor, prompt_keys: torch.Tensor | None = None) -> torch.Tensor:
    """[n, d_in] or [n·m, d_in] float32: the keys the preserved-keys state records for this fit — the mean
    keys, or with prompt_keys [n, m, d_in] every prompt's key scaled by 1/√m (request-major), so that their
    K Kᵀ is `key_second_moment` of the fit and a consolidation keeps the output on each prompt's key."""
    if prompt_keys is None:
        return keys.to(torch.float32)
    m = prompt_keys.shape[1]
    return (prompt_keys.to(torch.float64).reshape(-1, prompt_keys.shape[-1]) / math.sqrt(m)).float()


def memit_factors(cov: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor, cov_weight: float,
                  prompt_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (U [d_out,n], V [d_in,n]) float32 of ΔW = R Kᵀ(λC + KKᵀ)⁻¹.

    cov [d_in, d_in], keys [n, d_in] (the mean over each request's prompts), resid [n, d_out].
    prompt_keys [n, m, d_in]: when given, A = λC + mean over prompts of k kᵀ (see module docs).
    """
    c = cov.to(torch.float64)
    k = keys.to(torch.float64).T                   # [d_in, n]
    a = cov_weight * c + key_second_moment(keys, prompt_keys)   # [d_in, d_in], symmetric positive definite
    v = torch.linalg.solve(a, k)                   # [d_in, n]
    u = resid.to(torch.float64).T                  # [d_out, n]
    return u.float(), v.float()
