"""`HeadListener`: hear of a new ledger head as soon as it is committed (PostgreSQL LISTEN/NOTIFY).

The ``head`` table's trigger (PostgreSQL migration 3) runs ``pg_notify('editserve_head', <head>)``
inside the transaction that moves the head, so the notification is delivered exactly when the
commit or rollback becomes visible, and never for a transaction that rolled back. A listener
holds one dedicated autocommit connection (a LISTEN lasts only as long as its session).

Notifications are a hint, not the truth: a follower always re-reads the head and also
reconciles periodically, because a notification sent while the listener was disconnected is
lost. SQLite has no such channel: `HeadListener.wait` there just sleeps for its timeout.
Errors never show the DSN's secret (`editserve.ledger.location.scrub`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from editserve.ledger.errors import LedgerUnavailable
from editserve.ledger.location import LedgerLocation, scrub
from editserve.ledger.pgschema import HEAD_CHANNEL

log = logging.getLogger(__name__)


class HeadListener:
    """Blocking `wait(timeout_s)` for the next head notification; reconnects on the next call after a loss."""

    def __init__(self, location: LedgerLocation, connect_timeout_s: float = 5.0) -> None:
        self.location = location
        self.connect_timeout_s = connect_timeout_s
        self._conn: Any = None

    @property
    def supported(self) -> bool:
        return self.location.dsn is not None

    def _connect(self) -> Any:
        import psycopg

        dsn = str(self.location.dsn)
        try:
            conn = psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, int(round(self.connect_timeout_s))),
                                   application_name="editserve-follower")
            conn.execute(f"LISTEN {HEAD_CHANNEL}")
        except psycopg.Error as exc:
            raise LedgerUnavailable(f"cannot listen on ledger {self.location.redacted}: "
                                    f"{scrub(str(exc).strip(), dsn)}") from None
        return conn

    def wait(self, timeout_s: float) -> int | None:
        """The last head announced within `timeout_s` (None if none; a rollback may announce a lower one). Raises `LedgerUnavailable`
        when the server cannot be reached (the caller reconciles and retries later)."""
        if not self.supported:
            time.sleep(timeout_s)
            return None
        import psycopg

        if self._conn is None or self._conn.closed or self._conn.broken:
            self.close()
            self._conn = self._connect()
        newest: int | None = None
        try:
            # The first notification ends the wait; any others already queued are drained too (in commit order).
            for n in self._conn.notifies(timeout=timeout_s, stop_after=1):
                newest = _head_of(n.payload, newest)
            for n in self._conn.notifies(timeout=0.0):
                newest = _head_of(n.payload, newest)
        except psycopg.Error as exc:
            self.close()
            raise LedgerUnavailable(f"lost the notification connection to ledger {self.location.redacted}: "
                                    f"{scrub(str(exc).strip(), str(self.location.dsn))}") from None
        return newest

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            try:
                conn.close()
            except Exception as exc:  # closing a broken socket: nothing left to release
                log.debug("closing the listener connection: %r", exc)


def _head_of(payload: str, newest: int | None) -> int | None:
    """The head in `payload` (notifications arrive in commit order: the last one is current)."""
    try:
        v = int(payload)
    except ValueError:
        log.warning("ignoring a malformed head notification %r", payload[:40])
        return newest
    return v
