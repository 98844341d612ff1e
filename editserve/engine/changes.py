"""`VersionChange`: what an edit, rollback, revert, import or follow did — the version served now and its cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class VersionChange:
    """The result of an edit or rollback: which version is served now and what it cost."""

    version: int
    previous_version: int
    kind: str                                     # "edit" | "dry_run" | "replayed" | "rollback" | "revert" | "import" | "follow" | "start"
    pause_ms: float
    swap: dict[str, Any]
    timings_ms: dict[str, float]
    patch_id: str | None = None
    method: str | None = None
    probe_report: dict[str, Any] | None = None
    active_patches: int = 0
    serving_replicas: tuple[str, ...] = ()        # live replicas serving `version` at the reply (docs/fleet.md)
    lagging_replicas: tuple[str, ...] = ()
    patch: Any = field(default=None, compare=False, repr=False)   # a dry run's computed Patch (never serialised)
    keys: Any = field(default=None, compare=False, repr=False)    # and its preserved-keys blocks (PreservedKeys)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(replace(self, patch=None, keys=None))
        out.pop("patch")
        out.pop("keys")
        return out
