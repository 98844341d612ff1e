"""What taking one fact out of a consolidation does to a long ledger's model (issue 16).

Reads a saved `bench/lifelong.py` run (its weights and preserved keys, and the stream beside it),
takes each of a sample of its edits out of the accumulated update on its own (the same per-layer
re-solve as `editserve ledger revert V --from-consolidation` and a served revert:
`editserve.editing.consolidate.resolve_without` on W − W₀ and every committed key, the edit's keys —
its stored keys and its bare prompt's, measured on the model as saved — sent to zero), and scores, for each, against the state as saved:

- the reverted edit: ES and PS (1 = the new object still wins; after a revert it should not), and
  the same on the unedited model (CounterFact's "known" records are known on the rewrite prompt,
  not always on every paraphrase);
- every other committed edit: retained ES and PS;
- held-out perplexity relative to the unedited model.

One printed table; nothing is written. On a run consolidated every K commits and saved at a multiple
of K, W − W₀ is exactly one consolidated patch (what the ledger would hold).

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/revert_consolidated.py \\
        --run /work/exp/edit-c25/alphaedit-b1 --data ../shared/data/counterfact/counterfact-edit.json --sample 10
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import torch

log = logging.getLogger("revert_consolidated")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a saved bench/lifelong.py run (METHOD-bB folder)")
    ap.add_argument("--data", required=True, help="the CounterFact file the run's stream came from")
    ap.add_argument("--stream", default=None, help="the run's stream.json (default: beside the run folder)")
    ap.add_argument("--sample", type=int, default=10, help="edits taken out, one at a time (default 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stored-keys-only", action="store_true",
                    help="zero only the edit's stored (prefix-averaged) keys, not also its bare prompt's key "
                         "measured on the model as saved (what the ledger did before session 13's change)")
    ap.add_argument("--ridge", type=float, default=0.1, help="μ of the re-solve (the consolidation's, default 0.1)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from safetensors.torch import load_file

    from editserve.editing import load_model
    from editserve.editing.alphaedit import PreservedKeys
    from editserve.editing.arch import Layout, spec_for
    from editserve.editing.consolidate import ConsolidateParams, resolve_without
    from editserve.editing.counterfact import load_counterfact
    from editserve.editing.evaluate import score_records, summarize
    from editserve.editing.lifelong import consolidation_covariances, down_proj_weights, heldout_perplexity

    run = Path(args.run)
    state = json.loads((run / "state.json").read_text())
    stream = json.loads(Path(args.stream or run.parent / "stream.json").read_text())
    done = int(state["done"])
    by_id = {r.case_id: r for r in load_counterfact(Path(args.data))}
    records = [by_id[c] for c in stream["case_ids"][:done]]
    preserved = PreservedKeys.from_tensors(load_file(str(run / "preserved.safetensors")))
    tags = preserved.tags
    if len(tags) != done:
        raise SystemExit(f"{run}: {len(tags)} key tags for {done} edits; this bench takes single-edit runs")

    model, tok = load_model()
    spec = spec_for(model)
    w0 = down_proj_weights(model)
    layers = list(preserved.layers)
    covs = consolidation_covariances(model, tok, layers)          # the unedited model's statistics
    chosen = sorted(random.Random(args.seed).sample(range(done), args.sample))
    unedited = dict(zip(chosen, score_records(model, tok, [records[i] for i in chosen])))
    params = dict(model.named_parameters())
    saved = load_file(str(run / "weights.safetensors"))
    with torch.no_grad():
        for n, w in saved.items():
            params[n].copy_(w)

    def out_in(t: torch.Tensor) -> torch.Tensor:
        return t if spec.hf_layout is Layout.OUT_IN else t.T

    deltas = {layer: out_in(params[spec.weight_name(layer)].detach().double() - w0[layer].double()) for layer in layers}
    keys = {layer: torch.cat([b.keys for b in preserved.blocks if b.layer == layer], dim=1) for layer in layers}
    owner = {layer: [b.tag for b in preserved.blocks if b.layer == layer for _ in range(b.keys.shape[1])]
             for layer in layers}

    bare = {}
    if not args.stored_keys_only:                  # each sampled edit's bare-prompt keys, on the model as saved
        from editserve.ledger.consolidation import model_prompt_keys

        measure = model_prompt_keys(model, tok)
        bare = {i: measure([records[i].request], tuple(layers)) for i in chosen}
    t = time.perf_counter()
    base_scores = score_records(model, tok, records)
    ppl0 = heldout_perplexity(model, tok)
    log.info("as saved (%d edits): scored in %.0fs", done, time.perf_counter() - t)
    rows = []
    for i in chosen:
        t = time.perf_counter()
        with torch.no_grad():
            for layer in layers:
                dropped = torch.tensor([o == tags[i] for o in owner[layer]], dtype=torch.bool)
                k = keys[layer]
                if i in bare:
                    k = torch.cat([k, bare[i][layer]], dim=1)
                    dropped = torch.cat([dropped, torch.ones(bare[i][layer].shape[1], dtype=torch.bool)])
                r = resolve_without(deltas[layer], k, dropped, covs[layer], layer, ConsolidateParams(ridge=args.ridge))
                new = w0[layer].double() + r.u.double() @ r.v.double().T           # [d_out, d_in]
                params[spec.weight_name(layer)].copy_(out_in(new).to(params[spec.weight_name(layer)].dtype))
        t_solve = time.perf_counter() - t
        scores = score_records(model, tok, records)
        ppl = heldout_perplexity(model, tok)
        others_before = summarize([s for j, s in enumerate(base_scores) if j != i])
        others = summarize([s for j, s in enumerate(scores) if j != i])
        broken = sum(1 for j, (b, a) in enumerate(zip(base_scores, scores)) if j != i and b.es == 1.0 and a.es < 1.0)
        rows.append((i, records[i], unedited[i], base_scores[i], scores[i], others_before, others, broken, ppl, t_solve))
        log.info("edit %d (%s): ES %.2f→%.2f PS %.2f→%.2f (unedited %.2f / %.2f); others ES %.3f→%.3f PS %.3f→%.3f, %d broken; "
                 "ppl ×%.4f→×%.4f; re-solve %.1fs", i, records[i].request.subject, base_scores[i].es, scores[i].es,
                 base_scores[i].ps, scores[i].ps, unedited[i].es, unedited[i].ps, others_before.es, others.es, others_before.ps, others.ps, broken,
                 ppl0 / stream["ppl"], ppl / stream["ppl"], t_solve)
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)

    print(f"\n{run}: {done} edits, {len(chosen)} taken out one at a time (seed {args.seed}; "
          f"{'stored keys only' if args.stored_keys_only else 'stored keys and the bare prompt'}); held-out perplexity "
          f"as saved ×{ppl0 / stream['ppl']:.4f}\n")
    print("| edit | subject | its ES / PS: unedited, as saved → reverted | others ES as saved → reverted "
          "| others PS as saved → reverted | others broken | ppl ratio after | re-solve s |")
    print("|---|---|---|---|---|---|---|---|")
    for i, rec, u, b, a, ob, oa, broken, ppl, ts in rows:
        print(f"| {i + 1} | {rec.request.subject} | {u.es:.2f} / {u.ps:.2f}, {b.es:.2f} / {b.ps:.2f} → {a.es:.2f} / "
              f"{a.ps:.2f} | {ob.es:.3f} → {oa.es:.3f} | {ob.ps:.3f} → {oa.ps:.3f} | {broken} | "
              f"×{ppl / stream['ppl']:.4f} | {ts:.1f} |")
    n = len(rows)
    print(f"\nreverted edits: ES {sum(r[3].es for r in rows) / n:.2f} → {sum(r[4].es for r in rows) / n:.2f} "
          f"(unedited {sum(r[2].es for r in rows) / n:.2f}), PS {sum(r[3].ps for r in rows) / n:.2f} → "
          f"{sum(r[4].ps for r in rows) / n:.2f} (unedited {sum(r[2].ps for r in rows) / n:.2f}); other edits broken "
          f"per revert: {sum(r[7] for r in rows) / n:.2f} (max {max(r[7] for r in rows)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
