"""How often does the gate's retention check refuse an ordinary edit? (issue 16, docs/lifelong.md)

Commits a stream of CounterFact records the unedited SmolLM2 knows, one after another, each computed
on the model holding the earlier ones and merged (what the sidecar does for ROME and MEMIT).
Before each commit the retention check (`editserve.control.gate.check_retention`) scores *every*
earlier fact (not a sample) without and with the candidate patch; the edit is then committed anyway,
so the stream is the same whatever the check says. At the end, the first record is edited back to its
true object, a deliberate overwrite the check must refuse.

Prints one line per edit (facts held before, broken) and a summary: how many ordinary edits a bound
of 0 (the default) would have refused, the check's cost, and the overwrite's outcome.

    PYTHONPATH=$PWD python bench/retention_gate.py --n 30 --method rome
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data" / "counterfact" / "counterfact-edit.json"
log = logging.getLogger("retention_gate")


def main() -> int:
    ap = argparse.ArgumentParser(description="the gate's retention check on a sequential stream")
    ap.add_argument("--n", type=int, default=30, help="edits in the stream")
    ap.add_argument("--method", default="rome")
    ap.add_argument("--data", default=str(SHARED))
    ap.add_argument("--out", default="bench/results/retention_gate.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("editserve").setLevel(logging.WARNING)

    from dataclasses import replace

    from editserve.control.gate import check_retention
    from editserve.editing import compute_patch, load_model
    from editserve.editing.corpus import load_corpus
    from editserve.editing.counterfact import load_counterfact
    from editserve.editing.evaluate import known_records
    from editserve.editing.retention import CommittedFact, RetentionGate
    from editserve.patches import apply_patch

    model, tok = load_model()
    corpus = load_corpus(None)
    found = known_records(model, tok, load_counterfact(Path(args.data)), args.n)   # the model knows the true object
    records, scanned = list(found.records), found.scanned
    gate = RetentionGate(sample_size=10_000, max_drop=0.0)
    facts: list[CommittedFact] = []
    rows = []
    for i, rec in enumerate(records):
        req = rec.request
        t0 = time.perf_counter()
        patch = compute_patch(model, tok, [req], method=args.method, corpus=corpus)
        t1 = time.perf_counter()
        report = check_retention(model, tok, patch, facts, gate)
        t2 = time.perf_counter()
        apply_patch(model, patch)
        facts.append(CommittedFact(version=i + 1, prompt=req.text, subject=req.subject, target_new=req.target_new,
                                   target_true=req.target_true or ""))
        row = {"edit": i + 1, "case_id": rec.case_id, "earlier": len(facts) - 1, "held_before": report["held_before"],
               "broken": [(b["version"], b["prompt"], b["target_new"]) for b in report["broken"]],
               "refused_at_0": not report["passed"], "compute_s": round(t1 - t0, 2), "check_s": round(t2 - t1, 3)}
        rows.append(row)
        print(f"edit {i + 1:3d} (case {rec.case_id}): {report['held_before']}/{len(facts) - 1} earlier facts held, "
              f"{len(report['broken'])} broken; check {row['check_s']:.2f} s", flush=True)
    # The deliberate overwrite: the first record back to its true object.
    first = records[0].request
    back = replace(first, target_new=first.target_true, target_true=first.target_new)
    patch = compute_patch(model, tok, [back], method=args.method, corpus=corpus)
    over = check_retention(model, tok, patch, facts, gate)
    refused = sum(r["refused_at_0"] for r in rows)
    summary = {"method": args.method, "edits": len(rows), "scanned": scanned, "refused_at_max_drop_0": refused,
               "broken_facts_total": sum(len(r["broken"]) for r in rows),
               "check_seconds_median": sorted(r["check_s"] for r in rows)[len(rows) // 2],
               "compute_seconds_median": sorted(r["compute_s"] for r in rows)[len(rows) // 2],
               "overwrite_refused": not over["passed"],
               "overwrite_broken": [(b["version"], b["prompt"], b["target_new"]) for b in over["broken"]]}
    print(json.dumps(summary, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
