"""The sidecar's protocol: its start-up configuration and the frozen messages of its pipe.

One request and one reply at a time (`editserve.engine.sidecar.client.SidecarClient` sends,
`editserve.engine.sidecar.process` answers). Every request gets either its reply type or `Failed`
(error type and message); a long request may send `Progress` messages before its reply. Values
of other packages (a `GateConfig`, a `RebasePlan`, …) travel pickled as `Any` so that this module
imports nothing heavy: it is what both sides agree on, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from editserve.editing.requests import EditRequest
from editserve.ledger.location import LedgerLocation
from editserve.patches import Patch


@dataclass(frozen=True)
class SidecarConfig:
    checkpoint: str | None             # None: the embedded SmolLM2
    device: str | None = None          # None: "cuda" when available, else "cpu"
    dtype: str = "float32"
    threads: int | None = None         # torch CPU threads in the sidecar
    editserve_home: str | None = None  # passed on so the child finds the same caches
    heldout_text: str | None = None    # EDITSERVE_HELDOUT_TEXT (a file, read at start); None: the packaged prose
    # (layer, slots) of each MLP the engine widened with neuron slots (editserve.engine.neuron_slots);
    # the sidecar widens its model the same way so that its matrices stay the engine's
    neuron_slots: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Ready:
    fingerprint: str
    family: str
    n_layers: int
    device: str
    checkpoint: str
    seconds: float


@dataclass(frozen=True)
class OpenLedger:
    """Open the ledger at `location` (a directory or a DSN; its repr never shows the DSN's secret)."""

    location: LedgerLocation


@dataclass(frozen=True)
class LedgerOpened:
    root: str                 # the redacted location (safe to log)
    head: int


@dataclass(frozen=True)
class Sync:
    """Hold exactly the active patches of `version`; answer checksums of `names` (all touched
    matrices when empty) per tensor-parallel rank, in vLLM orientation."""

    version: int
    tp_size: int = 1
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Synced:
    version: int
    active: tuple[str, ...]                                   # patch digests now merged, in order
    checksums: dict[tuple[str, int], str] = field(default_factory=dict)
    seconds: float = 0.0
    drift: dict[int, float] = field(default_factory=dict)     # layer → ‖W − W₀‖ / ‖W₀‖ of the synced matrices


@dataclass(frozen=True)
class ComputeEdit:
    """Compute a patch for `requests` on the model at `version` and probe it."""

    version: int
    requests: tuple[EditRequest, ...]
    method: str = "rome"
    layers: tuple[int, ...] | None = None
    hparams: dict[str, Any] | None = None
    probes: tuple["ProbePrompt", ...] = ()
    gate: Any = None                   # an editserve.control.probe.GateConfig: run the probe gate too
    store_bases: bool = True           # write base copies of the touched matrices to the ledger (not
                                       # for a dry run; never when the gate rejects the patch)
    retention: Any = None              # an editserve.editing.retention.RetentionGate: with `gate`, also check
                                       # that the patch breaks no sampled earlier edit (issue 16)
    damage: Any = None                 # an editserve.control.gate.DamageGate: with `gate`, also bound the
                                       # held-out perplexity with the patch (issue 16)


@dataclass(frozen=True)
class ComputeRebase:
    """Recompute the patches after the one `version` added, on the new base, at ledger `head`
    (`editserve.ledger.rebase.ModelRecompute` through `Ledger.plan_rebase`; nothing is written
    but base copies). Answered with `RebaseComputed`; the sidecar holds `head` again afterwards."""

    version: int
    head: int


@dataclass(frozen=True)
class RebaseComputed:
    plan: Any                          # editserve.ledger.RebasePlan (patches, key blocks, metrics)
    seconds: float
    check: Any = None                  # editserve.ledger.consolidation.RemovalCheck when plan.removal is set


@dataclass(frozen=True)
class ComputeConsolidation:
    """Consolidate the patches active at ledger `head` that carry preserved keys
    (`editserve.ledger.consolidation.plan_consolidation`, statistics from this sidecar's model) and
    score their facts before and after (`check_consolidation`); nothing is written but base
    copies. Answered with `ConsolidationComputed`; the sidecar holds `head` again afterwards."""

    head: int
    ridge: float
    whole: bool = False                # take the earlier consolidated patches in too


@dataclass(frozen=True)
class ConsolidationComputed:
    plan: Any                          # editserve.ledger.consolidation.ConsolidationPlan
    check: Any                         # editserve.ledger.consolidation.ConsolidationCheck
    seconds: float


@dataclass(frozen=True)
class ComputeFactRemoval:
    """Take the patch of ledger `version` out of the consolidated patch active at `head` that holds
    it (`editserve.ledger.consolidation.plan_fact_removal`, statistics from this sidecar's model) and
    score the consolidated facts before and after (`check_fact_removal`); nothing is written but
    base copies. Answered with `FactRemovalComputed`; the sidecar holds `head` again afterwards."""

    version: int
    head: int


@dataclass(frozen=True)
class FactRemovalComputed:
    plan: Any                          # editserve.ledger.consolidation.RemovalPlan
    check: Any                         # editserve.ledger.consolidation.RemovalCheck
    seconds: float


@dataclass(frozen=True)
class ScorePrompts:
    """Score continuations on the model at `version` (the gRPC Probe call); items are
    (prompt, target, other or None). Answered with `Scored`."""

    version: int
    items: tuple[tuple[str, str, str | None], ...]


@dataclass(frozen=True)
class Scored:
    version: int
    rows: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class ProbeRetention:
    """Re-score a random sample (`sample_size`, drawn with `seed`) of the facts committed at
    `version` (the retention probe, `editserve.engine.health`). Answered with `RetentionMeasured`."""

    version: int
    sample_size: int
    seed: int = 0


@dataclass(frozen=True)
class RetentionMeasured:
    version: int
    facts: int                         # facts committed at `version`
    rows: tuple[dict[str, Any], ...]   # per scored fact: CommittedFact fields, "holds", log-probabilities
    seconds: float
    null_space: dict[int, float] = field(default_factory=dict)   # layer → share of AlphaEdit's null space the
    #                                  committed keys take (layers whose statistics are not built yet: absent)
    heldout_ppl: float | None = None       # perplexity of the packaged held-out text on the held version
    base_heldout_ppl: float | None = None  # the same on the unedited model (measured at the sidecar's start)


@dataclass(frozen=True)
class TraceFact:
    """Causally trace a fact on the model at `version` (the gRPC Trace call; arguments as in
    `editserve.editing.tracing.trace`). Answered with `Traced`."""

    version: int
    prompt: str
    subject: str
    target: str | None = None
    kind: str = "hidden"
    samples: int = 10
    seed: int = 0
    window: int = 10
    noise_scale: float = 3.0


@dataclass(frozen=True)
class Traced:
    version: int
    result: dict[str, Any]             # TraceResult.to_dict()
    png: bytes                         # heatmap (editserve.tracing_plot.render_png)


@dataclass(frozen=True)
class ProbePrompt:
    """A prompt whose continuation is scored before and after the patch (e.g. a paraphrase or a
    neighbourhood prompt); `target` is what the edit should make likely, `other` the alternative."""

    prompt: str
    target: str
    other: str | None = None
    kind: str = "paraphrase"           # "efficacy" | "paraphrase" | "neighbourhood"


@dataclass(frozen=True)
class EditComputed:
    patch: Patch
    probe_report: dict[str, Any]
    seconds: float
    keys: Any = None                   # editing.alphaedit.PreservedKeys: the patch's own key blocks (issue
                                       # 16), committed with it so that later AlphaEdit edits preserve them


@dataclass(frozen=True)
class Progress:
    """Sent before the reply of a long request: `stage` reached, `fraction` (0..1) of the request."""

    stage: str
    fraction: float
    message: str = ""


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Failed:
    error_type: str
    message: str
