"""`PgBlobStore`: content-addressed blobs in PostgreSQL tables (``blobs`` + ``blob_chunks``).

A blob is one ``blobs`` row (sha256, size, number of chunks) and its bytes in chunks of at most
`CHUNK_BYTES`, inserted in one transaction, so a reader sees the whole blob or none of it.
Writing a blob that exists is a no-op. Reading reassembles the chunks and checks the sha256;
`check_many` checks presence and sizes in one query and, for a full check, lets the server
hash single-chunk blobs (``sha256(data)``) instead of sending their bytes.

Garbage collection deletes unreferenced blobs (the foreign keys from ``patches`` and
``base_copies`` refuse to delete a referenced one); their chunks go with them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from editserve.ledger.blobs import BlobStore, check_digest, sha256_bytes
from editserve.ledger.errors import LedgerCorrupt
from editserve.ledger.pgconn import PgConnection

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20          # 64 MiB: well under bytea's 1 GB, few rows even for large base copies


class PgBlobStore(BlobStore):
    """Blobs in the database behind `conn` (which the store of the same ledger shares)."""

    def __init__(self, conn: PgConnection, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.conn = conn
        self.chunk_bytes = int(chunk_bytes)

    def __repr__(self) -> str:
        return f"PgBlobStore({self.conn.location.redacted!r})"

    def _where(self, digest: str) -> str:
        return f"blob {digest} in ledger {self.conn.location.redacted}"

    def put(self, data: bytes) -> str:
        digest = sha256_bytes(data)
        view = memoryview(data)
        chunks = [view[i:i + self.chunk_bytes] for i in range(0, len(view), self.chunk_bytes)] or [view[:0]]
        with self.conn.transaction("storing a blob") as c:
            created = c.execute(
                "INSERT INTO blobs(digest, size, chunks, created_at) VALUES (%s, %s, %s, "
                "extract(epoch from clock_timestamp())) ON CONFLICT (digest) DO NOTHING RETURNING digest",
                (digest, len(data), len(chunks))).fetchone()
            if created is not None:
                with c.cursor() as cur:
                    cur.executemany("INSERT INTO blob_chunks(digest, seq, data) VALUES (%s, %s, %s)",
                                    [(digest, i, bytes(chunk)) for i, chunk in enumerate(chunks)])
        return digest

    def get(self, digest: str, verify: bool = True) -> bytes:
        check_digest(digest)
        # One statement (one snapshot, one round trip); binary: bytea without hex text.
        rows = self.conn.query("SELECT b.size, b.chunks, k.seq, k.data FROM blobs b LEFT JOIN blob_chunks k "
                               "ON k.digest = b.digest WHERE b.digest = %s ORDER BY k.seq", (digest,), binary=True)
        return self._assemble(digest, rows, verify)

    def get_many(self, digests: Sequence[str]) -> dict[str, bytes]:
        wanted = sorted({check_digest(d) for d in digests})
        rows = self.conn.query("SELECT b.digest, b.size, b.chunks, k.seq, k.data FROM blobs b LEFT JOIN blob_chunks k "
                               "ON k.digest = b.digest WHERE b.digest = ANY(%s) ORDER BY b.digest, k.seq",
                               (wanted,), binary=True)
        grouped: dict[str, list[tuple[Any, ...]]] = {d: [] for d in wanted}
        for r in rows:
            grouped[str(r[0])].append(r[1:])
        return {d: self._assemble(d, grouped[d], True) for d in wanted}

    def _assemble(self, digest: str, rows: Sequence[tuple[Any, ...]], verify: bool) -> bytes:
        """The blob from its ``(size, chunks, seq, data)`` rows, checked."""
        if not rows:
            raise LedgerCorrupt(f"{self._where(digest)} is missing", bad_blobs={digest: "missing"})
        size, n = int(rows[0][0]), int(rows[0][1])
        seqs = [int(r[2]) for r in rows if r[2] is not None]
        if seqs != list(range(n)):
            raise LedgerCorrupt(f"{self._where(digest)} has chunks {seqs[:10]}, expected 0..{n - 1}",
                                bad_blobs={digest: "chunks missing"})
        data = b"".join(bytes(r[3]) for r in rows if r[3] is not None)
        if len(data) != size:
            raise LedgerCorrupt(f"{self._where(digest)} holds {len(data)} bytes, expected {size}",
                                bad_blobs={digest: f"size {len(data)} != {size}"})
        if verify and sha256_bytes(data) != digest:
            raise LedgerCorrupt(f"{self._where(digest)} is corrupt: its content hashes to {sha256_bytes(data)}",
                                bad_blobs={digest: "checksum mismatch"})
        return data

    def check(self, digest: str, size: int | None = None, full: bool = True) -> str | None:
        return self.check_many([(digest, size)], full).get(digest)

    def check_many(self, blobs: Sequence[tuple[str, int | None]], full: bool = True) -> dict[str, str]:
        wanted: dict[str, int | None] = {}
        for digest, size in blobs:
            wanted[check_digest(digest)] = size
        if not wanted:
            return {}
        digests = sorted(wanted)
        with self.conn.snapshot() as c:
            rows = c.execute(
                "SELECT b.digest, b.size, b.chunks, count(k.seq), coalesce(sum(octet_length(k.data)), 0), "
                "coalesce(max(k.seq), -1) FROM blobs b LEFT JOIN blob_chunks k ON k.digest = b.digest "
                "WHERE b.digest = ANY(%s) GROUP BY b.digest, b.size, b.chunks", (digests,)).fetchall()
            found = {str(r[0]): (int(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5])) for r in rows}
            bad: dict[str, str] = {}
            hash_here: list[str] = []
            hash_there: list[str] = []
            for digest in digests:
                if digest not in found:
                    bad[digest] = "missing"
                    continue
                stored, n, count, nbytes, top = found[digest]
                want = wanted[digest]
                if count != n or top != n - 1:
                    bad[digest] = f"{count} of {n} chunks present"
                elif want is not None and stored != want:
                    bad[digest] = f"size {stored} != {want}"
                elif nbytes != stored:
                    bad[digest] = f"size {nbytes} != {stored}"
                elif full:
                    (hash_there if n == 1 else hash_here).append(digest)
            if hash_there:
                for digest, hexed in c.execute(
                        "SELECT digest, encode(sha256(data), 'hex') FROM blob_chunks WHERE digest = ANY(%s)",
                        (hash_there,)):
                    if hexed != digest:
                        bad[str(digest)] = "checksum mismatch"
            for digest in hash_here:
                h = hashlib.sha256()
                with c.cursor(binary=True) as cur:
                    for (data,) in cur.execute("SELECT data FROM blob_chunks WHERE digest = %s ORDER BY seq",
                                               (digest,)):
                        h.update(data)
                if h.hexdigest() != digest:
                    bad[digest] = "checksum mismatch"
        return bad

    def __iter__(self) -> Iterator[str]:
        return iter([str(r[0]) for r in self.conn.query("SELECT digest FROM blobs ORDER BY digest")])

    def __contains__(self, digest: object) -> bool:
        return bool(self.conn.query("SELECT 1 FROM blobs WHERE digest = %s", (str(digest),)))

    def nbytes(self) -> int:
        rows = self.conn.query("SELECT coalesce(sum(pg_total_relation_size(to_regclass(t))), 0)::bigint "
                               "FROM unnest(ARRAY['blobs', 'blob_chunks']) AS t")
        return int(rows[0][0])

    def collect_garbage(self, referenced: Iterable[str], min_age_s: float = 3600.0) -> list[str]:
        keep = sorted(set(referenced))
        with self.conn.transaction("collecting unreferenced blobs") as c:
            rows = c.execute(
                "DELETE FROM blobs b WHERE b.created_at <= extract(epoch from clock_timestamp()) - %s AND NOT (b.digest = ANY(%s)) "
                "AND NOT EXISTS (SELECT 1 FROM patches p WHERE p.blob = b.digest) "
                "AND NOT EXISTS (SELECT 1 FROM base_copies c WHERE c.blob = b.digest) RETURNING b.digest",
                (float(min_age_s), keep)).fetchall()
        removed = sorted(str(r[0]) for r in rows)
        if removed:
            log.info("removed %d unreferenced blob(s) from ledger %s", len(removed), self.conn.location.redacted)
        return removed
