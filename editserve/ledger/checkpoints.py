"""Materialised checkpoints: the float32 accumulator of one matrix at one point of its delta chain, on disk.

A served matrix is ``cast(base + Σ u_i v_iᵀ)`` with the sum taken in float32 in ledger order
(`editserve.patches.materialize`). The float32 accumulator after the first ``c`` deltas is a
**checkpoint**: starting from it and adding deltas ``c..n`` in order gives bit for bit the
same result as starting from the base (the same float32 operations on the same values). So a
rollback, a restore after a failed swap, or a start-up needs at most ``every - 1`` rank-r
updates after reading one checkpoint, instead of re-adding every patch since the base. Nothing
is subtracted.

A position in a matrix's chain is named by its **chain hash**: ``chain_step(h, key)`` folds the
delta keys (``"<patch digest>:<index>"``) in order, starting from `CHAIN_ROOT` (the base). Equal
chain hashes mean equal delta sequences, so a checkpoint file is named by (matrix, chain hash)
and is valid for every version whose sequence on that matrix starts with it.

Files: ``<root>/<sha256(name)[:16]>/<chain hash>.safetensors``, one float32 tensor ``acc`` in
vLLM's [d_out, d_in] orientation with metadata (name, chain, count, sha256 of the tensor's
bytes), written atomically and durably (`editserve.atomicfile.publish`). They are a cache
derived from the ledger: deleting them costs time, never correctness; `CheckpointStore.load`
verifies the recorded sha256 and treats a bad file as absent. Workers of the same host read only
their input-column slice of a file (`read_slice`), the API server verifies the whole file before
it names it in a message.

Cost per checkpoint: ``4 · d_out · d_in`` bytes on disk (Llama-2-7B down_proj 4096×11008:
180 MB), nothing in memory between swaps.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from editserve.atomicfile import publish
from editserve.errors import PatchMismatchError

log = logging.getLogger(__name__)

CHAIN_ROOT = "base"
DEFAULT_EVERY = 100                   # a checkpoint every 100 deltas of a matrix
_TENSOR = "acc"


def chain_step(chain: str, key: str) -> str:
    """The chain hash after appending delta `key` to the sequence named by `chain`."""
    return hashlib.sha256(f"{chain}|{key}".encode()).hexdigest()


def chain_of(keys: list[str] | tuple[str, ...], start: str = CHAIN_ROOT) -> list[str]:
    """Chain hashes at every position: ``out[i]`` names the first ``i`` keys (``out[0] = start``)."""
    out = [start]
    for k in keys:
        out.append(chain_step(out[-1], k))
    return out


def _tensor_sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()


def read_slice(path: str | Path, name: str, chain: str, count: int, lo: int, hi: int) -> torch.Tensor:
    """Input columns ``[lo, hi)`` of checkpoint `path` (float32 [d_out, hi-lo], a fresh tensor),
    after checking that the file is the checkpoint of `name` at (`chain`, `count`)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("name") != name or meta.get("chain") != chain or meta.get("count") != str(count):
                raise PatchMismatchError(f"checkpoint {str(path)!r} holds {meta.get('name')!r} at "
                                         f"{meta.get('count')}:{str(meta.get('chain'))[:12]}, expected {name!r} at "
                                         f"{count}:{chain[:12]}")
            return f.get_slice(_TENSOR)[:, lo:hi].to(torch.float32).contiguous().clone()
    except (OSError, SafetensorError) as exc:
        raise PatchMismatchError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc


class CheckpointStore:
    """A directory of checkpoints (see the module docstring)."""

    def __init__(self, root: str | Path, every: int = DEFAULT_EVERY) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise PatchMismatchError(f"checkpoint interval must be a positive integer, got {every!r}")
        self.root = Path(root)
        self.every = every

    def path(self, name: str, chain: str) -> Path:
        return self.root / hashlib.sha256(name.encode()).hexdigest()[:16] / f"{chain}.safetensors"

    def has(self, name: str, chain: str) -> bool:
        return self.path(name, chain).is_file()

    def due(self, count: int) -> bool:
        """Whether position `count` (> 0) of a chain gets a checkpoint."""
        return count > 0 and count % self.every == 0

    def save(self, name: str, chain: str, count: int, acc: torch.Tensor) -> Path:
        """Write the float32 [d_out, d_in] accumulator `acc` of `name` at (`chain`, `count`), unless present."""
        from safetensors.torch import save

        path = self.path(name, chain)
        if path.is_file():
            return path
        if acc.dtype != torch.float32 or acc.dim() != 2:
            raise PatchMismatchError(f"a checkpoint is a 2-D float32 tensor, got {acc.dtype} {tuple(acc.shape)}")
        t = acc.detach().to("cpu").contiguous()
        data = save({_TENSOR: t}, metadata={"name": name, "chain": chain, "count": str(int(count)),
                                             "sha256": _tensor_sha(t)})
        path.parent.mkdir(parents=True, exist_ok=True)
        publish(path, lambda tmp: tmp.write_bytes(data), durable=True)
        log.debug("checkpoint of %s at delta %d written (%d bytes)", name, count, len(data))
        return path

    def load(self, name: str, chain: str, count: int) -> torch.Tensor | None:
        """The full checkpoint (float32 [d_out, d_in]), verified; None when absent or damaged."""
        from safetensors import SafetensorError, safe_open

        path = self.path(name, chain)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                t = f.get_tensor(_TENSOR)
        except (OSError, SafetensorError) as exc:
            log.warning("checkpoint %s is unreadable (%s); ignoring it", path, exc)
            return None
        if (meta.get("name") != name or meta.get("chain") != chain or meta.get("count") != str(count)
                or t.dtype != torch.float32 or meta.get("sha256") != _tensor_sha(t)):
            log.warning("checkpoint %s does not verify (metadata %s); ignoring it", path,
                        {k: meta.get(k) for k in ("name", "count")})
            return None
        return t

    def latest(self, name: str, chain: list[str], upto: int) -> int | None:
        """The largest checkpointed position ``c ≤ upto`` (a multiple of `every`) of the chain whose
        hashes are `chain` (``chain[i]`` = position i); None when there is none."""
        c = (min(upto, len(chain) - 1) // self.every) * self.every
        while c > 0:
            if self.has(name, chain[c]):
                return c
            c -= self.every
        return None

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*.safetensors")) if self.root.is_dir() else 0
