"""CPU GEMM kernels of editable layers: vLLM's packed kernel, re-packed after each swap.

On CPU, vLLM builds a GEMM kernel for every linear layer once after loading
(``dispatch_cpu_unquantized_gemm`` in ``vllm/model_executor/layers/utils.py``): for float32 and
bfloat16 without AMX that is oneDNN's matmul with the weight reordered ("packed") into the
kernel's blocked layout, and the dense ``weight`` is replaced by an empty tensor. An editable
layer needs a dense weight to write into, so editserve (`prepare`, called from the plugin's
dispatch for the editable down-projections) runs the same vLLM dispatch with
``remove_weight=False``: the layer gets exactly the kernel a plain engine gets, and keeps its
dense weight as the **master** — the tensor swaps write in place, checksum, and re-pack from.

After a swap has written the master, `repack` rebuilds the packed copy from it with the same
call vLLM makes, so the layer computes exactly what a plain vLLM engine loaded with base + Σ
UVᵀ computes. Kinds of kernel (`kernel_of`):

- ``onednn``: the layer's ``cpu_linear`` closes over a ``CPUDNNLGEMMHandler`` whose
  ``handler_tensor`` holds the address of the C++ handler (vLLM keeps it in a tensor so that a
  compiled graph reads it at run time instead of inlining it). A re-pack builds a new handler
  from the master and exchanges the two addresses **in place** in those tensors, so eager and
  compiled graphs both use the new packed weight from the next step; the old C++ handler is
  released with the temporary Python object. Nothing the compiled graph holds is rebound.
- ``dense``: ``F.linear`` on the master, which reads the edited weight directly (no re-pack).
  This is vLLM's own fallback, editserve's choice with ``EDITSERVE_CPU_GEMM=dense`` (the
  behaviour before re-packing existed, kept to measure against), and what a layer gets when
  vLLM picked a kernel editserve does not know how to re-pack (sgl-kernel on AMX, zentorch):
  exact, but slower than packed.

Only CPU layers are prepared; on a GPU there is no packing and the weight is the parameter
the kernels read, so swaps stay plain in-place writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import torch

from editserve.errors import InvalidRequestError, PatchMismatchError

log = logging.getLogger(__name__)

KERNEL_ENV = "EDITSERVE_CPU_GEMM"
KERNEL_MODES = ("packed", "dense")
DEFAULT_KERNEL_MODE = "packed"
ONEDNN, DENSE = "onednn", "dense"
# vLLM's dispatch builds its oneDNN handlers with a primitive cache of 32 entries (per handler,
# keyed by the number of rows M); the cache size does not change the numbers, only reuse.
ONEDNN_PRIMITIVE_CACHE = 32
_KERNEL_ATTR = "_editserve_kernel"
_HANDLER_ATTR = "_editserve_onednn_handler"


def kernel_mode(environ: Mapping[str, str]) -> str:
    """``packed`` (default: vLLM's kernels, re-packed after swaps) or ``dense`` (``F.linear``)."""
    value = (environ.get(KERNEL_ENV) or DEFAULT_KERNEL_MODE).strip().lower()
    if value not in KERNEL_MODES:
        raise InvalidRequestError(f"{KERNEL_ENV} must be one of {list(KERNEL_MODES)}, got {value!r}")
    return value


def _onednn_handler(fn: Callable[..., torch.Tensor]) -> object | None:
    """The ``CPUDNNLGEMMHandler`` a vLLM ``cpu_linear`` closure holds, if any."""
    from vllm import _custom_ops as ops

    handler_type = getattr(ops, "CPUDNNLGEMMHandler", None)
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:                        # an empty cell
            continue
        if handler_type is not None and isinstance(value, handler_type):
            return value
    return None


def _closes_over_tensors(fn: Callable[..., torch.Tensor]) -> bool:
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            if isinstance(cell.cell_contents, torch.Tensor):
                return True
        except ValueError:
            continue
    return False


def prepare(layer: torch.nn.Module, original_dispatch: Callable[[torch.nn.Module, bool], None], mode: str) -> str:
    """Give an editable layer its kernel and keep its dense weight; returns the kernel kind."""
    if mode == DENSE:
        layer.cpu_linear = torch.nn.functional.linear
        setattr(layer, _KERNEL_ATTR, DENSE)
        return DENSE
    original_dispatch(layer, False)
    fn = getattr(layer, "cpu_linear", None)
    handler = _onednn_handler(fn) if fn is not None else None
    if handler is not None and isinstance(getattr(handler, "handler_tensor", None), torch.Tensor):
        setattr(layer, _HANDLER_ATTR, handler)
        setattr(layer, _KERNEL_ATTR, ONEDNN)
        return ONEDNN
    if fn is not None and not _closes_over_tensors(fn):
        # vLLM's own fallback (F.linear on the weight argument): edits are visible as they are.
        setattr(layer, _KERNEL_ATTR, DENSE)
        return DENSE
    log.warning("editserve cannot re-pack the CPU kernel vLLM chose for %s; it runs F.linear on the dense weight",
                getattr(layer, "prefix", "?"))
    layer.cpu_linear = torch.nn.functional.linear
    setattr(layer, _KERNEL_ATTR, DENSE)
    return DENSE


def kernel_of(layer: torch.nn.Module) -> str:
    """``onednn``, ``dense``, or ``param`` for a layer editserve did not prepare (GPU: the
    kernels read the parameter itself)."""
    return str(getattr(layer, _KERNEL_ATTR, "param"))


def repack(layer: torch.nn.Module) -> float:
    """Rebuild the layer's packed weight from its dense master in place; returns the seconds
    spent (0 for kernels that read the master directly)."""
    handler = getattr(layer, _HANDLER_ATTR, None)
    if handler is None:
        return 0.0
    from vllm import _custom_ops as ops

    t0 = time.perf_counter()
    weight = layer.weight
    fresh = ops.create_onednn_mm(weight.t(), ONEDNN_PRIMITIVE_CACHE)     # the call vLLM's dispatch makes
    if (fresh.k, fresh.n) != (handler.k, handler.n):
        raise PatchMismatchError(f"re-packing {getattr(layer, 'prefix', '?')}: the weight is {fresh.k}x{fresh.n}, "
                                  f"the kernel was built for {handler.k}x{handler.n}")
    live, spare = handler.handler_tensor, fresh.handler_tensor
    old = live.clone()
    live.copy_(spare)                    # the graph's handler tensor now addresses the new packing
    spare.copy_(old)                     # the temporary object owns the old handler ...
    del fresh                            # ... and releases it here
    return time.perf_counter() - t0
