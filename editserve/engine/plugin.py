"""vLLM entry points: the general plugin (every process) and the endpoint plugin (API server).

``vllm.general_plugins`` → `register`: runs in the API-server, engine-core and worker
processes, possibly more than once per process, so every step checks whether it is done.

- It attaches the worker methods of `editserve.engine.worker` to vLLM's ``WorkerWrapperBase``
  so that ``collective_rpc("editserve_apply", ...)`` reaches them.
- On CPU it wraps ``dispatch_cpu_unquantized_gemm``: vLLM packs every linear weight for
  oneDNN after loading and leaves an empty ``weight`` behind, which cannot be edited. The
  down-projections named by the architecture table (all layers, or those listed in
  ``EDITSERVE_EDITABLE_LAYERS``) get vLLM's own packed kernel and keep their dense weight as
  the master that swaps write and re-pack from (`editserve.engine.cpu_gemm`;
  ``EDITSERVE_CPU_GEMM=dense`` runs them through ``F.linear`` instead).
- With ``EDITSERVE_NEURON_SLOTS`` (e.g. ``5:1024``) it widens those layers' MLPs by zero
  neurons at load, on every platform (`editserve.engine.neuron_slots`); on CPU both of their
  projections keep dense masters.

``vllm.endpoint_plugins`` → `endpoint_plugin`: builds `EditserveEndpoint`, which adds the
``/editserve/v1/*`` routes and the version header, and in ``init_state`` starts the control
plane with the server's ``engine_client`` (applying the ledger head before the first
request). vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them; both entry
points are called ``editserve``, so ``VLLM_PLUGINS=editserve`` enables the pair.
"""

from __future__ import annotations

import logging
import os
import re
from argparse import Namespace
from typing import Any

import torch

from editserve.editing.arch import ARCHITECTURES
from editserve.engine.neuron_slots import install_widening, slot_layer_of, slots_from_env
from editserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

PLUGIN_NAME = "editserve"
EDITABLE_LAYERS_ENV = "EDITSERVE_EDITABLE_LAYERS"
_MARK = "_editserve_editable_dispatch"


def parse_layers(text: str | None) -> frozenset[int] | None:
    """``None``/"all" → every layer; else a comma list of layers and ranges, e.g. ``"3-7,12"``."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise InvalidRequestError(f"{EDITABLE_LAYERS_ENV} must be 'all' or layers like '3-7,12', got {text!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise InvalidRequestError(f"layer range {part!r} in {EDITABLE_LAYERS_ENV} is empty")
        layers.update(range(lo, hi + 1))
    return frozenset(layers)


def _editable_pattern() -> re.Pattern[str]:
    alternatives = sorted({re.escape(s.vllm_down_proj).replace(r"\{\}", r"(\d+)") for s in ARCHITECTURES})
    return re.compile(r"(?:^|\.)(?:" + "|".join(alternatives) + r")$")


def is_editable(prefix: str, layers: frozenset[int] | None, pattern: re.Pattern[str]) -> bool:
    """Whether the vLLM layer named `prefix` is an editable down-projection."""
    m = pattern.search(prefix)
    if m is None:
        return False
    layer = next(int(g) for g in m.groups() if g is not None)
    return layers is None or layer in layers


def install_editable_dispatch(layers: frozenset[int] | None, mode: str, slot_layers: frozenset[int] = frozenset()) -> bool:
    """Prepare editable down-projections on CPU (`editserve.engine.cpu_gemm.prepare`: vLLM's
    kernel plus the dense master, or ``F.linear`` in ``dense`` mode), and both MLP projections of
    the layers with neuron slots (`slot_layers`); False if already installed."""
    from vllm.model_executor.layers import utils as layer_utils

    from editserve.engine.cpu_gemm import prepare

    original = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(original, _MARK, False):
        return False
    pattern = _editable_pattern()

    def dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
        prefix = str(getattr(layer, "prefix", ""))
        weight = getattr(layer, "weight", None)
        mlp = slot_layer_of(prefix)
        if (isinstance(weight, torch.Tensor) and weight.dim() == 2 and not weight.is_meta
                and (is_editable(prefix, layers, pattern) or (mlp is not None and mlp[0] in slot_layers))):
            kind = prepare(layer, original, mode)
            log.debug("editserve keeps %s editable %s with a %s kernel", prefix, tuple(weight.shape), kind)
            return
        original(layer, remove_weight)

    setattr(dispatch, _MARK, True)
    dispatch.__wrapped__ = original  # type: ignore[attr-defined]
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch
    return True


def install_worker_methods() -> list[str]:
    """Attach the ``editserve_*`` worker methods to ``WorkerWrapperBase``; returns those added."""
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    from editserve.engine.worker import WORKER_METHODS, EditserveWorkerExtension

    added = []
    for name in WORKER_METHODS:
        if getattr(WorkerWrapperBase, name, None) is None:
            setattr(WorkerWrapperBase, name, getattr(EditserveWorkerExtension, name))
            added.append(name)
    return added


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent)."""
    from vllm.platforms import current_platform

    added = install_worker_methods()
    slots = slots_from_env(os.environ)
    if install_widening(slots):
        log.info("editserve: neuron slots %s (layer: slots) are added to the MLPs at load",
                 ", ".join(f"{k}:{v}" for k, v in sorted(slots.items())))
    if current_platform.is_cpu():
        from editserve.engine.cpu_gemm import KERNEL_ENV, kernel_mode

        layers = parse_layers(os.environ.get(EDITABLE_LAYERS_ENV))
        mode = kernel_mode(os.environ)
        if install_editable_dispatch(layers, mode, frozenset(slots)):
            log.info("editserve: CPU down-projections of %s are editable (%s=%s)",
                     "all layers" if layers is None else f"layers {sorted(layers)}", KERNEL_ENV, mode)
    if added:
        log.debug("editserve: worker methods %s installed", added)


class EditserveEndpoint:
    """The ``vllm.endpoint_plugins`` object: routes, version header and the control plane."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        from editserve.engine.http import install_routes

        install_routes(app)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        from editserve.engine.control import ControlPlane, ControlSettings

        if engine_client is None:
            raise InvalidRequestError("the editserve endpoint plugin needs an engine; it cannot run on a render-only server")
        settings = ControlSettings.from_env(model=str(args.model), tensor_parallel_size=int(args.tensor_parallel_size))
        control = ControlPlane(engine_client, settings)
        await control.start()
        state.editserve = control
        from editserve.candidates.staging import attach as attach_candidates

        names = getattr(args, "served_model_name", None) or [str(args.model)]
        attach_candidates(control, state, str(names[0]))        # control.candidates (None unless --candidates N)
        # The gRPC control plane (editserve.control.server) on the same loop and ControlPlane.
        from editserve.control.server import maybe_start

        try:
            state.editserve_grpc = await maybe_start(control)
        except BaseException:
            await control.close()
            raise


def endpoint_plugin() -> EditserveEndpoint:
    """The ``vllm.endpoint_plugins`` entry point (a zero-argument factory)."""
    return EditserveEndpoint()
