"""The control plane: edit → commit → swap, rollback and status, inside the API-server process.

`ControlPlane` owns the ledger handle, the sidecar and the `Swapper`, and serialises every
version change behind one lock (edits hold it only to read the head and to swap, not while
the sidecar computes, so a rollback never waits for a v* optimisation). The HTTP routes
and the gRPC service reach it only through `editserve.control.operations.Operations` (which
authenticates, validates, applies the gate policy and audits); they never touch the engine
themselves. Every sidecar call has a deadline (`ControlSettings`): past it the sidecar is
killed (`SidecarTimeout`), the locks are released and the supervisor restarts it at the served
version.

An edit:

1. follow the ledger head if it moved outside this process (e.g. a CLI rollback);
2. the sidecar (at the head) computes the patch and its probe report (and, with a gate, the
   probe gate), and stores base copies of the touched matrices in the ledger unless the edit
   is a dry run or the gate rejected it; the engine keeps serving meanwhile; if the head
   moved in the meantime (a rollback), the edit fails with `LedgerConflict`;
3. expected checksums of the prospective version are computed from the ledger's base copies
   (per matrix and tensor-parallel rank, in vLLM's orientation) — still without pausing;
4. the swap: pause, apply on every rank, reset the prefix cache, verify, **commit to the
   ledger while paused**, resume. A failure anywhere restores the previous state on every
   rank and the ledger head does not move;
5. the sidecar moves to the new head and its checksums must equal the engine's (a mismatch
   counts ``editserve_parity_failures_total`` and fails the request after the commit; the
   next edit resynchronises the sidecar first).

A rollback is the same swap with an earlier version's patches; its commit step moves the
ledger head. A revert (`revert`) and an import (`import_patch`) are the same swap with the
head's patches minus, or plus, one patch; their commit step writes the new version.

`edit` reports its stages to an optional ``progress(stage, fraction, message)`` callback
(compute, keys, values, solve, probe from the sidecar; swap and commit here); the gRPC
server turns them into ``WatchEvents`` progress events.

At start (`start`), the ledger's head version is applied before the server
accepts its first request, after checking that the engine's base weights equal the ledger's
base copies.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from editserve.editing.arch import Layout
from editserve.editing.requests import EditRequest
from editserve.engine.errors import (
    EngineStateUnknown,
    ParityError,
    PluginSetupError,
    SwapFailed,
)
from editserve.engine.sidecar import (ComputeEdit, EditComputed, ProbePrompt, Progress, Scored, SidecarClient,
                                     SidecarConfig, TraceFact, Traced)
from editserve.engine.swap import DEFAULT_PAUSE_MODE, SwapResult, Swapper, check_mode, verify
from editserve.engine.wire import ApplyMessage, message_for, rank_range, weight_checksum
from editserve.errors import InvalidRequestError
from editserve.patches import Patch, materialize

log = logging.getLogger(__name__)

LEDGER_ENV = "EDITSERVE_LEDGER"
PAUSE_MODE_ENV = "EDITSERVE_PAUSE_MODE"
SIDECAR_DEVICE_ENV = "EDITSERVE_SIDECAR_DEVICE"
SIDECAR_THREADS_ENV = "EDITSERVE_SIDECAR_THREADS"
SIDECAR_TIMEOUT_ENV = "EDITSERVE_SIDECAR_TIMEOUT_S"              # compute (an edit's keys, values, solve, gate)
SIDECAR_READ_TIMEOUT_ENV = "EDITSERVE_SIDECAR_READ_TIMEOUT_S"    # probe / trace
SIDECAR_SYNC_TIMEOUT_ENV = "EDITSERVE_SIDECAR_SYNC_TIMEOUT_S"    # sync to a version, open the ledger
BASE_CACHE_ENV = "EDITSERVE_BASE_CACHE_MB"
VERSION_HEADER = "x-editserve-version"
VERSION_START_HEADER = "x-editserve-version-start"


@dataclass(frozen=True)
class ControlSettings:
    """Where the control plane finds things; the plugin reads them from the environment."""

    model: str | None                     # the checkpoint vLLM serves (a local HF directory)
    tensor_parallel_size: int = 1
    ledger_root: str | None = None        # None: $EDITSERVE_HOME/ledger/<fingerprint[:16]>
    pause_mode: str = DEFAULT_PAUSE_MODE
    sidecar_device: str | None = None     # None: cuda when available, else cpu
    sidecar_threads: int | None = None
    caller: str = "engine"
    drain_timeout_s: float = 600.0            # ``wait`` mode: longest wait for requests in flight
    sidecar_watch_s: float = 1.0              # how often the sidecar process is checked for life
    sidecar_retry_s: float = 30.0             # wait after a failed sidecar restart before the next try
    compute_timeout_s: float = 900.0          # deadline of an edit's computation on the sidecar
    read_timeout_s: float = 600.0             # deadline of a probe or trace on the sidecar
    sync_timeout_s: float = 300.0             # deadline of moving the sidecar to a version
    base_cache_bytes: int = 512 << 20         # base copies of matrices kept in memory (LRU)

    def __post_init__(self) -> None:
        check_mode(self.pause_mode)
        if self.tensor_parallel_size < 1:
            raise InvalidRequestError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.base_cache_bytes < 0:
            raise InvalidRequestError(f"base_cache_bytes must be >= 0, got {self.base_cache_bytes}")
        for name in ("sidecar_watch_s", "sidecar_retry_s", "compute_timeout_s", "read_timeout_s", "sync_timeout_s"):
            if not getattr(self, name) > 0:
                raise InvalidRequestError(f"{name} must be positive, got {getattr(self, name)!r}")

    @classmethod
    def from_env(cls, model: str | None, tensor_parallel_size: int = 1, environ: dict[str, str] | None = None,
                 ) -> "ControlSettings":
        env = os.environ if environ is None else environ
        threads = env.get(SIDECAR_THREADS_ENV)
        if threads is not None and not threads.strip().isdigit():
            raise InvalidRequestError(f"{SIDECAR_THREADS_ENV} must be a positive integer, got {threads!r}")
        def seconds(name: str, default: float) -> float:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise InvalidRequestError(f"{name} must be a number of seconds, got {raw!r}") from None
            if not (math.isfinite(value) and value > 0):
                raise InvalidRequestError(f"{name} must be a positive number of seconds, got {raw!r}")
            return value

        cache_mb = env.get(BASE_CACHE_ENV, "").strip()
        if cache_mb and not cache_mb.isdigit():
            raise InvalidRequestError(f"{BASE_CACHE_ENV} must be a whole number of MiB, got {cache_mb!r}")
        return cls(model=model, tensor_parallel_size=tensor_parallel_size, ledger_root=env.get(LEDGER_ENV) or None,
                   pause_mode=env.get(PAUSE_MODE_ENV) or DEFAULT_PAUSE_MODE,
                   sidecar_device=env.get(SIDECAR_DEVICE_ENV) or None,
                   sidecar_threads=int(threads) if threads else None,
                   compute_timeout_s=seconds(SIDECAR_TIMEOUT_ENV, 900.0),
                   read_timeout_s=seconds(SIDECAR_READ_TIMEOUT_ENV, 600.0),
                   sync_timeout_s=seconds(SIDECAR_SYNC_TIMEOUT_ENV, 300.0),
                   base_cache_bytes=(int(cache_mb) << 20) if cache_mb else 512 << 20)


@dataclass(frozen=True)
class VersionChange:
    """The result of an edit or rollback: which version is served now and what it cost."""

    version: int
    previous_version: int
    kind: str                                     # "edit" | "dry_run" | "replayed" | "rollback" | "revert" | "import" | "follow" | "start"
    pause_ms: float
    swap: dict[str, Any]
    timings_ms: dict[str, float]
    patch_id: str | None = None
    method: str | None = None
    probe_report: dict[str, Any] | None = None
    active_patches: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Served:
    """What the engine holds now (mutated only under the control plane's lock)."""

    version: int
    message: ApplyMessage
    expected: dict[tuple[str, int], str]
    epoch: int = 0                                # successful swaps so far


@dataclass
class _Counters:
    swaps_ok: int = 0
    swaps_failed: int = 0
    parity_failures: int = 0
    last_pause_ms: float | None = None
    last_drain_ms: float | None = None
    pauses_ms: list[float] = field(default_factory=list)
    sidecar_restarts: int = 0


def registry_for() -> Any:
    """The registry vLLM's ``/metrics`` route serves (editserve's metrics are registered on it)."""
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    return get_prometheus_registry()


def _log_restart_outcome(task: "asyncio.Task[None]") -> None:
    """Done-callback of a sidecar restart: its failure is logged even if nobody awaits it."""
    if not task.cancelled() and task.exception() is not None:
        log.error("sidecar restart failed: %s", task.exception())


def _optional_score(value: Any) -> float | None:
    """A probe fraction or KL from a report; None where it was not measured (absent, -1, not finite)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    x = float(value)
    return x if math.isfinite(x) and x >= 0 else None


def probe_scores(report: dict[str, Any]) -> tuple[float, float | None, float | None, float | None]:
    """(efficacy, paraphrase, neighbourhood, canary KL) of a probe report, for the probe gauges.

    With the probe gate (``report["gate"]``, `editserve.control.probe.ProbeReport`): its CounterFact
    fractions (neighbourhood = NS after the edit) and mean canary KL; otherwise the sidecar's own
    report (efficacy on the requests' prompts, paraphrase / neighbourhood fractions of the
    caller's probes, canary KL). None: not measured."""
    gate = report.get("gate")
    if gate is not None:
        efficacy = _optional_score(gate.get("efficacy"))
        return (efficacy if efficacy is not None else 0.0, _optional_score(gate.get("paraphrase")),
                _optional_score(gate.get("neighbourhood_after")), _optional_score(gate.get("canary_kl_mean")))
    scores = report.get("scores") or {}
    efficacy = _optional_score(scores.get("efficacy"))
    return (efficacy if efficacy is not None else 0.0, _optional_score(scores.get("paraphrase")),
            _optional_score(scores.get("neighbourhood")), _optional_score(report.get("canary_kl")))


class ControlPlane:
    """See the module docstring. Create, ``await start()``, then call `edit`/`rollback`/`status`."""

    def __init__(self, engine_client: Any, settings: ControlSettings, registry: Any = None) -> None:
        self.engine = engine_client
        self.settings = settings
        self.swapper = Swapper(engine_client, settings.tensor_parallel_size, settings.pause_mode)
        self._lock = asyncio.Lock()                 # every version change
        self._edit_lock = asyncio.Lock()            # edits one at a time (computing holds only this)
        self._not_swapping = asyncio.Event()
        self._not_swapping.set()
        self._inflight = 0                          # HTTP requests past the version middleware
        self._idle = asyncio.Event()
        self._idle.set()
        self._registry = registry
        self.ledger: Any = None
        self.sidecar: SidecarClient | None = None
        self.family: str | None = None
        self.workers: list[dict[str, Any]] = []
        self.served: _Served | None = None
        self.operations: Any = None                 # editserve.control.operations.Operations (set by it)
        self.counters = _Counters()
        self.metrics: Any = None
        self._sidecar_in_sync = False
        self._fingerprint: str | None = None
        self._sidecar_watch: asyncio.Task[None] | None = None
        self._sidecar_restart: asyncio.Task[None] | None = None
        self._sidecar_starting: SidecarClient | None = None     # a replacement still loading
        self._sidecar_failure: dict[str, Any] | None = None     # the last death / failed restart
        self._sidecar_retry_at = 0.0
        self._closing = False
        self._degraded: str | None = None
        self._base_cache: OrderedDict[str, tuple[torch.Tensor, Layout]] = OrderedDict()
        self._base_cache_bytes = 0
        self._expected_cache: OrderedDict[tuple[str, tuple[str, ...]], dict[int, str]] = OrderedDict()

    # -- start / stop -------------------------------------------------------------------------

    async def start(self) -> VersionChange:
        """Describe the workers, start the sidecar, open the ledger, check the base weights and
        apply the head version. Returns what was applied."""
        t0 = time.perf_counter()
        try:
            self.workers = list(await self.engine.collective_rpc("editserve_describe"))
        except Exception as exc:
            raise PluginSetupError(
                "the engine's workers do not answer editserve_describe; start vLLM with VLLM_PLUGINS=editserve "
                f"(the general plugin must load in every process): {exc}") from exc
        families = {w["family"] for w in self.workers}
        tp_sizes = {int(w["tp_size"]) for w in self.workers}
        if len(families) != 1 or tp_sizes != {self.settings.tensor_parallel_size}:
            raise PluginSetupError(f"workers report families {families} and TP sizes {tp_sizes}; expected one family "
                                   f"and TP size {self.settings.tensor_parallel_size}")
        self.family = families.pop()
        if not self.workers[0]["editable"]:
            raise PluginSetupError("no down-projection of the served model is dense; on CPU the editserve general "
                                   "plugin must be active before the model loads (VLLM_PLUGINS=editserve)")
        dtype = str(self.workers[0]["dtype"])
        self.sidecar = SidecarClient(SidecarConfig(
            checkpoint=self.settings.model, device=self.settings.sidecar_device, dtype=dtype,
            threads=self.settings.sidecar_threads, editserve_home=os.environ.get("EDITSERVE_HOME")))
        try:
            return await self._start_with_sidecar(t0)
        except BaseException:
            await self.close()
            raise

    async def _start_with_sidecar(self, t0: float) -> VersionChange:
        assert self.sidecar is not None and self.family is not None
        ready = await asyncio.to_thread(self.sidecar.wait_ready)
        if ready.family != self.family:
            raise PluginSetupError(f"the sidecar loaded a {ready.family!r} model, the engine serves {self.family!r}")
        self._fingerprint = ready.fingerprint
        self.ledger = await asyncio.to_thread(self._open_ledger, ready.fingerprint)
        await asyncio.to_thread(self.sidecar.open_ledger, str(self.ledger.root), self.settings.sync_timeout_s)
        self._init_metrics(int(ready.n_layers))
        await self._check_base()
        base_message = message_for(0, self.family, [])
        self.served = _Served(version=0, message=base_message, expected={})
        head = await asyncio.to_thread(self.ledger.head)
        async with self._lock:
            change = await self._swap_to_version(head, kind="start", commit_rollback=False)
        change = VersionChange(**{**change.to_dict(), "timings_ms": {
            **change.timings_ms, "start_total": round((time.perf_counter() - t0) * 1e3, 3),
            "sidecar_load": round(ready.seconds * 1e3, 3)}})
        self._sidecar_watch = asyncio.create_task(self._watch_sidecar(), name="editserve-sidecar-watch")
        log.info("editserve control plane ready: serving ledger version %d (%d patches) from %s; sidecar on %s",
                 change.version, change.active_patches, self.ledger.root, ready.device)
        return change

    def _open_ledger(self, fingerprint: str) -> Any:
        from editserve.ledger import Ledger

        return Ledger.open(self.settings.ledger_root, fingerprint, caller=self.settings.caller)

    def _init_metrics(self, n_layers: int) -> None:
        from editserve.metrics import Metrics

        registry = self._registry if self._registry is not None else registry_for()
        self.metrics = Metrics(registry, n_layers)

    async def _check_base(self) -> None:
        """The engine's weights of every matrix the ledger has a base copy of must be that copy
        (no patch is applied yet, so the live weights are the checkpoint's)."""
        names = sorted(await asyncio.to_thread(self.ledger.base_names))
        if not names:
            return
        expected = await asyncio.to_thread(self._expected_for, [], names)
        reports = await self.swapper.checksums(names)
        try:
            verify(reports, expected, self.settings.tensor_parallel_size)
        except Exception as exc:
            raise PluginSetupError(f"the served checkpoint's weights differ from the ledger's base copies at "
                                   f"{self.ledger.root}: {exc}") from exc

    async def close(self) -> None:
        self._closing = True
        if self._sidecar_watch is not None:
            self._sidecar_watch.cancel()
        restart = self._sidecar_restart
        if restart is not None and not restart.done():
            starting = self._sidecar_starting
            if starting is not None:
                await asyncio.to_thread(starting.kill)
            restart.cancel()
            try:
                await restart
            except (asyncio.CancelledError, Exception) as exc:  # shutting down: its outcome no longer matters
                log.debug("sidecar restart ended at shutdown: %r", exc)
        if self.sidecar is not None:
            sidecar, self.sidecar = self.sidecar, None
            await asyncio.to_thread(sidecar.close)
        if self.ledger is not None:
            ledger, self.ledger = self.ledger, None
            ledger.close()

    # -- sidecar supervision ------------------------------------------------------------------

    async def _watch_sidecar(self) -> None:
        """Notice a dead sidecar process within `sidecar_watch_s` and replace it (see `_restart_sidecar`)."""
        while not self._closing:
            await asyncio.sleep(self.settings.sidecar_watch_s)
            sidecar = self.sidecar
            restarting = self._sidecar_restart is not None and not self._sidecar_restart.done()
            if (sidecar is not None and not sidecar.alive and not restarting
                    and time.monotonic() >= self._sidecar_retry_at):
                try:
                    await self._begin_sidecar_restart()
                except Exception as exc:  # noqa: BLE001 - reported in status and the log; retried later
                    log.error("sidecar restart failed (next try in %.0f s): %s", self.settings.sidecar_retry_s, exc)

    def _begin_sidecar_restart(self) -> asyncio.Task[None]:
        """The running restart, or a new one (the caller awaits it)."""
        task = self._sidecar_restart
        if task is None or task.done():
            task = asyncio.create_task(self._restart_sidecar(), name="editserve-sidecar-restart")
            task.add_done_callback(_log_restart_outcome)
            self._sidecar_restart = task
        return task

    async def _ensure_sidecar(self) -> None:
        """Wait until a live sidecar exists: if it died, restart it now (or wait for the running restart)."""
        task = self._sidecar_restart
        if (task is None or task.done()) and self.sidecar is not None and self.sidecar.alive:
            return
        if self._closing:
            from editserve.engine.errors import SidecarError

            raise SidecarError("the control plane is shutting down")
        await asyncio.shield(self._begin_sidecar_restart())

    async def _restart_sidecar(self) -> None:
        """Replace a dead sidecar: count and report the death, start a new process with the same
        configuration, check it loaded the same weights, open the ledger, and (under the version
        lock) make it mirror the served version with the usual parity check."""
        from editserve.engine.errors import SidecarError

        old = self.sidecar
        assert old is not None and self.ledger is not None
        t0 = time.perf_counter()
        exit_code = old.exitcode
        self._sidecar_in_sync = False
        self.counters.sidecar_restarts += 1
        self.metrics.set_sidecar_up(False)
        self.metrics.record_sidecar_restart()
        self._sidecar_failure = {"pid": old.pid, "exit_code": exit_code, "at": time.time(), "error": None}
        log.error("the sidecar process (pid %s) died with exit code %s; starting a new one", old.pid, exit_code)
        await asyncio.to_thread(old.close)
        new = await asyncio.to_thread(SidecarClient, old.config)
        self._sidecar_starting = new
        try:
            ready = await asyncio.to_thread(new.wait_ready)
            if ready.fingerprint != self._fingerprint:
                raise SidecarError(f"the restarted sidecar loaded weights with fingerprint {ready.fingerprint[:16]}, "
                                   f"expected {str(self._fingerprint)[:16]}")
            await asyncio.to_thread(new.open_ledger, str(self.ledger.root), self.settings.sync_timeout_s)
            if self._closing:
                raise SidecarError("the control plane is shutting down")
            async with self._lock:
                self.sidecar = new
                await self._resync_sidecar()
        except BaseException as exc:
            self._sidecar_failure = {**self._sidecar_failure, "error": f"{type(exc).__name__}: {exc}"}
            self._sidecar_retry_at = time.monotonic() + self.settings.sidecar_retry_s
            if self.sidecar is not new:
                await asyncio.to_thread(new.kill)
                await asyncio.to_thread(new.close)
            raise
        finally:
            self._sidecar_starting = None
        self._sidecar_failure = {**self._sidecar_failure, "restart_seconds": round(time.perf_counter() - t0, 3)}
        log.info("sidecar restarted (pid %s) in %.1f s; it mirrors version %d", new.pid, time.perf_counter() - t0,
                 self.served.version if self.served else -1)

    # -- expected checksums -------------------------------------------------------------------

    def _base(self, name: str) -> tuple[torch.Tensor, Layout]:
        """The ledger's base copy of `name`, from an LRU cache of at most `base_cache_bytes`."""
        hit = self._base_cache.get(name)
        if hit is not None:
            self._base_cache.move_to_end(name)
            return hit
        hit = self.ledger.base_copy(name)
        size = hit[0].numel() * hit[0].element_size()
        if size <= self.settings.base_cache_bytes:
            self._base_cache[name] = hit
            self._base_cache_bytes += size
            while self._base_cache_bytes > self.settings.base_cache_bytes:
                _, (old, _) = self._base_cache.popitem(last=False)
                self._base_cache_bytes -= old.numel() * old.element_size()
        return hit

    def _expected_for(self, patches: Sequence[Patch], names: Iterable[str]) -> dict[tuple[str, int], str]:
        """Per (matrix, rank) checksums of base + Σ deltas of `patches`, from the ledger's base copies."""
        tp = self.settings.tensor_parallel_size
        deltas: dict[str, list[Any]] = {}
        keys: dict[str, list[str]] = {}
        for p in patches:
            digest = p.digest
            for i, d in enumerate(p.deltas):
                deltas.setdefault(d.name, []).append(d)
                keys.setdefault(d.name, []).append(f"{digest}:{i}")
        out: dict[tuple[str, int], str] = {}
        for name in names:
            cache_key = (name, tuple(keys.get(name, [])))
            per_rank = self._expected_cache.get(cache_key)
            if per_rank is None:
                base, layout = self._base(name)
                full = materialize(base, deltas.get(name, []), layout)
                w = full if layout is Layout.OUT_IN else full.t()         # vLLM holds [out, in]
                per_rank = {}
                for r in range(tp):
                    lo, hi = rank_range(int(w.shape[1]), tp, r)
                    per_rank[r] = weight_checksum(w[:, lo:hi])
                self._expected_cache[cache_key] = per_rank
                while len(self._expected_cache) > 4096:
                    self._expected_cache.popitem(last=False)
            else:
                self._expected_cache.move_to_end(cache_key)
            for r, sha in per_rank.items():
                out[(name, r)] = sha
        return out

    # -- swaps --------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self.served is None or self.ledger is None:
            raise PluginSetupError("the editserve control plane has not started")
        if self._degraded:
            raise EngineStateUnknown(f"edits are refused: {self._degraded}")

    @property
    def served_version(self) -> int | None:
        """The version the engine serves now (None before `start`)."""
        return self.served.version if self.served is not None else None

    async def _swap(self, message: ApplyMessage, patches: Sequence[Patch], commit: Any) -> tuple[SwapResult, dict]:
        """Swap to `message` (whose content is `patches`) with the protocol of `Swapper.swap`."""
        assert self.served is not None
        served = self.served
        names = sorted(set(message.names) | set(served.message.names))
        expected = await asyncio.to_thread(self._expected_for, patches, names)
        previous_expected = {k: v for k, v in served.expected.items()}
        missing = [n for n in names if (n, 0) not in previous_expected]
        if missing:
            # Matrices the served version does not touch: a restore must bring back exactly what
            # the engine holds now (its own base), whatever the ledger's copy says.
            for report in await self.swapper.checksums(missing):
                if report.error:
                    raise SwapFailed(f"rank {report.rank} cannot checksum {missing}: {report.error}; nothing was "
                                     "changed", restored_version=served.version)
                previous_expected.update({(n, report.tp_rank): sha for n, sha in report.checksums.items()})
        self._not_swapping.clear()
        try:
            if self.settings.pause_mode == "wait":
                # New requests are held by the middleware; the ones already admitted finish on the
                # old version (including those not yet handed to the engine), so every completion
                # comes from exactly one version.
                t_drain = time.perf_counter()
                try:
                    await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout_s)
                except asyncio.TimeoutError:
                    raise SwapFailed(f"{self._inflight} request(s) still in flight after "
                                     f"{self.settings.drain_timeout_s:.0f} s; nothing was changed",
                                     restored_version=served.version) from None
                self.counters.last_drain_ms = (time.perf_counter() - t_drain) * 1e3
            result = await self.swapper.swap(message, expected, served.message, previous_expected, commit)
        except EngineStateUnknown as exc:
            self._degraded = str(exc)
            self.counters.swaps_failed += 1
            self.metrics.record_swap_result("failed")
            raise
        except SwapFailed:
            self.counters.swaps_failed += 1
            self.metrics.record_swap_result("failed")
            raise
        finally:
            self._not_swapping.set()
        self.counters.swaps_ok += 1
        self.counters.last_pause_ms = result.pause_seconds * 1e3
        self.counters.pauses_ms = (self.counters.pauses_ms + [result.pause_seconds * 1e3])[-1000:]
        self.metrics.record_swap_result("ok")
        self.metrics.record_swap(result.pause_seconds)
        return result, expected

    def _set_served(self, version: int, message: ApplyMessage, expected: dict[tuple[str, int], str],
                    active: int) -> None:
        assert self.served is not None
        label = ApplyMessage(version=version, family=message.family, matrices=message.matrices)
        self.served = _Served(version=version, message=label, expected=dict(expected), epoch=self.served.epoch + 1)
        self.metrics.set_head(version, active)

    async def _swap_to_version(self, version: int, kind: str, commit_rollback: bool,
                               expected_head: int | None = None, caller: str | None = None) -> VersionChange:
        """Serve ledger `version` (must hold the lock). With `commit_rollback`, the ledger head is
        moved to `version` inside the pause (a rollback, recorded as `caller`); otherwise the head
        is already there."""
        assert self.served is not None
        t0 = time.perf_counter()
        previous = self.served.version
        patches = await asyncio.to_thread(self.ledger.active_patches, version)
        message = message_for(version, self.family, patches)
        commit = None
        if commit_rollback:
            async def commit() -> int:
                return await asyncio.to_thread(self.ledger.rollback, version, caller or self.settings.caller,
                                               expected_head)
        result, expected = await self._swap(message, patches, commit)
        self._set_served(version, message, expected, len(patches))
        t_swap = time.perf_counter()
        await self._sync_sidecar(version, result)
        timings = {"swap": round((t_swap - t0) * 1e3, 3), "sidecar_sync": round((time.perf_counter() - t_swap) * 1e3, 3)}
        return VersionChange(version=version, previous_version=previous, kind=kind,
                             pause_ms=round(result.pause_seconds * 1e3, 3), swap=result.to_dict(),
                             timings_ms=timings, active_patches=len(patches))

    async def _sync_sidecar(self, version: int, result: SwapResult) -> None:
        """Move the sidecar to `version`; its checksums must equal the engine's just-reported ones.

        A dead sidecar is not an error of the version change that was just served: the sync is
        skipped, a restart is started, and the new sidecar mirrors the served version."""
        from editserve.engine.errors import SidecarError

        sidecar = self.sidecar
        assert sidecar is not None
        names = tuple(sorted({n for r in result.reports for n in r.checksums}))
        if not sidecar.alive:
            self._sidecar_died_during(f"the swap to version {version}")
            return
        try:
            synced = await asyncio.to_thread(sidecar.sync, version, self.settings.tensor_parallel_size, names,
                                           self.settings.sync_timeout_s)
        except SidecarError:
            self._sidecar_in_sync = False
            self.metrics.set_sidecar_up(False)
            if not sidecar.alive:
                self._sidecar_died_during(f"the swap to version {version}")
                return
            raise
        except Exception:
            self._sidecar_in_sync = False
            self.metrics.set_sidecar_up(False)
            raise
        engine = {(n, r.tp_rank): sha for r in result.reports for n, sha in r.checksums.items()}
        bad = sorted(f"{n} rank {k}" for (n, k), sha in engine.items() if synced.checksums.get((n, k)) != sha)
        if bad:
            self._sidecar_in_sync = False
            self.metrics.set_sidecar_up(False)
            self.counters.parity_failures += 1
            self.metrics.parity_failure()
            raise ParityError(f"after the swap to version {version}, the sidecar's weights differ from the engine's "
                              f"for {', '.join(bad)}")
        self._sidecar_in_sync = True
        self.metrics.set_sidecar_up(True)
        self.metrics.set_drifts(synced.drift)
        self.metrics.set_ledger_bytes(await asyncio.to_thread(self.ledger.nbytes))

    def _sidecar_died_during(self, what: str) -> None:
        """The sidecar is dead: mark it out of sync and make sure a restart is under way."""
        self._sidecar_in_sync = False
        self.metrics.set_sidecar_up(False)
        log.warning("the sidecar process is dead during %s; it is restarted and will mirror the served version", what)
        if not self._closing:
            self._begin_sidecar_restart()

    async def _follow_head(self) -> VersionChange | None:
        """Serve the ledger head if it moved outside this process (must hold the lock)."""
        assert self.served is not None
        head = await asyncio.to_thread(self.ledger.head)
        if head == self.served.version:
            if not self._sidecar_in_sync:
                await self._resync_sidecar()
            return None
        log.info("ledger head moved to version %d outside this engine (serving %d); following it",
                 head, self.served.version)
        return await self._swap_to_version(head, kind="follow", commit_rollback=False)

    async def _resync_sidecar(self) -> None:
        assert self.served is not None
        reports = await self.swapper.checksums(sorted(self.served.message.names))
        fake = SwapResult(label=self.served.version, pause_seconds=0.0, rpc_seconds=0.0, worker_seconds=0.0,
                          reports=tuple(reports))
        await self._sync_sidecar(self.served.version, fake)

    # -- public operations --------------------------------------------------------------------

    async def edit(
        self,
        requests: Sequence[EditRequest],
        method: str = "rome",
        layers: Sequence[int] | None = None,
        hparams: dict[str, Any] | None = None,
        expected_head: int | None = None,
        caller: str | None = None,
        idempotency_key: str | None = None,
        probes: Sequence[ProbePrompt] = (),
        gate: Any = None,
        dry_run: bool = False,
        progress: Callable[[str, float, str], None] | None = None,
        report_extra: dict[str, Any] | None = None,
    ) -> VersionChange:
        """Compute, commit and serve a patch for `requests` (see the module docstring).

        `gate` (an `editserve.control.probe.GateConfig`) runs the probe gate on the sidecar with the
        candidate patch applied; a failing gate raises `editserve.control.errors.ProbeRejected`
        before anything is committed or swapped. `dry_run` returns the computed report without
        committing (``kind="dry_run"``, the version stays the head); neither a dry run nor a rejected
        edit writes anything to the ledger. `progress` (called from worker threads too) receives
        ``(stage, fraction, message)`` as the edit goes on (see the module docstring). `report_extra`
        is merged into the probe report the ledger records (e.g. who skipped the gate)."""
        t0 = time.perf_counter()
        stages: dict[str, float] = {}                   # seconds per stage, filled by _edit as they run
        try:
            return await self._edit(t0, requests, method, layers, hparams, expected_head, caller, idempotency_key,
                                    probes, gate, dry_run, progress, stages=stages, report_extra=report_extra)
        except Exception as exc:
            if self.metrics is not None and method in self.metrics.methods:
                from editserve.control.errors import ProbeRejected

                outcome = "rejected" if isinstance(exc, (ValueError, ProbeRejected)) else "failed"
                self.metrics.record_edit(method, outcome, stages, total_seconds=time.perf_counter() - t0)
            raise

    async def _followed_head(self, expected_head: int | None) -> int:
        """Under the version lock: serve the ledger head if it moved, check `expected_head`, return it."""
        from editserve.ledger import LedgerConflict

        await self._follow_head()
        assert self.served is not None
        head = self.served.version
        if expected_head is not None and expected_head != head:
            raise LedgerConflict(f"expected head {expected_head}, the head is version {head}",
                                 expected_head=expected_head, actual_head=head)
        return head

    async def _replayed(self, key: str | None, kind: str, matches: Callable[[Any], bool]) -> VersionChange | None:
        """A retried call (same idempotency key): the version the first call created, reported
        without computing or swapping anything; the same key used for another request is refused."""
        from editserve.ledger.errors import IdempotencyMismatch

        if not key:
            return None
        info = await asyncio.to_thread(self.ledger.version_for_key, key)
        if info is None:
            return None
        if not matches(info):
            raise IdempotencyMismatch(f"idempotency key {key!r} was used for version {info.version} "
                                      f"({info.kind}) with another request")
        log.info("%s replayed: idempotency key %r already created version %d", kind, key, info.version)
        assert self.served is not None
        return VersionChange(version=info.version, previous_version=self.served.version, kind="replayed",
                             pause_ms=0.0, swap={}, timings_ms={}, patch_id=info.patch_id, method=info.method,
                             probe_report=info.probe_report,
                             active_patches=len(await asyncio.to_thread(self.ledger.active_ids, info.version)))

    async def _edit(self, t0: float, requests: Sequence[EditRequest], method: str, layers: Sequence[int] | None,
                    hparams: dict[str, Any] | None, expected_head: int | None, caller: str | None,
                    idempotency_key: str | None, probes: Sequence[ProbePrompt], gate: Any = None,
                    dry_run: bool = False, progress: Callable[[str, float, str], None] | None = None,
                    stages: dict[str, float] | None = None,
                    report_extra: dict[str, Any] | None = None) -> VersionChange:
        from editserve.ledger import LedgerConflict

        stages = {} if stages is None else stages

        def report(stage: str, fraction: float, message: str = "") -> None:
            if progress is not None:
                progress(stage, fraction, message)

        def forward(p: Progress) -> None:
            report(p.stage, p.fraction, p.message)

        self._check_usable()
        async with self._edit_lock:                     # one edit at a time
            await self._ensure_sidecar()                # a dead sidecar is replaced first
            async with self._lock:
                assert self.served is not None and self.sidecar is not None
                t_wait = time.perf_counter()
                await self._follow_head()
                head = self.served.version
                if not dry_run:
                    replayed = await self._replayed(idempotency_key, "edit", lambda i: (
                        i.kind == "commit" and i.method == method and tuple(i.requests) == tuple(requests)))
                    if replayed is not None:
                        return replayed
                if expected_head is not None and expected_head != head:
                    raise LedgerConflict(f"expected head {expected_head}, the head is version {head}",
                                         expected_head=expected_head, actual_head=head)
            # The patch is computed without holding the version lock: serving goes on, and a
            # rollback does not wait for a long v* optimisation.
            computed = await asyncio.to_thread(self.sidecar.compute, ComputeEdit(
                version=head, requests=tuple(requests), method=method,
                layers=tuple(layers) if layers is not None else None, hparams=hparams, probes=tuple(probes),
                gate=gate, store_bases=not dry_run), forward, self.settings.compute_timeout_s)
            t_computed = time.perf_counter()
            if report_extra:
                computed = EditComputed(patch=computed.patch, probe_report={**computed.probe_report, **report_extra},
                                        seconds=computed.seconds)
            stages.update(self._compute_stages(computed.patch.timings, computed.probe_report))
            # The probe gauges show every probe: committed, rejected and dry-run edits alike.
            self.metrics.record_probe(*probe_scores(computed.probe_report))
            gate_report = computed.probe_report.get("gate")
            if gate_report is not None and not gate_report["passed"]:
                from editserve.control.errors import ProbeRejected

                raise ProbeRejected("the probe gate rejected the edit; nothing was committed: "
                                    + "; ".join(gate_report["failures"]), gate_report)
            if dry_run:
                return VersionChange(version=head, previous_version=head, kind="dry_run", pause_ms=0.0, swap={},
                                     timings_ms={"compute": round((t_computed - t_wait) * 1e3, 3)},
                                     patch_id=computed.patch.digest, method=method,
                                     probe_report=computed.probe_report, active_patches=len(
                                         await asyncio.to_thread(self.ledger.active_ids, head)))
            async with self._lock:
                now = await asyncio.to_thread(self.ledger.head)
                if self.served.version != head or now != head:
                    raise LedgerConflict(f"the head moved from version {head} to {now} while the patch was computed; "
                                         "nothing was committed (retry the edit)", expected_head=head, actual_head=now)
                patch = computed.patch
                patches = await asyncio.to_thread(self.ledger.active_patches, head)
                target = patches + [patch]
                message = message_for(-1, self.family, target)
                who = caller or self.settings.caller

                async def commit() -> int:
                    version = await asyncio.to_thread(
                        self.ledger.commit, patch, head, who, computed.probe_report, idempotency_key)
                    active = await asyncio.to_thread(self.ledger.active_ids, version)
                    if tuple(active) != tuple(p.digest for p in target):
                        raise SwapFailed(f"ledger version {version} does not hold the patches just applied "
                                         f"(an idempotent replay of an earlier request?)")
                    return version

                t_swap0 = time.perf_counter()
                report("swap", 0.9, f"pause, apply {len(target)} patch(es) on {self.settings.tensor_parallel_size} "
                                    "rank(s), verify, commit")
                result, expected = await self._swap(message, target, commit)
                version = int(result.committed)
                self._set_served(version, message, expected, len(target))
                t_swapped = time.perf_counter()
                stages["swap"] = t_swapped - t_swap0
                if result.phases and "commit" in result.phases:
                    stages["commit"] = float(result.phases["commit"])
                report("commit", 0.95, f"version {version} committed and served (pause "
                                       f"{result.pause_seconds * 1e3:.1f} ms)")
                await self._sync_sidecar(version, result)
                t_end = time.perf_counter()
        timings = {
            "lock_wait": (t_wait - t0), "compute": (t_computed - t_wait), "prepare": (t_swap0 - t_computed),
            "swap": (t_swapped - t_swap0), "sidecar_sync": (t_end - t_swapped), "total": (t_end - t0),
        }
        self.metrics.record_edit(method, "committed", stages, total_seconds=timings["total"])
        log.info("edit %s → version %d served (pause %.2f ms, total %.2f s)", patch.digest[:12], version,
                 result.pause_seconds * 1e3, timings["total"])
        return VersionChange(version=version, previous_version=head, kind="edit",
                             pause_ms=round(result.pause_seconds * 1e3, 3), swap=result.to_dict(),
                             timings_ms={k: round(v * 1e3, 3) for k, v in timings.items()},
                             patch_id=patch.digest, method=method, probe_report=computed.probe_report,
                             active_patches=len(target))

    @staticmethod
    def _compute_stages(patch_timings: dict[str, float], report: dict[str, Any]) -> dict[str, float]:
        """Seconds of the sidecar's stages: keys, values, solve (from the patch) and probe."""
        out = {stage: float(patch_timings[stage]) for stage in ("keys", "values", "solve") if stage in patch_timings}
        if isinstance(report.get("probe_seconds"), (int, float)):
            out["probe"] = float(report["probe_seconds"])
        return out

    async def rollback(self, version: int, expected_head: int | None = None, caller: str | None = None) -> VersionChange:
        """Serve ledger `version` and move the ledger head to it (inside the swap's pause)."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InvalidRequestError(f"version must be a non-negative integer, got {version!r}")
        self._check_usable()
        async with self._lock:
            head = await self._followed_head(expected_head)
            await asyncio.to_thread(self.ledger.version, version)           # VersionNotFound if absent
            change = await self._swap_to_version(version, kind="rollback", commit_rollback=True, expected_head=head,
                                                 caller=caller)
        self.metrics.record_rollback()
        return change

    async def revert(self, version: int, caller: str | None = None, expected_head: int | None = None,
                     idempotency_key: str | None = None) -> VersionChange:
        """Serve a new version equal to the head without the patch that `version` added; the patches
        added after it stay as they are (the ledger's revert without rebase)."""
        from editserve.ledger import RevertError

        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InvalidRequestError(f"version must be a non-negative integer, got {version!r}")
        self._check_usable()
        info = await asyncio.to_thread(self.ledger.version, version)          # VersionNotFound
        if info.patch_id is None:
            raise RevertError(f"version {version} ({info.kind}) added no patch; there is nothing to revert")
        removed = info.patch_id
        who = caller or self.settings.caller
        replayed = await self._replayed(idempotency_key, "revert", lambda i: i.kind == "revert" and removed in i.removed)
        if replayed is not None:
            return replayed

        def target_of(current: list[Patch]) -> list[Patch]:
            if removed not in [p.digest for p in current]:
                raise RevertError(f"the patch of version {version} ({removed[:12]}) is not active at the head")
            return [p for p in current if p.digest != removed]

        def write(head: int) -> int:
            return self.ledger.revert(version, who, expected_head=head, idempotency_key=idempotency_key).version

        change = await self._change("revert", expected_head, target_of, write, patch_id=removed)
        self.metrics.record_revert()
        return change

    async def import_patch(self, src: str | Path, caller: str | None = None, expected_head: int | None = None,
                           idempotency_key: str | None = None) -> VersionChange:
        """Validate the exported patch in directory `src` (`editserve.ledger.transfer`), then commit
        and serve it on top of the head."""
        from editserve.ledger.errors import ImportRejected
        from editserve.ledger.transfer import read_patch_export

        self._check_usable()
        src = Path(src)
        patch = await asyncio.to_thread(read_patch_export, self.ledger, src)
        who = caller or self.settings.caller
        replayed = await self._replayed(idempotency_key, "import",
                                        lambda i: i.kind == "import" and i.patch_id == patch.digest)
        if replayed is not None:
            return replayed

        def target_of(current: list[Patch]) -> list[Patch]:
            if patch.digest in [p.digest for p in current]:
                raise ImportRejected(f"patch {patch.digest[:12]} is already active at the head")
            return current + [patch]

        def write(head: int) -> int:
            # Validated once above, before the pause; inside it only the ledger write remains.
            return self.ledger._import([patch], head, who, idempotency_key, None, Layout.OUT_IN, replace=False,
                                       details={"source": "control plane import"})

        return await self._change("import", expected_head, target_of, write, patch_id=patch.digest)

    async def _change(self, kind: str, expected_head: int | None, target_of: Callable[[list[Patch]], Sequence[Patch]],
                      write: Callable[[int], int], patch_id: str | None = None) -> VersionChange:
        """Under the version lock: follow the head, swap to ``target_of(active patches at the head)``
        with ``write(head)`` (the new ledger version) as the swap's commit step, move the sidecar."""
        t0 = time.perf_counter()
        async with self._lock:
            head = await self._followed_head(expected_head)
            current = await asyncio.to_thread(self.ledger.active_patches, head)
            target = list(target_of(current))
            message = message_for(-1, self.family, target)

            async def commit() -> int:
                version = await asyncio.to_thread(write, head)
                active = await asyncio.to_thread(self.ledger.active_ids, version)
                if tuple(active) != tuple(p.digest for p in target):
                    raise SwapFailed(f"ledger version {version} does not hold the patches just applied")
                return version

            result, expected = await self._swap(message, target, commit)
            version = int(result.committed)
            self._set_served(version, message, expected, len(target))
            t_swap = time.perf_counter()
            await self._sync_sidecar(version, result)
        t_end = time.perf_counter()
        log.info("%s → version %d served (pause %.2f ms)", kind, version, result.pause_seconds * 1e3)
        return VersionChange(version=version, previous_version=head, kind=kind,
                             pause_ms=round(result.pause_seconds * 1e3, 3), swap=result.to_dict(),
                             timings_ms={"swap": round((t_swap - t0) * 1e3, 3),
                                         "sidecar_sync": round((t_end - t_swap) * 1e3, 3)},
                             patch_id=patch_id, active_patches=len(target))

    async def score(self, items: Sequence[tuple[str, str, str | None]]) -> Scored:
        """Score (prompt, target, other or None) continuations on the served version (on the
        sidecar, which holds exactly the served version's patches while it scores)."""
        self._check_usable()
        assert self.served is not None and self.sidecar is not None
        return await asyncio.to_thread(self.sidecar.score, self.served.version, tuple(items),
                                       self.settings.read_timeout_s)

    async def trace(self, prompt: str, subject: str, target: str | None = None, kind: str = "hidden",
                    samples: int = 10, seed: int = 0, window: int = 10, noise_scale: float = 3.0) -> Traced:
        """Causally trace a fact on the served version (on the sidecar; see editing/tracing.py).
        The sidecar answers one request at a time, so an edit submitted meanwhile waits for it."""
        self._check_usable()
        await self._ensure_sidecar()
        assert self.served is not None and self.sidecar is not None
        msg = TraceFact(version=self.served.version, prompt=prompt, subject=subject, target=target, kind=kind,
                        samples=samples, seed=seed, window=window, noise_scale=noise_scale)
        return await asyncio.to_thread(self.sidecar.trace, msg, self.settings.read_timeout_s)

    async def follow(self) -> VersionChange | None:
        """Serve the ledger head if it moved (e.g. after ``editserve ledger rollback``)."""
        self._check_usable()
        async with self._lock:
            return await self._follow_head()

    async def engine_checksums(self, names: Sequence[str] | None = None) -> dict[str, dict[int, str]]:
        """Live checksums per matrix and rank (default: the matrices the served version touches)."""
        self._check_usable()
        assert self.served is not None
        wanted = list(names) if names is not None else sorted(self.served.message.names)
        reports = await self.swapper.checksums(wanted)
        out: dict[str, dict[int, str]] = {}
        for r in reports:
            if r.error:
                raise SwapFailed(f"rank {r.rank} could not compute checksums: {r.error}")
            for n, sha in r.checksums.items():
                out.setdefault(n, {})[r.tp_rank] = sha
        return out

    async def status(self) -> dict[str, Any]:
        served = self.served
        pauses = sorted(self.counters.pauses_ms)
        head = await asyncio.to_thread(self.ledger.head) if self.ledger is not None else None
        return {
            "served_version": served.version if served else None,
            "ledger_head": head,
            "ledger_root": str(self.ledger.root) if self.ledger is not None else None,
            "active_matrices": list(served.message.names) if served else [],
            "family": self.family,
            "tensor_parallel_size": self.settings.tensor_parallel_size,
            "pause_mode": self.settings.pause_mode,
            "swaps_ok": self.counters.swaps_ok,
            "swaps_failed": self.counters.swaps_failed,
            "parity_failures": self.counters.parity_failures,
            "last_pause_ms": self.counters.last_pause_ms,
            "last_drain_ms": self.counters.last_drain_ms,
            "requests_in_flight": self._inflight,
            "median_pause_ms": pauses[len(pauses) // 2] if pauses else None,
            "sidecar": {"alive": self.sidecar.alive if self.sidecar else False,
                        "in_sync": self._sidecar_in_sync,
                        "device": self.sidecar.ready.device if self.sidecar and self.sidecar.ready else None,
                        "pid": self.sidecar.pid if self.sidecar else None,
                        "restarting": self._sidecar_restart is not None and not self._sidecar_restart.done(),
                        "restarts": self.counters.sidecar_restarts,
                        "last_failure": self._sidecar_failure},
            "degraded": self._degraded,
            "workers": [{k: w[k] for k in ("rank", "tp_rank", "tp_size", "dtype", "device")} | {
                "editable_layers": len(w["editable"])} for w in self.workers],
        }

    # -- request version tracking (used by the HTTP middleware) ----------------------------------

    async def admit(self) -> tuple[int, int]:
        """Admit one HTTP request: wait while a swap is in progress, count it as in flight, and
        return its start mark (epoch, served version). Pair with `release`."""
        while not self._not_swapping.is_set():
            await self._not_swapping.wait()
        self._inflight += 1
        self._idle.clear()
        return self.version_mark()

    def release(self) -> None:
        self._inflight -= 1
        if self._inflight <= 0:
            self._inflight = 0
            self._idle.set()

    def version_mark(self) -> tuple[int, int]:
        """(epoch, served version) now; a request whose start and end marks differ was in flight
        during a swap (in ``keep`` mode its tokens may come from both versions)."""
        served = self.served
        return (served.epoch, served.version) if served is not None else (0, 0)

    def completion_done(self, spanned: bool) -> None:
        if self.metrics is not None:
            self.metrics.record_completion(spanned)
