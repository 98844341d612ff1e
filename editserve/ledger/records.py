"""The records the ledger hands to callers — a version (`VersionInfo`), a rebase's steps, plan and
result — and the two helpers its writes share (`json_safe`, `request_digest`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from editserve.editing.alphaedit import PreservedKeys
from editserve.editing.requests import EditRequest
from editserve.errors import InvalidRequestError
from editserve.ledger.consolidation import RemovalPlan
from editserve.patches import Patch


@dataclass(frozen=True)
class VersionInfo:
    """One version as shown to callers: its operations plus the metadata of the patch it added."""

    version: int
    parent: int | None
    kind: str                                  # base | commit | revert | import | consolidate
    patch_id: str | None                       # digest of the patch this version added
    added: tuple[str, ...]
    removed: tuple[str, ...]
    caller: str
    created_at: float
    probe_report: dict[str, Any] | None
    idempotency_key: str | None
    method: str | None
    requests: tuple[EditRequest, ...]
    hparams: dict[str, Any] | None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RebaseStep:
    """One later patch to recompute after a revert.

    `old_context` were the patches in effect when `old_patch` was computed; `new_context` are
    the patches that will be in effect below its replacement (earlier recomputed ones included).
    A recompute callable must compute on a model with exactly `new_context` applied.
    """

    version: int                               # the version that added old_patch
    old_patch: Patch
    old_context: tuple[Patch, ...]
    new_context: tuple[Patch, ...]
    old_probe_report: dict[str, Any] | None
    # The preserved-keys states (AlphaEdit) of the two contexts: the blocks of `old_context`'s
    # patches as stored with them, and those of `new_context`'s (recomputed ones included), in order.
    old_preserved: PreservedKeys = PreservedKeys()
    new_preserved: PreservedKeys = PreservedKeys()

    @property
    def requests(self) -> tuple[EditRequest, ...]:
        return self.old_patch.requests

    @property
    def method(self) -> str:
        return self.old_patch.method

    @property
    def hparams(self) -> dict[str, Any]:
        return self.old_patch.hparams


@dataclass(frozen=True)
class RebaseOutcome:
    """What a recompute callable returns: the new patch and the metrics before/after."""

    patch: Patch
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    keys: PreservedKeys | None = None      # the new patch's preserved-keys blocks (stored with it)


@dataclass(frozen=True)
class RebasePlan:
    """The recomputed later patches of a revert of `version` at `head`, not yet written
    (`Ledger.plan_rebase`). `Ledger.revert(version, rebase=plan, expected_head=head)` writes it
    as it is, so a plan computed in one process (the sidecar) is committed by another."""

    version: int                               # the version whose patch is removed
    head: int                                  # the head the plan was computed at
    removed_patch: str
    kept: tuple[str, ...]                      # active patches before the removed one (unchanged)
    replaced: tuple[str, ...]                  # the later patches, in order
    outcomes: tuple[RebaseOutcome, ...]        # their recomputed versions, same order
    rebased: tuple["RebasedPatch", ...]
    # When a consolidation had taken the removed patch in: that consolidated patch re-solved without
    # it (`plan_fact_removal`); `kept` are then the active patches up to the last consolidated one
    # less the holder, and `replaced` the later (unconsolidated) ones.
    removal: RemovalPlan | None = None

    @property
    def patches(self) -> tuple[Patch, ...]:
        return tuple(o.patch for o in self.outcomes)

    @property
    def final(self) -> tuple[str, ...]:
        """The active patch ids of the new version."""
        held = (self.removal.patch.digest,) if self.removal is not None else ()
        return self.kept + held + tuple(o.patch.digest for o in self.outcomes)


@dataclass(frozen=True)
class RebasedPatch:
    original_version: int
    old_patch: str
    new_patch: str
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]

    @property
    def changes(self) -> dict[str, float]:
        """after − before for every metric both sides report."""
        return {k: float(self.metrics_after[k]) - float(self.metrics_before[k])
                for k in sorted(set(self.metrics_before) & set(self.metrics_after))}

    def to_dict(self) -> dict[str, Any]:
        return {"original_version": self.original_version, "old_patch": self.old_patch, "new_patch": self.new_patch,
                "metrics_before": self.metrics_before, "metrics_after": self.metrics_after, "changes": self.changes}


@dataclass(frozen=True)
class RevertResult:
    version: int                               # the new version (or the existing one for a retried key)
    reverted_version: int
    removed_patch: str
    rebased: tuple[RebasedPatch, ...]
    created: bool


# ---------------------------------------------------------------------------------------------
# Helpers of the writes


def json_safe(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{what} must be JSON-serialisable without NaN/infinity: {exc}") from exc


def request_digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
