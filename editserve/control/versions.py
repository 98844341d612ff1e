"""Version changes the engine's `ControlPlane` has no method for yet: revert and import.

Both follow the control plane's own protocol (see `editserve.engine.control`): under its
version lock, follow the ledger head, build the target list of active patches, swap with the
ledger write as the swap's commit step (inside the pause; a failure restores the previous
version everywhere and writes nothing), then move the sidecar and check parity. They use the
control plane's internal steps (`_follow_head`, `_swap`, `_set_served`, `_sync_sidecar`);
they belong in `ControlPlane` and should move there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from editserve.engine.control import VersionChange
from editserve.engine.errors import SwapFailed
from editserve.engine.wire import message_for
from editserve.ledger import LedgerConflict
from editserve.patches import Patch


async def _change(control: Any, kind: str, expected_head: int | None,
                  target_of: Callable[[list[Patch]], Sequence[Patch]],
                  write: Callable[[int], int], patch_id: str | None = None) -> VersionChange:
    control._check_usable()
    t0 = time.perf_counter()
    async with control._lock:
        await control._follow_head()
        head = control.served.version
        if expected_head is not None and expected_head != head:
            raise LedgerConflict(f"expected head {expected_head}, the head is version {head}",
                                 expected_head=expected_head, actual_head=head)
        current = await asyncio.to_thread(control.ledger.active_patches, head)
        target = list(target_of(current))
        message = message_for(-1, control.family, target)

        async def commit() -> int:
            version = await asyncio.to_thread(write, head)
            active = await asyncio.to_thread(control.ledger.active_ids, version)
            if tuple(active) != tuple(p.digest for p in target):
                raise SwapFailed(f"ledger version {version} does not hold the patches just applied")
            return version

        result, expected = await control._swap(message, target, commit)
        version = int(result.committed)
        control._set_served(version, message, expected, len(target))
        t_swap = time.perf_counter()
        await control._sync_sidecar(version, result)
    t_end = time.perf_counter()
    return VersionChange(version=version, previous_version=head, kind=kind,
                         pause_ms=round(result.pause_seconds * 1e3, 3), swap=result.to_dict(),
                         timings_ms={"swap": round((t_swap - t0) * 1e3, 3),
                                     "sidecar_sync": round((t_end - t_swap) * 1e3, 3)},
                         patch_id=patch_id, active_patches=len(target))


async def revert(control: Any, version: int, caller: str, expected_head: int | None = None,
                 idempotency_key: str | None = None) -> VersionChange:
    """Serve a new version equal to the head without the patch that `version` added (no rebase)."""
    from editserve.ledger import RevertError

    info = await asyncio.to_thread(control.ledger.version, version)          # VersionNotFound
    if info.patch_id is None:
        raise RevertError(f"version {version} ({info.kind}) added no patch; there is nothing to revert")
    removed = info.patch_id

    def target_of(current: list[Patch]) -> list[Patch]:
        if removed not in [p.digest for p in current]:
            raise RevertError(f"the patch of version {version} ({removed[:12]}) is not active at the head")
        return [p for p in current if p.digest != removed]

    def write(head: int) -> int:
        return control.ledger.revert(version, caller, expected_head=head, idempotency_key=idempotency_key).version

    return await _change(control, "revert", expected_head, target_of, write, patch_id=removed)


async def import_patch(control: Any, src: Path, caller: str, expected_head: int | None = None,
                       idempotency_key: str | None = None) -> VersionChange:
    """Validate the exported patch in directory `src`, then commit and serve it on top of the head."""
    from editserve.ledger.errors import ImportRejected
    from editserve.ledger.transfer import (
        DEFAULT_MAX_RELATIVE_NORM,
        PATCH_FILE,
        _check_fingerprint,
        _read_export,
        _validate_patch,
    )
    from editserve.editing.arch import Layout

    def validate() -> Patch:
        manifest, tensors = _read_export(src, "patch", PATCH_FILE)
        _check_fingerprint(control.ledger, manifest)
        return _validate_patch(control.ledger, manifest, tensors, "the imported patch", None, Layout.OUT_IN,
                               DEFAULT_MAX_RELATIVE_NORM)

    patch = await asyncio.to_thread(validate)

    def target_of(current: list[Patch]) -> list[Patch]:
        if patch.digest in [p.digest for p in current]:
            raise ImportRejected(f"patch {patch.digest[:12]} is already active at the head")
        return current + [patch]

    def write(head: int) -> int:
        return control.ledger.import_patch(src, head, caller, idempotency_key=idempotency_key)

    return await _change(control, "import", expected_head, target_of, write, patch_id=patch.digest)


