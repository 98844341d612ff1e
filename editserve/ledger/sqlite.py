"""SQLite implementation of `LedgerStore` (WAL mode, ``synchronous=FULL``).

Every state change is one ``BEGIN IMMEDIATE`` transaction: the write lock is taken first,
then the expected head and idempotency key are checked, then rows are inserted. Triggers make
the versions, their operations, patches, base copies and the event log append-only; only the
single head row is ever updated. The schema is versioned (`SQLITE_MIGRATIONS`, recorded in
``schema_migrations``; see `editserve.ledger.migrations`). Migration 1 is the schema ledgers
had before migrations were recorded, written with ``IF NOT EXISTS``, so such a ledger is
adopted by recording it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from editserve.ledger.errors import (
    BaseCopyMismatch,
    IdempotencyMismatch,
    LedgerBusy,
    LedgerConflict,
    LedgerCorrupt,
    LedgerError,
    PatchNotFound,
    VersionNotFound,
)
from editserve.ledger.migrations import Migration, latest, pending
from editserve.ledger.store import (
    EVENT_CREATE,
    EVENT_ROLL_FORWARD,
    EVENT_ROLLBACK,
    KIND_BASE,
    BaseCopyRecord,
    Event,
    LedgerStore,
    NewVersion,
    ReplicaRecord,
    PatchRecord,
    PatchStateRecord,
    VersionRecord,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS patches (
    pid INTEGER PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    blob TEXT NOT NULL,
    blob_size INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS base_copies (
    name TEXT PRIMARY KEY,
    blob TEXT NOT NULL,
    blob_size INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    layout TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    parent INTEGER REFERENCES versions(version),
    kind TEXT NOT NULL,
    patch INTEGER REFERENCES patches(pid),
    caller TEXT NOT NULL,
    created_at REAL NOT NULL,
    probe_report TEXT,
    idempotency_key TEXT UNIQUE,
    request_digest TEXT,
    details TEXT NOT NULL DEFAULT '{}',
    CHECK (parent IS NULL OR parent < version)
);
CREATE TABLE IF NOT EXISTS version_ops (
    version INTEGER NOT NULL REFERENCES versions(version),
    seq INTEGER NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('add', 'remove')),
    patch INTEGER NOT NULL REFERENCES patches(pid),
    PRIMARY KEY (version, seq)
);
CREATE TABLE IF NOT EXISTS head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL REFERENCES versions(version)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    version INTEGER,
    from_version INTEGER,
    caller TEXT NOT NULL,
    details TEXT NOT NULL DEFAULT '{}'
);
"""

_APPEND_ONLY = ("events", "versions", "version_ops", "patches", "base_copies")


def _triggers() -> str:
    out = []
    for table in _APPEND_ONLY:
        for action in ("UPDATE", "DELETE"):
            out.append(
                f"CREATE TRIGGER IF NOT EXISTS {table}_no_{action.lower()} BEFORE {action} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'ledger table {table} is append-only'); END;"
            )
    return "\n".join(out)


_MIGRATIONS_TABLE = ("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                     "checksum TEXT NOT NULL, applied_at REAL NOT NULL)")

# Migration 2 (issue 16): the preserved-keys blocks of each patch (editserve.ledger.keystate).
_PATCH_STATE = (
    "CREATE TABLE IF NOT EXISTS patch_state (digest TEXT PRIMARY KEY, blob TEXT NOT NULL, "
    "blob_size INTEGER NOT NULL, n_blocks INTEGER NOT NULL, created_at REAL NOT NULL)",
    *(f"CREATE TRIGGER IF NOT EXISTS patch_state_no_{a.lower()} BEFORE {a} ON patch_state "
      f"BEGIN SELECT RAISE(ABORT, 'ledger table patch_state is append-only'); END"
      for a in ("UPDATE", "DELETE")),
)

