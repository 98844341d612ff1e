"""Translation between protobuf messages and editserve's Python types (no logic besides that)."""

from __future__ import annotations

import json
from typing import Any

from editserve.control.gen import pb2


def thresholds_to_pb(t: Any) -> Any:
    return pb2.ProbeThresholds(min_efficacy=t.min_efficacy, min_paraphrase=t.min_paraphrase,
                               max_ns_drop=t.max_ns_drop, max_canary_kl=t.max_canary_kl)


def report_to_pb(d: dict[str, Any]) -> Any:
    """A `ProbeReport.to_dict()` as a ``ProbeReport`` message."""
    th = d.get("thresholds") or {}
    return pb2.ProbeReport(
        passed=bool(d["passed"]), failures=list(d.get("failures", ())), efficacy=d["efficacy"],
        paraphrase=d["paraphrase"], neighbourhood_before=d["neighbourhood_before"],
        neighbourhood_after=d["neighbourhood_after"], ns_drop=d["ns_drop"], canary_kl_mean=d["canary_kl_mean"],
        canary_kl_max=d["canary_kl_max"], canaries=int(d["canaries"]),
        thresholds=pb2.ProbeThresholds(**{k: float(v) for k, v in th.items()}),
        rows=[pb2.ProbeRow(**r) for r in d.get("rows", ())], seconds=float(d.get("seconds", 0.0)),
        neighbour_source=d.get("neighbour_source", ""), paraphrase_source=d.get("paraphrase_source", ""))


def change_to_pb(change: Any, committed: bool = True) -> Any:
    return pb2.VersionChange(
        version=change.version, previous_version=change.previous_version, kind=change.kind,
        pause_ms=float(change.pause_ms), patch_id=change.patch_id or "", method=change.method or "",
        active_patches=int(change.active_patches), timings_ms={k: float(v) for k, v in change.timings_ms.items()},
        committed=committed)


def fact_to_pb(r: Any) -> Any:
    return pb2.Fact(prompt=r.prompt, subject=r.subject, target_new=r.target_new, target_true=r.target_true or "")


def version_to_pb(v: Any, head: int) -> Any:
    msg = pb2.VersionInfo(
        version=v.version, kind=v.kind, patch_id=v.patch_id or "", added=list(v.added), removed=list(v.removed),
        caller=v.caller, created_at=float(v.created_at), method=v.method or "",
        facts=[fact_to_pb(r) for r in v.requests],
        probe_report_json=json.dumps(v.probe_report, sort_keys=True) if v.probe_report is not None else "",
        idempotency_key=v.idempotency_key or "", is_head=v.version == head)
    if v.parent is not None:
        msg.parent = v.parent
    return msg


def diff_to_pb(d: Any) -> Any:
    weights = []
    for w in d.weights:
        m = pb2.WeightDiff(name=w.name, layer=w.layer, norm=w.norm)
        if w.relative is not None:
            m.relative = w.relative
        weights.append(m)
    return pb2.DiffResponse(a=d.a, b=d.b, only_a=list(d.only_a), only_b=list(d.only_b), common=list(d.common),
                            weights=weights)


def event_to_pb(e: Any) -> Any:
    return pb2.Event(id=e.id, kind=e.kind, version=e.version if e.version is not None else -1,
                     from_version=e.from_version if e.from_version is not None else -1, caller=e.caller, ts=e.ts,
                     details_json=json.dumps(e.details, sort_keys=True, default=str))
