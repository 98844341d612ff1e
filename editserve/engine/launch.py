"""``editserve serve``: vLLM's own ``serve`` command with the editserve plugins enabled.

Everything after the editserve options goes to vLLM unchanged (``vllm serve`` flags), so the
OpenAI-compatible server is exactly vLLM's. Differences from ``vllm serve``:

- ``VLLM_PLUGINS`` gets ``editserve`` added (both entry points are named so);
- the model defaults to the embedded SmolLM2-135M-Instruct checkpoint;
- editserve's own settings, given as options here, are passed on as environment variables
  (which is also how they are set with plain ``vllm serve``, see docs/engine.md);
- only one API-server process is allowed (the control plane lives in it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from editserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

PLUGINS_ENV = "VLLM_PLUGINS"
GRPC_ADDR_ENV = "EDITSERVE_GRPC_ADDR"          # read by editserve.control.server
GRPC_INSECURE_ENV = "EDITSERVE_GRPC_INSECURE"  # read by editserve.control.server
API_KEY_FILE_ENV = "EDITSERVE_API_KEY_FILE"    # a file holding vLLM's API key (becomes VLLM_API_KEY)
VLLM_API_KEY_ENV = "VLLM_API_KEY"


@dataclass(frozen=True)
class ServeOptions:
    """editserve's own options of ``editserve serve`` (each maps to an environment variable)."""

    ledger: str | None = None              # EDITSERVE_LEDGER
    pause_mode: str | None = None          # EDITSERVE_PAUSE_MODE
    sidecar_device: str | None = None      # EDITSERVE_SIDECAR_DEVICE
    sidecar_threads: int | None = None     # EDITSERVE_SIDECAR_THREADS
    editable_layers: str | None = None     # EDITSERVE_EDITABLE_LAYERS
    grpc_addr: str | None = None           # EDITSERVE_GRPC_ADDR (the control plane; default 127.0.0.1:50051)
    insecure: bool = False                 # EDITSERVE_GRPC_INSECURE=1: plaintext gRPC on a non-loopback address
    api_key_file: str | None = None        # EDITSERVE_API_KEY_FILE: vLLM's API key, read into VLLM_API_KEY
    candidates: str | None = None          # EDITSERVE_CANDIDATES (editserve.candidates; adds vLLM's LoRA flags)
    candidate_share: str | None = None     # EDITSERVE_CANDIDATE_SHARE
    candidate_max_rank: str | None = None  # EDITSERVE_CANDIDATE_MAX_RANK
    serve_only: bool = False               # EDITSERVE_SIDECAR=0: no sidecar (editserve.engine.serveonly)
    neuron_slots: str | None = None        # EDITSERVE_NEURON_SLOTS (editserve.engine.neuron_slots), e.g. "5:1024"

    def environment(self) -> dict[str, str]:
        from editserve.engine.control import LEDGER_ENV, PAUSE_MODE_ENV, SIDECAR_DEVICE_ENV, SIDECAR_THREADS_ENV
        from editserve.candidates.staging import CANDIDATES_ENV, MAX_RANK_ENV, SHARE_ENV
        from editserve.engine.neuron_slots import SLOTS_ENV
        from editserve.engine.plugin import EDITABLE_LAYERS_ENV
        from editserve.engine.serveonly import SIDECAR_ENV

        pairs = {LEDGER_ENV: self.ledger, PAUSE_MODE_ENV: self.pause_mode, SIDECAR_DEVICE_ENV: self.sidecar_device,
                 SIDECAR_THREADS_ENV: None if self.sidecar_threads is None else str(self.sidecar_threads),
                 EDITABLE_LAYERS_ENV: self.editable_layers, GRPC_ADDR_ENV: self.grpc_addr,
                 GRPC_INSECURE_ENV: "1" if self.insecure else None, CANDIDATES_ENV: self.candidates,
                 SHARE_ENV: self.candidate_share, MAX_RANK_ENV: self.candidate_max_rank,
                 SIDECAR_ENV: "0" if self.serve_only else None, SLOTS_ENV: self.neuron_slots}
        return {k: v for k, v in pairs.items() if v is not None}


def api_key_from_file(path: str) -> str:
    """vLLM's API key from a secret file (one line), so that it need not sit in the environment of
    whoever starts the server; `InvalidRequestError` naming the file if it is unusable."""
    try:
        key = open(path, encoding="utf-8").read().strip()
    except OSError as exc:
        raise InvalidRequestError(f"the API key file {path!r} cannot be read: {exc.strerror or exc}") from None
    if not key or any(c.isspace() for c in key):
        raise InvalidRequestError(f"the API key file {path!r} must hold one key on one line")
    return key


def plugins_value(current: str | None) -> str:
    """``VLLM_PLUGINS`` with ``editserve`` added (an unset variable means "all general plugins",
    which an allowlist would narrow, so then it becomes just ``editserve``)."""
    from editserve.engine.plugin import PLUGIN_NAME

    names = [n for n in (current or "").split(",") if n]
    if PLUGIN_NAME not in names:
        names.append(PLUGIN_NAME)
    return ",".join(names)


def with_default_model(vllm_args: Sequence[str]) -> list[str]:
    """Prepend the embedded checkpoint unless a model is given (positional first or ``--model``)."""
    args = list(vllm_args)
    if args and not args[0].startswith("-"):
        return args
    if any(a == "--model" or a.startswith("--model=") for a in args):
        return args
    from editserve.editing.model import embedded_checkpoint

    return [str(embedded_checkpoint()), *args]


def serve(vllm_args: Sequence[str], options: ServeOptions = ServeOptions()) -> None:
    """Run vLLM's ``serve`` with the editserve plugins (blocks until the server exits)."""
    os.environ[PLUGINS_ENV] = plugins_value(os.environ.get(PLUGINS_ENV))
    os.environ.update(options.environment())
    key_file = options.api_key_file or os.environ.get(API_KEY_FILE_ENV)
    if key_file:
        os.environ[VLLM_API_KEY_ENV] = api_key_from_file(key_file)
    if options.insecure:
        log.warning("editserve serve --insecure: the gRPC control plane may listen in PLAINTEXT on a non-loopback "
                    "address; bearer tokens and edits then cross the network unencrypted")
    argv = with_default_model(vllm_args)
    from editserve.candidates.staging import CandidateSettings

    lora = CandidateSettings.from_env().vllm_args()          # [] unless --candidates N (no LoRA cost then)
    if lora and "--enable-lora" not in argv:
        argv = [*argv, *lora]
    from editserve.control.server import GrpcSettings

    GrpcSettings.from_env()                  # an insecure gRPC address is refused before vLLM starts

    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="editserve", description="vLLM's OpenAI-compatible server with editserve")
    sub = parser.add_subparsers(dest="subparser", required=True)
    command = ServeSubcommand()
    command.subparser_init(sub)
    args = parser.parse_args(["serve", *argv])
    if getattr(args, "api_server_count", None) not in (None, 1) or getattr(args, "data_parallel_size", 1) != 1:
        raise InvalidRequestError("editserve runs its control plane in a single API server: use "
                                  "--api-server-count 1 and no data parallelism")
    configure_logging_from_args(args)
    command.validate(args)
    log.info("editserve serve: vLLM serve %s (VLLM_PLUGINS=%s)", " ".join(argv), os.environ[PLUGINS_ENV])
    command.cmd(args)
