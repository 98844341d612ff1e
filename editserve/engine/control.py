"""The control plane: edit → commit → swap, rollback and status, inside the API-server process.

`ControlPlane` owns the ledger handle, the sidecar and the `Swapper`, and serialises every
version change behind one lock (edits hold it only to read the head and to swap, not while
the sidecar computes, so a rollback never waits for a v* optimisation). The HTTP routes
and the gRPC service reach it only through `editserve.control.operations.Operations` (which
authenticates, validates, applies the gate policy and audits); they never touch the engine
themselves. Every sidecar call has a deadline (`ControlSettings`): past it the sidecar is
killed (`SidecarTimeout`), the locks are released and the supervisor restarts it at the served
version. Dependency direction: ``editserve.control`` drives this module through that small
interface; nothing in ``editserve.engine`` imports ``editserve.control`` at module import time
(only inside functions: the plugin's wiring, the gate on the sidecar, the gate's error type).

Layout of the engine's control plane: `settings` (ControlSettings, environment), `changes`
(VersionChange), `admission` (requests held during swaps, version headers), `expected`
(expected checksums, bounded base-copy cache), `supervisor` (sidecar supervision),
`orchestration` (swaps and what is served), `computed` (rebase, consolidation, a revert out of a
consolidation: computed on the sidecar, served by one swap), `probe_scores` (a report's scores for
the gauges), and here: start / close, the operations (edit, rollback, revert, import, score,
trace, follow, checksums) and ``status`` (extended by `Operations.status`).

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

A serve-only replica (``EDITSERVE_SIDECAR=0``, `editserve.engine.serveonly`) starts no sidecar:
it opens the ledger with the checkpoint's fingerprint, serves and follows the head the same way
(`_sync_sidecar` is a no-op), and refuses edits, probes and traces (`_require_sidecar`).

At start (`start`), the ledger's head version is applied before the server
accepts its first request, after checking that the engine's base weights equal the ledger's
base copies.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from editserve.control.methods import SLOTS_METHOD, server_default_method
from editserve.editing.arch import MLP_HALVES, Layout
from editserve.editing.hparams import file_names, load_hparams
from editserve.editing.requests import EditRequest
from editserve.engine.admission import VERSION_HEADER, VERSION_START_HEADER, Admission
from editserve.engine.changes import VersionChange
from editserve.engine.computed import ComputedChanges, reporter
from editserve.engine.autoconsolidate import AutoConsolidation
from editserve.engine.errors import PluginSetupError, SwapFailed
from editserve.engine.expected import ExpectedChecksums
from editserve.engine.orchestration import Counters, Served, SwapOrchestration
from editserve.engine.policy import EditPolicy, heldout_token, matrices_token, slots_token
from editserve.engine.probe_scores import probe_scores
from editserve.engine.settings import (BASE_CACHE_ENV, LEDGER_ENV, PAUSE_MODE_ENV, SIDECAR_DEVICE_ENV,
                                       SIDECAR_READ_TIMEOUT_ENV, SIDECAR_SYNC_TIMEOUT_ENV, SIDECAR_THREADS_ENV,
                                       SIDECAR_TIMEOUT_ENV, ControlSettings)
from editserve.engine.sidecar import (ComputeEdit, EditComputed, ProbePrompt, Progress, Scored, SidecarClient,
                                     SidecarConfig, TraceFact, Traced)
from editserve.engine.supervisor import SidecarSupervision
from editserve.engine.swap import Swapper, verify
from editserve.engine.wire import message_for
from editserve.errors import InvalidRequestError
from editserve.patches import Patch

log = logging.getLogger(__name__)

__all__ = ["ControlPlane", "ControlSettings", "VersionChange", "probe_scores", "registry_for", "VERSION_HEADER",
           "VERSION_START_HEADER", "LEDGER_ENV", "PAUSE_MODE_ENV", "SIDECAR_DEVICE_ENV", "SIDECAR_THREADS_ENV",
           "SIDECAR_TIMEOUT_ENV", "SIDECAR_READ_TIMEOUT_ENV", "SIDECAR_SYNC_TIMEOUT_ENV", "BASE_CACHE_ENV"]


def registry_for() -> Any:
    """The registry vLLM's ``/metrics`` route serves (editserve's metrics are registered on it)."""
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    return get_prometheus_registry()


class _NotActive(Exception):
    """Inside a version change: the patch to revert is not active at the head (turned into the
    ledger's `RevertError`, which names a consolidation holding it, off the event loop)."""


class ControlPlane(SidecarSupervision, SwapOrchestration, ComputedChanges):
    """See the module docstring. Create, ``await start()``, then call `edit`/`rollback`/`status`.

    Its parts: `SidecarSupervision` (editserve/engine/supervisor.py), `SwapOrchestration`
    (editserve/engine/orchestration.py), `ComputedChanges` (editserve/engine/computed.py: rebase,
    consolidation, a revert out of a consolidation), `ExpectedChecksums` (editserve/engine/expected.py)
    and `Admission` (editserve/engine/admission.py); here: start / close, the operations and status."""

    def __init__(self, engine_client: Any, settings: ControlSettings, registry: Any = None) -> None:
        self.engine = engine_client
        self.settings = settings
        self.swapper = Swapper(engine_client, settings.tensor_parallel_size, settings.pause_mode)
        self._lock = asyncio.Lock()                 # every version change
        self._edit_lock = asyncio.Lock()            # edits one at a time (computing holds only this)
        self.admission = Admission()                # requests held during swaps, counted in flight
        self.expected = ExpectedChecksums(settings.tensor_parallel_size, settings.base_cache_bytes,
                                          checkpoint_every=settings.checkpoint_every)
        self._registry = registry
        self.ledger: Any = None
        self.sidecar: SidecarClient | None = None
        self.family: str | None = None
        self.workers: list[dict[str, Any]] = []
        self.served: Served | None = None
        self.operations: Any = None                 # editserve.control.operations.Operations (set by it)
        self.counters = Counters()
        self.metrics: Any = None
        self._sidecar_in_sync = False
        self._pending_sync: tuple[int, dict[tuple[str, int], str]] | None = None   # a deferred sidecar sync
        self._sync_task: asyncio.Task[None] | None = None           # runs the deferred sidecar syncs
        self._fingerprint: str | None = None
        self._sidecar_watch: asyncio.Task[None] | None = None
        self._sidecar_restart: asyncio.Task[None] | None = None
        self._sidecar_starting: SidecarClient | None = None     # a replacement still loading
        self._sidecar_failure: dict[str, Any] | None = None     # the last death / failed restart
        self._sidecar_retry_at = 0.0
        self._statistics_published: float | None = None        # last editserve_statistics_progress value
        self._closing = False
        self._degraded: str | None = None
        self.fleet: Any = None                      # editserve.engine.fleet.FleetMember once started
        self.health: Any = None                     # editserve.engine.health.RetentionProbe once started
        self.auto_consolidation = AutoConsolidation(self, settings.consolidation)

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
        from editserve.engine.neuron_slots import SLOTS_ENV, slots_from_env

        wanted = slots_from_env(os.environ)
        widened = self._widened()
        if wanted != widened:
            raise PluginSetupError(f"{SLOTS_ENV} asks for neuron slots {wanted} (layer: slots), the engine widened "
                                   f"{widened}: a layer the model does not have, or quantised weights, which cannot "
                                   "be widened")
        if self.settings.default_method == SLOTS_METHOD and not widened:
            raise PluginSetupError("the default method is 'gated', but the engine has no neuron slots; serve with "
                                   "--neuron-slots LAYER:COUNT (EDITSERVE_NEURON_SLOTS)")
        gated_layer = load_hparams(SLOTS_METHOD, file_names(self.settings.model, self.family)).layer
        method = server_default_method(self.settings.default_method, gated_layer in widened)
        if method != self.settings.default_method:
            log.info("edits that name no method use %r (neuron slots %s; the gated layer is %d)", method,
                     widened or "none", gated_layer)
            self.settings = replace(self.settings, default_method=method)
        dtype = str(self.workers[0]["dtype"])
        if self.settings.serve_only:
            try:
                return await self._start_serve_only(t0, dtype)
            except BaseException:
                await self.close()
                raise
        self.sidecar = SidecarClient(SidecarConfig(
            checkpoint=self.settings.model, device=self.settings.sidecar_device, dtype=dtype,
            threads=self.settings.sidecar_threads, editserve_home=os.environ.get("EDITSERVE_HOME"),
            heldout_text=self.settings.health.heldout_text,
            neuron_slots=tuple(sorted(widened.items()))))
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
        self.expected.ledger = self.ledger
        await asyncio.to_thread(self.sidecar.open_ledger, self.ledger.location, self.settings.sync_timeout_s)
        self._init_metrics(int(ready.n_layers))
        change = await self._apply_head_at_start(t0, {"sidecar_load": round(ready.seconds * 1e3, 3)})
        t_sync = time.perf_counter()
        async with self._lock:               # the sidecar's copy of every editable matrix is the engine's
            await self._resync_sidecar(every_matrix=True)
        now = time.perf_counter()
        change = replace(change, timings_ms={**change.timings_ms, "sidecar_sync": round((now - t_sync) * 1e3, 3),
                                             "start_total": round((now - t0) * 1e3, 3)})
        self._sidecar_watch = asyncio.create_task(self._watch_sidecar(), name="editserve-sidecar-watch")
        self._start_health()
        await self._join_fleet()
        log.info("editserve control plane ready: serving ledger version %d (%d patches) from %s; sidecar on %s",
                 change.version, change.active_patches, self.ledger.location, ready.device)
        return change

    def _start_health(self) -> None:
        """The retention probe (editserve/engine/health.py): after every version change and periodically."""
        from editserve.engine.health import RetentionProbe

        self.health = RetentionProbe(self.settings.health, self.metrics, self._measure_retention,
                                     lambda: self.served_version)
        self.health.start()

    def _measure_retention(self, version: int, sample_size: int, seed: int) -> Any:
        """One retention probe on the sidecar (blocking); None while it is dead, restarting or out of sync."""
        from editserve.engine.health import run_of
        from editserve.engine.sidecar import ProbeRetention

        sidecar = self.sidecar
        if sidecar is None or not sidecar.alive or not self._sidecar_in_sync or self._closing:
            return None
        return run_of(sidecar.probe_retention(ProbeRetention(version=version, sample_size=sample_size, seed=seed),
                                              self.settings.read_timeout_s))

    async def _start_serve_only(self, t0: float, dtype: str) -> VersionChange:
        """Start without a sidecar (editserve.engine.serveonly): the fingerprint from the checkpoint,
        then the same ledger, base check and head as with one."""
        from editserve.engine.serveonly import fingerprint_async

        t_fp = time.perf_counter()
        self._fingerprint = await fingerprint_async(self.settings.model, dtype)
        fp_ms = round((time.perf_counter() - t_fp) * 1e3, 3)
        self.ledger = await asyncio.to_thread(self._open_ledger, self._fingerprint)
        self.expected.ledger = self.ledger
        self._init_metrics(int(self.workers[0]["n_layers"]))
        change = await self._apply_head_at_start(t0, {"fingerprint": fp_ms})
        await self._join_fleet()
        log.info("editserve control plane ready (serve-only, no sidecar): serving ledger version %d (%d patches) "
                 "from %s", change.version, change.active_patches, self.ledger.location)
        return change

    async def _apply_head_at_start(self, t0: float, timings: dict[str, float]) -> VersionChange:
        """Check the base weights against the ledger's copies and serve the ledger head."""
        assert self.family is not None
        await self._check_base()
        base_message = message_for(0, self.family, [])
        self.served = Served(version=0, message=base_message, expected={})
        head = await asyncio.to_thread(self.ledger.head)
        async with self._lock:
            change = await self._swap_to_version(head, kind="start", commit_rollback=False)
        return VersionChange(**{**change.to_dict(), "timings_ms": {
            **change.timings_ms, "start_total": round((time.perf_counter() - t0) * 1e3, 3), **timings}})

    async def _join_fleet(self) -> None:
        """Report the served version to the ledger's replica registry and follow the head from now on."""
        from editserve.engine.fleet import ROLE_COMPUTE, ROLE_SERVE_ONLY, FleetMember, FleetSettings

        role = ROLE_SERVE_ONLY if self.settings.serve_only else ROLE_COMPUTE
        self.fleet = FleetMember(self, FleetSettings.from_env(role=role), await asyncio.to_thread(self.edit_policy))
        await self.fleet.report()
        self.fleet.start()

    def edit_policy(self) -> EditPolicy:
        """This replica's `editserve.engine.policy.EditPolicy` (what decides what an edit does and
        whether it commits here; recorded in the replica registry). Reads the held-out text file only
        where the settings were not read from the environment (which keeps its digest)."""
        from editserve import __version__
        from editserve.engine.health import read_heldout_text

        health = self.settings.health
        heldout = health.heldout_digest or heldout_token(read_heldout_text(health.heldout_text)
                                                         if health.heldout_text else None)
        return EditPolicy(editserve=__version__, default_method=self.settings.default_method,
                          editable_matrices=matrices_token(self.workers[0]["editable"] if self.workers else ()),
                          consolidate_every=int(self.auto_consolidation.policy.every),
                          retention_gate_sample=int(health.gate.sample_size),
                          retention_gate_max_drop=float(health.gate.max_drop),
                          max_perplexity_ratio=float(health.damage.max_perplexity_ratio),
                          heldout_text=heldout, neuron_slots=slots_token(self._widened()))

    def _widened(self) -> dict[int, int]:
        """{layer: slot count} of the layers the workers widened (`editserve_describe`; {} before it)."""
        slots = self.workers[0]["slots"] if self.workers else {}
        return {int(layer): int(n) for layer, (_, n) in slots.items()}

    def _open_ledger(self, fingerprint: str) -> Any:
        from editserve.ledger import Ledger

        return Ledger.open(self.settings.ledger_location, fingerprint, caller=self.settings.caller)

    def _init_metrics(self, n_layers: int) -> None:
        from editserve.metrics import Metrics

        registry = self._registry if self._registry is not None else registry_for()
        self.metrics = Metrics(registry, n_layers)

    async def _check_base(self) -> None:
        """The engine's weights of every matrix the ledger has a base copy of must be that copy
        (no patch is applied yet, so the live weights are the checkpoint's)."""
        names = sorted(await asyncio.to_thread(self.ledger.weights.base_names))
        if not names:
            return
        expected = await asyncio.to_thread(self.expected.of, [], names)
        reports = await self.swapper.checksums(names)
        try:
            verify(reports, expected, self.settings.tensor_parallel_size)
        except Exception as exc:
            slots = self.workers[0]["slots"] if self.workers else {}
            hint = ""
            if slots or any(n.endswith(f".{h}.weight") for n in names for h in MLP_HALVES):
                hint = (f" (this engine's neuron slots, layer: [neurons, slots]: {slots or 'none'}; a ledger written "
                        "with other slots has base copies of another shape: start with the --neuron-slots it was "
                        "written with, or give another --ledger)")
            raise PluginSetupError(f"the served checkpoint's weights differ from the ledger's base copies at "
                                   f"{self.ledger.location}: {exc}{hint}") from exc

    async def close(self) -> None:
        self._closing = True
        await self.auto_consolidation.close()
        if self.health is not None:
            await self.health.close()
        if self.fleet is not None:
            await self.fleet.close()
        if self._sidecar_watch is not None:
            self._sidecar_watch.cancel()
        await self._sidecar_settled()      # a deferred sync under way ends (no new one starts once closing)
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
        keep_bases: bool = False,
    ) -> VersionChange:
        """Compute, commit and serve a patch for `requests` (see the module docstring).

        `gate` (an `editserve.control.probe.GateConfig`) runs the probe gate on the sidecar with the
        candidate patch applied; a failing gate raises `editserve.control.errors.ProbeRejected`
        before anything is committed or swapped. `dry_run` returns the computed report without
        committing (``kind="dry_run"``, the version stays the head); neither a dry run nor a rejected
        edit writes anything to the ledger. `progress` (called from worker threads too) receives
        ``(stage, fraction, message)`` as the edit goes on (see the module docstring). `report_extra`
        is merged into the probe report the ledger records (e.g. who skipped the gate). `keep_bases`:
        a dry run that passes its gate still stores the base copies of the matrices it touches (a
        candidate's promote imports it, and the ledger checks a patch against those originals); a
        base copy is the checkpoint's weight, not a version, so no version or served weight changes."""
        await self._require_sidecar("an edit")
        t0 = time.perf_counter()
        stages: dict[str, float] = {}                   # seconds per stage, filled by _edit as they run
        try:
            return await self._edit(t0, requests, method, layers, hparams, expected_head, caller, idempotency_key,
                                    probes, gate, dry_run, progress, stages=stages, report_extra=report_extra,
                                    keep_bases=keep_bases)
        except Exception as exc:
            if self.metrics is not None and method in self.metrics.methods:
                from editserve.control.errors import ProbeRejected

                outcome = "rejected" if isinstance(exc, (ValueError, ProbeRejected)) else "failed"
                self.metrics.record_edit(method, outcome, stages, total_seconds=time.perf_counter() - t0)
            raise

    async def _edit(self, t0: float, requests: Sequence[EditRequest], method: str, layers: Sequence[int] | None,
                    hparams: dict[str, Any] | None, expected_head: int | None, caller: str | None,
                    idempotency_key: str | None, probes: Sequence[ProbePrompt], gate: Any = None,
                    dry_run: bool = False, progress: Callable[[str, float, str], None] | None = None,
                    stages: dict[str, float] | None = None,
                    report_extra: dict[str, Any] | None = None, keep_bases: bool = False) -> VersionChange:
        from editserve.ledger import LedgerConflict

        stages = {} if stages is None else stages

        report = reporter(progress)

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
                gate=gate, store_bases=keep_bases or not dry_run,
                retention=self.settings.health.gate if gate is not None else None,
                damage=self.settings.health.damage if gate is not None else None),
                forward, self.settings.compute_timeout_s)
            t_computed = time.perf_counter()
            if report_extra:
                computed = EditComputed(patch=computed.patch, probe_report={**computed.probe_report, **report_extra},
                                        seconds=computed.seconds, keys=computed.keys)
            stages.update(self._compute_stages(computed.patch.timings, computed.probe_report))
            # The probe gauges show every probe: committed, rejected and dry-run edits alike.
            self.metrics.record_probe(*probe_scores(computed.probe_report))
            gate_report = computed.probe_report.get("gate")
            if gate_report is not None and not gate_report["passed"]:
                from editserve.control.errors import DamageRejected, ProbeRejected, RetentionRejected

                rejected = ProbeRejected
                if not (gate_report.get("retention") or {}).get("passed", True):
                    rejected = RetentionRejected        # the edit breaks earlier edits (issue 16)
                    self.metrics.record_retention_refusal()
                elif not (gate_report.get("damage") or {}).get("passed", True):
                    rejected = DamageRejected           # the ledger's damage budget is spent (issue 16)
                raise rejected("the probe gate rejected the edit; nothing was committed: "
                               + "; ".join(gate_report["failures"]), gate_report)
            if dry_run:
                return VersionChange(version=head, previous_version=head, kind="dry_run", pause_ms=0.0, swap={},
                                     timings_ms={"compute": round((t_computed - t_wait) * 1e3, 3)},
                                     patch_id=computed.patch.digest, method=method,
                                     probe_report=computed.probe_report, active_patches=len(
                                         await asyncio.to_thread(self.ledger.active_ids, head)),
                                     patch=computed.patch, keys=computed.keys)   # a candidate may stage it
                                                                                 # (editserve.candidates)
            async with self._lock:
                now = await asyncio.to_thread(self.ledger.head)
                if self.served.version != head or now != head:
                    await self._follow_head()           # a stale replica serves the head before it reports
                    raise LedgerConflict(f"the head moved from version {head} to {now} while the patch was computed; "
                                         "nothing was committed (retry the edit)", expected_head=head, actual_head=now)
                patch = computed.patch
                # The served factors plus the new patch's: no active patch is loaded (issue 16).
                message, target = await asyncio.to_thread(self._message_adding, head, [patch])
                who = caller or self.settings.caller

                async def commit() -> int:
                    # The patch's preserved-keys blocks (issue 16) are stored with it.
                    version = await asyncio.to_thread(functools.partial(
                        self.ledger.commit, patch, head, who, computed.probe_report, idempotency_key,
                        preserved=computed.keys))
                    active = await asyncio.to_thread(self.ledger.active_ids, version)
                    if tuple(active) != target:
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
        await self.auto_consolidation.after_commit(version)          # in the background when due
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
                     idempotency_key: str | None = None, max_drop: float = 0.0) -> VersionChange:
        """Serve a new version equal to the head without the patch that `version` added; the patches
        added after it stay as they are (the ledger's revert without rebase). When a consolidation
        took that patch in, the consolidated patch is re-solved without its facts on the sidecar and
        checked (`_revert_consolidated`); a re-solve that breaks more than `max_drop` of the other
        facts that hold is refused (`ConsolidationError`, nothing written)."""
        removed, max_drop = await self._reverted_patch(version, max_drop)
        who = caller or self.settings.caller
        replayed = await self._replayed(idempotency_key, "revert", lambda i: i.kind == "revert" and (
            removed in i.removed or i.details.get("removed_patch") == removed))
        if replayed is not None:
            return replayed

        def target_of(current: list[Patch]) -> list[Patch]:
            if removed not in [p.digest for p in current]:
                raise _NotActive(removed)
            return [p for p in current if p.digest != removed]

        def write(head: int) -> int:
            return self.ledger.revert(version, who, expected_head=head, idempotency_key=idempotency_key).version

        try:
            change = await self._change("revert", expected_head, target_of, write, patch_id=removed)
        except _NotActive:
            # off the event loop: the ledger says whether a consolidation holds the patch
            head = await asyncio.to_thread(self.ledger.head)
            if await asyncio.to_thread(self.ledger.consolidated_into, removed, head) is None:
                raise await asyncio.to_thread(self.ledger.inactive_patch_error, version, removed, head) from None
            change = await self._revert_consolidated(version, who, expected_head, idempotency_key, max_drop)
        self.metrics.record_revert()
        return change

    async def import_patch(self, src: str | Path, caller: str | None = None, expected_head: int | None = None,
                           idempotency_key: str | None = None) -> VersionChange:
        """Validate the exported patch in directory `src` (`editserve.ledger.transfer`), then commit
        and serve it on top of the head."""
        from editserve.ledger.errors import ImportRejected
        from editserve.ledger.transfer import read_patch_import

        self._check_usable()
        src = Path(src)
        patch, keys = await asyncio.to_thread(read_patch_import, self.ledger, src)
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
            return self.ledger.add_imported([patch], head, who, idempotency_key, None, Layout.OUT_IN, replace=False,
                                       details={"source": "control plane import"}, keys=keys)

        return await self._change("import", expected_head, target_of, write, patch_id=patch.digest)

    async def score(self, items: Sequence[tuple[str, str, str | None]]) -> Scored:
        """Score (prompt, target, other or None) continuations on the served version (on the
        sidecar, which holds exactly the served version's patches while it scores)."""
        self._check_usable()
        await self._require_sidecar("probe scores")
        assert self.served is not None and self.sidecar is not None
        return await asyncio.to_thread(self.sidecar.score, self.served.version, tuple(items),
                                       self.settings.read_timeout_s)

    async def trace(self, prompt: str, subject: str, target: str | None = None, kind: str = "hidden",
                    samples: int = 10, seed: int = 0, window: int = 10, noise_scale: float = 3.0) -> Traced:
        """Causally trace a fact on the served version (on the sidecar; see editing/tracing.py).
        The sidecar answers one request at a time, so an edit submitted meanwhile waits for it."""
        self._check_usable()
        await self._require_sidecar("a causal trace")
        await self._ensure_sidecar()
        assert self.served is not None and self.sidecar is not None
        msg = TraceFact(version=self.served.version, prompt=prompt, subject=subject, target=target, kind=kind,
                        samples=samples, seed=seed, window=window, noise_scale=noise_scale)
        return await asyncio.to_thread(self.sidecar.trace, msg, self.settings.read_timeout_s)

    async def _require_sidecar(self, what: str) -> None:
        """Refuse `what` on a serve-only replica, naming the live replicas that can do it."""
        if not self.settings.serve_only:
            return
        from editserve.engine.serveonly import refusal

        rows: list[dict[str, Any]] = []
        replica_id = self.fleet.settings.replica_id if self.fleet is not None else "this replica"
        if self.fleet is not None:
            try:
                rows = await self.fleet.fleet()
            except Exception as exc:       # the refusal stands; it just cannot name the others
                log.warning("replica registry not readable for a serve-only refusal: %s: %s", type(exc).__name__, exc)
        raise refusal(what, replica_id, rows)

    async def follow(self, settle: bool = False) -> VersionChange | None:
        """Serve the ledger head if it moved (e.g. after ``editserve ledger rollback``). The sidecar
        follows in the background; with `settle` (an operator's sync) this waits for it too."""
        self._check_usable()
        async with self._lock:
            change = await self._follow_head()
        if settle:
            await self._sidecar_settled()
        return change

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
            "ledger_root": str(self.ledger.location) if self.ledger is not None else None,
            "active_matrices": list(served.message.names) if served else [],
            "family": self.family,
            "tensor_parallel_size": self.settings.tensor_parallel_size,
            "pause_mode": self.settings.pause_mode,
            "swaps_ok": self.counters.swaps_ok,
            "swaps_failed": self.counters.swaps_failed,
            "parity_failures": self.counters.parity_failures,
            "last_pause_ms": self.counters.last_pause_ms,
            "last_drain_ms": self.counters.last_drain_ms,
            "requests_in_flight": self.admission.inflight,
            "median_pause_ms": pauses[len(pauses) // 2] if pauses else None,
            "sidecar": {"alive": self.sidecar.alive if self.sidecar else False,
                        "in_sync": self._sidecar_in_sync,
                        "sync_pending": self.sidecar_sync_pending,
                        "device": self.sidecar.ready.device if self.sidecar and self.sidecar.ready else None,
                        "pid": self.sidecar.pid if self.sidecar else None,
                        "restarting": self._sidecar_restart is not None and not self._sidecar_restart.done(),
                        "restarts": self.counters.sidecar_restarts,
                        "last_failure": self._sidecar_failure,
                        "statistics": self.sidecar.statistics() if self.sidecar else None},
            "degraded": self._degraded,
            "retention": self.health.status() if self.health is not None else None,
            "serve_only": self.settings.serve_only,
            "consolidation": {"every": self.auto_consolidation.policy.every,
                              "running": self.auto_consolidation.running},
            **(await self._fleet_status()),
            "workers": [{k: w[k] for k in ("rank", "tp_rank", "tp_size", "dtype", "device")} | {
                "editable_layers": len(w["editable"])} for w in self.workers],
        }

    async def _fleet_status(self) -> dict[str, Any]:
        """This replica's id, readiness and the ledger's replica registry (empty if unreachable)."""
        if self.fleet is None:
            return {"replica_id": None, "ready": False, "fleet": [], "fleet_error": None, "follow_refused": None}
        try:
            rows, error = await self.fleet.fleet(), None
        except Exception as exc:             # the ledger may be down: status still answers
            rows, error = [], f"{type(exc).__name__}: {exc}"
        refused = self.fleet.refused
        return {"replica_id": self.fleet.settings.replica_id, "ready": self.fleet.readiness()[0], "fleet": rows,
                "fleet_error": error, "follow_refused": refused.to_dict(time.monotonic()) if refused else None}

    async def admit(self) -> tuple[int, int]:
        """Admit one HTTP request: wait while a swap is in progress, count it as in flight, and
        return its start mark (epoch, served version). Pair with `release`."""
        await self.admission.admit()
        return self.version_mark()

    def release(self) -> None:
        self.admission.release()

    def version_mark(self) -> tuple[int, int]:
        """(epoch, served version) now; a request whose start and end marks differ was in flight
        during a swap (in ``keep`` mode its tokens may come from both versions)."""
        served = self.served
        return (served.epoch, served.version) if served is not None else (0, 0)

    def completion_done(self, spanned: bool) -> None:
        if self.metrics is not None:
            self.metrics.record_completion(spanned)
