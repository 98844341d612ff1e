"""The editing maths: pure torch + transformers, no serving.

Public API::

    from editserve.editing import EditRequest, load_model, compute_patch, apply_patch, remove_patch
"""

from __future__ import annotations

from typing import Any

from editserve.editing.requests import EditRequest

__all__ = [
    "EditRequest", "load_model", "compute_patch", "apply_patch", "remove_patch",
    "Patch", "WeightDelta", "fingerprint",
]

_LAZY = {
    "load_model": "editserve.editing.model",
    "fingerprint": "editserve.editing.model",
    "compute_patch": "editserve.editing.edit",
    "apply_patch": "editserve.patches",
    "remove_patch": "editserve.patches",
    "Patch": "editserve.patches",
    "WeightDelta": "editserve.patches",
}


def __getattr__(name: str) -> Any:
    # Lazy so that editserve.patches (which imports editing.arch) and this package do not import each other in a cycle.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'editserve.editing' has no attribute {name!r}")
