"""Ledger benchmark: commit latency, materialisation time for 1/100/1000 active patches on one
576x1536 layer (SmolLM2-135M's down_proj shape), rollback latency, open+integrity time and
ledger bytes per patch.

    .venv/bin/python bench/ledger_bench.py [--patches 1000] [--rank 1] [--root DIR]

Patches are rank-`rank` float32 factors (a ROME edit is rank 1) with random values; the ledger
is a real SQLite (WAL, synchronous=FULL) file with fsynced blobs on the local disk.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from editserve.editing.arch import Layout
from editserve.editing.requests import EditRequest
from editserve.ledger import Ledger
from editserve.patches import Patch, WeightDelta, materialize

D_OUT, D_IN = 576, 1536
NAME = "model.layers.5.mlp.down_proj.weight"
FP = hashlib.sha256(b"ledger bench").hexdigest()


def make_patch(i: int, rank: int) -> Patch:
    g = torch.Generator().manual_seed(i)
    d = WeightDelta(name=NAME, layer=5, u=torch.randn(D_OUT, rank, generator=g) * 1e-3,
                    v=torch.randn(D_IN, rank, generator=g))
    req = EditRequest(prompt="{} is located in the city of", subject=f"Landmark number {i}", target_new=" Rome")
    return Patch(deltas=(d,), requests=(req,), method="rome", hparams={"layer": 5, "value": {"max_steps": 25}},
                 model_fingerprint=FP, family="llama")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f} ms"


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=1000)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--root", default=None, help="ledger directory (default: a temporary one)")
    args = ap.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="ledger-bench-"))
    base = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(0))
    patches = [make_patch(i, args.rank) for i in range(1, args.patches + 1)]

    ledger = Ledger.open(root / "ledger", model_fingerprint=FP)
    ledger.ensure_base(NAME, base, Layout.OUT_IN)
    bytes0 = ledger.nbytes()
    disk0 = sum(f.stat().st_blocks * 512 for f in (root / "ledger").rglob("*") if f.is_file())
    commit_s = []
    for p in patches:
        t = time.perf_counter()
        ledger.commit(p, ledger.head(), caller="bench", probe_report={"efficacy": 1.0})
        commit_s.append(time.perf_counter() - t)
    ledger.close()
    ledger = Ledger.open(root / "ledger", model_fingerprint=FP, verify="none")   # checkpoint the WAL on reopen
    per_patch = (ledger.nbytes() - bytes0) / len(patches)
    blob_bytes = sum(ledger.store.patch(p.digest).blob_size for p in patches[:50]) / 50
    db_bytes = ledger.store.nbytes()
    disk_bytes = sum(f.stat().st_blocks * 512 for f in (root / "ledger").rglob("*") if f.is_file())
    ledger.close()

    t = time.perf_counter()
    ledger = Ledger.open(root / "ledger", model_fingerprint=FP)
    open_full = time.perf_counter() - t

    rows = []
    counts = [c for c in (1, 100, 1000) if c <= args.patches]
    for n in counts:
        cold = []
        for _ in range(args.repeat):
            fresh = Ledger.open(root / "ledger", model_fingerprint=FP, verify="none")
            t = time.perf_counter()
            fresh.materialize(n)
            cold.append(time.perf_counter() - t)
            fresh.close()
        ledger.materialize(n)                                     # warm the patch cache
        warm = timed(lambda: ledger.materialize(n), args.repeat)
        deltas = [d for p in ledger.active_patches(n) for d in p.deltas]
        pure = timed(lambda: materialize(base, deltas, Layout.OUT_IN), args.repeat)
        rows.append((n, statistics.median(cold), statistics.median(warm), statistics.median(pure)))
    a = ledger.materialize(args.patches)[NAME]
    b = ledger.materialize(args.patches)[NAME]
    reproducible = torch.equal(a, b) and torch.equal(ledger.materialize(0)[NAME], base)

    head = ledger.head()
    rollback_s = []
    for target in (0, head) * args.repeat:
        t = time.perf_counter()
        ledger.rollback(target, caller="bench")
        rollback_s.append(time.perf_counter() - t)
    ledger.close()

    in_order = list(commit_s)
    commit_s.sort()
    print(f"ledger benchmark: {len(patches)} rank-{args.rank} patches on one {D_OUT}x{D_IN} float32 layer, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, ledger at {root}")
    print()
    print("commit latency (blobs fsynced + SQLite WAL synchronous=FULL transaction)")
    print(f"  median {ms(statistics.median(commit_s))}   p95 {ms(commit_s[int(0.95 * len(commit_s)) - 1])}   "
          f"max {ms(commit_s[-1])}")
    print(f"  median of the first 100 {ms(statistics.median(in_order[:100]))}, of the last 100 "
          f"{ms(statistics.median(in_order[-100:]))}")
    print(f"rollback / roll-forward (head move + event)   median {ms(statistics.median(rollback_s))}")
    print(f"open with full integrity check ({len(patches)} blobs hashed)   {ms(open_full)}")
    print()
    print(f"{'active patches':>14} | {'materialise cold':>16} | {'materialise warm':>16} | {'Σ UVᵀ only':>12}")
    print(f"{'':>14} | {'(fresh open)':>16} | {'(patch cache)':>16} | {'(in memory)':>12}")
    print("-" * 68)
    for n, cold, warm, pure in rows:
        print(f"{n:>14} | {ms(cold):>16} | {ms(warm):>16} | {ms(pure):>12}")
    print(f"materialise twice bit-identical, v0 == base bit for bit: {reproducible}")
    print()
    print(f"ledger bytes per patch: {per_patch:,.0f} B  (factor blob {blob_bytes:,.0f} B incl. safetensors header; "
          f"raw factors {(D_OUT + D_IN) * args.rank * 4:,} B; database total {db_bytes / 1e6:.2f} MB)")
    print(f"disk blocks per patch: {(disk_bytes - disk0) / len(patches):,.0f} B (one file per blob, 4 KiB blocks)")


if __name__ == "__main__":
    main()
