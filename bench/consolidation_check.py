"""What one automatic consolidation costs the sidecar against the number of committed facts N, on
SmolLM2-135M (what turning `EDITSERVE_CONSOLIDATE_EVERY` on by default spends; wave 2 session 26).

    PYTHONPATH=. .venv/bin/python bench/consolidation_check.py --data <counterfact json>
        [--facts 100,250,500,1000] [--every 25] [--threads 2]

A consolidation on the sidecar is (docs/ledger.md, "Consolidation"): the re-solve of the K patches
committed since the last one on every committed key at the five edited layers
(`editserve.editing.consolidate.consolidate_increment`), and the check, which scores facts with the
head's weights and again with the consolidated ones (`check_consolidation`: two passes of
`editserve.editing.retention.facts_hold`). Two checks, in one run: ``all`` scores every committed
fact (the check before wave 2 session 26) and ``sampled`` the K facts taken in plus at most
`HELD_CHECK_SAMPLE` (200) of the earlier consolidations' facts (now). Per N this prints the seconds
of each check (two scoring passes over real CounterFact facts — prompt, new and true targets — on
the real model), of the five re-solves (synthetic keys and factors of SmolLM2's shapes against an
anisotropic covariance: the solve's cost depends on the shapes, not the values), and each total
spread over the K edits a consolidation follows (what consolidating every K adds per edit). The
merges of the touched weights (two per check) are left out: milliseconds on this model.
"""

from __future__ import annotations

import argparse
import time

import torch

from editserve.editing import load_model
from editserve.editing.consolidate import ConsolidateParams, consolidate_increment
from editserve.editing.counterfact import load_counterfact
from editserve.editing.retention import CommittedFact, facts_hold
from editserve.ledger.consolidation import HELD_CHECK_SAMPLE

D_OUT, D_IN = 576, 1536
LAYERS = (1, 2, 3, 4, 5)


def resolve_seconds(n_keys: int, every: int, cov: torch.Tensor, g: torch.Generator) -> float:
    """Seconds of the five layers' incremental re-solves: `every` new rank-1 updates on `n_keys` keys."""
    keys = torch.randn(D_IN, n_keys, generator=g)
    u, v = torch.randn(D_OUT, every, generator=g) * 0.01, torch.randn(D_IN, every, generator=g)
    t0 = time.perf_counter()
    for layer in LAYERS:
        consolidate_increment(u, v, keys, cov, layer, ConsolidateParams())
    return time.perf_counter() - t0


def check_seconds(model: torch.nn.Module, tok: object, facts: list[CommittedFact]) -> float:
    """Seconds of a check's two scoring passes over `facts` (before and after: the same work twice)."""
    t0 = time.perf_counter()
    facts_hold(model, tok, facts)
    facts_hold(model, tok, facts)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="CounterFact-format JSON (prompts, subjects, new and true targets)")
    ap.add_argument("--facts", default="100,250,500,1000", help="comma-separated numbers of committed facts")
    ap.add_argument("--every", type=int, default=25, help="K: edits between consolidations")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.facts.split(",")]
    records = load_counterfact(args.data, limit=max(sizes))
    if len(records) < max(sizes):
        raise SystemExit(f"{args.data} holds {len(records)} records, fewer than {max(sizes)}")
    facts = [CommittedFact(version=i + 1, prompt=r.request.text, subject=r.request.subject,
                           target_new=r.request.target_new, target_true=r.request.target_true or "")
             for i, r in enumerate(records)]
    model, tok = load_model()
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64) * torch.logspace(-2, 0, D_IN, dtype=torch.float64)
    sample = torch.randn(20000, D_IN, generator=g, dtype=torch.float64) @ mix.T
    cov = sample.T @ sample / sample.shape[0]
    facts_hold(model, tok, facts[:8])                                    # warm-up
    print(f"one automatic consolidation on SmolLM2-135M, CPU, {args.threads} thread(s), K = {args.every}, "
          f"held sample {HELD_CHECK_SAMPLE}")
    print(f"{'facts N':>8} | {'re-solve s':>10} | {'all: check s':>12} {'per edit s':>10} | "
          f"{'sampled: facts':>14} {'check s':>8} {'per edit s':>10}")
    for n in sizes:
        solve = resolve_seconds(n, args.every, cov, g)
        every = check_seconds(model, tok, facts[:n])
        held = max(0, n - args.every)
        scored = facts[:min(held, HELD_CHECK_SAMPLE)] + facts[held:n]     # the sample, then the K taken in
        sampled = check_seconds(model, tok, scored)
        print(f"{n:>8} | {solve:>10.2f} | {every:>12.2f} {(every + solve) / args.every:>10.3f} | "
              f"{len(scored):>14} {sampled:>8.2f} {(sampled + solve) / args.every:>10.3f}")


if __name__ == "__main__":
    main()
