"""Gate policy: every edit runs the probe gate; only an admin may skip it, and a skip is audited.

The gate itself (what is measured, the thresholds and their loosest bounds) lives in
`editserve.control.probe`; this module decides whether it runs for a request and what the
ledger records when it does not: the committed version's probe report carries
``gate_skipped: {"by": <caller>, "role": "admin"}``, and the audit log has a WARNING line.

It also holds the gate's **retention check** (issue 16): an edit must not break earlier edits.
On a sample of the facts committed at the head (`RetentionGate.sample_size`; facts about the
candidate's own subjects first, then a seeded random draw: `editserve.editing.retention`),
each fact is scored before and after the candidate patch; a fact that held before and not
after is *broken*. The drop — broken / held before — above `RetentionGate.max_drop` fails the
gate, and the report (``report["gate"]["retention"]``, see `check_retention`) names every
broken fact (version, prompt, target). Skipping the gate (admin) skips this check too.
It runs in the sidecar, with the probe gate, on the model at the head.

And the gate's **damage bound** (issue 16, off by default): `DamageGate.max_perplexity_ratio`
caps the general damage the ledger may do. The held-out perplexity
(`editserve.editing.lifelong.heldout_perplexity`, the retention probe's measure) of the head with
the candidate patch, over the unedited model's, must not exceed it; otherwise the edit is refused
(``report["gate"]["damage"]``, see `check_damage`). On a long ledger the damage grows with every
edit (docs/lifelong.md), so once the budget is spent every gated edit is refused until a
consolidation, a revert or a rollback brings the head back under it, or the operator raises it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from editserve.control.principals import Principal, require
from editserve.editing.retention import RetentionGate
from editserve.errors import InvalidRequestError

log = logging.getLogger("editserve.audit")
retention_log = logging.getLogger(__name__)


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


# -- retention check ---------------------------------------------------------------------------


def check_retention(model: Any, tok: Any, patch: Any, facts: Sequence[Any], config: RetentionGate) -> dict[str, Any]:
    """Score `facts` (`editserve.editing.retention.CommittedFact`, already sampled) on `model`
    without and with `patch` (the model is unchanged on return). The report:
    ``{"passed", "sampled", "held_before", "held_after", "drop", "max_drop", "broken": [fact dicts with
    log-probabilities], "seconds"}``; `drop` = broken / held before (0 when none held)."""
    from editserve.editing.retention import facts_hold
    from editserve.patches import apply_patch, remove_patch

    t0 = time.perf_counter()
    before = facts_hold(model, tok, facts)
    after = before
    if facts:
        apply_patch(model, patch)
        try:
            after = facts_hold(model, tok, facts)
        finally:
            remove_patch(model, patch)           # restores the saved base copies; nothing is subtracted
    held = [i for i, (ok, _, _) in enumerate(before) if ok]
    broken = [i for i in held if not after[i][0]]
    drop = len(broken) / len(held) if held else 0.0
    report = {
        "passed": drop <= config.max_drop + 1e-12,
        "sampled": len(facts),
        "held_before": len(held),
        "held_after": sum(1 for ok, _, _ in after if ok),
        "drop": round(drop, 6),
        "max_drop": config.max_drop,
        "broken": [{**facts[i].to_dict(),
                    "new_logprob_before": round(before[i][1], 5), "true_logprob_before": round(before[i][2], 5),
                    "new_logprob_after": round(after[i][1], 5), "true_logprob_after": round(after[i][2], 5)}
                   for i in broken],
        "seconds": round(time.perf_counter() - t0, 4),
    }
    retention_log.info("retention gate: %s (%d sampled, %d held before, %d broken) in %.2f s",
             "passed" if report["passed"] else "REJECTED", len(facts), len(held), len(broken), report["seconds"])
    return report


def retention_failure(report: dict[str, Any]) -> str:
    """The gate failure line of a failed retention check, naming every broken fact."""
    named = "; ".join(f"version {b['version']}: {b['prompt']!r} -> {b['target_new']!r}" for b in report["broken"])
    return (f"retention drop {report['drop']:.3f} > max_retention_drop {report['max_drop']}: the edit breaks "
            f"{len(report['broken'])} of {report['held_before']} sampled earlier edit(s) ({named}); revert those "
            "versions first if the edit is meant to replace them")


def merge_retention(gate_report: dict[str, Any], retention: dict[str, Any]) -> dict[str, Any]:
    """The probe gate's report (`ProbeReport.to_dict()`) with the retention check added: under
    ``"retention"``, and as a failure (``passed`` false) when it failed."""
    return _merge(gate_report, "retention", retention, retention_failure)


def _merge(gate_report: dict[str, Any], key: str, check: dict[str, Any],
           failure: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    out = {**gate_report, key: check}
    if not check["passed"]:
        out["failures"] = [*gate_report.get("failures", ()), failure(check)]
        out["passed"] = False
    return out


# -- damage bound ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DamageGate:
    """The damage bound of the commit gate: refuse an edit after which the held-out perplexity
    would exceed `max_perplexity_ratio` × the unedited model's (0: off; else at least 1)."""

    max_perplexity_ratio: float = 0.0

    def __post_init__(self) -> None:
        v = self.max_perplexity_ratio
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                or not (v == 0 or v >= 1.0)):
            raise InvalidRequestError(f"max_perplexity_ratio must be 0 (off) or a number >= 1, got {v!r}")

    @property
    def enabled(self) -> bool:
        return self.max_perplexity_ratio > 0


