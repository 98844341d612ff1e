"""The low-rank `Patch` type and the merge/unmerge of patches into a live model.

A patch holds, for each edited weight, float32 factors U [d_out, r] and V [d_in, r] with
ΔW = U Vᵀ in (d_out, d_in) orientation, whatever the model's storage layout.

Computing a patch (editing/) never touches the model. Merging and unmerging are separate:

- `apply_patch` saves a base copy of each touched weight the first time it is touched, then
  writes ``base + Σ UVᵀ`` of every applied patch (float32, fixed order, cast once) into the
  existing parameter storage, after checking the result is finite on a copy.
- `remove_patch` rebuilds the weight from the saved base and the remaining patches; with no
  patch left it copies the base back, so weights are bit-identical to before. Nothing is
  ever subtracted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from editserve.editing.arch import Layout, spec_for
from editserve.editing.requests import EditRequest
from editserve.errors import NonFiniteError, PatchMismatchError, PatchStateError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class WeightDelta:
    """ΔW = u @ v.T for one weight, in (d_out, d_in) orientation."""

    name: str            # Hugging Face parameter name, e.g. "model.layers.5.mlp.down_proj.weight"
    layer: int
    u: torch.Tensor      # [d_out, r] float32
    v: torch.Tensor      # [d_in, r] float32

    def __post_init__(self) -> None:
        if self.u.dim() != 2 or self.v.dim() != 2 or self.u.shape[1] != self.v.shape[1]:
            raise PatchMismatchError(
                f"factors of {self.name!r} must be U[d_out,r] and V[d_in,r], got {tuple(self.u.shape)} and {tuple(self.v.shape)}"
            )
        if self.u.dtype != torch.float32 or self.v.dtype != torch.float32:
            raise PatchMismatchError(f"factors of {self.name!r} must be float32, got {self.u.dtype} and {self.v.dtype}")
        if not (torch.isfinite(self.u).all() and torch.isfinite(self.v).all()):
            raise NonFiniteError(f"factors of {self.name!r} contain NaN or infinity")

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in)."""
        return int(self.u.shape[0]), int(self.v.shape[0])

    def dense(self) -> torch.Tensor:
        """ΔW as a dense [d_out, d_in] float32 matrix."""
        return self.u @ self.v.T


@dataclass(frozen=True)
class Patch:
    """The result of one edit (ROME) or one batch of edits (MEMIT)."""

    deltas: tuple[WeightDelta, ...]
    requests: tuple[EditRequest, ...]
    method: str
    hparams: dict[str, Any]
    model_fingerprint: str
    family: str
    timings: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def weight_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.deltas)

    @functools.cached_property
    def digest(self) -> str:
        """Content hash of the factors and metadata (sha256 hex); the patch's identity. Computed
        once per object (patches are immutable; a swap at 10,000 active patches asks for every
        digest, and hashing all factors each time made version changes grow with the ledger)."""
        h = hashlib.sha256()
        h.update(json.dumps(self.manifest(include_digest=False), sort_keys=True).encode())
        for d in self.deltas:
            h.update(d.name.encode())
            h.update(d.u.contiguous().numpy().tobytes())
            h.update(d.v.contiguous().numpy().tobytes())
        return h.hexdigest()

    def nbytes(self) -> int:
        return sum(d.u.numel() * 4 + d.v.numel() * 4 for d in self.deltas)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict for safetensors: ``<name>::u`` and ``<name>::v``."""
        out: dict[str, torch.Tensor] = {}
        for d in self.deltas:
            out[f"{d.name}::u"] = d.u.contiguous()
            out[f"{d.name}::v"] = d.v.contiguous()
        return out

    def manifest(self, include_digest: bool = True) -> dict[str, Any]:
        m: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "family": self.family,
            "model_fingerprint": self.model_fingerprint,
            "hparams": self.hparams,
            "requests": [r.to_dict() for r in self.requests],
            "weights": [{"name": d.name, "layer": d.layer, "shape": list(d.shape), "rank": d.rank} for d in self.deltas],
        }
        if include_digest:
            m["digest"] = self.digest
        return m

    @classmethod
    def from_parts(cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "Patch":
        """Rebuild a patch from `manifest()` and `tensors()`; validates shapes, dtype, finiteness, digest."""
        try:
            deltas = []
            for w in manifest["weights"]:
                name = w["name"]
                u, v = tensors[f"{name}::u"], tensors[f"{name}::v"]
                if list(u.shape) != [w["shape"][0], w["rank"]] or list(v.shape) != [w["shape"][1], w["rank"]]:
                    raise PatchMismatchError(
                        f"factor shapes of {name!r} {tuple(u.shape)}, {tuple(v.shape)} do not match manifest {w}"
                    )
                deltas.append(WeightDelta(name=name, layer=int(w["layer"]), u=u, v=v))
            patch = cls(
                deltas=tuple(deltas),
                requests=tuple(EditRequest(**r) for r in manifest["requests"]),
                method=str(manifest["method"]),
                hparams=dict(manifest["hparams"]),
                model_fingerprint=str(manifest["model_fingerprint"]),
                family=str(manifest["family"]),
            )
        except KeyError as exc:
            raise PatchMismatchError(f"patch manifest or tensors lack the entry {exc.args[0]!r}") from exc
        want = manifest.get("digest")
        if want is not None and want != patch.digest:
            raise PatchMismatchError(f"patch digest mismatch: manifest says {want!r}, content hashes to {patch.digest!r}")
        return patch


def save_patch(patch: Patch, directory: str | Path) -> Path:
    """Write ``patch.safetensors`` and ``manifest.json`` into `directory`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(patch.tensors(), str(directory / "patch.safetensors"))
    (directory / "manifest.json").write_text(json.dumps(patch.manifest(), indent=2, sort_keys=True))
    return directory


