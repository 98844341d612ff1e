"""``editserve serve [editserve options] [MODEL] [vllm serve options]``: serve with live edits.

All arguments after the editserve options are vLLM's (``vllm serve --help``); MODEL defaults
to the embedded SmolLM2-135M-Instruct. See docs/engine.md.
"""

from __future__ import annotations

import argparse

HELP = """usage: editserve serve [--ledger DIR] [--pause-mode keep|wait|abort] [--sidecar-device DEV]
                       [--sidecar-threads N] [--editable-layers all|3-7,12] [--grpc-addr HOST:PORT]
                       [--insecure] [--serve-only] [--api-key-file FILE] [--neuron-slots LAYER:N]
                       [MODEL] [vllm serve options]

Start vLLM's OpenAI-compatible server with the editserve plugins: edits are served live through
the gRPC control plane (127.0.0.1:50051 by default; `editserve edit|rollback|status ...`) and
POST /editserve/v1/edit and /rollback, GET /editserve/v1/status. Every control call needs a
bearer token: with none configured, the first start writes an admin token to
$EDITSERVE_HOME/control-tokens.json (mode 0600), which the CLI on this machine uses by default.

editserve options (each also settable as an environment variable with plain `vllm serve`):
  --ledger DIR           ledger directory (EDITSERVE_LEDGER; default $EDITSERVE_HOME/ledger/<fingerprint>)
  --pause-mode MODE      how a swap pauses generation: keep (default), wait, abort (EDITSERVE_PAUSE_MODE)
  --sidecar-device DEV   device of the sidecar's model copy (EDITSERVE_SIDECAR_DEVICE; default cuda if any)
  --sidecar-threads N    torch CPU threads of the sidecar (EDITSERVE_SIDECAR_THREADS)
  --editable-layers L    CPU only: down-projections kept dense for editing (EDITSERVE_EDITABLE_LAYERS)
  --grpc-addr ADDR       gRPC control plane address (EDITSERVE_GRPC_ADDR; default 127.0.0.1:50051);
                         a non-loopback address needs TLS (EDITSERVE_GRPC_TLS_CERT/_KEY) or --insecure
  --api-key-file FILE    vLLM's OpenAI-API key from a file (EDITSERVE_API_KEY_FILE; sets VLLM_API_KEY)
  --candidates N         stage up to N candidates as LoRA adapters (EDITSERVE_CANDIDATES; default 0: off,
                         no LoRA cost); see docs/candidates.md
  --candidate-share S    default share of default-model traffic for a staged candidate (EDITSERVE_CANDIDATE_SHARE)
  --candidate-max-rank R vLLM's --max-lora-rank for candidates (EDITSERVE_CANDIDATE_MAX_RANK; default 16)
  --neuron-slots L:N     widen layer L's MLP by N zero neurons at load, for method 'gated' (EDITSERVE_NEURON_SLOTS,
                         e.g. 5:1024; tensor-parallel size 1); see docs/lifelong.md, "Gated edits"
  --serve-only           no sidecar (EDITSERVE_SIDECAR=0): follows the ledger head and serves it, refuses
                         edits/probes/traces naming replicas that can take them (docs/fleet.md)
  --insecure             allow plaintext gRPC on a non-loopback address (EDITSERVE_GRPC_INSECURE=1;
                         logged as a warning: tokens and edits cross the network unencrypted)

MODEL: a Hugging Face checkpoint directory (default: the embedded SmolLM2-135M-Instruct).
Everything else is passed to `vllm serve` unchanged, e.g. --port 8000 --tensor-parallel-size 2."""

_OWN = {"--ledger": "ledger", "--pause-mode": "pause_mode", "--sidecar-device": "sidecar_device",
        "--sidecar-threads": "sidecar_threads", "--editable-layers": "editable_layers", "--grpc-addr": "grpc_addr",
        "--api-key-file": "api_key_file", "--candidates": "candidates", "--candidate-share": "candidate_share",
        "--candidate-max-rank": "candidate_max_rank", "--neuron-slots": "neuron_slots"}
_FLAGS = {"--insecure": "insecure", "--serve-only": "serve_only"}        # editserve options that take no value


def register(sub: argparse._SubParsersAction) -> None:
    # The subparser takes every argument verbatim (its prefix char is one vLLM flags never use),
    # so that vLLM's flags reach vLLM's own parser untouched.
    p = sub.add_parser("serve", help="serve a model with vLLM and live edits (vllm serve + editserve)",
                       prefix_chars="+", add_help=False)
    p.add_argument("args", nargs="*")
    p.set_defaults(func=run)


def split_args(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """editserve's own options (leading, ``--opt value``, ``--opt=value`` or a bare ``--flag``, whose
    value is then ``"1"``) and the rest."""
    from editserve.errors import InvalidRequestError

    own: dict[str, str] = {}
    rest = list(args)
    while rest:
        head = rest[0]
        key, eq, value = head.partition("=")
        if key in _FLAGS:
            if eq:
                raise InvalidRequestError(f"{key} takes no value, got {head!r}")
            own[_FLAGS[key]] = "1"
            rest = rest[1:]
            continue
        if key not in _OWN:
            break
        if eq:
            rest = rest[1:]
        else:
            if len(rest) < 2:
                raise InvalidRequestError(f"{key} needs a value")
            value, rest = rest[1], rest[2:]
        own[_OWN[key]] = value
    return own, rest


def run(args: argparse.Namespace) -> int:
    from editserve.engine.launch import ServeOptions, serve
    from editserve.errors import InvalidRequestError

    if any(a in ("-h", "--help") for a in args.args[:1]):
        print(HELP)
        return 0
    own, rest = split_args(list(args.args))
    threads = own.pop("sidecar_threads", None)
    if threads is not None and not threads.isdigit():
        raise InvalidRequestError(f"--sidecar-threads must be a positive integer, got {threads!r}")
    if "neuron_slots" in own:
        from editserve.engine.neuron_slots import parse_slots

        parse_slots(own["neuron_slots"])                  # a typed error naming a bad value, before vLLM starts
    insecure = own.pop("insecure", None) == "1"
    serve_only = own.pop("serve_only", None) == "1"
    addr = own.get("grpc_addr")
    if addr is not None and addr.lower() != "off" and (":" not in addr or not addr.rpartition(":")[2].isdigit()):
        raise InvalidRequestError(f"--grpc-addr must be HOST:PORT (or off), got {addr!r}")
    serve(rest, ServeOptions(**own, sidecar_threads=int(threads) if threads else None, insecure=insecure,
                             serve_only=serve_only))
    return 0
