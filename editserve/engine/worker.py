"""Worker side of a swap: rebuild this rank's slice of each touched matrix and write it in place.

The methods of `EditserveWorkerExtension` are reached through vLLM's ``collective_rpc`` by
name. The general plugin (`editserve.engine.plugin.register`) attaches them to vLLM's
``WorkerWrapperBase``, whose attribute lookup falls through to the worker, so ``self`` below
is either the wrapper or (with ``--worker-extension-cls``) the worker itself; both answer
``get_model()``, ``vllm_config`` and ``rank``.

Per rank and per touched matrix the worker keeps, attached to the model object:

- a base copy of its slice, saved the first time the matrix is touched;
- a float32 accumulator ``base + Σ u vᵀ`` of the deltas now applied, with the length and
  chain hash of their sequence (`editserve.ledger.checkpoints`), so that a message whose
  target starts where the rank is (a version that appends patches) costs one rank-r update
  per new delta, whatever the number of earlier ones; anything else starts again from the
  materialised checkpoint the message names (this rank's input columns of the file) or from
  the base copy (never by subtraction).

No per-delta state is kept: memory per touched matrix is one slice in the parameter dtype
(the base copy) and one in float32 (the accumulator), independent of the ledger's length.

Every value is computed and checked finite before the first write; writes are ``copy_``
into the existing parameter storage (a new ``Parameter`` would leave CUDA graphs pointing
at the old one). On CPU the parameter is the dense master of a packed kernel: after the
writes, each written matrix is re-packed from it (`editserve.engine.cpu_gemm.repack`) before
the answer goes back, so the next step computes with exactly the checksummed weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from editserve.editing.arch import ArchSpec, Layout, spec_for_model_type
from editserve.engine.cpu_gemm import kernel_of, repack
from editserve.engine.neuron_slots import HALVES, SLOTS_ENV, half_of, widened
from editserve.engine.wire import ApplyMessage, MatrixTarget, RankReport, WireDelta, rank_range, weight_checksum
from editserve.errors import NonFiniteError, PatchMismatchError, PatchStateError
from editserve.ledger.checkpoints import CHAIN_ROOT, chain_step, read_slice

log = logging.getLogger(__name__)

_STATE_ATTR = "_editserve_engine_state"


@dataclass
class _Matrix:
    """Bookkeeping of one touched matrix on this rank."""

    base: torch.Tensor                 # saved copy of the rank's slice, parameter dtype/device
    acc: torch.Tensor | None = None    # float32 base + Σ deltas; None when the live value is the base
    count: int = 0                     # length of the delta sequence now applied
    chain: str = CHAIN_ROOT            # its chain hash

    @property
    def nbytes(self) -> int:
        acc = 0 if self.acc is None else self.acc.numel() * self.acc.element_size()
        return self.base.numel() * self.base.element_size() + acc


@dataclass
class _RankState:
    matrices: dict[str, _Matrix] = field(default_factory=dict)
    version: int = 0


def _state(model: torch.nn.Module) -> _RankState:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        state = _RankState()
        object.__setattr__(model, _STATE_ATTR, state)
    return state


@dataclass(frozen=True)
class _Slot:
    """Where one matrix lives on this rank."""

    name: str                          # HF weight name
    vllm_name: str
    module: torch.nn.Module            # the vLLM linear layer (its kernel may need re-packing)
    param: torch.Tensor                # its dense weight [d_out, hi-lo] (or a half of gate_up_proj's, a view):
                                       # the master swaps write
    lo: int                            # rank's input slice [lo, hi) of the full input dimension
    hi: int
    d_in: int
    tp_rank: int
    tp_size: int


def _spec(worker: Any) -> ArchSpec:
    hf_config = worker.vllm_config.model_config.hf_config
    spec = spec_for_model_type(str(getattr(hf_config, "model_type", "")))
    if spec.vllm_layout is not Layout.OUT_IN:
        raise PatchMismatchError(f"family {spec.family!r} declares vLLM layout {spec.vllm_layout}; row-parallel weights are [out, in]")
    return spec


def _module(model: torch.nn.Module, module_name: str, layer: int) -> torch.nn.Module:
    try:
        module = model.get_submodule(module_name)
    except AttributeError as exc:
        raise PatchMismatchError(f"the served model has no module {module_name!r} (layer {layer})") from exc
    # With LoRA enabled (candidates, docs/candidates.md) vLLM wraps the layer; its weight, packed
    # kernel and tensor-parallel slice are the wrapped base layer's, which must be written and re-packed.
    return getattr(module, "base_layer", module)


def _half_slot(model: torch.nn.Module, module_name: str, name: str, layer: int, half: str) -> _Slot:
    """The gate or up half of a widened layer's merged ``gate_up_proj`` (tensor-parallel size 1)."""
    module = _module(model, module_name, layer)
    if widened(module) is None:
        raise PatchMismatchError(f"{name!r} is editable only in a layer with neuron slots ({SLOTS_ENV}); "
                                 f"layer {layer} has none")
    param = getattr(module, "weight", None)
    if not isinstance(param, torch.Tensor) or param.dim() != 2 or param.numel() == 0:
        raise PatchStateError(f"the weight of {module_name!r} is not a dense 2-D master; it cannot be edited")
    d_in = int(param.shape[1])
    return _Slot(name=name, vllm_name=f"{module_name}.weight[{half}]", module=module, param=half_of(param, half),
                 lo=0, hi=d_in, d_in=d_in, tp_rank=0, tp_size=1)