def check_damage(model: Any, tok: Any, patch: Any, base_ppl: float, head_ppl: float,
                 config: DamageGate, text: str | None = None) -> dict[str, Any]:
    """The held-out perplexity of `model` with `patch` merged (the model is unchanged on return),
    against `config`. `base_ppl` / `head_ppl`: the unedited model's and the head's (without the
    patch), both on `text` (None: the packaged held-out prose). The report: ``{"passed", "perplexity_ratio_head", "perplexity_ratio_after",
    "max_perplexity_ratio", "seconds"}`` (ratios over the unedited model's)."""
    from editserve.editing.lifelong import heldout_perplexity
    from editserve.patches import apply_patch, remove_patch

    t0 = time.perf_counter()
    apply_patch(model, patch)
    try:
        after = heldout_perplexity(model, tok, text) / base_ppl
    finally:
        remove_patch(model, patch)               # restores the saved base copies; nothing is subtracted
    report = {
        "passed": math.isfinite(after) and after <= config.max_perplexity_ratio,
        "perplexity_ratio_head": round(head_ppl / base_ppl, 6),
        "perplexity_ratio_after": round(after, 6) if math.isfinite(after) else None,
        "max_perplexity_ratio": config.max_perplexity_ratio,
        "seconds": round(time.perf_counter() - t0, 4),
    }
    retention_log.info("damage bound: %s (held-out perplexity ×%.4f at the head, ×%s with the edit, bound ×%s) "
                       "in %.2f s", "passed" if report["passed"] else "REJECTED", report["perplexity_ratio_head"],
                       report["perplexity_ratio_after"], config.max_perplexity_ratio, report["seconds"])
    return report


def damage_failure(report: dict[str, Any]) -> str:
    """The gate failure line of a failed damage bound."""
    after = report["perplexity_ratio_after"]
    what = "not finite" if after is None else f"×{after:.4f}"
    return (f"held-out perplexity {what} with the edit > max_perplexity_ratio "
            f"{report['max_perplexity_ratio']} (×{report['perplexity_ratio_head']:.4f} at the head): the ledger's "
            "damage budget is spent; consolidate, revert edits that are no longer needed, or raise "
            "EDITSERVE_GATE_MAX_PERPLEXITY_RATIO")


def merge_damage(gate_report: dict[str, Any], damage: dict[str, Any]) -> dict[str, Any]:
    """The gate report with the damage bound added under ``"damage"`` (a failure when it failed)."""
    return _merge(gate_report, "damage", damage, damage_failure)
