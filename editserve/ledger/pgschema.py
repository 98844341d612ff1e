"""The PostgreSQL ledger schema as numbered migrations, and the code that applies them.

Tables (migration 1):

- ``blobs`` (digest, size, chunks, created_at) + ``blob_chunks`` (digest, seq, data bytea):
  content-addressed bytes (patch factors, base copies), split into chunks of at most
  `editserve.ledger.pgblobs.CHUNK_BYTES` (bytea values are capped at 1 GB and are sent whole);
  stored uncompressed out of line (``STORAGE EXTERNAL``: float data does not compress).
- ``patches``, ``base_copies``: metadata rows that reference ``blobs`` by foreign key, so a
  referenced blob cannot be removed.
- ``versions``, ``version_ops``, ``head`` (one row), ``events``, ``meta``: as in SQLite.

Append-only: triggers refuse UPDATE, DELETE and TRUNCATE on ``events``, ``versions``,
``version_ops``, ``patches`` and ``base_copies``; the head row can only be updated; blobs and
chunks can never be updated, and only unreferenced blobs can be deleted (garbage collection),
their chunks with them.

Per-version editing state (e.g. the preserved-key factors of null-space editing) is a later
migration of the form ``CREATE TABLE version_state (version integer REFERENCES versions,
kind text, blob text REFERENCES blobs, blob_size bigint, PRIMARY KEY (version, kind))`` plus
its append-only triggers: its bytes go to ``blobs`` like every other blob.

`apply_migrations` runs each pending migration in its own transaction holding a
transaction-level advisory lock, so concurrent openers of an empty database apply each
migration exactly once (see `editserve.ledger.migrations`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from editserve.ledger.migrations import Migration, pending
from editserve.ledger.pgconn import PgConnection

log = logging.getLogger(__name__)

# pg_advisory_xact_lock(int4, int4) key: "edit", "ledg".
ADVISORY_LOCK = (0x65646974, 0x6C656467)

APPEND_ONLY_TABLES = ("events", "versions", "version_ops", "patches", "base_copies")

_MIGRATIONS_TABLE = ("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
                     "checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")


def _append_only_triggers() -> tuple[str, ...]:
    out = []
    for t in APPEND_ONLY_TABLES:
        out.append(f"CREATE TRIGGER {t}_append_only BEFORE UPDATE OR DELETE ON {t} "
                   f"FOR EACH ROW EXECUTE FUNCTION editserve_append_only()")
        out.append(f"CREATE TRIGGER {t}_no_truncate BEFORE TRUNCATE ON {t} "
                   f"FOR EACH STATEMENT EXECUTE FUNCTION editserve_append_only()")
    return tuple(out)


# Triggers every PostgreSQL ledger must have, enabled (checked by check_consistency).
REQUIRED_TRIGGERS = tuple(f"{t}_{k}" for t in APPEND_ONLY_TABLES for k in ("append_only", "no_truncate")) + (
    "head_no_delete", "head_no_truncate", "blobs_immutable", "blobs_no_truncate",
    "blob_chunks_immutable", "blob_chunks_no_truncate", "blob_chunks_with_blob")

PG_MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "ledger_schema", (
        "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)",
        "CREATE TABLE blobs (digest text PRIMARY KEY CHECK (digest ~ '^[0-9a-f]{64}$'), "
        "size bigint NOT NULL CHECK (size >= 0), chunks integer NOT NULL CHECK (chunks >= 0), "
        "created_at double precision NOT NULL)",
        "CREATE TABLE blob_chunks (digest text NOT NULL REFERENCES blobs(digest) ON DELETE CASCADE, "
        "seq integer NOT NULL CHECK (seq >= 0), data bytea NOT NULL, PRIMARY KEY (digest, seq))",
        "ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL",
        "CREATE TABLE patches (pid bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, digest text NOT NULL UNIQUE, "
        "blob text NOT NULL REFERENCES blobs(digest), blob_size bigint NOT NULL, manifest text NOT NULL, "
        "created_at double precision NOT NULL)",
        "CREATE INDEX patches_blob ON patches(blob)",
        "CREATE TABLE base_copies (name text PRIMARY KEY, blob text NOT NULL REFERENCES blobs(digest), "
        "blob_size bigint NOT NULL, dtype text NOT NULL, shape text NOT NULL, layout text NOT NULL, "
        "created_at double precision NOT NULL)",
        "CREATE INDEX base_copies_blob ON base_copies(blob)",
        "CREATE TABLE versions (version integer PRIMARY KEY CHECK (version >= 0), "
        "parent integer REFERENCES versions(version), kind text NOT NULL, patch bigint REFERENCES patches(pid), "
        "caller text NOT NULL, created_at double precision NOT NULL, probe_report text, "
        "idempotency_key text UNIQUE, request_digest text, details text NOT NULL DEFAULT '{}', "
        "CHECK (parent IS NULL OR parent < version))",
        "CREATE TABLE version_ops (version integer NOT NULL REFERENCES versions(version), seq integer NOT NULL, "
        "op text NOT NULL CHECK (op IN ('add', 'remove')), patch bigint NOT NULL REFERENCES patches(pid), "
        "PRIMARY KEY (version, seq))",
        "CREATE TABLE head (id integer PRIMARY KEY CHECK (id = 1), version integer NOT NULL REFERENCES versions(version))",
        "CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, ts double precision NOT NULL, "
        "kind text NOT NULL, version integer, from_version integer, caller text NOT NULL, "
        "details text NOT NULL DEFAULT '{}')",
        "CREATE INDEX events_version ON events(version)",
        "CREATE FUNCTION editserve_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'ledger table % is append-only (% refused)', TG_TABLE_NAME, TG_OP; END $$",
        "CREATE FUNCTION editserve_chunk_delete() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF EXISTS (SELECT 1 FROM blobs WHERE digest = OLD.digest) THEN "
        "RAISE EXCEPTION 'blob_chunks of blob % can only be deleted with the blob', OLD.digest; END IF; "
        "RETURN OLD; END $$",
        *_append_only_triggers(),
        "CREATE TRIGGER head_no_delete BEFORE DELETE ON head FOR EACH ROW EXECUTE FUNCTION editserve_append_only()",
        "CREATE TRIGGER head_no_truncate BEFORE TRUNCATE ON head FOR EACH STATEMENT "
        "EXECUTE FUNCTION editserve_append_only()",
        "CREATE TRIGGER blobs_immutable BEFORE UPDATE ON blobs FOR EACH ROW EXECUTE FUNCTION editserve_append_only()",
        "CREATE TRIGGER blobs_no_truncate BEFORE TRUNCATE ON blobs FOR EACH STATEMENT "
        "EXECUTE FUNCTION editserve_append_only()",
        "CREATE TRIGGER blob_chunks_immutable BEFORE UPDATE ON blob_chunks FOR EACH ROW "
        "EXECUTE FUNCTION editserve_append_only()",
        "CREATE TRIGGER blob_chunks_no_truncate BEFORE TRUNCATE ON blob_chunks FOR EACH STATEMENT "
        "EXECUTE FUNCTION editserve_append_only()",
        "CREATE TRIGGER blob_chunks_with_blob BEFORE DELETE ON blob_chunks FOR EACH ROW "
        "EXECUTE FUNCTION editserve_chunk_delete()",
    )),
    # Issue 16: the preserved-keys blocks of each patch (editserve.ledger.keystate), append-only.
    Migration(2, "patch_state", (
        "CREATE TABLE patch_state (digest text PRIMARY KEY, blob text NOT NULL REFERENCES blobs(digest), "
        "blob_size bigint NOT NULL, n_blocks integer NOT NULL CHECK (n_blocks >= 0), "
        "created_at double precision NOT NULL)",
        "CREATE INDEX patch_state_blob ON patch_state(blob)",
        "CREATE TRIGGER patch_state_append_only BEFORE UPDATE OR DELETE ON patch_state "
        "FOR EACH ROW EXECUTE FUNCTION editserve_append_only()",
        "CREATE TRIGGER patch_state_no_truncate BEFORE TRUNCATE ON patch_state "
        "FOR EACH STATEMENT EXECUTE FUNCTION editserve_append_only()",
    )),
    # The replica registry (docs/fleet.md): what each serving replica serves, updated after every
    # swap and by a heartbeat (mutable by design: not append-only). The head's trigger NOTIFYs
    # `HEAD_CHANNEL` with the new head inside the transaction that moves it, so followers hear of
    # a commit or rollback exactly when it becomes visible.
    Migration(3, "replicas", (
        "CREATE TABLE replicas (replica_id text PRIMARY KEY CHECK (length(replica_id) BETWEEN 1 AND 128), "
        "version integer NOT NULL REFERENCES versions(version), role text NOT NULL CHECK (role IN "
        "('compute', 'serve-only')), address text NOT NULL, started_at double precision NOT NULL, "
        "updated_at double precision NOT NULL, details text NOT NULL DEFAULT '{}')",
        "CREATE FUNCTION editserve_head_notify() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "PERFORM pg_notify('editserve_head', NEW.version::text); RETURN NEW; END $$",
        "CREATE TRIGGER head_notify AFTER INSERT OR UPDATE ON head FOR EACH ROW "
        "EXECUTE FUNCTION editserve_head_notify()",
    )),
)

HEAD_CHANNEL = "editserve_head"           # NOTIFY payload: the new head version (decimal)


def applied_migrations(conn: PgConnection) -> dict[int, str]:
    """``{number: checksum}`` recorded in ``schema_migrations`` (empty if the table does not exist)."""
    if not conn.query("SELECT to_regclass('schema_migrations') IS NOT NULL")[0][0]:
        return {}
    return {int(v): str(c) for v, c in conn.query("SELECT version, checksum FROM schema_migrations")}


def apply_migrations(conn: PgConnection, migrations: Sequence[Migration] = PG_MIGRATIONS) -> list[int]:
    """Apply the pending migrations in order, one transaction each; returns the numbers applied here."""
    where = conn.location.redacted
    applied = applied_migrations(conn)
    if applied and all(m.number in applied for m in migrations):
        pending(applied, migrations, where)                            # fast path: only the checks, no lock
        return []
    done = []
    with conn.transaction("creating schema_migrations") as c:
        c.execute("SELECT pg_advisory_xact_lock(%s, %s)", ADVISORY_LOCK)
        c.execute(_MIGRATIONS_TABLE)
        todo = pending({int(v): str(ck) for v, ck in c.execute("SELECT version, checksum FROM schema_migrations")},
                       migrations, where)
    for m in todo:
        with conn.transaction(f"schema migration {m.number} ({m.name})") as c:
            c.execute("SELECT pg_advisory_xact_lock(%s, %s)", ADVISORY_LOCK)
            if c.execute("SELECT 1 FROM schema_migrations WHERE version = %s", (m.number,)).fetchone():
                continue                                               # another opener applied it meanwhile
            for stmt in m.statements:
                c.execute(stmt)
            c.execute("INSERT INTO schema_migrations(version, name, checksum) VALUES (%s, %s, %s)",
                      (m.number, m.name, m.checksum))
        done.append(m.number)
        log.info("ledger %s: applied schema migration %d (%s)", where, m.number, m.name)
    return done
