"""Subcommands of the editserve CLI, one module per area."""

from __future__ import annotations

import json
from typing import Any

from editserve.errors import DataError


def parse_hparams(text: str | None, flag: str = "--hparams") -> dict[str, Any] | None:
    """A ``--hparams`` value: a JSON object of hyper-parameter overrides, or None when not given.
    Which keys and values are allowed is the method's (and, for a server, the control plane's) call."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{flag} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise DataError(f"{flag} must be a JSON object, got {text!r}")
    return value
