"""Fleet membership of one ``editserve serve`` replica on a shared ledger (docs/fleet.md).

`FleetMember` runs beside the control plane (`editserve.engine.control.ControlPlane`):

- **Reporting.** After every swap and every `FleetSettings.heartbeat_s` it records in the
  ledger's ``replicas`` table what this replica serves (replica id, version, role — ``compute``,
  or ``serve-only`` for a replica without a sidecar (`editserve.engine.serveonly`), which the
  refusals of serve-only replicas list —, control address, start time); the store's clock stamps the row, so liveness ("heartbeat fresher than
  `FleetSettings.live_s`") is judged on one clock for the whole fleet.
- **Following.** It waits for a head notification (PostgreSQL LISTEN/NOTIFY, sent inside the
  transaction that moves the head) for at most `FleetSettings.reconcile_s`, then calls
  ``ControlPlane.follow`` (which re-reads the head and swaps to it under the version lock). The
  timeout is the periodic reconcile: the only mechanism on SQLite, and the fallback when a
  notification was lost (e.g. while PostgreSQL was down).
- **One consolidator.** With ``EDITSERVE_CONSOLIDATE_EVERY`` on, only the replica `consolidator`
  names (the smallest id among the live compute replicas that have it on) consolidates, counting
  the commits it follows as well as its own; the others never start one.
- **Readiness and skew.** `readiness` says whether this replica may take traffic: it has
  caught up to the head seen after start, and lags the head by at most `FleetSettings.max_skew`
  versions. ``editserve_version_skew{replica}`` (head minus served) is set for each live replica
  in the registry (label values bounded by the fleet's size).
- **One edit policy.** Each report also records this replica's edit policy
  (`editserve.engine.policy.EditPolicy`: default method, gates, held-out text, consolidation, …);
  the registry rows name the fields in which another replica's differs from this one's, and
  ``editserve_fleet_policy_differs`` counts the live replicas that differ.

A ledger that cannot be reached (`LedgerUnavailable`) stops neither serving nor this loop: the
replica keeps its current version, and converges once the ledger is back.

A head the workers refuse (a swap that fails and is restored: a non-finite result, a checksum
mismatch) is not retried at every reconcile: each try is a full swap with its pause. `RefusedHead`
spaces the tries of the same head out (the reconcile interval, doubling, at most
`FleetSettings.refused_retry_max_s`); a new head is tried at once, and an operator's ``/sync``
always tries. Status shows the refused head, the error and when it is tried next.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from editserve.engine.policy import SERVING_FIELDS, EditPolicy, differing_fields
from editserve.envparse import real_number, whole_number
from editserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

REPLICA_ID_ENV = "EDITSERVE_REPLICA_ID"
RECONCILE_ENV = "EDITSERVE_RECONCILE_S"
HEARTBEAT_ENV = "EDITSERVE_HEARTBEAT_S"
LIVE_ENV = "EDITSERVE_REPLICA_LIVE_S"
MAX_SKEW_ENV = "EDITSERVE_MAX_SKEW"
REFUSED_RETRY_ENV = "EDITSERVE_REFUSED_RETRY_MAX_S"
GRPC_ADDR_ENV = "EDITSERVE_GRPC_ADDR"
ROLE_COMPUTE = "compute"
ROLE_SERVE_ONLY = "serve-only"
CONSOLIDATES = "consolidates"       # registry detail: automatic consolidation is on at this replica
POLICY = "policy"                   # registry detail: EditPolicy.to_dict() of this replica
POLICY_DIGEST = "policy_digest"     # registry detail: EditPolicy.digest()


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class FleetSettings:
    """How a replica takes part in the fleet (environment: see `from_env`)."""

    replica_id: str
    address: str = ""                 # its gRPC control address, shown to operators / in refusals
    role: str = ROLE_COMPUTE
    reconcile_s: float = 5.0          # longest wait for a notification before re-reading the head
    heartbeat_s: float = 10.0         # registry row refreshed at least this often
    live_s: float = 30.0              # a replica whose row is older is not live (not waited for)
    max_skew: int = 0                 # readiness fails while head - served exceeds this
    refused_retry_max_s: float = 300.0  # longest wait before the same refused head is tried again

    def __post_init__(self) -> None:
        if not (1 <= len(self.replica_id) <= 128) or any(c.isspace() for c in self.replica_id):
            raise InvalidRequestError(f"{REPLICA_ID_ENV} must be 1-128 characters without spaces, "
                                      f"got {self.replica_id!r}")
        for name in ("reconcile_s", "heartbeat_s", "live_s", "refused_retry_max_s"):
            if not getattr(self, name) > 0:
                raise InvalidRequestError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.max_skew < 0:
            raise InvalidRequestError(f"{MAX_SKEW_ENV} must be >= 0, got {self.max_skew}")

    @classmethod
    def from_env(cls, role: str = ROLE_COMPUTE, environ: dict[str, str] | None = None) -> "FleetSettings":
        env = os.environ if environ is None else environ

        def number(name: str, default: float) -> float:
            return real_number(env, name, default, minimum=0.0, strictly_above=True, unit="seconds")

        skew = whole_number(env, MAX_SKEW_ENV, 0, unit="versions")
        return cls(replica_id=env.get(REPLICA_ID_ENV, "").strip() or default_replica_id(),
                   address=env.get(GRPC_ADDR_ENV, "127.0.0.1:50051"), role=role,
                   reconcile_s=number(RECONCILE_ENV, 5.0), heartbeat_s=number(HEARTBEAT_ENV, 10.0),
                   live_s=number(LIVE_ENV, 30.0), max_skew=skew,
                   refused_retry_max_s=number(REFUSED_RETRY_ENV, 300.0))


@dataclass(frozen=True)
class RefusedHead:
    """A head this replica failed to serve, and when the follow loop tries it again: the first retry
    after `first_delay_s`, each later one after twice the previous wait, at most `max_delay_s`."""

    version: int
    error: str
    tries: int
    retry_at: float                   # time.monotonic() of the next try

    @staticmethod
    def first(version: int, error: str, now: float, first_delay_s: float) -> "RefusedHead":
        return RefusedHead(version=version, error=error, tries=1, retry_at=now + first_delay_s)

    def again(self, error: str, now: float, first_delay_s: float, max_delay_s: float) -> "RefusedHead":
        """The same head refused once more."""
        delay = min(max_delay_s, first_delay_s * 2 ** self.tries)
        return RefusedHead(version=self.version, error=error, tries=self.tries + 1, retry_at=now + delay)

    def waiting(self, head: int, now: float) -> bool:
        """Whether the loop should leave `head` alone now (it is this refused head, not yet due)."""
        return head == self.version and now < self.retry_at

    def to_dict(self, now: float) -> dict[str, Any]:
        return {"version": self.version, "error": self.error, "tries": self.tries,
                "retry_in_s": round(max(0.0, self.retry_at - now), 3)}


class FleetMember:
    """Reports, follows and judges readiness for one control plane (see the module docstring)."""

    def __init__(self, plane: Any, settings: FleetSettings, policy: EditPolicy) -> None:
        self.plane = plane
        self.settings = settings
        self.policy = policy
        self._policy_details = {POLICY: policy.to_dict(), POLICY_DIGEST: policy.digest()}   # recorded as is
        self.started_at = time.time()
        self.caught_up = False             # served the head seen at (or after) start at least once
        self.last_head: int | None = None  # the ledger head as last read
        self.ledger_error: str | None = None
        self.refused: RefusedHead | None = None   # the head the last follow failed to serve
        self._task: asyncio.Task[None] | None = None
        self._listener: Any = None
        self._last_report = 0.0
        self._report_lock = asyncio.Lock()
        self._policy_warned: list[str] = []      # the differing replicas last logged

    def start(self) -> None:
        self._listener = self.plane.ledger.replicas.listener()
        self._task = asyncio.create_task(self._run(), name="editserve-fleet")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception) as exc:   # shutting down: its outcome no longer matters
                log.debug("fleet loop ended at shutdown: %r", exc)
        if self._listener is not None:
            await asyncio.to_thread(self._listener.close)
        ledger = self.plane.ledger
        if ledger is not None:
            try:
                await asyncio.to_thread(ledger.replicas.forget, self.settings.replica_id)
            except Exception as exc:      # the ledger may be down at shutdown; the row just goes stale
                log.warning("could not remove replica %s from the registry: %s", self.settings.replica_id, exc)

    # -- reporting ---------------------------------------------------------------------------

    async def report(self) -> None:
        """Record the served version now (after a swap, and as the heartbeat)."""
        from editserve.ledger.errors import LedgerError

        served, ledger = self.plane.served_version, self.plane.ledger
        if served is None or ledger is None:
            return
        async with self._report_lock:
            served = self.plane.served_version
            try:
                await asyncio.to_thread(ledger.replicas.record, self.settings.replica_id, served, self.settings.role,
                                        self.settings.address, self.started_at,
                                        {"pid": os.getpid(), CONSOLIDATES: self._consolidates(),
                                         **self._policy_details})
                self._last_report = time.monotonic()
                self.ledger_error = None
            except LedgerError as exc:
                self.ledger_error = f"{type(exc).__name__}: {exc}"
                log.warning("could not record replica %s at version %s: %s", self.settings.replica_id, served, exc)

    def served_changed(self) -> None:
        """Called (on the loop) after every swap: report without waiting for the heartbeat. A swap
        that succeeded served the head (or moved it), so an earlier refusal no longer stands."""
        self.refused = None
        if self._task is not None:
            asyncio.get_running_loop().create_task(self.report())

    async def fleet(self) -> list[dict[str, Any]]:
        """The registry rows with liveness and skew against the head (for status and rollout)."""
        ledger = self.plane.ledger
        rows, head = await asyncio.gather(asyncio.to_thread(ledger.replicas.all), asyncio.to_thread(ledger.head))
        self.last_head = head
        return [{"replica_id": r.replica_id, "version": r.version, "role": r.role, "address": r.address,
                 "age_s": round(r.age_s, 3), "live": r.age_s <= self.settings.live_s, "skew": max(0, head - r.version),
                 "self": r.replica_id == self.settings.replica_id, **self._policy_of(r.role, r.details)}
                for r in rows]

    def _policy_of(self, role: str, details: dict[str, Any]) -> dict[str, Any]:
        """A registry row's policy digest and the fields in which it differs from this replica's
        (only those of `SERVING_FIELDS` where either is serve-only); None for both where the replica
        records none (one of an earlier editserve version)."""
        theirs = details.get(POLICY)
        if not isinstance(theirs, dict):
            return {"policy": None, "policy_differs": None}
        serving = ROLE_SERVE_ONLY in (role, self.settings.role)
        return {"policy": str(details.get(POLICY_DIGEST) or ""),
                "policy_differs": differing_fields(self._policy_details[POLICY], theirs, SERVING_FIELDS if serving else None)}

    def _consolidates(self) -> bool:
        """Whether this replica takes part in automatic consolidation (a compute replica whose
        ``EDITSERVE_CONSOLIDATE_EVERY`` is on)."""
        policy = getattr(getattr(self.plane, "auto_consolidation", None), "policy", None)
        return self.settings.role == ROLE_COMPUTE and policy is not None and policy.every > 0

    async def consolidator(self) -> str | None:
        """The one replica of the fleet that runs automatic consolidation (docs/fleet.md): the
        smallest id among the live compute replicas that have it on, this one included while it
        has it on (also before its first report); None when none has. Every replica computes the
        same answer from the registry, so two never consolidate the same head at once (except while
        membership changes: then the ledger refuses the later one, `LedgerConflict`)."""
        rows = await asyncio.to_thread(self.plane.ledger.replicas.all)
        ids = {r.replica_id for r in rows if r.age_s <= self.settings.live_s and r.role == ROLE_COMPUTE
               and r.details.get(CONSOLIDATES) is True}
        if self._consolidates():
            ids.add(self.settings.replica_id)
        return min(ids) if ids else None

    async def serving(self, version: int) -> list[str]:
        """Ids of the live replicas that serve `version` now."""
        return sorted(r["replica_id"] for r in await self.fleet() if r["live"] and r["version"] == version)

    async def wait_for_replicas(self, version: int, timeout_s: float) -> tuple[list[str], list[str]]:
        """Wait until every live replica serves `version` (or a later head); returns (serving, lagging)."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = [r for r in await self.fleet() if r["live"]]
            serving = sorted(r["replica_id"] for r in rows if r["version"] == version)
            lagging = sorted(r["replica_id"] for r in rows if r["version"] != version)
            if not lagging or time.monotonic() >= deadline:
                return serving, lagging
            await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    # -- readiness ---------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        """(ready, why): caught up since start and within `max_skew` of the last head read."""
        served = self.plane.served_version
        if served is None:
            return False, "not started"
        refused = self.refused
        if refused is not None and refused.version != served:
            return False, (f"head version {refused.version} refused ({refused.error}); serving version {served}, "
                           f"next try in {refused.to_dict(time.monotonic())['retry_in_s']:.0f} s")
        if not self.caught_up:
            return False, f"catching up: serving version {served}, head {self.last_head}"
        if self.last_head is not None and self.last_head - served > self.settings.max_skew:
            return False, (f"lagging: serving version {served}, head {self.last_head} (more than "
                           f"{self.settings.max_skew} behind)")
        return True, f"serving version {served}"

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        await self._step(None)
        while True:
            heard = None
            try:
                heard = await asyncio.to_thread(self._listener.wait, self.settings.reconcile_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.ledger_error = f"{type(exc).__name__}: {exc}"
                log.warning("replica %s: no head notifications (%s); reconciling every %.0f s",
                            self.settings.replica_id, exc, self.settings.reconcile_s)
                await asyncio.sleep(self.settings.reconcile_s)
            await self._step(heard)

    async def _step(self, heard: int | None) -> None:
        from editserve.ledger.errors import LedgerError

        head: int | None = None
        try:
            head = await asyncio.to_thread(self.plane.ledger.head)
            self.last_head = head
            followed = None
            if head != self.plane.served_version and not (self.refused and self.refused.waiting(head, time.monotonic())):
                followed = await self.plane.follow()
            if self.plane.served_version == head:
                self.caught_up = True
                self.refused = None
                if followed is not None:      # commits through other replicas count for consolidation too
                    await self.plane.auto_consolidation.after_commit(head)
            self.ledger_error = None
        except asyncio.CancelledError:
            raise
        except LedgerError as exc:
            self.ledger_error = f"{type(exc).__name__}: {exc}"
            log.warning("replica %s: cannot reach the ledger (%s); serving version %s meanwhile",
                        self.settings.replica_id, exc, self.plane.served_version)
            return
        except Exception as exc:
            if head is None:
                log.error("replica %s: reading the head failed: %s: %s", self.settings.replica_id,
                          type(exc).__name__, exc)
            else:
                self._refused(head, f"{type(exc).__name__}: {exc}")
        if time.monotonic() - self._last_report >= self.settings.heartbeat_s or heard is not None:
            await self.report()
        await self._publish_skew()

    def _refused(self, head: int, error: str) -> None:
        now, first = time.monotonic(), self.settings.reconcile_s
        if self.refused is not None and self.refused.version == head:
            self.refused = self.refused.again(error, now, first, self.settings.refused_retry_max_s)
        else:
            self.refused = RefusedHead.first(head, error, now, first)
        log.error("replica %s: following the head (version %d) failed (try %d): %s; next try in %.0f s",
                  self.settings.replica_id, head, self.refused.tries, error, self.refused.retry_at - now)

    async def _publish_skew(self) -> None:
        metrics = self.plane.metrics
        if metrics is None or not hasattr(metrics, "set_skew"):
            return
        try:
            rows = await self.fleet()
        except Exception as exc:
            log.debug("skew not published: %r", exc)
            return
        metrics.set_skew({r["replica_id"]: r["skew"] for r in rows if r["live"]})
        differ = sorted(r["replica_id"] for r in rows if r["live"] and r["policy_differs"])
        metrics.set_policy_differs(len(differ))
        if differ != self._policy_warned:
            if differ:
                log.warning("replica %s: the edit policy of live replica(s) %s differs from this one's (%s); an edit "
                            "is gated by the settings of the replica that takes it (docs/fleet.md)",
                            self.settings.replica_id, ", ".join(differ),
                            "; ".join(f"{r['replica_id']}: {', '.join(r['policy_differs'])}" for r in rows
                                      if r["replica_id"] in differ))
            self._policy_warned = differ
