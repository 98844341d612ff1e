"""Publishing a cache file that several processes may write at once.

The statistics, null-space projections, context prefixes and the default corpus under
``$EDITSERVE_HOME`` are caches: any process that misses one builds it and publishes it. Replicas
of a fleet on one host (or two test workers) can share a home and build the same file at the same
time, so each writer writes its own temporary file (named by process and thread) and renames it
over the target: a reader sees the old file, no file or a complete one, and the last rename wins
(every writer built the same content). A temporary file left by a failed write is removed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path


def private_tmp(path: Path) -> Path:
    """A temporary name next to `path` that no other process or thread uses."""
    return path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def publish(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` to write the whole file to a private temporary path, then rename it to
    `path` (atomic on POSIX). The temporary file is removed if `write` or the rename fails."""
    tmp = private_tmp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