def _slot(model: torch.nn.Module, spec: ArchSpec, name: str, layer: int) -> _Slot:
    for half in HALVES:
        if spec.vllm_gate_up_proj is not None and name == spec.half_weight_name(layer, half):
            return _half_slot(model, spec.vllm_gate_up_proj.format(layer), name, layer, half)
    if name != spec.weight_name(layer):
        raise PatchMismatchError(f"weight {name!r} is not the down-projection of layer {layer} ({spec.weight_name(layer)!r})"
                                 + (" nor its gate or up projection" if spec.vllm_gate_up_proj else ""))
    module_name = spec.vllm_down_proj.format(layer)
    module = _module(model, module_name, layer)
    param = getattr(module, "weight", None)
    if not isinstance(param, torch.Tensor) or param.dim() != 2:
        raise PatchMismatchError(f"{module_name!r} has no 2-D weight to edit")
    if param.numel() == 0:
        raise PatchStateError(
            f"the weight of {module_name!r} was packed for the CPU GEMM kernel and cannot be edited; "
            f"enable the editserve plugin before the engine starts and include layer {layer} in EDITSERVE_EDITABLE_LAYERS"
        )
    tp_rank = int(getattr(module, "tp_rank", 0))
    tp_size = int(getattr(module, "tp_size", 1))
    d_in = int(getattr(module, "input_size", param.shape[1]))
    lo, hi = rank_range(d_in, tp_size, tp_rank)
    if hi - lo != param.shape[1]:
        raise PatchMismatchError(
            f"{module_name!r} holds {param.shape[1]} input columns on rank {tp_rank}/{tp_size}, expected {hi - lo}"
        )
    return _Slot(name=name, vllm_name=spec.vllm_weight_name(layer), module=module, param=param, lo=lo, hi=hi,
                 d_in=d_in, tp_rank=tp_rank, tp_size=tp_size)


def accumulate_slice(acc: torch.Tensor, deltas: Sequence[WireDelta], lo: int, hi: int, d_in: int,
                     name: str = "weight") -> torch.Tensor:
    """``acc += u v[lo:hi]ᵀ`` for each delta in order, in place on the float32 [d_out, hi-lo]
    accumulator: the loop of `editserve.patches.materialize` restricted to input columns [lo, hi)."""
    for d in deltas:
        if d.u.shape[0] != acc.shape[0] or d.v.shape[0] != d_in or acc.shape[1] != hi - lo:
            raise PatchMismatchError(
                f"delta {d.key} for {name!r} is {d.u.shape[0]}x{d.v.shape[0]}, the weight is {acc.shape[0]}x{d_in}"
            )
        acc.addmm_(d.u.to(acc.device), d.v[lo:hi].to(acc.device).T)
    return acc


def _rank_of(worker: Any) -> int:
    return int(getattr(worker, "rank", 0) or 0)


