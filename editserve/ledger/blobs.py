"""Content-addressed blobs: the `BlobStore` interface and its file implementation.

A blob is an immutable byte string named by its sha256; reading it back checks that name.
`BlobStore` is what the ledger needs; `FileBlobStore` keeps blobs as files
``<root>/<sha[:2]>/<sha>`` next to a SQLite ledger, and `editserve.ledger.pgblobs.PgBlobStore`
keeps them in PostgreSQL tables (no shared filesystem).

A blob file is written to a temporary file under ``<root>/../tmp`` (same file system), fsynced,
renamed into place and its directory fsynced (`editserve.atomicfile.publish_bytes` with
``durable=True``), so a reader either sees the whole blob or none. Blobs are
immutable; writing one that already exists is a no-op. Blobs that no version references
(left by a crash between the write and the database transaction) are harmless and can be
removed by `BlobStore.collect_garbage`.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from editserve.atomicfile import publish_bytes
from editserve.ledger.errors import LedgerCorrupt

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise LedgerCorrupt(f"{digest!r} is not a sha256 blob name")
    return digest


class BlobStore(abc.ABC):
    """Immutable, content-addressed blobs named by their sha256, integrity-checked on read."""

    @abc.abstractmethod
    def put(self, data: bytes) -> str:
        """Store `data` durably (before any transaction refers to it); returns its sha256. Idempotent."""

    @abc.abstractmethod
    def get(self, digest: str, verify: bool = True) -> bytes:
        """The blob's bytes; `LedgerCorrupt` (with ``bad_blobs``) if missing or, with `verify`, not matching its name."""

    def get_many(self, digests: Sequence[str]) -> dict[str, bytes]:
        """Several verified blobs at once (`LedgerCorrupt` as `get` for any bad one)."""
        return {d: self.get(d) for d in dict.fromkeys(digests)}

    @abc.abstractmethod
    def check(self, digest: str, size: int | None = None, full: bool = True) -> str | None:
        """None if the blob is present (of `size` bytes) and, with `full`, hashes to its name; else what is wrong."""

    def check_many(self, blobs: Sequence[tuple[str, int | None]], full: bool = True) -> dict[str, str]:
        """`check` for many ``(digest, size)`` at once: ``{digest: problem}`` for the bad ones."""
        out = {}
        for digest, size in blobs:
            why = self.check(digest, size, full)
            if why:
                out[digest] = why
        return out

    @abc.abstractmethod
    def __iter__(self) -> Iterator[str]:
        """The digests of every stored blob."""

    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes the blobs occupy."""

    @abc.abstractmethod
    def collect_garbage(self, referenced: Iterable[str], min_age_s: float = 3600.0) -> list[str]:
        """Remove blobs not in `referenced` older than `min_age_s` (younger ones may belong to a commit in flight)."""

    def close(self) -> None:
        """Release resources (the file store holds none)."""


class FileBlobStore(BlobStore):
    """Immutable, content-addressed files under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root.parent / "tmp"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        """Store `data`; returns its sha256. Idempotent."""
        digest = sha256_bytes(data)
        path = self.path(digest)
        if path.exists() and path.stat().st_size == len(data):
            return digest
        path.parent.mkdir(parents=True, exist_ok=True)
        publish_bytes(path, data, durable=True, tmp_dir=self.tmp)
        return digest

    def get(self, digest: str, verify: bool = True) -> bytes:
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise LedgerCorrupt(f"blob {digest} is missing ({path})", bad_blobs={digest: "missing"}) from exc
        if verify and sha256_bytes(data) != digest:
            raise LedgerCorrupt(f"blob {digest} is corrupt: its content hashes to {sha256_bytes(data)} ({path})",
                                bad_blobs={digest: "checksum mismatch"})
        return data

    def check(self, digest: str, size: int | None = None, full: bool = True) -> str | None:
        """None if the blob is present and intact, else a short description of the problem."""
        path = self.path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            return "missing"
        if size is not None and st.st_size != size:
            return f"size {st.st_size} != {size}"
        if full and sha256_file(path) != digest:
            return "checksum mismatch"
        return None

    def __iter__(self) -> Iterator[str]:
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir():
                for f in sorted(sub.iterdir()):
                    if _HEX64.match(f.name):
                        yield f.name

    def nbytes(self) -> int:
        return sum(self.path(d).stat().st_size for d in self)

    def collect_garbage(self, referenced: Iterable[str], min_age_s: float = 3600.0) -> list[str]:
        """Remove unreferenced blobs older than `min_age_s` (younger ones may belong to a commit in flight)."""
        keep = set(referenced)
        now = time.time()
        removed = []
        for digest in list(self):
            path = self.path(digest)
            if digest not in keep and now - path.stat().st_mtime >= min_age_s:
                path.unlink()
                removed.append(digest)
        if self.tmp.exists():
            for f in self.tmp.iterdir():
                if now - f.stat().st_mtime >= min_age_s:
                    f.unlink()
        if removed:
            log.info("removed %d unreferenced blob(s)", len(removed))
        return removed
