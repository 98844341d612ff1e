"""Calibration of the probe gate's default thresholds on the embedded SmolLM2-135M.

Runs the gate (`editserve.control.probe.probe_gate`, default configuration: paraphrases from the
relation templates, neighbours from the packaged pool, 20 canaries) on patches (--method, default the
server's default method) of --records CounterFact records the model knows (after skipping the first
--skip known ones, so a check can use records the thresholds were not chosen on), each on the
unedited model, and on a set of
over-general edits that should be refused (subject "the"/"The", a lone article or pronoun). It
prints the distribution of each gate score and how many edits each default threshold would
reject, so the defaults in `DEFAULT_THRESHOLDS` can be checked against measurements.

    .venv/bin/python bench/gate_calibration.py [--records 30] [--skip 0] [--method alphaedit] [--data ...]

One JSON line per edit goes to --out (default bench/results/gate_calibration-<method>.jsonl).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "counterfact" / "counterfact-edit.json"

# Edits whose subject is an article or pronoun: a ROME key for such a token is shared by
# countless prompts, so a sound gate must refuse them.
OVER_GENERAL = (
    ("{} capital of France is", "the", " Rome", " Paris"),
    ("{} Eiffel Tower is located in the city of", "The", " Rome", " Paris"),
    ("{} is the largest planet in the solar system", "It", " Mars", " Jupiter"),
    ("{} mother tongue of Emmanuel Macron is", "The", " German", " French"),
)


def _quantiles(xs: list[float]) -> str:
    if not xs:
        return "-"
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return f"median {statistics.median(s):.4f}  p90 {pick(0.9):.4f}  max {s[-1]:.4f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=30)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--skip", type=int, default=0, help="known records to skip first (0: the calibration set)")
    ap.add_argument("--method", default=None, help="editing method (default: the server's default method)")
    ap.add_argument("--out", default=None, help="JSON lines (default bench/results/gate_calibration-<method>.jsonl)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from editserve.control.methods import default_method
    from editserve.control.probe import DEFAULT_THRESHOLDS, GateConfig, probe_gate
    from editserve.editing import EditRequest, compute_patch, load_model
    from editserve.editing.counterfact import load_counterfact
    from editserve.editing.evaluate import known_records

    method = args.method or default_method()
    model, tok = load_model()
    known = known_records(model, tok, load_counterfact(args.data), args.skip + args.records).records
    cases = [("counterfact", r.case_id, r.request) for r in known[args.skip:args.skip + args.records]]
    cases += [("over-general", i, EditRequest(prompt=p, subject=s, target_new=n, target_true=t))
              for i, (p, s, n, t) in enumerate(OVER_GENERAL)]

    out = Path(args.out or f"bench/results/gate_calibration-{method}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    config = GateConfig()
    rows = []
    with out.open("w") as f:
        for kind, case, req in cases:
            patch = compute_patch(model, tok, [req], method=method)
            rep = probe_gate(model, tok, patch, [req], config)
            row = {"kind": kind, "case": case, "subject": req.subject, "passed": rep.passed,
                   "failures": list(rep.failures), "efficacy": rep.efficacy, "paraphrase": rep.paraphrase,
                   "ns_before": rep.neighbourhood_before, "ns_after": rep.neighbourhood_after, "ns_drop": rep.ns_drop,
                   "canary_kl_mean": rep.canary_kl_mean, "canary_kl_max": rep.canary_kl_max, "seconds": rep.seconds}
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            print(f"{kind:<12} {case:>6} {req.subject[:28]:<28} eff {rep.efficacy:.2f} para {rep.paraphrase:5.2f} "
                  f"NS {rep.neighbourhood_before:.2f}->{rep.neighbourhood_after:.2f} KL {rep.canary_kl_mean:.5f} "
                  f"{'pass' if rep.passed else 'REJECT ' + '; '.join(rep.failures)}", flush=True)

    t = DEFAULT_THRESHOLDS
    cf = [r for r in rows if r["kind"] == "counterfact"]
    og = [r for r in rows if r["kind"] == "over-general"]
    print(f"\nmethod {method}; known records {args.skip}..{args.skip + len(cf) - 1}; default thresholds: {t}")
    print(f"CounterFact edits: {len(cf)}; passed the default gate: {sum(r['passed'] for r in cf)}")
    for name, key in (("efficacy", "efficacy"), ("paraphrase", "paraphrase"), ("NS drop", "ns_drop"),
                      ("canary KL mean", "canary_kl_mean"), ("canary KL max", "canary_kl_max"),
                      ("gate seconds", "seconds")):
        print(f"  {name:<15} {_quantiles([float(r[key]) for r in cf if r[key] is not None and r[key] >= 0])}")
    for name, bad in (("efficacy", lambda r: r["efficacy"] < t.min_efficacy),
                      ("paraphrase", lambda r: r["paraphrase"] >= 0 and r["paraphrase"] < t.min_paraphrase),
                      ("NS drop", lambda r: r["ns_drop"] > t.max_ns_drop),
                      ("canary KL", lambda r: r["canary_kl_mean"] > t.max_canary_kl)):
        print(f"  rejected by {name:<11} {sum(bad(r) for r in cf)}/{len(cf)} CounterFact, "
              f"{sum(bad(r) for r in og)}/{len(og)} over-general")
    print(f"over-general edits rejected: {sum(not r['passed'] for r in og)}/{len(og)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
