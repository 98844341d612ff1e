"""Ledger disk against the number of edits when the ledger is consolidated every K edits
(`EDITSERVE_CONSOLIDATE_EVERY`), on SmolLM2-135M's shapes: five 576×1536 down-projections, each edit
a rank-1 patch on all five with one preserved key per layer (AlphaEdit's mean-key default).

    PYTHONPATH=. .venv/bin/python bench/consolidation_disk.py [--edits 1000] [--every 25]
        [--report 250] [--threads 1] [--modes incremental,whole]

Two modes, one table each, in one run: ``incremental`` (the ledger's consolidation since wave 2
session 25: only the patches committed since the last consolidation are re-solved, on every
committed key; earlier consolidated patches stay as they are) and ``whole`` (every consolidation
takes the previous one in and re-solves everything — what the ledger did before, and what
``editserve ledger consolidate --whole`` still does). Per checkpoint it prints the bytes the ledger
holds (`Ledger.nbytes`: database and blobs), the preserved-keys state as stored (every patch's key
blob: one block per layer per edit, and one reference per consolidation, `editserve.ledger.keystate`),
what the consolidations' states would take copied (how the ledger stored them before wave 2 session
24), the consolidated patches' factors, and the largest factor rank of the last consolidated patch;
at the end, the key state a revert of one fact out of its consolidation stores (a reference since
wave 2 session 27; a copy of the kept keys before), and how long a fresh open takes to read the
head's preserved keys back through the references. Synthetic data: random keys and factors, an anisotropic covariance per layer;
consolidation's solve is the real one (`plan_consolidation`), so the factor sizes are what a ledger
would store.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time

import torch

from editserve.editing.alphaedit import PreservedKeys
from editserve.editing.requests import EditRequest
from editserve.ledger import Ledger
from editserve.ledger.consolidation import CONSOLIDATED_METHOD, plan_consolidation, plan_fact_removal
from editserve.ledger.keystate import state_bytes
from editserve.patches import Patch, WeightDelta

D_OUT, D_IN = 576, 1536
LAYERS = (1, 2, 3, 4, 5)
FP = hashlib.sha256(b"consolidation disk benchmark").hexdigest()


def name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.down_proj.weight"


def covariances(layers) -> dict[int, torch.Tensor]:
    out = {}
    for layer in layers:
        g = torch.Generator().manual_seed(100 + layer)
        x = torch.randn(D_IN, 2 * D_IN, generator=g, dtype=torch.float64) * torch.linspace(0.05, 2.0, D_IN,
                                                                                          dtype=torch.float64)[:, None]
        out[layer] = x @ x.T / x.shape[1]
    return out


def edit(i: int) -> tuple[Patch, PreservedKeys]:
    g = torch.Generator().manual_seed(i)
    deltas = tuple(WeightDelta(name=name(layer), layer=layer, u=torch.randn(D_OUT, 1, generator=g) * 0.01,
                               v=torch.randn(D_IN, 1, generator=g)) for layer in LAYERS)
    req = EditRequest(prompt="{} is located in the city of", subject=f"Landmark {i}", target_new=" Rome")
    patch = Patch(deltas=deltas, requests=(req,), method="alphaedit", hparams={"seed": i}, model_fingerprint=FP,
                  family="llama")
    keys = PreservedKeys()
    for layer in LAYERS:
        keys = keys.add(patch.digest, layer, torch.randn(D_IN, 1, generator=g))
    return patch, keys


def measure(ledger: Ledger) -> dict[str, int]:
    patches = ledger.store.patches()
    states = ledger.store.patch_states([p.digest for p in patches])
    consolidated = [p for p in patches if p.manifest.get("method") == CONSOLIDATED_METHOD]
    return {
        "total": ledger.nbytes(),
        "keys": sum(s.blob_size for s in states.values()),
        "keys_of_consolidations": sum(states[p.digest].blob_size for p in consolidated if p.digest in states),
        "copies_would_be": sum(len(state_bytes(ledger.patch_keys(p.digest))) for p in consolidated),
        "factors_of_consolidations": sum(p.blob_size for p in consolidated),
    }


def run(edits: int, every: int, report: int, whole: bool) -> None:
    mib = 1024 * 1024
    mode = "whole" if whole else "incremental"
    print(f"\n{mode}: {edits} edits on {len(LAYERS)} layers of {D_OUT}x{D_IN}, consolidated every {every}; MiB")
    print("| edits | consolidations | ledger total | key state stored | of which consolidations' | "
          "consolidations' keys if copied | consolidations' factors | last one's rank | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = {name(layer): torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(layer)) for layer in LAYERS}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, Ledger.open(f"{tmp}/ledger", FP, create=True) as ledger:
        n_cons, rank = 0, 0
        for i in range(1, edits + 1):
            patch, keys = edit(i)
            ledger.commit(patch, expected_head=ledger.head(), base=base if i == 1 else None, preserved=keys)
            if i % every == 0:
                plan = plan_consolidation(ledger, covariances, whole=whole)
                ledger.consolidate(plan, caller="bench")
                n_cons, rank = n_cons + 1, max(d.u.shape[1] for d in plan.patch.deltas)
            if i % report == 0:
                m = measure(ledger)
                print(f"| {i} | {n_cons} | {m['total'] / mib:.1f} | {m['keys'] / mib:.2f} | "
                      f"{m['keys_of_consolidations'] / mib:.3f} | {m['copies_would_be'] / mib:.1f} | "
                      f"{m['factors_of_consolidations'] / mib:.1f} | {rank} | {time.perf_counter() - t0:.0f} |",
                      flush=True)
        if n_cons:
            # one fact out of the consolidation that holds edit 1 (version 1): the revert's key state
            t_rev = time.perf_counter()
            removal = plan_fact_removal(ledger, covariances, 1)
            ledger.revert_consolidated(removal, caller="bench")
            rec = ledger.store.patch_states([removal.patch.digest])[removal.patch.digest]
            print(f"{mode}: a revert of edit 1 out of the consolidation holding it ({len(removal.patch.requests)} "
                  f"facts stay) stores {rec.blob_size} B of key state; a copy would be "
                  f"{len(state_bytes(removal.keys)) / mib:.2f} MiB ({time.perf_counter() - t_rev:.1f} s)")
        head = ledger.head()
        ledger.close()
        t1 = time.perf_counter()
        with Ledger.open(f"{tmp}/ledger", FP, verify="none") as cold:
            state = cold.preserved_keys(head)
            t2 = time.perf_counter()
        print(f"{mode}: a fresh open reads the head's preserved keys ({state.n_keys(LAYERS[0])} keys per layer, "
              f"{n_cons} consolidations) in {t2 - t1:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--every", type=int, default=25, help="consolidate after every K edits")
    ap.add_argument("--report", type=int, default=250, help="print a row every R edits")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="incremental,whole", help="comma-separated: incremental, whole")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("incremental", "whole")]
    if bad or not modes:
        ap.error(f"--modes takes incremental and/or whole, got {args.modes!r}")
    torch.set_num_threads(args.threads)
    for mode in modes:
        run(args.edits, args.every, args.report, whole=mode == "whole")


if __name__ == "__main__":
    main()