def load_patch(directory: str | Path) -> Patch:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        tensors = load_file(str(directory / "patch.safetensors"))
    except FileNotFoundError as exc:
        raise PatchMismatchError(f"patch directory {str(directory)!r} is incomplete: {exc.filename} missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, SafetensorError) as exc:
        raise PatchMismatchError(f"cannot read patch from {str(directory)!r}: {exc}") from exc
    return Patch.from_parts(manifest, tensors)


def materialize(base: torch.Tensor, deltas: Sequence[WeightDelta], layout: Layout) -> torch.Tensor:
    """``cast(base + Σ u vᵀ)`` summed in float32 in the given order; `base` in `layout` orientation.

    The result is a new tensor with base's dtype and shape. No deltas → an exact copy of base.
    """
    if not deltas:
        return base.clone()
    acc = base.to(torch.float32, copy=True)
    view = acc if layout is Layout.OUT_IN else acc.t()  # [d_out, d_in]
    for d in deltas:
        if tuple(view.shape) != d.shape:
            raise PatchMismatchError(f"delta for {d.name!r} has shape {d.shape}, weight is {tuple(view.shape)} (d_out, d_in)")
        view.addmm_(d.u.to(acc.device), d.v.to(acc.device).T)
    return acc.to(base.dtype)


@dataclass
class _MergeState:
    """Per-model bookkeeping of applied patches: base copies and the applied order."""

    base: dict[str, torch.Tensor] = field(default_factory=dict)
    applied: list[Patch] = field(default_factory=list)
    acc: dict[str, torch.Tensor] = field(default_factory=dict)   # float32 base + Σ deltas of `applied` (hold_patches)


_STATE_ATTR = "_editserve_merge_state"


def _state(model: torch.nn.Module) -> _MergeState:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        state = _MergeState()
        object.__setattr__(model, _STATE_ATTR, state)
    return state


def applied_patches(model: torch.nn.Module) -> tuple[Patch, ...]:
    return tuple(_state(model).applied)


def _check_fits(model: torch.nn.Module, patch: Patch) -> None:
    spec = spec_for(model)
    if patch.family != spec.family:
        raise PatchMismatchError(f"patch is for architecture family {patch.family!r}, model is {spec.family!r}")
    params = dict(model.named_parameters())
    for d in patch.deltas:
        if d.name not in params:
            raise PatchMismatchError(f"model has no weight {d.name!r}")
        w = params[d.name]
        shape = tuple(w.shape) if spec.hf_layout is Layout.OUT_IN else tuple(w.shape[::-1])
        if shape != d.shape:
            raise PatchMismatchError(f"delta for {d.name!r} has shape {d.shape}, weight is {shape} (d_out, d_in)")


def _rewrite(model: torch.nn.Module, names: Iterable[str], applied: list[Patch]) -> None:
    """Rebuild each named weight from its base copy and `applied`, check, then write in place."""
    state = _state(model)
    layout = spec_for(model).hf_layout
    params = dict(model.named_parameters())
    new_values: dict[str, torch.Tensor] = {}
    for name in names:
        deltas = [d for p in applied for d in p.deltas if d.name == name]
        value = materialize(state.base[name], deltas, layout)
        if not torch.isfinite(value).all():
            raise NonFiniteError(f"merging the patches into {name!r} gives non-finite weights; nothing was changed")
        new_values[name] = value
    with torch.no_grad():
        for name, value in new_values.items():
            params[name].copy_(value)
            state.acc.pop(name, None)


def hold_patches(model: torch.nn.Module, patches: Sequence[Patch]) -> None:
    """Make the applied list exactly `patches` (in order) with at most one rebuild per touched
    weight: when the applied list is a prefix of `patches`, the new deltas are added to a kept
    float32 accumulator (``base + Σ u vᵀ`` in order, as `materialize` computes it, so bit for bit
    the same); otherwise every weight the change touches is rebuilt from its base copy. Nothing
    is subtracted. Costs the changed patches, not the applied ones, when only appending."""
    state = _state(model)
    patches = list(patches)
    keep = 0
    while keep < min(len(patches), len(state.applied)) and patches[keep].digest == state.applied[keep].digest:
        keep += 1
    removed, added = state.applied[keep:], patches[keep:]
    if not removed and not added:
        return
    for p in added:
        _check_fits(model, p)
    layout = spec_for(model).hf_layout
    params = dict(model.named_parameters())
    touched = {n for p in removed + added for n in p.weight_names}
    new_accs: dict[str, torch.Tensor | None] = {}
    for name in sorted(touched):
        base = state.base.get(name)
        if base is None:
            base = params[name].detach().clone()
        if not removed and name in state.acc:
            acc, deltas = state.acc[name].clone(), [d for p in added for d in p.deltas if d.name == name]
        else:
            acc, deltas = base.to(torch.float32, copy=True), [d for p in patches for d in p.deltas if d.name == name]
            if not deltas:
                new_accs[name] = None
                continue
        view = acc if layout is Layout.OUT_IN else acc.t()
        for d in deltas:
            if tuple(view.shape) != d.shape:
                raise PatchMismatchError(f"delta for {d.name!r} has shape {d.shape}, weight is {tuple(view.shape)}")
            view.addmm_(d.u.to(acc.device), d.v.to(acc.device).T)
        if not torch.isfinite(acc).all():
            raise NonFiniteError(f"merging the patches into {name!r} gives non-finite weights; nothing was changed")
        new_accs[name] = acc
    with torch.no_grad():
        for name, acc in new_accs.items():
            if name not in state.base:
                state.base[name] = params[name].detach().clone()
            params[name].copy_(state.base[name] if acc is None else acc.to(params[name].dtype))
            if acc is None:
                del state.base[name]
                state.acc.pop(name, None)
            else:
                state.acc[name] = acc
    state.applied = patches
    log.debug("holding %d patch(es): %d removed, %d added, %d weight(s) rewritten", len(patches), len(removed),
              len(added), len(new_accs))


def apply_patch(model: torch.nn.Module, patch: Patch) -> None:
    """Merge `patch` into the model's weights in place (see module docstring)."""
    state = _state(model)
    if any(p is patch or p.digest == patch.digest for p in state.applied):
        raise PatchStateError(f"patch {patch.digest[:12]} is already applied")
    _check_fits(model, patch)
    params = dict(model.named_parameters())
    new_bases = [n for n in patch.weight_names if n not in state.base]
    for name in new_bases:
        state.base[name] = params[name].detach().clone()
    try:
        _rewrite(model, set(patch.weight_names), state.applied + [patch])
    except Exception:
        for name in new_bases:
            del state.base[name]
        raise
    state.applied.append(patch)
    log.debug("applied patch %s (%s, %d weights)", patch.digest[:12], patch.method, len(patch.deltas))


def remove_patch(model: torch.nn.Module, patch: Patch) -> None:
    """Unmerge `patch`: rebuild touched weights from base copies and the other applied patches."""
    state = _state(model)
    idx = next((i for i, p in enumerate(state.applied) if p is patch or p.digest == patch.digest), None)
    if idx is None:
        raise PatchStateError(f"patch {patch.digest[:12]} is not applied to this model")
    remaining = state.applied[:idx] + state.applied[idx + 1:]
    _rewrite(model, set(patch.weight_names), remaining)
    state.applied = remaining
    still_touched = {n for p in remaining for n in p.weight_names}
    for name in patch.weight_names:
        if name not in still_touched:
            del state.base[name]
    log.debug("removed patch %s", patch.digest[:12])


def base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every patched weight replaced by its saved base copy."""
    sd = dict(model.state_dict())
    sd.update(_state(model).base)
    return sd
