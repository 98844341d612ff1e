"""The swap protocol, run in the API-server process against vLLM's ``engine_client``.

One version change:

1. **pause** generation (mode below);
2. **apply** the target state on every worker (``collective_rpc("editserve_apply")``), each
   rank rebuilding and writing its own slice in place and answering checksums of the matrices
   the change touches (the message carries only the factors the workers lack,
   `editserve.engine.plan`);
3. **reset the prefix cache** (KV computed with the old weights must not be reused);
   running requests are preempted and recompute their KV under the new weights;
4. **verify** every rank's checksums against the expected values (from the ledger);
5. optionally **commit** (a callback, e.g. the ledger write) while still paused;
6. **resume**.

If any rank refuses or fails, a checksum differs, or the commit callback raises, the previous
state is applied on every rank (and verified), the prefix cache is reset again, generation
resumes, and `SwapFailed` is raised: the engine serves the previous version and the caller
leaves the ledger head where it was. If that restore fails as well, `EngineStateUnknown`.

Pause modes (vLLM's ``pause_generation`` modes):

- ``keep`` (default): the engine step in flight finishes, then no request is scheduled until
  resume; requests in flight stay queued and continue afterwards (their KV is recomputed
  under the new weights, so the tokens after the swap come from the new version). The pause
  lasts one step plus the swap itself.
- ``wait``: requests in flight run to completion on the old version first (new ones queue);
  every completion then comes from exactly one version, but the pause lasts as long as the
  longest request in flight.
- ``abort``: requests in flight are aborted (their clients get an error).

vLLM's ``AsyncLLM.pause_generation`` sleeps 20 ms after pausing so that final outputs reach
their streams in order; the swap does not need that, so it pauses the scheduler directly when
the client exposes it (``engine_core.pause_scheduler_async``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from editserve.engine.errors import ChecksumMismatch, EngineStateUnknown, SwapFailed
from editserve.engine.wire import ApplyMessage, RankReport
from editserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

PAUSE_MODES = ("keep", "wait", "abort")
DEFAULT_PAUSE_MODE = "keep"
TEST_HOLD_ENV = "EDITSERVE_TEST_SWAP_HOLD_FILE"      # test-only fault window, see `_test_hold`

Expected = Mapping[tuple[str, int], str]      # (HF weight name, tensor-parallel rank) → checksum


@dataclass(frozen=True)
class SwapResult:
    """Timing and per-rank answers of one completed version change."""

    label: int                        # version label sent to the workers (-1: committed during the swap)
    pause_seconds: float              # generation paused: pause request → resume returned
    rpc_seconds: float                # apply round trip (all ranks)
    worker_seconds: float             # slowest rank's time inside the worker
    reports: tuple[RankReport, ...]
    committed: Any = None             # what the commit callback returned
    phases: dict[str, float] | None = None   # seconds per step: pause, apply, reset, verify, commit, resume
    message_bytes: int = 0            # factor bytes the apply message carried
    checksummed: int = 0              # matrices verified (those the change touches)

    def to_dict(self) -> dict[str, Any]:
        return {"pause_ms": round(self.pause_seconds * 1e3, 3), "rpc_ms": round(self.rpc_seconds * 1e3, 3),
                "worker_ms": round(self.worker_seconds * 1e3, 3), "ranks": len(self.reports),
                "phases_ms": {k: round(v * 1e3, 3) for k, v in (self.phases or {}).items()},
                "message_bytes": self.message_bytes, "checksummed": self.checksummed,
                "worker_state_bytes": max((r.state_bytes for r in self.reports), default=0),
                "written": sorted({n for r in self.reports for n in r.written})}


def check_mode(mode: str) -> str:
    if mode not in PAUSE_MODES:
        raise InvalidRequestError(f"pause mode must be one of {list(PAUSE_MODES)}, got {mode!r}")
    return mode


def verify(reports: list[RankReport], expected: Expected, tp_size: int) -> None:
    """Raise `SwapFailed`/`ChecksumMismatch` unless every rank answered and matches `expected`."""
    errors = [f"rank {r.rank}: {r.error}" for r in reports if r.error]
    if errors:
        raise SwapFailed("worker(s) failed to apply: " + "; ".join(errors))
    by_rank = {r.tp_rank: r for r in reports}
    missing = sorted(set(range(tp_size)) - set(by_rank))
    if missing:
        raise SwapFailed(f"no answer from tensor-parallel rank(s) {missing} of {tp_size}")
    bad = []
    for (name, rank), want in sorted(expected.items()):
        got = by_rank[rank].checksums.get(name)
        if got != want:
            bad.append(f"{name} rank {rank}: engine {str(got)[:12]} != expected {want[:12]}")
    if bad:
        raise ChecksumMismatch(f"{len(bad)} matrix slice(s) differ from the expected weights: " + "; ".join(bad))


async def _test_hold(label: int) -> None:
    """Test-only fault window (tests/test_fleet.py): while the file named by
    ``EDITSERVE_TEST_SWAP_HOLD_FILE`` exists, every swap holds this many seconds (its content)
    after the workers applied the new weights, paused, before verify/commit/resume."""
    path = os.environ.get(TEST_HOLD_ENV)
    if not path or not os.path.exists(path):
        return
    try:
        seconds = float(open(path).read().strip() or 0)
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable hold file %s: %s", TEST_HOLD_ENV, path, exc)
        return
    log.warning("test hook: holding the swap to version label %d for %.1f s (applied, paused, not yet verified)",
                label, seconds)
    await asyncio.sleep(seconds)


class Swapper:
    """Runs the protocol above on one engine (all of its workers)."""

    def __init__(self, engine_client: Any, tp_size: int, mode: str = DEFAULT_PAUSE_MODE) -> None:
        self.engine = engine_client
        self.tp_size = int(tp_size)
        self.mode = check_mode(mode)

    async def _pause(self) -> None:
        core = getattr(self.engine, "engine_core", None)
        direct = getattr(core, "pause_scheduler_async", None)
        if direct is not None:
            await direct(mode=self.mode, clear_cache=False)
        else:
            await self.engine.pause_generation(mode=self.mode, clear_cache=False)

    async def _resume(self) -> None:
        await self.engine.resume_generation()

    async def rpc(self, method: str, *args: Any) -> list[RankReport]:
        answers = await self.engine.collective_rpc(method, args=args)
        return [RankReport.from_wire(a) for a in answers]

    async def apply(self, message: ApplyMessage) -> list[RankReport]:
        return await self.rpc("editserve_apply", message.to_wire())

    async def _reset_prefix_cache(self) -> None:
        ok = await self.engine.reset_prefix_cache(reset_running_requests=True)
        if ok is False:
            raise SwapFailed("vLLM could not reset the prefix cache after writing the weights")

    async def swap(
        self,
        message: ApplyMessage,
        expected: Expected,
        previous: ApplyMessage,
        previous_expected: Expected,
        commit: Callable[[], Awaitable[Any]] | None = None,
    ) -> SwapResult:
        """Change every worker to `message` (see the module docstring); `previous` is what the
        workers hold now and what they get back on failure."""
        t0 = time.perf_counter()
        try:
            await self._pause()
        except Exception as exc:
            raise SwapFailed(f"could not pause generation ({self.mode!r} mode): {exc}") from exc
        marks = [("pause", time.perf_counter())]
        reports: list[RankReport] = []
        try:
            try:
                reports = await self.apply(message)
                marks.append(("apply", time.perf_counter()))
                await _test_hold(message.version)
                await self._reset_prefix_cache()
                marks.append(("reset", time.perf_counter()))
                verify(reports, expected, self.tp_size)
                marks.append(("verify", time.perf_counter()))
                committed = await commit() if commit is not None else None
                marks.append(("commit", time.perf_counter()))
            except Exception as exc:
                log.error("swap to version label %d failed (%s); restoring the previous state on every worker",
                          message.version, exc)
                await self._restore(previous, previous_expected, exc)
                raise SwapFailed(f"swap failed and version label {previous.version} was restored: "
                                 f"{type(exc).__name__}: {exc}", restored_version=previous.version) from exc
        finally:
            await self._resume()
        end = time.perf_counter()
        marks.append(("resume", end))
        phases, last = {}, t0
        for name, t in marks:
            phases[name], last = t - last, t
        return SwapResult(label=message.version, pause_seconds=end - t0, rpc_seconds=phases["apply"],
                          worker_seconds=max((r.seconds for r in reports), default=0.0), reports=tuple(reports),
                          committed=committed, phases=phases, message_bytes=message.factor_bytes,
                          checksummed=len({name for name, _ in expected}))

    async def _restore(self, previous: ApplyMessage, previous_expected: Expected, cause: Exception) -> None:
        try:
            reports = await self.apply(previous)
            await self._reset_prefix_cache()
            verify(reports, previous_expected, self.tp_size)
        except Exception as exc:
            raise EngineStateUnknown(
                f"restoring version label {previous.version} after a failed swap ({cause}) failed too: {exc}"
            ) from exc
        log.info("restored version label %d on %d rank(s)", previous.version, len(reports))

    async def checksums(self, names: list[str]) -> list[RankReport]:
        """Live checksums of `names` on every rank (no pause: weights only change inside swaps)."""
        return await self.rpc("editserve_checksums", list(names))
