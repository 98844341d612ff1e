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
        committed=committed, serving_replicas=list(change.serving_replicas),
        lagging_replicas=list(change.lagging_replicas))


def rebase_to_pb(report: Any) -> Any:
    """An `editserve.control.operations.RebaseReport` as a ``RebaseResponse`` message."""
    def scores(d: Any) -> dict[str, float]:
        return {str(k): float(v) for k, v in (d or {}).items()}

    return pb2.RebaseResponse(
        change=change_to_pb(report.change), reverted_version=int(report.reverted_version),
        removed_patch=report.removed_patch,
        rebased=[pb2.RebasedEdit(original_version=int(r["original_version"]), old_patch=r["old_patch"],
                                 new_patch=r["new_patch"], scores_before=scores(r.get("metrics_before")),
                                 scores_after=scores(r.get("metrics_after")), changes=scores(r.get("changes")))
                 for r in report.rebased])


def consolidate_to_pb(report: Any) -> Any:
    """An `editserve.control.operations.ConsolidationReport` as a ``ConsolidateResponse`` message."""
    return pb2.ConsolidateResponse(
        change=change_to_pb(report.change), constituent_versions=list(report.constituent_versions),
        layers=[pb2.ConsolidatedLayer(name=x["name"], layer=int(x["layer"]), patches=int(x["n_patches"]),
                                      keys=int(x["n_keys"]), penalty_before=float(x["penalty_before"]),
                                      penalty_after=float(x["penalty_after"])) for x in report.layers],
        facts=report.facts, held_before=report.held_before, held_after=report.held_after)


def export_to_pb(patch_id: str, files: Any) -> Any:
    """(patch id, `editserve.ledger.transfer.PatchFiles`) → ``ExportPatchResponse``."""
    return pb2.ExportPatchResponse(patch_id=patch_id, manifest_json=files.manifest_json, factors=files.factors,
                                   keys=files.keys)


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


def local_event_to_pb(e: Any) -> Any:
    """A server-local `editserve.control.events.Event` (id 0)."""
    return pb2.Event(id=0, kind=e.kind, operation_id=e.operation_id, caller=e.caller, ts=e.ts, progress=e.progress,
                     message=e.message, version=e.version, from_version=-1, details_json=e.details_json)


def status_to_pb(st: dict[str, Any]) -> Any:
    """`Operations.status`'s dict as a ``StatusResponse``."""
    bounds = st["threshold_bounds"]
    return pb2.StatusResponse(
        model=st.get("model", ""), family=st.get("family") or "",
        served_version=st["served_version"] if st["served_version"] is not None else -1,
        ledger_head=st["ledger_head"] if st["ledger_head"] is not None else -1,
        sidecar_in_sync=bool(st["sidecar"]["in_sync"]), sidecar_alive=bool(st["sidecar"]["alive"]),
        active_patches=int(st["active_patches"]), tensor_parallel_size=int(st["tensor_parallel_size"]),
        swaps_ok=st["swaps_ok"], swaps_failed=st["swaps_failed"], parity_failures=st["parity_failures"],
        degraded=st["degraded"] or "",
        threshold_bounds=pb2.ThresholdBounds(defaults=pb2.ProbeThresholds(**bounds["defaults"]),
                                             loosest=pb2.ProbeThresholds(**bounds["loosest"])),
        ledger_root=st.get("ledger_root") or "", statistics=_statistics_to_pb(st["sidecar"].get("statistics")),
        replica_id=st.get("replica_id") or "", ready=bool(st.get("ready")),
        fleet=[pb2.ReplicaStatus(replica_id=r["replica_id"], version=r["version"], role=r["role"],
                                 address=r["address"], age_s=float(r["age_s"]), live=bool(r["live"]),
                                 skew=int(r["skew"]), policy=r.get("policy") or "",
                                 policy_differs=list(r.get("policy_differs") or ())) for r in st.get("fleet") or []],
        health=_health_to_pb(st.get("retention")),
        consolidate_every=int((st.get("consolidation") or {}).get("every") or 0),
        consolidating=bool((st.get("consolidation") or {}).get("running")))


def _health_to_pb(health: dict[str, Any] | None) -> Any:
    """`editserve.engine.health.RetentionProbe.status()` as an ``EditHealth`` (None: no probe)."""
    if not health:
        return pb2.EditHealth(version=-1)
    gate = health.get("gate") or {}
    out = pb2.EditHealth(probe_enabled=bool(health.get("enabled")), runs=int(health.get("runs") or 0), version=-1,
                         last_error=str(health.get("last_error") or ""),
                         retention_gate_sample=int(gate.get("sample_size") or 0),
                         retention_gate_max_drop=float(gate.get("max_drop") or 0.0),
                         max_perplexity_ratio=float(gate.get("max_perplexity_ratio") or 0.0),
                         heldout_text=str(health.get("heldout_text") or ""))
    last = health.get("last")
    if last:
        out.version, out.facts, out.sampled, out.held = (int(last["version"]), int(last["facts"]),
                                                         int(last["sampled"]), int(last["held"]))
        out.at = float(last["at"])
        if last.get("ratio") is not None:
            out.retention_ratio = float(last["ratio"])
        if last.get("perplexity_ratio") is not None:
            out.perplexity_ratio = float(last["perplexity_ratio"])
        for layer, share in (last.get("null_space") or {}).items():
            out.null_space_taken[int(layer)] = float(share)
    return out


def _statistics_to_pb(st: dict[str, Any] | None) -> Any:
    """The sidecar's statistics warm-up state (`SidecarClient.statistics`) as a ``StatisticsStatus``."""
    if not st:
        return pb2.StatisticsStatus(state="off", message="no sidecar")
    return pb2.StatisticsStatus(state=str(st.get("state") or ""), fraction=float(st.get("fraction") or 0.0),
                                layers=[int(x) for x in st.get("layers") or ()],
                                seconds=float(st.get("seconds") or 0.0), error=str(st.get("error") or ""),
                                message=str(st.get("message") or ""))


def scores_to_pb(scored: Any) -> Any:
    scores = []
    for r in scored.rows:
        s = pb2.ProbeScore(prompt=r["prompt"], target=r["target"], target_logprob=r["target_logprob"],
                           other=r["other"], top_token=r["top_token"])
        if r["other_logprob"] is not None:
            s.other_logprob = r["other_logprob"]
        scores.append(s)
    return pb2.ProbeResponse(version=scored.version, scores=scores)


def traced_to_pb(traced: Any) -> Any:
    r = traced.result
    return pb2.TraceResponse(version=traced.version, result_json=json.dumps(r), png=traced.png,
                             p_clean=r["p_clean"], p_corrupted=r["p_corrupted"],
                             top_mlp_layers=[int(x) for x in r["top_mlp_layers"]], seconds=r["seconds"])
