"""Limits of the control plane: which hyper-parameter overrides an edit may carry, their bounds,
and which of them only an admin may use.

An edit may override a few of the method's hyper-parameters (`editserve.editing.hparams`),
given as a JSON object of the same nesting (``{"value": {"max_steps": 40}}``). Every key must
be in `HPARAM_BOUNDS`; numbers must be finite and inside their bounds. Overrides that change
the covariance statistics (``stats.*``: each new value builds and stores another statistics
file) or the prefixes (``prefixes.*``) need the admin role. The layers are chosen by the
request's ``layers`` field, never here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from editserve.control.errors import RequestTooLarge
from editserve.editing.hparams import EARLY_STOPS, KEY_MODES
from editserve.errors import InvalidRequestError

MAX_HPARAMS_JSON_CHARS = 2000


@dataclass(frozen=True)
class Bound:
    """Allowed values of one override."""

    kind: type                      # int | float | str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    admin: bool = False             # changes statistics or prefixes


# "section.name" (or "name" at the top level) → bound; the methods each accept a subset.
HPARAM_BOUNDS: Mapping[str, Bound] = {
    "value.max_steps": Bound(int, 1, 100),
    "value.lr": Bound(float, 1e-4, 10.0),
    "value.kl_factor": Bound(float, 0.0, 10.0),
    "value.weight_decay": Bound(float, 0.0, 1.0),
    "value.clamp_norm_factor": Bound(float, 0.1, 100.0),
    "value.early_stop_nll": Bound(float, 0.0, 10.0),
    "value.early_stop": Bound(str, choices=EARLY_STOPS),
    "value.early_stop_margin": Bound(float, 0.0, 50.0),
    "cov_weight": Bound(float, 1.0, 1e6),
    "alpha": Bound(float, 1e-3, 1e4),
    # a new threshold builds and caches another projection per layer (d_in² float64 each)
    "nullspace_threshold": Bound(float, 1e-8, 1e3, admin=True),
    "keys": Bound(str, choices=KEY_MODES),
    "prefixes.n_prefixes": Bound(int, 0, 50, admin=True),
    "prefixes.prefix_tokens": Bound(int, 1, 50, admin=True),
    "prefixes.seed": Bound(int, 0, 2 ** 31 - 1, admin=True),
    "stats.n_tokens": Bound(int, 1000, 10_000_000, admin=True),
    "stats.seq_len": Bound(int, 16, 2048, admin=True),
    "stats.batch_size": Bound(int, 1, 64, admin=True),
    "margin": Bound(float, 1.0, 100.0),
    "strength": Bound(float, 0.05, 10.0),
}
METHOD_KEYS: Mapping[str, frozenset[str]] = {
    "rome": frozenset(k for k in HPARAM_BOUNDS if k not in ("cov_weight", "keys", "alpha", "nullspace_threshold",
                                                             "margin", "strength")),
    "memit": frozenset(k for k in HPARAM_BOUNDS if k not in ("alpha", "nullspace_threshold", "margin", "strength")),
    "alphaedit": frozenset(k for k in HPARAM_BOUNDS if k not in ("cov_weight", "margin", "strength")),
    # a gated edit reads no covariance statistics
    "gated": frozenset(k for k in HPARAM_BOUNDS if k.startswith(("value.", "prefixes.")) or k in ("margin", "strength")),
}


@dataclass(frozen=True)
class HparamOverrides:
    """Validated overrides: the nested dict handed to the method, and whether an admin must ask."""

    values: tuple[tuple[str, Any], ...] = ()      # ("value.max_steps", 40), sorted

    @property
    def needs_admin(self) -> bool:
        return any(HPARAM_BOUNDS[k].admin for k, _ in self.values)

    def nested(self) -> dict[str, Any] | None:
        if not self.values:
            return None
        out: dict[str, Any] = {}
        for key, value in self.values:
            section, _, name = key.rpartition(".")
            (out.setdefault(section, {}) if section else out)[name] = value
        return out


def _flatten(obj: Mapping[str, Any], where: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in obj.items():
        key = f"{where}.{k}" if where else str(k)
        if isinstance(v, dict):
            out.extend(_flatten(v, key))
        else:
            out.append((key, v))
    return out


def _checked(key: str, value: Any, bound: Bound) -> Any:
    if bound.kind is str:
        if not isinstance(value, str) or value not in bound.choices:
            raise InvalidRequestError(f"hparams {key}={value!r}; choose one of {list(bound.choices)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"hparams {key}={value!r} must be a number")
    if bound.kind is int and (isinstance(value, float) and not value.is_integer()):
        raise InvalidRequestError(f"hparams {key}={value!r} must be an integer")
    if not math.isfinite(float(value)) or not (bound.low <= value <= bound.high):  # type: ignore[operator]
        raise InvalidRequestError(f"hparams {key}={value!r} is out of range; it must be in "
                                  f"[{bound.low:g}, {bound.high:g}]")
    return int(value) if bound.kind is int else float(value)


def hparam_overrides(method: str, text: str) -> HparamOverrides:
    """Parse and check the overrides of an edit (``text``: a JSON object, or "" for none)."""
    if not text:
        return HparamOverrides()
    if len(text) > MAX_HPARAMS_JSON_CHARS:
        raise RequestTooLarge(f"hparams is {len(text)} characters long; the limit is {MAX_HPARAMS_JSON_CHARS}")
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise InvalidRequestError(f"hparams is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidRequestError(f"hparams must be a JSON object, got {type(obj).__name__}")
    allowed = METHOD_KEYS.get(method, frozenset())
    values = []
    for key, value in _flatten(obj):
        if key not in allowed:
            raise InvalidRequestError(f"hparams {key!r} cannot be overridden for method {method!r}; allowed: "
                                      f"{sorted(allowed)}")
        values.append((key, _checked(key, value, HPARAM_BOUNDS[key])))
    return HparamOverrides(values=tuple(sorted(values)))
