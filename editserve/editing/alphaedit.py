"""AlphaEdit: null-space-constrained updates that also preserve earlier edits' keys.

Per edited layer, with P the null-space projection of the layer's statistics (nullspace.py),
K₁ [d_in, n] the new edits' keys, R [d_out, n] their residual targets (MEMIT's, spread over the
layer range), K_p [d_in, N] the keys of edits already committed and α > 0:

    ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹                 (Fang et al. 2025, eq. 7)

Transposed, ΔWᵀ = X Rᵀ with X = (P M + α I)⁻¹ P K₁ [d_in, n], M = K_p K_pᵀ + K₁ K₁ᵀ, solved in
float64. So ΔW = U Vᵀ with U = R, V = X (rank ≤ n). Since α X = P (K₁ Rᵀ − M X), X = P X and the
update lies in the range of P (ΔW = ΔW P). It is the minimiser over D = D P of

    ‖D K₁ − R‖² + ‖D K_p‖² + α ‖D‖²,   normal equations  D (M + α I) P = R K₁ᵀ P.

`PreservedKeys` is the state carried from commit to commit: the key blocks K of every committed
patch, per layer and tagged with the patch's digest, never a running sum — so the state of any
version is `select`ed from the blocks of the patches active at that version.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from editserve.editing.memit import key_second_moment
from editserve.errors import InvalidRequestError, PatchMismatchError


@dataclass(frozen=True)
class KeyBlock:
    """The keys one patch wrote at one layer."""

    tag: str                 # the patch's digest
    layer: int
    keys: torch.Tensor       # [d_in, n] float32

    def __post_init__(self) -> None:
        if self.keys.dim() != 2 or self.keys.dtype != torch.float32:
            raise PatchMismatchError(f"key block {self.tag[:12]}@{self.layer} must be a float32 [d_in, n] "
                                     f"matrix, got {self.keys.dtype} {tuple(self.keys.shape)}")
        if not torch.isfinite(self.keys).all():
            raise PatchMismatchError(f"key block {self.tag[:12]}@{self.layer} contains NaN or infinity")


@dataclass(frozen=True)
class PreservedKeys:
    """Keys of committed edits, per layer, as blocks in commit order. An immutable value."""

    blocks: tuple[KeyBlock, ...] = ()

    def add(self, tag: str, layer: int, keys: torch.Tensor) -> "PreservedKeys":
        """A new state with `keys` [d_in, n] of patch `tag` at `layer` appended."""
        return PreservedKeys(self.blocks + (KeyBlock(tag, int(layer), keys.detach().to(torch.float32).cpu()),))

    def extend(self, other: "PreservedKeys") -> "PreservedKeys":
        return PreservedKeys(self.blocks + other.blocks)

    @property
    def tags(self) -> tuple[str, ...]:
        """Patch digests in commit order (each once)."""
        return tuple(dict.fromkeys(b.tag for b in self.blocks))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({b.layer for b in self.blocks}))

    def for_patch(self, tag: str) -> "PreservedKeys":
        return PreservedKeys(tuple(b for b in self.blocks if b.tag == tag))

    def select(self, tags: Iterable[str]) -> "PreservedKeys":
        """The state made of the blocks of patches `tags` only, in their commit order (e.g. the
        patches active at version n: the exact state at n)."""
        keep = set(tags)
        return PreservedKeys(tuple(b for b in self.blocks if b.tag in keep))

    def n_keys(self, layer: int) -> int:
        return sum(b.keys.shape[1] for b in self.blocks if b.layer == layer)

    def keys(self, layer: int) -> torch.Tensor | None:
        """Every block's keys at `layer`, in commit order, [d_in, N] float32; None when there are none."""
        ks = [b.keys for b in self.blocks if b.layer == layer]
        return torch.cat(ks, dim=1) if ks else None

    def edit_keys(self, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """Per layer [d_in, E]: one column per committed edit (each patch's columns, in commit order),
        the same edits in the same columns at every layer, zeros where an edit's patch wrote no keys
        at that layer (a ROME patch: one layer). What consolidating across layers needs. A patch whose
        blocks differ in width between layers, or a layer without any block, is refused."""
        layers = sorted(set(layers))
        width: dict[str, int] = {}
        for b in self.blocks:
            if width.setdefault(b.tag, b.keys.shape[1]) != b.keys.shape[1]:
                raise PatchMismatchError(f"patch {b.tag[:12]} has {width[b.tag]} keys at one layer and "
                                         f"{b.keys.shape[1]} at layer {b.layer}: its edits cannot be lined up")
        d_in = {b.layer: b.keys.shape[0] for b in self.blocks}
        missing = [layer for layer in layers if layer not in d_in]
        if missing:
            raise PatchMismatchError(f"no committed keys at layer(s) {missing}")
        out = {}
        for layer in layers:
            at = {b.tag: b.keys for b in self.blocks if b.layer == layer}
            out[layer] = torch.cat([at.get(t, torch.zeros(d_in[layer], width[t])) for t in self.tags], dim=1)
        return out

    def gram(self, layer: int, d_in: int) -> torch.Tensor:
        """Σ K Kᵀ over the blocks of `layer` [d_in, d_in] float64 (zeros when there are none)."""
        keys = self.keys(layer)
        if keys is None:
            return torch.zeros((d_in, d_in), dtype=torch.float64)
        k = keys.to(torch.float64)                           # [d_in, N]
        if k.shape[0] != d_in:
            raise PatchMismatchError(f"preserved keys at layer {layer} have d_in={k.shape[0]}, the layer has {d_in}")
        return k @ k.T

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat dict for safetensors: ``<i>::<layer>::<tag>`` -> K, i the block's position."""
        return {f"{i}::{b.layer}::{b.tag}": b.keys.contiguous() for i, b in enumerate(self.blocks)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "PreservedKeys":
        items = []
        for name, t in tensors.items():
            try:
                i, layer, tag = name.split("::", 2)
                items.append((int(i), KeyBlock(tag, int(layer), t)))
            except ValueError as exc:
                raise PatchMismatchError(f"bad preserved-keys entry name {name!r}") from exc
        return cls(tuple(b for _, b in sorted(items, key=lambda x: x[0])))


def alphaedit_factors(p: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor, preserved_gram: torch.Tensor,
                      alpha: float, cov: torch.Tensor | None = None,
                      cov_weight: float = 0.0,
                      prompt_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (U [d_out,n], V [d_in,n]) float32 of ΔW = R K₁ᵀ P (K_pK_pᵀ P + K₁K₁ᵀ P + λ C P + αI)⁻¹.

    p [d_in, d_in] the projection, keys [n, d_in] K₁ᵀ, resid [n, d_out] Rᵀ,
    preserved_gram [d_in, d_in] K_p K_pᵀ, alpha > 0; cov [d_in, d_in] C and cov_weight λ ≥ 0
    (λ = 0, the paper's update, needs no cov). See the module docs for why λ > 0.
    prompt_keys [n, m, d_in]: when given, K₁K₁ᵀ is replaced by the mean over each request's m prompts
    of k kᵀ — the update fits every prompt's key (bare and prefixed) instead of only their mean,
    which matters when the bare prompt's key differs from the prefixed ones (memit.py, "per_prompt").
    """
    if not alpha > 0:
        raise InvalidRequestError(f"alpha must be positive, got {alpha!r}")
    if not cov_weight >= 0:
        raise InvalidRequestError(f"cov_weight must be ≥ 0, got {cov_weight!r}")
    p64 = p.to(torch.float64)
    k = keys.to(torch.float64).T                                  # [d_in, n]
    m = preserved_gram.to(torch.float64) + key_second_moment(keys, prompt_keys)   # [d_in, d_in]
    if cov_weight > 0:
        if cov is None:
            raise InvalidRequestError("cov_weight > 0 needs the layer's covariance")
        m = m + cov_weight * cov.to(torch.float64)
    a = p64 @ m + alpha * torch.eye(m.shape[0], dtype=torch.float64)
    x = torch.linalg.solve(a, p64 @ k)                            # [d_in, n]
    return resid.to(torch.float64).T.float(), x.float()
