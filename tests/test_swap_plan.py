"""Delta apply messages and materialised checkpoints, without an engine (the engine side is
tests/test_swap_delta.py): a real SQLite ledger, the control plane's `ExpectedChecksums`, the
planner, and the worker's slice accumulation, compared bit for bit with the ledger's own
materialisation from the base copies."""

from __future__ import annotations

import torch

from editserve.editing.requests import EditRequest
from editserve.engine.expected import ExpectedChecksums, checkpoint_root
from editserve.engine.plan import EMPTY, chain_for, chains_of, changed_names, delta_message
from editserve.engine.wire import ApplyMessage, message_for, rank_range
from editserve.engine.worker import accumulate_slice
from editserve.ledger import Ledger, tensor_sha256
from editserve.ledger.checkpoints import CHAIN_ROOT, CheckpointStore, chain_of, read_slice
from editserve.patches import Patch, WeightDelta

FP = "f" * 64
D_OUT, D_IN = 48, 64
NAME = "model.layers.2.mlp.down_proj.weight"
OTHER = "model.layers.1.mlp.down_proj.weight"


def _patch(i: int, name: str = NAME) -> Patch:
    g = torch.Generator().manual_seed(i)
    d = WeightDelta(name=name, layer=int(name.split(".")[2]), u=torch.randn(D_OUT, 1, generator=g) * 0.1,
                    v=torch.randn(D_IN, 1, generator=g))
    return Patch(deltas=(d,), requests=(EditRequest(prompt="{} is", subject=f"S{i}", target_new=" x"),),
                 method="rome", hparams={"i": i}, model_fingerprint=FP, family="llama")


def _ledger(tmp_path, n: int, other_at: tuple[int, ...] = ()) -> tuple[Ledger, list[Patch]]:
    ledger = Ledger.open(tmp_path / "ledger", FP, caller="test")
    g = torch.Generator().manual_seed(99)
    ledger.weights.ensure_base(NAME, torch.randn(D_OUT, D_IN, generator=g))
    ledger.weights.ensure_base(OTHER, torch.randn(D_OUT, D_IN, generator=g))
    patches, head = [], 0
    for i in range(n):
        p = _patch(1000 + i, OTHER) if i in other_at else _patch(i)
        head = ledger.commit(p, expected_head=head, caller="test")
        patches.append(p)
    return ledger, patches


def _want(ledger: Ledger, version: int, name: str, tp: int) -> dict[tuple[str, int], str]:
    w = ledger.weights.materialize(version, names=[name])[name]
    return {(name, r): tensor_sha256(w[:, slice(*rank_range(D_IN, tp, r))]) for r in range(tp)}


def test_incremental_expected_and_checkpoints_are_bit_exact(tmp_path):
    ledger, patches = _ledger(tmp_path, 25, other_at=(3, 11))
    exp = ExpectedChecksums(tensor_parallel_size=2, base_cache_bytes=1 << 20, ledger=ledger, checkpoint_every=5)
    chains: dict = {}
    for v in (1, 2, 9, 10, 17, 25):               # forward: each continues the previous state
        msg = message_for(v, "llama", ledger.active_patches(v))
        chains = chains_of(msg, chains)
        got = exp.of_chains({m.name: m.deltas for m in msg.matrices}, chains, [NAME])
        assert got == _want(ledger, v, NAME, 2), v
    store = exp.checkpoints
    assert store is not None and store.root == checkpoint_root(ledger)
    # Checkpoints at every 5 deltas of NAME (23 of them on NAME): positions 5..20, each the float32
    # accumulator, equal bit for bit to the float32 materialisation at the version holding them.
    name_versions = [i + 1 for i in range(25) if i not in (3, 11)]     # version adding NAME's c-th delta
    assert chains[NAME].count == 23
    for c in (5, 10, 15, 20):
        version = name_versions[c - 1]
        ckpt = store.load(NAME, chains[NAME].hashes[c], c)
        assert ckpt is not None and torch.equal(ckpt, ledger.weights.materialize(version, names=[NAME])[NAME]), c
    # A fresh cache (another process) rolls back from the checkpoint files, still bit-exact.
    fresh = ExpectedChecksums(tensor_parallel_size=2, base_cache_bytes=1 << 20, ledger=ledger, checkpoint_every=5)
    for v in (24, 7, 25, 0):
        msg = message_for(v, "llama", ledger.active_patches(v))
        ch = chains_of(msg, {})
        got = fresh.of_chains({m.name: m.deltas for m in msg.matrices}, ch, [n for n in ch if n == NAME])
        if v:
            assert got == _want(ledger, v, NAME, 2), v


