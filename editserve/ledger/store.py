"""The storage interface of the ledger and the records it exchanges.

`LedgerStore` is what `Ledger` needs from a database: an append-only history of versions
(each a list of add/remove operations on patch ids over its parent), a movable head, patch
and base-copy metadata, and an append-only event log, with every state change done in one
transaction that also checks the caller's expected head and idempotency key, and a versioned
schema (`editserve.ledger.migrations`). Implementations: `editserve.ledger.sqlite.SqliteStore`
(``BEGIN IMMEDIATE``) and `editserve.ledger.postgres.PostgresStore` (``SELECT ... FOR UPDATE``
on the head row).

Factor and base-copy bytes are not rows of these tables: they are content-addressed blobs
(`editserve.ledger.blobs.BlobStore`) written *before* the transaction that references them.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ADD = "add"
REMOVE = "remove"

# Version kinds and event kinds.
KIND_BASE = "base"
KIND_COMMIT = "commit"
KIND_REVERT = "revert"
KIND_IMPORT = "import"
KIND_CONSOLIDATE = "consolidate"
EVENT_CREATE = "create"
EVENT_COMMIT = "commit"
EVENT_ROLLBACK = "rollback"
EVENT_ROLL_FORWARD = "roll_forward"
EVENT_REVERT = "revert"
EVENT_IMPORT = "import"
EVENT_CONSOLIDATE = "consolidate"


@dataclass(frozen=True)
class PatchRecord:
    """A patch as stored: its digest (identity), factor blob and manifest (`Patch.manifest()`)."""

    digest: str
    blob: str
    blob_size: int
    manifest: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class PatchStateRecord:
    """The preserved-keys blocks of one patch (`editserve.ledger.keystate`): blob and block count."""

    digest: str
    blob: str
    blob_size: int
    n_blocks: int
    created_at: float


@dataclass(frozen=True)
class BaseCopyRecord:
    """The saved original of one matrix, taken the first time a patch touched it."""

    name: str
    blob: str
    blob_size: int
    dtype: str
    shape: tuple[int, ...]
    layout: str
    created_at: float


@dataclass(frozen=True)
class VersionRecord:
    version: int
    parent: int | None
    kind: str
    patch: str | None                       # digest of the patch this version added (commit/import)
    ops: tuple[tuple[str, str], ...]        # (ADD|REMOVE, patch digest) applied to the parent's list
    caller: str
    created_at: float
    probe_report: dict[str, Any] | None
    idempotency_key: str | None
    request_digest: str | None              # what the idempotency key was first used for
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NewVersion:
    """What `Ledger` asks the store to append (the store assigns the number)."""

    parent: int
    kind: str
    patch: str | None
    ops: tuple[tuple[str, str], ...]
    caller: str
    probe_report: dict[str, Any] | None
    idempotency_key: str | None
    request_digest: str | None
    details: dict[str, Any]
    event_kind: str
    event_details: dict[str, Any]


@dataclass(frozen=True)
class Event:
    """One entry of the append-only audit log."""

    id: int
    ts: float
    kind: str
    version: int | None          # the version the head moved to / that was created
    from_version: int | None     # the head before the event
    caller: str
    details: dict[str, Any]


@dataclass(frozen=True)
class ReplicaRecord:
    """What one serving replica last reported (the ``replicas`` table; see docs/fleet.md)."""

    replica_id: str
    version: int                 # the version it serves
    role: str                    # "compute" (has a sidecar) | "serve-only"
    address: str                 # its control-plane address (gRPC), for forwarding / operators
    started_at: float            # epoch seconds (the replica's process start)
    updated_at: float            # epoch seconds, the store's clock (last report or heartbeat)
    age_s: float                 # seconds since updated_at, measured on the store's clock
    details: dict[str, Any] = field(default_factory=dict)


class LedgerStore(abc.ABC):
    """Transactional metadata store of one ledger (one model)."""

    @abc.abstractmethod
    def initialize(self, model_fingerprint: str, caller: str, meta: dict[str, str]) -> None:
        """Create the schema, version 0 (the base model), head = 0 and a 'create' event; no-op if present."""

    @abc.abstractmethod
    def is_initialized(self) -> bool: ...

    @abc.abstractmethod
    def upgrade(self) -> list[int]:
        """Apply the schema migrations not applied yet (each in one transaction); returns their numbers."""

    @abc.abstractmethod
    def schema_version(self) -> int:
        """The number of the last schema migration applied (0 for an empty database)."""

    @abc.abstractmethod
    def meta(self) -> dict[str, str]: ...

    @abc.abstractmethod
    def head(self) -> int: ...

    @abc.abstractmethod
    def append_version(self, new: NewVersion, expected_head: int | None, patches: Sequence[PatchRecord],
                       bases: Sequence[BaseCopyRecord]) -> tuple[int, bool]:
        """Atomically: honour the idempotency key (return ``(existing, False)`` if it was used for the
        same request digest; raise `IdempotencyMismatch` if for another), refuse with `LedgerConflict`
        if the head is not `expected_head`, insert new patch and base-copy records, the version and its
        ops, move the head to it and log the event. Returns ``(version, True)``."""

    @abc.abstractmethod
    def idempotent(self, key: str) -> tuple[int, str | None] | None:
        """``(version, request digest)`` recorded with an idempotency key, or None."""

    @abc.abstractmethod
    def move_head(self, target: int, expected_head: int | None, caller: str, details: dict[str, Any]) -> tuple[int, int]:
        """Atomically move the head to an existing version and log rollback/roll_forward.
        Returns ``(previous head, new head)``."""

    @abc.abstractmethod
    def add_base_copies(self, bases: Sequence[BaseCopyRecord]) -> None:
        """Insert base-copy records that are not there yet (`BaseCopyMismatch` if one differs)."""

    @abc.abstractmethod
    def version(self, version: int) -> VersionRecord: ...

    @abc.abstractmethod
    def versions(self) -> list[VersionRecord]: ...

    @abc.abstractmethod
    def chain_ops(self, version: int) -> list[tuple[int, str, str]]:
        """(version, op, digest) of every version from 0 to `version` along parent links, in order."""

    @abc.abstractmethod
    def patch(self, digest: str) -> PatchRecord: ...

    @abc.abstractmethod
    def patches(self) -> list[PatchRecord]: ...

    @abc.abstractmethod
    def base_copies(self) -> dict[str, BaseCopyRecord]: ...

    @abc.abstractmethod
    def events(self, since_id: int = 0) -> list[Event]: ...

    @abc.abstractmethod
    def check_consistency(self) -> list[str]:
        """Problems with the metadata itself (database integrity, dangling references); empty if none."""

    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes the store occupies on disk."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def add_patch_states(self, states: Sequence[PatchStateRecord]) -> None:
        """Insert preserved-keys records of patches that have none yet (one transaction; a patch's
        state is immutable: `LedgerError` if one is stored with another blob)."""

    @abc.abstractmethod
    def patch_states(self, digests: Sequence[str]) -> dict[str, PatchStateRecord]:
        """The preserved-keys records of those of `digests` that have one."""

    # -- the replica registry (migration 3; appended) ---------------------------------------

    @abc.abstractmethod
    def record_replica(self, replica_id: str, version: int, role: str, address: str, started_at: float,
                       details: dict[str, Any]) -> None:
        """Insert or replace the row of `replica_id` (its clock: the store's)."""

    @abc.abstractmethod
    def replicas(self) -> list[ReplicaRecord]:
        """Every replica that ever reported, by id."""

    @abc.abstractmethod
    def forget_replica(self, replica_id: str) -> bool:
        """Remove the row of `replica_id` (a replica shut down cleanly); True if there was one."""
