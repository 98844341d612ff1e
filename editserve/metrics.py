"""Prometheus metrics of edit health, built in one `Metrics` object on a caller-given registry.

When editserve runs as a vLLM plugin the engine passes vLLM's own registry (the one its
``/metrics`` route serves), so a single scrape sees serving health (``vllm:*``) and edit health
(``editserve_*``). Every label takes its values from a small fixed set, checked on each call:
an unknown value raises `MetricsError` instead of creating a new time series.

Exported metrics (sample names as Prometheus sees them):

===========================================  =========  =====================================
``editserve_edits_total``                    counter    ``method``, ``outcome``
``editserve_rollbacks_total``                counter
``editserve_reverts_total``                  counter
``editserve_edit_duration_seconds``          histogram  ``stage`` (keys … swap)
``editserve_edit_latency_seconds``           histogram  ``method``, ``outcome`` (end to end)
``editserve_swap_pause_seconds``             histogram  (generation blocked by a swap)
``editserve_head_version``                   gauge
``editserve_active_patches``                 gauge
``editserve_last_probe_score``               gauge      ``score`` (efficacy, paraphrase,
                                                        neighbourhood), fractions in [0, 1];
                                                        NaN when the last probe had no such prompts
``editserve_last_canary_kl``                 gauge      nats, mean KL(head ‖ head + patch) of the
                                                        next-token distributions on the canaries
``editserve_layer_drift_ratio``              gauge      ``layer`` < the model's layer count;
                                                        ‖W − W₀‖_F / ‖W₀‖_F
``editserve_parity_failures_total``          counter    engine/sidecar disagreement
``editserve_ledger_size_bytes``              gauge
``editserve_swaps_total``                    counter    ``result`` (ok, failed: the previous
                                                        version was restored)
``editserve_completions_total``              counter    ``versions`` (one, spanning: a swap
                                                        happened while it ran)
``editserve_candidate_completions_total``    counter    ``served_by`` (head, candidate): completions
                                                        routed while candidates are staged
``editserve_candidates_staged``              gauge      candidates staged as LoRA adapters
``editserve_sidecar_up``                     gauge      1 while the sidecar is alive and
                                                        mirrors the served version, else 0
``editserve_sidecar_restarts_total``         counter    sidecar processes found dead and replaced
===========================================  =========  =====================================

Edit health over a long ledger (issue 16; editserve/engine/health.py, docs/lifelong.md):
``editserve_edit_retention_ratio`` (gauge: share of the last retention probe's sample of
committed facts that still hold; NaN when none was scored), ``editserve_edit_retention_sample_size``
(gauge), ``editserve_edit_retention_last_run_timestamp_seconds`` (gauge, unix time),
``editserve_retention_probes_total`` (counter, ``result``: ok, failed) and
``editserve_gate_retention_refusals_total`` (counter: edits the gate refused because they break
earlier edits). The per-layer norm growth is ``editserve_layer_drift_ratio`` above.
``editserve_layer_null_space_taken_ratio`` (gauge, ``layer``: the share of AlphaEdit's null space at
that layer the committed keys take, measured by each retention probe run; 1 means no direction is
left where a new edit would not weigh on earlier ones; docs/lifelong.md).
``editserve_heldout_perplexity_ratio`` (gauge: the perplexity of the packaged held-out prose on the
served version over the unedited model's, from the last retention probe run; NaN until measured; the
general damage a long ledger does, which moves before retention and NS do; NaN when the last run could
not measure it; docs/lifelong.md).
``editserve_consolidations_total`` (counter, ``result``: ok; refused: fewer than two patches with
preserved keys, a committed fact would break, or the head moved; failed: an error) counts consolidations
(editserve/ledger/consolidation.py), asked for or automatic (editserve/engine/autoconsolidate.py).

Gauges use ``multiprocess_mode="mostrecent"`` (as vLLM's own gauges do), so they read correctly
when vLLM serves ``/metrics`` from a multi-process registry (``PROMETHEUS_MULTIPROC_DIR``).

`drift_parts` / `relative_drift` compute the per-layer drift from a saved base copy and the live
weight; `DriftParts` add up across tensor-parallel slices before the ratio is taken.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from editserve.editing.edit import METHODS
from editserve.errors import MetricsError

PREFIX = "editserve"
CONSOLIDATION_RESULTS = ("ok", "refused", "failed")

# Edit stages run from a few milliseconds (solve, commit, swap) to minutes (value optimisation on CPU).
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# A swap pauses generation for about a millisecond of work plus waiting for running steps.
PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EditOutcome(str, Enum):
    """How an edit request ended."""

    COMMITTED = "committed"  # in the ledger and live on every rank
    REJECTED = "rejected"    # refused by validation or the probe gate; nothing changed
    FAILED = "failed"        # an error after validation (solve, commit or swap); head unchanged


class EditStage(str, Enum):
    """Timed stages of one edit, in order."""

    KEYS = "keys"
    VALUES = "values"
    SOLVE = "solve"
    PROBE = "probe"
    COMMIT = "commit"
    SWAP = "swap"


class SwapOutcome(str, Enum):
    """How a version change of the engine ended."""

    OK = "ok"            # the new version is served on every rank
    FAILED = "failed"    # nothing changed, or the previous version was restored


class CompletionVersions(str, Enum):
    """Which weights produced a completion."""

    ONE = "one"            # one version from the first token to the last
    SPANNING = "spanning"  # a swap happened while it ran


class ProbeScore(str, Enum):
    """The fractions the probe gate measures on an edited model."""

    EFFICACY = "efficacy"
    PARAPHRASE = "paraphrase"
    NEIGHBOURHOOD = "neighbourhood"


def _enum_value(enum: type[Enum], value: object, what: str) -> str:
    try:
        return enum(value).value
    except ValueError:
        allowed = [m.value for m in enum]  # type: ignore[attr-defined]
        raise MetricsError(f"unknown {what} {value!r}; expected one of {allowed}") from None


def _finite(value: object, what: str, *, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MetricsError(f"{what} must be a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x) or x < lo or x > hi:
        raise MetricsError(f"{what} must be finite and in [{lo}, {hi}], got {value!r}")
    return x


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MetricsError(f"{what} must be a non-negative integer, got {value!r}")
    return value


class Metrics:
    """Every editserve metric, registered on `registry`; typed recording methods validate their input.

    `n_layers` is the served model's layer count: the ``layer`` label of the drift gauge takes
    only values ``0 … n_layers - 1``. `methods` are the allowed ``method`` labels (default: every
    editing method editserve implements).
    """

    def __init__(self, registry: CollectorRegistry, n_layers: int, *, methods: Iterable[str] = METHODS) -> None:
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise MetricsError(f"n_layers must be a positive integer, got {n_layers!r}")
        self.n_layers = n_layers
        self.methods = tuple(methods)
        if not self.methods:
            raise MetricsError("methods must name at least one editing method")
        try:
            self._build(registry)
        except ValueError as exc:  # prometheus_client: "Duplicated timeseries in CollectorRegistry"
            raise MetricsError(f"cannot register editserve metrics on {registry!r}: {exc}") from exc

    def _build(self, registry: CollectorRegistry) -> None:
        p = PREFIX
        self._edits = Counter(f"{p}_edits", "Edit requests by method and outcome.",
                              ["method", "outcome"], registry=registry)
        self._rollbacks = Counter(f"{p}_rollbacks", "Rollbacks of the head to an earlier version.", registry=registry)
        self._reverts = Counter(f"{p}_reverts", "Reverts of single patches (a new version without them).",
                                registry=registry)
        self._stage = Histogram(f"{p}_edit_duration_seconds", "Time spent in each stage of an edit.",
                                ["stage"], buckets=STAGE_BUCKETS, registry=registry)
        self._latency = Histogram(f"{p}_edit_latency_seconds", "End-to-end time of an edit request.",
                                  ["method", "outcome"], buckets=STAGE_BUCKETS, registry=registry)
        self._pause = Histogram(f"{p}_swap_pause_seconds", "Time generation was paused for a weight swap.",
                                buckets=PAUSE_BUCKETS, registry=registry)
        self._head = Gauge(f"{p}_head_version", "Ledger version the engine serves.",
                           multiprocess_mode="mostrecent", registry=registry)
        self._active = Gauge(f"{p}_active_patches", "Patches active at the served version.",
                             multiprocess_mode="mostrecent", registry=registry)
        self._probe = Gauge(f"{p}_last_probe_score", "Scores of the most recent probe (fractions in [0, 1]).",
                            ["score"], multiprocess_mode="mostrecent", registry=registry)
        self._kl = Gauge(f"{p}_last_canary_kl", "Mean KL divergence (nats) of the canaries' next-token distributions "
                         "from the head to head + the most recently probed patch.",
                         multiprocess_mode="mostrecent", registry=registry)
        self._drift = Gauge(f"{p}_layer_drift_ratio", "Relative drift ||W - W0|| / ||W0|| of each edited layer.",
                            ["layer"], multiprocess_mode="mostrecent", registry=registry)
        self._parity = Counter(f"{p}_parity_failures", "Engine/sidecar parity check failures.", registry=registry)
        self._ledger = Gauge(f"{p}_ledger_size_bytes", "Size of the ledger on disk.",
                             multiprocess_mode="mostrecent", registry=registry)
        self._swaps = Counter(f"{p}_swaps", "Version changes of the engine by result (a failed swap "
                              "restored the previous version).", ["result"], registry=registry)
        self._completions = Counter(f"{p}_completions", "Completions by whether one version produced "
                                    "them ('one') or a swap happened while they ran ('spanning').",
                                    ["versions"], registry=registry)
        self._sidecar_up = Gauge(f"{p}_sidecar_up", "1 while the sidecar process is alive and holds the "
                                 "served version, else 0.", multiprocess_mode="mostrecent", registry=registry)
        self._sidecar_restarts = Counter(f"{p}_sidecar_restarts", "Sidecar processes that died and were "
                                         "replaced by a new one.", registry=registry)
        self._statistics = Gauge(f"{p}_statistics_progress", "Fraction (0..1) of the default edit layers' "
                                 "covariance statistics built since the sidecar started (1 once ready).",
                                 multiprocess_mode="mostrecent", registry=registry)
        # Label `replica`: one value per replica in the ledger's registry that is live (bounded by
        # the fleet's size; a replica that leaves or goes stale is removed). See docs/fleet.md.
        self._skew = Gauge(f"{p}_version_skew", "Ledger head minus the version each live replica serves "
                           "(as recorded in the ledger's replica registry).", ["replica"],
                           multiprocess_mode="mostrecent", registry=registry)
        self._skew_replicas: set[str] = set()
        self._policy_differs = Gauge(f"{p}_fleet_policy_differs", "Live replicas of the ledger whose edit policy "
                                     "(default method, gates, held-out text, consolidation, editable matrices, "
                                     "editserve version) differs from this replica's (docs/fleet.md).",
                                     multiprocess_mode="mostrecent", registry=registry)
        self._served_by = Counter(f"{p}_candidate_completions", "Completions of the generation routes by what "
                                  "served them while candidates are staged: the head or a candidate "
                                  "(docs/candidates.md).", ["served_by"], registry=registry)
        self._staged = Gauge(f"{p}_candidates_staged", "Candidates staged as LoRA adapters.",
                             multiprocess_mode="mostrecent", registry=registry)
        # Edit health (issue 16): the retention probe (editserve/engine/health.py) and the gate's
        # retention check (editserve/control/gate.py).
        self._retention = Gauge(f"{p}_edit_retention_ratio", "Share of the last retention probe's sample of "
                                "committed facts that still hold on the served version (NaN: none scored).",
                                multiprocess_mode="mostrecent", registry=registry)
        self._retention_n = Gauge(f"{p}_edit_retention_sample_size", "Committed facts scored by the last "
                                  "retention probe.", multiprocess_mode="mostrecent", registry=registry)
        self._retention_at = Gauge(f"{p}_edit_retention_last_run_timestamp_seconds", "Unix time of the last "
                                   "retention probe run.", multiprocess_mode="mostrecent", registry=registry)
        self._retention_runs = Counter(f"{p}_retention_probes", "Retention probe runs by result.", ["result"],
                                       registry=registry)
        self._retention_refusals = Counter(f"{p}_gate_retention_refusals", "Edits the gate refused because they "
                                           "break earlier edits (retention drop above the bound).",
                                           registry=registry)
        self._consolidations = Counter(f"{p}_consolidations", "Consolidations of the patches with preserved keys "
                                       "by result.", ["result"], registry=registry)
        self._null_space = Gauge(f"{p}_layer_null_space_taken_ratio", "Share of AlphaEdit's null space at each "
                                 "layer that the committed edits' keys take (from the last retention probe).",
                                 ["layer"], multiprocess_mode="mostrecent", registry=registry)
        self._null_space_layers: set[int] = set()
        self._ppl_ratio = Gauge(f"{p}_heldout_perplexity_ratio", "Held-out perplexity of the served version over "
                                "the unedited model's (from the last retention probe; NaN: not measured).",
                                multiprocess_mode="mostrecent", registry=registry)
        self._retention.set(math.nan)
        self._ppl_ratio.set(math.nan)
        for result in ("ok", "failed"):
            self._retention_runs.labels(result=result)
        for result in CONSOLIDATION_RESULTS:
            self._consolidations.labels(result=result)
        for side in ("head", "candidate"):
            self._served_by.labels(served_by=side)
        # Create every fixed-label child now so each series exists (at zero) from the first scrape
        # and rate() sees its first increment. Drift children appear when a layer is measured.
        for method in self.methods:
            for outcome in EditOutcome:
                self._edits.labels(method=method, outcome=outcome.value)
                self._latency.labels(method=method, outcome=outcome.value)
        for stage in EditStage:
            self._stage.labels(stage=stage.value)
        for score in ProbeScore:
            self._probe.labels(score=score.value)
        for result in SwapOutcome:
            self._swaps.labels(result=result.value)
        for versions in CompletionVersions:
            self._completions.labels(versions=versions.value)

    # -- recording -------------------------------------------------------------------------

    def record_edit(
        self,
        method: str,
        outcome: EditOutcome | str,
        stage_seconds: Mapping[EditStage | str, float],
        total_seconds: float | None = None,
    ) -> None:
        """Count one finished edit request and observe its stage times and end-to-end latency.

        `stage_seconds` holds the stages that ran (a rejected edit has no commit or swap);
        `total_seconds` defaults to their sum. Everything is validated before anything is recorded.
        """
        if method not in self.methods:
            raise MetricsError(f"unknown method {method!r}; expected one of {list(self.methods)}")
        out = _enum_value(EditOutcome, outcome, "outcome")
        stages = {_enum_value(EditStage, k, "stage"): _finite(v, f"seconds of stage {k!r}")
                  for k, v in stage_seconds.items()}
        total = sum(stages.values()) if total_seconds is None else _finite(total_seconds, "total_seconds")
        self._edits.labels(method=method, outcome=out).inc()
        for stage, seconds in stages.items():
            self._stage.labels(stage=stage).observe(seconds)
        self._latency.labels(method=method, outcome=out).observe(total)

    def record_swap(self, pause_seconds: float) -> None:
        """Observe how long generation was paused while new weights were swapped in."""
        self._pause.observe(_finite(pause_seconds, "pause_seconds"))

    def set_skew(self, skew: dict[str, int]) -> None:
        """Head minus served per live replica; replicas no longer listed lose their series."""
        for gone in self._skew_replicas - set(skew):
            self._skew.remove(gone)
        for replica, value in skew.items():
            self._skew.labels(replica=replica).set(_count(value, "skew"))
        self._skew_replicas = set(skew)

    def set_policy_differs(self, replicas: int) -> None:
        """How many live replicas record an edit policy other than this replica's."""
        self._policy_differs.set(_count(replicas, "replicas"))

    def set_head(self, version: int, active_patches: int) -> None:
        """The ledger version now served and how many patches it has active."""
        v, n = _count(version, "version"), _count(active_patches, "active_patches")
        self._head.set(v)
        self._active.set(n)

    def record_probe(self, efficacy: float, paraphrase: float | None, neighbourhood: float | None,
                     canary_kl: float | None) -> None:
        """Scores of the latest probe, whether or not its edit was accepted.

        ``None`` means the probe did not measure that score (e.g. no paraphrase or neighbourhood
        prompts): the gauge is set to NaN, so a stale value of an earlier probe is never shown as
        this probe's."""
        def opt(value: float | None, what: str, hi: float) -> float:
            return math.nan if value is None else _finite(value, what, hi=hi)

        scores = {
            ProbeScore.EFFICACY: _finite(efficacy, "efficacy", hi=1.0),
            ProbeScore.PARAPHRASE: opt(paraphrase, "paraphrase", 1.0),
            ProbeScore.NEIGHBOURHOOD: opt(neighbourhood, "neighbourhood", 1.0),
        }
        kl = opt(canary_kl, "canary_kl", math.inf)
        for score, value in scores.items():
            self._probe.labels(score=score.value).set(value)
        self._kl.set(kl)

    def set_drift(self, layer: int, value: float) -> None:
        """Relative drift of `layer`'s edited weight from its base (see `relative_drift`)."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise MetricsError(f"layer {layer!r} is outside the model's layers 0..{self.n_layers - 1}")
        self._drift.labels(layer=str(layer)).set(_finite(value, f"drift of layer {layer}"))

    def set_drifts(self, drifts: Mapping[int, float]) -> None:
        """`set_drift` for several layers; validates all before setting any."""
        for layer, value in drifts.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
                raise MetricsError(f"layer {layer!r} is outside the model's layers 0..{self.n_layers - 1}")
            _finite(value, f"drift of layer {layer}")
        for layer, value in drifts.items():
            self.set_drift(layer, value)

    def parity_failure(self) -> None:
        """Count one disagreement between the engine's weights and the sidecar/ledger."""
        self._parity.inc()

    def set_ledger_bytes(self, n: int) -> None:
        """The ledger's size on disk."""
        self._ledger.set(_count(n, "ledger bytes"))

    def record_rollback(self) -> None:
        """Count one rollback of the head to an earlier version."""
        self._rollbacks.inc()

    def record_revert(self) -> None:
        """Count one revert of a patch (a new version without it)."""
        self._reverts.inc()

    def record_swap_result(self, result: SwapOutcome | str) -> None:
        """Count one version change of the engine by how it ended (``ok`` or ``failed``)."""
        self._swaps.labels(result=_enum_value(SwapOutcome, result, "swap result")).inc()

    def record_completion(self, spanned: bool) -> None:
        """Count one finished completion; `spanned` when a swap happened while it ran."""
        if not isinstance(spanned, bool):
            raise MetricsError(f"spanned must be a bool, got {spanned!r}")
        versions = CompletionVersions.SPANNING if spanned else CompletionVersions.ONE
        self._completions.labels(versions=versions.value).inc()

    def record_served_by(self, candidate: bool) -> None:
        """Count one completion routed while candidates are staged: by a candidate or by the head."""
        self._served_by.labels(served_by="candidate" if candidate else "head").inc()

    def set_candidates_staged(self, n: int) -> None:
        self._staged.set(int(n))

    def set_sidecar_up(self, up: bool) -> None:
        """Whether the sidecar process is alive and mirrors the served version."""
        if not isinstance(up, bool):
            raise MetricsError(f"up must be a bool, got {up!r}")
        self._sidecar_up.set(1 if up else 0)

    def record_sidecar_restart(self) -> None:
        """Count one sidecar process found dead and replaced."""
        self._sidecar_restarts.inc()

    def set_retention(self, ratio: float | None, sample_size: int, at: float) -> None:
        """The result of one retention probe run: the share of sampled committed facts that hold
        (None: no fact scored → NaN), how many were scored, and when (unix time)."""
        n = _count(sample_size, "retention sample size")
        value = math.nan if ratio is None else _finite(ratio, "retention ratio", hi=1.0)
        when = _finite(at, "retention probe time")
        self._retention.set(value)
        self._retention_n.set(n)
        self._retention_at.set(when)

    def set_null_space_taken(self, taken: Mapping[int, float]) -> None:
        """Per layer, the share of AlphaEdit's null space the committed keys take (editing/nullspace.py,
        `null_space_use`), as the last retention probe measured it; a layer set before and absent now
        (its keys were rolled back) reads 0. Validates all before setting any."""
        for layer, value in taken.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
                raise MetricsError(f"layer {layer!r} is outside the model's layers 0..{self.n_layers - 1}")
            _finite(value, f"null space taken at layer {layer}", hi=1.0)
        for layer in sorted(self._null_space_layers - set(taken)):
            self._null_space.labels(layer=str(layer)).set(0.0)
        for layer, value in taken.items():
            self._null_space.labels(layer=str(layer)).set(float(value))
        self._null_space_layers |= set(taken)

    def set_perplexity_ratio(self, ratio: float | None) -> None:
        """Held-out perplexity of the served version over the unedited model's, as the last
        retention probe measured it (editserve/engine/health.py); None (not measured) → NaN."""
        self._ppl_ratio.set(math.nan if ratio is None else _finite(ratio, "held-out perplexity ratio", lo=0.0))

    def record_retention_probe(self, ok: bool) -> None:
        """Count one retention probe run (``ok`` false: it failed; the gauges keep the last result)."""
        if not isinstance(ok, bool):
            raise MetricsError(f"ok must be a bool, got {ok!r}")
        self._retention_runs.labels(result="ok" if ok else "failed").inc()

    def record_retention_refusal(self) -> None:
        """Count one edit the gate refused because it breaks earlier edits."""
        self._retention_refusals.inc()

    def record_consolidation(self, result: str) -> None:
        """Count one consolidation by result (`CONSOLIDATION_RESULTS`)."""
        if result not in CONSOLIDATION_RESULTS:
            raise MetricsError(f"consolidation result must be one of {list(CONSOLIDATION_RESULTS)}, got {result!r}")
        self._consolidations.labels(result=result).inc()

    def set_statistics_progress(self, fraction: float) -> None:
        """Progress of the statistics warm-up (``SidecarClient.statistics()["fraction"]``), in [0, 1]."""
        self._statistics.set(_finite(fraction, "statistics progress", hi=1.0))


