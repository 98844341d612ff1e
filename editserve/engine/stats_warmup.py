"""Covariance statistics built in the background when the sidecar starts, so that the first edit
is as fast as the rest.

`StatisticsWarmup` runs in the sidecar process, in its own thread, after the sidecar has said
`Ready`. It builds (or loads from the cache of `editserve.editing.stats`) E[kkᵀ] for the default
edit layers of the default methods (`WARM_METHODS`, layers and statistics parameters from the
per-model hyper-parameter files; for SmolLM2: AlphaEdit and MEMIT layers 1-5, ROME layer 5, one pass over the
corpus), then AlphaEdit's null-space projections of its default layers from them (the on-disk cache of
`editserve.editing.nullspace`; 3.3 s for SmolLM2's five layers on 2 cores, which the first AlphaEdit edit
computed before). It runs on its own copy of the *base* checkpoint cut after the last layer it needs, so it
never touches the sidecar's model (whose weights a sync changes in place, and on which a sync,
score or trace runs forward passes meanwhile): the request loop stays responsive, and only an edit
that needs statistics being built waits for them (`wait_for`), reporting its wait as progress.

Progress is published as a small JSON state file, ``$EDITSERVE_HOME/run/sidecar-<pid>.statistics.json``
(written atomically), which the parent reads without touching the request pipe
(`read_state`, behind ``SidecarClient.statistics()``):
``{"state": "building"|"ready"|"failed"|"off", "fraction": 0..1, "layers": [...], "seconds": s, "error": str|None}``.

``EDITSERVE_WARM_STATISTICS=0`` turns the warm-up off (state ``off``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from editserve.atomicfile import publish as publish_file
from editserve.editing.hparams import StatsParams

log = logging.getLogger(__name__)

WARM_ENV = "EDITSERVE_WARM_STATISTICS"
WARM_METHODS = ("alphaedit", "rome", "memit")
STATES = ("building", "ready", "failed", "off")
PUBLISH_INTERVAL_S = 0.5


def warm_enabled(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(WARM_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def state_path(pid: int, home: str | os.PathLike[str] | None = None) -> Path:
    """Where the sidecar process `pid` publishes its statistics state."""
    from editserve.control.home import editserve_home

    root = Path(home) if home else editserve_home()
    return root / "run" / f"sidecar-{pid}.statistics.json"


def prune_stale(run_dir: Path) -> list[Path]:
    """Remove the state files of sidecar processes that no longer run (a killed sidecar cannot remove
    its own); returns the files removed."""
    removed = []
    for f in run_dir.glob("sidecar-*.statistics.json"):
        pid = f.name.split("-", 1)[1].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            f.unlink(missing_ok=True)
            removed.append(f)
        except PermissionError:
            continue                       # alive, another user's
    return removed


@dataclass(frozen=True)
class StatisticsState:
    state: str                       # one of STATES
    fraction: float = 0.0            # 0..1 of the statistics to build
    layers: tuple[int, ...] = ()     # the layers warmed
    seconds: float = 0.0             # since the warm-up started (total once ready)
    error: str | None = None
    message: str = ""                # e.g. "building covariance statistics for layers 1-5: 40%"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


def read_state(path: Path, alive: bool) -> dict[str, Any]:
    """The published state of a sidecar (`alive`: whether its process runs). Before the sidecar has
    published anything it is ``building`` at 0 (or ``off`` when the warm-up is disabled here)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        if not warm_enabled():
            return StatisticsState("off").to_dict()
        if not alive:
            return StatisticsState("failed", error="the sidecar process is not running").to_dict()
        return StatisticsState("building", message="waiting for the sidecar to start").to_dict()
    except (OSError, ValueError) as exc:
        return StatisticsState("failed", error=f"unreadable state file {str(path)!r}: {type(exc).__name__}").to_dict()
    if data.get("state") == "building" and not alive:
        data = {**data, "state": "failed", "error": "the sidecar process exited while building statistics"}
    return data


def _span(layers: tuple[int, ...]) -> str:
    if len(layers) > 1 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]}"
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(str(x) for x in layers)


