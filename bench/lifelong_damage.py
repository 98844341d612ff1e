"""Where the held-out perplexity damage of a sequential run sits (issue 16; docs/lifelong.md, session 6).

Reads the edited down-projections a `bench/lifelong.py` run saved (``<out>/<method>-b<batch>/weights.safetensors``)
and, on the unedited SmolLM2 with those weights put back, prints three tables:

1. per edited layer: held-out perplexity with only that layer's ΔW (the others at W₀), with every layer's
   but that one, and ‖ΔW‖/‖W₀‖;
2. the first position of every window (the attention sink, whose MLP keys are 10–25× larger at layers 1–2)
   computed with W₀ instead of W: whether the damage goes through it;
3. per edited layer: the share of the down-projection's output energy that ΔW changes on the held-out text's
   keys, ‖ΔW k‖² / ‖W₀ k‖² summed over its tokens (position 0 left out), against the same ratio under the
   statistics covariance C the solve penalises, tr(ΔW C ΔWᵀ) / tr(W₀ C W₀ᵀ).

    PYTHONPATH=$PWD python bench/lifelong_damage.py /work/lifelong-s4/alphaedit-b1/weights.safetensors

About a minute and a half on one core (fourteen held-out perplexity passes and one statistics load, cached
after the first run).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger("lifelong_damage")


@contextmanager
def first_positions_on(model: torch.nn.Module, base: dict[str, torch.Tensor], keep_first: bool) -> Iterator[None]:
    """Within the block, each edited down-projection computes position 0 (`keep_first` False: positions ≥ 1)
    of every sequence with its base weight: hooks on the modules, always removed."""
    mods = dict(model.named_modules())

    def hook_for(name: str) -> Callable:
        w0 = base[name]

        def hook(mod: torch.nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            x, out = inp[0], out.clone()                                   # x [B, T, d_in], out [B, T, d_out]
            sel = slice(0, 1) if keep_first else slice(1, None)
            out[:, sel] = torch.nn.functional.linear(x[:, sel], w0)
            return out
        return hook

    handles = [mods[n.removesuffix(".weight")].register_forward_hook(hook_for(n)) for n in base]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def main() -> None:
    from safetensors.torch import load_file

    from editserve.editing import load_model
    from editserve.editing.corpus import load_corpus
    from editserve.editing.edit import resolve_hparams
    from editserve.editing.lifelong import HELDOUT_TEXT, heldout_perplexity
    from editserve.editing.model import fingerprint
    from editserve.editing.stats import layer_stats

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", type=Path, help="a run's weights.safetensors (edited down-projections)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    model, tok = load_model()
    params = dict(model.named_parameters())
    edited = {n: t.float() for n, t in load_file(str(args.weights)).items()}
    unknown = sorted(set(edited) - set(params))
    if unknown:
        raise SystemExit(f"{args.weights} holds weights this model lacks: {unknown[:3]}")
    base = {n: params[n].detach().clone() for n in edited}
    layer_of = {n: int(n.split(".")[2]) for n in edited}

    def put(names: set[str]) -> None:
        with torch.no_grad():
            for n in edited:
                params[n].copy_(edited[n] if n in names else base[n])

    p0 = heldout_perplexity(model, tok)
    put(set(edited))
    p_all = heldout_perplexity(model, tok) / p0
    print(f"held-out perplexity: unedited {p0:.3f}; edited ×{p_all:.4f}\n")
    print("| layer | only this layer's ΔW | every layer's but this | ‖ΔW‖/‖W₀‖ |\n|---|---|---|---|")
    for n in edited:
        put({n})
        only = heldout_perplexity(model, tok) / p0
        put(set(edited) - {n})
        without = heldout_perplexity(model, tok) / p0
        rel = float((edited[n].double() - base[n].double()).norm() / base[n].double().norm())
        print(f"| {layer_of[n]} | ×{only:.4f} | ×{without:.4f} | {rel:.3f} |")

    put(set(edited))
    with first_positions_on(model, base, keep_first=True):
        first_base = heldout_perplexity(model, tok) / p0
    with first_positions_on(model, base, keep_first=False):
        first_only = heldout_perplexity(model, tok) / p0
    print(f"\nposition 0 of every window on W₀, the rest edited: ×{first_base:.4f}; "
          f"only position 0 edited: ×{first_only:.4f}\n")

    corpus = load_corpus(None)
    hp = resolve_hparams(model, "alphaedit", sorted(set(layer_of.values())), None)
    put(set())
    stats, _ = layer_stats(model, tok, hp.layers, corpus, fingerprint(model), hp.stats)
    mods = dict(model.named_modules())
    keys: dict[str, list[torch.Tensor]] = {n: [] for n in edited}
    handles = [mods[n.removesuffix(".weight")].register_forward_hook(
        lambda m, i, o, n=n: keys[n].append(i[0][0, 1:].detach().double())) for n in edited]
    ids = tok(HELDOUT_TEXT.read_text(), add_special_tokens=False)["input_ids"]
    try:
        with torch.no_grad():
            for s in range(0, len(ids) - 1, 256):                       # the windows heldout_perplexity uses
                model(input_ids=torch.tensor(ids[s:s + 256])[None])
    finally:
        for h in handles:
            h.remove()
    print("| layer | held-out ‖ΔW k‖²/‖W₀ k‖² | statistics tr(ΔW C ΔWᵀ)/tr(W₀ C W₀ᵀ) | ‖ΔW‖²/‖W₀‖² |\n|---|---|---|---|")
    for n in edited:
        w0, d = base[n].double(), edited[n].double() - base[n].double()
        k = torch.cat(keys[n])                                           # [T, d_in] held-out keys
        c = stats[layer_of[n]].cov.double()
        held = float((k @ d.T).pow(2).sum() / (k @ w0.T).pow(2).sum())
        stat = float(torch.trace(d @ c @ d.T) / torch.trace(w0 @ c @ w0.T))
        print(f"| {layer_of[n]} | {held:.4f} | {stat:.4f} | {float(d.pow(2).sum() / w0.pow(2).sum()):.4f} |")


if __name__ == "__main__":
    main()
