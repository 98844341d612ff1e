"""``editserve demo``: one live edit on the embedded model, completions before and after."""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="edit the embedded model once and print completions before/after")
    p.add_argument("--model", default=None, help="checkpoint directory (default: embedded SmolLM2-135M)")
    p.add_argument("--prompt", default="{} is located in the city of")
    p.add_argument("--subject", default="The Eiffel Tower")
    p.add_argument("--target", default=" Rome")
    p.add_argument("--method", default="rome", choices=["rome", "memit"])
    p.set_defaults(func=run)


def _complete(model, tok, prompt: str, n: int = 8) -> str:
    import torch

    ids = tok(prompt, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True)


def run(args: argparse.Namespace) -> int:
    from editserve.editing import EditRequest, apply_patch, compute_patch, load_model, remove_patch

    req = EditRequest(prompt=args.prompt, subject=args.subject, target_new=args.target)
    model, tok = load_model(args.model)
    probes = [
        req.text,
        f"{args.subject}, which is in",
        f"Where is {args.subject}? It is in the city of",
        "The Louvre is located in the city of",
        "The capital of Germany is",
    ]
    before = {p: _complete(model, tok, p) for p in probes}
    t = time.perf_counter()
    patch = compute_patch(model, tok, [req], method=args.method, progress=True)
    seconds = time.perf_counter() - t
    apply_patch(model, patch)
    after = {p: _complete(model, tok, p) for p in probes}
    remove_patch(model, patch)
    restored = {p: _complete(model, tok, p) for p in probes}
    print(f"\nedit: {req.text!r} -> {req.target_new!r}  ({args.method}, {seconds:.1f}s, "
          + ", ".join(f"{k} {v:.2f}s" for k, v in patch.timings.items()) + ")\n")
    width = max(len(p) for p in probes)
    print(f"{'prompt':<{width}} | {'before':<24} | {'after edit':<24} | after removal")
    print("-" * (width + 80))
    for p in probes:
        print(f"{p:<{width}} | {before[p]!r:<24} | {after[p]!r:<24} | {restored[p]!r}")
    return 0
