"""Ledger benchmark, SQLite against PostgreSQL: commit latency (p50/p99), rollback latency,
open+integrity time, materialisation time for 1/100/1000 active patches on one 576x1536 layer
(SmolLM2-135M's down_proj shape) and ledger bytes per patch, one column per backend.

    PYTHONPATH=. .venv/bin/python bench/ledger_bench.py [--patches 1000] [--rank 1]
        [--backend both|sqlite|postgresql] [--root DIR] [--dsn postgresql://...]

Patches are rank-`rank` float32 factors (a ROME edit is rank 1) with random values.
SQLite: a real file (WAL, synchronous=FULL) with fsynced blob files on the local disk.
PostgreSQL: the database named by --dsn (or $EDITSERVE_LEDGER_BENCH_DSN), else a throwaway
server started here (`tests._pg.TempPostgres`: initdb in /tmp, Unix socket, PostgreSQL's
defaults, so fsync on and synchronous_commit on), blobs in its tables.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
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


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered))) - 1))]


def run(location: str, patches: list[Patch], base: torch.Tensor, repeat: int) -> dict[str, object]:
    """Every measurement on one (empty) ledger location."""
    ledger = Ledger.open(location, model_fingerprint=FP)
    ledger.weights.ensure_base(NAME, base, Layout.OUT_IN)
    bytes0 = ledger.nbytes()
    commit_s = []
    for p in patches:
        t = time.perf_counter()
        ledger.commit(p, ledger.head(), caller="bench", probe_report={"efficacy": 1.0})
        commit_s.append(time.perf_counter() - t)
    ledger.close()
    ledger = Ledger.open(location, model_fingerprint=FP, verify="none")   # SQLite: checkpoint the WAL on reopen
    per_patch = (ledger.nbytes() - bytes0) / len(patches)
    blob_bytes = sum(ledger.store.patch(p.digest).blob_size for p in patches[:50]) / min(50, len(patches))
    ledger.close()

    t = time.perf_counter()
    ledger = Ledger.open(location, model_fingerprint=FP)
    open_full = time.perf_counter() - t

    rows = []
    for n in [c for c in (1, 100, 1000) if c <= len(patches)]:
        cold = []
        for _ in range(repeat):
            fresh = Ledger.open(location, model_fingerprint=FP, verify="none")
            t = time.perf_counter()
            fresh.weights.materialize(n)
            cold.append(time.perf_counter() - t)
            fresh.close()
        ledger.weights.materialize(n)                                     # warm the patch cache
        warm = timed(lambda: ledger.weights.materialize(n), repeat)
        deltas = [d for p in ledger.active_patches(n) for d in p.deltas]
        pure = timed(lambda: materialize(base, deltas, Layout.OUT_IN), repeat)
        rows.append((n, statistics.median(cold), statistics.median(warm), statistics.median(pure)))
    a = ledger.weights.materialize(len(patches))[NAME]
    b = ledger.weights.materialize(len(patches))[NAME]
    reproducible = torch.equal(a, b) and torch.equal(ledger.weights.materialize(0)[NAME], base)

    head = ledger.head()
    rollback_s = []
    for target in (0, head) * repeat:
        t = time.perf_counter()
        ledger.rollback(target, caller="bench")
        rollback_s.append(time.perf_counter() - t)
    ledger.close()
    return {"commit_s": commit_s, "rollback_s": rollback_s, "open_full": open_full, "rows": rows,
            "reproducible": reproducible, "per_patch": per_patch, "blob_bytes": blob_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=1000)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--backend", choices=("both", "sqlite", "postgresql"), default="both")
    ap.add_argument("--root", default=None, help="SQLite ledger directory (default: a temporary one)")
    ap.add_argument("--dsn", default=os.environ.get("EDITSERVE_LEDGER_BENCH_DSN"),
                    help="an empty PostgreSQL database (default: a throwaway server started here)")
    args = ap.parse_args()
    base = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(0))
    patches = [make_patch(i, args.rank) for i in range(1, args.patches + 1)]

    results: dict[str, dict[str, object]] = {}
    where: dict[str, str] = {}
    if args.backend in ("both", "sqlite"):
        root = Path(args.root or tempfile.mkdtemp(prefix="ledger-bench-")) / "ledger"
        where["sqlite"] = f"{root} (WAL, synchronous=FULL, fsynced blob files)"
        results["sqlite"] = run(str(root), patches, base, args.repeat)
    if args.backend in ("both", "postgresql"):
        server = None
        dsn = args.dsn
        if dsn is None:
            from tests._pg import TempPostgres

            server = TempPostgres(fsync=True).start()
            dsn = server.dsn(server.create_database())
        try:
            from editserve.ledger import redact_dsn

            where["postgresql"] = f"{redact_dsn(dsn)} ({'throwaway server, durable defaults' if server else 'given'})"
            results["postgresql"] = run(dsn, patches, base, args.repeat)
        finally:
            if server is not None:
                server.stop()

    names = list(results)
    print(f"ledger benchmark: {len(patches)} rank-{args.rank} patches on one {D_OUT}x{D_IN} float32 layer, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    for name in names:
        print(f"  {name}: {where[name]}")
    print()
    col = 18
    table: list[tuple[str, Callable[[dict[str, object]], str]]] = [
        ("commit p50", lambda r: ms(pct(r["commit_s"], 50))),
        ("commit p99", lambda r: ms(pct(r["commit_s"], 99))),
        ("commit max", lambda r: ms(max(r["commit_s"]))),
        ("commit p50, first 100", lambda r: ms(statistics.median(r["commit_s"][:100]))),
        ("commit p50, last 100", lambda r: ms(statistics.median(r["commit_s"][-100:]))),
        ("rollback p50", lambda r: ms(statistics.median(r["rollback_s"]))),
        ("open + full check", lambda r: ms(r["open_full"])),
    ]
    for i, n in enumerate(c for c in (1, 100, 1000) if c <= len(patches)):
        table.append((f"materialise {n}: cold", lambda r, i=i: ms(r["rows"][i][1])))
        table.append((f"materialise {n}: warm", lambda r, i=i: ms(r["rows"][i][2])))
        table.append((f"materialise {n}: Σ UVᵀ only", lambda r, i=i: ms(r["rows"][i][3])))
    table += [
        ("bytes per patch", lambda r: f"{r['per_patch']:,.0f} B"),
        ("factor blob", lambda r: f"{r['blob_bytes']:,.0f} B"),
        ("bit-reproducible", lambda r: str(r["reproducible"])),
    ]
    print(f"{'':<28}" + "".join(f"{n:>{col}}" for n in names))
    print("-" * (28 + col * len(names)))
    for label, fn in table:
        print(f"{label:<28}" + "".join(f"{fn(results[n]):>{col}}" for n in names))
    print()
    print(f"commit = blob write(s) + one transaction (expected head, idempotency key, version, ops, head, event); "
          f"raw factors {(D_OUT + D_IN) * args.rank * 4:,} B per patch")


if __name__ == "__main__":
    main()
