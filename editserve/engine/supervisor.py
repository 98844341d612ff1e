"""Sidecar supervision: notice a dead (or killed) sidecar, restart it, and keep it mirroring the served version.

`SidecarSupervision` is a part of `editserve.engine.control.ControlPlane` (a mixin; it uses the
plane's ``sidecar``, ``ledger``, ``served``, ``settings``, ``metrics``, ``counters``, ``swapper``,
``_lock`` and ``_closing``). A sidecar process that exits — or that a call's deadline killed
(`editserve.engine.errors.SidecarTimeout`) — is replaced within ``sidecar_watch_s`` by the
watcher, or at once by the next operation that needs it (`_ensure_sidecar`); the replacement
must load the same weights (fingerprint), opens the ledger and, under the version lock, syncs
to the served version with the parity check on every editable matrix (a replacement that fails it
is stopped and tried again after ``sidecar_retry_s``). After every swap `_sync_sidecar` moves the sidecar
to the new version and compares its checksums with the engine's; after a swap that only follows
the ledger head (a fleet follower) that sync runs in the background, outside the version lock
(`_defer_sidecar_sync`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from editserve.engine.errors import ParityError
from editserve.engine.sidecar import SidecarClient
from editserve.engine.swap import SwapResult

log = logging.getLogger("editserve.engine.control")


def _log_restart_outcome(task: "asyncio.Task[None]") -> None:
    """Done-callback of a sidecar restart: its failure is logged even if nobody awaits it."""
    if not task.cancelled() and task.exception() is not None:
        log.error("sidecar restart failed: %s", task.exception())


def engine_checksums(result: SwapResult) -> dict[tuple[str, int], str]:
    """What a swap's workers reported: (matrix, tensor-parallel rank) → checksum."""
    return {(n, r.tp_rank): sha for r in result.reports for n, sha in r.checksums.items()}


