"""Consolidation: a long ledger's accumulated update re-solved as one least-disturbance update.

Each sequential commit regularises only its own increment (alphaedit.py, memit.py), so the sum
ΔW = Σ U Vᵀ of many commits drifts in directions no committed edit needs, and ordinary text pays
for it (docs/lifelong.md). Consolidation keeps what ΔW does to the committed edits' keys and
drops the rest. At one layer, with K [d_in, N] the keys of every committed edit there (the
preserved-keys state) and C [d_in, d_in] the layer's key statistics:

    V  = ΔW K                                          [d_out, N]  what the edits need
    A  = C + μ · (tr C / d_in) · I                     [d_in, d_in] μ = `ridge` (A positive definite)
    ΔW* = argmin tr(ΔW A ΔWᵀ)  subject to  ΔW K = V
        = V (Kᵀ A⁻¹ K)⁻¹ Kᵀ A⁻¹                      (ROME's closed form with N keys)

so ΔW* K = ΔW K exactly (up to the solve's rounding): each edited layer's output on each committed
key is unchanged, while ordinary keys (weighted by C) are moved as little as any update that
does that can. Pure maths: nothing here touches a model; solved in float64, returned as float32
factors.

Cost bounded by the layer, not the ledger. ΔW* depends on K only through its range: with Q
[d_in, r] an orthonormal basis of range(K) (r = rank K ≤ min(N, d_in)),

    ΔW* = ΔW P,   P = Q (QᵀA⁻¹Q)⁻¹ QᵀA⁻¹              (the A⁻¹-oblique projector onto range(K))
    U = ΔW Q [d_out, r],   Vᵀ-factor = A⁻¹Q (QᵀA⁻¹Q)⁻¹ [d_in, r]

which is the closed form above whenever K has full column rank, and stays defined when it does
not: past d_in committed keys (1,536 on SmolLM2) the N×N system KᵀA⁻¹K is singular and O(N³),
while this one is r×r with r ≤ d_in. Q comes from the SVD of K; directions whose singular value
is below float32 resolution of the keys (σ ≤ σ_max · max(d_in, N) · ε₃₂) are noise, not
constraints (σ from the SVD of K, or past d_in keys from the eigenvalues of K Kᵀ, d_in × d_in).
A factor pair wider than d_out is then re-factored through a QR of U (U Vᵀ =
Q₂ (V R₂ᵀ)ᵀ), so a consolidated patch has rank ≤ min(d_out, d_in) however many edits it holds:
at most (d_out + d_in)·min(d_out, d_in) numbers per layer, 1.4× the dense matrix on SmolLM2
(rank N factors would be 2.4× it at 1,000 edits and 24× at 10,000).

Incrementally (`consolidate_increment`). ΔW* = ΔW P is linear in ΔW, and an update already
consolidated on keys whose range lies in range(K), under the same A, is left unchanged by P
(ΔW₁* = M Q₁ᵀA⁻¹ with Q₁ = Q R, so ΔW₁* P = M Rᵀ G G⁻¹ QᵀA⁻¹ = ΔW₁*, G = QᵀA⁻¹Q). So after a
consolidation ΔW₁*, re-solving ΔW₁* + S (S = U Vᵀ: the commits since) on the grown key set is
ΔW₁* + S P, and S P = U (PᵀV)ᵀ with PᵀV = A⁻¹Q G⁻¹ QᵀV keeps S's rank. A ledger stores only that
increment: rank ≤ the facts committed since the last consolidation, instead of min(N, d_out) for
every consolidation (24 MiB each on SmolLM2 past 576 edits, docs/ledger.md "Consolidation").

Across layers (`ConsolidateParams.across_layers`). Every edited down-projection writes into the same
residual stream, and what an edit needs is the sum of the layers' outputs on its keys, not each
layer's share (MEMIT's spread fixes the shares at commit time; AlphaEdit's projection leaves the
early layers short, so the last layer of the range carries most of the update and of the damage).
With K_l [d_in, N] the same N edits' keys at each layer l (columns aligned across layers):

    V  = Σ_l ΔW_l K_l                                  [d_out, N]
    min Σ_l tr(ΔW_l A_l ΔW_lᵀ)  subject to  Σ_l ΔW_l K_l = V
    ΔW_l* = V G⁻¹ K_lᵀ A_l⁻¹,   G = Σ_l K_lᵀ A_l⁻¹ K_l  [N, N]     (Lagrange: ΔW_l A_l = Λ K_lᵀ)

so the layer where an edit's key stands out most from ordinary text carries most of that edit. It
keeps the sum exactly, not each layer's part: a change at an earlier layer also moves the later
layers' keys of the edit prompts, which the sum ignores (the same first-order view as MEMIT's
spread), so a caller checks the committed facts on the result. Measured on SmolLM2 (docs/lifelong.md,
"Session 9"): a fifth less perplexity damage than the per-layer solve, and 5 % of the committed edits
broken, so the ledger does not offer it; it is here for the benchmark and for a later attempt.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from editserve.errors import InvalidRequestError, NonFiniteError, PatchMismatchError


@dataclass(frozen=True)
class ConsolidateParams:
    ridge: float = 0.1         # μ: A = C + μ·mean eigenvalue·I (0 < μ; small = C-weighted, large = Euclidean)
    across_layers: bool = False  # keep Σ_l ΔW_l K_l (the edits' total) instead of each layer's ΔW_l K_l

    def __post_init__(self) -> None:
        if not (isinstance(self.ridge, (int, float)) and math.isfinite(self.ridge) and self.ridge > 0):
            raise InvalidRequestError(f"consolidation ridge must be a positive finite number, got {self.ridge!r}")
        if not isinstance(self.across_layers, bool):
            raise InvalidRequestError(f"across_layers must be a boolean, got {self.across_layers!r}")


@dataclass(frozen=True)
class Consolidated:
    layer: int
    u: torch.Tensor            # [d_out, r] float32, r ≤ min(d_out, d_in, N)
    v: torch.Tensor            # [d_in, r] float32; ΔW* = u vᵀ
    n_keys: int                # N: the committed keys whose outputs are kept
    penalty_before: float      # tr(ΔW A ΔWᵀ) of the accumulated update
    penalty_after: float       # the same for ΔW* (never larger: ΔW is feasible)


def _checked(delta: torch.Tensor, keys: torch.Tensor, cov: torch.Tensor, layer: int,
             params: ConsolidateParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shapes checked; float64 (ΔW [d_out, d_in], K [d_in, N], A [d_in, d_in])."""
    d_out, d_in = delta.shape
    if keys.dim() != 2 or keys.shape[0] != d_in or keys.shape[1] == 0:
        raise PatchMismatchError(f"layer {layer}: need committed keys [d_in={d_in}, N ≥ 1], got {tuple(keys.shape)}")
    if tuple(cov.shape) != (d_in, d_in):
        raise PatchMismatchError(f"layer {layer}: statistics are {tuple(cov.shape)}, the layer takes d_in={d_in}")
    d = delta.to(torch.float64)
    k = keys.to(torch.float64)                                            # [d_in, N]
    c = cov.to(torch.float64)
    a = (c + c.T) / 2 + params.ridge * float(torch.trace(c)) / d_in * torch.eye(d_in, dtype=torch.float64)
    return d, k, a


