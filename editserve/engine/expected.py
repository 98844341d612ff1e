"""Expected checksums of a version: per (matrix, tensor-parallel rank) sha256 of base + Σ deltas,
computed in the API-server process from the ledger's base copies, in vLLM's orientation.

`ExpectedChecksums` keeps two bounded caches: the base copies it read (an LRU of at most
``base_cache_bytes``; a copy larger than the whole bound is read each time, not kept) and the
per-rank checksums of (matrix, ordered patch deltas) keys (an LRU of at most 4096 entries).
The swap compares the engine's live checksums with these before it commits.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from editserve.editing.arch import Layout
from editserve.engine.wire import rank_range, weight_checksum
from editserve.patches import Patch, materialize

MAX_EXPECTED_ENTRIES = 4096


class ExpectedChecksums:
    """See the module docstring. Set `ledger` before the first call (it is opened after the sidecar)."""

    def __init__(self, tensor_parallel_size: int, base_cache_bytes: int, ledger: Any = None) -> None:
        self.tp = tensor_parallel_size
        self.base_cache_bytes = base_cache_bytes
        self.ledger = ledger
        self._bases: OrderedDict[str, tuple[torch.Tensor, Layout]] = OrderedDict()
        self._bases_bytes = 0
        self._sums: OrderedDict[tuple[str, tuple[str, ...]], dict[int, str]] = OrderedDict()

    @property
    def cached_base_bytes(self) -> int:
        return self._bases_bytes

    @property
    def cached_base_names(self) -> list[str]:
        """Least recently used first."""
        return list(self._bases)

    def base(self, name: str) -> tuple[torch.Tensor, Layout]:
        """The ledger's base copy of `name` (HF layout as stored) and its layout, through the LRU."""
        hit = self._bases.get(name)
        if hit is not None:
            self._bases.move_to_end(name)
            return hit
        hit = self.ledger.base_copy(name)
        size = hit[0].numel() * hit[0].element_size()
        if size <= self.base_cache_bytes:
            self._bases[name] = hit
            self._bases_bytes += size
            while self._bases_bytes > self.base_cache_bytes:
                _, (old, _) = self._bases.popitem(last=False)
                self._bases_bytes -= old.numel() * old.element_size()
        return hit

    def of(self, patches: Sequence[Patch], names: Iterable[str]) -> dict[tuple[str, int], str]:
        """Per (matrix, rank) checksums of base + Σ deltas of `patches` for each of `names`."""
        deltas: dict[str, list[Any]] = {}
        keys: dict[str, list[str]] = {}
        for p in patches:
            digest = p.digest
            for i, d in enumerate(p.deltas):
                deltas.setdefault(d.name, []).append(d)
                keys.setdefault(d.name, []).append(f"{digest}:{i}")
        out: dict[tuple[str, int], str] = {}
        for name in names:
            cache_key = (name, tuple(keys.get(name, [])))
            per_rank = self._sums.get(cache_key)
            if per_rank is None:
                base, layout = self.base(name)
                full = materialize(base, deltas.get(name, []), layout)
                w = full if layout is Layout.OUT_IN else full.t()         # vLLM holds [out, in]
                per_rank = {}
                for r in range(self.tp):
                    lo, hi = rank_range(int(w.shape[1]), self.tp, r)
                    per_rank[r] = weight_checksum(w[:, lo:hi])
                self._sums[cache_key] = per_rank
                while len(self._sums) > MAX_EXPECTED_ENTRIES:
                    self._sums.popitem(last=False)
            else:
                self._sums.move_to_end(cache_key)
            for r, sha in per_rank.items():
                out[(name, r)] = sha
        return out
