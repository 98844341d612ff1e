"""`LedgerWeights`: the weights a ledger's versions stand for — base copies, materialisation,
checksums and diffs (``Ledger.weights``).

The ledger holds no model. It keeps the original of every matrix a patch touches (a *base
copy*, `editserve.ledger.objects`) and the patches of every version; the weights of version v
are base copy + Σ UVᵀ of its active patches in float32 in their fixed order, cast once
(`editserve.patches.materialize`); with no active patch, the base copy itself, bit for bit. An
engine materialises its own (tensor-parallel) slice from `Ledger.active_patches(v)` and compares
with `expected_checksums(v)`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from editserve.editing.arch import Layout
from editserve.ledger.errors import BaseCopyMissing
from editserve.ledger.store import BaseCopyRecord
from editserve.patches import WeightDelta, materialize

if TYPE_CHECKING:
    from editserve.ledger.ledger import Ledger


@dataclass(frozen=True)
class WeightDiff:
    name: str
    layer: int
    norm: float                                # ‖ΔW_b − ΔW_a‖_F (float32)
    relative: float | None                     # norm / ‖W_base‖_F when the base copy is stored


@dataclass(frozen=True)
class VersionDiff:
    a: int
    b: int
    only_a: tuple[str, ...]                    # patch digests active in a but not in b
    only_b: tuple[str, ...]
    common: tuple[str, ...]
    weights: tuple[WeightDiff, ...]


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (row-major, CPU); the checksum engines compare against."""
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


class LedgerWeights:
    """The weights of a ledger's versions (reached as ``ledger.weights``)."""

    def __init__(self, ledger: "Ledger") -> None:
        self._ledger = ledger

    def base_names(self) -> tuple[str, ...]:
        """The matrices the ledger holds an original of."""
        return self._ledger.objects.base_names()

    def base_copy(self, name: str) -> tuple[torch.Tensor, Layout]:
        """The saved original of `name` and its layout."""
        return self._ledger.objects.base_copy(name)

    def ensure_base(self, name: str, tensor: torch.Tensor, layout: Layout = Layout.OUT_IN) -> BaseCopyRecord:
        """Store the original of `name` unless already stored; an offered copy that differs is refused.

        `tensor` must be the *base* model's weight (never one with patches merged in).
        """
        return self._ledger.objects.ensure_base(name, tensor, layout)

    def touched_names(self, version: int | None = None) -> tuple[str, ...]:
        """The matrices the active patches of `version` (default: the head) change, in first-touch order."""
        names: dict[str, None] = {}
        for p in self._ledger.active_patches(version):
            for d in p.deltas:
                names[d.name] = None
        return tuple(names)

    def materialize(self, version: int | None = None, base: Mapping[str, torch.Tensor] | None = None,
                    layout: Layout | None = None, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Weights of `version` (default: the head): base + Σ UVᵀ of its active patches, per matrix.

        Without `base`, every matrix the ledger holds a base copy of (or those in `names`) is
        rebuilt from the stored copies, in their stored layout; a matrix no active patch touches
        comes back as its base copy, bit for bit. With `base` (in `layout`, default OUT_IN), the
        matrices in `base` (or `names`) are rebuilt from those tensors instead.
        """
        ledger = self._ledger
        version = ledger.head() if version is None else version
        by_name: dict[str, list[WeightDelta]] = {}
        for p in ledger.active_patches(version):
            for d in p.deltas:
                by_name.setdefault(d.name, []).append(d)
        out: dict[str, torch.Tensor] = {}
        if base is None:
            records = ledger.store.base_copies()
            # Every matrix with a base copy, plus any touched one without (which is an error below).
            wanted = list(names) if names is not None else sorted(records) + [n for n in by_name if n not in records]
            for name in wanted:
                rec = records.get(name)
                if rec is None:
                    raise BaseCopyMissing(f"the ledger holds no base copy of {name!r} (touched at version {version})")
                out[name] = materialize(ledger.objects.load_base(rec), by_name.get(name, []), Layout(rec.layout))
        else:
            lay = Layout.OUT_IN if layout is None else Layout(layout)
            wanted = list(names) if names is not None else list(base)
            for name in wanted:
                if name not in base:
                    raise BaseCopyMissing(f"no base tensor given for {name!r}")
                out[name] = materialize(base[name], by_name.get(name, []), lay)
        return out

    def expected_checksums(self, version: int | None = None, base: Mapping[str, torch.Tensor] | None = None,
                           layout: Layout | None = None) -> dict[str, str]:
        """sha256 of each materialised matrix of `version` (see `materialize` and `tensor_sha256`)."""
        return {name: tensor_sha256(t) for name, t in self.materialize(version, base, layout).items()}

    def diff(self, a: int, b: int) -> VersionDiff:
        """Which patches differ between versions a and b, and ‖ΔW‖ per touched weight."""
        ledger = self._ledger
        ids_a, ids_b = ledger.active_ids(a), ledger.active_ids(b)
        only_a = tuple(d for d in ids_a if d not in ids_b)
        only_b = tuple(d for d in ids_b if d not in ids_a)
        common = tuple(d for d in ids_a if d in ids_b)
        sums: dict[str, torch.Tensor] = {}
        layers: dict[str, int] = {}
        for sign, refs in ((-1.0, only_a), (1.0, only_b)):
            for ref in refs:
                for d in ledger.patch(ref).deltas:
                    layers[d.name] = d.layer
                    acc = sums.setdefault(d.name, torch.zeros(d.shape, dtype=torch.float32))
                    acc.addmm_(d.u, d.v.T, alpha=sign)
        records = ledger.store.base_copies()
        weights = []
        for name in sorted(sums, key=lambda n: (layers[n], n)):
            norm = float(sums[name].norm())
            rel = None
            if name in records and ledger.blobs.check(records[name].blob, records[name].blob_size, full=False) is None:
                base_norm = float(ledger.objects.load_base(records[name]).float().norm())
                rel = norm / base_norm if base_norm > 0 else None
            weights.append(WeightDiff(name=name, layer=layers[name], norm=norm, relative=rel))
        return VersionDiff(a=a, b=b, only_a=only_a, only_b=only_b, common=common, weights=tuple(weights))
