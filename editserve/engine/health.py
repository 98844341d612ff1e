"""Edit health that operators can watch (issue 16): the retention probe and its settings.

**Retention probe.** After every version change of the served model (commit, rollback, revert,
import, follow) and every `HealthSettings.probe_interval_s`, `RetentionProbe` asks the sidecar
(`editserve.engine.sidecar.ProbeRetention`) to re-score a fixed-size random sample of the facts
committed at the served version (their rewrite prompts, new and replaced targets) with the
gate's outcome function (`editserve.editing.scoring.fact_success`) and exports the share that
still holds: ``editserve_edit_retention_ratio`` (NaN when no fact is committed), the sample size
and the time of the run (`editserve.metrics.Metrics.set_retention`), per layer the share of
AlphaEdit's null space the committed keys take (``editserve_layer_null_space_taken_ratio``,
`editserve.editing.nullspace.null_space_use`; from cached statistics only), and the general damage:
the perplexity of the packaged held-out prose (editserve/data/heldout.txt, not the statistics
corpus) on the served version over the unedited model's, measured by the sidecar at its start
(``editserve_heldout_perplexity_ratio``; the benchmark's "held-out perplexity" column, the
measure that moves first on a long ledger: docs/lifelong.md). The scoring runs in the
sidecar process, never on the serving path; the job here only schedules it (an asyncio task in
the API server). Periodic runs draw a new sample each time (the run number is the seed), so a
small sample covers the ledger over time. Runs are skipped while the sidecar is dead or out
of sync; a failed run counts ``editserve_retention_probes_total{result="failed"}``.

CPU cost: one run scores 2 × `probe_sample` short continuations (one batch of forward passes of
the sidecar's model) and, once per served version, the held-out text (about 1,000 tokens in
windows of 256); the defaults (16 facts, every 15 minutes and after each version change, at most
one run per 30 s) keep it to a few seconds of one core per run on SmolLM2-135M (docs/lifelong.md).
The null-space share adds, per edited layer, reading its cached statistics and projection and the
eigenvalues of an N×N matrix (N committed keys there, at most d_in): about 0.1 s at N = 100 and
1 s at N = 1,000 per layer on one core.

**Retention gate.** `HealthSettings.gate` is the gate's retention check
(`editserve.editing.retention.RetentionGate`), sent with each gated edit to the sidecar.
**Damage bound.** `HealthSettings.damage` (`editserve.control.gate.DamageGate`, off by default)
refuses a gated edit after which the held-out perplexity ratio would pass a bound.

Environment (read by `HealthSettings.from_env`, set by the operator):
``EDITSERVE_RETENTION_PROBE_SAMPLE`` (facts per run, 0 = probe off; default 16),
``EDITSERVE_RETENTION_PROBE_INTERVAL_S`` (seconds between periodic runs, 0 = only after version
changes; default 900), ``EDITSERVE_RETENTION_PROBE_MIN_GAP_S`` (least seconds between two runs;
default 30), ``EDITSERVE_RETENTION_GATE_SAMPLE`` (facts the gate checks, 0 = retention
gate off; default 16), ``EDITSERVE_RETENTION_GATE_MAX_DROP`` (default 0: no sampled fact may break),
``EDITSERVE_GATE_MAX_PERPLEXITY_RATIO`` (the damage bound, e.g. 1.05; default 0: off),
``EDITSERVE_HELDOUT_TEXT`` (a UTF-8 text file of the deployment's own ordinary prose — its
language, its domain — measured instead of the packaged English prose by the probe and the damage
bound; 1,000 to 200,000 characters, read once when the sidecar starts; `read_heldout_text`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from editserve.control.gate import DamageGate
from editserve.editing.retention import RetentionGate
from editserve.engine.policy import heldout_token
from editserve.envparse import real_number, whole_number
from editserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

PROBE_SAMPLE_ENV = "EDITSERVE_RETENTION_PROBE_SAMPLE"
PROBE_INTERVAL_ENV = "EDITSERVE_RETENTION_PROBE_INTERVAL_S"
PROBE_MIN_GAP_ENV = "EDITSERVE_RETENTION_PROBE_MIN_GAP_S"
GATE_SAMPLE_ENV = "EDITSERVE_RETENTION_GATE_SAMPLE"
GATE_MAX_DROP_ENV = "EDITSERVE_RETENTION_GATE_MAX_DROP"
GATE_MAX_PPL_ENV = "EDITSERVE_GATE_MAX_PERPLEXITY_RATIO"
HELDOUT_TEXT_ENV = "EDITSERVE_HELDOUT_TEXT"
# A held-out text's size in characters: enough tokens for a stable perplexity (the packaged one has
# 4,430 characters, 921 SmolLM2 tokens), few enough that a measurement stays one batch of passes per
# window of 256 tokens, not minutes (each version and each gated edit with a damage bound measures it).
HELDOUT_MIN_CHARS, HELDOUT_MAX_CHARS = 1_000, 200_000


def read_heldout_text(path: str) -> str:
    """The text of an ``EDITSERVE_HELDOUT_TEXT`` file, checked: a readable UTF-8 file of
    `HELDOUT_MIN_CHARS` to `HELDOUT_MAX_CHARS` characters (InvalidRequestError naming the variable,
    the path and what is wrong)."""
    where = f"{HELDOUT_TEXT_ENV}={path!r}"
    try:
        size = os.path.getsize(path)
        if size > 4 * HELDOUT_MAX_CHARS:                     # UTF-8: at most 4 bytes a character
            raise InvalidRequestError(f"{where}: {size} bytes, more than {HELDOUT_MAX_CHARS} characters can take")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise InvalidRequestError(f"{where} cannot be read: {exc.strerror or exc}") from exc
    chars = len(text.strip())
    if not HELDOUT_MIN_CHARS <= chars <= HELDOUT_MAX_CHARS:
        raise InvalidRequestError(f"{where} holds {chars} characters; a held-out text needs "
                                  f"{HELDOUT_MIN_CHARS} to {HELDOUT_MAX_CHARS}")
    return text


@dataclass(frozen=True)
class HealthSettings:
    """Retention probe, retention gate and damage bound settings (see the module docstring)."""

    probe_sample: int = 16               # facts re-scored per probe run; 0: the probe is off
    probe_interval_s: float = 900.0      # between periodic runs; 0: only after version changes
    probe_min_gap_s: float = 30.0        # at least this long between two runs (a burst of commits → one run)
    gate: RetentionGate = field(default_factory=RetentionGate)
    damage: DamageGate = field(default_factory=DamageGate)
    heldout_text: str | None = None      # EDITSERVE_HELDOUT_TEXT: a file; None: the packaged prose
    heldout_digest: str | None = None    # policy.heldout_token of that text, kept by from_env (None: not read)

    def __post_init__(self) -> None:
        if isinstance(self.probe_sample, bool) or not isinstance(self.probe_sample, int) or self.probe_sample < 0:
            raise InvalidRequestError(f"probe_sample must be an integer >= 0, got {self.probe_sample!r}")
        for name in ("probe_interval_s", "probe_min_gap_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InvalidRequestError(f"{name} must be a number of seconds >= 0, got {v!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "HealthSettings":
        env = os.environ if environ is None else environ

        def integer(name: str, default: int) -> int:
            return whole_number(env, name, default)

        def number(name: str, default: float) -> float:
            return real_number(env, name, default)

        gate = RetentionGate(sample_size=integer(GATE_SAMPLE_ENV, RetentionGate.sample_size),
                             max_drop=number(GATE_MAX_DROP_ENV, RetentionGate.max_drop))
        bound = number(GATE_MAX_PPL_ENV, DamageGate.max_perplexity_ratio)
        if bound and bound < 1.0:
            raise InvalidRequestError(f"{GATE_MAX_PPL_ENV} must be 0 (off) or a number >= 1, got {bound!r}")
        damage = DamageGate(max_perplexity_ratio=bound)
        heldout = env.get(HELDOUT_TEXT_ENV) or None
        # refused here, at start, rather than in the sidecar; its digest is kept for the edit policy
        digest = heldout_token(read_heldout_text(heldout) if heldout is not None else None)
        return cls(probe_sample=integer(PROBE_SAMPLE_ENV, cls.probe_sample),
                   probe_interval_s=number(PROBE_INTERVAL_ENV, cls.probe_interval_s),
                   probe_min_gap_s=number(PROBE_MIN_GAP_ENV, cls.probe_min_gap_s), gate=gate, damage=damage,
                   heldout_text=heldout, heldout_digest=digest)


@dataclass(frozen=True)
class RetentionRun:
    """One probe run as the parent records it (also shown by ``status``)."""

    version: int
    facts: int                  # facts committed at `version`
    sampled: int                # facts scored (without a known replaced object: checked greedily)
    held: int
    at: float                   # unix time of the end of the run
    seconds: float
    broken: tuple[dict[str, Any], ...] = ()
    null_space: dict[int, float] = field(default_factory=dict)   # layer → share of AlphaEdit's null space taken
    heldout_ppl: float | None = None          # held-out perplexity of `version` (None: not measured)
    base_heldout_ppl: float | None = None     # the same on the unedited model

    @property
    def ratio(self) -> float | None:
        return self.held / self.sampled if self.sampled else None

    @property
    def perplexity_ratio(self) -> float | None:
        """Held-out perplexity of `version` over the unedited model's (1.0: no general damage)."""
        if self.heldout_ppl is None or not self.base_heldout_ppl:
            return None
        return self.heldout_ppl / self.base_heldout_ppl

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "facts": self.facts, "sampled": self.sampled, "held": self.held,
                "ratio": self.ratio, "at": self.at, "seconds": self.seconds, "broken": list(self.broken),
                "null_space": {str(layer): round(v, 6) for layer, v in sorted(self.null_space.items())},
                "heldout_perplexity": self.heldout_ppl, "base_heldout_perplexity": self.base_heldout_ppl,
                "perplexity_ratio": self.perplexity_ratio}


