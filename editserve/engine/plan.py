"""What a version change sends: delta apply messages cut from a full target state.

The control plane knows, per matrix, the delta sequence the workers hold (`MatrixChain`: the
keys and their chain hashes, `editserve.ledger.checkpoints`). For a target version it builds
the full message (`editserve.engine.wire.message_for`: references to every factor, nothing
encoded) and `delta_message` cuts it down to what the workers need:

- a matrix whose held sequence is a prefix of the target's: the new deltas only (one patch's
  factors for an edit, whatever the number of earlier ones);
- otherwise (a rollback, a revert, a restore after a failed swap), or when a materialised
  checkpoint of the target sequence lies more than `CHECKPOINT_MIN_GAIN` deltas past the
  workers' state (a jump forward): the deltas after the latest checkpoint, naming its file,
  or all of them from the base when there is none (the first visit of a long sequence);
- a matrix whose sequence does not change: named with no factors (so that "not named" keeps
  meaning "back to the base"), and not checksummed.

`changed_names` is the set the swap verifies: matrices whose sequence differs between the
held and the target state. Chains of a long sequence are extended, not recomputed, when the
new sequence continues a known one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from editserve.engine.wire import ApplyMessage, MatrixTarget
from editserve.ledger.checkpoints import CHAIN_ROOT, chain_of, chain_step

# (matrix name, its target chain) → (checkpointed position c ≥ 1, file), or None
Anchor = Callable[[str, "MatrixChain"], tuple[int, str] | None]
# A checkpoint replaces the workers' own state as the start only when it saves more deltas than
# this (reading a file costs about as much as a few rank-r updates).
CHECKPOINT_MIN_GAIN = 8


@dataclass(frozen=True)
class MatrixChain:
    """The delta sequence of one matrix: keys in order and the chain hash at every position."""

    keys: tuple[str, ...]
    hashes: tuple[str, ...]          # len(keys) + 1; hashes[i] names keys[:i], hashes[0] the base

    @property
    def count(self) -> int:
        return len(self.keys)

    @property
    def head(self) -> str:
        return self.hashes[-1]


EMPTY = MatrixChain(keys=(), hashes=(CHAIN_ROOT,))


def chain_for(keys: tuple[str, ...], known: MatrixChain | None) -> MatrixChain:
    """The chain of `keys`, reusing `known` when one is a prefix of the other."""
    if known is not None:
        n = len(known.keys)
        if n <= len(keys) and keys[:n] == known.keys:
            hashes = list(known.hashes)
            for k in keys[n:]:
                hashes.append(chain_step(hashes[-1], k))
            return MatrixChain(keys=keys, hashes=tuple(hashes))
        if n > len(keys) and known.keys[:len(keys)] == keys:
            return MatrixChain(keys=keys, hashes=known.hashes[:len(keys) + 1])
    return MatrixChain(keys=keys, hashes=tuple(chain_of(keys)))


def chains_of(message: ApplyMessage, known: Mapping[str, MatrixChain]) -> dict[str, MatrixChain]:
    """The chain of every matrix of a full message (`message_for`)."""
    return {m.name: chain_for(tuple(d.key for d in m.deltas), known.get(m.name)) for m in message.matrices}


def changed_names(held: Mapping[str, MatrixChain], target: Mapping[str, MatrixChain]) -> tuple[str, ...]:
    """Matrices whose delta sequence differs between the two states (absent = the base)."""
    names = set(held) | set(target)
    return tuple(sorted(n for n in names if held.get(n, EMPTY).head != target.get(n, EMPTY).head))


def delta_message(full: ApplyMessage, target: Mapping[str, MatrixChain], held: Mapping[str, MatrixChain] | None,
                  anchor: Anchor, checksum: tuple[str, ...]) -> ApplyMessage:
    """`full` cut down to what workers holding `held` need (see the module docstring). With
    `held` None the workers' state is unknown (a restore): every matrix starts at a checkpoint
    or the base (a rank already in the target state skips it). A checkpoint is used only when
    the workers' own state is not a prefix of the target (or is the base)."""
    matrices = []
    for m in full.matrices:
        chain = target[m.name]
        n = chain.count
        start = 0
        if held is not None:
            h = held.get(m.name, EMPTY)
            if h.count <= n and chain.hashes[h.count] == h.head:
                start = h.count                     # the workers are on the way: send the rest
        checkpoint = None
        if n - start > CHECKPOINT_MIN_GAIN or (start == 0 and n > 0):
            found = anchor(m.name, chain)
            if found is not None and found[0] > start and (start == 0 or found[0] - start > CHECKPOINT_MIN_GAIN):
                start, checkpoint = found
        matrices.append(MatrixTarget(name=m.name, layer=m.layer, deltas=m.deltas[start:], start=start,
                                     start_chain=chain.hashes[start], checkpoint=checkpoint))
    return ApplyMessage(version=full.version, family=full.family, matrices=tuple(matrices), checksum=checksum)
