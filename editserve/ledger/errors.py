"""Typed errors of the patch ledger; all subclass `editserve.errors.EditserveError`.

Each message names the offending value (version, blob, fingerprint, key) so that the
CLI and the gRPC layer can show it as is.
"""

from __future__ import annotations

from editserve.errors import EditserveError


class LedgerError(EditserveError):
    """Base class of the ledger's errors."""


class LedgerConflict(LedgerError, RuntimeError):
    """Optimistic concurrency failed: the head moved since the caller read it."""

    def __init__(self, message: str, expected_head: int | None = None, actual_head: int | None = None) -> None:
        super().__init__(message)
        self.expected_head = expected_head
        self.actual_head = actual_head


class IdempotencyMismatch(LedgerError, ValueError):
    """An idempotency key was reused for a different patch or operation."""


class VersionNotFound(LedgerError, LookupError):
    """No version with that number exists in the ledger."""


class PatchNotFound(LedgerError, LookupError):
    """No patch with that id (digest or prefix) exists, or a prefix is ambiguous."""


class LedgerModelMismatch(LedgerError, ValueError):
    """The ledger belongs to another model (fingerprint), or a patch was computed for another model."""


class LedgerCorrupt(LedgerError, RuntimeError):
    """Blobs are missing or do not match their checksums, or the database is inconsistent.

    `bad_blobs` maps blob hashes to what is wrong with them, `bad_versions` lists the versions
    that cannot be materialised, `last_good` is the newest version on the head's line that can.
    """

    def __init__(self, message: str, bad_blobs: dict[str, str] | None = None,
                 bad_versions: tuple[int, ...] = (), last_good: int | None = None) -> None:
        super().__init__(message)
        self.bad_blobs = dict(bad_blobs or {})
        self.bad_versions = tuple(bad_versions)
        self.last_good = last_good


class BaseCopyMissing(LedgerError, LookupError):
    """Materialisation needs the base copy of a matrix the ledger has not stored and none was given."""


class BaseCopyMismatch(LedgerError, ValueError):
    """A base copy offered for a matrix differs from the one already stored (or has another shape)."""


class RevertError(LedgerError, ValueError):
    """A version cannot be reverted (base version, or its patch is not active at the head)."""


class ImportRejected(LedgerError, ValueError):
    """An exported patch or version failed validation on import; nothing was changed."""


class LedgerBusy(LedgerError, TimeoutError):
    """The ledger's database stayed locked by another writer for longer than the busy timeout."""


class LedgerUnavailable(LedgerBusy, ConnectionError):
    """The ledger's database server cannot be reached (down, restarting, connection lost).

    A `LedgerBusy` so that every layer treating "busy" as "retry later" (gRPC UNAVAILABLE) does
    the same here. A write interrupted while committing may or may not have landed: retry it
    with the same idempotency key. Messages name the ledger by its redacted location only.
    """


class LedgerSchemaError(LedgerError, RuntimeError):
    """The ledger's schema cannot be used by this editserve (migrations unknown to it, or failed)."""


class ConsolidationError(LedgerError, ValueError):
    """A ledger's active patches cannot be consolidated as asked (too few with stored keys, a
    stale plan, or a consolidation that would break committed facts); nothing was changed."""
