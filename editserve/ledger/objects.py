"""`LedgerObjects`: the immutable objects a ledger's versions refer to, by digest.

Three kinds, each a content-addressed blob (`editserve.ledger.blobs`) plus a record in the store:

- **patches** (the factors of ``Patch.tensors()``, safetensors; record: digest, blob, manifest);
- **preserved-keys blocks** of a patch (`editserve.ledger.keystate`; what later commits protect);
- **base copies** (the original of every touched matrix, in its stored layout).

Writing puts the blob durably first and returns the record for the caller's transaction
(`Ledger` appends the version that refers to it); a crash between the two leaves an unreferenced
blob, which garbage collection removes. Reading verifies what it loads (a patch must load and hash
to its digest) and caches patches and key blocks by digest: objects never change once written, so
the caches need no invalidation, only a size bound.

The version history (which patches are active where) is `Ledger`'s; this class never reads it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from editserve.editing.alphaedit import KeyBlock, PreservedKeys
from editserve.editing.arch import Layout
from editserve.errors import InvalidRequestError, NonFiniteError, PatchMismatchError
from editserve.ledger.blobs import BlobStore
from editserve.ledger.errors import (
    BaseCopyMismatch,
    BaseCopyMissing,
    ConsolidationError,
    LedgerCorrupt,
    LedgerError,
    LedgerModelMismatch,
    PatchNotFound,
)
from editserve.ledger.keystate import is_ref, ref_bytes, ref_parts, state_bytes, state_from_bytes
from editserve.ledger.store import BaseCopyRecord, LedgerStore, PatchRecord, PatchStateRecord
from editserve.patches import Patch

COLD_BATCH = 8            # more patches than this missing from the cache: fetch records and blobs in bulk


def patch_bytes(patch: Patch) -> bytes:
    from safetensors.torch import save

    return save(patch.tensors())


def patch_from_bytes(data: bytes, manifest: dict[str, Any]) -> Patch:
    from safetensors.torch import load

    return Patch.from_parts(manifest, load(data))


def out_in_shape(shape: Sequence[int], layout: Layout | str) -> tuple[int, int]:
    """(d_out, d_in) of a stored 2-D weight of `shape` in `layout`."""
    if len(shape) != 2:
        raise PatchMismatchError(f"edited weights must be 2-D, got shape {tuple(shape)}")
    return (int(shape[0]), int(shape[1])) if Layout(layout) is Layout.OUT_IN else (int(shape[1]), int(shape[0]))


class _Lru:
    """A size-bounded digest → object map (thread-safe; least recently used dropped first)."""

    def __init__(self, size: int) -> None:
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key: str) -> Any | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


def _same_blocks(a: Sequence[KeyBlock], b: Sequence[KeyBlock]) -> bool:
    """Whether two block lists hold the same keys at the same layers, in order (tags aside), bit for bit."""
    return len(a) == len(b) and all(x.layer == y.layer and x.keys.shape == y.keys.shape and torch.equal(x.keys, y.keys)
                                    for x, y in zip(a, b))


class LedgerObjects:
    """Patches, their preserved-keys blocks and base copies of one ledger (module docstring)."""

    def __init__(self, store: LedgerStore, blobs: BlobStore, model_fingerprint: str, cache_size: int = 4096) -> None:
        self._store = store
        self._blobs = blobs
        self.model_fingerprint = model_fingerprint
        self._patches = _Lru(cache_size)        # digest -> Patch
        self._keys = _Lru(cache_size)           # digest -> PreservedKeys (its own blocks)

    # -- patches -------------------------------------------------------------------------------

    def check(self, patch: Patch) -> None:
        """Refuse what cannot be a patch of this ledger (type, model, empty)."""
        if not isinstance(patch, Patch):
            raise InvalidRequestError(f"expected a Patch, got {type(patch).__name__}")
        if patch.model_fingerprint != self.model_fingerprint:
            raise LedgerModelMismatch(f"patch {patch.digest[:12]} was computed for model {patch.model_fingerprint[:16]}, "
                                      f"this ledger is for {self.model_fingerprint[:16]}")
        if not patch.deltas:
            raise InvalidRequestError(f"patch {patch.digest[:12]} changes no weight")

    def write_patch(self, patch: Patch) -> PatchRecord:
        """The patch's factors as a durable blob; the record for the transaction that adds it."""
        data = patch_bytes(patch)
        blob = self._blobs.put(data)
        return PatchRecord(digest=patch.digest, blob=blob, blob_size=len(data), manifest=patch.manifest(),
                           created_at=time.time())

    def remember(self, patch: Patch) -> None:
        """Cache a patch the caller has just written (its transaction committed)."""
        self._patches.put(patch.digest, patch)

    def resolve(self, ref: str) -> str:
        """The full digest of a patch reference (a digest, or a unique prefix of at least 6 characters)."""
        if len(ref) == 64:
            return ref
        if len(ref) < 6:
            raise PatchNotFound(f"patch reference {ref!r} is too short (give at least 6 hex digits)")
        found = [p.digest for p in self._store.patches() if p.digest.startswith(ref)]
        if len(found) != 1:
            raise PatchNotFound(f"patch reference {ref!r} matches {len(found)} patches")
        return found[0]

    def has(self, digest: str) -> bool:
        try:
            self._store.patch(digest)
        except PatchNotFound:
            return False
        return True

    def patch(self, ref: str) -> Patch:
        """A stored patch by reference, loaded and verified."""
        digest = self.resolve(ref)
        hit = self._patches.get(digest)
        if hit is not None:
            return hit
        rec = self._store.patch(digest)
        return self._load(rec, self._blobs.get(rec.blob))

    def patches(self, digests: Sequence[str]) -> list[Patch]:
        """Stored patches by full digest, in order; a cold cache is filled with one query per kind."""
        missing = [d for d in digests if d not in self._patches]
        if len(missing) > COLD_BATCH:
            wanted = set(missing)
            records = {r.digest: r for r in self._store.patches() if r.digest in wanted}
            blobs = self._blobs.get_many([records[d].blob for d in missing if d in records])
            for d in missing:
                if d in records and records[d].blob in blobs:
                    self._load(records[d], blobs[records[d].blob])
        return [self.patch(d) for d in digests]

    def _load(self, rec: PatchRecord, data: bytes) -> Patch:
        """Parse and verify a patch from its (checksum-verified) blob; cache it."""
        digest = rec.digest
        try:
            patch = patch_from_bytes(data, rec.manifest)
        except (PatchMismatchError, NonFiniteError) as exc:
            raise LedgerCorrupt(f"patch {digest[:12]} (blob {rec.blob}) does not load: {exc}",
                                bad_blobs={rec.blob: str(exc)}) from exc
        if patch.digest != digest:
            raise LedgerCorrupt(f"patch {digest[:12]} loads as {patch.digest[:12]}", bad_blobs={rec.blob: "digest"})
        self._patches.put(digest, patch)
        return patch

    # -- preserved-keys blocks -------------------------------------------------------------------

    def write_keys(self, keys: Mapping[str, PreservedKeys | None]) -> list[PatchStateRecord]:
        """Write the preserved-keys blob of each patch (durable before the transaction); records to insert.
        `keys` maps a patch digest to its blocks (those tagged with other digests are dropped)."""
        out = []
        for digest, state in keys.items():
            if state is None:
                continue
            if not isinstance(state, PreservedKeys):
                raise InvalidRequestError(f"preserved keys must be a PreservedKeys, got {type(state).__name__}")
            own = state.for_patch(digest)
            if not own.blocks:
                continue
            data = state_bytes(own)
            out.append(PatchStateRecord(digest=digest, blob=self._blobs.put(data), blob_size=len(data),
                                        n_blocks=len(own.blocks), created_at=time.time()))
            self._keys.put(digest, own)
        return out

    def write_keys_by_reference(self, digest: str, keys: PreservedKeys, parts: Sequence[str]) -> list[PatchStateRecord]:
        """Like `write_keys` for patch `digest` whose blocks are those of patches `parts`, in order,
        retagged (a consolidation): a reference blob naming `parts` instead of a copy of every key
        (`editserve.ledger.keystate`). Raises `ConsolidationError`, writing nothing, unless `keys`
        is exactly that concatenation and every part holds keys (what a reference can name)."""
        parts = tuple(parts)
        own = keys.for_patch(digest)
        if not parts or digest in parts or len(set(parts)) != len(parts):
            raise ConsolidationError(f"patch {digest[:12]}: the patches its keys refer to must be other patches, "
                                     f"each named once (got {[p[:12] for p in parts]})")
        got = self.keys_of(parts)
        empty = [p[:12] for p in parts if not got[p].blocks]
        if empty or not _same_blocks([b for p in parts for b in got[p].blocks], own.blocks):
            raise ConsolidationError(f"the preserved keys of patch {digest[:12]} are not its constituents' blocks in "
                                     "order" + (f" (patch(es) {empty} hold none)" if empty else "")
                                     + "; nothing was changed")
        if self._store.patch_states([digest]):
            # The same consolidation written before (after a rollback past it, or a retry after a crash
            # between the key state and the version) — possibly as a copy, by a ledger from before
            # references: keep the stored state if it holds these keys.
            if _same_blocks(self.keys_of([digest])[digest].blocks, own.blocks):
                return []
            return self.write_keys({digest: keys})          # refused by the store, naming both blobs
        data = ref_bytes(parts)
        self._keys.put(digest, own)
        return [PatchStateRecord(digest=digest, blob=self._blobs.put(data), blob_size=len(data),
                                 n_blocks=len(own.blocks), created_at=time.time())]

    def keys_of(self, digests: Sequence[str]) -> dict[str, PreservedKeys]:
        """Each patch's own preserved-keys blocks (empty for a patch stored without any). A reference
        (a consolidated patch) is resolved through the patches it names, level by level — one query
        per level, no recursion however deep consolidations nest — and only the states asked for
        are built (a chain of consolidations does not build every level's copy of the blocks)."""
        out = {d: hit for d in digests if (hit := self._keys.get(d)) is not None}
        refs: dict[str, tuple[tuple[str, ...], int]] = {}   # digest -> (the parts its reference names, n_blocks)
        frontier = list(dict.fromkeys(d for d in digests if d not in out))
        while frontier:
            records = self._store.patch_states(frontier)
            blobs = self._blobs.get_many([r.blob for r in records.values()]) if records else {}
            later: list[str] = []
            for d in frontier:
                rec = records.get(d)
                if rec is None:
                    out[d] = PreservedKeys()
                    self._keys.put(d, out[d])
                    continue
                data = blobs[rec.blob]
                try:
                    if is_ref(data):
                        refs[d] = (ref_parts(data, d), rec.n_blocks)
                        for p in refs[d][0]:            # cached states need no query
                            if p not in out and p not in refs and (hit := self._keys.get(p)) is not None:
                                out[p] = hit
                        later += refs[d][0]
                        continue
                    out[d] = state_from_bytes(data, d)
                except PatchMismatchError as exc:
                    raise LedgerCorrupt(str(exc), bad_blobs={rec.blob: str(exc)}) from exc
                self._keys.put(d, out[d])
            frontier = list(dict.fromkeys(p for p in later if p not in out and p not in refs))
        flat: dict[str, tuple[str, ...]] = {}     # a reference -> the loaded states it concatenates, in order
        count: dict[str, int] = {}
        while refs:
            ready = [d for d, (parts, _) in refs.items() if all(p in out or p in flat for p in parts)]
            if not ready:
                raise LedgerCorrupt(f"preserved-keys references of patches {sorted(x[:12] for x in refs)} form a cycle")
            for d in ready:
                parts, n_blocks = refs.pop(d)
                empty = [p[:12] for p in parts if p in out and not out[p].blocks]
                if empty:
                    raise LedgerCorrupt(f"the preserved keys of patch {d[:12]} refer to patch(es) {empty}, which "
                                        "hold none")
                flat[d] = tuple(x for p in parts for x in ((p,) if p in out else flat[p]))
                count[d] = sum(len(out[p].blocks) if p in out else count[p] for p in parts)
                if count[d] != n_blocks:
                    raise LedgerCorrupt(f"the preserved keys of patch {d[:12]} resolve to {count[d]} blocks; its "
                                        f"record says {n_blocks}")
        for d in digests:                          # only what was asked for is built (not every level between)
            if d not in out:
                out[d] = PreservedKeys(tuple(KeyBlock(d, b.layer, b.keys) for x in flat[d] for b in out[x].blocks))
                self._keys.put(d, out[d])
        return {d: out[d] for d in digests}

    # -- base copies ---------------------------------------------------------------------------

    def base_names(self) -> tuple[str, ...]:
        return tuple(self._store.base_copies())

    def base_copy(self, name: str) -> tuple[torch.Tensor, Layout]:
        """The saved original of `name` and its layout."""
        rec = self._store.base_copies().get(name)
        if rec is None:
            raise BaseCopyMissing(f"the ledger holds no base copy of {name!r}")
        return self.load_base(rec), Layout(rec.layout)

    def load_base(self, rec: BaseCopyRecord) -> torch.Tensor:
        from safetensors.torch import load

        tensors = load(self._blobs.get(rec.blob))
        if rec.name not in tensors:
            raise LedgerCorrupt(f"base-copy blob {rec.blob} does not hold {rec.name!r}", bad_blobs={rec.blob: "content"})
        return tensors[rec.name]

    def _write_base(self, name: str, tensor: torch.Tensor, layout: Layout) -> BaseCopyRecord:
        from safetensors.torch import save

        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            raise PatchMismatchError(f"base copy of {name!r} must be a 2-D tensor, got {getattr(tensor, 'shape', tensor)!r}")
        data = save({name: tensor.detach().to("cpu").contiguous().clone()})
        blob = self._blobs.put(data)
        return BaseCopyRecord(name=name, blob=blob, blob_size=len(data), dtype=str(tensor.dtype).replace("torch.", ""),
                              shape=tuple(int(s) for s in tensor.shape), layout=Layout(layout).value,
                              created_at=time.time())

    def ensure_base(self, name: str, tensor: torch.Tensor, layout: Layout = Layout.OUT_IN) -> BaseCopyRecord:
        """Store the original of `name` unless already stored; an offered copy that differs is refused.

        `tensor` must be the *base* model's weight (never one with patches merged in).
        """
        existing = self._store.base_copies().get(name)
        rec = self._write_base(name, tensor, layout)
        if existing is not None:
            if existing.blob != rec.blob:
                raise BaseCopyMismatch(f"base copy of {name!r} is already stored as blob {existing.blob[:16]}; the one "
                                       f"offered hashes to {rec.blob[:16]}")
            return existing
        self._store.add_base_copies([rec])
        return rec

    def bases_for(self, patches: Iterable[Patch], base: Mapping[str, torch.Tensor] | None,
                  base_layout: Layout, error: type[LedgerError] = BaseCopyMissing) -> list[BaseCopyRecord]:
        """Check every touched matrix has a base copy of the right shape; returns new records to insert
        (their blobs written from `base`, the base model's weights in `base_layout`)."""
        stored = self._store.base_copies()
        new: dict[str, BaseCopyRecord] = {}
        for p in patches:
            for d in p.deltas:
                rec = stored.get(d.name) or new.get(d.name)
                if rec is None:
                    if base is None or d.name not in base:
                        raise error(f"no base copy of {d.name!r} is stored; pass base={{name: weight}} with the base "
                                    f"model's weight (or call ledger.weights.ensure_base first)")
                    rec = self._write_base(d.name, base[d.name], base_layout)
                    new[d.name] = rec
                if out_in_shape(rec.shape, rec.layout) != d.shape:
                    raise PatchMismatchError(f"delta for {d.name!r} has shape {d.shape} (d_out, d_in); the base weight "
                                             f"is {rec.shape} in layout {rec.layout}")
        return list(new.values())
