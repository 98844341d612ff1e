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
(`editserve.ledger.replicas`); export and import are `editserve.ledger.transfer`. The writes that
rewrite the head's active patches — revert (and rebase), a revert out of a consolidation, a
consolidation — are `editserve.ledger.rewrites` (`HistoryRewrites`, a part of `Ledger`); the records
handed to callers are `editserve.ledger.records`. Recomputing patches on `revert(..., rebase=...)` is
done by an injected callable (see `editserve.ledger.rebase`).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from editserve.editing.alphaedit import PreservedKeys
from editserve.editing.arch import Layout
from editserve.editing.requests import EditRequest
from editserve.errors import InvalidRequestError
from editserve.ledger.blobs import BlobStore, FileBlobStore
from editserve.ledger.errors import (
    IdempotencyMismatch,
    ImportRejected,
    LedgerCorrupt,
    LedgerError,
    LedgerModelMismatch,
)
from editserve.ledger.integrity import VERIFY_MODES, IntegrityReport, integrity_report
from editserve.ledger.location import LedgerLocation, location_from_env
from editserve.ledger.objects import LedgerObjects
from editserve.ledger.records import VersionInfo, json_safe, request_digest
from editserve.ledger.replicas import Replicas
from editserve.ledger.rewrites import HistoryRewrites
from editserve.ledger.sqlite import SqliteStore
from editserve.ledger.store import (
    ADD,
    EVENT_COMMIT,
    EVENT_IMPORT,
    KIND_COMMIT,
    KIND_IMPORT,
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


class Ledger(HistoryRewrites):
    """The patch ledger of one model. Open with `Ledger.open`. Here: opening, reads, commit,
    rollback, import and the integrity check; revert, rebase and consolidation writes are its
    `HistoryRewrites` part (editserve/ledger/rewrites.py)."""

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

    def patches(self, digests: Sequence[str]) -> list[Patch]:
        """Stored patches by full digest, in order, loaded and verified (in bulk when many are not cached)."""
        return self._objects.patches(digests)

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
        report = None if probe_report is None else json_safe(probe_report, "probe_report")
        digest = patch.digest
        request = request_digest(kind, digest)
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

    def origin_versions(self, version: int | None = None) -> dict[str, int]:
        """{patch digest: the version that added it} for every patch added along `version`'s chain
        (default: the head), active or not (one read of the chain's operations)."""
        return {d: v for v, op, d in self._store.chain_ops(self._resolve_version(version)) if op == ADD}

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
        request = request_digest(KIND_IMPORT, "replace" if replace else "add", *[p.digest for p in patches])
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
