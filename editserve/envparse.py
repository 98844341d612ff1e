"""Settings read from environment variables: one reader per kind of value, each naming the variable
and the bad value in its `InvalidRequestError`, so a mistyped deployment fails at start, clearly."""

from __future__ import annotations

import math
from collections.abc import Mapping

from editserve.errors import InvalidRequestError


def whole_number(env: Mapping[str, str], name: str, default: int, positive: bool = False,
                 unit: str = "") -> int:
    """``env[name]`` as an integer ≥ 0 (> 0 with `positive`); `default` when unset or blank."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or (positive and int(raw) == 0):
        what = "a positive whole number" if positive else "a whole number >= 0"
        raise InvalidRequestError(f"{name} must be {what}{' of ' + unit if unit else ''}, got {raw!r}")
    return int(raw)


def real_number(env: Mapping[str, str], name: str, default: float, minimum: float | None = 0.0,
                strictly_above: bool = False, unit: str = "") -> float:
    """``env[name]`` as a finite float ≥ `minimum` (> with `strictly_above`; None: any finite value);
    `default` when unset or blank."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    of = f" of {unit}" if unit else ""
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequestError(f"{name} must be a number{of}, got {raw!r}") from None
    low_ok = minimum is None or (value > minimum if strictly_above else value >= minimum)
    if not math.isfinite(value) or not low_ok:
        bound = "" if minimum is None else f" {'>' if strictly_above else '>='} {minimum:g}"
        raise InvalidRequestError(f"{name} must be a finite number{of}{bound}, got {raw!r}")
    return value