def _tp(worker: Any) -> tuple[int, int]:
    """(tensor-parallel rank, size) of this worker."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return int(get_tensor_model_parallel_rank()), int(get_tensor_model_parallel_world_size())


def _target_position(target: MatrixTarget | None, at: int) -> tuple[int, str, str | None]:
    """(length, chain hash) of the delta sequence `target` describes ((0, root): the base), and
    the chain hash at position `at` of it when the message carries that part (else None)."""
    if target is None:
        return 0, CHAIN_ROOT, CHAIN_ROOT if at == 0 else None
    chain = target.start_chain
    at_chain = chain if at == target.start else None
    for i, d in enumerate(target.deltas):
        chain = chain_step(chain, d.key)
        if target.start + i + 1 == at:
            at_chain = chain
    return target.count, chain, at_chain


def _start_acc(current: _Matrix | None, target: MatrixTarget, slot: _Slot, base: torch.Tensor,
               held_is_prefix: bool) -> tuple[int, torch.Tensor]:
    """(position, fresh float32 accumulator) to add the rest of the target's deltas to: the rank's
    own when it is a prefix of the target (`held_is_prefix`), else the checkpoint file's slice,
    else (start 0) the base copy."""
    if current is not None and current.acc is not None and held_is_prefix and current.count >= target.start:
        return current.count, current.acc.clone()
    if target.start == 0:
        return 0, base.to(torch.float32, copy=True)
    if target.checkpoint is not None:
        acc = read_slice(target.checkpoint, slot.name, target.start_chain, target.start, slot.lo, slot.hi)
        if tuple(acc.shape) != tuple(slot.param.shape):
            raise PatchMismatchError(f"checkpoint {target.checkpoint!r} slice is {tuple(acc.shape)}, "
                                     f"{slot.name!r} is {tuple(slot.param.shape)} on this rank")
        return target.start, acc.to(slot.param.device)
    at = (current.count, current.chain[:12]) if current is not None else (0, CHAIN_ROOT)
    raise PatchStateError(f"{slot.name!r}: this rank holds {at[0]} delta(s) ({at[1]}), the message starts at "
                          f"{target.start} ({target.start_chain[:12]}) and names no checkpoint")


def apply_message(worker: Any, message: ApplyMessage) -> RankReport:
    """Bring this rank's matrices to the state `message` describes; see the module docstring."""
    t0 = time.perf_counter()
    spec = _spec(worker)
    if message.family != spec.family:
        raise PatchMismatchError(f"apply message is for family {message.family!r}, the served model is {spec.family!r}")
    model = worker.get_model()
    state = _state(model)
    targets = {m.name: m for m in message.matrices}
    names = sorted(set(targets) | set(state.matrices) | set(message.checksum or ()))
    slots = {}
    for name in names:
        layer = targets[name].layer if name in targets else _layer_of(spec, name)
        slots[name] = _slot(model, spec, name, layer)

    # Phase 1: compute every new value; nothing live changes here.
    new_acc: dict[str, torch.Tensor | None] = {}
    new_pos: dict[str, tuple[int, str]] = {}
    writes: dict[str, torch.Tensor] = {}
    for name in names:
        slot = slots[name]
        current = state.matrices.get(name)
        target = targets.get(name)
        count, chain, at_chain = _target_position(target, current.count if current is not None else 0)
        position = (count, chain)
        if current is None and count == 0:
            continue                                   # at the base, and stays there
        if current is not None and (current.count, current.chain) == position:
            continue                                   # unchanged matrix: nothing to write
        base = current.base if current is not None else slot.param.detach()
        if target is None or count == 0:
            new_acc[name], new_pos[name], writes[name] = None, (0, CHAIN_ROOT), base
            continue
        held_is_prefix = current is not None and at_chain == current.chain
        start, acc = _start_acc(current, target, slot, base, held_is_prefix)
        acc = accumulate_slice(acc, target.deltas[start - target.start:], slot.lo, slot.hi, slot.d_in, slot.name)
        if not torch.isfinite(acc).all():
            raise NonFiniteError(f"merging version {message.version} into {name!r} gives non-finite weights; nothing was changed")
        new_acc[name], new_pos[name], writes[name] = acc, position, acc.to(slot.param.dtype)

    # Phase 2: save base copies of first-touched matrices, then write in place.
    for name in writes:
        if name not in state.matrices:
            state.matrices[name] = _Matrix(base=slots[name].param.detach().clone())
    with torch.no_grad():
        for name, value in writes.items():
            slots[name].param.copy_(value)
    for name in writes:
        if new_acc[name] is None:
            del state.matrices[name]                   # back to base: forget the copy
        else:
            state.matrices[name].acc = new_acc[name]
            state.matrices[name].count, state.matrices[name].chain = new_pos[name]
    # Phase 3: the packed kernels of the written matrices follow their masters. The state above
    # already describes the masters, so a failure here is repaired by the restore that follows.
    modules = {id(slots[name].module): slots[name].module for name in writes}   # gate and up share one
    repack_seconds = sum(repack(module) for module in modules.values())
    state.version = int(message.version)
    wanted = names if message.checksum is None else sorted(message.checksum)
    checksums = {name: weight_checksum(slots[name].param) for name in wanted}
    tp_rank, tp_size = _tp(worker)
    return RankReport(rank=_rank_of(worker), tp_rank=tp_rank, tp_size=tp_size, version=state.version,
                      checksums=checksums, seconds=time.perf_counter() - t0, repack_seconds=repack_seconds,
                      state_bytes=sum(m.nbytes for m in state.matrices.values()), written=tuple(sorted(writes)))


