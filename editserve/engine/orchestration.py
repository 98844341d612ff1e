"""Swap orchestration: serve a target list of patches with the engine's pause → apply → verify →
commit → resume protocol (`editserve.engine.swap.Swapper`), and keep what is served.

`SwapOrchestration` is a part of `editserve.engine.control.ControlPlane` (a mixin; it uses the
plane's ``swapper``, ``ledger``, ``expected``, ``admission``, ``served``, ``counters``,
``metrics``, ``settings`` and ``family``, and the sidecar supervision's `_sync_sidecar`). Every
method that changes the served version runs under the plane's version lock; the sidecar's move
to a version only followed from the ledger runs after it (`SidecarSupervision._defer_sidecar_sync`). `Served` is what
the engine holds now; `Counters` are the swap counters shown by ``status``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from editserve.engine.changes import VersionChange
from editserve.engine.errors import EngineStateUnknown, PluginSetupError, SwapFailed
from editserve.engine.plan import MatrixChain, changed_names, chains_of, delta_message
from editserve.engine.swap import SwapResult
from editserve.engine.wire import ApplyMessage, MatrixTarget, WireDelta, message_for
from editserve.memory import trim_heap
from editserve.patches import Patch

log = logging.getLogger("editserve.engine.control")


@dataclass
class Served:
    """What the engine holds now (mutated only under the control plane's lock)."""

    version: int
    message: ApplyMessage                         # full target state (references to every factor)
    expected: dict[tuple[str, int], str]          # per (matrix, rank) checksums of every matrix it touches
    epoch: int = 0                                # successful swaps so far
    chains: dict[str, MatrixChain] = field(default_factory=dict)   # delta sequence held per matrix


@dataclass
class Counters:
    swaps_ok: int = 0
    swaps_failed: int = 0
    parity_failures: int = 0
    last_pause_ms: float | None = None
    last_drain_ms: float | None = None
    pauses_ms: list[float] = field(default_factory=list)
    sidecar_restarts: int = 0


class SwapOrchestration:
    """See the module docstring."""

    served: Served | None
    counters: Counters
    ledger: Any
    settings: Any
    metrics: Any
    family: str | None

    def _check_usable(self) -> None:
        if self.served is None or self.ledger is None:
            raise PluginSetupError("the editserve control plane has not started")
        if self._degraded:
            raise EngineStateUnknown(f"edits are refused: {self._degraded}")

    @property
    def served_version(self) -> int | None:
        """The version the engine serves now (None before `start`)."""
        return self.served.version if self.served is not None else None

    def _plan(self, message: ApplyMessage) -> tuple[ApplyMessage, ApplyMessage, dict[str, MatrixChain],
                                                      tuple[str, ...], dict[tuple[str, int], str]]:
        """(message to send, restore message, target chains, changed matrices, their expected
        checksums) for a swap from the served state to the full message `message`. With
        ``swap_messages`` ``full`` (the behaviour before delta messages, kept to measure against)
        both messages carry every factor and every touched matrix is checksummed."""
        assert self.served is not None
        served = self.served
        chains = chains_of(message, served.chains)
        changed = changed_names(served.chains, chains)
        deltas = {m.name: m.deltas for m in message.matrices}
        if getattr(self.settings, "swap_messages", "delta") == "full":
            names = tuple(sorted(set(message.names) | set(served.message.names)))
            expected = self.expected.of_chains(deltas, chains, names)
            return message, served.message, chains, names, expected
        expected = self.expected.of_chains(deltas, chains, changed)   # writes due checkpoints first
        anchor = self.expected.checkpoint_path
        send = delta_message(message, chains, served.chains, anchor, changed)
        restore = delta_message(served.message, served.chains, None, anchor, changed)
        return send, restore, chains, changed, expected

    async def _swap(self, message: ApplyMessage, patches: Sequence[Any], commit: Any) -> tuple[SwapResult, dict]:
        """Swap to `message` (the full target state; `patches`, its patches or their digests, is
        not needed any more and kept for callers) with the protocol of `Swapper.swap`; the
        workers get only what changed (`editserve.engine.plan`)."""
        assert self.served is not None
        served = self.served
        send, restore, chains, names, expected = await asyncio.to_thread(self._plan, message)
        self._planned_chains = (message, chains)
        previous_expected = {k: v for k, v in served.expected.items() if k[0] in names}
        missing = [n for n in names if (n, 0) not in previous_expected]
        if missing:
            # Matrices the served version does not touch: a restore must bring back exactly what
            # the engine holds now (its own base), whatever the ledger's copy says.
            for report in await self.swapper.checksums(missing):
                if report.error:
                    raise SwapFailed(f"rank {report.rank} cannot checksum {missing}: {report.error}; nothing was "
                                     "changed", restored_version=served.version)
                previous_expected.update({(n, report.tp_rank): sha for n, sha in report.checksums.items()})
        self.admission.begin_swap()
        try:
            if self.settings.pause_mode == "wait":
                # New requests are held by the middleware; the ones already admitted finish on the
                # old version (including those not yet handed to the engine), so every completion
                # comes from exactly one version.
                t_drain = time.perf_counter()
                if not await self.admission.drained(self.settings.drain_timeout_s):
                    raise SwapFailed(f"{self.admission.inflight} request(s) still in flight after "
                                     f"{self.settings.drain_timeout_s:.0f} s; nothing was changed",
                                     restored_version=served.version)
                self.counters.last_drain_ms = (time.perf_counter() - t_drain) * 1e3
            result = await self.swapper.swap(send, expected, restore, previous_expected, commit)
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
            self.admission.end_swap()
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
        planned = getattr(self, "_planned_chains", None)
        chains = planned[1] if planned is not None and planned[0] is message else chains_of(message, self.served.chains)
        self._planned_chains = None
        held = set(label.names)
        merged = {k: v for k, v in self.served.expected.items() if k[0] in held}
        merged.update({k: v for k, v in expected.items() if k[0] in held})
        self.served = Served(version=version, message=label, expected=merged, epoch=self.served.epoch + 1,
                             chains=chains)
        self.metrics.set_head(version, active)
        fleet = getattr(self, "fleet", None)
        if fleet is not None:
            fleet.served_changed()                  # the replica registry learns of it at once
        self._weight_version_tasks = [t for t in getattr(self, "_weight_version_tasks", []) if not t.done()]
        self._weight_version_tasks.append(asyncio.get_running_loop().create_task(self._publish_weight_version(version)))

    async def _publish_weight_version(self, version: int) -> None:
        """Set vLLM's own weight version to the editserve version, so its per-request weight-version
        spans (``CompletionOutput.weight_versions``) name editserve versions. vLLM 0.32: the engine
        client's ``update_weight_version`` (which calls the engine core's ``set_weight_version_async``);
        set after the swap's resume, so tokens of the step in flight may carry the previous version.
        Tasks run in swap order (FIFO lock)."""
        engine = getattr(self, "engine", None)
        setter = getattr(engine, "update_weight_version", None) or getattr(
            getattr(engine, "engine_core", None), "set_weight_version_async", None)
        if setter is None:
            return
        lock = self.__dict__.setdefault("_weight_version_lock", asyncio.Lock())
        async with lock:
            try:
                await setter(str(version))
            except Exception as exc:    # serving is unaffected; only vLLM's span labels lag
                log.warning("could not set vLLM's weight version to %d: %s: %s", version, type(exc).__name__, exc)

    def _target_message(self, version: int) -> tuple[ApplyMessage, tuple[str, ...]]:
        """(full message, active patch digests) of ledger `version`, reusing the factors the served
        message already references and loading only the patches it lacks, so that following a
        head one patch ahead, or rolling back, does not load every active patch."""
        assert self.served is not None
        if self.ledger.damage is not None:              # the ledger's own checks refuse damaged versions
            patches = self.ledger.active_patches(version)
            return message_for(version, self.family, patches), tuple(p.digest for p in patches)
        ids = tuple(self.ledger.active_ids(version))
        known: dict[str, list[tuple[str, int, WireDelta]]] = {}
        for m in self.served.message.matrices:
            for d in m.deltas:
                known.setdefault(d.key.partition(":")[0], []).append((m.name, m.layer, d))
        missing = [d for d in ids if d not in known]
        if len(missing) > 64:               # e.g. the start-up swap, a far rollback: loaded in bulk
            loaded = {p.digest: p for p in self.ledger.patches(missing)}
            # The blobs' bytes, read in one go (each patch's size again), are garbage now: give the heap back
            # (editserve/memory.py), or the API server keeps a multiple of the factors it serves resident.
            trim_heap()
        else:
            loaded = {d: self.ledger.patch(d) for d in missing}
        by_name: dict[str, list[WireDelta]] = {}
        layers: dict[str, int] = {}
        for digest in ids:
            entries = known.get(digest)
            if entries is None:
                fresh = message_for(version, self.family, [loaded[digest]])
                entries = [(m.name, m.layer, d) for m in fresh.matrices for d in m.deltas]
            for name, layer, d in entries:
                by_name.setdefault(name, []).append(d)
                layers[name] = layer
        matrices = tuple(MatrixTarget(name=n, layer=layers[n], deltas=tuple(ds)) for n, ds in sorted(by_name.items()))
        return ApplyMessage(version=version, family=self.family, matrices=matrices), ids

    def _message_adding(self, version: int, added: Sequence[Patch]) -> tuple[ApplyMessage, tuple[str, ...]]:
        """(full message, active digests) of ledger `version`'s patches followed by `added` (an edit
        or import on top of the head), without loading the patches the served message holds."""
        message, ids = self._target_message(version)
        extra = message_for(-1, self.family, list(added))
        by_name = {m.name: m for m in message.matrices}
        for m in extra.matrices:
            held = by_name.get(m.name)
            by_name[m.name] = MatrixTarget(name=m.name, layer=m.layer,
                                           deltas=(held.deltas if held is not None else ()) + m.deltas)
        matrices = tuple(by_name[n] for n in sorted(by_name))
        return (ApplyMessage(version=-1, family=message.family, matrices=matrices),
                ids + tuple(p.digest for p in added))

    async def _swap_to_version(self, version: int, kind: str, commit_rollback: bool,
                               expected_head: int | None = None, caller: str | None = None) -> VersionChange:
        """Serve ledger `version` (must hold the lock). With `commit_rollback`, the ledger head is
        moved to `version` inside the pause (a rollback, recorded as `caller`); otherwise the head
        is already there."""
        assert self.served is not None
        t0 = time.perf_counter()
        previous = self.served.version
        message, patches = await asyncio.to_thread(self._target_message, version)
        commit = None
        if commit_rollback:
            async def commit() -> int:
                return await asyncio.to_thread(self.ledger.rollback, version, caller or self.settings.caller,
                                               expected_head)
        result, expected = await self._swap(message, patches, commit)
        self._set_served(version, message, expected, len(patches))
        t_swap = time.perf_counter()
        timings = {"swap": round((t_swap - t0) * 1e3, 3)}
        log.info("%s → version %d served (pause %.2f ms: %s)", kind, version, result.pause_seconds * 1e3,
                 ", ".join(f"{k} {v * 1e3:.1f}" for k, v in (result.phases or {}).items()))
        if kind == "follow":
            # Outside the lock: the next follow must not queue behind the sidecar (docs/fleet.md).
            self._defer_sidecar_sync(version, result)
        elif kind != "start":       # at start the caller syncs the fresh sidecar on every editable matrix
            await self._sync_sidecar(version, result)
            timings["sidecar_sync"] = round((time.perf_counter() - t_swap) * 1e3, 3)
        return VersionChange(version=version, previous_version=previous, kind=kind,
                             pause_ms=round(result.pause_seconds * 1e3, 3), swap=result.to_dict(),
                             timings_ms=timings, active_patches=len(patches))

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

    async def _swap_committing(self, target: list[Patch], write: Callable[[], int]) -> tuple[int, Any, float]:
        """Under the version lock: one swap to `target` whose commit step is ``write()`` (the new
        ledger version, which must hold exactly `target`), then move the sidecar there. Returns
        (the new version, the swap result, the time the swap ended)."""
        message = message_for(-1, self.family, target)

        async def commit() -> int:
            version = await asyncio.to_thread(write)
            active = await asyncio.to_thread(self.ledger.active_ids, version)
            if tuple(active) != tuple(p.digest for p in target):
                raise SwapFailed(f"ledger version {version} does not hold the patches just applied")
            return version

        result, expected = await self._swap(message, target, commit)
        version = int(result.committed)
        self._set_served(version, message, expected, len(target))
        t_swap = time.perf_counter()
        await self._sync_sidecar(version, result)
        return version, result, t_swap

    async def _change(self, kind: str, expected_head: int | None, target_of: Callable[[list[Patch]], Sequence[Patch]],
                      write: Callable[[int], int], patch_id: str | None = None) -> VersionChange:
        """Under the version lock: follow the head, swap to ``target_of(active patches at the head)``
        with ``write(head)`` (the new ledger version) as the swap's commit step, move the sidecar."""
        t0 = time.perf_counter()
        async with self._lock:
            head = await self._followed_head(expected_head)
            current = await asyncio.to_thread(self.ledger.active_patches, head)
            target = list(target_of(current))
            version, result, t_swap = await self._swap_committing(target, lambda: write(head))
        t_end = time.perf_counter()
        log.info("%s → version %d served (pause %.2f ms)", kind, version, result.pause_seconds * 1e3)
        return VersionChange(version=version, previous_version=head, kind=kind,
                             pause_ms=round(result.pause_seconds * 1e3, 3), swap=result.to_dict(),
                             timings_ms={"swap": round((t_swap - t0) * 1e3, 3),
                                         "sidecar_sync": round((t_end - t_swap) * 1e3, 3)},
                             patch_id=patch_id, active_patches=len(target))
