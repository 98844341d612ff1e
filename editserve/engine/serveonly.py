"""Serve-only replicas: a replica without a sidecar (``EDITSERVE_SIDECAR=0`` / ``editserve serve --serve-only``).

A serve-only replica holds no second copy of the model (no sidecar process, no statistics),
so it saves the sidecar's memory. It still follows the ledger head: every swap is built from
the ledger's patches and verified against checksums computed from the ledger's base copies
(`editserve.engine.expected`), exactly as on a replica with a sidecar; only the sidecar's
parity check after the swap is absent.

What needs the sidecar — computing an edit (also a dry run), probing and tracing — is refused
with `ServeOnlyReplica` (gRPC FAILED_PRECONDITION, HTTP 409), which names the live replicas that
can take edits (role ``compute`` in the replica registry) and their control addresses. Edits
are refused rather than forwarded: a forwarded call would have to carry the caller's bearer
token to another replica (or let replicas vouch for each other's principals), and the caller's
own retry to a compute replica keeps authentication and the audit principal exactly as they
are. Rollback, revert, import and sync need no sidecar and work on a serve-only replica.

The ledger is opened with the served checkpoint's fingerprint (`checkpoint_fingerprint`), the
same value a sidecar would compute, so a serve-only replica cannot join a ledger of another model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from editserve.engine.errors import EngineError, PluginSetupError
from editserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

SIDECAR_ENV = "EDITSERVE_SIDECAR"            # "0": serve-only; "1" or unset: with a sidecar
FINGERPRINT_TIMEOUT_S = 1800.0


class ServeOnlyReplica(EngineError, RuntimeError):
    """This replica runs without a sidecar and cannot compute edits, probes or traces.
    `edit_replicas` lists ``"id (address)"`` of the live replicas that can (may be empty).
    gRPC FAILED_PRECONDITION, HTTP 409."""

    def __init__(self, message: str, replica_id: str = "", edit_replicas: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.replica_id = replica_id
        self.edit_replicas = tuple(edit_replicas)


def serve_only_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``EDITSERVE_SIDECAR`` is ``0`` (also ``false``/``no``/``off``); refuses anything else but 1/true/yes/on."""
    env = os.environ if environ is None else environ
    raw = env.get(SIDECAR_ENV, "").strip().lower()
    if raw in ("", "1", "true", "yes", "on"):
        return False
    if raw in ("0", "false", "no", "off"):
        return True
    raise InvalidRequestError(f"{SIDECAR_ENV} must be 0 (serve-only) or 1 (with a sidecar), got {raw!r}")


def refusal(what: str, replica_id: str, rows: Sequence[Mapping[str, Any]]) -> ServeOnlyReplica:
    """The error for `what` (e.g. "an edit") on serve-only replica `replica_id`; `rows` are the
    registry rows (`editserve.engine.fleet.FleetMember.fleet`) read just now, or [] if unreadable."""
    from editserve.engine.fleet import ROLE_COMPUTE

    able = [f"{r['replica_id']} ({r['address']})" for r in rows
            if r.get("live") and r.get("role") == ROLE_COMPUTE and r.get("replica_id") != replica_id]
    where = ("send it to a replica with a sidecar: " + ", ".join(able)) if able else \
        "no live replica with a sidecar is registered in the ledger"
    return ServeOnlyReplica(f"replica {replica_id} is serve-only ({SIDECAR_ENV}=0) and cannot compute {what}; "
                            f"{where}", replica_id=replica_id, edit_replicas=able)


_FINGERPRINT_CHILD = (
    "import json, sys, torch\n"
    "from editserve.editing.model import fingerprint, load_model\n"
    "model, _ = load_model(sys.argv[1] or None, device='cpu', dtype=getattr(torch, sys.argv[2]))\n"
    "print(json.dumps({'fingerprint': fingerprint(model)}))\n"
)


def checkpoint_fingerprint(checkpoint: str | None, dtype: str) -> str:
    """The fingerprint a sidecar would compute for `checkpoint` loaded in `dtype`
    (`editserve.editing.model.load_model` + ``fingerprint``). Read from the checkpoint's
    fingerprint file when it applies (float32); otherwise computed in a short-lived child
    process, so the model copy's memory is returned to the system once it is known."""
    from editserve.editing.model import FINGERPRINT_FILE, resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    fp_file = ckpt / FINGERPRINT_FILE
    if dtype == "float32" and fp_file.exists():
        return str(json.loads(fp_file.read_text())["fingerprint"])
    log.info("serve-only: computing the fingerprint of %s (%s) in a child process", ckpt, dtype)
    try:
        out = subprocess.run([sys.executable, "-c", _FINGERPRINT_CHILD, str(ckpt), dtype], capture_output=True,
                             text=True, timeout=FINGERPRINT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise PluginSetupError(f"computing the fingerprint of {ckpt} took over {FINGERPRINT_TIMEOUT_S:.0f} s") from None
    if out.returncode != 0:
        raise PluginSetupError(f"computing the fingerprint of {ckpt} failed (exit {out.returncode}): "
                               f"{out.stderr.strip()[-2000:]}")
    return str(json.loads(out.stdout.strip().splitlines()[-1])["fingerprint"])


async def fingerprint_async(checkpoint: str | None, dtype: str) -> str:
    return await asyncio.to_thread(checkpoint_fingerprint, checkpoint, dtype)