# Sample-name suffixes each metric type always exports (``_created`` only when enabled; taken from samples).
_TYPE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


def metric_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name `registry` exports, including those of labelled metrics with no series yet."""
    names: set[str] = set()
    for family in registry.collect():
        names.update(s.name for s in family.samples)
        names.update(family.name + suffix for suffix in _TYPE_SUFFIXES.get(family.type, ("",)))
    return names


# -- per-layer drift -------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftParts:
    """Squared Frobenius norms of W − W₀ and of W₀; add the parts of tensor-parallel slices."""

    diff_sq: float
    base_sq: float

    def __add__(self, other: DriftParts) -> DriftParts:
        return DriftParts(self.diff_sq + other.diff_sq, self.base_sq + other.base_sq)

    @property
    def relative(self) -> float:
        """‖W − W₀‖ / ‖W₀‖."""
        if not (math.isfinite(self.diff_sq) and math.isfinite(self.base_sq)):
            raise MetricsError(f"drift norms are not finite: diff²={self.diff_sq!r}, base²={self.base_sq!r}")
        if self.base_sq <= 0.0:
            raise MetricsError(f"relative drift is undefined for a zero base weight (base²={self.base_sq!r})")
        return math.sqrt(self.diff_sq / self.base_sq)


def drift_parts(
    base: torch.Tensor, current: torch.Tensor, *, device: torch.device | str | None = None, block_rows: int = 1024
) -> DriftParts:
    """Squared norms of ``current - base`` and ``base``, in float32 differences summed in float64.

    Works in blocks of `block_rows` rows on `device` (default: `current`'s), so a base copy kept in
    host memory can be compared with a live GPU weight without a full-size temporary.
    """
    if base.shape != current.shape:
        raise MetricsError(f"base shape {tuple(base.shape)} differs from current shape {tuple(current.shape)}")
    if base.dim() == 0:
        raise MetricsError("drift needs a weight tensor, got a scalar")
    if block_rows < 1:
        raise MetricsError(f"block_rows must be positive, got {block_rows!r}")
    dev = torch.device(device) if device is not None else current.device
    diff_sq = 0.0
    base_sq = 0.0
    with torch.no_grad():
        for start in range(0, base.shape[0], block_rows):
            b = base[start:start + block_rows].to(dev, torch.float32)
            c = current[start:start + block_rows].to(dev, torch.float32)
            diff_sq += float(torch.linalg.vector_norm(c - b, dtype=torch.float64) ** 2)
            base_sq += float(torch.linalg.vector_norm(b, dtype=torch.float64) ** 2)
    return DriftParts(diff_sq, base_sq)


def relative_drift(
    base: torch.Tensor, current: torch.Tensor, *, device: torch.device | str | None = None
) -> float:
    """‖current − base‖_F / ‖base‖_F of one (unsharded) weight."""
    return drift_parts(base, current, device=device).relative
