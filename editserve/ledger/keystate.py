"""The preserved-keys state of a ledger version, stored per patch (AlphaEdit, issue 16).

Each committed patch may carry the key blocks it wrote (`alphaedit.KeyBlock`, per layer a
float32 [d_in, n] matrix, tag = the patch's digest). They are stored once per patch as a
content-addressed blob (safetensors of `PreservedKeys.tensors()`) referenced by a
``patch_state`` row (schema migration 2 on both backends). The state of version n is the
blocks of the patches active at n, in their summation (commit) order, so rollback, revert and
restart all rebuild it exactly from the ledger; nothing is a running sum.
"""

from __future__ import annotations

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


def state_from_bytes(data: bytes, digest: str) -> PreservedKeys:
    """The blocks of patch `digest` from its blob; every block must be tagged with `digest`."""
    try:
        keys = PreservedKeys.from_tensors(st_load(data))
    except SafetensorError as exc:
        raise PatchMismatchError(f"preserved-keys blob of patch {digest[:12]} does not load: {exc}") from exc
    wrong = [b.tag[:12] for b in keys.blocks if b.tag != digest]
    if wrong:
        raise PatchMismatchError(f"preserved-keys blob of patch {digest[:12]} holds blocks of other patches {wrong}")
    return keys
