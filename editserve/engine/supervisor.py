"""Sidecar supervision: notice a dead (or killed) sidecar, restart it, and keep it mirroring the served version.

`SidecarSupervision` is a part of `editserve.engine.control.ControlPlane` (a mixin; it uses the
plane's ``sidecar``, ``ledger``, ``served``, ``settings``, ``metrics``, ``counters``, ``swapper``,
``_lock`` and ``_closing``). A sidecar process that exits — or that a call's deadline killed
(`editserve.engine.errors.SidecarTimeout`) — is replaced within ``sidecar_watch_s`` by the
watcher, or at once by the next operation that needs it (`_ensure_sidecar`); the replacement
must load the same weights (fingerprint), opens the ledger and, under the version lock, syncs
to the served version with the parity check. After every swap `_sync_sidecar` moves the sidecar
to the new version and compares its checksums with the engine's.
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


class SidecarSupervision:
    """See the module docstring."""

    sidecar: SidecarClient | None
    ledger: Any
    served: Any
    settings: Any
    metrics: Any
    counters: Any
    swapper: Any
    _statistics_published: float | None

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

    async def _sync_sidecar(self, version: int, result: SwapResult) -> None:
        """Move the sidecar to `version`; its checksums must equal the engine's just-reported ones.

        A dead sidecar is not an error of the version change that was just served: the sync is
        skipped, a restart is started, and the new sidecar mirrors the served version."""
        from editserve.engine.errors import SidecarError

        if self.settings.serve_only:
            return                          # no sidecar to move (editserve.engine.serveonly)
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

    async def _resync_sidecar(self) -> None:
        if self.settings.serve_only:
            return
        assert self.served is not None
        reports = await self.swapper.checksums(sorted(self.served.message.names))
        fake = SwapResult(label=self.served.version, pause_seconds=0.0, rpc_seconds=0.0, worker_seconds=0.0,
                          reports=tuple(reports))
        await self._sync_sidecar(self.served.version, fake)
