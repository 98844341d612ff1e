"""What the committed edits of a saved `bench/lifelong.py` run cost ordinary text, edit by edit.

At each edited layer, with K the run's preserved keys (one column per committed edit), V = (W − W₀)K
what the edits need there and A the layer's statistics with the consolidation's ridge, the least
penalty any update keeping those outputs can have is tr(V G⁻¹ Vᵀ), G = KᵀA⁻¹K: what a consolidation
leaves (`editing.consolidate.consolidate_layer`). This prints, per layer and summed:

- the run's accumulated penalty tr(ΔW A ΔWᵀ) and that least penalty, also for the first n edits
  (how the floor grows with the ledger: per edit, flat or rising);
- how the least penalty is shared among the edits (`editing.consolidate.edit_prices`: what dropping
  each edit alone would save): the share of the costliest 5 % / 10 % / 20 % and max / median — could
  refusing a few costly edits buy much?;
- the floor across layers (`consolidate_across_layers`: the summed output kept, split at the least
  total penalty).

    PYTHONPATH=$PWD python bench/edit_prices.py <out>/alphaedit-b1 [--firsts 25,50,100]

The state is a folder `bench/lifelong.py` wrote (weights.safetensors, preserved.safetensors,
state.json). One thread, about a minute for 200 edits (the statistics must be cached, i.e. the run
was made on this machine).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/lifelong.py, also under `python -m`

from lifelong import load_run  # noqa: E402  (bench/lifelong.py: a run's saved state)

from editserve.editing import load_model  # noqa: E402
from editserve.editing.consolidate import (  # noqa: E402
    ConsolidateParams,
    consolidate_across_layers,
    consolidate_layer,
    edit_prices,
)
from editserve.editing.corpus import load_corpus  # noqa: E402
from editserve.editing.lifelong import consolidation_covariances, down_proj_weights  # noqa: E402


def _shares(marginal: torch.Tensor) -> str:
    m = sorted((float(x) for x in marginal), reverse=True)
    total, n = sum(m), len(m)
    tops = [sum(m[:max(1, n * pct // 100)]) / total for pct in (5, 10, 20)]
    return " / ".join(f"{t:.2f}" for t in tops) + f" | {m[0] / statistics.median(m):.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run folder of bench/lifelong.py (…/alphaedit-b1)")
    ap.add_argument("--firsts", default="", help="comma-separated n: the least penalty of the first n edits too")
    ap.add_argument("--ridge", type=float, default=ConsolidateParams().ridge)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    params = ConsolidateParams(ridge=args.ridge)

    model, tok = load_model()
    w0 = down_proj_weights(model)
    done, _, _, _, preserved = load_run(Path(args.run), model)
    w = down_proj_weights(model)
    layers = list(preserved.layers)
    covs = consolidation_covariances(model, tok, layers, load_corpus(None))
    firsts = [int(x) for x in args.firsts.split(",") if x]

    deltas, keys = {}, {}
    print(f"{done} committed edits, {args.run}")
    print("| layer | keys | accumulated penalty | least penalty | per key | "
          + "".join(f"first {n}: per key | " for n in firsts)
          + "costliest 5 % / 10 % / 20 % of keys: share | max / median |")
    print("|---|---|---|---|---|" + "---|" * len(firsts) + "---|---|")
    sums = {"acc": 0.0, "least": 0.0, **{n: 0.0 for n in firsts}}
    for layer in layers:
        k = preserved.keys(layer)
        d = (w[layer].double() - w0[layer].double())
        if d.shape[1] != k.shape[0]:
            d = d.T                                                        # to [d_out, d_in]
        deltas[layer], keys[layer] = d, k
        full = consolidate_layer(d, k, covs[layer], layer, params)
        prices = edit_prices(d, k, covs[layer], layer, params)
        n_keys = int(k.shape[1])
        row = [str(layer), str(n_keys), f"{full.penalty_before:.3g}", f"{full.penalty_after:.3g}",
               f"{full.penalty_after / n_keys:.3g}"]
        sums["acc"] += full.penalty_before
        sums["least"] += full.penalty_after
        for n in firsts:
            part = consolidate_layer(d, k[:, :n], covs[layer], layer, params).penalty_after
            sums[n] += part
            row.append(f"{part / min(n, n_keys):.3g}")
        row.append(_shares(prices.marginal))
        print("| " + " | ".join(row) + " |")
    print("| all | | " + f"{sums['acc']:.3g} | {sums['least']:.3g} | | "
          + "".join(f"{sums[n]:.3g} in all | " for n in firsts) + " | |")
    widths = {int(k.shape[1]) for k in keys.values()}
    if len(widths) == 1:
        edit_keys = preserved.edit_keys(layers)
        across = consolidate_across_layers(deltas, edit_keys, covs, params)
        floor = sum(r.penalty_after for r in across.values())
        print(f"\nacross layers (summed output kept): least penalty {floor:.3g}, "
              f"{floor / sums['least']:.3f} of the per-layer floor")
    else:
        print(f"\nacross layers: skipped, the layers hold different numbers of keys {sorted(widths)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
