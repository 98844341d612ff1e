"""Typed exceptions raised on bad input or bad state, shared by every layer of editserve.

Each error carries a message that names the offending value; the gRPC layer maps the
classes to status codes, the CLI prints them.
"""

from __future__ import annotations


class EditserveError(Exception):
    """Base class of every error editserve raises on purpose."""


class InvalidRequestError(EditserveError, ValueError):
    """An edit request is malformed (template, subject, target)."""


class UnknownArchitectureError(EditserveError, ValueError):
    """The model's architecture is not in the architecture table."""


class LayerOutOfRangeError(EditserveError, ValueError):
    """A requested layer index does not exist in the model."""


class NonFiniteError(EditserveError, ValueError):
    """Statistics, factors or weights contain NaN or infinity."""


class PatchMismatchError(EditserveError, ValueError):
    """A patch does not fit the model (fingerprint, weight name, shape or dtype)."""


class PatchStateError(EditserveError, RuntimeError):
    """Applying or removing a patch is not possible in the model's current state."""


class DataError(EditserveError, ValueError):
    """An input data file (corpus, CounterFact records) is missing or malformed."""


class MetricsError(EditserveError, ValueError):
    """A metric was recorded with a label outside its fixed set or a value outside its range."""