SQLITE_MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "ledger_schema", tuple(s for s in (_SCHEMA + _triggers()).split(";\n") if s.strip())),
    Migration(2, "patch_state", _PATCH_STATE),
    # The replica registry (docs/fleet.md); mutable by design. SQLite has no NOTIFY: followers reconcile.
    Migration(3, "replicas", (
        "CREATE TABLE IF NOT EXISTS replicas (replica_id TEXT PRIMARY KEY CHECK (length(replica_id) BETWEEN 1 AND 128), "
        "version INTEGER NOT NULL REFERENCES versions(version), role TEXT NOT NULL CHECK (role IN "
        "('compute', 'serve-only')), address TEXT NOT NULL, started_at REAL NOT NULL, updated_at REAL NOT NULL, "
        "details TEXT NOT NULL DEFAULT '{}')",
    )),
)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class SqliteStore(LedgerStore):
    """One SQLite database file (plus its WAL) holding a ledger's metadata."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.RLock()
        try:
            self._conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None,
                                         check_same_thread=False)
            self._pragma("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as exc:
            raise LedgerCorrupt(f"cannot open ledger database {str(self.path)!r}: {exc}") from exc

    def _pragma(self, sql: str) -> None:
        # Switching to WAL needs a moment without other writers; retry within the busy timeout.
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                self._conn.execute(sql)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise LedgerBusy(f"ledger {str(self.path)!r} stayed locked for {self.busy_timeout_s:.0f}s") from exc
                raise
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # -- lifecycle -------------------------------------------------------------------------

    def is_initialized(self) -> bool:
        rows = self._query("SELECT name FROM sqlite_master WHERE type='table' AND name='head'")
        return bool(rows) and bool(self._query("SELECT 1 FROM head WHERE id=1"))

    def _applied(self, c: sqlite3.Connection) -> dict[int, str]:
        return {int(v): str(ck) for v, ck in c.execute("SELECT version, checksum FROM schema_migrations")}

    def upgrade(self) -> list[int]:
        """Apply pending schema migrations, each in one ``BEGIN IMMEDIATE`` transaction; returns their numbers."""
        if self._query("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_migrations'"):
            with self._lock:
                applied = self._applied(self._conn)
            if all(m.number in applied for m in SQLITE_MIGRATIONS):      # fast path: no write lock
                pending(applied, SQLITE_MIGRATIONS, repr(str(self.path)))
                return []
        done = []
        with self._tx() as c:
            c.execute(_MIGRATIONS_TABLE)
            todo = pending(self._applied(c), SQLITE_MIGRATIONS, repr(str(self.path)))
        for m in todo:
            with self._tx() as c:
                if m.number in self._applied(c):              # another opener applied it meanwhile
                    continue
                # One statement at a time: executescript() would commit the open transaction.
                for stmt in m.statements:
                    c.execute(stmt)
                c.execute("INSERT INTO schema_migrations(version, name, checksum, applied_at) VALUES (?, ?, ?, ?)",
                          (m.number, m.name, m.checksum, time.time()))
            done.append(m.number)
            log.info("ledger %s: applied schema migration %d (%s)", self.path, m.number, m.name)
        return done

    def schema_version(self) -> int:
        rows = self._query("SELECT COALESCE(MAX(version), 0) FROM schema_migrations") if self._query(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_migrations'") else [(0,)]
        return int(rows[0][0])

    def initialize(self, model_fingerprint: str, caller: str, meta: dict[str, str]) -> None:
        self.upgrade()
        with self._tx() as c:
            if c.execute("SELECT 1 FROM head WHERE id=1").fetchone():
                return
            now = time.time()
            rows = {"schema_version": SCHEMA_VERSION, "model_fingerprint": model_fingerprint,
                    "created_at": repr(now), **meta}
            c.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", sorted(rows.items()))
            c.execute("INSERT INTO versions(version, parent, kind, patch, caller, created_at, details) "
                      "VALUES (0, NULL, ?, NULL, ?, ?, '{}')", (KIND_BASE, caller, now))
            c.execute("INSERT INTO head(id, version) VALUES (1, 0)")
            c.execute("INSERT INTO events(ts, kind, version, from_version, caller, details) VALUES (?, ?, 0, NULL, ?, ?)",
                      (now, EVENT_CREATE, caller, _dumps({"model_fingerprint": model_fingerprint})))
        log.info("created ledger %s for model %s", self.path, model_fingerprint[:16])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def meta(self) -> dict[str, str]:
        return dict(self._query("SELECT key, value FROM meta"))

    def nbytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                total += p.stat().st_size
        return total

    # -- reads -----------------------------------------------------------------------------

    def head(self) -> int:
        rows = self._query("SELECT version FROM head WHERE id=1")
        if not rows:
            raise LedgerCorrupt(f"ledger {str(self.path)!r} has no head row")
        return int(rows[0][0])

    def _ops(self, versions: Sequence[int] | None = None) -> dict[int, list[tuple[str, str]]]:
        sql = ("SELECT o.version, o.op, p.digest FROM version_ops o JOIN patches p ON p.pid = o.patch "
               "{where} ORDER BY o.version, o.seq")
        if versions is None:
            rows = self._query(sql.format(where=""))
        else:
            rows = self._query(sql.format(where="WHERE o.version = ?"), (versions[0],)) if len(versions) == 1 else \
                self._query(sql.format(where=f"WHERE o.version IN ({','.join('?' * len(versions))})"), tuple(versions))
        out: dict[int, list[tuple[str, str]]] = {}
        for v, op, digest in rows:
            out.setdefault(int(v), []).append((op, digest))
        return out

    _VERSION_COLS = ("SELECT v.version, v.parent, v.kind, p.digest, v.caller, v.created_at, v.probe_report, "
                     "v.idempotency_key, v.request_digest, v.details FROM versions v "
                     "LEFT JOIN patches p ON p.pid = v.patch")

    @staticmethod
    def _version_row(row: tuple[Any, ...], ops: list[tuple[str, str]]) -> VersionRecord:
        v, parent, kind, digest, caller, created, probe, key, req, details = row
        return VersionRecord(
            version=int(v), parent=None if parent is None else int(parent), kind=kind, patch=digest,
            ops=tuple(ops), caller=caller, created_at=float(created),
            probe_report=None if probe is None else json.loads(probe),
            idempotency_key=key, request_digest=req, details=json.loads(details),
        )

    def version(self, version: int) -> VersionRecord:
        rows = self._query(self._VERSION_COLS + " WHERE v.version = ?", (int(version),))
        if not rows:
            raise VersionNotFound(f"version {version} does not exist in ledger {str(self.path)!r} (latest is {self._max()})")
        return self._version_row(rows[0], self._ops([int(version)]).get(int(version), []))

    def _max(self) -> int:
        return int(self._query("SELECT COALESCE(MAX(version), -1) FROM versions")[0][0])

    def versions(self) -> list[VersionRecord]:
        ops = self._ops()
        return [self._version_row(r, ops.get(int(r[0]), []))
                for r in self._query(self._VERSION_COLS + " ORDER BY v.version")]

    def chain_ops(self, version: int) -> list[tuple[int, str, str]]:
        if not self._query("SELECT 1 FROM versions WHERE version = ?", (int(version),)):
            raise VersionNotFound(f"version {version} does not exist in ledger {str(self.path)!r} (latest is {self._max()})")
        rows = self._query(
            "WITH RECURSIVE chain(v) AS (SELECT ? UNION ALL "
            "SELECT versions.parent FROM versions JOIN chain ON versions.version = chain.v "
            "WHERE versions.parent IS NOT NULL) "
            "SELECT o.version, o.op, p.digest FROM version_ops o JOIN chain ON o.version = chain.v "
            "JOIN patches p ON p.pid = o.patch ORDER BY o.version, o.seq",
            (int(version),),
        )
        return [(int(v), op, d) for v, op, d in rows]

    @staticmethod
    def _patch_row(row: tuple[Any, ...]) -> PatchRecord:
        digest, blob, size, manifest, created = row
        return PatchRecord(digest=digest, blob=blob, blob_size=int(size), manifest=json.loads(manifest),
                           created_at=float(created))

    def patch(self, digest: str) -> PatchRecord:
        rows = self._query("SELECT digest, blob, blob_size, manifest, created_at FROM patches WHERE digest = ?", (digest,))
        if not rows:
            raise PatchNotFound(f"patch {digest!r} is not in ledger {str(self.path)!r}")
        return self._patch_row(rows[0])

    def patches(self) -> list[PatchRecord]:
        return [self._patch_row(r) for r in
                self._query("SELECT digest, blob, blob_size, manifest, created_at FROM patches ORDER BY pid")]

    def base_copies(self) -> dict[str, BaseCopyRecord]:
        out = {}
        for name, blob, size, dtype, shape, layout, created in self._query(
                "SELECT name, blob, blob_size, dtype, shape, layout, created_at FROM base_copies ORDER BY name"):
            out[name] = BaseCopyRecord(name=name, blob=blob, blob_size=int(size), dtype=dtype,
                                       shape=tuple(json.loads(shape)), layout=layout, created_at=float(created))
        return out

    def events(self, since_id: int = 0) -> list[Event]:
        return [Event(id=int(i), ts=float(ts), kind=k, version=v, from_version=f, caller=c, details=json.loads(d))
                for i, ts, k, v, f, c, d in self._query(
                    "SELECT id, ts, kind, version, from_version, caller, details FROM events WHERE id > ? ORDER BY id",
                    (int(since_id),))]

    # -- writes ----------------------------------------------------------------------------

    @staticmethod
    def _insert_bases(c: sqlite3.Connection, bases: Sequence[BaseCopyRecord]) -> None:
        for b in bases:
            row = c.execute("SELECT blob FROM base_copies WHERE name = ?", (b.name,)).fetchone()
            if row is not None:
                if row[0] != b.blob:
                    raise BaseCopyMismatch(
                        f"base copy of {b.name!r} is already stored as blob {row[0][:16]}; the one offered hashes to "
                        f"{b.blob[:16]} (was it taken from an edited model?)")
                continue
            c.execute("INSERT INTO base_copies(name, blob, blob_size, dtype, shape, layout, created_at) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (b.name, b.blob, b.blob_size, b.dtype, _dumps(list(b.shape)), b.layout, b.created_at))

    def add_base_copies(self, bases: Sequence[BaseCopyRecord]) -> None:
        with self._tx() as c:
            self._insert_bases(c, bases)

    def append_version(self, new: NewVersion, expected_head: int | None, patches: Sequence[PatchRecord],
                       bases: Sequence[BaseCopyRecord]) -> tuple[int, bool]:
        with self._tx() as c:
            if new.idempotency_key is not None:
                row = c.execute("SELECT version, request_digest FROM versions WHERE idempotency_key = ?",
                                (new.idempotency_key,)).fetchone()
                if row is not None:
                    if row[1] != new.request_digest:
                        raise IdempotencyMismatch(
                            f"idempotency key {new.idempotency_key!r} was used for version {row[0]} with another "
                            f"request ({str(row[1])[:16]}); this one is {str(new.request_digest)[:16]}")
                    return int(row[0]), False
            head = int(c.execute("SELECT version FROM head WHERE id=1").fetchone()[0])
            if expected_head is not None and head != expected_head:
                raise LedgerConflict(f"head moved: expected version {expected_head}, the head is version {head}",
                                     expected_head=expected_head, actual_head=head)
            if new.parent != head:
                raise LedgerConflict(f"new version's parent {new.parent} is not the head {head}",
                                     expected_head=new.parent, actual_head=head)
            for p in patches:
                c.execute("INSERT OR IGNORE INTO patches(digest, blob, blob_size, manifest, created_at) "
                          "VALUES (?, ?, ?, ?, ?)", (p.digest, p.blob, p.blob_size, _dumps(p.manifest), p.created_at))
            self._insert_bases(c, bases)
            pids = {}
            for _op, digest in new.ops:
                row = c.execute("SELECT pid FROM patches WHERE digest = ?", (digest,)).fetchone()
                if row is None:
                    raise PatchNotFound(f"patch {digest!r} is neither stored nor part of this commit")
                pids[digest] = int(row[0])
            number = int(c.execute("SELECT COALESCE(MAX(version), -1) + 1 FROM versions").fetchone()[0])
            now = time.time()
            c.execute(
                "INSERT INTO versions(version, parent, kind, patch, caller, created_at, probe_report, idempotency_key, "
                "request_digest, details) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (number, new.parent, new.kind, pids.get(new.patch) if new.patch else None, new.caller, now,
                 None if new.probe_report is None else _dumps(new.probe_report), new.idempotency_key,
                 new.request_digest, _dumps(new.details)))
            c.executemany("INSERT INTO version_ops(version, seq, op, patch) VALUES (?, ?, ?, ?)",
                          [(number, i, op, pids[d]) for i, (op, d) in enumerate(new.ops)])
            c.execute("UPDATE head SET version = ? WHERE id = 1", (number,))
            c.execute("INSERT INTO events(ts, kind, version, from_version, caller, details) VALUES (?, ?, ?, ?, ?, ?)",
                      (now, new.event_kind, number, head, new.caller, _dumps(new.event_details)))
        return number, True

    def add_patch_states(self, states: Sequence[PatchStateRecord]) -> None:
        with self._tx() as c:
            for st in states:
                row = c.execute("SELECT blob FROM patch_state WHERE digest = ?", (st.digest,)).fetchone()
                if row is not None:
                    if row[0] != st.blob:
                        raise LedgerError(f"patch {st.digest[:12]} already has preserved keys (blob {row[0][:16]}); "
                                          f"the ones offered hash to {st.blob[:16]}")
                    continue
                c.execute("INSERT INTO patch_state(digest, blob, blob_size, n_blocks, created_at) VALUES (?, ?, ?, ?, ?)",
                          (st.digest, st.blob, st.blob_size, st.n_blocks, st.created_at))

    def patch_states(self, digests: Sequence[str]) -> dict[str, PatchStateRecord]:
        out: dict[str, PatchStateRecord] = {}
        digests = list(dict.fromkeys(digests))
        for i in range(0, len(digests), 500):
            part = digests[i:i + 500]
            for d, blob, size, n, created in self._query(
                    f"SELECT digest, blob, blob_size, n_blocks, created_at FROM patch_state WHERE digest IN "
                    f"({','.join('?' * len(part))})", part):
                out[d] = PatchStateRecord(digest=d, blob=blob, blob_size=int(size), n_blocks=int(n),
                                          created_at=float(created))
        return out

    def idempotent(self, key: str) -> tuple[int, str | None] | None:
        rows = self._query("SELECT version, request_digest FROM versions WHERE idempotency_key = ?", (key,))
        return (int(rows[0][0]), rows[0][1]) if rows else None

    def move_head(self, target: int, expected_head: int | None, caller: str, details: dict[str, Any]) -> tuple[int, int]:
        with self._tx() as c:
            head = int(c.execute("SELECT version FROM head WHERE id=1").fetchone()[0])
            if expected_head is not None and head != expected_head:
                raise LedgerConflict(f"head moved: expected version {expected_head}, the head is version {head}",
                                     expected_head=expected_head, actual_head=head)
            if not c.execute("SELECT 1 FROM versions WHERE version = ?", (int(target),)).fetchone():
                raise VersionNotFound(f"version {target} does not exist in ledger {str(self.path)!r}")
            if target == head:
                return head, head
            kind = EVENT_ROLLBACK if target < head else EVENT_ROLL_FORWARD
            c.execute("UPDATE head SET version = ? WHERE id = 1", (int(target),))
            c.execute("INSERT INTO events(ts, kind, version, from_version, caller, details) VALUES (?, ?, ?, ?, ?, ?)",
                      (time.time(), kind, int(target), head, caller, _dumps(details)))
        return head, int(target)

    # -- checks ----------------------------------------------------------------------------

    def check_consistency(self) -> list[str]:
        problems: list[str] = []
        try:
            result = self._query("PRAGMA quick_check")
        except sqlite3.DatabaseError as exc:
            return [f"database check failed: {exc}"]
        if [r[0] for r in result] != ["ok"]:
            problems.append("database quick_check: " + "; ".join(str(r[0]) for r in result[:5]))
        if self.schema_version() != latest(SQLITE_MIGRATIONS):
            problems.append(f"schema is at migration {self.schema_version()}, expected {latest(SQLITE_MIGRATIONS)}")
        missing = {f"{t}_no_{a}" for t in _APPEND_ONLY for a in ("update", "delete")} - {
            r[0] for r in self._query("SELECT name FROM sqlite_master WHERE type='trigger'")}
        if missing:
            problems.append(f"append-only triggers missing: {sorted(missing)}")
        numbers = [int(r[0]) for r in self._query("SELECT version FROM versions ORDER BY version")]
        if numbers != list(range(len(numbers))):
            problems.append(f"version numbers are not contiguous from 0: {numbers[:10]}...")
        head = self._query("SELECT version FROM head WHERE id=1")
        if not head:
            problems.append("no head row")
        elif int(head[0][0]) not in set(numbers):
            problems.append(f"head points at missing version {head[0][0]}")
        dangling = self._query("SELECT v.version FROM versions v LEFT JOIN versions p ON p.version = v.parent "
                               "WHERE v.parent IS NOT NULL AND p.version IS NULL")
        if dangling:
            problems.append(f"versions with a missing parent: {[r[0] for r in dangling]}")
        bad_ops = self._query("SELECT o.version FROM version_ops o LEFT JOIN patches p ON p.pid = o.patch "
                              "WHERE p.pid IS NULL")
        if bad_ops:
            problems.append(f"versions referring to unknown patches: {sorted({r[0] for r in bad_ops})}")
        no_event = self._query(
            "SELECT v.version FROM versions v WHERE v.version > 0 AND NOT EXISTS "
            "(SELECT 1 FROM events e WHERE e.version = v.version AND e.kind IN ('commit', 'revert', 'import', 'consolidate'))")
        if no_event:
            problems.append(f"versions without their creation event: {[r[0] for r in no_event]}")
        empty = self._query("SELECT v.version FROM versions v WHERE v.version > 0 AND NOT EXISTS "
                            "(SELECT 1 FROM version_ops o WHERE o.version = v.version)")
        if empty:
            problems.append(f"versions without operations: {[r[0] for r in empty]}")
        return problems

    # -- the replica registry (migration 3) ------------------------------------------------

    def record_replica(self, replica_id: str, version: int, role: str, address: str, started_at: float,
                       details: dict[str, Any]) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO replicas(replica_id, version, role, address, started_at, updated_at, details) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(replica_id) DO UPDATE SET version = excluded.version, "
                      "role = excluded.role, address = excluded.address, started_at = excluded.started_at, "
                      "updated_at = excluded.updated_at, details = excluded.details",
                      (replica_id, int(version), role, address, float(started_at), time.time(), _dumps(details)))

    def replicas(self) -> list[ReplicaRecord]:
        now = time.time()
        rows = self._query("SELECT replica_id, version, role, address, started_at, updated_at, details "
                           "FROM replicas ORDER BY replica_id")
        return [ReplicaRecord(replica_id=r, version=int(v), role=role, address=a, started_at=float(st),
                              updated_at=float(up), age_s=max(0.0, now - float(up)), details=json.loads(d))
                for r, v, role, a, st, up, d in rows]

    def forget_replica(self, replica_id: str) -> bool:
        with self._tx() as c:
            return c.execute("DELETE FROM replicas WHERE replica_id = ?", (replica_id,)).rowcount > 0


def open_sqlite(path: Path, busy_timeout_s: float = 60.0) -> SqliteStore:
    try:
        return SqliteStore(path, busy_timeout_s)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot open ledger database {str(path)!r}: {exc}") from exc