def _layer_of(spec: ArchSpec, name: str) -> int:
    templates = [spec.down_proj + ".weight"]
    if spec.vllm_gate_up_proj is not None:
        templates += [f"{spec.mlp}.{half}.weight" for half in HALVES]
    for template in templates:
        prefix, _, suffix = template.partition("{}")
        if name.startswith(prefix) and name.endswith(suffix):
            middle = name[len(prefix): len(name) - len(suffix)]
            if middle.isdigit():
                return int(middle)
    raise PatchMismatchError(f"{name!r} is not an editable weight of family {spec.family!r}")


def describe(worker: Any) -> dict[str, Any]:
    """This rank's identity, which matrices are dense (editable) with their full (d_out, d_in)
    shapes, the kind of kernel of each editable layer, and the neuron slots of widened layers."""
    spec = _spec(worker)
    model = worker.get_model()
    n_layers = int(getattr(worker.vllm_config.model_config.hf_config, spec.n_layers_attr))
    editable: dict[str, list[int]] = {}
    modules: dict[int, torch.nn.Module] = {}
    slots: dict[str, list[int]] = {}
    tp_rank, tp_size = _tp(worker)
    for layer in range(n_layers):
        names = [spec.weight_name(layer)]
        if spec.vllm_gate_up_proj is not None:
            names += [spec.half_weight_name(layer, half) for half in HALVES]
        for name in names:
            try:
                slot = _slot(model, spec, name, layer)
            except (PatchStateError, PatchMismatchError):
                continue
            editable[slot.name] = [int(slot.param.shape[0]), slot.d_in]
            modules[id(slot.module)] = slot.module
            if (width := widened(slot.module)) is not None:
                slots[str(layer)] = list(width)
    kernels: dict[str, int] = {}
    for module in modules.values():
        kernels[kernel_of(module)] = kernels.get(kernel_of(module), 0) + 1
    state = _state(model)
    return {
        "rank": _rank_of(worker), "tp_rank": tp_rank, "tp_size": tp_size, "family": spec.family,
        "n_layers": n_layers, "editable": editable, "kernels": kernels, "slots": slots, "version": state.version,
        "state_bytes": sum(m.nbytes for m in state.matrices.values()),
        "dtype": str(next(iter(model.parameters())).dtype).removeprefix("torch."),
        "device": str(next(iter(model.parameters())).device),
    }


def checksums(worker: Any, names: list[str]) -> dict[str, Any]:
    """Checksums of the live slices of the named matrices on this rank (no change)."""
    spec = _spec(worker)
    model = worker.get_model()
    out = {}
    for name in names:
        out[name] = weight_checksum(_slot(model, spec, name, _layer_of(spec, name)).param)
    tp_rank, tp_size = _tp(worker)
    return RankReport(rank=_rank_of(worker), tp_rank=tp_rank, tp_size=tp_size, version=_state(model).version,
                      checksums=out).to_wire()


def _guarded(fn_name: str, worker: Any, call: Any) -> dict[str, Any]:
    """Run `call` and turn a failure into a report naming it, so one rank's refusal reaches the
    control plane next to the other ranks' answers instead of hiding them."""
    try:
        return call()
    except Exception as exc:  # reported to the caller, which restores every rank
        log.exception("editserve worker call %s failed on rank %d", fn_name, _rank_of(worker))
        version = _state(worker.get_model()).version
        tp_rank, tp_size = _tp(worker)
        return RankReport(rank=_rank_of(worker), tp_rank=tp_rank, tp_size=tp_size, version=version, checksums={},
                          error=f"{type(exc).__name__}: {exc}").to_wire()


class EditserveWorkerExtension:
    """Methods that ``collective_rpc`` reaches by name on every worker."""

    def editserve_apply(self, message: dict[str, Any]) -> dict[str, Any]:
        return _guarded("apply", self, lambda: apply_message(self, ApplyMessage.from_wire(message)).to_wire())

    def editserve_describe(self) -> dict[str, Any]:
        return describe(self)

    def editserve_checksums(self, names: list[str]) -> dict[str, Any]:
        return _guarded("checksums", self, lambda: checksums(self, list(names)))


WORKER_METHODS = tuple(n for n in vars(EditserveWorkerExtension) if n.startswith("editserve_"))
