"""Gated edits on the lifelong stream: one extra SwiGLU neuron per fact (editing/gated.py).

The same stream and the same checkpoint measures as bench/lifelong.py (its ``stream.json``: the first
known records of a CounterFact file, their unedited NS, the unedited held-out perplexity and fluency),
so the rows compare with that benchmark's directly. Each edit is computed on the model holding every
earlier gated neuron (applied through a hook). At every ``--every`` edits it reports retained ES and
PS, the NS ratio, held-out perplexity and fluency ratios, seconds per edit (excluding checkpoints) and
how the gates sit on ordinary text:

- ``z>0``: share of edits whose gate scores some statistics-corpus token above 0 (where silu opens);
- ``|a|``: mean |activation| of an edit's neuron over those tokens (1 on its subject);
- ``ES@ins``: ES of each edit right after it was added (retained ES below it = edits lost later);
- ``cross``: share of edits on whose prompt (any token) another edit's neuron has |a| > 0.1, and the ES
  of those edits (a later neuron open on an earlier subject overwrites it; ``--guard`` fights that).

State (the bank, the rows) is saved at every checkpoint under ``<out>/gated-L<layer>-m<margin>-s<strength>[-g<guard>]/``
and a rerun of the same command resumes from it.

    PYTHONPATH=$PWD python bench/gated.py --n 1000 --every 100 --margin 12 --out /tmp/gated

builds the stream of the first 1,000 known records of counterfact-edit (bench/lifelong.py's default data, the
report split) in /tmp/gated/stream.json; ``--stream`` reuses another run's (e.g. a bench/lifelong.py run's).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/lifelong.py, also under `python -m`
from lifelong import SHARED, build_stream, checkpoint_scores  # noqa: E402  (the lifelong benchmark's stream and row)

log = logging.getLogger("bench.gated")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stream", type=Path, help="a stream.json of bench/lifelong.py (default: <out>/stream.json, "
                    "built from --data if missing)")
    ap.add_argument("--data", type=Path, default=SHARED, help="CounterFact file the stream is built from (default: ../shared/.../counterfact-edit.json)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--margin", type=float, default=12.0)
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--guard", type=float, default=0.0, help="weight share of earlier subjects among a gate's negatives")
    ap.add_argument("--negatives", type=int, default=8192, help="statistics-corpus tokens the gates are fit against")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from editserve.editing import load_model
    from editserve.editing.corpus import load_corpus
    from editserve.editing.counterfact import load_counterfact
    from editserve.editing.edit import resolve_hparams
    from editserve.editing.gated import GateBank, GateParams, corpus_inputs, gated_edit
    from editserve.editing.model import fingerprint
    from editserve.editing.prefixes import context_prefixes
    from editserve.editing.scoring import target_nll

    if args.stream is None:
        args.out.mkdir(parents=True, exist_ok=True)
        build_stream(args.data, args.n, args.out)
        args.stream = args.out / "stream.json"
    stream = json.loads(args.stream.read_text())
    if len(stream["case_ids"]) < args.n:
        raise SystemExit(f"{args.stream} holds {len(stream['case_ids'])} records, {args.n} asked")
    by_id = {r.case_id: r for r in load_counterfact(Path(stream["data"]))}
    records = [by_id[c] for c in stream["case_ids"][: args.n]]

    model, tok = load_model()
    params = GateParams(layer=args.layer, margin=args.margin, strength=args.strength, guard=args.guard)
    # The gate sees the bare prompt and ROME's 10 context prefixes; δ the first `value_prefixes` of them.
    prefixes = context_prefixes(model, tok, fingerprint(model), resolve_hparams(model, "rome").prefixes)
    negatives = corpus_inputs(model, tok, params.layer, load_corpus().text, args.negatives)   # as served edits do

    run = args.out / (f"gated-L{args.layer}-m{args.margin:g}-s{args.strength:g}"
                      + (f"-g{args.guard:g}" if args.guard else ""))
    run.mkdir(parents=True, exist_ok=True)
    bank = GateBank(params.layer, model.config.hidden_size)
    done, rows, seconds, gates = 0, [], 0.0, []
    if (run / "state.json").exists():
        st = json.loads((run / "state.json").read_text())
        if st["stream"] != str(args.stream.resolve()):
            raise SystemExit(f"{run} was run on {st['stream']}")
        done, rows, seconds, gates = st["done"], st["rows"], st["seconds"], st["gates"]
        saved = torch.load(run / "bank.pt")
        if "K" not in saved and params.guard:
            raise SystemExit(f"{run}/bank.pt was saved without the subject inputs a guard needs (before session 33)")
        bank.G, bank.U, bank.V = saved["G"], saved["U"], saved["V"]
        bank.K = saved.get("K", bank.K)
        log.info("resumed at %d edits", done)

    print("| edits | ES | ES@ins | PS | NS ratio | held-out ppl | fluency | z>0 | |a| | cross | ES of crossed | s/edit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(_line(row), flush=True)
    for n in range(done + 1, args.n + 1):
        t = time.time()
        with bank.applied(model):
            neuron = gated_edit(model, tok, records[n - 1].request, prefixes, negatives, params, bank.K)
        bank.add(neuron)
        seconds += time.time() - t
        z = negatives @ neuron.g
        req = records[n - 1].request
        with bank.applied(model):
            nll = target_nll(model, tok, [req.text, req.text], [req.target_new, req.target_true or ""])
        gates.append({"open": float((z > 0).float().mean()), "a": float(neuron.activation(negatives).abs().mean()),
                      "held": bool(nll[0] < nll[1])})
        if n % args.every and n != args.n:
            continue
        with bank.applied(model):
            scores, per_record = checkpoint_scores(model, tok, records[:n], stream)
        crossed = _crossed(model, tok, bank, records[:n], params.layer)
        es_crossed = [per_record[i].es for i in crossed]
        row = {"n": n, **scores, "open": sum(g["open"] > 0 for g in gates) / n,
               "a": statistics.mean(g["a"] for g in gates), "es_ins": _mean_of(g.get("held") for g in gates),
               "cross": len(crossed) / n,
               "es_crossed": _mean_of(es_crossed), "s_per_edit": seconds / n}
        rows.append(row)
        print(_line(row), flush=True)
        torch.save({"G": bank.G, "U": bank.U, "V": bank.V, "K": bank.K}, run / "bank.tmp")
        (run / "bank.tmp").replace(run / "bank.pt")
        (run / "state.tmp").write_text(json.dumps({"stream": str(args.stream.resolve()), "done": n, "rows": rows,
                                                   "seconds": seconds, "gates": gates, "params": repr(params)}))
        (run / "state.tmp").replace(run / "state.json")
    return 0


def _crossed(model, tok, bank, records, layer: int, bound: float = 0.1) -> list[int]:
    """Indices i of the edits on whose prompt (the MLP inputs of `layer` at every token) a neuron other
    than their own (neuron i) has |a| > `bound`."""
    from editserve.editing.gated import mlp_inputs

    out = []
    for i, r in enumerate(records):
        ids = tok(r.request.prompt.format(r.request.subject), return_tensors="pt")["input_ids"]
        a = bank.activations(mlp_inputs(model, layer, ids)).abs()             # [T, E]
        a[:, i] = 0
        if float(a.max()) > bound:
            out.append(i)
    return out


def _mean_of(xs) -> float:
    """Mean of the values that are not None (a run resumed from a state saved before a measure existed)."""
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else float("nan")


def _line(r: dict) -> str:
    return (f"| {r['n']} | {r['es']:.3f} | {r.get('es_ins', float('nan')):.3f} | {r['ps']:.3f} | {r['ns_ratio']:.3f} | ×{r['ppl_ratio']:.4f} "
            f"| ×{r['fluency_ratio']:.3f} | {r['open']:.2f} | {r['a']:.1e} | {r['cross']:.3f} | {r['es_crossed']:.2f} "
            f"| {r['s_per_edit']:.1f} |")


if __name__ == "__main__":
    raise SystemExit(main())
