"""The parent side of the sidecar: `SidecarClient` starts the child process and sends it one request at a time.

A call waits for its reply (handing `Progress` messages to a callback on the way) and raises the
child's failure as the same editserve error class where there is one (`_rebuild_error`), else
`SidecarError`; a call with a deadline kills a child that runs past it (`SidecarTimeout`).
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any

from editserve.engine.errors import SidecarError, SidecarTimeout
from editserve.engine.sidecar.process import sidecar_main
from editserve.engine.sidecar.protocol import (ComputeConsolidation, ComputeEdit, ComputeFactRemoval, ComputeRebase,
                                               ConsolidationComputed, EditComputed, Failed, FactRemovalComputed,
                                               LedgerOpened, OpenLedger, ProbeRetention, Progress, Ready, RebaseComputed,
                                               RetentionMeasured, Scored, ScorePrompts, Shutdown, SidecarConfig, Sync,
                                               Synced, TraceFact, Traced)
from editserve.errors import EditserveError
from editserve.ledger.location import LedgerLocation

log = logging.getLogger(__name__)


class SidecarClient:
    """Starts the sidecar process and sends it one request at a time (thread-safe, blocking)."""

    def __init__(self, config: SidecarConfig, start_timeout_s: float = 900.0) -> None:
        self.config = config
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        # Daemonic, so that it cannot outlive the API server even if nobody calls `close`
        # (a daemonic parent cannot have children at all; then it stays a normal child).
        daemon = not multiprocessing.current_process().daemon
        self._proc = ctx.Process(target=sidecar_main, args=(child, config), name="editserve-sidecar", daemon=daemon)
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        self._start_timeout_s = start_timeout_s
        self.ready: Ready | None = None

    def wait_ready(self) -> Ready:
        with self._lock:
            if self.ready is None:
                self.ready = self._expect(self._recv(self._start_timeout_s), Ready)
            return self.ready

    def _recv(self, timeout_s: float | None) -> object:
        if timeout_s is not None and not self._conn.poll(timeout_s):
            raise SidecarError(f"the sidecar did not answer within {timeout_s:.0f} s")
        try:
            return self._conn.recv()
        except EOFError as exc:
            raise SidecarError(f"the sidecar process exited (exit code {self._proc.exitcode})") from exc

    def _recv_by(self, deadline: float | None, call: str, timeout_s: float | None) -> object:
        """The next message, or — past `deadline` (time.monotonic) — kill the process and raise
        `SidecarTimeout` (a stuck or stopped sidecar cannot hold its caller, or a lock, forever)."""
        if deadline is not None and not self._conn.poll(max(0.0, deadline - time.monotonic())):
            log.error("the sidecar's %s ran past its deadline of %.0f s; killing the sidecar (pid %s)", call,
                      timeout_s or 0.0, self._proc.pid)
            self._proc.kill()                       # SIGKILL: ends a SIGSTOPped process too
            self._proc.join(10)
            raise SidecarTimeout(f"the sidecar's {call} ran past its deadline of {timeout_s:.0f} s; the sidecar was "
                                 "killed and is being restarted at the served version; nothing was committed",
                                 call=call, timeout_s=timeout_s)
        return self._recv(None)

    @staticmethod
    def _expect(reply: object, kind: type) -> Any:
        if isinstance(reply, Failed):
            raise _rebuild_error(reply)
        if not isinstance(reply, kind):
            raise SidecarError(f"the sidecar answered {type(reply).__name__}, expected {kind.__name__}")
        return reply

    def call(self, msg: object, kind: type, timeout_s: float | None = None,
             on_progress: Callable[[Progress], None] | None = None) -> Any:
        """Send `msg` and wait for its reply of type `kind`; `Progress` messages before the reply go
        to `on_progress` (its exceptions are logged, never raised: progress is advisory). With
        `timeout_s`, the whole call (progress included) has that deadline: past it the sidecar
        process is killed and `SidecarTimeout` is raised."""
        self.wait_ready()
        call = type(msg).__name__
        with self._lock:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            try:
                self._conn.send(msg)
            except (BrokenPipeError, OSError) as exc:
                raise SidecarError(f"cannot reach the sidecar process: {exc}") from exc
            reply = self._recv_by(deadline, call, timeout_s)
            while isinstance(reply, Progress):
                if on_progress is not None:
                    try:
                        on_progress(reply)
                    except Exception:
                        log.exception("progress callback failed at stage %s", reply.stage)
                reply = self._recv_by(deadline, call, timeout_s)
            return self._expect(reply, kind)

    def open_ledger(self, location: LedgerLocation, timeout_s: float | None = None) -> LedgerOpened:
        return self.call(OpenLedger(location=location), LedgerOpened, timeout_s)

    def sync(self, version: int, tp_size: int, names: tuple[str, ...] = (), timeout_s: float | None = None) -> Synced:
        return self.call(Sync(version=version, tp_size=tp_size, names=names), Synced, timeout_s)

    def compute(self, msg: ComputeEdit, on_progress: Callable[[Progress], None] | None = None,
                timeout_s: float | None = None) -> EditComputed:
        return self.call(msg, EditComputed, timeout_s, on_progress=on_progress)

    def rebase(self, msg: ComputeRebase, on_progress: Callable[[Progress], None] | None = None,
               timeout_s: float | None = None) -> RebaseComputed:
        return self.call(msg, RebaseComputed, timeout_s, on_progress=on_progress)

    def consolidate(self, msg: ComputeConsolidation, on_progress: Callable[[Progress], None] | None = None,
                    timeout_s: float | None = None) -> ConsolidationComputed:
        return self.call(msg, ConsolidationComputed, timeout_s, on_progress=on_progress)

    def remove_fact(self, msg: ComputeFactRemoval, on_progress: Callable[[Progress], None] | None = None,
                    timeout_s: float | None = None) -> FactRemovalComputed:
        return self.call(msg, FactRemovalComputed, timeout_s, on_progress=on_progress)

    def score(self, version: int, items: tuple[tuple[str, str, str | None], ...],
              timeout_s: float | None = None) -> Scored:
        return self.call(ScorePrompts(version=version, items=items), Scored, timeout_s)

    def trace(self, msg: TraceFact, timeout_s: float | None = None) -> Traced:
        return self.call(msg, Traced, timeout_s)

    def probe_retention(self, msg: ProbeRetention, timeout_s: float | None = None) -> RetentionMeasured:
        return self.call(msg, RetentionMeasured, timeout_s)

    def statistics(self) -> dict[str, Any]:
        """The covariance-statistics warm-up of this sidecar, without touching the request pipe:
        ``{"state": "building"|"ready"|"failed"|"off", "fraction", "layers", "seconds", "error", "message"}``."""
        from editserve.engine.stats_warmup import read_state, state_path

        pid = self._proc.pid
        if pid is None:
            return {"state": "building", "fraction": 0.0, "layers": [], "seconds": 0.0, "error": None,
                    "message": "the sidecar has not started"}
        return read_state(state_path(pid, self.config.editserve_home), self._proc.is_alive())

    @property
    def alive(self) -> bool:
        return self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def exitcode(self) -> int | None:
        return self._proc.exitcode

    def kill(self, timeout_s: float = 10.0) -> None:
        """Terminate the process without waiting for a request in progress (takes no lock; a caller
        blocked on a reply gets `SidecarError`). `close` still has to be called."""
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout_s)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        if self._proc.is_alive():
            with self._lock:
                try:
                    self._conn.send(Shutdown())
                except (BrokenPipeError, OSError):
                    log.debug("sidecar pipe already closed")
            self._proc.join(timeout_s)
        if self._proc.is_alive():
            log.warning("sidecar did not exit within %.0f s; terminating it", timeout_s)
            self._proc.terminate()
            self._proc.join(timeout_s)
        self._conn.close()


def _rebuild_error(reply: Failed) -> EditserveError:
    """The sidecar's error as the same editserve error class where there is one."""
    import editserve.errors as core_errors
    import editserve.ledger.errors as ledger_errors

    for module in (core_errors, ledger_errors):
        cls = getattr(module, reply.error_type, None)
        if isinstance(cls, type) and issubclass(cls, EditserveError):
            try:
                return cls(reply.message)
            except TypeError:
                break
    return SidecarError(f"{reply.error_type}: {reply.message}")
