"""``editserve trace``: causal tracing of one fact; writes trace.json and trace.png, prints top layers.

Locally (loads the model in this process) by default; with ``--server HOST:PORT`` the running
server's sidecar traces the served version (gRPC ``Trace``; token and TLS flags as for ``editserve edit``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from editserve.commands.remote import add_token_options

if TYPE_CHECKING:
    from editserve.editing.tracing import TraceResult


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="causal trace of a fact: where restoring clean states recovers P(object)")
    p.add_argument("--model", default=None, help="checkpoint directory (default: embedded SmolLM2-135M)")
    p.add_argument("--prompt", required=True,
                   help="template with '{}' for the subject, or a sentence containing the subject")
    p.add_argument("--subject", required=True)
    p.add_argument("--target", default=None, help="object o (first token scored; default: the model's top token)")
    p.add_argument("--kind", default="hidden", choices=["hidden", "mlp", "attn"])
    p.add_argument("--samples", type=int, default=10, help="noise samples to average over (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=10, help="layers restored together for mlp/attn (default 10)")
    p.add_argument("--noise-scale", type=float, default=3.0, help="noise std in embedding stds (default 3)")
    p.add_argument("--top", type=int, default=3, help="how many top MLP layers to print")
    p.add_argument("--out", default=".", help="output directory, or a path ending in .json (PNG beside it)")
    p.add_argument("--server", default=None, help="trace on a running server (gRPC HOST:PORT) instead of locally")
    add_token_options(p, prefix="with --server: ")
    p.add_argument("--ca", default=None, help="with --server: CA certificate (PEM) for TLS")
    p.add_argument("--cert", default=None, help="with --server: client certificate (PEM) for mutual TLS")
    p.add_argument("--key", default=None, help="with --server: client key (PEM) for mutual TLS")
    p.set_defaults(func=run)


def _paths(out: str) -> tuple[Path, Path]:
    p = Path(out)
    if p.suffix == ".json":
        return p, p.with_suffix(".png")
    return p / "trace.json", p / "trace.png"


def _remote(args: argparse.Namespace, json_path: Path, png_path: Path) -> TraceResult:
    from editserve.commands.remote import _client
    from editserve.editing.tracing import TraceResult

    with _client(args) as client:
        r = client.trace(args.prompt, args.subject, target=args.target, kind=args.kind, samples=args.samples,
                         seed=args.seed, window=args.window, noise_scale=args.noise_scale)
    result = TraceResult.from_dict(json.loads(r.result_json))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(result.to_json(indent=1) + "\n")
    png_path.write_bytes(r.png)
    print(f"traced on the server's version {r.version}")
    return result


def _local(args: argparse.Namespace, json_path: Path, png_path: Path) -> TraceResult:
    from editserve.editing import load_model
    from editserve.editing.tracing import trace
    from editserve.tracing_plot import save_png

    model, tok = load_model(args.model)
    result = trace(model, tok, args.prompt, args.subject, target=args.target, kind=args.kind,
                   samples=args.samples, seed=args.seed, window=args.window, noise_scale=args.noise_scale,
                   top_k=args.top)
    json_path.parent.mkdir(parents=True, exist_ok=True)        # only once there is something to write
    json_path.write_text(result.to_json(indent=1) + "\n")
    model_name = Path(str(getattr(model, "editserve_checkpoint", "") or "the model")).name
    save_png(result, png_path, model_name=model_name)
    return result


def run(args: argparse.Namespace) -> int:
    json_path, png_path = _paths(args.out)
    result = _remote(args, json_path, png_path) if args.server else _local(args, json_path, png_path)

    s0, s1 = result.subject_range
    print(f"{result.prompt!r} -> {result.target!r}   ({args.kind}, {result.samples} samples, {result.seconds:.1f}s)")
    print(f"P(o) clean {result.p_clean:.4f}   corrupted {result.p_corrupted:.4f}   "
          f"(noise std {result.noise_std:.4f} on tokens {s0}..{s1 - 1})")
    layer, effect = result.max_effect(result.subject_last)
    print(f"best {args.kind} restoration at the subject's last token {result.tokens[result.subject_last]!r}: "
          f"layer {layer}, indirect effect {effect:+.4f}")
    ie = [x - result.p_corrupted for x in result.mlp_subject_last]
    print("top MLP layers at the subject's last token (indirect effect): "
          + ", ".join(f"{l} ({ie[l]:+.4f})" for l in result.top_mlp_layers))
    print("note: these are not the edit layers; see docs/layers.md (tracing does not predict where editing works)")
    print(f"wrote {json_path} and {png_path}")
    return 0
