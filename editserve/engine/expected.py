"""Expected checksums of a version: per (matrix, tensor-parallel rank) sha256 of base + Σ deltas,
computed in the API-server process from the ledger's base copies, in vLLM's orientation.

The cost of one matrix does not grow with its number of deltas when the target continues a
state computed before: `ExpectedChecksums` keeps float32 accumulators keyed by (matrix, chain
hash) (`editserve.ledger.checkpoints`) and starts from the longest one that is a prefix of the
target's sequence, else from the latest materialised checkpoint on disk, else from the base
copy; from there it adds the remaining deltas in order (the float32 operations of
`editserve.patches.materialize`, so the result is bit for bit the materialisation's). While
it passes a checkpoint position (every ``checkpoint_every`` deltas) it writes the
checkpoint file the workers can start from (`checkpoint_path`).

Bounded caches: base copies (an LRU of at most ``base_cache_bytes``; a copy larger than the
bound is read each time), accumulators (an LRU of at most ``base_cache_bytes`` as well; the
served state of each touched matrix normally stays in it: 4 · d_out · d_in bytes each), and
the per-rank checksums of (matrix, chain hash) (at most 4096 entries).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from editserve.editing.arch import Layout
from editserve.engine.plan import EMPTY, MatrixChain, chain_for
from editserve.engine.wire import rank_range, weight_checksum
from editserve.ledger.checkpoints import DEFAULT_EVERY, CheckpointStore
from editserve.patches import Patch

MAX_EXPECTED_ENTRIES = 4096


def checkpoint_root(ledger: Any) -> Path:
    """Where a ledger's checkpoints live: ``<ledger dir>/checkpoints`` for a SQLite ledger, else
    ``$EDITSERVE_HOME/checkpoints/<fingerprint[:16]>`` (a PostgreSQL ledger is shared by hosts;
    checkpoints are a per-host cache)."""
    from editserve.config import home

    root = getattr(ledger, "root", None)
    if root is not None:
        return Path(root) / "checkpoints"
    return home() / "checkpoints" / str(ledger.model_fingerprint)[:16]


class ExpectedChecksums:
    """See the module docstring. Set `ledger` before the first call (it is opened after the sidecar)."""

    def __init__(self, tensor_parallel_size: int, base_cache_bytes: int, ledger: Any = None,
                 checkpoint_every: int = DEFAULT_EVERY) -> None:
        self.tp = tensor_parallel_size
        self.base_cache_bytes = base_cache_bytes
        self.checkpoint_every = checkpoint_every
        self.checkpoints: CheckpointStore | None = None
        self._ledger: Any = None
        self.ledger = ledger
        self._bases: OrderedDict[str, tuple[torch.Tensor, Layout]] = OrderedDict()
        self._bases_bytes = 0
        self._accs: OrderedDict[tuple[str, str], tuple[int, torch.Tensor]] = OrderedDict()   # (name, chain) → (count, acc)
        self._accs_bytes = 0
        self._sums: OrderedDict[tuple[str, str], dict[int, str]] = OrderedDict()
        self._verified: OrderedDict[tuple[str, str], None] = OrderedDict()     # checkpoint files checked

    @property
    def ledger(self) -> Any:
        return self._ledger

    @ledger.setter
    def ledger(self, ledger: Any) -> None:
        self._ledger = ledger
        self.checkpoints = None if ledger is None else CheckpointStore(checkpoint_root(ledger), self.checkpoint_every)

    @property
    def cached_base_bytes(self) -> int:
        return self._bases_bytes

    @property
    def cached_acc_bytes(self) -> int:
        return self._accs_bytes

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
        hit = self.ledger.weights.base_copy(name)
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
        names = list(names)
        chains = {n: chain_for(tuple(keys[n]), None) for n in names if n in keys}
        return self.of_chains(deltas, chains, names)

    def of_chains(self, deltas: Mapping[str, Sequence[Any]], chains: Mapping[str, MatrixChain],
                  names: Iterable[str]) -> dict[tuple[str, int], str]:
        """Like `of`, for matrices whose delta sequences (objects with ``u`` [d_out, r] and ``v``
        [d_in, r]) and chains are known: the cost of a matrix is that of the deltas after the
        nearest known state."""
        out: dict[tuple[str, int], str] = {}
        for name in names:
            chain = chains.get(name, EMPTY)               # not in the target: back to the base
            cache_key = (name, chain.head)
            per_rank = self._sums.get(cache_key)
            if per_rank is None:
                full = self._materialize(name, list(deltas.get(name, ())), chain)
                per_rank = {}
                for r in range(self.tp):
                    lo, hi = rank_range(int(full.shape[1]), self.tp, r)
                    per_rank[r] = weight_checksum(full[:, lo:hi])
                self._sums[cache_key] = per_rank
                while len(self._sums) > MAX_EXPECTED_ENTRIES:
                    self._sums.popitem(last=False)
            else:
                self._sums.move_to_end(cache_key)
            for r, sha in per_rank.items():
                out[(name, r)] = sha
        return out

    def checkpoint_path(self, name: str, chain: MatrixChain) -> tuple[int, str] | None:
        """The latest checkpoint of `name` on `chain` that exists and verifies, as (position, file);
        the `editserve.engine.plan.Anchor` of delta messages."""
        found = self._checkpoint(name, chain, chain.count, need_tensor=False)
        if found is None or self.checkpoints is None:
            return None
        return found[0], str(self.checkpoints.path(name, chain.hashes[found[0]]))

    def _checkpoint(self, name: str, chain: MatrixChain, upto: int,
                    need_tensor: bool) -> tuple[int, torch.Tensor | None] | None:
        """(position, tensor when `need_tensor`) of the latest verified checkpoint at or before `upto`.
        A file is verified (sha256 of its tensor) once per process; they are written atomically
        under content-derived names and never change."""
        if self.checkpoints is None:
            return None
        hashes = list(chain.hashes)
        c = self.checkpoints.latest(name, hashes, upto)
        while c is not None:
            key = (name, hashes[c])
            if key in self._verified and not need_tensor:
                self._verified.move_to_end(key)
                return c, None
            t = self.checkpoints.load(name, hashes[c], c)
            if t is not None:
                self._verified[key] = None
                while len(self._verified) > MAX_EXPECTED_ENTRIES:
                    self._verified.popitem(last=False)
                return c, t
            c = self.checkpoints.latest(name, hashes, c - 1)
        return None

    # -- accumulation ------------------------------------------------------------------------

    def _materialize(self, name: str, deltas: list[Any], chain: MatrixChain) -> torch.Tensor:
        """cast(base + Σ deltas) of `name` in vLLM's [out, in] orientation (see the module docstring)."""
        if len(deltas) != chain.count:
            raise ValueError(f"{name}: {len(deltas)} deltas for a chain of {chain.count}")
        base, layout = self.base(name)
        if chain.count == 0:
            return base if layout is Layout.OUT_IN else base.t()
        start, acc = self._start(name, chain, base, layout)
        view = acc if layout is Layout.OUT_IN else acc.t()         # [d_out, d_in]
        for i in range(start, chain.count):
            d = deltas[i]
            view.addmm_(d.u.to(acc.device), d.v.to(acc.device).T)
            if self.checkpoints is not None and self.checkpoints.due(i + 1) \
                    and not self.checkpoints.has(name, chain.hashes[i + 1]):
                self.checkpoints.save(name, chain.hashes[i + 1], i + 1, view)
        self._keep(name, chain.head, chain.count, acc)
        full = acc.to(base.dtype)
        return full if layout is Layout.OUT_IN else full.t()

    def _start(self, name: str, chain: MatrixChain, base: torch.Tensor, layout: Layout) -> tuple[int, torch.Tensor]:
        """(position, fresh float32 accumulator in the base's layout) to continue from: the furthest
        of a kept accumulator on the chain and a checkpoint file (read only when it is further)."""
        best: tuple[int, torch.Tensor] | None = None
        for (n, h), (count, acc) in self._accs.items():
            if n == name and count <= chain.count and chain.hashes[count] == h and (best is None or count > best[0]):
                best = (count, acc)
        if best is not None:
            self._accs.move_to_end((name, chain.hashes[best[0]]))
        beyond = best[0] if best is not None else 0
        if self.checkpoints is not None:
            c = self.checkpoints.latest(name, list(chain.hashes), chain.count)
            if c is not None and c > beyond:
                found = self._checkpoint(name, chain, chain.count, need_tensor=True)
                if found is not None and found[0] > beyond and found[1] is not None:
                    loaded = found[1]
                    return found[0], (loaded if layout is Layout.OUT_IN else loaded.t().contiguous())
        if best is not None:
            return best[0], best[1].clone()
        return 0, base.to(torch.float32, copy=True)

    def _keep(self, name: str, chain: str, count: int, acc: torch.Tensor) -> None:
        size = acc.numel() * acc.element_size()
        if size > self.base_cache_bytes or (name, chain) in self._accs:
            return
        self._accs[(name, chain)] = (count, acc)
        self._accs_bytes += size
        while self._accs_bytes > self.base_cache_bytes:
            _, (_, old) = self._accs.popitem(last=False)
            self._accs_bytes -= old.numel() * old.element_size()
