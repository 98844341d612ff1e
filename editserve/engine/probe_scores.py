"""The probe scores of an edit's report as the probe gauges show them (one reading of a report).

A report is the sidecar's (`editserve.engine.sidecar`: efficacy on the requests' own prompts,
paraphrase / neighbourhood fractions of the caller's probes, canary KL) or, when the probe
gate ran, the gate's (`editserve.control.probe.ProbeReport` under ``report["gate"]``, which
takes precedence). Efficacy means the same in both: the fraction of the edited facts' prompts
whose new target outscores the true one after the edit.
"""

from __future__ import annotations

import math
from typing import Any


def _optional_score(value: Any) -> float | None:
    """A probe fraction or KL from a report; None where it was not measured (absent, -1, not finite)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    x = float(value)
    return x if math.isfinite(x) and x >= 0 else None


def probe_scores(report: dict[str, Any]) -> tuple[float, float | None, float | None, float | None]:
    """(efficacy, paraphrase, neighbourhood, canary KL) of a probe report, for the probe gauges.

    With the probe gate (``report["gate"]``, `editserve.control.probe.ProbeReport`): its CounterFact
    fractions (neighbourhood = NS after the edit) and mean canary KL; otherwise the sidecar's own
    report (efficacy on the requests' prompts, paraphrase / neighbourhood fractions of the
    caller's probes, canary KL). None: not measured."""
    gate = report.get("gate")
    if gate is not None:
        efficacy = _optional_score(gate.get("efficacy"))
        return (efficacy if efficacy is not None else 0.0, _optional_score(gate.get("paraphrase")),
                _optional_score(gate.get("neighbourhood_after")), _optional_score(gate.get("canary_kl_mean")))
    scores = report.get("scores") or {}
    efficacy = _optional_score(scores.get("efficacy"))
    return (efficacy if efficacy is not None else 0.0, _optional_score(scores.get("paraphrase")),
            _optional_score(scores.get("neighbourhood")), _optional_score(report.get("canary_kl")))
