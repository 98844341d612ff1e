"""Settings of the engine's control plane (`ControlSettings`) and the environment variables they come from.

The endpoint plugin reads them from the environment (`ControlSettings.from_env`); `editserve
serve` (editserve/engine/launch.py) sets the variables from its flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from editserve.control.methods import chosen_default_method
from editserve.engine.autoconsolidate import ConsolidationPolicy
from editserve.engine.health import HealthSettings
from editserve.engine.swap import DEFAULT_PAUSE_MODE, check_mode
from editserve.envparse import real_number, whole_number
from editserve.errors import InvalidRequestError
from editserve.ledger.location import LedgerLocation

LEDGER_ENV = "EDITSERVE_LEDGER"
PAUSE_MODE_ENV = "EDITSERVE_PAUSE_MODE"
SIDECAR_DEVICE_ENV = "EDITSERVE_SIDECAR_DEVICE"
SIDECAR_THREADS_ENV = "EDITSERVE_SIDECAR_THREADS"
SIDECAR_TIMEOUT_ENV = "EDITSERVE_SIDECAR_TIMEOUT_S"              # compute (an edit's keys, values, solve, gate)
SIDECAR_READ_TIMEOUT_ENV = "EDITSERVE_SIDECAR_READ_TIMEOUT_S"    # probe / trace
SIDECAR_SYNC_TIMEOUT_ENV = "EDITSERVE_SIDECAR_SYNC_TIMEOUT_S"    # sync to a version, open the ledger
SIDECAR_RETRY_ENV = "EDITSERVE_SIDECAR_RETRY_S"                  # wait after a failed sidecar restart
BASE_CACHE_ENV = "EDITSERVE_BASE_CACHE_MB"
SWAP_MESSAGES_ENV = "EDITSERVE_SWAP_MESSAGES"          # delta (default) | full (before issue 16, to measure)
CHECKPOINT_EVERY_ENV = "EDITSERVE_CHECKPOINT_EVERY"    # deltas of a matrix between materialised checkpoints
SWAP_MESSAGE_KINDS = ("delta", "full")


@dataclass(frozen=True)
class ControlSettings:
    """Where the control plane finds things; the plugin reads them from the environment."""

    model: str | None                     # the checkpoint vLLM serves (a local HF directory)
    tensor_parallel_size: int = 1
    # A directory or a DSN (may hold a password: kept out of repr; `ledger_location` is safe to show).
    # None: $EDITSERVE_LEDGER_DSN_FILE, else $EDITSERVE_HOME/ledger/<fingerprint[:16]>.
    ledger_root: str | None = field(default=None, repr=False)
    pause_mode: str = DEFAULT_PAUSE_MODE
    sidecar_device: str | None = None     # None: cuda when available, else cpu
    sidecar_threads: int | None = None
    caller: str = "engine"
    drain_timeout_s: float = 600.0            # ``wait`` mode: longest wait for requests in flight
    sidecar_watch_s: float = 1.0              # how often the sidecar process is checked for life
    sidecar_retry_s: float = 30.0             # wait after a failed sidecar restart before the next try
    compute_timeout_s: float = 900.0          # deadline of an edit's computation on the sidecar
    swap_messages: str = "delta"              # what apply messages carry: the change, or every factor
    checkpoint_every: int = 100               # a materialised checkpoint every N deltas of a matrix
    read_timeout_s: float = 600.0             # deadline of a probe or trace on the sidecar
    sync_timeout_s: float = 300.0             # deadline of moving the sidecar to a version
    base_cache_bytes: int = 512 << 20         # base copies of matrices kept in memory (LRU)
    health: HealthSettings = field(default_factory=HealthSettings)   # retention probe and gate (issue 16)
    serve_only: bool = False                  # EDITSERVE_SIDECAR=0: no sidecar (editserve.engine.serveonly)
    # EDITSERVE_CONSOLIDATE_EVERY: consolidate every K committed facts (editserve.engine.autoconsolidate;
    # default 25, 0: off)
    consolidation: ConsolidationPolicy = field(default_factory=ConsolidationPolicy)
    # EDITSERVE_DEFAULT_METHOD, checked at start (the method of an edit that names none; the edit
    # policy records it, editserve.engine.policy). None: chosen at start, ``gated`` when the model has
    # neuron slots at the gated layer, else AlphaEdit (`editserve.control.methods.server_default_method`)
    default_method: str | None = None

    def __post_init__(self) -> None:
        check_mode(self.pause_mode)
        if self.tensor_parallel_size < 1:
            raise InvalidRequestError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.base_cache_bytes < 0:
            raise InvalidRequestError(f"base_cache_bytes must be >= 0, got {self.base_cache_bytes}")
        if self.swap_messages not in SWAP_MESSAGE_KINDS:
            raise InvalidRequestError(f"{SWAP_MESSAGES_ENV} must be one of {list(SWAP_MESSAGE_KINDS)}, "
                                      f"got {self.swap_messages!r}")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) \
                or self.checkpoint_every < 1:
            raise InvalidRequestError(f"{CHECKPOINT_EVERY_ENV} must be a positive integer, got {self.checkpoint_every!r}")
        for name in ("sidecar_watch_s", "sidecar_retry_s", "compute_timeout_s", "read_timeout_s", "sync_timeout_s"):
            if not getattr(self, name) > 0:
                raise InvalidRequestError(f"{name} must be positive, got {getattr(self, name)!r}")

    @property
    def ledger_location(self) -> LedgerLocation | None:
        """`ledger_root` parsed (str() of it is redacted); None when not set."""
        return LedgerLocation.parse(self.ledger_root) if self.ledger_root else None

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__dataclass_fields__ if k != "ledger_root")
        return f"ControlSettings(ledger={str(self.ledger_location) if self.ledger_root else None!r}, {shown})"

    @classmethod
    def from_env(cls, model: str | None, tensor_parallel_size: int = 1, environ: dict[str, str] | None = None,
                 ) -> "ControlSettings":
        env = os.environ if environ is None else environ
        threads = whole_number(env, SIDECAR_THREADS_ENV, 0, positive=True) or None

        def seconds(name: str, default: float) -> float:
            return real_number(env, name, default, minimum=0.0, strictly_above=True, unit="seconds")

        from editserve.engine.serveonly import serve_only_from_env

        cache_mb = whole_number(env, BASE_CACHE_ENV, 512, unit="MiB")
        every = whole_number(env, CHECKPOINT_EVERY_ENV, 100, positive=True)
        return cls(model=model, tensor_parallel_size=tensor_parallel_size, ledger_root=env.get(LEDGER_ENV) or None,
                   swap_messages=(env.get(SWAP_MESSAGES_ENV) or "delta").strip().lower(),
                   checkpoint_every=every,
                   pause_mode=env.get(PAUSE_MODE_ENV) or DEFAULT_PAUSE_MODE,
                   sidecar_device=env.get(SIDECAR_DEVICE_ENV) or None,
                   sidecar_threads=threads,
                   compute_timeout_s=seconds(SIDECAR_TIMEOUT_ENV, 900.0),
                   read_timeout_s=seconds(SIDECAR_READ_TIMEOUT_ENV, 600.0),
                   sync_timeout_s=seconds(SIDECAR_SYNC_TIMEOUT_ENV, 300.0),
                   sidecar_retry_s=seconds(SIDECAR_RETRY_ENV, 30.0),
                   base_cache_bytes=cache_mb << 20,
                   health=HealthSettings.from_env(env),
                   consolidation=ConsolidationPolicy.from_env(env),
                   serve_only=serve_only_from_env(env),
                   default_method=chosen_default_method(env))
