"""How ROME's edit success on SmolLM2 depends on the edit layer, next to what causal tracing says.

For each layer in --layers, edits each of the first --records CounterFact records the model knows
with ROME at that layer (each edit on the unedited model, removed after) and scores ES/PS/NS
(`editserve.editing.evaluate`). Before that, traces every record once: the mean indirect effect of
restoring MLP windows at the subject's last token, per layer — the quantity causal tracing would
pick an edit layer by. Per layer it prints ES/PS/NS/S, the margins, the tracing effect, and the
correlation over records between the tracing effect at that layer and the edit's rewrite margin
(Hase et al., 2023, found none on GPT-J).

Writes one JSON line per finished step to --out (resumable: layers already there are skipped).

    EDITSERVE_HOME=/tmp/eh nohup .venv/bin/python bench/layer_sweep.py > bench/results/layer_sweep.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "counterfact" / "counterfact-edit.json"


def pearson(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 3:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="1,2,3,4,5,6,8,10,12,15,18")
    ap.add_argument("--records", type=int, default=50)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--samples", type=int, default=5, help="noise samples per trace")
    ap.add_argument("--no-trace", action="store_true")
    ap.add_argument("--retrace", action="store_true", help="trace again even if --out has a trace step")
    ap.add_argument("--out", default="bench/results/layer_sweep.jsonl")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from editserve.editing import compute_patch, load_model
    from editserve.editing.counterfact import load_counterfact
    from editserve.editing.evaluate import evaluate, known_records
    from editserve.editing.tracing import prepare, restore_cells

    layers = [int(x) for x in args.layers.split(",") if x.strip()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    if out.exists():
        for line in out.read_text().splitlines():
            row = json.loads(line)
            done[row["step"]] = row

    def emit(row: dict) -> None:
        done[row["step"]] = row
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    model, tok = load_model()
    # The first --records records the model knows (P(true) > P(new) on the rewrite prompt).
    known = list(known_records(model, tok, load_counterfact(args.data), args.records).records)
    print(f"{len(known)} known records: case ids {known[0].case_id}..{known[-1].case_id}", flush=True)

    n_layers = int(model.config.num_hidden_layers)
    if not args.no_trace and ("trace" not in done or args.retrace):
        t = time.perf_counter()
        effects, p_clean, p_corrupted = [], [], []   # per record; effects: MLP IE at subject's last token per layer
        for rec in known:
            req = rec.request
            setup = prepare(model, tok, req.prompt, req.subject, req.target_true, samples=args.samples, seed=0)
            last = setup.subject_range[1] - 1
            mean, p_corr = restore_cells(model, setup, "mlp", [(last, l) for l in range(n_layers)])
            effects.append([float(m) - float(p_corr.mean()) for m in mean])
            p_clean.append(setup.p_clean)
            p_corrupted.append(float(p_corr.mean()))
        emit({"step": "trace", "case_ids": [r.case_id for r in known], "mlp_ie": effects, "p_clean": p_clean,
              "p_corrupted": p_corrupted, "seconds_per_trace": (time.perf_counter() - t) / len(known)})
        print(f"traced {len(known)} records, {(time.perf_counter() - t) / len(known):.1f} s each", flush=True)

    for layer in layers:
        step = f"layer{layer}"
        if step in done:
            continue
        t = time.perf_counter()
        report = evaluate(
            model, tok, known,
            make_patch=lambda recs, layer=layer: compute_patch(model, tok, [r.request for r in recs], method="rome",
                                                               layers=[layer]),
            n_known=len(known), batch=1, method="rome", progress=False,
        )
        a, b = report.after, report.before
        emit({"step": step, "layer": layer, "n": report.records_edited,
              "es": a.es, "ps": a.ps, "ns": a.ns, "s": a.s, "em": a.em, "pm": a.pm, "nm": a.nm,
              "ns_before": b.ns, "nm_before": b.nm, "seconds_per_edit": report.seconds_per_edit,
              "seconds": time.perf_counter() - t,
              "per_record_em": {str(r.case_id): r.after.em for r in report.results}})
        print(f"layer {layer}: ES {a.es:.3f} PS {a.ps:.3f} NS {a.ns:.3f} S {a.s:.3f} "
              f"({report.seconds_per_edit:.1f} s/edit, {time.perf_counter() - t:.0f} s)", flush=True)

    # The table. Tracing effects are normalised per record: IE / (P_clean − P_corrupted), the share of
    # the corruption's damage that restoring the MLP window recovers.
    trace_row = done.get("trace")
    by_case: dict[int, list[float]] = {}
    if trace_row is not None:
        for c, ie, pc, pk in zip(trace_row["case_ids"], trace_row["mlp_ie"],
                                 trace_row.get("p_clean", []), trace_row.get("p_corrupted", [])):
            gap = pc - pk
            if gap > 0.02:   # below that the share is noise
                by_case[c] = [x / gap for x in ie]
    print(f"\n{'layer':>5} {'ES':>6} {'PS':>6} {'NS':>6} {'S':>6} {'EM':>7} {'PM':>7} {'NM':>7} "
          f"{'MLP rec':>7} {'r(IE,EM)':>8} {'s/edit':>6}")
    for layer in sorted(layers):
        row = done.get(f"layer{layer}")
        if row is None:
            continue
        ie = r = float("nan")
        if by_case:
            ie = sum(v[layer] for v in by_case.values()) / len(by_case)
            pairs = [(by_case[int(c)][layer], em) for c, em in row["per_record_em"].items() if int(c) in by_case]
            r = pearson([p[0] for p in pairs], [p[1] for p in pairs])
        print(f"{layer:>5} {row['es']:>6.3f} {row['ps']:>6.3f} {row['ns']:>6.3f} {row['s']:>6.3f} {row['em']:>7.3f} "
              f"{row['pm']:>7.3f} {row['nm']:>7.3f} {ie:>7.4f} {r:>8.2f} {row['seconds_per_edit']:>6.1f}")
    if by_case:
        mean_ie = [sum(v[l] for v in by_case.values()) / len(by_case) for l in range(n_layers)]
        best = sorted(range(n_layers), key=lambda l: -mean_ie[l])[:5]
        print(f"\nmean recovered share by MLP windows at the subject's last token ({len(by_case)} records), all layers: "
              + " ".join(f"{x:.3f}" for x in mean_ie))
        print(f"layers tracing would pick (highest mean effect): {best}")
        if any(f"layer{l}" in done for l in layers):
            print("before editing: NS {:.3f}".format(next(done[f'layer{l}']['ns_before'] for l in layers if f'layer{l}' in done)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
