"""Where editserve keeps its files: ``$EDITSERVE_HOME`` (default ``~/.cache/editserve``)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The editserve cache/state directory, created on first use."""
    root = Path(os.environ.get("EDITSERVE_HOME") or Path.home() / ".cache" / "editserve").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(*parts: str) -> Path:
    path = home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
