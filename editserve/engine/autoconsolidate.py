"""Automatic consolidation (issue 16): every K commits, the patches with preserved keys become one.

Consolidating every 25 sequential commits halved the held-out perplexity damage of a long
AlphaEdit ledger on data it was not tuned on (docs/lifelong.md, sessions 7–8), and is the one
configuration measured that did not collapse by 1,000 commits (plain AlphaEdit, ROME and MEMIT all
did). So it is on by default since wave 2 session 26 (``DEFAULT_EVERY`` = 25; before, off), when a
rebase of a consolidated fact stopped being refused. With ``EDITSERVE_CONSOLIDATE_EVERY=K`` (K ≥ 2;
0 turns it off) the control plane counts,
after each committed edit, the facts committed since the last consolidated patch (the requests of
the active patches after it, walking back from the newest until K facts are counted): a batch of 100
facts counts 100, as the benchmark's ``--consolidate-every`` counts (a batch of at least K facts is
consolidated after its commit, which is what docs/lifelong.md measured); when there are K it starts a consolidation in the
background (`ControlPlane.consolidate` with ``caller="auto-consolidation"`` and the head it
counted at as ``expected_head``), so the edit's reply never waits for it. The next edit waits for
the sidecar as it waits for any computation. A consolidation that is refused (a committed fact
would break, or the head moved) or fails is logged and counted
(``editserve_consolidations_total{result}``) and nothing is written; it is tried again once
another K facts were committed (each try re-solves and scores the facts taken in and a sample of the
earlier ones, so trying
after every commit would keep the sidecar busy with a refusal). A commit whose patch carries no preserved keys (ROME computed
without them, when an operator switched the default method) starts no try: consolidation could not
take it (`newest_consolidatable`). One consolidation runs at a time.

In a fleet (`editserve.engine.fleet`), only the replica `FleetMember.consolidator` names
consolidates, and it also counts the commits it follows from other replicas (`after_commit` is
called after a follow too): every replica that has the policy on may have it on, and two of them
do not consolidate the same head at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from editserve.envparse import whole_number
from editserve.errors import EditserveError, InvalidRequestError
from editserve.ledger.consolidation import CONSOLIDATED_METHOD, consolidatable

log = logging.getLogger(__name__)

CONSOLIDATE_EVERY_ENV = "EDITSERVE_CONSOLIDATE_EVERY"
AUTO_CALLER = "auto-consolidation"
DEFAULT_EVERY = 25          # facts; the interval of the measured non-collapsing runs (docs/lifelong.md)


@dataclass(frozen=True)
class ConsolidationPolicy:
    """Consolidate once `every` facts were committed since the last consolidation (0: never)."""

    every: int = DEFAULT_EVERY

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0 or self.every == 1:
            raise InvalidRequestError(f"{CONSOLIDATE_EVERY_ENV} must be 0 (off) or an integer >= 2, got {self.every!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "ConsolidationPolicy":
        return cls(every=whole_number(env, CONSOLIDATE_EVERY_ENV, DEFAULT_EVERY))


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


def newest_consolidatable(ledger: Any, version: int) -> bool:
    """Whether the newest active patch at `version` is one consolidation can take (it carries
    preserved keys at every layer it touches). A commit whose patch has none (e.g. the default
    method switched to ROME without keys) starts no try: it would be refused before any scoring,
    every K facts, for as long as the method stays."""
    ids = ledger.active_ids(version)
    return bool(ids) and consolidatable(ledger, ids[-1])


def due_now(due: int, every: int, retry_at: int | None) -> tuple[bool, int | None]:
    """(whether to consolidate now, the retry mark to keep) with `due` facts committed since the
    last consolidation. `retry_at`: after a refused or failed try at n facts, n + `every` (tried
    again only then); fewer facts than at that try (a consolidation, rollback or revert since)
    clear it."""
    if retry_at is not None and due < retry_at - every:
        retry_at = None
    return due >= (every if retry_at is None else retry_at), retry_at


class AutoConsolidation:
    """Starts a background consolidation on `plane` when `policy` says one is due (module docstring)."""

    def __init__(self, plane: Any, policy: ConsolidationPolicy) -> None:
        self.plane = plane
        self.policy = policy
        self._task: asyncio.Task | None = None
        self._retry_at: int | None = None       # after a refused or failed try: the fact count to try again at

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def after_commit(self, version: int) -> None:
        """Called by the control plane after it served a committed edit at `version`, and by the
        fleet loop after it followed a new head `version`."""
        if self.policy.every == 0 or self.running:
            return
        fleet = getattr(self.plane, "fleet", None)
        try:                                   # never fails the commit or the follow that called it
            chosen = None if fleet is None else await fleet.consolidator()
            if fleet is not None and chosen != fleet.settings.replica_id:
                log.debug("automatic consolidation at version %d is replica %s's", version, chosen)
                return
            if not await asyncio.to_thread(newest_consolidatable, self.plane.ledger, version):
                log.debug("automatic consolidation at version %d: its newest patch carries no preserved keys", version)
                return
            due = await asyncio.to_thread(edits_since_consolidation, self.plane.ledger, version,
                                          self._retry_at or self.policy.every)
        except Exception as exc:               # e.g. the ledger is unreachable: so would the consolidation be
            log.warning("automatic consolidation at version %d not tried: %s: %s", version, type(exc).__name__, exc,
                        exc_info=not isinstance(exc, EditserveError))
            return
        start, self._retry_at = due_now(due, self.policy.every, self._retry_at)
        if start:
            log.info("%d facts committed since the last consolidation at version %d: consolidating", due, version)
            self._task = asyncio.get_running_loop().create_task(self._run(version, due), name="editserve-consolidation")

    async def _run(self, version: int, due: int) -> None:
        from editserve.ledger.errors import LedgerConflict

        try:
            change = await self.plane.consolidate(caller=AUTO_CALLER, expected_head=version)
            self._retry_at = None
            log.info("automatic consolidation at version %d → version %d", version, change.version)
        except asyncio.CancelledError:
            raise
        except LedgerConflict as exc:          # the head moved: the next commit tries again
            log.info("automatic consolidation at version %d not done: %s", version, exc)
        except Exception as exc:               # refused or failed: counted by the control plane, nothing written
            self._retry_at = due + self.policy.every
            log.log(logging.WARNING if isinstance(exc, EditserveError) else logging.ERROR,
                    "automatic consolidation at version %d not done: %s: %s; tried again at %d facts since the last "
                    "consolidation", version, type(exc).__name__, exc, self._retry_at,
                    exc_info=not isinstance(exc, EditserveError))

    async def wait(self) -> None:
        """Until the running consolidation (if any) has ended (tests, shutdown)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def close(self) -> None:
        if self.running:
            assert self._task is not None
            self._task.cancel()
        await self.wait()
