"""Gate policy: every edit runs the probe gate; only an admin may skip it, and a skip is audited.

The gate itself (what is measured, the thresholds and their loosest bounds) lives in
`editserve.control.probe`; this module decides whether it runs for a request and what the
ledger records when it does not: the committed version's probe report carries
``gate_skipped: {"by": <caller>, "role": "admin"}``, and the audit log has a WARNING line.
"""

from __future__ import annotations

import logging
from typing import Any

from editserve.control.principals import Principal, require

log = logging.getLogger("editserve.audit")


def gate_for(principal: Principal, gate: Any, skip: bool) -> Any:
    """The gate configuration to run (`gate`), or None when an admin skips it (`PermissionDenied`
    for anyone else asking to skip)."""
    if not skip:
        return gate
    require(principal, "edit.skip_gate", "an edit with skip_gate")
    log.warning("audit: %s skips the probe gate of an edit", principal.caller)
    return None


def skip_record(principal: Principal) -> dict[str, Any]:
    """What the probe report of an edit whose gate was skipped records."""
    return {"gate_skipped": {"by": principal.caller, "role": principal.role}}
