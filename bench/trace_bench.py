"""Seconds per causal trace on the embedded SmolLM2-135M (30 layers), per kind.

For each kind it runs one full trace (every token × layer, --samples noise draws, plus the MLP
row at the subject's last token for the top-layer report), counts the batched forward passes,
and compares with the time one unbatched forward per (cell, sample) would take (measured on a few
single forwards and multiplied out).

    EDITSERVE_HOME=/tmp/eh .venv/bin/python bench/trace_bench.py [--samples 10] [--kinds hidden,mlp,attn]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default="{}, a product manufactured by")
    ap.add_argument("--subject", default="Windows XP")
    ap.add_argument("--target", default=" Microsoft")
    ap.add_argument("--kinds", default="hidden,mlp,attn")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    from editserve.editing import load_model
    from editserve.editing.arch import get_module, spec_for
    from editserve.editing.tracing import trace

    model, tok = load_model(args.model)
    body = get_module(model, spec_for(model).base)
    passes: list[int] = []
    handle = body.register_forward_hook(lambda *_: passes.append(1))

    ids = tok(args.prompt.format(args.subject), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        body(input_ids=ids, use_cache=False)                # warm-up
        t = time.perf_counter()
        for _ in range(5):
            body(input_ids=ids, use_cache=False)
        single = (time.perf_counter() - t) / 5
    T, L = ids.shape[1], int(model.config.num_hidden_layers)
    print(f"{torch.get_num_threads()} torch threads; prompt {T} tokens, {L} layers; "
          f"one unbatched forward {single * 1000:.1f} ms")
    print(f"{'kind':>6} {'samples':>7} {'seconds':>8} {'passes':>6} {'cells':>6} {'naive s':>8} {'speed-up':>8}  "
          f"P clean / corrupted / best at subject's last token")
    for kind in args.kinds.split(","):
        passes.clear()
        t = time.perf_counter()
        r = trace(model, tok, args.prompt, args.subject, target=args.target, kind=kind, samples=args.samples)
        seconds = time.perf_counter() - t
        cells = T * L + (0 if kind == "mlp" else L)
        naive = single * cells * args.samples
        layer, effect = r.max_effect(r.subject_last)
        print(f"{kind:>6} {args.samples:>7} {seconds:>8.1f} {len(passes):>6} {cells:>6} {naive:>8.1f} "
              f"{naive / seconds:>7.1f}x  {r.p_clean:.3f} / {r.p_corrupted:.4f} / "
              f"{r.p_corrupted + effect:.3f} (layer {layer})", flush=True)
    handle.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
