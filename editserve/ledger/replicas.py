"""`Replicas`: the fleet's replica registry in a ledger (``Ledger.replicas``; docs/fleet.md).

Every replica serving from one ledger records which version it serves (also its heartbeat);
`editserve.engine.fleet` reads them back to show the fleet and its version skew, and waits on
`listener()` for a new head.
"""

from __future__ import annotations

from typing import Any

from editserve.ledger.location import LedgerLocation
from editserve.ledger.store import LedgerStore, ReplicaRecord


class Replicas:
    """The replica registry of one ledger."""

    def __init__(self, store: LedgerStore, location: LedgerLocation) -> None:
        self._store = store
        self._location = location

    def record(self, replica_id: str, version: int, role: str, address: str, started_at: float,
               details: dict[str, Any] | None = None) -> None:
        """Record that replica `replica_id` serves `version` now (also its heartbeat)."""
        self._store.record_replica(replica_id, version, role, address, started_at, dict(details or {}))

    def all(self) -> list[ReplicaRecord]:
        """Every replica that reported, by id."""
        return self._store.replicas()

    def forget(self, replica_id: str) -> bool:
        """Drop `replica_id` from the registry; False when it was not there."""
        return self._store.forget_replica(replica_id)

    def listener(self) -> Any:
        """A `editserve.ledger.notify.HeadListener` on this ledger (PostgreSQL: LISTEN/NOTIFY;
        SQLite: waits only for its timeout)."""
        from editserve.ledger.notify import HeadListener

        return HeadListener(self._location)
