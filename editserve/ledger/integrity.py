"""The ledger's integrity check: is every record consistent and every blob present and intact?

`integrity_report` reads the store's own consistency check, then every base-copy, patch and
preserved-keys blob (by size, or also by hash in "full" mode; `deep` also loads each patch and
checks its digest, and each key block), and marks as damaged every version whose active patches
include a bad one (directly, through a bad base copy of a matrix it touches, or through a bad key
state — a consolidated patch's keys are a reference to its constituents', so theirs count too).
`IntegrityReport.last_good` is the newest version on the head's line that is not damaged: what
`Ledger.open(strict=False)` still serves and rolls back to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from editserve.errors import InvalidRequestError, NonFiniteError, PatchMismatchError
from editserve.ledger.blobs import BlobStore
from editserve.ledger.consolidation import CONSOLIDATED_METHOD
from editserve.ledger.errors import LedgerCorrupt
from editserve.ledger.keystate import is_ref, ref_parts, state_from_bytes
from editserve.ledger.objects import patch_from_bytes
from editserve.ledger.store import ADD, LedgerStore, PatchStateRecord

VERIFY_MODES = ("full", "quick", "none")


@dataclass(frozen=True)
class IntegrityReport:
    head: int
    versions: int
    patches: int
    base_copies: int
    blobs_checked: int
    mode: str
    bad_blobs: dict[str, str]
    bad_versions: tuple[int, ...]
    last_good: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.bad_blobs and not self.problems

    def describe(self) -> str:
        if self.ok:
            return (f"ledger intact: {self.versions} versions, head {self.head}, {self.patches} patches, "
                    f"{self.base_copies} base copies, {self.blobs_checked} blobs checked ({self.mode})")
        parts = list(self.problems)
        parts += [f"blob {b} {why}" for b, why in sorted(self.bad_blobs.items())]
        if self.bad_versions:
            shown = ", ".join(map(str, self.bad_versions[:20])) + (" ..." if len(self.bad_versions) > 20 else "")
            parts.append(f"damaged versions: {shown}")
        parts.append(f"head is {self.head}; last good version on its line is {self.last_good}")
        return "; ".join(parts)


def integrity_report(store: LedgerStore, blobs: BlobStore, mode: str = "full", deep: bool = False) -> IntegrityReport:
    """Check the database and every blob (module docstring)."""
    if mode not in VERIFY_MODES[:2]:
        raise InvalidRequestError(f"mode must be 'full' or 'quick', got {mode!r}")
    problems = list(store.check_consistency())
    patches = store.patches()
    bases = store.base_copies()
    states = store.patch_states([p.digest for p in patches])
    bad_blobs: dict[str, str] = {}
    checked = blobs.check_many([(b.blob, b.blob_size) for b in bases.values()]
                               + [(p.blob, p.blob_size) for p in patches]
                               + [(st.blob, st.blob_size) for st in states.values()], mode == "full")
    for b in bases.values():
        why = checked.get(b.blob)
        if why:
            bad_blobs[b.blob] = f"{why} (base copy of {b.name})"
    bad_base = {b.name for b in bases.values() if b.blob in bad_blobs}
    bad_patch = set()
    for p in patches:
        why = checked.get(p.blob)
        if why:
            bad_blobs[p.blob] = f"{why} (factors of patch {p.digest[:12]})"
        elif deep:
            try:
                loaded = patch_from_bytes(blobs.get(p.blob), p.manifest)
                if loaded.digest != p.digest:
                    bad_blobs[p.blob] = f"content hashes to patch {loaded.digest[:12]}, not {p.digest[:12]}"
            except (PatchMismatchError, NonFiniteError, LedgerCorrupt) as exc:
                bad_blobs[p.blob] = f"does not load as patch {p.digest[:12]}: {exc}"
        if p.blob in bad_blobs or any(w["name"] in bad_base for w in p.manifest.get("weights", [])):
            bad_patch.add(p.digest)
    consolidated = {p.digest for p in patches if p.manifest.get("method") == CONSOLIDATED_METHOD}
    bad_patch |= _bad_key_states(blobs, states, checked, consolidated, deep, bad_blobs)
    records = store.versions()
    bad_count: dict[int, int] = {}             # bad patches active at each version
    parents: dict[int, int | None] = {}
    for r in records:
        n = bad_count.get(r.parent, 0) if r.parent is not None else 0
        for op, d in r.ops:
            if d in bad_patch:
                n += 1 if op == ADD else -1
        bad_count[r.version] = n
        parents[r.version] = r.parent
    bad_versions = tuple(v for v, n in bad_count.items() if n > 0)
    try:
        head = store.head()
    except LedgerCorrupt as exc:
        problems.append(str(exc))
        head = -1
    last_good, v = 0, head if head in parents else None
    while v is not None:
        if bad_count[v] == 0:
            last_good = v
            break
        v = parents[v]
    return IntegrityReport(head=head, versions=len(records), patches=len(patches), base_copies=len(bases),
                           blobs_checked=len(patches) + len(bases) + len(states), mode=mode, bad_blobs=bad_blobs,
                           bad_versions=bad_versions, last_good=last_good, problems=tuple(problems))


def _bad_key_states(blobs: BlobStore, states: Mapping[str, PatchStateRecord], checked: dict[str, str],
                    consolidated: set[str], deep: bool, bad_blobs: dict[str, str]) -> set[str]:
    """Patches whose preserved keys cannot be read back: their own blob is bad, or (a consolidated
    patch's reference) one of the patches it names has bad or no keys. Adds the bad blobs found."""
    bad: set[str] = set()
    refs: dict[str, tuple[str, ...]] = {}
    for d, st in states.items():
        why = checked.get(st.blob)
        if why:
            bad_blobs[st.blob] = f"{why} (preserved keys of patch {d[:12]})"
            bad.add(d)
            continue
        if d not in consolidated and not deep:
            continue
        try:
            data = blobs.get(st.blob, verify=False)
            if is_ref(data):
                refs[d] = ref_parts(data, d)
                missing = [p[:12] for p in refs[d] if p not in states]
                if missing:
                    bad_blobs[st.blob] = f"refers to patch(es) {missing} without preserved keys (keys of patch {d[:12]})"
                    bad.add(d)
            elif deep:
                state_from_bytes(data, d)
        except (PatchMismatchError, LedgerCorrupt) as exc:
            bad_blobs[st.blob] = f"does not load as the preserved keys of patch {d[:12]}: {exc}"
            bad.add(d)
    grew = True
    while grew:                                 # a reference to bad keys is bad, through nested consolidations
        new = {d for d, parts in refs.items() if d not in bad and any(p in bad for p in parts)}
        bad |= new
        grew = bool(new)
    return bad