class RetentionProbe:
    """The scheduling side of the retention probe (an asyncio task in the API server).

    `measure(version, sample_size, seed)` runs one probe on the sidecar (blocking; called in a
    worker thread) and returns a `RetentionRun`, or None when the sidecar cannot run it now
    (dead, restarting or out of sync). `served_version()` is the version to probe."""

    def __init__(self, settings: HealthSettings, metrics: Any,
                 measure: Callable[[int, int, int], RetentionRun | None],
                 served_version: Callable[[], int | None]) -> None:
        self.settings = settings
        self.metrics = metrics
        self._measure = measure
        self._served_version = served_version
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._runs = 0
        self.last: RetentionRun | None = None
        self.last_error: str | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.probe_sample > 0

    def start(self) -> None:
        if not self.enabled:
            log.info("retention probe off (%s=0)", PROBE_SAMPLE_ENV)
            return
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="editserve-retention-probe")
        self._wake.set()                                 # a first run on the version served at start

    def version_changed(self) -> None:
        """The served version changed: probe it soon (several changes in a row give one run)."""
        self._wake.set()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        interval = self.settings.probe_interval_s or None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.run_once()
            except Exception:  # noqa: BLE001 - the probe must outlive a bad run; the next one retries
                log.exception("retention probe run failed")
            # Bounded CPU: a version change during the gap is probed once the gap is over.
            await asyncio.sleep(self.settings.probe_min_gap_s)

    async def run_once(self) -> RetentionRun | None:
        """One probe of the served version now (also callable directly); None when skipped."""
        version = self._served_version()
        if version is None:
            return None
        self._runs += 1
        try:
            run = await asyncio.to_thread(self._measure, version, self.settings.probe_sample, self._runs)
        except Exception as exc:  # noqa: BLE001 - counted, logged and shown in status; the next run retries
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.metrics.record_retention_probe(False)
            log.warning("retention probe of version %d failed: %s", version, self.last_error)
            return None
        if run is None:
            return None
        self.last, self.last_error = run, None
        self.metrics.record_retention_probe(True)
        self.metrics.set_retention(run.ratio, run.sampled, run.at)
        self.metrics.set_null_space_taken(run.null_space)
        self.metrics.set_perplexity_ratio(run.perplexity_ratio)     # None (not measured): NaN, never a stale value
        log.info("retention probe of version %d: %d/%d sampled facts hold (%d committed), held-out perplexity "
                 "×%s, in %.2f s", run.version, run.held, run.sampled, run.facts,
                 "?" if run.perplexity_ratio is None else f"{run.perplexity_ratio:.4f}", run.seconds)
        return run

    def status(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "sample": self.settings.probe_sample,
                "interval_s": self.settings.probe_interval_s, "min_gap_s": self.settings.probe_min_gap_s,
                "runs": self._runs,
                "last": self.last.to_dict() if self.last else None, "last_error": self.last_error,
                "gate": {"sample_size": self.settings.gate.sample_size, "max_drop": self.settings.gate.max_drop,
                         "max_perplexity_ratio": self.settings.damage.max_perplexity_ratio},
                # the file's name only (a viewer sees what is measured, not the server's paths); "": packaged
                "heldout_text": os.path.basename(self.settings.heldout_text or "")}


def run_of(measured: Any, at: float | None = None) -> RetentionRun:
    """A `RetentionRun` from the sidecar's `RetentionMeasured` reply."""
    rows = measured.rows
    return RetentionRun(version=measured.version, facts=measured.facts, sampled=len(rows),
                        held=sum(1 for r in rows if r["holds"]), at=time.time() if at is None else at,
                        seconds=measured.seconds, broken=tuple(r for r in rows if not r["holds"]),
                        null_space=dict(measured.null_space), heldout_ppl=measured.heldout_ppl,
                        base_heldout_ppl=measured.base_heldout_ppl)
