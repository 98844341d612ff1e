"""Atomic file replacement: write a private temporary file, then rename it over the target.

Every file that editserve writes whole and that someone else may read (or write) at the same time
goes through `publish`:

- the caches under ``$EDITSERVE_HOME`` (covariance statistics, null-space projections, context
  prefixes, the default corpus), which any process that misses one builds and publishes. Replicas of
  a fleet on one host (or two test workers) can share a home and build the same file at the same
  time; every writer builds the same content, so the last rename wins;
- the ledger's blobs and exported patch files (`editserve.ledger.blobs`, `editserve.ledger.transfer`)
  and materialised checkpoints (`editserve.ledger.checkpoints`), written with ``durable=True``;
- the sidecar's statistics state file (`editserve.engine.stats_warmup`).

Each writer writes its own temporary file (`private_tmp`: named by process, thread and a
per-process counter, so no two calls ever share one) in the target's directory or in a given
directory of the same file system, and renames it over the target (atomic on POSIX): a reader sees
the old file, no file, or a complete new one. With ``durable=True`` the temporary file is fsynced
before the rename and the target's directory after it, so a crash leaves the old or the whole new
content, and once `publish` returns the new file survives a power loss. On any failure (the write,
the fsync, the rename, an interrupt) the temporary file is removed and the target left as it was.

A directory (the converted embedded model, `editserve.editing.model`; the generated gRPC stubs,
`editserve.control.codegen`) is not published here: a rename cannot replace a non-empty directory,
so those keep their own steps. The embedded model is converted into a `private_tmp` directory and
renamed into place only if no complete copy is there yet: a complete copy is never removed, and the
writer that comes second drops its own.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_SEQ = itertools.count()          # next() on an itertools.count is atomic: safe across threads


def private_tmp(path: Path, tmp_dir: Path | None = None) -> Path:
    """A temporary name for `path` (in `tmp_dir`, default next to `path`) that no other process,
    thread or call uses: ``<name>.<pid>.<thread ident>.<counter>.tmp``."""
    name = f"{path.name}.{os.getpid()}.{threading.get_ident()}.{next(_SEQ)}.tmp"
    return (path.parent if tmp_dir is None else Path(tmp_dir)) / name


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename into it), to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(path: Path, write: Callable[[Path], None], *, durable: bool = False,
            tmp_dir: Path | None = None) -> None:
    """Call ``write(tmp)`` to write the whole file to a private temporary path, then rename it to
    `path`. `tmp_dir` (created if missing) must be on `path`'s file system; default `path`'s
    directory. ``durable=True`` fsyncs the file before the rename and `path`'s directory after it.
    The temporary file is removed if anything fails; the exception propagates."""
    if tmp_dir is not None:
        Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    tmp = private_tmp(path, tmp_dir)
    try:
        write(tmp)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove temporary file %s: %s", tmp, exc)
        raise
    if durable:
        fsync_path(path.parent)


def publish_bytes(path: Path, data: bytes | memoryview, *, durable: bool = False,
                  tmp_dir: Path | None = None) -> None:
    """`publish` of a byte string: the temporary file is created exclusively (mode 0644)."""

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    publish(path, write, durable=durable, tmp_dir=tmp_dir)
