"""`Ledger`: the durable, versioned history of every patch applied to one served model.

Model of the data
-----------------
- **Versions.** Version 0 is the base model. Every later version is created by one
  transaction and has a parent (the head when it was created) and a short list of operations
  on its parent's list of active patches: a commit or import *adds* one patch, a revert
  *removes* one (and, with rebase, replaces the later ones by their recomputed versions).
  The active patches of a version are found by replaying the operations along its parent
  chain; their order is fixed (the order of the operations) and is the order in which they
  are summed.
- **Head.** A pointer to one version, kept apart from the versions: `rollback` moves it back
  (or forward again) and every version stays in history.
- **Blobs.** Patch factors (safetensors of ``Patch.tensors()``), each patch's preserved-keys
  blocks and the saved base copy of every touched matrix are content-addressed blobs
  (`editserve.ledger.blobs.BlobStore`), written durably *before* the database transaction that
  refers to them. A crash leaves either the whole version or none of it (and perhaps an
  unreferenced blob, which is harmless). Writing, loading, verifying and caching these objects is
  `editserve.ledger.objects.LedgerObjects`; this module owns the version history and the
  transactions that change it. The integrity check run at open is `editserve.ledger.integrity`.
- **Backends.** A directory holds a SQLite database and blob files
  (`editserve.ledger.sqlite`, `FileBlobStore`); a ``postgresql://`` DSN names a database that
  holds everything, blobs included (`editserve.ledger.postgres`, `editserve.ledger.pgblobs`),
  so replicas need no shared filesystem. See `editserve.ledger.location` for how the location
  is chosen and how the DSN is kept secret.
- **Audit log.** Every create, commit, rollback, roll-forward, revert and import appends an
  event in the same transaction as the change it records.

The weights a version stands for (base copies, materialisation, checksums, diffs) are
`Ledger.weights` (`editserve.ledger.weights`); the fleet's replica registry is `Ledger.replicas`
(`editserve.ledger.replicas`); export and import are `editserve.ledger.transfer`. Recomputing
patches on `revert(..., rebase=...)` is done by an injected callable (see `editserve.ledger.rebase`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from editserve.editing.alphaedit import PreservedKeys
from editserve.editing.arch import Layout
from editserve.editing.requests import EditRequest
from editserve.errors import InvalidRequestError
from editserve.ledger.blobs import BlobStore, FileBlobStore
from editserve.ledger.errors import (
    ConsolidationError,
    IdempotencyMismatch,
    ImportRejected,
    LedgerCorrupt,
    LedgerError,
    LedgerModelMismatch,
    RevertError,
)
from editserve.ledger.consolidation import CONSOLIDATED_METHOD, ConsolidationPlan, RemovalPlan
from editserve.ledger.integrity import VERIFY_MODES, IntegrityReport, integrity_report
from editserve.ledger.location import LedgerLocation, location_from_env
from editserve.ledger.objects import LedgerObjects
from editserve.ledger.replicas import Replicas
from editserve.ledger.sqlite import SqliteStore
from editserve.ledger.store import (
    ADD,
    EVENT_COMMIT,
    EVENT_CONSOLIDATE,
    EVENT_IMPORT,
    EVENT_REVERT,
    KIND_COMMIT,
    KIND_CONSOLIDATE,
    KIND_IMPORT,
    KIND_REVERT,
    REMOVE,
    Event,
    LedgerStore,
    NewVersion,
    VersionRecord,
)
from editserve.ledger.weights import LedgerWeights
from editserve.patches import Patch

log = logging.getLogger(__name__)

DB_FILE = "ledger.sqlite3"
BLOB_DIR = "blobs"


# ---------------------------------------------------------------------------------------------
# Records handed to callers


@dataclass(frozen=True)
class VersionInfo:
    """One version as shown to callers: its operations plus the metadata of the patch it added."""

    version: int
    parent: int | None
    kind: str                                  # base | commit | revert | import | consolidate
    patch_id: str | None                       # digest of the patch this version added
    added: tuple[str, ...]
    removed: tuple[str, ...]
    caller: str
    created_at: float
    probe_report: dict[str, Any] | None
    idempotency_key: str | None
    method: str | None
    requests: tuple[EditRequest, ...]
    hparams: dict[str, Any] | None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RebaseStep:
    """One later patch to recompute after a revert.

    `old_context` were the patches in effect when `old_patch` was computed; `new_context` are
    the patches that will be in effect below its replacement (earlier recomputed ones included).
    A recompute callable must compute on a model with exactly `new_context` applied.
    """

    version: int                               # the version that added old_patch
    old_patch: Patch
    old_context: tuple[Patch, ...]
    new_context: tuple[Patch, ...]
    old_probe_report: dict[str, Any] | None
    # The preserved-keys states (AlphaEdit) of the two contexts: the blocks of `old_context`'s
    # patches as stored with them, and those of `new_context`'s (recomputed ones included), in order.
    old_preserved: PreservedKeys = PreservedKeys()
    new_preserved: PreservedKeys = PreservedKeys()

    @property
    def requests(self) -> tuple[EditRequest, ...]:
        return self.old_patch.requests

    @property
    def method(self) -> str:
        return self.old_patch.method

    @property
    def hparams(self) -> dict[str, Any]:
        return self.old_patch.hparams


@dataclass(frozen=True)
class RebaseOutcome:
    """What a recompute callable returns: the new patch and the metrics before/after."""

    patch: Patch
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    keys: PreservedKeys | None = None      # the new patch's preserved-keys blocks (stored with it)


@dataclass(frozen=True)
class RebasePlan:
    """The recomputed later patches of a revert of `version` at `head`, not yet written
    (`Ledger.plan_rebase`). `Ledger.revert(version, rebase=plan, expected_head=head)` writes it
    as it is, so a plan computed in one process (the sidecar) is committed by another."""

    version: int                               # the version whose patch is removed
    head: int                                  # the head the plan was computed at
    removed_patch: str
    kept: tuple[str, ...]                      # active patches before the removed one (unchanged)
    replaced: tuple[str, ...]                  # the later patches, in order
    outcomes: tuple[RebaseOutcome, ...]        # their recomputed versions, same order
    rebased: tuple["RebasedPatch", ...]
    # When a consolidation had taken the removed patch in: that consolidated patch re-solved without
    # it (`plan_fact_removal`); `kept` are then the active patches up to the last consolidated one
    # less the holder, and `replaced` the later (unconsolidated) ones.
    removal: RemovalPlan | None = None

    @property
    def patches(self) -> tuple[Patch, ...]:
        return tuple(o.patch for o in self.outcomes)

    @property
    def final(self) -> tuple[str, ...]:
        """The active patch ids of the new version."""
        held = (self.removal.patch.digest,) if self.removal is not None else ()
        return self.kept + held + tuple(o.patch.digest for o in self.outcomes)


@dataclass(frozen=True)
class RebasedPatch:
    original_version: int
    old_patch: str
    new_patch: str
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]

    @property
    def changes(self) -> dict[str, float]:
        """after − before for every metric both sides report."""
        return {k: float(self.metrics_after[k]) - float(self.metrics_before[k])
                for k in sorted(set(self.metrics_before) & set(self.metrics_after))}

    def to_dict(self) -> dict[str, Any]:
        return {"original_version": self.original_version, "old_patch": self.old_patch, "new_patch": self.new_patch,
                "metrics_before": self.metrics_before, "metrics_after": self.metrics_after, "changes": self.changes}


@dataclass(frozen=True)
class RevertResult:
    version: int                               # the new version (or the existing one for a retried key)
    reverted_version: int
    removed_patch: str
    rebased: tuple[RebasedPatch, ...]
    created: bool


# ---------------------------------------------------------------------------------------------
# Helpers


def _json_safe(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{what} must be JSON-serialisable without NaN/infinity: {exc}") from exc


def _request_digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def default_root(model_fingerprint: str) -> Path:
    from editserve.config import cache_dir

    return cache_dir("ledger") / model_fingerprint[:16]


def locate(root: str | Path | LedgerLocation | None, model_fingerprint: str | None) -> LedgerLocation:
    """The ledger `root` names; without one, ``$EDITSERVE_LEDGER_DSN_FILE``, ``$EDITSERVE_LEDGER``, else
    ``$EDITSERVE_HOME/ledger/<fingerprint[:16]>``."""
    if root is not None:
        return LedgerLocation.parse(root)
    found = location_from_env()
    if found is not None:
        return found
    if model_fingerprint is None:
        raise InvalidRequestError("Ledger.open needs a ledger location (directory or postgresql:// DSN), "
                                  "$EDITSERVE_LEDGER(_DSN_FILE), or a model fingerprint")
    return LedgerLocation(path=default_root(model_fingerprint))


def _open_backend(location: LedgerLocation, create: bool, model_fingerprint: str | None,
                  busy_timeout_s: float) -> tuple[LedgerStore, BlobStore]:
    if location.path is None:
        from editserve.ledger.pgblobs import PgBlobStore
        from editserve.ledger.postgres import PostgresStore

        pg = PostgresStore.connect(location, busy_timeout_s=busy_timeout_s)
        return pg, PgBlobStore(pg.conn)
    root = location.path
    db = root / DB_FILE
    if not db.exists():
        if not create:
            raise LedgerError(f"no ledger at {str(root)!r} ({DB_FILE} not found)")
        if model_fingerprint is None:
            raise InvalidRequestError(f"creating a ledger at {str(root)!r} needs the model fingerprint")
        root.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(db, busy_timeout_s=busy_timeout_s)
    try:
        return store, FileBlobStore(root / BLOB_DIR)
    except BaseException:
        store.close()
        raise


# ---------------------------------------------------------------------------------------------


class Ledger:
    """The patch ledger of one model. Open with `Ledger.open`."""

    def __init__(self, location: LedgerLocation, store: LedgerStore, blobs: BlobStore, model_fingerprint: str,
                 patch_cache_size: int = 4096) -> None:
        self.location = location
        self._store = store
        self._blobs = blobs
        self.model_fingerprint = model_fingerprint
        self._objects = LedgerObjects(store, blobs, model_fingerprint, patch_cache_size)
        self._weights = LedgerWeights(self)
        self._replicas = Replicas(store, location)
        self._lock = threading.RLock()
        self._active_cache: OrderedDict[int, tuple[tuple[str, int], ...]] = OrderedDict()
        self.damage: IntegrityReport | None = None

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | Path | LedgerLocation | None = None, model_fingerprint: str | None = None, *,
             caller: str = "local", create: bool = True, strict: bool = True, verify: str = "full",
             busy_timeout_s: float = 60.0) -> "Ledger":
        """Open (or create) the ledger at `root`.

        root:              a directory (SQLite database + blob files) or a ``postgresql://`` /
                           ``postgres://`` DSN (everything in that database); default
                           ``$EDITSERVE_LEDGER_DSN_FILE`` (a file holding the DSN), ``$EDITSERVE_LEDGER``,
                           else ``$EDITSERVE_HOME/ledger/<fingerprint[:16]>``. A DSN is never shown: see
                           `location` (redacted).
        model_fingerprint: the base model's fingerprint; required to create a ledger, and if given
                           must match an existing ledger's (`LedgerModelMismatch` otherwise).
        strict:            raise `LedgerCorrupt` if the integrity check at open finds missing or
                           corrupt blobs; with ``strict=False`` open anyway, keep the report in
                           `damage`, and refuse only operations that need the damaged versions.
        verify:            "full" (hash every blob), "quick" (presence and size) or "none".
        busy_timeout_s:    how long a write waits for another writer's lock (`LedgerBusy` after).

        Pending schema migrations are applied (`editserve.ledger.migrations`). A PostgreSQL server
        that cannot be reached raises `LedgerUnavailable`.
        """
        if verify not in VERIFY_MODES:
            raise InvalidRequestError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        location = locate(root, model_fingerprint)
        where = repr(str(location))
        store, blobs = _open_backend(location, create, model_fingerprint, busy_timeout_s)
        try:
            if not store.is_initialized():
                if location.path is None and not create:
                    raise LedgerError(f"no ledger in database {where} (it has no ledger tables)")
                if model_fingerprint is None:
                    if location.path is None:
                        raise InvalidRequestError(f"creating a ledger in database {where} needs the model fingerprint")
                    raise LedgerCorrupt(f"ledger database {str(location.path / DB_FILE)!r} exists but was never "
                                        f"initialised")
                store.initialize(model_fingerprint, caller, {"created_by": caller})
            else:
                store.upgrade()
            stored = store.meta().get("model_fingerprint")
            if stored is None:
                raise LedgerCorrupt(f"ledger {where} records no model fingerprint")
            if model_fingerprint is not None and stored != model_fingerprint:
                raise LedgerModelMismatch(
                    f"ledger {where} belongs to model {stored[:16]}..., not {model_fingerprint[:16]}...")
            ledger = cls(location, store, blobs, stored)
            if verify != "none":
                report = ledger.integrity_report(mode=verify)
                if not report.ok:
                    if strict:
                        raise LedgerCorrupt(
                            f"ledger {where} failed its integrity check at open: {report.describe()}. "
                            f"Open with strict=False to use version {report.last_good} and earlier.",
                            bad_blobs=report.bad_blobs, bad_versions=report.bad_versions, last_good=report.last_good)
                    log.error("ledger %s is damaged: %s", location, report.describe())
                    ledger.damage = report
        except BaseException:
            store.close()
            blobs.close()
            raise
        return ledger

    def close(self) -> None:
        self._store.close()
        self._blobs.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({str(self.location)!r}, model={self.model_fingerprint[:16]})"

    @property
    def root(self) -> Path | None:
        """The ledger directory of a SQLite ledger; None for a PostgreSQL one (see `location`)."""
        return self.location.path

    @property
    def backend(self) -> str:
        """"sqlite" or "postgresql"."""
        return self.location.backend

    @property
    def store(self) -> LedgerStore:
        return self._store

    @property
    def blobs(self) -> BlobStore:
        return self._blobs

    @property
    def objects(self) -> LedgerObjects:
        """The patches, key blocks and base copies the versions refer to (`editserve.ledger.objects`)."""
        return self._objects

    @property
    def weights(self) -> LedgerWeights:
        """The weights of the versions: base copies, materialisation, checksums, diffs (`editserve.ledger.weights`)."""
        return self._weights

    @property
    def replicas(self) -> Replicas:
        """The fleet's replica registry (`editserve.ledger.replicas`, docs/fleet.md)."""
        return self._replicas

    # -- reading -------------------------------------------------------------------------------

    def head(self) -> int:
        return self._store.head()

    def _active_with_origin(self, version: int) -> tuple[tuple[str, int], ...]:
        """(patch digest, version that added it) in effect at `version`, in summation order."""
        with self._lock:
            hit = self._active_cache.get(version)
            if hit is not None:
                self._active_cache.move_to_end(version)
                return hit
        active: list[tuple[str, int]] = []
        present: set[str] = set()           # membership in O(1): 10,000 adds must not cost 10,000² checks
        for v, op, digest in self._store.chain_ops(version):
            if op == ADD:
                if digest in present:
                    raise LedgerCorrupt(f"version {v} adds patch {digest[:12]} that is already active")
                active.append((digest, v))
                present.add(digest)
            else:
                if digest not in present:
                    raise LedgerCorrupt(f"version {v} removes patch {digest[:12]} that is not active")
                del active[next(i for i, (d, _) in enumerate(active) if d == digest)]
                present.discard(digest)
        result = tuple(active)
        with self._lock:
            self._active_cache[version] = result
            while len(self._active_cache) > 256:
                self._active_cache.popitem(last=False)
        return result

    def _resolve_version(self, version: int | None) -> int:
        if version is None:
            return self.head()
        if isinstance(version, bool) or not isinstance(version, int):
            raise InvalidRequestError(f"a version is an integer, got {version!r}")
        return version

    def active_ids(self, version: int | None = None) -> tuple[str, ...]:
        """Digests of the patches in effect at `version` (default: the head), in fixed order."""
        return tuple(d for d, _ in self._active_with_origin(self._resolve_version(version)))

    def active_origins(self, version: int | None = None) -> tuple[tuple[str, int], ...]:
        """(patch digest, version that added it) in effect at `version` (default: the head), in summation order."""
        return self._active_with_origin(self._resolve_version(version))

    def active_patches(self, version: int | None = None) -> list[Patch]:
        """The patches in effect at `version` (default: the head), in the order they are summed."""
        version = self._resolve_version(version)
        self._refuse_damaged(version)
        return self._objects.patches(self.active_ids(version))

    def patch(self, ref: str) -> Patch:
        """A stored patch by digest (or unique prefix of at least 6 characters), loaded and verified."""
        return self._objects.patch(ref)

    def has_patch(self, digest: str) -> bool:
        """Whether patch `digest` (full digest) is stored in this ledger."""
        return self._objects.has(digest)

    def _info(self, rec: VersionRecord, manifests: Mapping[str, dict[str, Any]]) -> VersionInfo:
        m = manifests.get(rec.patch) if rec.patch else None
        return VersionInfo(
            version=rec.version, parent=rec.parent, kind=rec.kind, patch_id=rec.patch,
            added=tuple(d for op, d in rec.ops if op == ADD), removed=tuple(d for op, d in rec.ops if op == REMOVE),
            caller=rec.caller, created_at=rec.created_at, probe_report=rec.probe_report,
            idempotency_key=rec.idempotency_key, method=m["method"] if m else None,
            requests=tuple(EditRequest(**r) for r in m["requests"]) if m else (),
            hparams=m["hparams"] if m else None, details=rec.details,
        )

    def version(self, version: int) -> VersionInfo:
        rec = self._store.version(self._resolve_version(version))
        manifests = {rec.patch: self._store.patch(rec.patch).manifest} if rec.patch else {}
        return self._info(rec, manifests)

    def version_for_key(self, key: str) -> VersionInfo | None:
        """The version an earlier call with idempotency key `key` created, or None."""
        hit = self._store.idempotent(key)
        return None if hit is None else self.version(hit[0])

    def versions(self) -> list[VersionInfo]:
        manifests = {p.digest: p.manifest for p in self._store.patches()}
        return [self._info(r, manifests) for r in self._store.versions()]

    def events(self, since_id: int = 0) -> list[Event]:
        return self._store.events(since_id)

    # -- writing -------------------------------------------------------------------------------

    def patch_keys(self, digest: str) -> PreservedKeys:
        """The preserved-keys blocks stored with patch `digest` (empty if it has none)."""
        return self._objects.keys_of([digest])[digest]

    def preserved_keys(self, version: int | None = None) -> PreservedKeys:
        """The preserved-keys state of `version` (default: the head): the blocks stored with its
        active patches, in their summation (commit) order — exactly the state that was current
        when that version was the head (`PreservedKeys.select` of the active ids)."""
        version = self._resolve_version(version)
        self._refuse_damaged(version)
        ids = self.active_ids(version)
        per = self._objects.keys_of(list(ids))
        blocks = tuple(b for d in ids for b in per[d].blocks)
        return PreservedKeys(blocks)

    def _refuse_damaged(self, version: int) -> None:
        if self.damage is not None and version in self.damage.bad_versions:
            raise LedgerCorrupt(f"version {version} is damaged ({self.damage.describe()})",
                                bad_blobs=self.damage.bad_blobs, bad_versions=self.damage.bad_versions,
                                last_good=self.damage.last_good)

    def _idempotent_hit(self, key: str | None, request_digest: str) -> int | None:
        if key is None:
            return None
        hit = self._store.idempotent(key)
        if hit is None:
            return None
        if hit[1] != request_digest:
            raise IdempotencyMismatch(f"idempotency key {key!r} was used for version {hit[0]} with another request")
        return hit[0]

    def _add_patch(self, patch: Patch, expected_head: int, caller: str, probe_report: dict[str, Any] | None,
                   idempotency_key: str | None, base: Mapping[str, torch.Tensor] | None, base_layout: Layout,
                   kind: str, event_kind: str, details: dict[str, Any],
                   preserved: PreservedKeys | None = None) -> int:
        if isinstance(expected_head, bool) or not isinstance(expected_head, int):
            raise InvalidRequestError(f"expected_head must be a version number, got {expected_head!r}")
        self._objects.check(patch)
        report = None if probe_report is None else _json_safe(probe_report, "probe_report")
        digest = patch.digest
        request = _request_digest(kind, digest)
        hit = self._idempotent_hit(idempotency_key, request)
        if hit is not None:
            log.info("%s of patch %s already recorded as version %d (idempotency key %r)", kind, digest[:12], hit,
                     idempotency_key)
            return hit
        self._refuse_damaged(expected_head)
        if digest in self.active_ids(expected_head):
            raise InvalidRequestError(f"patch {digest[:12]} is already active at version {expected_head}")
        bases = self._objects.bases_for([patch], base, base_layout)
        record = self._objects.write_patch(patch)                     # blobs are durable before the transaction
        states = self._objects.write_keys({digest: preserved})
        if states:                  # before the version: a committed version always has its state
            self._store.add_patch_states(states)
        new = NewVersion(parent=expected_head, kind=kind, patch=digest, ops=((ADD, digest),), caller=caller,
                         probe_report=report, idempotency_key=idempotency_key, request_digest=request,
                         details=details, event_kind=event_kind,
                         event_details={"patch": digest, "method": patch.method, **details})
        version, created = self._store.append_version(new, expected_head, [record], bases)
        self._objects.remember(patch)
        with self._lock:
            parent = self._active_cache.get(expected_head)
            if created and parent is not None:           # versions are immutable: extend the parent's list
                self._active_cache[version] = parent + ((digest, version),)
        if created:
            log.info("version %d: %s of patch %s (%s, %d request(s)) by %s", version, kind, digest[:12], patch.method,
                     len(patch.requests), caller)
        return version

    def commit(self, patch: Patch, expected_head: int, caller: str = "local", probe_report: dict[str, Any] | None = None,
               idempotency_key: str | None = None, base: Mapping[str, torch.Tensor] | None = None,
               base_layout: Layout = Layout.OUT_IN, preserved: PreservedKeys | None = None) -> int:
        """Record `patch` as a new version on top of `expected_head`; returns the new version number.

        Raises `LedgerConflict` if the head is not `expected_head` (nothing is written then). A
        retried call with the same `idempotency_key` returns the version the first call created.
        `base` supplies the base model's weights of matrices the ledger has no base copy of yet
        (in `base_layout`); the copies are stored with the version. `preserved`: the patch's
        preserved-keys blocks (those tagged with its digest are stored with it; `preserved_keys`).
        """
        return self._add_patch(patch, expected_head, caller, probe_report, idempotency_key, base, base_layout,
                               KIND_COMMIT, EVENT_COMMIT, {}, preserved)

    def rollback(self, version: int, caller: str = "local", expected_head: int | None = None) -> int:
        """Move the head to `version` (back, or forward to one still in history); returns the head."""
        version = self._resolve_version(version)
        self._store.version(version)                         # VersionNotFound if absent
        self._refuse_damaged(version)
        previous, head = self._store.move_head(version, expected_head, caller, {})
        if previous != head:
            log.info("head moved from version %d to %d by %s", previous, head, caller)
        return head

    def _rebase_split(self, rec: VersionRecord, ids: list[str], head: int,
                      removal: RemovalPlan | None) -> tuple[tuple[str, ...], int]:
        """(the active patches a rebase of `rec` keeps as they are, the index in `ids` of the first it
        recomputes) at `head`; refuses what cannot be rebased (`RevertError`, nothing changed)."""
        if removal is None:
            if rec.patch not in ids:
                raise self.inactive_patch_error(rec.version, rec.patch, head)
            idx = ids.index(rec.patch)
            if idx == len(ids) - 1:
                raise RevertError(f"the patch of version {rec.version} ({rec.patch[:12]}) is the last active patch "
                                  f"at version {head}: no later patch to rebase (revert it without rebase)")
            return tuple(ids[:idx]), idx + 1
        if (removal.version, removal.head, removal.removed) != (rec.version, head, rec.patch) or (
                removal.holder not in ids):
            raise RevertError(f"the removal plan was computed for taking version {removal.version} out of "
                              f"{removal.holder[:12]} at head {removal.head}, not version {rec.version} at head "
                              f"{head}; nothing was changed")
        last = max(i for i, d in enumerate(ids) if self.patch(d).method == CONSOLIDATED_METHOD)
        return tuple(d for d in ids[:last + 1] if d != removal.holder), last + 1

    def plan_rebase(self, version: int, rebase: Callable[[RebaseStep], Patch | RebaseOutcome],
                    expected_head: int | None = None, removal: RemovalPlan | None = None) -> RebasePlan:
        """Recompute, with the callable `rebase`, every patch active at `expected_head` (default: the
        head) after the one `version` added, on the new base; nothing is written. Each `RebaseStep`
        carries the preserved-keys states of its old and new contexts (rebuilt from the blocks stored
        per patch, the recomputed ones included). Raises `RevertError` if `version` added no patch,
        its patch is not active at the head, or no patch follows it (nothing to rebase).

        When a consolidation took the patch in, `removal` is that consolidated patch re-solved without
        it (`editserve.ledger.consolidation.plan_fact_removal` at the same head: every other committed
        key keeps its output, which is the consolidation's recompute); the patches after the last
        consolidated one are then recomputed on the new base that holds the re-solved patch in place
        of its holder (there may be none). Consolidated patches themselves are never recomputed."""
        head = self.head() if expected_head is None else self._resolve_version(expected_head)
        rec = self._store.version(self._resolve_version(version))
        if rec.patch is None:
            raise RevertError(f"version {rec.version} ({rec.kind}) added no patch; there is nothing to revert")
        self._refuse_damaged(head)
        chain = self._active_with_origin(head)
        ids = [d for d, _ in chain]
        kept, start = self._rebase_split(rec, ids, head, removal)
        new_context = [self.patch(d) for d in kept]
        keys = self._objects.keys_of(ids)
        new_blocks = [b for d in kept for b in keys[d].blocks]
        if removal is not None:
            new_context.append(removal.patch)
            new_blocks += list(removal.keys.blocks)
        outcomes: list[RebaseOutcome] = []
        rebased: list[RebasedPatch] = []
        for digest, origin in chain[start:]:
            origin_rec = self._store.version(origin)
            old = self.patch(digest)
            if old.method == CONSOLIDATED_METHOD:
                raise RevertError(f"the patch of version {origin} ({digest[:12]}) consolidates earlier patches and "
                                  "cannot be recomputed on a new base; roll back to a version before the "
                                  f"consolidation (version {origin_rec.parent}) and revert there, or revert "
                                  "without rebase")
            # What was below the old patch in the version that added it (for a patch a rebase
            # added, the kept and earlier recomputed patches of that version, not its parent's).
            at_origin = list(self.active_ids(origin))
            below = at_origin[:at_origin.index(digest)]
            old_context = tuple(self.patch(d) for d in below)
            old_keys = self._objects.keys_of(below)
            old_preserved = PreservedKeys(tuple(b for d in below for b in old_keys[d].blocks))
            step = RebaseStep(version=origin, old_patch=old, old_context=old_context,
                              new_context=tuple(new_context), old_probe_report=self._first_report(digest, origin_rec),
                              old_preserved=old_preserved, new_preserved=PreservedKeys(tuple(new_blocks)))
            outcome = rebase(step)
            if isinstance(outcome, Patch):
                outcome = RebaseOutcome(patch=outcome)
            if not isinstance(outcome, RebaseOutcome):
                raise RevertError(f"the rebase callable returned {type(outcome).__name__}, not a Patch or RebaseOutcome")
            self._objects.check(outcome.patch)
            own = outcome.keys.for_patch(outcome.patch.digest) if outcome.keys is not None else PreservedKeys()
            outcome = RebaseOutcome(patch=outcome.patch, metrics_before=dict(outcome.metrics_before),
                                    metrics_after=dict(outcome.metrics_after), keys=own if own.blocks else None)
            before = outcome.metrics_before or dict(origin_rec.probe_report or {})
            rebased.append(RebasedPatch(original_version=origin, old_patch=digest, new_patch=outcome.patch.digest,
                                        metrics_before=_json_safe(before, "metrics_before"),
                                        metrics_after=_json_safe(outcome.metrics_after, "metrics_after")))
            new_context.append(outcome.patch)
            new_blocks += list(own.blocks)
            outcomes.append(outcome)
        plan = RebasePlan(version=rec.version, head=head, removed_patch=rec.patch, kept=kept,
                          replaced=tuple(ids[start:]), outcomes=tuple(outcomes), rebased=tuple(rebased),
                          removal=removal)
        if len(set(plan.final)) != len(plan.final):
            raise RevertError("rebasing produced a patch identical to one already active; nothing was changed")
        return plan

    def _consolidation_path(self, digest: str, version: int) -> list[VersionRecord]:
        """The consolidations that took patch `digest` in, from the one that removed it to the one whose
        patch is active at `version`; [] when no active consolidation holds it. Follows the chain's
        operations: the version that removed a patch, if a consolidation, added the patch holding it."""
        active = {d for d, _ in self._active_with_origin(version)}
        removed_by = {d: v for v, op, d in self._store.chain_ops(version) if op == REMOVE}
        path: list[VersionRecord] = []
        leaf = digest
        while digest not in active and digest in removed_by:
            rec = self._store.version(removed_by[digest])
            if rec.patch is None or not (rec.kind == KIND_CONSOLIDATE or (
                    rec.kind == KIND_REVERT and (rec.details.get("consolidation") or {}).get("old_patch") == digest
                    and rec.details.get("removed_patch") != leaf)):
                return []           # reverted (plainly, or taken out of its consolidation)
            path.append(rec)
            digest = rec.patch
        return path if digest in active else []

    def origin_versions(self, version: int | None = None) -> dict[str, int]:
        """{patch digest: the version that added it} for every patch added along `version`'s chain
        (default: the head), active or not (one read of the chain's operations)."""
        return {d: v for v, op, d in self._store.chain_ops(self._resolve_version(version)) if op == ADD}

    def consolidated_into(self, digest: str, version: int | None = None) -> int | None:
        """The version that added the consolidated patch active at `version` (default: the head)
        that holds patch `digest` among its constituents, directly or through an earlier
        consolidation it took in; None when no active consolidation holds it (one read of the
        chain's operations and one version record per consolidation followed)."""
        path = self._consolidation_path(digest, self._resolve_version(version))
        return path[-1].version if path else None

    def inactive_patch_error(self, version: int, digest: str, head: int) -> RevertError:
        """The refusal for reverting `version`, whose patch `digest` is not active at `head`: when a
        consolidation holds it, the error names that version and the two ways to revert the fact —
        roll back to the last version where the patch itself was active (before the first
        consolidation that took it in), or revert the consolidation active now."""
        msg = f"the patch of version {version} ({digest[:12]}) is not active at version {head}"
        path = self._consolidation_path(digest, head)
        if path:
            holder, first = path[-1].version, path[0]
            through = f" (through version {first.version})" if first.version != holder else ""
            msg += (f": version {holder} consolidated it with other patches into one{through}; to undo this fact "
                    f"alone, take it out of the consolidation (a served revert does; locally `editserve ledger "
                    f"revert {version} --from-consolidation`), or roll back to version {first.parent} (before it "
                    f"was consolidated) and revert version {version} there, or revert version {holder} to remove "
                    "every fact it holds")
        return RevertError(msg)

    def _first_report(self, digest: str, rec: VersionRecord) -> dict[str, Any] | None:
        """The probe report of the commit a patch descends from: a patch that an earlier rebase
        recomputed has none of its own, so follow ``details["rebased"]`` back to the original."""
        seen = set()
        while rec.probe_report is None and rec.kind == KIND_REVERT and rec.version not in seen:
            seen.add(rec.version)
            entry = next((r for r in rec.details.get("rebased", []) if r.get("new_patch") == digest), None)
            if entry is None:
                break
            digest, rec = entry["old_patch"], self._store.version(int(entry["original_version"]))
        return rec.probe_report

    def revert(self, version: int, caller: str = "local",
               rebase: Callable[[RebaseStep], Patch | RebaseOutcome] | RebasePlan | None = None,
               expected_head: int | None = None, idempotency_key: str | None = None,
               probe_report: dict[str, Any] | None = None) -> RevertResult:
        """Create a new version equal to the head without the patch that `version` added.

        With `rebase`, every patch active after it is recomputed in order (`plan_rebase`, by the
        callable, which receives a `RebaseStep` and returns the new `Patch` or a `RebaseOutcome`
        with metrics), or `rebase` is a `RebasePlan` computed earlier at the same head; the new
        version holds the recomputed patches (and their preserved-keys blocks) in place of the old
        ones. The head must still be `expected_head` (default: the head when called) when the
        version is written. A repeated `idempotency_key` returns the first call's result.
        """
        head = self.head() if expected_head is None else self._resolve_version(expected_head)
        rec = self._store.version(self._resolve_version(version))
        if rec.patch is None:
            raise RevertError(f"version {rec.version} ({rec.kind}) added no patch; there is nothing to revert")
        request = _request_digest(KIND_REVERT, str(rec.version), "rebase" if rebase is not None else "plain")
        hit = self._idempotent_hit(idempotency_key, request)
        if hit is not None:
            done = self._store.version(hit)
            rebased = tuple(RebasedPatch(**{k: r[k] for k in ("original_version", "old_patch", "new_patch",
                                                              "metrics_before", "metrics_after")})
                            for r in done.details.get("rebased", []))
            return RevertResult(version=hit, reverted_version=rec.version, removed_patch=rec.patch,
                                rebased=rebased, created=False)
        self._refuse_damaged(head)
        ids = list(self.active_ids(head))
        plan: RebasePlan | None = None
        if isinstance(rebase, RebasePlan):
            plan = rebase
            kept, start = self._rebase_split(rec, ids, head, plan.removal)
            if (plan.version, plan.head, plan.removed_patch, plan.kept, plan.replaced) != (
                    rec.version, head, rec.patch, kept, tuple(ids[start:])):
                raise RevertError(f"the rebase plan was computed for reverting version {plan.version} at head "
                                  f"{plan.head}, not version {rec.version} at head {head}; nothing was changed")
        elif rec.patch not in ids:
            raise self.inactive_patch_error(rec.version, rec.patch, head)
        elif rebase is not None:
            plan = self.plan_rebase(rec.version, rebase, expected_head=head)
        removal = plan.removal if plan is not None else None
        if removal is not None:
            # the consolidated patch that held it, re-solved without it, takes its place
            self._objects.check(removal.patch)
            if removal.keys.blocks and {b.tag for b in removal.keys.blocks} != {removal.patch.digest}:
                raise RevertError("the removal plan's preserved-keys blocks are not tagged with its patch")
            ops: list[tuple[str, str]] = [(REMOVE, removal.holder), (ADD, removal.patch.digest)]
        else:
            ops = [(REMOVE, rec.patch)]
        new_patches = ([removal.patch] if removal is not None else []) + (list(plan.patches) if plan else [])
        rebased = list(plan.rebased) if plan is not None else []
        if plan is not None:
            ops += [(REMOVE, d) for d in plan.replaced]
            ops += [(ADD, p.digest) for p in plan.patches]
        bases = self._objects.bases_for(new_patches, None, Layout.OUT_IN)
        records = [self._objects.write_patch(p) for p in new_patches]
        key_states = {o.patch.digest: o.keys for o in plan.outcomes} if plan is not None else {}
        states = self._objects.write_keys(key_states)
        if removal is not None:
            states += self._write_removal_keys(removal)
        if states:
            self._store.add_patch_states(states)
        details: dict[str, Any] = {"reverted": rec.version, "removed_patch": rec.patch,
                                   "rebased": [r.to_dict() for r in rebased]}
        if plan is not None:
            details["mode"] = "rebase"
        if removal is not None:
            details["consolidation"] = removal.details()["consolidation"]
        new = NewVersion(parent=head, kind=KIND_REVERT, patch=removal.patch.digest if removal is not None else None,
                         ops=tuple(ops), caller=caller,
                         probe_report=None if probe_report is None else _json_safe(probe_report, "probe_report"),
                         idempotency_key=idempotency_key, request_digest=request, details=details,
                         event_kind=EVENT_REVERT, event_details=details)
        number, created = self._store.append_version(new, head, records, bases)
        for p in new_patches:
            self._objects.remember(p)
        log.info("version %d: reverted version %d (patch %s)%s by %s", number, rec.version, rec.patch[:12],
                 f", rebased {len(rebased)} later patch(es)" if plan is not None else "", caller)
        return RevertResult(version=number, reverted_version=rec.version, removed_patch=rec.patch,
                            rebased=tuple(rebased), created=created)

    def _append_replacement(self, patch: Patch, keys: PreservedKeys, head: int, kind: str, event_kind: str,
                            ops: tuple[tuple[str, str], ...], details: dict[str, Any], caller: str,
                            probe_report: dict[str, Any] | None, idempotency_key: str | None,
                            request: str, key_parts: tuple[str, ...] = ()) -> tuple[int, bool]:
        """One version on `head` that adds `patch` (with its preserved-keys blocks) by `ops` (a
        consolidation, a revert out of one): blobs and key state durable first, then the version.
        `key_parts`: the patches whose blocks, in order, `keys` are (a consolidation's constituents),
        stored as a reference to them instead of a copy (checked first: nothing is written if `keys`
        are not exactly their blocks)."""
        states = (self._objects.write_keys_by_reference(patch.digest, keys, key_parts) if key_parts
                  else self._objects.write_keys({patch.digest: keys}))
        bases = self._objects.bases_for([patch], None, Layout.OUT_IN)
        record = self._objects.write_patch(patch)
        if states:
            self._store.add_patch_states(states)
        new = NewVersion(parent=head, kind=kind, patch=patch.digest, ops=ops, caller=caller,
                         probe_report=None if probe_report is None else _json_safe(probe_report, "probe_report"),
                         idempotency_key=idempotency_key, request_digest=request, details=details,
                         event_kind=event_kind, event_details=details)
        number, created = self._store.append_version(new, head, [record], bases)
        self._objects.remember(patch)
        return number, created

    def _write_removal_keys(self, removal: RemovalPlan) -> list[Any]:
        """The key state of a consolidated patch re-solved without a fact: a reference to the
        committed patches whose blocks it keeps (`RemovalPlan.key_parts`; checked to be exactly
        them, else `ConsolidationError` and nothing written), or a copy for a plan without them."""
        if removal.key_parts:
            return self._objects.write_keys_by_reference(removal.patch.digest, removal.keys, removal.key_parts)
        return self._objects.write_keys({removal.patch.digest: removal.keys})

    def revert_consolidated(self, plan: RemovalPlan, caller: str = "local", idempotency_key: str | None = None,
                            probe_report: dict[str, Any] | None = None) -> RevertResult:
        """Write `plan` (`editserve.ledger.consolidation.plan_fact_removal`) as one revert version on
        top of `plan.head`: the consolidated patch that holds the reverted version's patch removed,
        the same patch re-solved without that patch's facts added (with its preserved keys). Raises
        `LedgerConflict` if the head moved, `RevertError` if the holder is no longer active there. A
        repeated `idempotency_key` returns the first call's result; nothing old is rewritten, so a
        rollback to `plan.head` restores it exactly."""
        if not isinstance(plan, RemovalPlan):
            raise InvalidRequestError(f"expected a RemovalPlan, got {type(plan).__name__}")
        self._objects.check(plan.patch)
        digest = plan.patch.digest
        request = _request_digest(KIND_REVERT, str(plan.version), "consolidated")
        hit = self._idempotent_hit(idempotency_key, request)
        if hit is not None:
            return RevertResult(version=hit, reverted_version=plan.version, removed_patch=plan.removed, rebased=(),
                                created=False)
        self._refuse_damaged(plan.head)
        active = set(self.active_ids(plan.head))
        if plan.holder not in active:
            raise RevertError(f"the consolidated patch {plan.holder[:12]} of the plan is not active at version "
                              f"{plan.head}; nothing was changed")
        if digest in active:
            raise RevertError(f"patch {digest[:12]} is already active at version {plan.head}")
        if plan.keys.blocks and {b.tag for b in plan.keys.blocks} != {digest}:
            raise RevertError("the plan's preserved-keys blocks are not tagged with its patch")
        number, created = self._append_replacement(
            plan.patch, plan.keys, plan.head, KIND_REVERT, EVENT_REVERT, ((REMOVE, plan.holder), (ADD, digest)),
            plan.details(), caller, probe_report, idempotency_key, request, key_parts=plan.key_parts)
        log.info("version %d: reverted version %d (patch %s) out of consolidated patch %s → %s by %s", number,
                 plan.version, plan.removed[:12], plan.holder[:12], digest[:12], caller)
        return RevertResult(version=number, reverted_version=plan.version, removed_patch=plan.removed, rebased=(),
                            created=created)

    def consolidate(self, plan: ConsolidationPlan, caller: str = "local", idempotency_key: str | None = None,
                    probe_report: dict[str, Any] | None = None) -> int:
        """Write `plan` (`editserve.ledger.consolidation.plan_consolidation`) as one version on top of
        `plan.head`: its constituents removed, its patch added with its preserved-keys blocks. Raises
        `LedgerConflict` if the head moved since the plan, `ConsolidationError` if a constituent is no
        longer active there. A repeated `idempotency_key` returns the first call's version."""
        if not isinstance(plan, ConsolidationPlan):
            raise InvalidRequestError(f"expected a ConsolidationPlan, got {type(plan).__name__}")
        self._objects.check(plan.patch)
        digest = plan.patch.digest
        request = _request_digest(KIND_CONSOLIDATE, str(plan.head), digest)
        hit = self._idempotent_hit(idempotency_key, request)
        if hit is not None:
            return hit
        self._refuse_damaged(plan.head)
        active = set(self.active_ids(plan.head))
        gone = [d[:12] for d, _ in plan.constituents + plan.held if d not in active]
        if gone:
            raise ConsolidationError(f"patch(es) {gone} of the plan are not active at version {plan.head}; "
                                     "nothing was changed")
        if digest in active:
            raise ConsolidationError(f"patch {digest[:12]} is already active at version {plan.head}")
        if {b.tag for b in plan.keys.blocks} != {digest}:
            raise ConsolidationError("the plan's preserved-keys blocks are not tagged with its patch")
        ops = tuple((REMOVE, d) for d, _ in plan.constituents) + ((ADD, digest),)
        number, _ = self._append_replacement(plan.patch, plan.keys, plan.head, KIND_CONSOLIDATE, EVENT_CONSOLIDATE, ops,
                                             plan.details(), caller, probe_report, idempotency_key, request,
                                             key_parts=tuple(d for d, _ in plan.constituents))
        log.info("version %d: consolidated %d patches into %s by %s", number, len(plan.constituents), digest[:12],
                 caller)
        return number

    def add_imported(self, patches: Sequence[Patch], expected_head: int, caller: str, idempotency_key: str | None,
                base: Mapping[str, torch.Tensor] | None, base_layout: Layout, replace: bool,
                details: dict[str, Any], keys: Mapping[str, PreservedKeys] | None = None) -> int:
        """The import transaction, for patches already validated (`editserve.ledger.transfer`, the
        server's import of an upload): one version adding `patches` on top of the head, or
        replacing the head's active list when `replace`; `keys` are their preserved-keys blocks."""
        if isinstance(expected_head, bool) or not isinstance(expected_head, int):
            raise InvalidRequestError(f"expected_head must be a version number, got {expected_head!r}")
        for p in patches:
            self._objects.check(p)
        request = _request_digest(KIND_IMPORT, "replace" if replace else "add", *[p.digest for p in patches])
        hit = self._idempotent_hit(idempotency_key, request)
        if hit is not None:
            return hit
        self._refuse_damaged(expected_head)
        current = self.active_ids(expected_head)
        if replace:
            ops = [(REMOVE, d) for d in current] + [(ADD, p.digest) for p in patches]
        else:
            dup = [p.digest[:12] for p in patches if p.digest in current]
            if dup:
                raise ImportRejected(f"patch(es) {dup} are already active at version {expected_head}")
            ops = [(ADD, p.digest) for p in patches]
        bases = self._objects.bases_for(patches, base, base_layout, error=ImportRejected)
        records = [self._objects.write_patch(p) for p in patches]
        states = self._objects.write_keys(dict(keys or {}))
        if states:
            self._store.add_patch_states(states)
        new = NewVersion(parent=expected_head, kind=KIND_IMPORT, patch=patches[0].digest if len(patches) == 1 and not replace
                         else None, ops=tuple(ops), caller=caller, probe_report=None, idempotency_key=idempotency_key,
                         request_digest=request, details=details, event_kind=EVENT_IMPORT,
                         event_details={"patches": [p.digest for p in patches], **details})
        number, _ = self._store.append_version(new, expected_head, records, bases)
        log.info("version %d: imported %d patch(es) by %s", number, len(patches), caller)
        return number

    # -- integrity -----------------------------------------------------------------------------

    def integrity_report(self, mode: str = "full", deep: bool = False) -> IntegrityReport:
        """Check the database and every blob. `deep` also loads every patch and checks its digest."""
        return integrity_report(self._store, self._blobs, mode, deep)

    def check_integrity(self, mode: str = "full", deep: bool = False) -> IntegrityReport:
        """Like `integrity_report`, but raise `LedgerCorrupt` (naming the bad blobs and versions) if not intact."""
        report = self.integrity_report(mode, deep)
        if not report.ok:
            raise LedgerCorrupt(f"ledger {str(self.location)!r} is damaged: {report.describe()}", bad_blobs=report.bad_blobs,
                                bad_versions=report.bad_versions, last_good=report.last_good)
        return report

    def last_good_version(self) -> int:
        return self.integrity_report().last_good

    def nbytes(self) -> int:
        """Bytes the ledger occupies: database (with WAL) and blobs (PostgreSQL: its tables and indexes)."""
        return self._store.nbytes() + self._blobs.nbytes()

    def collect_garbage(self, min_age_s: float = 3600.0) -> list[str]:
        """Remove blobs no record refers to (left by commits that crashed before their transaction)."""
        referenced = [p.blob for p in self._store.patches()] + [b.blob for b in self._store.base_copies().values()]
        referenced += [r.blob for r in self._store.patch_states([p.digest for p in self._store.patches()]).values()]
        return self._blobs.collect_garbage(referenced, min_age_s)
