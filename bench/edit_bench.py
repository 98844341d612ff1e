"""Editing benchmark on the embedded SmolLM2-135M: one command, a printed table.

    .venv/bin/python bench/edit_bench.py [--rome-edits 10] [--memit-batches 1,10,100]

For ROME (single edits) and MEMIT batches of 1, 10 and 100 CounterFact requests: seconds per
edit split into keys / values / solve, and the peak resident memory of the process that ran
them. Covariance statistics for the default ROME and MEMIT layers are timed separately on a
cold cache (tokens/s). Each configuration runs in its own process so peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact-edit.json"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _edits(method: str, batch: int, n_edits: int, out: mp.Queue) -> None:
    from editserve.editing import compute_patch, load_model
    from editserve.editing.counterfact import load_counterfact

    model, tok = load_model()
    recs = load_counterfact(DATA, limit=max(n_edits, batch) + 5)
    requests = [r.request for r in recs]
    # warm-up: statistics and prefixes load from cache, nothing timed
    compute_patch(model, tok, requests[:1], method=method, hparams={"value": {"max_steps": 1}})
    totals = {"keys": 0.0, "values": 0.0, "solve": 0.0}
    wall = 0.0
    n = 0
    for start in range(0, n_edits, batch):
        chunk = requests[start:start + batch]
        t = time.perf_counter()
        patch = compute_patch(model, tok, chunk, method=method)
        wall += time.perf_counter() - t
        for k in totals:
            totals[k] += patch.timings.get(k, 0.0)
        n += len(chunk)
    out.put({"method": method, "batch": batch, "edits": n, "per_edit": wall / n,
             **{k: v / n for k, v in totals.items()}, "peak_mb": _peak_mb()})


def _stats(layers: list[int], home: str, out: mp.Queue) -> None:
    os.environ["EDITSERVE_HOME"] = home
    from editserve.editing import load_model
    from editserve.editing.corpus import load_corpus
    from editserve.editing.hparams import StatsParams
    from editserve.editing.model import fingerprint
    from editserve.editing.stats import layer_stats

    model, tok = load_model()
    _, run = layer_stats(model, tok, layers, load_corpus(), fingerprint(model), StatsParams(), progress=False)
    out.put({"layers": layers, "seconds": run.seconds, "tokens": run.tokens, "tok_s": run.tokens_per_second,
             "peak_mb": _peak_mb()})


def _run(target, *args):
    q: mp.Queue = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=target, args=(*args, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rome-edits", type=int, default=10)
    ap.add_argument("--memit-batches", default="1,10,100")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args()

    from editserve.config import home
    from editserve.editing.model import embedded_checkpoint

    from editserve.editing.hparams import load_hparams

    ckpt = embedded_checkpoint()
    names = [ckpt.name.lower(), "llama"]  # the hyper-parameter files compute_patch uses for it
    stat_layers = [list(load_hparams("rome", names).layers), list(load_hparams("memit", names).layers)]
    rows = [_run(_edits, "rome", 1, args.rome_edits)]
    for b in [int(x) for x in args.memit_batches.split(",") if x]:
        rows.append(_run(_edits, "memit", b, b))
    # cold covariance statistics: each run gets a scratch home sharing the converted model and corpus
    stats = []
    for layers in stat_layers:
        scratch = tempfile.mkdtemp(prefix="editserve-bench-")
        for sub in ("models", "corpora"):
            os.symlink(home() / sub, Path(scratch) / sub)
        try:
            stats.append(_run(_stats, layers, scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n{'method':<7} {'batch':>5} {'edits':>5} {'s/edit':>8} {'keys':>7} {'values':>7} {'solve':>7} {'peak MB':>8}")
    for r in rows:
        print(f"{r['method']:<7} {r['batch']:>5} {r['edits']:>5} {r['per_edit']:>8.2f} {r['keys']:>7.2f} "
              f"{r['values']:>7.2f} {r['solve']:>7.2f} {r['peak_mb']:>8.0f}")
    print(f"\n{'covariance layers':<20} {'tokens':>8} {'seconds':>8} {'tok/s':>8} {'peak MB':>8}")
    for s in stats:
        print(f"{','.join(map(str, s['layers'])):<20} {s['tokens']:>8} {s['seconds']:>8.1f} {s['tok_s']:>8.0f} {s['peak_mb']:>8.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"edits": rows, "stats": stats}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
