"""A replica's edit policy: the settings that decide what an edit does and whether it commits.

Replicas of one ledger should agree on it. An edit is computed and gated by the replica the editor
reaches, with that replica's settings: a fleet whose replicas differ (one with the damage bound set,
one without; another held-out text; another default method) commits by different rules depending on
which replica takes the request, and nothing said so. Each replica records its policy in the replica
registry (`editserve.engine.fleet`, the ``policy`` detail); ``status`` names, per replica, the fields in
which its policy differs from this one's, and ``editserve_fleet_policy_differs`` counts the live
replicas that differ (docs/fleet.md, "One edit policy").

Only what a replica is configured with is in it; the gate's default thresholds, the methods and
their hyper-parameters ship with the package, so its version stands for them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

PACKAGED = "packaged"          # `heldout_text` of the packaged held-out prose
# What matters where a serve-only replica is one side: it computes and gates no edit, so only what it
# serves (which matrices it can swap, with which code) has to agree.
SERVING_FIELDS = ("editserve", "editable_matrices", "neuron_slots")


@dataclass(frozen=True)
class EditPolicy:
    editserve: str                 # the package version (gate defaults, methods, hyper-parameters)
    default_method: str            # EDITSERVE_DEFAULT_METHOD
    editable_matrices: str         # "<count>:<digest of their names>" (EDITSERVE_EDITABLE_LAYERS, the model)
    consolidate_every: int         # EDITSERVE_CONSOLIDATE_EVERY (0: off)
    retention_gate_sample: int     # EDITSERVE_RETENTION_GATE_SAMPLE
    retention_gate_max_drop: float  # EDITSERVE_RETENTION_GATE_MAX_DROP
    max_perplexity_ratio: float    # EDITSERVE_GATE_MAX_PERPLEXITY_RATIO (0: off)
    heldout_text: str              # digest of the EDITSERVE_HELDOUT_TEXT text, or "packaged"
    neuron_slots: str              # EDITSERVE_NEURON_SLOTS as the engine widened it ("5:1024"; "" for none): the
    #                                shapes of the slot layer's matrices, which every replica of a ledger must share

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        """12 hex digits of SHA-256 over the policy's canonical JSON: equal policies, equal digests."""
        return _sha(json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def matrices_token(names: Iterable[str]) -> str:
    """`EditPolicy.editable_matrices` of the editable weights `names`."""
    ordered = sorted(set(names))
    return f"{len(ordered)}:{_sha(chr(10).join(ordered))}"


def slots_token(widened: Mapping[int, int]) -> str:
    """`EditPolicy.neuron_slots` of the engine's widened layers ({layer: slots}): "5:1024,7:256", "" for none."""
    return ",".join(f"{layer}:{count}" for layer, count in sorted(widened.items()))


def heldout_token(text: str | None) -> str:
    """`EditPolicy.heldout_text` of the held-out text read from EDITSERVE_HELDOUT_TEXT (None: packaged)."""
    return PACKAGED if text is None else _sha(text)


def differing_fields(mine: Mapping[str, Any], theirs: Mapping[str, Any],
                     fields: Iterable[str] | None = None) -> list[str]:
    """The fields (sorted; of `fields` only, when given) in which two recorded policies differ; a
    field only one of them has (a replica of another editserve version) differs too."""
    keys = set(mine) | set(theirs) if fields is None else set(fields)
    return sorted(k for k in keys if k not in mine or k not in theirs or mine[k] != theirs[k])
