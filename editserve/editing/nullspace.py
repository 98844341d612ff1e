"""Null-space projection of a layer's key statistics (AlphaEdit, Fang et al. 2025, arXiv 2410.02355).

With C = E[k kᵀ] [d_in, d_in] the uncentred second moment of the down-projection input over
ordinary text, eigendecomposed in float64 as C = Q Λ Qᵀ, the projection keeps the directions
that ordinary text hardly uses:

    Q̂ = the columns of Q with eigenvalue λ < threshold        [d_in, m]
    P = Q̂ Q̂ᵀ                                                  [d_in, d_in], P = Pᵀ = P²

An update ΔW with ΔW = ΔW P moves an ordinary key k by ΔW k = ΔW P k, and ‖P k‖ is small for
keys drawn from C (E‖P k‖² = Σ_{λ<threshold} λ). P depends only on C and the threshold, so it is
cached on disk keyed by (model fingerprint, statistics key, threshold).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from editserve.atomicfile import publish
from editserve.config import cache_dir
from editserve.errors import InvalidRequestError, NonFiniteError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Projection:
    layer: int
    p: torch.Tensor          # [d_in, d_in] float64, Q̂ Q̂ᵀ
    kept: int                # m, number of eigen-directions kept (eigenvalue < threshold)
    threshold: float
    kept_energy: float       # Σ_{kept} λ / Σ λ: share of ordinary keys' energy the update can still touch


def null_space(cov: torch.Tensor, threshold: float, layer: int = -1) -> Projection:
    """P from covariance `cov` [d_in, d_in] and an absolute eigenvalue `threshold` (float64 eigh)."""
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise InvalidRequestError(f"nullspace_threshold must be a positive finite number, got {threshold!r}")
    c = cov.to(torch.float64)
    c = (c + c.T) / 2
    evals, evecs = torch.linalg.eigh(c)                     # ascending, [d_in], [d_in, d_in]
    if not torch.isfinite(evals).all():
        raise NonFiniteError(f"eigenvalues of layer {layer}'s statistics are not finite")
    mask = evals < threshold
    q = evecs[:, mask]                                      # [d_in, m]
    total = evals.clamp(min=0).sum()
    energy = float(evals[mask].clamp(min=0).sum() / total) if total > 0 else 0.0
    return Projection(layer=layer, p=q @ q.T, kept=int(mask.sum()), threshold=float(threshold), kept_energy=energy)


def _cache_path(model_fp: str, stats_key: str, threshold: float) -> Path:
    return cache_dir("nullspace", model_fp[:16]) / f"{stats_key}-t{threshold!r}.safetensors"


def cached_null_space(cov: torch.Tensor, threshold: float, layer: int, model_fp: str, stats_key: str) -> Projection:
    """`null_space`, read from / written to the on-disk cache keyed by (model, statistics key, threshold).

    `stats_key` must identify the statistics `cov` came from (see `stats.stats_key`; it names the layer).
    """
    from safetensors.torch import load_file, save_file

    path = _cache_path(model_fp, stats_key, threshold)
    if path.exists():
        t = load_file(str(path))
        return Projection(layer=layer, p=t["p"], kept=int(t["kept"].item()), threshold=float(threshold),
                          kept_energy=float(t["kept_energy"].item()))
    proj = null_space(cov, threshold, layer)
    publish(path, lambda tmp: save_file({"p": proj.p.contiguous(), "kept": torch.tensor(proj.kept),
                                         "kept_energy": torch.tensor(proj.kept_energy, dtype=torch.float64)}, str(tmp)))
    log.info("null space of layer %d: %d of %d directions below %g (%.2f%% of the energy)",
             layer, proj.kept, cov.shape[0], threshold, 100 * proj.kept_energy)
    return proj


@dataclass(frozen=True)
class NullSpaceUse:
    """How much of one layer's null space the committed edits' keys take (see `null_space_use`)."""

    layer: int
    directions: int          # m: directions in range(P), where AlphaEdit's update lies
    committed_keys: int      # N: committed keys at the layer (the preserved-keys state)
    taken: int               # directions of range(P) in which the committed keys weigh more than `bound`

    @property
    def ratio(self) -> float:
        """taken / directions: 0 for an unedited layer, 1 when no direction is left for a new edit
        that would not disturb committed keys more than ordinary text may be disturbed."""
        return self.taken / self.directions if self.directions else 1.0


def null_space_use(proj: Projection, keys: torch.Tensor | None, bound: float) -> NullSpaceUse:
    """The committed keys' energy inside range(P): the eigenvalues of KᵀPK (the same as Q̂ᵀKKᵀQ̂'s
    non-zero ones), counted where they exceed `bound`. AlphaEdit's solve weighs a direction x of
    range(P) by xᵀ(K_pK_pᵀ + λC + αI)x; inside range(P) ordinary text adds at most λ·threshold, so
    `bound` = α + λ·threshold says when committed keys, not ordinary text, make a direction costly.
    keys [d_in, N] (None or N = 0: nothing taken). float64; O(d_in²N + min(N, d_in)³)."""
    if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
        raise InvalidRequestError(f"null-space use bound must be a positive finite number, got {bound!r}")
    n = 0 if keys is None else int(keys.shape[1])
    if n == 0:
        return NullSpaceUse(layer=proj.layer, directions=proj.kept, committed_keys=0, taken=0)
    k = keys.to(torch.float64)                                  # [d_in, N]
    if k.shape[0] != proj.p.shape[0]:
        raise InvalidRequestError(f"layer {proj.layer}: keys have d_in={k.shape[0]}, the projection "
                                  f"{proj.p.shape[0]}")
    pk = proj.p.to(torch.float64) @ k                           # [d_in, N]
    energy = torch.linalg.eigvalsh(k.T @ pk if n <= k.shape[0] else pk @ pk.T)
    return NullSpaceUse(layer=proj.layer, directions=proj.kept, committed_keys=n,
                        taken=min(int((energy > bound).sum()), proj.kept))
