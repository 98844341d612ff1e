"""One PostgreSQL connection of a ledger, shared by its store and blob store, with error mapping.

`PgConnection` opens a psycopg 3 connection in autocommit mode (reads never leave a
transaction open), runs writes in explicit transactions (`transaction`) and multi-statement
reads in a read-only REPEATABLE READ snapshot (`snapshot`), one caller at a time. After the
connection is lost, or in a forked child, the next call connects anew.

Errors are mapped to the ledger's types with the DSN redacted: a server that cannot be
reached → `LedgerUnavailable`, a malformed DSN → `LedgerError`, a lock wait beyond ``lock_timeout`` → `LedgerBusy`, anything
else from the driver → `LedgerError`. The driver's exception is not chained when connecting
(its text may quote the connection string); it is scrubbed and chained otherwise.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from editserve.ledger.errors import LedgerBusy, LedgerError, LedgerUnavailable
from editserve.ledger.location import LedgerLocation, scrub

log = logging.getLogger(__name__)

# SQLSTATE classes/codes that mean "the server is not there (any more)".
_UNAVAILABLE_CLASSES = ("08",)                       # connection exception
_UNAVAILABLE_CODES = {"57P01", "57P02", "57P03", "53300"}   # admin/crash shutdown, cannot connect now, too many connections


class PgConnection:
    """A lazily (re)connected psycopg connection to the database named by `location`."""

    def __init__(self, location: LedgerLocation, lock_timeout_s: float = 60.0, connect_timeout_s: float = 10.0,
                 application_name: str = "editserve-ledger") -> None:
        if location.dsn is None:
            raise LedgerError(f"{location} is not a PostgreSQL ledger")
        self.location = location
        self.lock_timeout_s = lock_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.application_name = application_name
        self._lock = threading.RLock()
        self._conn: Any = None
        self._inherited: Any = None
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"PgConnection({self.location.redacted!r})"

    # -- connecting ----------------------------------------------------------------------------

    def _connect(self) -> Any:
        import psycopg

        dsn = str(self.location.dsn)
        try:
            conn = psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, int(round(self.connect_timeout_s))),
                                   application_name=self.application_name)
        except psycopg.OperationalError as exc:     # no server, refused, unknown database, authentication
            raise LedgerUnavailable(f"cannot connect to ledger {self.location.redacted}: "
                                    f"{scrub(str(exc).strip(), dsn)}") from None
        except psycopg.Error as exc:                # a malformed DSN (libpq quotes it: scrubbed, not chained)
            raise LedgerError(f"invalid ledger DSN {self.location.redacted}: {scrub(str(exc).strip(), dsn)}") from None
        try:
            conn.execute(f"SET lock_timeout = {int(self.lock_timeout_s * 1000)}")
            conn.execute("SET idle_in_transaction_session_timeout = 0")
        except psycopg.Error as exc:
            conn.close()
            raise LedgerUnavailable(f"cannot set up the connection to ledger {self.location.redacted}: "
                                    f"{scrub(str(exc).strip(), dsn)}") from None
        return conn

    def _connection(self) -> Any:
        if self._pid != os.getpid():                 # forked: never share the parent's socket
            # Keep (never use, never close) the parent's connection object: dropping it would warn.
            self._inherited, self._conn, self._pid = self._conn, None, os.getpid()
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None and not self._conn.closed:
                self._conn.close()
            self._conn = self._connect()
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid() and not self._conn.closed:
                self._conn.close()
            self._conn = None

    # -- errors --------------------------------------------------------------------------------

    def _map(self, exc: Exception, what: str) -> LedgerError:
        import psycopg

        text = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                     self.location.dsn)
        where = self.location.redacted
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            return LedgerBusy(f"ledger {where} stayed locked for {self.lock_timeout_s:.0f}s ({what})")
        state = getattr(exc, "sqlstate", None) or ""
        broken = self._conn is None or self._conn.closed or self._conn.broken
        if broken or state[:2] in _UNAVAILABLE_CLASSES or state in _UNAVAILABLE_CODES:
            return LedgerUnavailable(f"lost the connection to ledger {where} during {what}: {text}")
        return LedgerError(f"ledger {where}: {what} failed: {text}")

    # -- running -------------------------------------------------------------------------------

    @contextmanager
    def transaction(self, what: str = "a write") -> Iterator[Any]:
        """A read-write transaction; everything raised inside rolls it back. Yields the connection."""
        import psycopg

        with self._lock:
            conn = self._connection()
            committing = False
            try:
                with conn.transaction():
                    yield conn
                    committing = True
            except psycopg.Error as exc:
                err = self._map(exc, what)
                if committing and isinstance(err, LedgerUnavailable):
                    err = LedgerUnavailable(f"{err}; the outcome of the commit is unknown (retry with the same "
                                            f"idempotency key)")
                raise err from exc

    @contextmanager
    def snapshot(self) -> Iterator[Any]:
        """A read-only REPEATABLE READ transaction: several queries see one state."""
        import psycopg

        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")     # one round trip
                try:
                    yield conn
                except BaseException:
                    if not (conn.closed or conn.broken):
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except psycopg.Error as exc:
                raise self._map(exc, "a read") from exc

    def query(self, sql: str, args: Sequence[Any] | dict[str, Any] = (), binary: bool = False) -> list[tuple[Any, ...]]:
        """One statement in autocommit mode (one snapshot); its rows, in binary format if `binary`."""
        import psycopg

        with self._lock:
            conn = self._connection()
            try:
                return conn.execute(sql, args, binary=binary).fetchall()
            except psycopg.Error as exc:
                raise self._map(exc, "a read") from exc
