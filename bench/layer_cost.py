"""Where in the network a fact is cheapest to write: per layer, what the key statistics say an edit costs.

For one edit at layer l with key k (the subject's last token, input of the MLP down-projection) and
statistics C = E[x xᵀ] over ordinary text, the update that writes an output change r at k while moving
ordinary text least, min E‖ΔW x‖² subject to ΔW k = r, is ΔW = r kᵀC⁻¹ / (kᵀC⁻¹k), and it costs

    E‖ΔW x‖² = ‖r‖² / (kᵀC⁻¹k)

so kᵀC⁻¹k (how far the subject's key stands out from ordinary text) is the layer's price per unit written:
higher is cheaper. MEMIT's spread over a range adds these up (the cheapest split of r costs ‖r‖² / Σ_l kᵀC⁻¹k).
Also printed: ‖k‖², tr C, how many of C's eigen-directions lie below AlphaEdit's threshold (the null space it
may write in) and the share of ‖k‖² left in it (‖Pk‖²/‖k‖²) — what AlphaEdit's projection leaves the edit.

Keys are the prefix-free subject keys of the first `--records` records of a CounterFact file on the unedited
model; statistics from the default corpus (computed and cached on first use, about 15 s per layer here).

    PYTHONPATH=$PWD python bench/layer_cost.py --layers 0-19 --records 40 \
        --data ../shared/data/counterfact/counterfact-train.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "counterfact" / "counterfact-train.json"
log = logging.getLogger("layer_cost")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0-19")
    ap.add_argument("--records", type=int, default=40)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--threshold", type=float, default=0.01, help="AlphaEdit's eigenvalue threshold")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from editserve.editing.corpus import default_corpus
    from editserve.editing.counterfact import load_counterfact
    from editserve.editing.keys import compute_keys
    from editserve.editing.model import fingerprint, load_model
    from editserve.editing.nullspace import null_space
    from editserve.editing.stats import layer_stats
    from editserve.engine.plugin import parse_layers              # "0-19" / "1,3,5-7", as EDITSERVE_EDITABLE_LAYERS

    model, tok = load_model()
    layers = sorted(parse_layers(args.layers) or range(model.config.num_hidden_layers))
    stats, _ = layer_stats(model, tok, layers, default_corpus(), fingerprint(model), progress=False)
    reqs = [r.request for r in load_counterfact(args.data, limit=args.records)]
    keys = compute_keys(model, tok, reqs, prefixes=[], layers=layers).keys          # layer -> [n, d_in]

    print(f"{len(reqs)} subjects of {args.data.name}; medians over subjects")
    print("| layer | ‖k‖² | kᵀC⁻¹k (price⁻¹) | tr C | null-space directions (t) | ‖Pk‖²/‖k‖² |")
    print("|---|---|---|---|---|---|")
    for layer in layers:
        c = stats[layer].cov.to(torch.float64)                                     # [d_in, d_in]
        k = keys[layer].to(torch.float64)                                           # [n, d_in]
        ev, q = torch.linalg.eigh(c)
        ridge = 1e-3 * float(ev.mean())                                             # C is near-singular at some layers
        c_inv = q @ torch.diag(1.0 / (ev.clamp_min(0) + ridge)) @ q.T
        price_inv = ((k @ c_inv) * k).sum(1)                                        # [n] kᵀC⁻¹k
        kk = (k * k).sum(1)                                                         # [n]
        proj = null_space(stats[layer].cov, args.threshold, layer)
        pk = ((k @ proj.p.to(torch.float64)) * k).sum(1)                            # [n] ‖Pk‖²
        print(f"| {layer} | {kk.median():.1f} | {price_inv.median():.0f} | {float(ev.sum()):.1f} | "
              f"{proj.kept} of {c.shape[0]} ({args.threshold:g}) | {(pk / kk).median():.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
