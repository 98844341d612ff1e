"""Automatic consolidation (issue 16): every K commits, the patches with preserved keys become one.

Consolidating every 25 sequential commits halved the held-out perplexity damage of a long
AlphaEdit ledger on data it was not tuned on (docs/lifelong.md, sessions 7–8). With
``EDITSERVE_CONSOLIDATE_EVERY=K`` (K ≥ 2; 0, the default, turns it off) the control plane counts,
after each committed edit, the facts committed since the last consolidated patch (the requests of
the active patches after it, walking back from the newest until K facts are counted): a batch of 100
facts counts 100, as the benchmark's ``--consolidate-every`` counts (a batch of at least K facts is
consolidated after its commit, which is what docs/lifelong.md measured); when there are K it starts a consolidation in the
background (`ControlPlane.consolidate` with ``caller="auto-consolidation"`` and the head it
counted at as ``expected_head``), so the edit's reply never waits for it. The next edit waits for
the sidecar as it waits for any computation. A consolidation that is refused (a committed fact
would break, or the head moved) or fails is logged and counted
(``editserve_consolidations_total{result}``) and nothing is written; the next commit tries again.
One consolidation runs at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from editserve.envparse import whole_number
from editserve.errors import EditserveError, InvalidRequestError
from editserve.ledger.consolidation import CONSOLIDATED_METHOD

log = logging.getLogger(__name__)

CONSOLIDATE_EVERY_ENV = "EDITSERVE_CONSOLIDATE_EVERY"
AUTO_CALLER = "auto-consolidation"


@dataclass(frozen=True)
class ConsolidationPolicy:
    """Consolidate once `every` facts were committed since the last consolidation (0: never)."""

    every: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0 or self.every == 1:
            raise InvalidRequestError(f"{CONSOLIDATE_EVERY_ENV} must be 0 (off) or an integer >= 2, got {self.every!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "ConsolidationPolicy":
        return cls(every=whole_number(env, CONSOLIDATE_EVERY_ENV, 0))


def edits_since_consolidation(ledger: Any, version: int, limit: int) -> int:
    """Facts (requests) of the active patches at `version` after the newest consolidated one
    (counting stops once `limit` is reached)."""
    count = 0
    for digest in reversed(ledger.active_ids(version)):
        if count >= limit:
            break
        patch = ledger.patch(digest)
        if patch.method == CONSOLIDATED_METHOD:
            break
        count += len(patch.requests)
    return count


class AutoConsolidation:
    """Starts a background consolidation on `plane` when `policy` says one is due (module docstring)."""

    def __init__(self, plane: Any, policy: ConsolidationPolicy) -> None:
        self.plane = plane
        self.policy = policy
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def after_commit(self, version: int) -> None:
        """Called by the control plane after it served a committed edit at `version`."""
        if self.policy.every == 0 or self.running:
            return
        due = await asyncio.to_thread(edits_since_consolidation, self.plane.ledger, version, self.policy.every)
        if due >= self.policy.every:
            log.info("%d facts committed since the last consolidation at version %d: consolidating", due, version)
            self._task = asyncio.get_running_loop().create_task(self._run(version), name="editserve-consolidation")

    async def _run(self, version: int) -> None:
        try:
            change = await self.plane.consolidate(caller=AUTO_CALLER, expected_head=version)
            log.info("automatic consolidation at version %d → version %d", version, change.version)
        except asyncio.CancelledError:
            raise
        except EditserveError as exc:          # refused or failed: counted by the control plane, nothing written
            log.warning("automatic consolidation at version %d not done: %s: %s", version, type(exc).__name__, exc)
        except Exception:
            log.exception("automatic consolidation at version %d failed", version)

    async def wait(self) -> None:
        """Until the running consolidation (if any) has ended (tests, shutdown)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def close(self) -> None:
        if self.running:
            assert self._task is not None
            self._task.cancel()
        await self.wait()
