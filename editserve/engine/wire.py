"""What travels between the control plane and the workers: factors as bytes, checksums back.

vLLM's ``collective_rpc`` does not carry tensors faithfully (they lose their type, and large
ones arrive as a bare buffer index), so every tensor crosses as ``{"data": bytes, "dtype":
str, "shape": [..]}`` inside plain dicts and lists, which survive both msgpack (API server →
engine core) and pickle (engine core → workers).

An *apply message* describes the complete target state of every editable matrix: the matrices
it names become ``base + Σ u vᵀ`` of their delta sequence (float32, in order, cast once, see
`editserve.patches.materialize`), and every matrix the worker has touched before but the
message does not name goes back to its saved base copy. It carries factors only for the
*tail* of each sequence: a `MatrixTarget` says where its deltas start — position ``start`` of
the sequence, named by the chain hash ``start_chain`` (`editserve.ledger.checkpoints`) — and
the worker continues from the state it holds when that is the start, else from the
materialised checkpoint file the target names, else (``start`` 0) from its base copy. So a
version that adds one patch sends one patch's factors, whatever the ledger's length
(`editserve.engine.plan` builds such messages), and a rollback sends at most a checkpoint
interval of factors. A message with ``start`` 0 everywhere (`message_for`) carries every
factor and is valid from any state. Applying a message twice is harmless.

This module imports torch only; the worker side that reads these messages lives in
`editserve.engine.worker`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from editserve.errors import PatchMismatchError
from editserve.ledger.checkpoints import CHAIN_ROOT
from editserve.patches import Patch, WeightDelta

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise PatchMismatchError(f"dtype {dtype} cannot be sent to workers; supported: {sorted(_DTYPES)}")


def encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    """A tensor as ``{"data": bytes, "dtype": name, "shape": [..]}`` (always a CPU copy)."""
    t = t.detach().to("cpu").contiguous()
    name = dtype_name(t.dtype)
    # reshape(-1) first: a "contiguous" tensor with a size-1 dimension may keep any stride on it (an
    # AlphaEdit or MEMIT factor U = Rᵀ of one edit is [d_out, 1] with strides (1, d_out)), and a
    # byte view needs a unit last stride.
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"data": data, "dtype": name, "shape": list(t.shape)}


def decode_tensor(obj: Mapping[str, Any]) -> torch.Tensor:
    """Inverse of `encode_tensor`; validates dtype, shape and byte count."""
    try:
        data, dtype, shape = obj["data"], obj["dtype"], [int(s) for s in obj["shape"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise PatchMismatchError(f"malformed tensor on the wire: {exc!r}") from exc
    if dtype not in _DTYPES:
        raise PatchMismatchError(f"unknown dtype {dtype!r} on the wire; supported: {sorted(_DTYPES)}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PatchMismatchError(f"tensor data must be bytes, got {type(data).__name__}")
    dt = _DTYPES[dtype]
    numel = 1
    for s in shape:
        numel *= s
    want = numel * torch.empty((), dtype=dt).element_size()
    if len(data) != want:
        raise PatchMismatchError(f"tensor of shape {shape} and dtype {dtype} needs {want} bytes, got {len(data)}")
    if numel == 0:
        return torch.empty(shape, dtype=dt)
    return torch.frombuffer(bytearray(data), dtype=dt).reshape(shape)


def weight_checksum(t: torch.Tensor) -> str:
    """The ledger's checksum (`editserve.ledger.tensor_sha256`): sha256 of the raw row-major bytes
    of a contiguous CPU copy, so engine, sidecar and ledger values compare directly."""
    from editserve.ledger import tensor_sha256

    return tensor_sha256(t)


def rank_range(d_in: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """The input-dimension slice ``[start, stop)`` that rank `tp_rank` of `tp_size` holds of a
    row-parallel down-projection (vLLM splits it evenly along the input dimension)."""
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise PatchMismatchError(f"tensor-parallel rank {tp_rank} is out of range for size {tp_size}")
    if d_in % tp_size:
        raise PatchMismatchError(f"input dimension {d_in} does not split evenly over {tp_size} ranks")
    k = d_in // tp_size
    return tp_rank * k, (tp_rank + 1) * k


@dataclass(frozen=True)
class WireDelta:
    """One delta of one matrix as a worker sees it: a key naming it and its factors."""

    key: str               # "<patch digest>:<index>", identifies the delta for incremental merges
    u: torch.Tensor        # [d_out, r] float32
    v: torch.Tensor        # [d_in, r] float32 (full input dimension; the worker slices it)


@dataclass(frozen=True)
class MatrixTarget:
    """Target content of one matrix: its first `start` deltas (named by `start_chain`), then
    `deltas` in this order, on top of the base."""

    name: str              # Hugging Face weight name (the ledger's key)
    layer: int
    deltas: tuple[WireDelta, ...]
    start: int = 0                       # deltas of the sequence before `deltas` (0: from the base)
    start_chain: str = CHAIN_ROOT        # chain hash of those `start` deltas
    checkpoint: str | None = None        # file with the float32 accumulator at (start, start_chain)

    @property
    def count(self) -> int:
        """Length of the whole delta sequence."""
        return self.start + len(self.deltas)


@dataclass(frozen=True)
class ApplyMessage:
    """The complete target state of a version (see the module docstring)."""

    version: int
    family: str
    matrices: tuple[MatrixTarget, ...]
    # Matrices whose checksums every rank answers (the ones this change touches); None: every
    # matrix the message names or the rank holds.
    checksum: tuple[str, ...] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.matrices)

    @property
    def factor_bytes(self) -> int:
        """Bytes of factors the message carries (its size on the wire, less small fields)."""
        return sum(d.u.numel() * d.u.element_size() + d.v.numel() * d.v.element_size()
                   for m in self.matrices for d in m.deltas)

    def to_wire(self) -> dict[str, Any]:
        return {
            "version": int(self.version),
            "family": self.family,
            "matrices": [
                {
                    "name": m.name,
                    "layer": int(m.layer),
                    "deltas": [{"key": d.key, "u": encode_tensor(d.u), "v": encode_tensor(d.v)} for d in m.deltas],
                    "start": int(m.start),
                    "start_chain": m.start_chain,
                    "checkpoint": m.checkpoint,
                }
                for m in self.matrices
            ],
            "checksum": None if self.checksum is None else list(self.checksum),
        }

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "ApplyMessage":
        try:
            matrices = []
            for m in obj["matrices"]:
                deltas = []
                for d in m["deltas"]:
                    u, v = decode_tensor(d["u"]), decode_tensor(d["v"])
                    if u.dtype != torch.float32 or v.dtype != torch.float32:
                        raise PatchMismatchError(f"factors of {m['name']!r} must be float32, got {u.dtype}, {v.dtype}")
                    if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1]:
                        raise PatchMismatchError(
                            f"factors of {m['name']!r} must be U[d_out,r] and V[d_in,r], got {tuple(u.shape)}, {tuple(v.shape)}"
                        )
                    deltas.append(WireDelta(key=str(d["key"]), u=u, v=v))
                start = int(m.get("start", 0))
                if start < 0:
                    raise PatchMismatchError(f"start of {m['name']!r} must be >= 0, got {start}")
                checkpoint = m.get("checkpoint")
                matrices.append(MatrixTarget(name=str(m["name"]), layer=int(m["layer"]), deltas=tuple(deltas),
                                             start=start, start_chain=str(m.get("start_chain", CHAIN_ROOT)),
                                             checkpoint=None if checkpoint is None else str(checkpoint)))
            checksum = obj.get("checksum")
            return cls(version=int(obj["version"]), family=str(obj["family"]), matrices=tuple(matrices),
                       checksum=None if checksum is None else tuple(str(n) for n in checksum))
        except PatchMismatchError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise PatchMismatchError(f"malformed apply message: missing or bad field {exc!r}") from exc


def message_for(version: int, family: str, patches: Sequence[Patch]) -> ApplyMessage:
    """The apply message of a version whose active patches are `patches` (in ledger order), with
    every factor (valid from any state; `editserve.engine.plan.delta_message` cuts it down)."""
    by_name: dict[str, list[WireDelta]] = {}
    layers: dict[str, int] = {}
    for patch in patches:
        if patch.family != family:
            raise PatchMismatchError(f"patch {patch.digest[:12]} is for family {patch.family!r}, the engine serves {family!r}")
        digest = patch.digest
        for i, d in enumerate(patch.deltas):
            by_name.setdefault(d.name, []).append(WireDelta(key=f"{digest}:{i}", u=d.u, v=d.v))
            layers[d.name] = d.layer
    matrices = tuple(MatrixTarget(name=n, layer=layers[n], deltas=tuple(ds)) for n, ds in sorted(by_name.items()))
    return ApplyMessage(version=int(version), family=family, matrices=matrices)


def deltas_of(target: MatrixTarget, lo: int, hi: int) -> list[WeightDelta]:
    """The matrix's deltas with V restricted to input rows ``[lo, hi)`` (a rank's slice)."""
    return [
        WeightDelta(name=target.name, layer=target.layer, u=d.u, v=d.v[lo:hi].contiguous())
        for d in target.deltas
    ]


@dataclass(frozen=True)
class RankReport:
    """What one worker rank answers to an apply: its identity, version and per-matrix checksums."""

    rank: int              # global rank of the worker
    tp_rank: int
    tp_size: int
    version: int
    checksums: dict[str, str]          # HF weight name → checksum of the rank's live slice
    seconds: float = 0.0               # time spent in the worker
    error: str | None = None           # "<ErrorType>: message" when the worker refused or failed
    repack_seconds: float = 0.0        # part of `seconds` spent re-packing CPU kernels
    state_bytes: int = 0               # memory editserve holds on this rank (base copies + accumulators)
    written: tuple[str, ...] = ()      # matrices this apply rewrote

    def to_wire(self) -> dict[str, Any]:
        return {
            "rank": self.rank, "tp_rank": self.tp_rank, "tp_size": self.tp_size, "version": self.version,
            "checksums": dict(self.checksums), "seconds": self.seconds, "error": self.error,
            "repack_seconds": self.repack_seconds, "state_bytes": self.state_bytes, "written": list(self.written),
        }

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "RankReport":
        try:
            return cls(
                rank=int(obj["rank"]), tp_rank=int(obj["tp_rank"]), tp_size=int(obj["tp_size"]),
                version=int(obj["version"]), checksums={str(k): str(v) for k, v in dict(obj["checksums"]).items()},
                seconds=float(obj.get("seconds", 0.0)), error=obj.get("error"),
                repack_seconds=float(obj.get("repack_seconds", 0.0)), state_bytes=int(obj.get("state_bytes", 0)),
                written=tuple(str(n) for n in obj.get("written", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PatchMismatchError(f"malformed worker report {obj!r}: {exc!r}") from exc


def expected_rank_checksums(
    full_weights: Mapping[str, torch.Tensor], tp_size: int
) -> dict[tuple[str, int], str]:
    """Checksums each rank should report, from full materialised matrices in vLLM [d_out, d_in]
    orientation: rank r's slice is columns ``rank_range(d_in, tp_size, r)``."""
    out: dict[tuple[str, int], str] = {}
    for name, w in full_weights.items():
        for r in range(tp_size):
            lo, hi = rank_range(int(w.shape[1]), tp_size, r)
            out[(name, r)] = weight_checksum(w[:, lo:hi])
    return out