@dataclass
class _Board:
    """The state file, rewritten atomically at most every PUBLISH_INTERVAL_S (and on every change of state)."""

    path: Path | None
    last: float = 0.0
    last_state: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, st: StatisticsState, force: bool = False) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        with self.lock:
            if not force and st.state == self.last_state and now - self.last < PUBLISH_INTERVAL_S:
                return
            self.last, self.last_state = now, st.state
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(st.to_dict())
            publish_file(self.path, lambda tmp: tmp.write_text(text))

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class StatisticsWarmup:
    """The plan (which layers, with which statistics parameters) and the background thread."""

    def __init__(self, model: torch.nn.Module, tok: Any, fingerprint: str, checkpoint: str,
                 state_file: Path | None, environ: Mapping[str, str] | None = None) -> None:
        self._tok = tok
        self._fingerprint = fingerprint
        self._checkpoint = checkpoint
        self._dtype = next(model.parameters()).dtype
        self._device = next(model.parameters()).device
        if state_file is not None and state_file.parent.is_dir():
            prune_stale(state_file.parent)
        self._board = _Board(state_file)
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()
        self.plan: dict[StatsParams, tuple[int, ...]] = {}
        # (statistics parameters, null-space threshold, layers): the projections built after the statistics
        self.projections: tuple[tuple[StatsParams, float, tuple[int, ...]], ...] = ()
        if warm_enabled(environ):
            self.plan, self.projections = self._plans(model)
        self.layers = tuple(sorted({layer for layers in self.plan.values() for layer in layers}))
        self._state = StatisticsState("building" if self.plan else "off", layers=self.layers)
        if not self.plan:
            self._done.set()
        self._board.publish(self._state, force=True)

    # -- plan ---------------------------------------------------------------------------------

    @staticmethod
    def _plans(model: torch.nn.Module) -> tuple[dict[StatsParams, tuple[int, ...]],
                                                 tuple[tuple[StatsParams, float, tuple[int, ...]], ...]]:
        """From the default methods' hyper-parameters, one pass: the statistics to build (layers by
        statistics parameters) and the null-space projections built after them (AlphaEdit's: its
        layers, its threshold)."""
        from editserve.editing.edit import default_hparams

        plan: dict[StatsParams, set[int]] = {}
        projections = []
        for hp in default_hparams(model, WARM_METHODS, "statistics warm-up"):
            plan.setdefault(hp.stats, set()).update(hp.layers)
            threshold = getattr(hp, "nullspace_threshold", None)
            if threshold is not None:
                projections.append((hp.stats, float(threshold), tuple(sorted(hp.layers))))
        return {p: tuple(sorted(layers)) for p, layers in plan.items()}, tuple(projections)

    # -- state --------------------------------------------------------------------------------

    @property
    def state(self) -> StatisticsState:
        with self._lock:
            return self._state

    def _set(self, **changes: Any) -> None:
        with self._lock:
            self._state = StatisticsState(**{**self._state.to_dict(), "layers": self.layers,
                                             "seconds": round(time.monotonic() - self._t0, 2), **changes})
            st = self._state
        self._board.publish(st, force=changes.get("state", "building") != "building")

    def covers(self, layers: tuple[int, ...], params: StatsParams) -> bool:
        """Whether the warm-up is (still) building statistics that an edit on `layers` with `params` needs."""
        return not self._done.is_set() and bool(set(layers) & set(self.plan.get(params, ())))

    def wait_for(self, layers: tuple[int, ...], params: StatsParams,
                 report: Callable[[StatisticsState], None], poll_s: float = 1.0) -> None:
        """Block until the warm-up is over if it builds anything the edit needs, calling `report`
        whenever the progress moved by a percent (and at least every 10 s)."""
        if not self.covers(layers, params):
            return
        log.info("edit on %s waits for the statistics warm-up", _span(layers))
        last_pct, last_t = -1, 0.0
        while not self._done.wait(poll_s):
            st = self.state
            pct = int(st.fraction * 100)
            if pct != last_pct or time.monotonic() - last_t >= 10.0:
                report(st)
                last_pct, last_t = pct, time.monotonic()
        report(self.state)

    def close(self) -> None:
        self._board.remove()

    # -- the thread -----------------------------------------------------------------------------

    def start(self) -> None:
        if not self.plan:
            log.info("statistics warm-up off (%s=0 or no default layers)", WARM_ENV)
            return
        self._thread = threading.Thread(target=self._run, name="editserve-stats-warmup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._build()
        except Exception as exc:  # reported in the state, the log and the edits that waited; edits compute their own
            log.exception("statistics warm-up failed")
            self._set(state="failed", error=f"{type(exc).__name__}: {exc}", message="")
        else:
            self._set(state="ready", fraction=1.0, message=f"covariance statistics for {_span(self.layers)} ready")
            log.info("statistics warm-up: %s ready in %.1f s", _span(self.layers), self.state.seconds)
        finally:
            self._done.set()

    def _build(self) -> None:
        from editserve.editing.corpus import load_corpus
        from editserve.editing.stats import layer_stats

        self._set(message="loading the corpus")
        corpus = load_corpus(None)
        groups = list(self.plan.items())
        for g, (params, layers) in enumerate(groups):
            base = g / len(groups)
            share = 1.0 / len(groups)
            total = math.ceil(params.n_tokens / params.seq_len) * params.seq_len
            model = self._truncated(max(layers) + 1)
            seen = [0]
            last_logged = [-1]

            def count(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
                seen[0] += int(args[0].numel())
                f = min(1.0, seen[0] / total)
                msg = f"building covariance statistics for {_span(layers)}: {f * 100:.0f}%"
                self._set(fraction=round(base + share * f, 4), message=msg)
                if int(f * 10) != last_logged[0]:
                    last_logged[0] = int(f * 10)
                    log.info("statistics warm-up: %s", msg)

            handle = model.get_input_embeddings().register_forward_pre_hook(count)
            try:
                self._set(message=f"covariance statistics for {_span(layers)}: cache or corpus")
                _stats, run = layer_stats(model, self._tok, layers, corpus, self._fingerprint, params, progress=False)
            finally:
                handle.remove()
                del model
            how = "loaded from the cache" if run is None else f"built from {run.tokens} tokens in {run.seconds:.1f} s"
            log.info("statistics warm-up: %s %s", _span(layers), how)
            self._project(corpus, params, _stats)
            self._set(fraction=round(base + share, 4))

    def _project(self, corpus: Any, params: StatsParams, stats: Mapping[int, Any]) -> None:
        """The null-space projections of `projections` that use these statistics, into their cache
        (`cached_null_space` reads one that is there), keyed as an edit keys them."""
        from editserve.editing.nullspace import cached_null_space
        from editserve.editing.stats import stats_key

        for p, threshold, layers in self.projections:
            if p != params:
                continue
            t = time.monotonic()
            self._set(message=f"null-space projections for {_span(layers)}")
            for layer in layers:
                cached_null_space(stats[layer].cov, threshold, layer, self._fingerprint,
                                  stats_key(corpus, layer, params, self._dtype))
            log.info("statistics warm-up: null-space projections for %s (threshold %g) ready in %.1f s",
                     _span(layers), threshold, time.monotonic() - t)

    def _truncated(self, n_layers: int) -> torch.nn.Module:
        """The base checkpoint with only its first `n_layers` blocks (the statistics of layer L need
        blocks 0..L only), loaded apart from the sidecar's model. From safetensors files only the
        tensors those blocks use are read; otherwise transformers loads the checkpoint and drops
        the rest."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from editserve.editing.arch import num_layers

        config = AutoConfig.from_pretrained(self._checkpoint)
        config.num_hidden_layers = n_layers
        model = self._from_safetensors(config) or AutoModelForCausalLM.from_pretrained(
            self._checkpoint, dtype=self._dtype, num_hidden_layers=n_layers)
        model = model.to(self._device)
        model.eval()
        model.requires_grad_(False)
        if num_layers(model) != n_layers:
            raise RuntimeError(f"could not load the first {n_layers} layers of {self._checkpoint!r} "
                               f"(got {num_layers(model)})")
        return model

    def _from_safetensors(self, config: Any) -> torch.nn.Module | None:
        """`config`'s model with its tensors read from the checkpoint's ``*.safetensors`` files, or
        None when a tensor it needs is not there under its own name (then from_pretrained decides)."""
        from safetensors import safe_open
        from transformers import AutoModelForCausalLM

        files = sorted(Path(self._checkpoint).glob("*.safetensors"))
        if not files:
            return None
        model = AutoModelForCausalLM.from_config(config, dtype=self._dtype)
        want = set(model.state_dict())
        state: dict[str, torch.Tensor] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    if key in want:
                        state[key] = sf.get_tensor(key)
        result = model.load_state_dict(state, strict=False)
        model.tie_weights()
        tied = {name for name, p in model.named_parameters(remove_duplicate=False)
                if any(p is q for other, q in model.named_parameters() if other != name)}
        missing = set(result.missing_keys) - tied
        if missing:
            log.info("statistics warm-up: %d tensor(s) not found by name in %s (e.g. %s); loading with "
                     "transformers", len(missing), self._checkpoint, sorted(missing)[0])
            return None
        return model
