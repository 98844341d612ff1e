"""`VersionChange`: what an edit, rollback, revert, import or follow did — the version served now and its cost;
`ComputedSwap`: a change computed on the sidecar and served by one swap (rebase, consolidation, a revert out of
a consolidation), which reports itself as a `VersionChange`."""

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


@dataclass(frozen=True)
class ComputedSwap:
    """A change computed on the sidecar at version `head` and served by one swap that wrote `version`.
    Times are ``time.perf_counter()`` readings: compute started, compute done, swap done, sidecar in sync."""

    head: int
    version: int
    result: Any                                   # engine.swap's SwapResult (pause_seconds, to_dict())
    active_patches: int
    t_start: float
    t_computed: float
    t_swap: float
    t_synced: float

    @property
    def pause_ms(self) -> float:
        return round(self.result.pause_seconds * 1e3, 3)

    def change(self, kind: str, patch_id: str | None, method: str | None = None) -> VersionChange:
        """The `VersionChange` of kind `kind` ("rebase", "consolidate", "revert") this swap made."""
        return VersionChange(version=self.version, previous_version=self.head, kind=kind, pause_ms=self.pause_ms,
                             swap=self.result.to_dict(),
                             timings_ms={"compute": round((self.t_computed - self.t_start) * 1e3, 3),
                                         "swap": round((self.t_swap - self.t_computed) * 1e3, 3),
                                         "sidecar_sync": round((self.t_synced - self.t_swap) * 1e3, 3)},
                             patch_id=patch_id, method=method, active_patches=self.active_patches)
