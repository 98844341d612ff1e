"""A small forward-hook API: capture or edit module inputs/outputs, always removing the hooks.

    with Hooks(model) as h:
        h.capture_input("model.layers.5.mlp.down_proj")      # keys
        h.edit_output("model.layers.5.mlp", add_delta)       # values
        h.stop_when_captured()                               # skip the rest of the forward
        h.run(input_ids=ids)
    keys = h.inputs["model.layers.5.mlp.down_proj"]          # [batch, seq, d_in]

Hooks are registered on entry and removed on exit, whatever happens in between.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from editserve.editing.arch import get_module


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once the needed layers have run."""


def _first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value: Any, tensor: torch.Tensor) -> Any:
    return (tensor, *value[1:]) if isinstance(value, tuple) else tensor


def _detach_all(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach_all(v) for v in value)
    return value


class _ForwardPatch:
    """Makes `module` return `output` without computing; `remove()` restores its own forward."""

    def __init__(self, module: torch.nn.Module, output: Any) -> None:
        self.module = module
        self._had_instance_forward = "forward" in module.__dict__
        self._saved = module.__dict__.get("forward")
        module.forward = lambda *_args, **_kwargs: output  # type: ignore[method-assign]

    def remove(self) -> None:
        if self._had_instance_forward:
            self.module.forward = self._saved  # type: ignore[method-assign]
        else:
            self.module.__dict__.pop("forward", None)


class Hooks:
    """Context manager collecting forward hooks on named submodules of one model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.whole_outputs: dict[str, Any] = {}   # complete return values (tensor or tuple), see replay_output
        self._handles: list[Any] = []             # RemovableHandle or _ForwardPatch, each with .remove()
        self._entered = False
        self._captures: set[str] = set()     # "in:name" / "out:name" of every capture hook
        self._seen: set[str] = set()         # captures that fired in the current run
        self._stop_when_captured = False

    def __enter__(self) -> "Hooks":
        self._entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _require_entered(self) -> None:
        if not self._entered:
            raise RuntimeError("Hooks must be used as a context manager so that hooks are always removed")

    def capture_input(self, name: str, detach: bool = True) -> None:
        """Record the first positional input of `name` in ``self.inputs[name]``."""
        self._require_entered()

        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            self.inputs[name] = x.detach() if detach else x
            self._fired(f"in:{name}")

        self._captures.add(f"in:{name}")
        self._handles.append(get_module(self.model, name).register_forward_pre_hook(hook))

    def capture_output(self, name: str, detach: bool = True, whole: bool = False) -> None:
        """Record the (first tensor of the) output of `name` in ``self.outputs[name]``.

        whole=True also keeps the complete return value in ``self.whole_outputs[name]`` (for `replay_output`).
        """
        self._require_entered()

        def hook(_module: torch.nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            y = _first_tensor(output)
            self.outputs[name] = y.detach() if detach else y
            if whole:
                self.whole_outputs[name] = _detach_all(output) if detach else output
            self._fired(f"out:{name}")

        self._captures.add(f"out:{name}")
        self._handles.append(get_module(self.model, name).register_forward_hook(hook))

    def edit_output(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the (first tensor of the) output of `name` by ``fn(output)``."""
        self._require_entered()

        def hook(_module: torch.nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
            return _replace_first(output, fn(_first_tensor(output)))

        self._handles.append(get_module(self.model, name).register_forward_hook(hook))

    def add_to_output(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Add ``fn(input)`` to the (first tensor of the) output of `name`, where input is its first
        positional input (a side branch computed from what the module reads, e.g. extra MLP neurons)."""
        self._require_entered()

        def hook(_module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            y = _first_tensor(output)
            return _replace_first(output, y + fn(args[0]).to(y.dtype))

        self._handles.append(get_module(self.model, name).register_forward_hook(hook))

    def edit_input(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the first positional input of `name` by ``fn(input)``."""
        self._require_entered()

        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (fn(args[0]), *args[1:])

        self._handles.append(get_module(self.model, name).register_forward_pre_hook(hook))

    def replay_output(self, names: list[str], output: Any) -> None:
        """Skip the computation of modules `names`: each returns `output` (a value captured with whole=True).

        Used to freeze the blocks below an edit layer, whose outputs cannot change: the block after
        them consumes `output` exactly as if they had run. Their own side effects (e.g. appending to a
        KV cache) do not happen, so only replay blocks whose side effects nothing later reads.
        """
        self._require_entered()
        for name in names:
            self._handles.append(_ForwardPatch(get_module(self.model, name), output))

    def add_low_rank(self, name: str, u: torch.Tensor, v: torch.Tensor) -> None:
        """Add ``x @ v @ u.T`` to the output of linear `name` (x its input): a merge-free ΔW = u vᵀ."""
        self._require_entered()

        def hook(_module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            x = args[0]
            return _replace_first(output, _first_tensor(output) + (x.to(v.dtype) @ v @ u.T).to(x.dtype))

        self._handles.append(get_module(self.model, name).register_forward_hook(hook))

    def stop_after(self, name: str) -> None:
        """End the forward pass as soon as `name` has produced its output."""
        self._require_entered()

        def hook(_module: torch.nn.Module, _args: tuple[Any, ...], _output: Any) -> None:
            raise StopForward

        self._handles.append(get_module(self.model, name).register_forward_hook(hook))

    def stop_when_captured(self) -> None:
        """End each forward pass as soon as every capture hook has fired (skips the later layers)."""
        self._require_entered()
        self._stop_when_captured = True

    def _fired(self, key: str) -> None:
        self._seen.add(key)
        if self._stop_when_captured and self._seen >= self._captures:
            raise StopForward

    def run(self, **model_inputs: Any) -> Any:
        """Call the model; returns its output, or None when a stop hook ended it early."""
        self._require_entered()
        self._seen = set()
        try:
            return self.model(**model_inputs)
        except StopForward:
            return None