def test_delta_message_carries_only_the_change(tmp_path):
    ledger, _ = _ledger(tmp_path, 30)
    exp = ExpectedChecksums(tensor_parallel_size=1, base_cache_bytes=1 << 20, ledger=ledger, checkpoint_every=10)
    full29 = message_for(29, "llama", ledger.active_patches(29))
    held = chains_of(full29, {})
    exp.of_chains({NAME: full29.matrices[0].deltas}, held, [NAME])          # writes checkpoints 10, 20
    full30 = message_for(30, "llama", ledger.active_patches(30))
    target = chains_of(full30, held)
    assert changed_names(held, target) == (NAME,)
    send = delta_message(full30, target, held, exp.checkpoint_path, (NAME,))
    (m,) = send.matrices
    assert (m.start, len(m.deltas), m.checkpoint) == (29, 1, None)
    assert send.factor_bytes == (D_OUT + D_IN) * 4 and full30.factor_bytes == 30 * (D_OUT + D_IN) * 4
    back = ApplyMessage.from_wire(send.to_wire())
    (b,) = back.matrices
    assert (b.start, b.start_chain, b.checkpoint, back.checksum) == (29, m.start_chain, None, (NAME,))
    assert torch.equal(b.deltas[0].u, m.deltas[0].u) and b.deltas[0].key == m.deltas[0].key
    # Rollback to 25: from the checkpoint at 20, five deltas; restore message of the held state: from 20.
    full25 = message_for(25, "llama", ledger.active_patches(25))
    t25 = chains_of(full25, held)
    (r,) = delta_message(full25, t25, held, exp.checkpoint_path, (NAME,)).matrices
    assert (r.start, len(r.deltas)) == (20, 5) and r.checkpoint and r.start_chain == t25[NAME].hashes[20]
    (u,) = delta_message(full29, held, None, exp.checkpoint_path, (NAME,)).matrices
    assert (u.start, len(u.deltas)) == (20, 9)
    # The worker's arithmetic from the checkpoint slice gives the ledger's materialisation (TP 2 slices).
    w = ledger.weights.materialize(25, names=[NAME])[NAME]
    for rank in range(2):
        lo, hi = rank_range(D_IN, 2, rank)
        acc = read_slice(r.checkpoint, NAME, r.start_chain, r.start, lo, hi)
        accumulate_slice(acc, r.deltas, lo, hi, D_IN, NAME)
        assert torch.equal(acc, w[:, lo:hi].contiguous())
    # A matrix leaving the target (back to its base) is expected to hash as the base copy.
    assert exp.of_chains({}, {}, [NAME]) == {(NAME, 0): tensor_sha256(ledger.weights.base_copy(NAME)[0])}
    # Chains extend instead of being recomputed, and agree with a recomputation.
    assert chain_for(t25[NAME].keys, None) == t25[NAME] and chain_for((), held[NAME]) == EMPTY