class SidecarSupervision:
    """See the module docstring."""

    sidecar: SidecarClient | None
    ledger: Any
    served: Any
    settings: Any
    metrics: Any
    counters: Any
    swapper: Any
    workers: list[dict[str, Any]]            # the ranks' descriptions (editserve.engine.worker.describe)
    _statistics_published: float | None
    _pending_sync: tuple[int, dict[tuple[str, int], str]] | None    # a deferred sync not started yet
    _sync_task: "asyncio.Task[None] | None"                          # the deferred syncs' runner

    async def _watch_sidecar(self) -> None:
        """Notice a dead sidecar process within `sidecar_watch_s` and replace it (see `_restart_sidecar`)."""
        while not self._closing:
            await asyncio.sleep(self.settings.sidecar_watch_s)
            sidecar = self.sidecar
            if sidecar is not None and sidecar.alive:
                self._publish_statistics(sidecar)
            restarting = self._sidecar_restart is not None and not self._sidecar_restart.done()
            if (sidecar is not None and not sidecar.alive and not restarting
                    and time.monotonic() >= self._sidecar_retry_at):
                try:
                    await self._begin_sidecar_restart()
                except Exception as exc:  # noqa: BLE001 - reported in status and the log; retried later
                    log.error("sidecar restart failed (next try in %.0f s): %s", self.settings.sidecar_retry_s, exc)

    def _publish_statistics(self, sidecar: Any) -> None:
        """Move ``editserve_statistics_progress`` with the sidecar's warm-up (state file, no pipe)."""
        st = sidecar.statistics()
        state = st.get("state")
        fraction = 1.0 if state in ("ready", "off") else float(st.get("fraction") or 0.0)
        if fraction != self._statistics_published:
            self.metrics.set_statistics_progress(fraction)
            self._statistics_published = fraction

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
            await asyncio.to_thread(new.open_ledger, self.ledger.location, self.settings.sync_timeout_s)
            if self._closing:
                raise SidecarError("the control plane is shutting down")
            async with self._lock:
                self.sidecar = new
                await self._resync_sidecar(every_matrix=True)
        except BaseException as exc:
            self._sidecar_failure = {**self._sidecar_failure, "error": f"{type(exc).__name__}: {exc}"}
            self._sidecar_retry_at = time.monotonic() + self.settings.sidecar_retry_s
            # A sidecar whose weights differ from the engine's is of no use: stopped, so that the
            # watcher starts another (reading the checkpoint again) after the retry delay.
            if self.sidecar is not new or isinstance(exc, ParityError):
                await asyncio.to_thread(new.kill)
                await asyncio.to_thread(new.close)
            raise
        finally:
            self._sidecar_starting = None
        self._sidecar_failure = {**self._sidecar_failure, "restart_seconds": round(time.perf_counter() - t0, 3)}
        log.info("sidecar restarted (pid %s) in %.1f s; it mirrors version %d", new.pid, time.perf_counter() - t0,
                 self.served.version if self.served else -1)

    async def _sync_sidecar(self, version: int, result: SwapResult) -> None:
        """Move the sidecar to `version`; its checksums must equal the engine's just-reported ones
        (and, for matrices only a deferred follow touched, the checksums that follow reported).

        A dead sidecar is not an error of the version change that was just served: the sync is
        skipped, a restart is started, and the new sidecar mirrors the served version."""
        if self.settings.serve_only:
            return                          # no sidecar to move (editserve.engine.serveonly)
        pending, self._pending_sync = self._pending_sync, None
        checks = dict(pending[1]) if pending is not None else {}
        checks.update(engine_checksums(result))
        await self._sync_checked(version, checks)

    def _defer_sidecar_sync(self, version: int, result: SwapResult) -> None:
        """After a swap that follows the ledger head (under the version lock): move the sidecar to
        `version` in the background instead of inside the lock, so that a follower's next swap
        does not queue behind the sidecar's materialisation (docs/fleet.md). Follows that come
        faster than the sidecar syncs are coalesced: the newest version is synced and checked
        on every matrix any of them touched (a later swap's checksum of a matrix replaces an
        earlier one's). A failure is logged and marks the sidecar out of sync, which makes the next
        operation under the lock resync it (`_follow_head`); the sidecar's own calls name the
        version they work on, so nothing computed on it depends on this sync."""
        if self.settings.serve_only:
            return
        pending = self._pending_sync
        checks = dict(pending[1]) if pending is not None else {}
        checks.update(engine_checksums(result))
        self._pending_sync = (version, checks)
        task = self._sync_task
        if task is None or task.done():
            self._sync_task = asyncio.create_task(self._deferred_syncs(), name="editserve-sidecar-sync")

    async def _deferred_syncs(self) -> None:
        while self._pending_sync is not None and not self._closing:
            version, checks = self._pending_sync
            self._pending_sync = None
            t0 = time.perf_counter()
            try:
                await self._sync_checked(version, checks)
                log.debug("sidecar moved to followed version %d in %.1f ms", version, (time.perf_counter() - t0) * 1e3)
            except Exception as exc:        # no caller waits for it: logged, and the state says so
                log.error("moving the sidecar to version %d after following the ledger head failed: %s: %s "
                          "(it is synced again before its next use)", version, type(exc).__name__, exc)

    async def _sidecar_settled(self) -> None:
        """Wait for the deferred sidecar syncs under way (their failures are logged, not raised)."""
        task = self._sync_task
        if task is not None and not task.done():
            await asyncio.shield(task)

    @property
    def sidecar_sync_pending(self) -> bool:
        """A deferred sidecar sync is queued or running."""
        return self._pending_sync is not None or (self._sync_task is not None and not self._sync_task.done())

    async def _sync_checked(self, version: int, engine: dict[tuple[str, int], str]) -> None:
        """Move the sidecar to `version` and compare its checksums with `engine` ((matrix, rank) → sha)."""
        from editserve.engine.errors import SidecarError

        sidecar = self.sidecar
        assert sidecar is not None
        names = tuple(sorted({n for n, _rank in engine}))
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
        bad = sorted(f"{n} rank {k}" for (n, k), sha in engine.items() if synced.checksums.get((n, k)) != sha)
        if bad:
            self._sidecar_in_sync = False
            self.metrics.set_sidecar_up(False)
            self.counters.parity_failures += 1
            self.metrics.parity_failure()
            raise ParityError(f"after the swap to version {version}, the sidecar's weights differ from the engine's "
                              f"for {', '.join(bad)}")
        if self.served is not None and self.served.version != version:
            # A deferred sync that a newer swap overtook: its check passed, but whether the sidecar
            # mirrors what is served now is for the newer version's sync to say.
            return
        self._sidecar_in_sync = True
        self.metrics.set_sidecar_up(True)
        self.metrics.set_drifts(synced.drift)
        health = getattr(self, "health", None)
        if health is not None:
            health.version_changed()                # re-score committed facts on the new version (issue 16)
        self.metrics.set_ledger_bytes(await asyncio.to_thread(self.ledger.nbytes))

    def _sidecar_died_during(self, what: str) -> None:
        """The sidecar is dead: mark it out of sync and make sure a restart is under way."""
        self._sidecar_in_sync = False
        self.metrics.set_sidecar_up(False)
        log.warning("the sidecar process is dead during %s; it is restarted and will mirror the served version", what)
        if not self._closing:
            self._begin_sidecar_restart()

    async def _resync_sidecar(self, every_matrix: bool = False) -> None:
        """Move the sidecar to the served version and compare its checksums with the engine's live
        ones: of the matrices the served version touches, or, with `every_matrix`, of every editable
        down-projection — for a sidecar that has just loaded the checkpoint (start, restart), whose
        untouched matrices are the ones the next edit is computed on. A checkpoint whose files
        changed on disk under the same fingerprint file would otherwise go unseen until after that
        edit was committed. Cost: one checksum per editable matrix on each side (SmolLM2: 30 of 3.5 MB)."""
        if self.settings.serve_only:
            return
        assert self.served is not None
        names = set(self.served.message.names)
        if every_matrix:
            names |= set(self.workers[0]["editable"]) if self.workers else set()
        reports = await self.swapper.checksums(sorted(names))
        fake = SwapResult(label=self.served.version, pause_seconds=0.0, rpc_seconds=0.0, worker_seconds=0.0,
                          reports=tuple(reports))
        await self._sync_sidecar(self.served.version, fake)
