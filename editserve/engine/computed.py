"""Changes the sidecar computes from the ledger and the engine serves with one swap (issue 16): a
revert out of a consolidation (`_revert_consolidated`, reached through `ControlPlane.revert`), a
rebase (`rebase`), a consolidation (`consolidate`).

`ComputedChanges` is a part of `editserve.engine.control.ControlPlane` (a mixin, as
`SwapOrchestration` and `SidecarSupervision`; it uses the plane's ``ledger``, ``sidecar``,
``settings``, ``served``, ``metrics``, its two locks and `_check_usable`, the orchestration's
`_followed_head`, `_follow_head`, `_replayed` and `_swap_committing`, and the supervision's
`_ensure_sidecar`). Each holds the edit lock while the sidecar computes at the head it read (the
engine keeps serving), then `_serve_computed` refuses the change if the head moved meanwhile, else
swaps once to the target whose commit step writes the version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from editserve.engine.changes import ComputedSwap, VersionChange
from editserve.errors import InvalidRequestError
from editserve.patches import Patch

log = logging.getLogger("editserve.engine.control")


def reporter(progress: Callable[[str, float, str], None] | None) -> Callable[..., None]:
    """``report(stage, fraction, message="")`` that forwards to `progress` when there is one."""
    def report(stage: str, fraction: float, message: str = "") -> None:
        if progress is not None:
            progress(stage, fraction, message)

    return report


class ComputedChanges:
    """See the module docstring."""

    ledger: Any
    sidecar: Any
    settings: Any
    served: Any
    metrics: Any
    _lock: asyncio.Lock
    _edit_lock: asyncio.Lock

    async def _reverted_patch(self, version: int, max_drop: float) -> tuple[str, float]:
        """(the patch `version` added, `max_drop` checked) for a revert or a rebase of `version`: a
        bad version or share is `InvalidRequestError`, an unknown version `VersionNotFound`, a
        version that added no patch `RevertError` — before anything is computed."""
        from editserve.ledger import RevertError
        from editserve.ledger.consolidation import allowed_drop

        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InvalidRequestError(f"version must be a non-negative integer, got {version!r}")
        max_drop = allowed_drop(max_drop)
        self._check_usable()
        info = await asyncio.to_thread(self.ledger.version, version)          # VersionNotFound
        if info.patch_id is None:
            raise RevertError(f"version {version} ({info.kind}) added no patch; there is nothing to revert")
        return info.patch_id, max_drop

    async def _revert_consolidated(self, version: int, who: str, expected_head: int | None,
                                   idempotency_key: str | None, max_drop: float) -> VersionChange:
        """Take the patch of `version` out of the consolidated patch that holds it: the sidecar plans
        the re-solve (`editserve.ledger.consolidation.plan_fact_removal`) and scores the consolidated
        facts before and after while the engine keeps serving; then one swap (holder → re-solved
        patch) whose commit step writes the revert version (`Ledger.revert_consolidated`)."""
        from editserve.engine.sidecar import ComputeFactRemoval

        async with self._edit_lock:                     # the sidecar computes one change at a time
            await self._ensure_sidecar()
            async with self._lock:
                assert self.served is not None and self.sidecar is not None
                head = await self._followed_head(expected_head)
            t0 = time.perf_counter()
            computed = await asyncio.to_thread(self.sidecar.remove_fact, ComputeFactRemoval(version=version, head=head),
                                               None, self.settings.compute_timeout_s)
            t_computed = time.perf_counter()
            plan, check = computed.plan, computed.check
            check.refuse(max_drop)

            def target_of(current: list[Patch]) -> list[Patch]:
                return [p for p in current if p.digest != plan.holder] + [plan.patch]

            def write() -> int:
                return self.ledger.revert_consolidated(plan, who, idempotency_key=idempotency_key,
                                                       probe_report=check.probe_report()).version

            served = await self._serve_computed("revert", head, target_of, write, t0, t_computed)
        log.info("version %d taken out of the consolidation of version %d → version %d served (%d facts stay, "
                 "holding %d → %d; pause %.2f ms)", version, plan.holder_version, served.version, len(check.kept),
                 check.held_before, check.held_after, served.pause_ms)
        return served.change("revert", plan.removed, plan.patch.method)

    async def rebase(self, version: int, caller: str | None = None, expected_head: int | None = None,
                     idempotency_key: str | None = None,
                     progress: Callable[[str, float, str], None] | None = None,
                     max_drop: float = 0.0) -> VersionChange:
        """Revert the patch that `version` added and recompute every later patch on the new base
        (issue 16): the sidecar plans it (`Ledger.plan_rebase` with `ModelRecompute`, preserved keys
        rebuilt from the ledger) while the engine keeps serving; then one swap to the final patches,
        whose commit step writes the revert version with the plan. The served model changes once.
        The per-edit score changes are in the written version's ``details["rebased"]``. When a
        consolidation holds the patch, it is re-solved without it first, and a re-solve that breaks
        more than `max_drop` of its other facts that hold is refused (`ConsolidationError`, as `revert`)."""
        from editserve.engine.sidecar import ComputeRebase
        from editserve.ledger import RevertError
        report = reporter(progress)
        removed, max_drop = await self._reverted_patch(version, max_drop)
        who = caller or self.settings.caller
        replayed = await self._replayed(idempotency_key, "rebase", lambda i: (
            i.kind == "revert" and i.details.get("mode") == "rebase" and i.details.get("reverted") == version))
        if replayed is not None:
            return replayed
        async with self._edit_lock:                     # the sidecar computes one change at a time
            await self._ensure_sidecar()
            async with self._lock:
                assert self.served is not None and self.sidecar is not None
                head = await self._followed_head(expected_head)
            active = await asyncio.to_thread(self.ledger.active_ids, head)
            if removed in active:
                later = len(active) - 1 - list(active).index(removed)
                if later == 0:
                    raise RevertError(f"the patch of version {version} ({removed[:12]}) is the last active patch "
                                      f"at version {head}: no later patch to rebase (revert it without rebase)")
                report("rebase", 0.02, f"recomputing {later} later patch(es) on the sidecar")
            elif (holder := await asyncio.to_thread(self.ledger.consolidated_into, removed, head)) is None:
                raise await asyncio.to_thread(self.ledger.inactive_patch_error, version, removed, head)
            else:
                # a consolidation took it in: re-solve that patch without it, recompute what follows
                # the last consolidated patch (at most the patches after its holder: the deadline's count)
                holder_patch = (await asyncio.to_thread(self.ledger.version, holder)).patch_id
                later = (len(active) - 1 - list(active).index(holder_patch) if holder_patch in active
                         else len(active))
                report("rebase", 0.02, "re-solving the consolidation that holds it, then recomputing the later "
                                       "unconsolidated patches on the sidecar")
            t0 = time.perf_counter()
            computed = await asyncio.to_thread(
                self.sidecar.rebase, ComputeRebase(version=version, head=head),
                lambda p: report(p.stage, p.fraction, p.message), self.settings.compute_timeout_s * (later + 1))
            t_computed = time.perf_counter()
            plan, check = computed.plan, computed.check
            if check is not None:
                check.refuse(max_drop)       # at most that share of the consolidation's other facts may break

            def target_of(current: list[Patch]) -> list[Patch]:
                by_id = {p.digest: p for p in current}
                held = [plan.removal.patch] if plan.removal is not None else []
                return [by_id[d] for d in plan.kept] + held + list(plan.patches)

            def write() -> int:
                return self.ledger.revert(version, who, rebase=plan, expected_head=head,
                                          idempotency_key=idempotency_key,
                                          probe_report=check.probe_report() if check is not None else None).version

            n_target = len(plan.kept) + (plan.removal is not None) + len(plan.patches)
            report("swap", 0.96, f"pause, apply {n_target} patch(es), verify, commit (one swap)")
            served = await self._serve_computed("rebase", head, target_of, write, t0, t_computed)
        self.metrics.record_revert()
        log.info("rebase of version %d → version %d served (%d patch(es) recomputed%s, pause %.2f ms)", version,
                 served.version, len(plan.patches), ", its consolidation re-solved" if plan.removal else "",
                 served.pause_ms)
        return served.change("rebase", removed)

    async def _serve_computed(self, what: str, head: int, target_of: Callable[[list[Patch]], list[Patch]],
                              write: Callable[[], int], t_start: float, t_computed: float) -> ComputedSwap:
        """After a change was computed on the sidecar at version `head` (a rebase, a consolidation, a
        revert out of a consolidation; computing took `t_start` → `t_computed`): under the version
        lock, refuse it if the head moved meanwhile, else one swap to ``target_of(active patches at
        head)`` whose commit step is ``write()`` (the new ledger version, which must hold exactly those
        patches), then move the sidecar there."""
        from editserve.ledger import LedgerConflict

        async with self._lock:
            assert self.served is not None
            now = await asyncio.to_thread(self.ledger.head)
            if self.served.version != head or now != head:
                await self._follow_head()
                raise LedgerConflict(f"the head moved from version {head} to {now} while the {what} was computed; "
                                     "nothing was committed (retry)", expected_head=head, actual_head=now)
            target = target_of(await asyncio.to_thread(self.ledger.active_patches, head))
            new_version, result, t_swap = await self._swap_committing(target, write)
            return ComputedSwap(head=head, version=new_version, result=result, active_patches=len(target),
                                t_start=t_start, t_computed=t_computed, t_swap=t_swap, t_synced=time.perf_counter())

    async def consolidate(self, caller: str | None = None, expected_head: int | None = None,
                          idempotency_key: str | None = None, ridge: float = 0.1, max_drop: float = 0.0,
                          progress: Callable[[str, float, str], None] | None = None,
                          whole: bool = False) -> VersionChange:
        """Replace the active patches that carry preserved keys by one least-disturbance patch
        (`editserve.ledger.consolidation`, issue 16): the sidecar plans it and scores the
        constituents' facts before and after while the engine keeps serving; a plan that breaks
        more than `max_drop` of the facts that hold is refused (`ConsolidationError`, nothing
        written); else one swap to the result, whose commit step writes the consolidation version
        (its details and probe report hold the per-layer result and the check). `whole`: re-solve
        the earlier consolidated patches too (`plan_consolidation(..., whole=True)`)."""
        from editserve.editing.consolidate import ConsolidateParams
        from editserve.ledger.errors import ConsolidationError, LedgerConflict

        report = reporter(progress)
        params = ConsolidateParams(ridge=ridge)                                # typed refusal of a bad ridge
        if not isinstance(whole, bool):
            raise InvalidRequestError(f"whole must be a boolean, got {whole!r}")
        self._check_usable()
        who = caller or self.settings.caller
        replayed = await self._replayed(idempotency_key, "consolidate", lambda i: i.kind == "consolidate")
        if replayed is not None:
            return replayed
        try:
            change = await self._consolidate(who, expected_head, idempotency_key, params, max_drop, report, whole)
        except (ConsolidationError, LedgerConflict):
            self.metrics.record_consolidation("refused")
            raise
        except Exception:
            self.metrics.record_consolidation("failed")
            raise
        self.metrics.record_consolidation("ok")
        return change

    async def _consolidate(self, who: str, expected_head: int | None, idempotency_key: str | None,
                           params: Any, max_drop: float, report: Callable[..., None], whole: bool) -> VersionChange:
        from editserve.engine.sidecar import ComputeConsolidation
        from editserve.ledger.consolidation import refuse_broken

        async with self._edit_lock:                     # the sidecar computes one change at a time
            await self._ensure_sidecar()
            async with self._lock:
                assert self.served is not None and self.sidecar is not None
                head = await self._followed_head(expected_head)
            report("consolidate", 0.02, f"consolidating the patches with preserved keys at version {head}")
            t0 = time.perf_counter()
            computed = await asyncio.to_thread(
                self.sidecar.consolidate, ComputeConsolidation(head=head, ridge=params.ridge, whole=whole),
                lambda p: report(p.stage, p.fraction, p.message), self.settings.compute_timeout_s)
            t_computed = time.perf_counter()
            plan, check = computed.plan, computed.check
            refuse_broken(check, max_drop)
            gone = {d for d, _ in plan.constituents}

            def target_of(current: list[Patch]) -> list[Patch]:
                return [p for p in current if p.digest not in gone] + [plan.patch]

            def write() -> int:
                return self.ledger.consolidate(plan, who, idempotency_key=idempotency_key,
                                               probe_report=check.probe_report())

            report("swap", 0.96, f"pause, apply {len(plan.constituents)} patches as one, verify, commit (one swap)")
            served = await self._serve_computed("consolidation", head, target_of, write, t0, t_computed)
        log.info("consolidation at version %d → version %d served (%d patches → 1, facts holding %d → %d of %d, "
                 "pause %.2f ms)", head, served.version, len(plan.constituents), check.held_before, check.held_after,
                 len(check.facts), served.pause_ms)
        return served.change("consolidate", plan.patch.digest, plan.patch.method)