def _solve_gram(g: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """G⁻¹ rhs for G = KᵀA⁻¹K [N, N] (PSD). Repeated or dependent keys make G singular; a jitter far
    below its scale keeps the solve defined (the constraint is consistent: V = ΔW K has the same
    dependence)."""
    g = g + 1e-10 * float(torch.trace(g)) / g.shape[0] * torch.eye(g.shape[0], dtype=torch.float64)
    return torch.linalg.solve(g, rhs)


def key_basis(keys: torch.Tensor) -> torch.Tensor:
    """Q [d_in, r] float64: an orthonormal basis of range(keys [d_in, N]), without the directions
    below float32 resolution of the keys (module docstring); r ≥ 1 for keys that are not all zero."""
    k = keys.to(torch.float64)
    if k.shape[1] <= k.shape[0]:
        q, s, _ = torch.linalg.svd(k, full_matrices=False)                # q [d_in, N], s descending
    else:                                                                  # N > d_in: eigh of K Kᵀ [d_in, d_in]
        lam, vecs = torch.linalg.eigh(k @ k.T)                            # ascending; λ = σ²
        q, s = vecs.flip(1), lam.clamp_min(0).sqrt().flip(0)
    tol = float(s[0]) * max(k.shape) * torch.finfo(torch.float32).eps
    return q[:, s > tol]


def _narrowed(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product u vᵀ with at most d_out columns: u = Q₂R₂ → (Q₂, v R₂ᵀ)."""
    if u.shape[1] <= u.shape[0]:
        return u, v
    q2, r2 = torch.linalg.qr(u)                                           # [d_out, d_out], [d_out, r]
    return q2, v @ r2.T


def _result(layer: int, d: torch.Tensor, a: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
            n_keys: int, held: torch.Tensor | None = None) -> Consolidated:
    """u vᵀ replaces d; the penalties are of the layer's whole update (`held`, what stays, plus each)."""
    u, v = _narrowed(u, v)
    if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
        raise NonFiniteError(f"consolidation of layer {layer} is not finite")
    new = u @ v.T
    if held is not None:
        d, new = held + d, held + new
    return Consolidated(layer=layer, u=u.to(torch.float32), v=v.to(torch.float32), n_keys=n_keys,
                        penalty_before=float(torch.trace(d @ a @ d.T)), penalty_after=float(torch.trace(new @ a @ new.T)))


def _oblique(k: torch.Tensor, a: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q [d_in, r], A⁻¹Q (QᵀA⁻¹Q)⁻¹ [d_in, r]): P = Q · (the second)ᵀ, the A⁻¹-oblique projector onto range(K)."""
    q = key_basis(k)                                                       # [d_in, r]
    if q.shape[1] == 0:
        raise PatchMismatchError(f"layer {layer}: the committed keys are all zero")
    a_inv_q = torch.linalg.solve(a, q)                                     # A⁻¹Q [d_in, r]
    return q, torch.linalg.solve(q.T @ a_inv_q, a_inv_q.T).T


def consolidate_layer(delta: torch.Tensor, keys: torch.Tensor, cov: torch.Tensor, layer: int,
                      params: ConsolidateParams = ConsolidateParams()) -> Consolidated:
    """ΔW* for one layer. delta [d_out, d_in] (the accumulated update), keys [d_in, N], cov [d_in, d_in].
    Solved on a basis of the keys' range (module docstring), so the cost is bounded by d_in, not N."""
    d, k, a = _checked(delta, keys, cov, layer, params)
    q, v = _oblique(k, a, layer)                                           # v = A⁻¹Q (QᵀA⁻¹Q)⁻¹ [d_in, r]
    return _result(layer, d, a, d @ q, v, n_keys=int(k.shape[1]))          # U = ΔW Q [d_out, r]


def consolidate_increment(u: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, cov: torch.Tensor, layer: int,
                          params: ConsolidateParams = ConsolidateParams(),
                          held: torch.Tensor | None = None) -> Consolidated:
    """S P for the update S = u vᵀ (u [d_out, m], v [d_in, m]: the commits since the last
    consolidation) on every committed key K [d_in, N] (theirs and the earlier consolidations'),
    in factored form u (PᵀV)ᵀ: rank ≤ m (module docstring, "Incrementally"). `held` [d_out, d_in],
    the layer's already consolidated update that stays as it is, only enters the penalties."""
    if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1]:
        raise PatchMismatchError(f"layer {layer}: factors {tuple(u.shape)} and {tuple(v.shape)} do not pair")
    d, k, a = _checked(u.double() @ v.double().T, keys, cov, layer, params)
    q, w = _oblique(k, a, layer)                                           # P = Q wᵀ, Pᵀ = w Qᵀ
    base = None if held is None else held.to(torch.float64)
    if base is not None and base.shape != d.shape:
        raise PatchMismatchError(f"layer {layer}: held update {tuple(base.shape)}, increment {tuple(d.shape)}")
    return _result(layer, d, a, u.double(), w @ (q.T @ v.double()), n_keys=int(k.shape[1]), held=base)


def resolve_without(delta: torch.Tensor, keys: torch.Tensor, dropped: torch.Tensor, cov: torch.Tensor, layer: int,
                    params: ConsolidateParams = ConsolidateParams()) -> Consolidated:
    """A consolidated update re-solved without some of its edits: the least tr(ΔW' A ΔW'ᵀ) with

        ΔW' k = ΔW k   for every kept key k      (the other edits keep their outputs)
        ΔW' k = 0      for every dropped key k   (the layer answers as it did before any of them)

    delta [d_out, d_in] (the consolidated update), keys [d_in, N], dropped [N] bool (True: a key of
    an edit to take out). On the same basis of range(K) as `consolidate_layer` (K = Q R, R = QᵀK
    [r, N]): ΔW'Q = V' R⁺ with V' = ΔW K, dropped columns zeroed — the exact solution when the
    dropped keys are independent of the kept ones, the least-squares compromise when they are not
    (past d_in keys, or a key repeated by two edits); the caller checks the facts on the result. With
    nothing dropped it is `consolidate_layer` (R R⁺ = I)."""
    d, k, a = _checked(delta, keys, cov, layer, params)
    if dropped.dtype != torch.bool or tuple(dropped.shape) != (k.shape[1],):
        raise PatchMismatchError(f"layer {layer}: dropped must be a bool mask over the {k.shape[1]} keys, "
                                 f"got {dropped.dtype} {tuple(dropped.shape)}")
    q, v = _oblique(k, a, layer)                                           # v = A⁻¹Q (QᵀA⁻¹Q)⁻¹ [d_in, r]
    target = d @ k                                                         # V' [d_out, N]
    target[:, dropped] = 0.0
    r_mat = q.T @ k                                                        # R [r, N]
    u = torch.linalg.lstsq(r_mat.T, target.T).solution.T                  # ΔW'Q = V' R⁺ [d_out, r]
    return _result(layer, d, a, u, v, n_keys=int((~dropped).sum()))


@dataclass(frozen=True)
class EditPrices:
    """What the committed edits cost one layer under its least-disturbance update (`edit_prices`)."""

    layer: int
    total: float               # tr(V G⁻¹ Vᵀ): the penalty of `consolidate_layer`'s ΔW*
    marginal: torch.Tensor     # [N] float64: how much `total` falls without edit j's constraint
    alone: torch.Tensor        # [N] float64: edit j's penalty were it the only one, ‖v_j‖² / (k_jᵀA⁻¹k_j)


def edit_prices(delta: torch.Tensor, keys: torch.Tensor, cov: torch.Tensor, layer: int,
                params: ConsolidateParams = ConsolidateParams()) -> EditPrices:
    """The price of each committed edit at one layer (a diagnostic; nothing is changed). With
    G = KᵀA⁻¹K [N, N], V = ΔW K and Λ = V G⁻¹ (the multipliers of the constraint ΔW K = V):

        total      = tr(V G⁻¹ Vᵀ)                  the least penalty that keeps every edit's output
        marginal_j = ‖Λ_j‖² / (G⁻¹)_jj             what dropping edit j alone would save
        alone_j    = ‖v_j‖² / G_jj                  what edit j costs without the others

    (marginal: the Schur complement of G⁻¹ at j, per output row.) Exact for independent keys
    (N ≤ d_in); past that G is singular and the jitter of `_solve_gram` makes it approximate."""
    d, k, a = _checked(delta, keys, cov, layer, params)
    v = d @ k                                                              # V [d_out, N]
    g = k.T @ torch.linalg.solve(a, k)                                     # G [N, N]
    g_inv = _solve_gram(g, torch.eye(g.shape[0], dtype=torch.float64))
    lam = v @ g_inv                                                        # Λ [d_out, N]
    return EditPrices(layer=layer, total=float((lam * v).sum()), marginal=(lam ** 2).sum(0) / torch.diagonal(g_inv),
                      alone=(v ** 2).sum(0) / torch.diagonal(g))


def consolidate_across_layers(deltas: Mapping[int, torch.Tensor], keys: Mapping[int, torch.Tensor],
                              covs: Mapping[int, torch.Tensor],
                              params: ConsolidateParams = ConsolidateParams()) -> dict[int, Consolidated]:
    """ΔW_l* = V G⁻¹ K_lᵀ A_l⁻¹ for every layer (module docstring): the layers' summed output on the
    edits' keys is kept, and shared among the layers at the least total tr(ΔW_l A_l ΔW_lᵀ). The keys'
    columns must be the same edits in the same order at every layer."""
    widths = {layer: int(k.shape[1]) if k.dim() == 2 else -1 for layer, k in keys.items()}
    if len(set(widths.values())) != 1:
        raise PatchMismatchError(f"consolidating across layers needs the same edits' keys at every layer, "
                                 f"got key counts {widths}")
    solved = {}
    for layer, delta in sorted(deltas.items()):
        d, k, a = _checked(delta, keys[layer], covs[layer], layer, params)
        solved[layer] = (d, k, a, torch.linalg.solve(a, k))              # …, A⁻¹K [d_in, N]
    v_total = sum(d @ k for d, k, _, _ in solved.values())                # Σ_l ΔW_l K_l [d_out, N]
    g = sum(k.T @ a_inv_k for _, k, _, a_inv_k in solved.values())        # Σ_l K_lᵀ A_l⁻¹ K_l [N, N]
    return {layer: _result(layer, d, a, v_total, _solve_gram(g, a_inv_k.T).T, n_keys=int(k.shape[1]))
            for layer, (d, k, a, a_inv_k) in solved.items()}              # V_l = A_l⁻¹K_l G⁻¹ [d_in, N]


def require_statistics(layers: Iterable[int], covs: Mapping[int, torch.Tensor]) -> None:
    """Refuse (`PatchMismatchError`) a consolidation at `layers` when `covs` lacks a layer's statistics."""
    no_stats = sorted(set(layers) - set(covs))
    if no_stats:
        raise PatchMismatchError(f"no key statistics for layer(s) {no_stats}")


def consolidate(deltas: Mapping[int, torch.Tensor], keys: Mapping[int, torch.Tensor], covs: Mapping[int, torch.Tensor],
                params: ConsolidateParams = ConsolidateParams()) -> dict[int, Consolidated]:
    """`consolidate_layer` for every layer of `deltas` ({layer: ΔW [d_out, d_in]}); each needs keys
    ({layer: [d_in, N]}) and statistics ({layer: C}). A layer without committed keys is refused, not
    zeroed: consolidating it would silently drop whatever its update does."""
    missing = sorted(set(deltas) - set(keys))
    if missing:
        raise PatchMismatchError(f"no committed keys at layer(s) {missing}: their updates cannot be consolidated")
    require_statistics(deltas, covs)
    if params.across_layers:
        return consolidate_across_layers(deltas, keys, covs, params)
    return {layer: consolidate_layer(d, keys[layer], covs[layer], layer, params) for layer, d in sorted(deltas.items())}
