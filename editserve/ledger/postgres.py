"""PostgreSQL implementation of `LedgerStore` (psycopg 3): one database holds one ledger.

Every state change is one transaction that first locks the single head row
(``SELECT ... FROM head WHERE id = 1 FOR UPDATE``), so writers are serialised exactly like
SQLite's ``BEGIN IMMEDIATE``: under READ COMMITTED every later statement of the transaction
sees what earlier writers committed, and the idempotency key, the expected head and the next
version number are read under that lock. Unique keys (version, idempotency key) back this up.
Times are the server's clock (``transaction_timestamp()``), one per transaction, so every
replica writing to the ledger stamps on one clock.

The schema is `editserve.ledger.pgschema` (versioned migrations, append-only triggers);
blobs live in the same database (`editserve.ledger.pgblobs`), so nothing is on a filesystem.
The DSN is read only by `editserve.ledger.pgconn`; messages name the ledger by its redacted
location.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from editserve.ledger.errors import (
    BaseCopyMismatch,
    IdempotencyMismatch,
    LedgerConflict,
    LedgerCorrupt,
    LedgerError,
    PatchNotFound,
    VersionNotFound,
)
from editserve.ledger.location import LedgerLocation
from editserve.ledger.migrations import Migration, latest
from editserve.ledger.pgconn import PgConnection
from editserve.ledger.pgschema import PG_MIGRATIONS, REQUIRED_TRIGGERS, applied_migrations, apply_migrations
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

_NOW = "extract(epoch from transaction_timestamp())"
_META_TABLES = ("meta", "patches", "base_copies", "versions", "version_ops", "head", "events", "schema_migrations",
                "patch_state")


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class PostgresStore(LedgerStore):
    """The metadata of one ledger in a PostgreSQL database, over `conn` (shared with its blob store)."""

    def __init__(self, conn: PgConnection, migrations: Sequence[Migration] = PG_MIGRATIONS) -> None:
        self.conn = conn
        self.migrations = tuple(migrations)

    @classmethod
    def connect(cls, location: LedgerLocation, busy_timeout_s: float = 60.0) -> PostgresStore:
        return cls(PgConnection(location, lock_timeout_s=busy_timeout_s))

    @property
    def location(self) -> LedgerLocation:
        return self.conn.location

    def __repr__(self) -> str:
        return f"PostgresStore({self.location.redacted!r})"

    def _where(self) -> str:
        return f"ledger {self.location.redacted}"

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.query(sql, args)

    # -- lifecycle -------------------------------------------------------------------------

    def is_initialized(self) -> bool:
        if not self._query("SELECT to_regclass('head') IS NOT NULL")[0][0]:
            return False
        return bool(self._query("SELECT 1 FROM head WHERE id = 1"))

    def upgrade(self) -> list[int]:
        return apply_migrations(self.conn, self.migrations)

    def schema_version(self) -> int:
        applied = applied_migrations(self.conn)
        return max(applied) if applied else 0

    def initialize(self, model_fingerprint: str, caller: str, meta: dict[str, str]) -> None:
        self.upgrade()
        with self.conn.transaction("creating the ledger") as c:
            c.execute("LOCK TABLE head IN EXCLUSIVE MODE")          # concurrent creators: one inserts version 0
            if c.execute("SELECT 1 FROM head WHERE id = 1").fetchone():
                return
            now = float(c.execute(f"SELECT {_NOW}").fetchone()[0])
            rows = {"schema_version": str(latest(self.migrations)), "model_fingerprint": model_fingerprint,
                    "created_at": repr(now), **meta}
            with c.cursor() as cur:
                cur.executemany("INSERT INTO meta(key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE "
                                "SET value = EXCLUDED.value", sorted(rows.items()))
            c.execute("INSERT INTO versions(version, parent, kind, patch, caller, created_at, details) "
                      "VALUES (0, NULL, %s, NULL, %s, %s, '{}')", (KIND_BASE, caller, now))
            c.execute("INSERT INTO head(id, version) VALUES (1, 0)")
            c.execute("INSERT INTO events(ts, kind, version, from_version, caller, details) "
                      "VALUES (%s, %s, 0, NULL, %s, %s)",
                      (now, EVENT_CREATE, caller, _dumps({"model_fingerprint": model_fingerprint})))
        log.info("created ledger %s for model %s", self.location.redacted, model_fingerprint[:16])

    def close(self) -> None:
        self.conn.close()

    def meta(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self._query("SELECT key, value FROM meta")}

    def nbytes(self) -> int:
        rows = self._query("SELECT coalesce(sum(pg_total_relation_size(to_regclass(t))), 0)::bigint FROM unnest(%s::text[]) AS t",
                           (list(_META_TABLES),))
        return int(rows[0][0])

    # -- reads -----------------------------------------------------------------------------

    def head(self) -> int:
        rows = self._query("SELECT version FROM head WHERE id = 1")
        if not rows:
            raise LedgerCorrupt(f"{self._where()} has no head row")
        return int(rows[0][0])

    @staticmethod
    def _ops_rows(c: Any, versions: Sequence[int] | None = None) -> dict[int, list[tuple[str, str]]]:
        sql = "SELECT o.version, o.op, p.digest FROM version_ops o JOIN patches p ON p.pid = o.patch"
        rows = c.execute(sql + " ORDER BY o.version, o.seq").fetchall() if versions is None else \
            c.execute(sql + " WHERE o.version = ANY(%s) ORDER BY o.version, o.seq", (list(versions),)).fetchall()
        out: dict[int, list[tuple[str, str]]] = {}
        for v, op, digest in rows:
            out.setdefault(int(v), []).append((str(op), str(digest)))
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

    def _max(self) -> int:
        return int(self._query("SELECT COALESCE(MAX(version), -1) FROM versions")[0][0])

    def _not_found(self, version: int) -> VersionNotFound:
        return VersionNotFound(f"version {version} does not exist in {self._where()} (latest is {self._max()})")

    def version(self, version: int) -> VersionRecord:
        with self.conn.snapshot() as c:
            row = c.execute(self._VERSION_COLS + " WHERE v.version = %s", (int(version),)).fetchone()
            ops = self._ops_rows(c, [int(version)]) if row is not None else {}
        if row is None:
            raise self._not_found(version)
        return self._version_row(row, ops.get(int(version), []))

    def versions(self) -> list[VersionRecord]:
        with self.conn.snapshot() as c:
            rows = c.execute(self._VERSION_COLS + " ORDER BY v.version").fetchall()
            ops = self._ops_rows(c)
        return [self._version_row(r, ops.get(int(r[0]), [])) for r in rows]

    def chain_ops(self, version: int) -> list[tuple[int, str, str]]:
        with self.conn.snapshot() as c:
            exists = c.execute("SELECT 1 FROM versions WHERE version = %s", (int(version),)).fetchone()
            rows = c.execute(
                "WITH RECURSIVE chain(v) AS (SELECT %s::integer UNION ALL "
                "SELECT versions.parent FROM versions JOIN chain ON versions.version = chain.v "
                "WHERE versions.parent IS NOT NULL) "
                "SELECT o.version, o.op, p.digest FROM version_ops o JOIN chain ON o.version = chain.v "
                "JOIN patches p ON p.pid = o.patch ORDER BY o.version, o.seq",
                (int(version),)).fetchall() if exists else []
        if not exists:
            raise self._not_found(version)
        return [(int(v), str(op), str(d)) for v, op, d in rows]

    @staticmethod
    def _patch_row(row: tuple[Any, ...]) -> PatchRecord:
        digest, blob, size, manifest, created = row
        return PatchRecord(digest=digest, blob=blob, blob_size=int(size), manifest=json.loads(manifest),
                           created_at=float(created))

    def patch(self, digest: str) -> PatchRecord:
        rows = self._query("SELECT digest, blob, blob_size, manifest, created_at FROM patches WHERE digest = %s",
                           (digest,))
        if not rows:
            raise PatchNotFound(f"patch {digest!r} is not in {self._where()}")
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
                    "SELECT id, ts, kind, version, from_version, caller, details FROM events WHERE id > %s ORDER BY id",
                    (int(since_id),))]

    def add_patch_states(self, states: Sequence[PatchStateRecord]) -> None:
        with self.conn.transaction("storing preserved keys") as c:
            for st in states:
                row = c.execute("SELECT blob FROM patch_state WHERE digest = %s", (st.digest,)).fetchone()
                if row is not None:
                    if row[0] != st.blob:
                        raise LedgerError(f"patch {st.digest[:12]} already has preserved keys (blob {row[0][:16]}); "
                                          f"the ones offered hash to {st.blob[:16]}")
                    continue
                c.execute("INSERT INTO patch_state(digest, blob, blob_size, n_blocks, created_at) "
                          "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (digest) DO NOTHING",
                          (st.digest, st.blob, st.blob_size, st.n_blocks, st.created_at))

    def patch_states(self, digests: Sequence[str]) -> dict[str, PatchStateRecord]:
        rows = self._query("SELECT digest, blob, blob_size, n_blocks, created_at FROM patch_state "
                           "WHERE digest = ANY(%s::text[])", (list(dict.fromkeys(digests)),))
        return {d: PatchStateRecord(digest=d, blob=blob, blob_size=int(size), n_blocks=int(n), created_at=float(created))
                for d, blob, size, n, created in rows}

    def idempotent(self, key: str) -> tuple[int, str | None] | None:
        rows = self._query("SELECT version, request_digest FROM versions WHERE idempotency_key = %s", (key,))
        return (int(rows[0][0]), rows[0][1]) if rows else None

    # -- writes ----------------------------------------------------------------------------

    def _lock_head(self, c: Any) -> int:
        row = c.execute("SELECT version FROM head WHERE id = 1 FOR UPDATE").fetchone()
        if row is None:
            raise LedgerCorrupt(f"{self._where()} has no head row")
        return int(row[0])

    @staticmethod
    def _insert_bases(c: Any, bases: Sequence[BaseCopyRecord]) -> None:
        for b in bases:
            row = c.execute("SELECT blob FROM base_copies WHERE name = %s", (b.name,)).fetchone()
            if row is not None:
                if row[0] != b.blob:
                    raise BaseCopyMismatch(
                        f"base copy of {b.name!r} is already stored as blob {row[0][:16]}; the one offered hashes to "
                        f"{b.blob[:16]} (was it taken from an edited model?)")
                continue
            c.execute("INSERT INTO base_copies(name, blob, blob_size, dtype, shape, layout, created_at) "
                      "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                      (b.name, b.blob, b.blob_size, b.dtype, _dumps(list(b.shape)), b.layout, b.created_at))

    def add_base_copies(self, bases: Sequence[BaseCopyRecord]) -> None:
        with self.conn.transaction("storing base copies") as c:
            self._lock_head(c)
            self._insert_bases(c, bases)

    def append_version(self, new: NewVersion, expected_head: int | None, patches: Sequence[PatchRecord],
                       bases: Sequence[BaseCopyRecord]) -> tuple[int, bool]:
        with self.conn.transaction(f"writing a {new.kind} version") as c:
            head = self._lock_head(c)
            if new.idempotency_key is not None:
                row = c.execute("SELECT version, request_digest FROM versions WHERE idempotency_key = %s",
                                (new.idempotency_key,)).fetchone()
                if row is not None:
                    if row[1] != new.request_digest:
                        raise IdempotencyMismatch(
                            f"idempotency key {new.idempotency_key!r} was used for version {row[0]} with another "
                            f"request ({str(row[1])[:16]}); this one is {str(new.request_digest)[:16]}")
                    return int(row[0]), False
            if expected_head is not None and head != expected_head:
                raise LedgerConflict(f"head moved: expected version {expected_head}, the head is version {head}",
                                     expected_head=expected_head, actual_head=head)
            if new.parent != head:
                raise LedgerConflict(f"new version's parent {new.parent} is not the head {head}",
                                     expected_head=new.parent, actual_head=head)
            for p in patches:
                c.execute("INSERT INTO patches(digest, blob, blob_size, manifest, created_at) "
                          "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (digest) DO NOTHING",
                          (p.digest, p.blob, p.blob_size, _dumps(p.manifest), p.created_at))
            self._insert_bases(c, bases)
            digests = sorted({d for _op, d in new.ops})
            pids = {str(d): int(pid) for d, pid in
                    c.execute("SELECT digest, pid FROM patches WHERE digest = ANY(%s)", (digests,))}
            missing = [d for d in digests if d not in pids]
            if missing:
                raise PatchNotFound(f"patch {missing[0]!r} is neither stored nor part of this commit")
            number = int(c.execute("SELECT COALESCE(MAX(version), -1) + 1 FROM versions").fetchone()[0])
            c.execute(
                "INSERT INTO versions(version, parent, kind, patch, caller, created_at, probe_report, idempotency_key, "
                f"request_digest, details) VALUES (%s, %s, %s, %s, %s, {_NOW}, %s, %s, %s, %s)",
                (number, new.parent, new.kind, pids.get(new.patch) if new.patch else None, new.caller,
                 None if new.probe_report is None else _dumps(new.probe_report), new.idempotency_key,
                 new.request_digest, _dumps(new.details)))
            with c.cursor() as cur:
                cur.executemany("INSERT INTO version_ops(version, seq, op, patch) VALUES (%s, %s, %s, %s)",
                                [(number, i, op, pids[d]) for i, (op, d) in enumerate(new.ops)])
            c.execute("UPDATE head SET version = %s WHERE id = 1", (number,))
            c.execute("INSERT INTO events(ts, kind, version, from_version, caller, details) "
                      f"VALUES ({_NOW}, %s, %s, %s, %s, %s)",
                      (new.event_kind, number, head, new.caller, _dumps(new.event_details)))
        return number, True

    def move_head(self, target: int, expected_head: int | None, caller: str, details: dict[str, Any]) -> tuple[int, int]:
        with self.conn.transaction("moving the head") as c:
            head = self._lock_head(c)
            if expected_head is not None and head != expected_head:
                raise LedgerConflict(f"head moved: expected version {expected_head}, the head is version {head}",
                                     expected_head=expected_head, actual_head=head)
            if not c.execute("SELECT 1 FROM versions WHERE version = %s", (int(target),)).fetchone():
                raise VersionNotFound(f"version {target} does not exist in {self._where()}")
            if target == head:
                return head, head
            kind = EVENT_ROLLBACK if target < head else EVENT_ROLL_FORWARD
            c.execute("UPDATE head SET version = %s WHERE id = 1", (int(target),))
            c.execute("INSERT INTO events(ts, kind, version, from_version, caller, details) "
                      f"VALUES ({_NOW}, %s, %s, %s, %s, %s)", (kind, int(target), head, caller, _dumps(details)))
        return head, int(target)

    # -- checks ----------------------------------------------------------------------------

    def check_consistency(self) -> list[str]:
        problems: list[str] = []
        with self.conn.snapshot() as c:
            applied = sorted(int(r[0]) for r in c.execute("SELECT version FROM schema_migrations"))
            want = [m.number for m in self.migrations]
            if applied[:len(want)] != want:
                problems.append(f"schema migrations applied: {applied}, expected {want}")
            enabled = {str(name): str(state) for name, state in c.execute(
                "SELECT t.tgname, t.tgenabled FROM pg_trigger t WHERE NOT t.tgisinternal "
                "AND t.tgrelid IN (SELECT to_regclass(x) FROM unnest(%s::text[]) AS x)",
                (["events", "versions", "version_ops", "patches", "base_copies", "head", "blobs", "blob_chunks"],))}
            missing = [t for t in REQUIRED_TRIGGERS if t not in enabled]
            disabled = [t for t in REQUIRED_TRIGGERS if enabled.get(t) == "D"]
            if missing:
                problems.append(f"append-only triggers missing: {missing}")
            if disabled:
                problems.append(f"append-only triggers disabled: {disabled}")
            numbers = [int(r[0]) for r in c.execute("SELECT version FROM versions ORDER BY version")]
            if numbers != list(range(len(numbers))):
                problems.append(f"version numbers are not contiguous from 0: {numbers[:10]}...")
            head = c.execute("SELECT version FROM head WHERE id = 1").fetchone()
            if head is None:
                problems.append("no head row")
            elif int(head[0]) not in set(numbers):
                problems.append(f"head points at missing version {head[0]}")
            dangling = c.execute("SELECT v.version FROM versions v LEFT JOIN versions p ON p.version = v.parent "
                                 "WHERE v.parent IS NOT NULL AND p.version IS NULL").fetchall()
            if dangling:
                problems.append(f"versions with a missing parent: {[r[0] for r in dangling]}")
            bad_ops = c.execute("SELECT o.version FROM version_ops o LEFT JOIN patches p ON p.pid = o.patch "
                                "WHERE p.pid IS NULL").fetchall()
            if bad_ops:
                problems.append(f"versions referring to unknown patches: {sorted({r[0] for r in bad_ops})}")
            no_event = c.execute(
                "SELECT v.version FROM versions v WHERE v.version > 0 AND NOT EXISTS "
                "(SELECT 1 FROM events e WHERE e.version = v.version AND e.kind IN ('commit', 'revert', 'import', 'consolidate'))"
            ).fetchall()
            if no_event:
                problems.append(f"versions without their creation event: {[r[0] for r in no_event]}")
            empty = c.execute("SELECT v.version FROM versions v WHERE v.version > 0 AND NOT EXISTS "
                              "(SELECT 1 FROM version_ops o WHERE o.version = v.version)").fetchall()
            if empty:
                problems.append(f"versions without operations: {[r[0] for r in empty]}")
        return problems

    # -- the replica registry (migration 3) ------------------------------------------------

    def record_replica(self, replica_id: str, version: int, role: str, address: str, started_at: float,
                       details: dict[str, Any]) -> None:
        with self.conn.transaction("recording a replica") as c:
            c.execute("INSERT INTO replicas(replica_id, version, role, address, started_at, updated_at, details) "
                      f"VALUES (%s, %s, %s, %s, %s, {_NOW}, %s) ON CONFLICT (replica_id) DO UPDATE SET "
                      "version = EXCLUDED.version, role = EXCLUDED.role, address = EXCLUDED.address, "
                      "started_at = EXCLUDED.started_at, updated_at = EXCLUDED.updated_at, details = EXCLUDED.details",
                      (replica_id, int(version), role, address, float(started_at), _dumps(details)))

    def replicas(self) -> list[ReplicaRecord]:
        rows = self._query("SELECT replica_id, version, role, address, started_at, updated_at, details, "
                           "extract(epoch from clock_timestamp()) FROM replicas ORDER BY replica_id")
        return [ReplicaRecord(replica_id=r, version=int(v), role=role, address=a, started_at=float(st),
                              updated_at=float(up), age_s=max(0.0, float(now) - float(up)), details=json.loads(d))
                for r, v, role, a, st, up, d, now in rows]

    def forget_replica(self, replica_id: str) -> bool:
        with self.conn.transaction("forgetting a replica") as c:
            return c.execute("DELETE FROM replicas WHERE replica_id = %s", (replica_id,)).rowcount > 0
