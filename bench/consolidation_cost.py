"""Consolidation cost against the number of committed keys, on one 576x1536 layer (SmolLM2-135M's
down_proj): the N×N closed form (before wave 2 session 10) against the solve on a basis of the
keys' range (`editserve.editing.consolidate.consolidate_layer`, now), in one run.

    PYTHONPATH=. .venv/bin/python bench/consolidation_cost.py [--keys 10,100,1000,3000,10000]
        [--closed-form-max 3000] [--threads 1]

Per N: seconds of each solve, the rank and size of the factors each returns, and how far each moves
the committed keys' outputs (‖ΔW* K − ΔW K‖ / ‖ΔW K‖; 0 is exact). Synthetic data with the
layer's shape: an anisotropic covariance from 20,000 random keys, committed keys drawn from it,
an accumulated update with random factors of rank N. The closed form is skipped above
--closed-form-max keys (its N×N system is O(N³) time and 8·N² bytes).
"""

from __future__ import annotations

import argparse
import time

import torch

from editserve.editing.consolidate import ConsolidateParams, consolidate_layer

D_OUT, D_IN = 576, 1536


def closed_form(delta: torch.Tensor, keys: torch.Tensor, cov: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-session-10 solve: U = ΔW K [d_out, N], V = A⁻¹K (KᵀA⁻¹K + jitter)⁻¹ [d_in, N], and the
    penalties before and after that `consolidate_layer` reports (so both columns time the same work)."""
    a = cov + ridge * float(torch.trace(cov)) / D_IN * torch.eye(D_IN, dtype=torch.float64)
    a_inv_k = torch.linalg.solve(a, keys)
    g = keys.T @ a_inv_k
    g = g + 1e-10 * float(torch.trace(g)) / g.shape[0] * torch.eye(g.shape[0], dtype=torch.float64)
    u, v = delta @ keys, torch.linalg.solve(g, a_inv_k.T).T
    new = u @ v.T
    float(torch.trace(delta @ a @ delta.T)), float(torch.trace(new @ a @ new.T))
    return u.float(), v.float()


def kept(u: torch.Tensor, v: torch.Tensor, delta: torch.Tensor, keys: torch.Tensor) -> float:
    want = delta @ keys
    return float((u.double() @ (v.double().T @ keys) - want).norm() / want.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", default="10,100,1000,3000,10000", help="comma-separated numbers of committed keys")
    ap.add_argument("--closed-form-max", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64) * torch.logspace(-2, 0, D_IN, dtype=torch.float64)
    sample = torch.randn(20000, D_IN, generator=g, dtype=torch.float64) @ mix.T          # [20000, d_in]
    cov = sample.T @ sample / sample.shape[0]
    ridge = ConsolidateParams().ridge
    dense_mb = D_OUT * D_IN * 4 / 2**20
    print(f"consolidation of one {D_OUT}x{D_IN} layer, {args.threads} thread(s); dense float32 matrix {dense_mb:.2f} MB")
    head = (f"{'keys N':>7} | {'closed form s':>13} {'rank':>6} {'MB':>7} {'kept err':>9} | "
            f"{'basis s':>8} {'rank':>5} {'MB':>6} {'kept err':>9}")
    print(head)
    print("-" * len(head))
    for n in (int(x) for x in args.keys.split(",")):
        keys = sample[torch.randint(0, sample.shape[0], (n,), generator=g)].T.contiguous()  # [d_in, N]
        delta = (torch.randn(D_OUT, n, generator=g, dtype=torch.float64)
                 @ torch.randn(n, D_IN, generator=g, dtype=torch.float64)) / n ** 0.5 * 1e-2
        if n <= args.closed_form_max:
            t = time.perf_counter()
            u, v = closed_form(delta, keys, cov, ridge)
            cf = (f"{time.perf_counter() - t:>13.2f} {u.shape[1]:>6} {(u.numel() + v.numel()) * 4 / 2**20:>7.2f} "
                  f"{kept(u, v, delta, keys):>9.1e}")
        else:
            cf = f"{'skipped':>13} {'':>6} {(D_OUT + D_IN) * n * 4 / 2**20:>7.2f} {'':>9}"
        t = time.perf_counter()
        r = consolidate_layer(delta, keys, cov, layer=0)
        basis = (f"{time.perf_counter() - t:>8.2f} {r.u.shape[1]:>5} {(r.u.numel() + r.v.numel()) * 4 / 2**20:>6.2f} "
                 f"{kept(r.u, r.v, delta, keys):>9.1e}")
        print(f"{n:>7} | {cf} | {basis}", flush=True)


if __name__ == "__main__":
    main()
