"""The preserved-keys state of a ledger version, stored per patch (AlphaEdit, issue 16).

Each committed patch may carry the key blocks it wrote (`alphaedit.KeyBlock`, per layer a
float32 [d_in, n] matrix, tag = the patch's digest). They are stored once per patch as a
content-addressed blob (safetensors of `PreservedKeys.tensors()`) referenced by a
``patch_state`` row (schema migration 2 on both backends). The state of version n is the
blocks of the patches active at n, in their summation (commit) order, so rollback, revert and
restart all rebuild it exactly from the ledger; nothing is a running sum.

A consolidated patch's blocks are its constituents' blocks, in order, retagged with its digest
(`editserve.ledger.consolidation`). Copying them would store every committed key again at each
consolidation — disk quadratic in the ledger when it consolidates every K edits. Its blob is
instead a *reference*: ``REF_MAGIC`` then the JSON list of the constituent digests, whose own
states (blobs or references, in turn) hold the keys; reading resolves it
(`LedgerObjects.keys_of`), so the state is the same bit for bit, and exports carry it resolved.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from editserve.editing.alphaedit import PreservedKeys
from editserve.errors import PatchMismatchError


def state_bytes(keys: PreservedKeys) -> bytes:
    """Serialise the blocks of one patch (safetensors; names keep the block order). No metadata:
    safetensors writes metadata keys in hash order, and the bytes must be a function of the blocks
    (content-addressed blob, stored once per patch)."""
    return st_save(keys.tensors())


REF_MAGIC = b"editserve-keyref/1\n"   # never the start of a safetensors file (its first 8 bytes are a
                                        # little-endian header length: these would claim ~7e18 bytes)


def ref_bytes(parts: Sequence[str]) -> bytes:
    """The blob of a state that is the concatenation of the states of patches `parts`, in order."""
    if not parts:
        raise PatchMismatchError("a preserved-keys reference needs at least one constituent patch")
    return REF_MAGIC + json.dumps([str(p) for p in parts], separators=(",", ":")).encode()


def is_ref(data: bytes) -> bool:
    return data.startswith(REF_MAGIC)


def ref_parts(data: bytes, digest: str) -> tuple[str, ...]:
    """The constituent digests a reference blob of patch `digest` names (not itself, each once)."""
    try:
        parts = json.loads(data[len(REF_MAGIC):].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PatchMismatchError(f"preserved-keys reference of patch {digest[:12]} does not parse: {exc}") from exc
    if (not isinstance(parts, list) or not parts or not all(isinstance(p, str) and p for p in parts)
            or len(set(parts)) != len(parts) or digest in parts):
        raise PatchMismatchError(f"preserved-keys reference of patch {digest[:12]} must list distinct other "
                                 f"patches, got {str(parts)[:200]}")
    return tuple(parts)


def state_from_bytes(data: bytes, digest: str) -> PreservedKeys:
    """The blocks of patch `digest` from its blob; every block must be tagged with `digest`."""
    if is_ref(data):
        raise PatchMismatchError(f"preserved-keys blob of patch {digest[:12]} is a reference; resolve it "
                                 "through LedgerObjects.keys_of")
    try:
        keys = PreservedKeys.from_tensors(st_load(data))
    except SafetensorError as exc:
        raise PatchMismatchError(f"preserved-keys blob of patch {digest[:12]} does not load: {exc}") from exc
    wrong = [b.tag[:12] for b in keys.blocks if b.tag != digest]
    if wrong:
        raise PatchMismatchError(f"preserved-keys blob of patch {digest[:12]} holds blocks of other patches {wrong}")
    return keys