def test_checkpoint_store_refuses_damaged_or_foreign_files(tmp_path):
    store = CheckpointStore(tmp_path / "ck", every=2)
    acc = torch.randn(4, 6)
    chain = chain_of(["a:0", "b:0"])
    path = store.save(NAME, chain[2], 2, acc)
    assert torch.equal(store.load(NAME, chain[2], 2), acc)
    assert store.latest(NAME, chain, 2) == 2 and store.latest(NAME, chain, 1) is None
    assert chain[0] == CHAIN_ROOT
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF                                # flip bits of the tensor's last element
    path.write_bytes(bytes(data))
    assert store.load(NAME, chain[2], 2) is None
    try:
        read_slice(path, OTHER, chain[2], 2, 0, 3)
    except ValueError as exc:
        assert OTHER in str(exc)
    else:
        raise AssertionError("a checkpoint of another matrix was accepted")


def _same(a: ApplyMessage, b: ApplyMessage) -> bool:
    return [(m.name, m.layer, [d.key for d in m.deltas]) for m in a.matrices] == \
        [(m.name, m.layer, [d.key for d in m.deltas]) for m in b.matrices] and all(
        torch.equal(x.u, y.u) and torch.equal(x.v, y.v)
        for ma, mb in zip(a.matrices, b.matrices) for x, y in zip(ma.deltas, mb.deltas))


def test_target_messages_reuse_the_served_factors(tmp_path):
    """`SwapOrchestration._target_message` / `_message_adding` (the control plane's, on a real
    ledger) equal `message_for` of the ledger's active patches: following the head, rolling
    back, moving to another branch, adding a patch."""
    from editserve.engine.orchestration import Served, SwapOrchestration

    ledger, _ = _ledger(tmp_path, 12, other_at=(4,))
    plane = SwapOrchestration()
    plane.ledger, plane.family = ledger, "llama"
    served = message_for(8, "llama", ledger.active_patches(8))
    plane.served = Served(version=8, message=served, expected={})
    for v in (12, 8, 3, 0):
        msg, ids = plane._target_message(v)
        assert ids == ledger.active_ids(v) and _same(msg, message_for(v, "llama", ledger.active_patches(v))), v
    ledger.rollback(5, caller="test")
    branch = ledger.commit(_patch(500), expected_head=5, caller="test")           # a version off the main line
    msg, ids = plane._target_message(branch)
    assert _same(msg, message_for(branch, "llama", ledger.active_patches(branch)))
    extra = _patch(501, OTHER)
    msg, ids = plane._message_adding(8, [extra])
    assert ids == ledger.active_ids(8) + (extra.digest,)
    assert _same(msg, message_for(-1, "llama", ledger.active_patches(8) + [extra]))


def test_hold_patches_is_incremental_and_bit_exact():
    """The sidecar's merge (`editserve.patches.hold_patches`) on a tiny GPT-2 (Conv1D: the
    transposed layout) and a tiny Llama: appending, rolling back and moving to another list give
    the weights of `materialize` from the base copies, bit for bit."""
    from editserve.patches import applied_patches, hold_patches, materialize
    from tests.tiny import tiny_model

    for model in (tiny_model("llama"), tiny_model("gpt2")):
        from editserve.editing.arch import spec_for

        spec = spec_for(model)
        params = dict(model.named_parameters())
        name = spec.weight_name(1)
        base = params[name].detach().clone()
        d_out, d_in = (base.shape if spec.hf_layout.value == "out_in" else base.t().shape)
        g = torch.Generator().manual_seed(3)
        ps = [Patch(deltas=(WeightDelta(name=name, layer=1, u=torch.randn(d_out, 1, generator=g) * 0.1,
                                        v=torch.randn(d_in, 1, generator=g)),),
                    requests=(EditRequest(prompt="{} is", subject=f"S{i}", target_new=" x"),), method="rome",
                    hparams={"i": i}, model_fingerprint=FP, family=spec.family) for i in range(12)]
        for target in (ps[:5], ps[:6], ps[:12], ps[:3], ps[:3] + ps[7:9], [], ps[:4]):
            hold_patches(model, target)
            want = materialize(base, [p.deltas[0] for p in target], spec.hf_layout)
            assert torch.equal(params[name].detach(), want) and list(applied_patches(model)) == target
