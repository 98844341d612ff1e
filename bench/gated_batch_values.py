"""Would a batch of gated edits be faster with its values optimised together? (docs/lifelong.md,
session 39.)

A gated commit of k facts (editing/edit._gated) computes its neurons one after another, each with the
batch's earlier neurons in place, so a batch costs k single edits; the value optimisation
(editing/values.optimise_values) is about 95 % of a gated edit. This fits the gates of k records, then
times their values both ways, on the same gates and prompt scales:

- one request at a time, as a gated commit does (without the earlier neurons, to isolate the batching);
- all k in one ``optimise_values`` call (one chunk of k requests, MEMIT's way);

and prints seconds per edit, steps, the cosine between the two δ of each record and the mean final NLL.

    PYTHONPATH=$PWD python bench/gated_batch_values.py --n 8

Default data: counterfact-train (the tuning split), records 1..n. Set OMP_NUM_THREADS to compare machines.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/lifelong.py, also under `python -m`
from lifelong import SHARED  # noqa: E402  (the shared CounterFact files)

TRAIN = SHARED.parent / "counterfact-train.json"
log = logging.getLogger("bench.gated_batch_values")


def main() -> int:
    from editserve.editing import load_model
    from editserve.editing.arch import spec_for
    from editserve.editing.corpus import load_corpus
    from editserve.editing.counterfact import load_counterfact
    from editserve.editing.edit import resolve_hparams
    from editserve.editing.gated import cached_corpus_inputs, fit_gate, subject_inputs, up_weights
    from editserve.editing.model import fingerprint
    from editserve.editing.prefixes import context_prefixes
    from editserve.editing.slots import widen_mlp
    from editserve.editing.values import optimise_values

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8, help="records (and the batch size)")
    ap.add_argument("--data", type=Path, default=TRAIN, help="CounterFact JSON (default counterfact-train)")
    ap.add_argument("--slots", type=int, default=2048, help="neuron slots at the gate layer, as the batch run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.n < 1:
        ap.error(f"--n must be at least 1, got {args.n}")
    if not args.data.is_file():
        ap.error(f"no CounterFact file at {args.data}")

    torch.manual_seed(0)
    model, tok = load_model()
    hp = resolve_hparams(model, "gated")
    widen_mlp(model, hp.layer, args.slots)
    corpus = load_corpus(None)
    reqs = [r.request for r in load_counterfact(args.data)[1:args.n + 1]]
    negatives = cached_corpus_inputs(model, tok, hp.layer, corpus.fingerprint, corpus.text, hp.negatives)
    prefixes = context_prefixes(model, tok, fingerprint(model), hp.prefixes)
    n_val = min(hp.value_prefixes, len(prefixes))
    value = replace(hp.value, clamp_norm_factor=hp.value.clamp_norm_factor / hp.strength)   # as gated_edit
    scales = []                                                             # [1, 1 + n_val] per record
    for r in reqs:
        pos = subject_inputs(model, tok, r, prefixes, hp.layer)
        _, a = up_weights(fit_gate(pos, negatives, hp), pos)
        scales.append(hp.strength * a[None, : 1 + n_val])
    module = spec_for(model).layer_name(hp.layer)
    kw = {"frozen_below": hp.layer}

    t = time.perf_counter()
    one = [optimise_values(model, tok, [r], list(prefixes[:n_val]), module, value, prompt_scales=s, **kw)
           for r, s in zip(reqs, scales)]
    t_one = time.perf_counter() - t
    t = time.perf_counter()
    many = optimise_values(model, tok, reqs, list(prefixes[:n_val]), module, value, prompt_scales=torch.cat(scales),
                           chunk_size=len(reqs), **kw)
    t_many = time.perf_counter() - t

    cos = torch.nn.functional.cosine_similarity(torch.cat([o.delta for o in one]), many.delta, dim=-1)   # [n]
    print(f"{len(reqs)} records of {args.data.name}, {torch.get_num_threads()} thread(s)\n")
    print("| values | s/edit | steps | mean final NLL |")
    print("|---|---|---|---|")
    print(f"| one at a time | {t_one / len(reqs):.2f} | {min(o.steps for o in one)}–{max(o.steps for o in one)} | "
          f"{float(torch.cat([o.final_nll for o in one]).mean()):.3f} |")
    print(f"| one batch | {t_many / len(reqs):.2f} | {many.steps} | {float(many.final_nll.mean()):.3f} |")
    print(f"\nbatched / one at a time: ×{t_many / t_one:.2f} the time; cos(δ one, δ batched) min {float(cos.min()):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
