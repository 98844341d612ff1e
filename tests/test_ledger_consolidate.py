"""Consolidation as a ledger operation (editserve/ledger/consolidation.py), on SQLite and PostgreSQL.

Synthetic patches on two 64×32 matrices, each with its own preserved-keys blocks, plus one patch
without keys. The consolidation version replaces the keyed patches by one patch that gives the
same outputs on every committed key with a smaller disturbance, keeps the unkeyed patch, carries
the keys; a rollback to the version before restores its weights and keys bit for bit; stale or
repeated requests and a rebase through the consolidated patch are refused or replayed; a rebase of a
fact that a consolidation took in re-solves that consolidation and recomputes the later patches.
(The real-model path, ``editserve ledger consolidate`` on SmolLM2, is in test_lifelong_smollm2.py.)
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tests._ledger_util import FP, NAME, NAME2, SHAPE, Backend, backend, base_weights, synth_patch  # noqa: F401
from tests._pg import pg_server  # noqa: F401

from editserve.editing.alphaedit import KeyBlock, PreservedKeys
from editserve.editing.consolidate import ConsolidateParams
from editserve.errors import InvalidRequestError
from editserve.ledger import ConsolidationError, Ledger, LedgerConflict, RebaseOutcome, RevertError
from editserve.ledger.keystate import is_ref, state_bytes
from editserve.ledger.consolidation import (
    CONSOLIDATED_METHOD,
    constituents_at,
    plan_consolidation,
    RemovalCheck,
    plan_fact_removal,
    provenance,
)

D_OUT, D_IN = SHAPE


def _keys(patch, seed: int, n: int = 2) -> PreservedKeys:
    g = torch.Generator().manual_seed(1000 + seed)
    state = PreservedKeys()
    for d in patch.deltas:
        state = state.add(patch.digest, d.layer, torch.randn(D_IN, n, generator=g))
    return state


def _covs(layers) -> dict[int, torch.Tensor]:
    out = {}
    for layer in layers:
        g = torch.Generator().manual_seed(50 + layer)
        x = torch.randn(D_IN, 4 * D_IN, generator=g, dtype=torch.float64)
        out[layer] = x @ x.T / x.shape[1]
    return out


def _build(ledger: Ledger) -> list:
    """Versions 1–4: keyed (both matrices), unkeyed (matrix 0), keyed (matrix 0), keyed (matrix 1)."""
    base = base_weights()
    p1 = synth_patch(1, names=(NAME, NAME2))
    p2 = synth_patch(2)
    p3 = synth_patch(3)
    p4 = synth_patch(4, names=(NAME2,))
    ledger.commit(p1, expected_head=0, base=base, preserved=_keys(p1, 1))
    ledger.commit(p2, expected_head=1)                                   # no keys: stays as it is
    ledger.commit(p3, expected_head=2, preserved=_keys(p3, 3))
    ledger.commit(p4, expected_head=3, preserved=_keys(p4, 4, n=3))
    return [p1, p2, p3, p4]


def test_consolidation_version_keeps_key_outputs_and_rolls_back_exactly(backend: Backend) -> None:
    loc = backend.location()
    with Ledger.open(loc, FP, create=True) as ledger:
        p1, p2, p3, p4 = _build(ledger)
        assert constituents_at(ledger, 4) == [(p1.digest, 1), (p3.digest, 3), (p4.digest, 4)]
        before = ledger.weights.materialize(4)
        state = ledger.preserved_keys(4)
        plan = plan_consolidation(ledger, _covs, ConsolidateParams(ridge=0.1))
        assert plan.head == 4 and plan.patch.method == CONSOLIDATED_METHOD
        assert plan.patch.requests == p1.requests + p3.requests + p4.requests
        assert {x.layer: (x.n_patches, x.n_keys) for x in plan.layers} == {0: (2, 4), 1: (2, 5)}
        assert all(x.penalty_after < x.penalty_before for x in plan.layers)

        v = ledger.consolidate(plan, caller="test", idempotency_key="cons-1")
        assert v == 5
        info = ledger.version(v)
        assert info.kind == "consolidate" and info.patch_id == plan.patch.digest
        assert set(info.removed) == {p1.digest, p3.digest, p4.digest} and info.added == (plan.patch.digest,)
        assert [c["version"] for c in info.details["constituents"]] == [1, 3, 4]
        assert ledger.active_ids(v) == (p2.digest, plan.patch.digest)
        # the same keys, in the same order, now stored with the consolidated patch
        after_state = ledger.preserved_keys(v)
        assert after_state.tags == (plan.patch.digest,)
        for layer in (0, 1):
            assert torch.equal(after_state.keys(layer), state.keys(layer))
        # each matrix's output on each committed key is unchanged; elsewhere the update is smaller
        after = ledger.weights.materialize(v)
        base = base_weights()
        for name, layer in ((NAME, 0), (NAME2, 1)):
            k = state.keys(layer).double()
            moved = (after[name].double() - before[name].double()) @ k
            edited = (before[name].double() - base[name].double()) @ k
            assert moved.abs().max() <= 1e-4 * edited.abs().max(), name
            assert not torch.equal(after[name], before[name])
        assert ledger.check_integrity().ok

        # a repeated call replays; a plan for an old head is refused; nothing new is written
        assert ledger.consolidate(plan, caller="test", idempotency_key="cons-1") == v
        with pytest.raises(LedgerConflict):
            ledger.consolidate(plan, caller="test")
        assert ledger.head() == v

        # rollback to the version before: its weights and keys, bit for bit
        ledger.rollback(4)
        again = ledger.weights.materialize(4)
        assert all(torch.equal(again[n], before[n]) for n in before)
        assert ledger.preserved_keys().blocks == state.blocks
        ledger.rollback(v)

    # a restart (fresh open, empty caches) reads the consolidated patch and its keys back
    with Ledger.open(loc, FP) as reopened:
        assert reopened.head() == v and reopened.patch(plan.patch.digest).digest == plan.patch.digest
        assert torch.equal(reopened.preserved_keys(v).keys(1), state.keys(1))
        assert torch.equal(reopened.weights.materialize(v)[NAME], after[NAME])


def test_consolidation_refusals(backend: Backend) -> None:
    with Ledger.open(backend.location(), FP, create=True) as ledger:
        p1, p2, p3, p4 = _build(ledger)
        # fewer than two keyed patches: nothing to consolidate
        with pytest.raises(ConsolidationError, match="at least 2"):
            plan_consolidation(ledger, _covs, expected_head=2)
        # the across-layers re-solve breaks committed facts (docs/lifelong.md): not a ledger operation
        with pytest.raises(ConsolidationError, match="across_layers"):
            plan_consolidation(ledger, _covs, ConsolidateParams(across_layers=True))
        plan = plan_consolidation(ledger, _covs)
        # a plan whose preserved keys are not its constituents' blocks in order (one key changed, or a
        # block missing) is refused, writing no key state: the state after a consolidation must hold
        # exactly the keys of the state before
        blocks = list(plan.keys.blocks)
        changed = blocks[:-1] + [KeyBlock(blocks[-1].tag, blocks[-1].layer, blocks[-1].keys + 1)]
        for bad in (changed, blocks[:-1]):
            with pytest.raises(ConsolidationError, match="not its constituents' blocks in order"):
                ledger.consolidate(replace(plan, keys=PreservedKeys(tuple(bad))), caller="test")
            assert ledger.head() == 4 and not ledger.store.patch_states([plan.patch.digest])
        v = ledger.consolidate(plan, caller="test")
        # a rebase would have to recompute the consolidated patch: refused, naming the way out
        with pytest.raises(RevertError, match="consolidates earlier patches"):
            ledger.revert(2, rebase=lambda step: step.old_patch, expected_head=v)
        assert ledger.head() == v
        # a plain revert of the consolidation removes every fact it holds
        res = ledger.revert(v, caller="test")
        assert ledger.active_ids(res.version) == (p2.digest,)
        assert ledger.preserved_keys(res.version).blocks == ()
        # a plan whose constituents are gone is refused
        ledger.rollback(4)
        stale = plan_consolidation(ledger, _covs)
        ledger.revert(3, caller="test")
        with pytest.raises(ConsolidationError, match="not active"):
            ledger.consolidate(replace(stale, head=ledger.head()), caller="test")
        assert ledger.active_ids() == (p1.digest, p2.digest, p4.digest)


def test_reverting_a_consolidated_fact_names_the_consolidation(backend: Backend) -> None:
    """A fact whose patch a consolidation took in is not active any more: reverting its version (plain
    or with rebase) is refused with the version of the consolidation that holds it — also through a
    second consolidation that took in the first — and how to undo it; nothing is written."""
    with Ledger.open(backend.location(), FP, create=True) as ledger:
        p1, p2, p3, p4 = _build(ledger)
        v5 = ledger.consolidate(plan_consolidation(ledger, _covs), caller="test")
        assert ledger.consolidated_into(p1.digest) == v5 and ledger.consolidated_into(p4.digest) == v5
        assert ledger.consolidated_into(p2.digest) is None            # unkeyed: still active on its own
        for call in (lambda: ledger.revert(1, caller="test"),
                     lambda: ledger.revert(3, rebase=lambda step: step.old_patch, caller="test")):
            with pytest.raises(RevertError, match=rf"version {v5} consolidated it with other patches into one; .* "
                                                  r"roll back to version 4 "):
                call()
        assert ledger.head() == v5
        # a later keyed patch and a second consolidation that takes in the first one (whole)
        p5 = synth_patch(5)
        v6 = ledger.commit(p5, expected_head=v5, preserved=_keys(p5, 5))
        v7 = ledger.consolidate(plan_consolidation(ledger, _covs, whole=True), caller="test")
        assert ledger.version(v7).details["constituents"][0]["version"] == v5
        assert ledger.consolidated_into(p1.digest) == v7 and ledger.consolidated_into(p5.digest) == v7
        assert ledger.consolidated_into(p1.digest, v5) == v5 and ledger.consolidated_into(p5.digest, v6) is None
        with pytest.raises(RevertError, match=rf"version {v7} consolidated it .*through version {v5}.* roll back "
                                              rf"to version 4 .* revert version {v7} to remove every fact"):
            ledger.revert(1, caller="test")
        with pytest.raises(RevertError, match=rf"version {v7} consolidated it with other patches into one; .* "
                                              rf"roll back to version {v6} "):
            ledger.revert(v6, caller="test")              # p5: taken in by v7 directly
        # a patch removed by a plain revert is not active either, and no consolidation is named
        ledger.rollback(4)
        ledger.revert(3, caller="test")
        with pytest.raises(RevertError, match=r"not active at version \d+$"):
            ledger.revert(3, caller="test")


def _delta(patch, layer: int) -> torch.Tensor:
    d = next(d for d in patch.deltas if d.layer == layer)
    return d.u.double() @ d.v.double().T


def test_reverting_one_fact_out_of_a_consolidation(backend: Backend, capsys) -> None:
    """Reverting a version whose patch a consolidation took in re-solves the consolidated patch
    without that patch's facts: the others keep their outputs on their keys, the reverted keys get
    the output from before the consolidation, one revert version swaps the patches, the keys follow,
    a rollback restores the version before bit for bit — also through a second consolidation. The
    re-solved patch's keys are stored as a reference to the commits whose keys it keeps."""
    from editserve.cli import main

    loc = backend.location()
    with Ledger.open(loc, FP, create=True) as ledger:
        p1, p2, p3, p4 = _build(ledger)
        cons = plan_consolidation(ledger, _covs)
        v5 = ledger.consolidate(cons, caller="test")
        before, state = ledger.weights.materialize(v5), ledger.preserved_keys(v5)
        assert provenance(ledger, cons.patch.digest) == (
            (p1.digest, p3.digest, p4.digest), (p1.digest, p1.digest, p3.digest, p4.digest))

        with pytest.raises(RevertError, match="revert it directly"):
            plan_fact_removal(ledger, _covs, 2)                        # p2 is active on its own
        with pytest.raises(RevertError, match="--from-consolidation"):
            ledger.revert(3, caller="test")                            # the plain revert says how
        plan = plan_fact_removal(ledger, _covs, 3)
        assert (plan.head, plan.holder, plan.holder_version, plan.removed) == (v5, cons.patch.digest, v5, p3.digest)
        assert plan.patch.requests == p1.requests + p4.requests
        assert plan.patch.hparams["without"] == [p3.digest]
        assert {x.layer: x.n_keys for x in plan.layers} == {0: 2, 1: 5}          # p3's 2 keys at layer 0 dropped
        res = ledger.revert_consolidated(plan, caller="test", idempotency_key="rm-3")
        v6 = res.version
        info = ledger.version(v6)
        assert (info.kind, info.patch_id, info.removed, info.added) == (
            "revert", plan.patch.digest, (cons.patch.digest,), (plan.patch.digest,))
        assert info.details["reverted"] == 3 and info.details["mode"] == "consolidated"
        assert ledger.active_ids(v6) == (p2.digest, plan.patch.digest)
        assert ledger.revert_consolidated(plan, caller="test", idempotency_key="rm-3").version == v6   # replay
        with pytest.raises(LedgerConflict):
            ledger.revert_consolidated(plan, caller="test")                                             # old head

        # the re-solved patch's keys are a reference to the committed patches it keeps, not a copy
        assert plan.key_parts == (p1.digest, p4.digest)
        rec = ledger.store.patch_states([plan.patch.digest])[plan.patch.digest]
        assert is_ref(ledger.blobs.get(rec.blob)) and rec.n_blocks == len(plan.keys.blocks)
        assert rec.blob_size < len(state_bytes(plan.keys)) / 4        # names two patches, copies no key
        # outputs: kept keys as before, the reverted patch's keys as without any consolidated update
        k_new = ledger.preserved_keys(v6)
        assert k_new.tags == (plan.patch.digest,)
        assert torch.equal(k_new.keys(0), torch.cat([_keys(p1, 1).keys(0)], dim=1))
        assert torch.equal(k_new.keys(1), state.keys(1))
        old0, new0 = _delta(cons.patch, 0), _delta(plan.patch, 0)
        kept0, gone0 = _keys(p1, 1).keys(0).double(), _keys(p3, 3).keys(0).double()
        assert (new0 @ kept0 - old0 @ kept0).abs().max() <= 1e-4 * (old0 @ kept0).abs().max()
        assert (new0 @ gone0).abs().max() <= 1e-4 * (old0 @ gone0).abs().max()
        old1, new1 = _delta(cons.patch, 1), _delta(plan.patch, 1)           # no p3 key there: same outputs
        k1 = state.keys(1).double()
        assert (new1 @ k1 - old1 @ k1).abs().max() <= 1e-4 * (old1 @ k1).abs().max()
        assert ledger.consolidated_into(p3.digest) is None and ledger.consolidated_into(p1.digest) == v6
        assert main(["ledger", "versions", "--ledger", loc]) == 0
        assert "revert of version 3, out of the consolidation of version 5 (2 requests stay)" in capsys.readouterr().out
        with pytest.raises(RevertError, match=r"not active at version \d+$"):
            ledger.revert(3, caller="test")                            # already out: nothing names a holder
        # the local command refuses a bad share before it loads a model, and --max-drop without a consolidation
        assert main(["ledger", "revert", "1", "--from-consolidation", "--max-drop", "2", "--ledger", loc]) == 2
        assert "max_drop must be a share in [0, 1], got 2.0" in capsys.readouterr().err
        assert main(["ledger", "revert", "2", "--max-drop", "0.1", "--ledger", loc]) == 2
        assert "--max-drop applies to a revert out of a consolidation" in capsys.readouterr().err
        assert main(["ledger", "consolidate", "--max-drop", "-1", "--ledger", loc]) == 2
        assert "got -1.0" in capsys.readouterr().err
        assert ledger.head() == v6
        with pytest.raises(RevertError, match="not active"):
            plan_fact_removal(ledger, _covs, 3)
        assert ledger.check_integrity().ok

        # nested: a later patch and a second, whole consolidation; p1 taken out of it
        p5 = synth_patch(5)
        v7 = ledger.commit(p5, expected_head=v6, preserved=_keys(p5, 5))
        v8 = ledger.consolidate(plan_consolidation(ledger, _covs, whole=True), caller="test")
        holder = ledger.version(v8).patch_id
        assert provenance(ledger, holder)[0] == (p1.digest, p4.digest, p5.digest)
        nested = plan_fact_removal(ledger, _covs, 1)
        assert nested.holder_version == v8 and nested.patch.requests == p4.requests + p5.requests
        v9 = ledger.revert_consolidated(nested, caller="test").version
        assert nested.key_parts == (p4.digest, p5.digest)      # through the whole consolidation, to the commits
        with Ledger.open(loc, FP) as cold:                      # the references resolved with cold caches
            for v in (v6, v9):
                got, want = cold.preserved_keys(v), ledger.preserved_keys(v)
                assert got.tags == want.tags and len(got.blocks) == len(want.blocks)
                assert all(torch.equal(a.keys, b.keys) for a, b in zip(got.blocks, want.blocks))
        assert provenance(ledger, nested.patch.digest) == (
            (p4.digest, p5.digest), (p4.digest, p5.digest))
        assert ledger.consolidated_into(p4.digest) == v9 and ledger.consolidated_into(p1.digest) is None
        # reverting the re-solved patch's version removes every fact it still holds
        assert ledger.active_ids(ledger.revert(v9, caller="test").version) == (p2.digest,)

        # rollback: the version before the first removal, weights and keys bit for bit
        ledger.rollback(v5)
        again = ledger.weights.materialize(v5)
        assert all(torch.equal(again[n], before[n]) for n in before)
        assert ledger.preserved_keys().blocks == state.blocks
        assert v7 == v6 + 1


def test_edits_since_the_last_consolidation_and_the_policy(tmp_path) -> None:
    """What automatic consolidation counts (editserve/engine/autoconsolidate.py): the facts of the
    active patches after the newest consolidated one (a batch counts each of its facts, as the
    benchmark's --consolidate-every does), counting stopped at `limit`; whether the newest patch is
    one it can take; and its setting's refusals."""
    import dataclasses

    from editserve.engine.autoconsolidate import (ConsolidationPolicy, due_now, edits_since_consolidation,
                                                  newest_consolidatable)
    from editserve.errors import InvalidRequestError

    with Ledger.open(tmp_path / "ledger", FP, create=True) as ledger:
        _build(ledger)
        assert edits_since_consolidation(ledger, 4, 10) == 4
        assert edits_since_consolidation(ledger, 4, 3) == 3
        assert edits_since_consolidation(ledger, 0, 10) == 0
        v = ledger.consolidate(plan_consolidation(ledger, _covs), caller="test")
        assert edits_since_consolidation(ledger, v, 10) == 0
        p5 = synth_patch(5)
        ledger.commit(p5, expected_head=v, preserved=_keys(p5, 5))
        assert edits_since_consolidation(ledger, v + 1, 10) == 1
        # a batch of three facts in one patch counts three
        p6 = synth_patch(6)
        batch = dataclasses.replace(p6, requests=tuple(dataclasses.replace(p6.requests[0], subject=f"Landmark 6.{i}")
                                                       for i in range(3)))
        ledger.commit(batch, expected_head=v + 1, preserved=_keys(batch, 6))
        assert edits_since_consolidation(ledger, v + 2, 10) == 4
        assert edits_since_consolidation(ledger, v + 2, 3) == 3
        # a patch without preserved keys (ROME without keys) starts no try; a keyed one after it does
        assert newest_consolidatable(ledger, v + 2) and not newest_consolidatable(ledger, 0)
        p7, p8 = synth_patch(7), synth_patch(8)
        ledger.commit(p7, expected_head=v + 2)
        assert not newest_consolidatable(ledger, v + 3) and edits_since_consolidation(ledger, v + 3, 10) == 5
        ledger.commit(p8, expected_head=v + 3, preserved=_keys(p8, 8))
        assert newest_consolidatable(ledger, v + 4)
    # after a refused try at 27 facts (K = 25), the next try waits for 52; fewer than 27 (a
    # consolidation, rollback or revert since) count afresh
    assert due_now(24, 25, None) == (False, None) and due_now(25, 25, None) == (True, None)
    assert due_now(28, 25, 52) == (False, 52) and due_now(51, 25, 52) == (False, 52)
    assert due_now(52, 25, 52) == (True, 52)
    assert due_now(3, 25, 52) == (False, None) and due_now(26, 25, 52) == (True, None)
    assert due_now(25, 25, 52) == (True, None)
    assert ConsolidationPolicy.from_env({"EDITSERVE_CONSOLIDATE_EVERY": "25"}).every == 25
    assert ConsolidationPolicy.from_env({}).every == 25 == ConsolidationPolicy().every    # on by default
    assert ConsolidationPolicy.from_env({"EDITSERVE_CONSOLIDATE_EVERY": "0"}).every == 0       # off
    for bad in ("1", "-3", "x", "2.5"):
        with pytest.raises(InvalidRequestError, match="EDITSERVE_CONSOLIDATE_EVERY"):
            ConsolidationPolicy.from_env({"EDITSERVE_CONSOLIDATE_EVERY": bad})


def test_check_scores_on_a_model_holding_the_head_as_on_a_bare_one(tmp_path) -> None:
    """The sidecar checks a consolidation while it holds the head, `editserve ledger consolidate` on a
    bare model: the same facts and scores, and each model holds afterwards exactly what it held (bit
    for bit; nothing rebuilt for "before" on the held one). A model holding anything else is refused."""
    from editserve.editing.model import fingerprint
    from editserve.editing.requests import EditRequest
    from editserve.ledger.consolidation import check_consolidation
    from editserve.patches import applied_patches, hold_patches
    from tests.tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama"), tiny_tokenizer()
    fp = fingerprint(model)
    params = dict(model.named_parameters())
    base = {n: params[n].detach().clone() for n in (NAME, NAME2)}
    d_out, d_in = base[NAME].shape                                          # [32, 48]
    g = torch.Generator().manual_seed(7)

    def keyed(seed: int, names: tuple[str, ...], subject: str, new: str, true: str):
        p = synth_patch(seed, names=names, shape=(d_out, d_in), scale=0.5, fp=fp)
        p = replace(p, requests=(EditRequest(prompt="{} is located in the city of", subject=subject,
                                             target_new=new, target_true=true),))
        state = PreservedKeys()
        for d in p.deltas:
            state = state.add(p.digest, d.layer, torch.randn(d_in, 2, generator=g))
        return p, state

    def covs(layers):
        out = {}
        for layer in layers:
            x = torch.randn(d_in, 4 * d_in, generator=torch.Generator().manual_seed(layer), dtype=torch.float64)
            out[layer] = x @ x.T / x.shape[1]
        return out

    p1, k1 = keyed(1, (NAME, NAME2), "The Eiffel Tower", " Rome", " Paris")
    p2, k2 = keyed(2, (NAME,), "The Colosseum", " Berlin", " Rome")
    p3, k3 = keyed(3, (NAME2,), "Big Ben", " Tokyo", "")          # no replaced object known: checked greedily
    with Ledger.open(str(tmp_path / "ledger"), fp, create=True) as ledger:
        ledger.commit(p1, expected_head=0, base=base, preserved=k1)
        ledger.commit(p2, expected_head=1, preserved=k2)
        ledger.commit(p3, expected_head=2, preserved=k3)
        plan = plan_consolidation(ledger, covs, ConsolidateParams())
        bare = check_consolidation(model, tok, ledger, plan)
        assert not applied_patches(model) and all(torch.equal(params[n], base[n]) for n in base)
        assert [f.target_true for f in bare.facts] == [" Paris", " Rome", ""]
        assert [r["target_true"] for r in bare.probe_report()["gate"]["rows"]] == [" Paris", " Rome"]

        hold_patches(model, [p1, p2, p3])
        held = {n: params[n].detach().clone() for n in base}
        on_head = check_consolidation(model, tok, ledger, plan)
        assert [p.digest for p in applied_patches(model)] == [p1.digest, p2.digest, p3.digest]
        assert all(torch.equal(params[n], held[n]) for n in base)
        assert (on_head.facts, on_head.held_before, on_head.held_after, on_head.broken) == \
            (bare.facts, bare.held_before, bare.held_after, bare.broken)

        hold_patches(model, [p2])
        with pytest.raises(ConsolidationError, match="exactly the patches active at version 3"):
            check_consolidation(model, tok, ledger, plan)
        assert [p.digest for p in applied_patches(model)] == [p2.digest]

        # a second consolidation scores every fact it takes in and a bounded, even sample of the held ones
        hold_patches(model, [])
        v4 = ledger.consolidate(plan, caller="test")
        p4, k4 = keyed(4, (NAME,), "The Louvre", " Madrid", " Paris")
        p5, k5 = keyed(5, (NAME2,), "The Space Needle", " Oslo", " Seattle")
        ledger.commit(p4, expected_head=v4, preserved=k4)
        ledger.commit(p5, expected_head=v4 + 1, preserved=k5)
        second = plan_consolidation(ledger, covs, ConsolidateParams())
        assert [d for d, _ in second.held] == [plan.patch.digest]
        full = check_consolidation(model, tok, ledger, second, held_sample=None)
        assert [f.subject for f in full.facts] == [
            "The Eiffel Tower", "The Colosseum", "Big Ben", "The Louvre", "The Space Needle"] and full.unscored == 0
        assert check_consolidation(model, tok, ledger, second).facts == full.facts    # 3 held ≤ the default sample
        one = check_consolidation(model, tok, ledger, second, held_sample=1)
        assert [f.subject for f in one.facts] == ["The Eiffel Tower", "The Louvre", "The Space Needle"]
        assert one.unscored == 2 and one.to_dict()["unscored"] == 2
        two = check_consolidation(model, tok, ledger, second, held_sample=2)
        assert [f.subject for f in two.facts][:2] == ["The Eiffel Tower", "The Colosseum"] and two.unscored == 1
        with pytest.raises(InvalidRequestError, match="held_sample must be a whole number or None, got -1"):
            check_consolidation(model, tok, ledger, second, held_sample=-1)
        assert not applied_patches(model)


def test_a_revert_out_of_a_consolidation_is_refused_for_broken_facts_not_for_ones_still_given() -> None:
    """`RemovalCheck.refuse`: a kept fact that held and no longer does refuses the revert (naming it);
    a reverted fact that the model still gives (another edit's reach) is reported, not refused."""
    from editserve.editing.retention import CommittedFact

    f = CommittedFact(version=3, prompt="Porto is a twin city of", subject="Porto", target_new=" Tehran",
                      target_true=" Bristol")
    still = RemovalCheck(kept=(f,), removed=(f,), held_before=1, held_after=1, broken=(),
                         still_held=(f.describe(),))
    still.refuse()                                                   # reported only
    assert still.to_dict()["still_held"] == [f.describe()]
    broken = RemovalCheck(kept=(f,), removed=(f,), held_before=1, held_after=0, broken=(f.describe(),),
                          still_held=())
    with pytest.raises(ConsolidationError, match=r"would break 1 of 1 other facts .*Porto is a twin city of"):
        broken.refuse()
    broken.refuse(max_drop=1.0)
    one_of_four = replace(broken, kept=(f,) * 4, held_before=4, held_after=3)
    with pytest.raises(ConsolidationError, match=r"break 1 of 4 other facts that hold now \(allowed 20%\)"):
        one_of_four.refuse(max_drop=0.2)
    one_of_four.refuse(max_drop=0.25)                                # the operator's share: accepted
    for bad in (1.5, -0.1, float("nan"), True, "0.1"):
        with pytest.raises(InvalidRequestError, match="max_drop must be a share in"):
            one_of_four.refuse(max_drop=bad)


def test_an_imported_consolidated_patch_is_one_fact_of_the_importing_ledger(backend: Backend, tmp_path) -> None:
    """A consolidated patch exported from one ledger and imported into another is a unit there: its
    constituents are not in the importing ledger. Once a consolidation of the importing ledger takes
    it in, reverting the import version takes all of the imported patch's facts out and keeps the
    others' outputs; the source ledger still takes its own consolidation apart fact by fact."""
    from editserve.ledger.transfer import export_patch, import_patch

    src, dst = backend.location(), backend.location()
    with Ledger.open(src, FP, create=True) as a:
        p1, p2, p3, p4 = _build(a)
        v5 = a.consolidate(plan_consolidation(a, _covs), caller="test")
        imported = a.version(v5).patch_id
        export_patch(a, v5, tmp_path / "cons")
    with Ledger.open(dst, FP, create=True) as b:
        base = base_weights()
        assert import_patch(b, tmp_path / "cons", expected_head=0, base=base) == 1
        assert provenance(b, imported) == ((imported,) * 3, (imported,) * 4)         # its own origin here
        p5 = synth_patch(5)
        b.commit(p5, expected_head=1, preserved=_keys(p5, 5))
        v3 = b.consolidate(plan_consolidation(b, _covs, whole=True), caller="test")
        holder = b.version(v3).patch_id
        assert provenance(b, holder) == ((imported,) * 3 + (p5.digest,), (imported,) * 4 + (p5.digest,))
        assert b.consolidated_into(imported) == v3
        plan = plan_fact_removal(b, _covs, 1)
        assert plan.removed == imported and plan.patch.requests == p5.requests
        assert {x.layer: x.n_keys for x in plan.layers} == {0: 2, 1: 0}       # kept keys: p5's two at layer 0
        v4 = b.revert_consolidated(plan, caller="test").version
        old0, new0 = _delta(b.patch(holder), 0), _delta(plan.patch, 0)
        kept = _keys(p5, 5).keys(0).double()
        assert (new0 @ kept - old0 @ kept).abs().max() <= 1e-4 * (old0 @ kept).abs().max()
        gone = b.patch_keys(imported).keys(0).double()
        assert (new0 @ gone).abs().max() <= 1e-4 * (old0 @ gone).abs().max()
        assert _delta(plan.patch, 1).abs().max() <= 1e-6 * _delta(b.patch(holder), 1).abs().max()   # only its facts
        assert b.preserved_keys(v4).keys(0).shape[1] == 2 and b.check_integrity().ok
    with Ledger.open(src, FP) as a:
        assert provenance(a, imported)[0] == (p1.digest, p3.digest, p4.digest)


def test_a_consolidation_stores_its_keys_as_a_reference_to_its_constituents(backend: Backend) -> None:
    """Consolidating every few commits must not store every committed key again each time (disk
    quadratic in the ledger): a consolidated patch's key state is a reference to its constituents'.
    Three whole consolidations, each taking the previous one in: each adds a few hundred bytes of key
    state, not the N keys; the state read back — warm, after a restart, at every older version — is
    the constituents' blocks bit for bit; the integrity check follows the references (a damaged
    constituent's keys damage every consolidation built on them, and only those versions)."""
    loc = backend.location()
    n_keys = 48                                     # per patch and layer: 48·32·4 B = 6 KiB per block
    with Ledger.open(loc, FP, create=True) as ledger:
        base = base_weights()
        states, key_bytes, first_keys_blob = {}, [], None
        for round_ in range(3):
            for i in range(2):
                seed = 10 * round_ + i + 1
                p = synth_patch(seed, names=(NAME, NAME2))
                ledger.commit(p, expected_head=ledger.head(), base=base, preserved=_keys(p, seed, n=n_keys))
                if first_keys_blob is None:
                    first_keys_blob = ledger.store.patch_states([p.digest])[p.digest].blob
            states[ledger.head()] = ledger.preserved_keys()
            plan = plan_consolidation(ledger, _covs, whole=True)
            v = ledger.consolidate(plan, caller="test")
            rec = ledger.store.patch_states([plan.patch.digest])[plan.patch.digest]
            key_bytes.append(rec.blob_size)
            assert rec.n_blocks == len(plan.keys.blocks)
            state = ledger.preserved_keys(v)
            before = states[v - 1]
            assert state.tags == (plan.patch.digest,) and len(state.blocks) == len(before.blocks)
            for a, b in zip(state.blocks, before.blocks):
                assert a.layer == b.layer and torch.equal(a.keys, b.keys)
            states[v] = state
        n_total = states[ledger.head()].n_keys(0)
        assert n_total == 6 * n_keys
        copied = 2 * n_total * D_IN * 4             # what a copy of the last consolidation's keys would take
        assert max(key_bytes) < 1024 < copied // 16, (key_bytes, copied)
        head = ledger.head()
        assert ledger.check_integrity().ok

    with Ledger.open(loc, FP) as reopened:          # cold caches: three levels of references resolved
        for v, state in states.items():
            got = reopened.preserved_keys(v)
            assert [(b.layer, b.keys.shape) for b in got.blocks] == [(b.layer, b.keys.shape) for b in state.blocks]
            assert all(torch.equal(a.keys, b.keys) for a, b in zip(got.blocks, state.blocks)), v
        reopened.rollback(min(states))
        again = reopened.preserved_keys()
        assert again.tags == states[min(states)].tags
        assert all(torch.equal(a.keys, b.keys) for a, b in zip(again.blocks, states[min(states)].blocks))
        reopened.rollback(head)
        backend.corrupt_blob(reopened, first_keys_blob)        # the very first commit's keys
        report = reopened.integrity_report()
        assert first_keys_blob in report.bad_blobs and "preserved keys of patch" in report.bad_blobs[first_keys_blob]
        # versions 1 … head: the first patch's keys are in every state from version 1 on, through the references
        assert report.bad_versions == tuple(range(1, head + 1)) and report.last_good == 0


def test_the_same_consolidation_written_again_keeps_its_stored_key_state(backend: Backend, monkeypatch) -> None:
    """A ledger from before key references holds a consolidation's keys as a copy. Rolling back past
    it and consolidating the same patches again gives the same patch (same digest): its stored copy is
    kept, not refused as other keys; and a consolidation stored as a reference can be written again too."""
    from editserve.ledger.objects import LedgerObjects

    with Ledger.open(backend.location(), FP, create=True) as ledger:
        _build(ledger)
        plan = plan_consolidation(ledger, _covs)
        with monkeypatch.context() as m:                  # what the ledger wrote before references
            m.setattr(LedgerObjects, "write_keys_by_reference", lambda self, d, keys, parts: self.write_keys({d: keys}))
            v5 = ledger.consolidate(plan, caller="test")
        digest = plan.patch.digest
        copy = ledger.store.patch_states([digest])[digest]
        assert copy.blob_size > 1024
        state = ledger.preserved_keys(v5)
        ledger.rollback(4)
        again = plan_consolidation(ledger, _covs)
        assert again.patch.digest == digest
        v6 = ledger.consolidate(again, caller="test")
        assert ledger.store.patch_states([digest])[digest] == copy
        assert all(torch.equal(a.keys, b.keys) for a, b in zip(ledger.preserved_keys(v6).blocks, state.blocks))
        assert ledger.check_integrity().ok

    with Ledger.open(backend.location(), FP, create=True) as ledger:     # references, written twice
        _build(ledger)
        plan = plan_consolidation(ledger, _covs)
        ledger.consolidate(plan, caller="test")
        ref = ledger.store.patch_states([plan.patch.digest])[plan.patch.digest]
        ledger.rollback(4)
        v6 = ledger.consolidate(plan_consolidation(ledger, _covs), caller="test")
        assert ledger.store.patch_states([plan.patch.digest])[plan.patch.digest] == ref and ref.blob_size < 1024
        assert ledger.version(v6).kind == "consolidate" and ledger.check_integrity().ok


def test_a_consolidation_takes_in_only_what_was_committed_since_the_last(backend: Backend) -> None:
    """Consolidating every few commits must not store the whole update again each time (the factors
    of a consolidated patch had rank min(N, d_out), so the ledger grew with N²/K). A consolidation
    leaves earlier consolidated patches as they are and re-solves only the patches committed since,
    on every committed key: its patch has the rank of those patches, the weights equal a whole
    re-solve of everything, every committed key keeps its output, and the keys are the same, in the
    same order. A fact taken out of the first consolidation keeps the outputs on the second's keys."""
    loc = backend.location()
    with Ledger.open(loc, FP, create=True) as ledger:
        p1, p2, p3, p4 = _build(ledger)
        v5 = ledger.consolidate(plan_consolidation(ledger, _covs), caller="test")
        first = ledger.version(v5).patch_id
        p5, p6 = synth_patch(5, names=(NAME, NAME2), rank=2), synth_patch(6)
        ledger.commit(p5, expected_head=v5, preserved=_keys(p5, 5))
        v7 = ledger.commit(p6, expected_head=v5 + 1, preserved=_keys(p6, 6))
        before, state = ledger.weights.materialize(v7), ledger.preserved_keys(v7)
        whole = plan_consolidation(ledger, _covs, whole=True)
        plan = plan_consolidation(ledger, _covs)
        assert plan.constituents == ((p5.digest, 6), (p6.digest, 7)) and plan.held == ((first, v5),)
        assert plan.patch.requests == p5.requests + p6.requests
        assert {d.layer: d.u.shape[1] for d in plan.patch.deltas} == {0: 3, 1: 2}      # p5's rank 2 (+ p6's 1)
        assert {d.layer: d.u.shape[1] for d in whole.patch.deltas} == {0: 5, 1: 4}     # the first's 2 taken in too
        assert {x.layer: (x.n_patches, x.n_keys) for x in plan.layers} == {0: (2, 8), 1: (1, 7)}
        assert all(x.penalty_after < x.penalty_before for x in plan.layers)
        v8 = ledger.consolidate(plan, caller="test")
        assert ledger.active_ids(v8) == (p2.digest, first, plan.patch.digest)
        assert ledger.version(v8).details["held"] == [{"patch": first, "version": v5}]
        after, after_state = ledger.weights.materialize(v8), ledger.preserved_keys(v8)
        assert [(b.layer, b.keys.shape) for b in after_state.blocks] == [(b.layer, b.keys.shape) for b in state.blocks]
        assert all(torch.equal(a.keys, b.keys) for a, b in zip(after_state.blocks, state.blocks))
        base = base_weights()
        for name, layer, d_whole in ((NAME, 0, _delta(whole.patch, 0)), (NAME2, 1, _delta(whole.patch, 1))):
            k = state.keys(layer).double()
            moved = (after[name].double() - before[name].double()) @ k
            edited = (before[name].double() - base[name].double()) @ k
            assert moved.abs().max() <= 1e-4 * edited.abs().max(), name
            d_inc = after[name].double() - base[name].double() - (_delta(p2, 0) if layer == 0 else 0)   # p2: unkeyed
            assert (d_inc - d_whole).norm() <= 1e-5 * d_whole.norm(), name               # = the whole re-solve
        rec = ledger.store.patch_states([plan.patch.digest])[plan.patch.digest]
        assert rec.blob_size < 1024 and rec.n_blocks == 3                                   # a key reference
        with pytest.raises(ConsolidationError, match="consolidated already"):
            plan_consolidation(ledger, _covs)
        # p1 out of the first consolidation: the second's keys keep their outputs
        removal = plan_fact_removal(ledger, _covs, 1)
        assert removal.holder == first
        k5 = _keys(p5, 5).keys(0).double()
        old0, new0 = _delta(ledger.patch(first), 0), _delta(removal.patch, 0)
        assert (new0 @ k5 - old0 @ k5).abs().max() <= 1e-4 * (old0 @ k5).abs().max() + 1e-9
        gone = _keys(p1, 1).keys(0).double()
        assert (new0 @ gone).abs().max() <= 1e-4 * (old0 @ gone).abs().max()
        ledger.revert_consolidated(removal, caller="test")
        ledger.rollback(v7)
        assert all(torch.equal(ledger.weights.materialize(v7)[n], before[n]) for n in before)
        assert ledger.check_integrity().ok


def test_a_rebase_of_a_consolidated_fact_re_solves_its_consolidation_and_recomputes_what_follows(
        backend: Backend) -> None:
    """Rebase (revert in the middle) of a fact that a consolidation took in: the consolidated patch is
    re-solved without it (`plan_fact_removal`) and the patches committed after the consolidation are
    recomputed on top of the re-solved patch, with its preserved keys; one revert version writes both,
    the replayed key returns it, a stale or mismatched plan is refused, a rollback is bit-exact."""
    loc = backend.location()
    with Ledger.open(loc, FP, create=True) as ledger:
        p1, p2, p3, p4 = _build(ledger)
        v5 = ledger.consolidate(plan_consolidation(ledger, _covs), caller="test")
        holder = ledger.version(v5).patch_id
        p5, p6 = synth_patch(5), synth_patch(6, names=(NAME2,))
        v6 = ledger.commit(p5, expected_head=v5, preserved=_keys(p5, 5))
        v7 = ledger.commit(p6, expected_head=v6, preserved=_keys(p6, 6))
        weights_v7, keys_v7 = ledger.weights.materialize(v7), ledger.preserved_keys(v7)
        # a recompute callable alone cannot take a fact out of a consolidation: refused, naming it
        with pytest.raises(RevertError, match=f"version {v5} consolidated it"):
            ledger.revert(3, rebase=lambda step: step.old_patch, caller="test")

        steps = []

        def recompute(step):
            steps.append(step)
            new = replace(step.old_patch, hparams={**step.old_patch.hparams, "rebased_on": len(step.new_context)})
            return RebaseOutcome(patch=new, metrics_before={"efficacy": 1.0}, metrics_after={"efficacy": 0.5},
                                 keys=_keys(new, 50 + step.version))

        removal = plan_fact_removal(ledger, _covs, 3)
        assert removal.holder == holder and removal.patch.requests == p1.requests + p4.requests
        plan = ledger.plan_rebase(3, recompute, removal=removal)
        new5, new6 = plan.patches
        assert (plan.kept, plan.replaced) == ((p2.digest,), (p5.digest, p6.digest))
        assert plan.final == (p2.digest, removal.patch.digest, new5.digest, new6.digest)
        assert [s.version for s in steps] == [v6, v7]
        # each recompute sees the re-solved patch in place of its holder, and its preserved keys
        assert [p.digest for p in steps[0].new_context] == [p2.digest, removal.patch.digest]
        assert [p.digest for p in steps[1].new_context] == [p2.digest, removal.patch.digest, new5.digest]
        assert steps[0].new_preserved.tags == (removal.patch.digest,)
        assert steps[1].new_preserved.tags == (removal.patch.digest, new5.digest)
        assert [p.digest for p in steps[0].old_context] == [p2.digest, holder]

        # a plan for another fact, or without the removal, does not pass for this one
        other = plan_fact_removal(ledger, _covs, 4)
        with pytest.raises(RevertError, match="removal plan was computed for taking version 4"):
            ledger.plan_rebase(3, recompute, removal=other)
        with pytest.raises(RevertError, match="rebase plan was computed"):
            ledger.revert(3, rebase=replace(plan, kept=()), caller="test")

        res = ledger.revert(3, rebase=plan, expected_head=v7, caller="test", idempotency_key="rb-3")
        v8 = res.version
        assert [r.original_version for r in res.rebased] == [v6, v7] and res.created
        info = ledger.version(v8)
        assert (info.kind, info.patch_id) == ("revert", removal.patch.digest)
        assert info.removed == (holder, p5.digest, p6.digest)
        assert info.added == (removal.patch.digest, new5.digest, new6.digest)
        assert info.details["mode"] == "rebase" and info.details["reverted"] == 3
        assert info.details["consolidation"]["old_patch"] == holder and info.details["consolidation"]["version"] == v5
        assert ledger.active_ids(v8) == plan.final
        # the key state: the re-solved patch's blocks (p3's gone), then the recomputed ones'
        state = ledger.preserved_keys(v8)
        assert state.tags == (removal.patch.digest, new5.digest, new6.digest)
        assert torch.equal(state.keys(0), torch.cat([_keys(p1, 1).keys(0), _keys(new5, 50 + v6).keys(0)], dim=1))
        rec = ledger.store.patch_states([removal.patch.digest])[removal.patch.digest]
        assert removal.key_parts == (p1.digest, p4.digest) and is_ref(ledger.blobs.get(rec.blob))   # no copy
        # the weights: base + the final patches
        base = base_weights()
        got = ledger.weights.materialize(v8)
        for name in (NAME, NAME2):
            want = base[name].double() + sum(d.u.double() @ d.v.double().T for p in (p2, removal.patch, new5, new6)
                                             for d in p.deltas if d.name == name)
            assert torch.allclose(got[name].double(), want, atol=1e-5)
        # the fact is out, the others stay consolidated (in the re-solved patch), the recomputed are plain
        assert ledger.consolidated_into(p3.digest) is None
        assert ledger.consolidated_into(p1.digest) == v8 and ledger.consolidated_into(p4.digest) == v8
        assert ledger.consolidated_into(p5.digest) is None
        # replayed, stale
        again = ledger.revert(3, rebase=plan, expected_head=v7, caller="test", idempotency_key="rb-3")
        assert (again.version, again.created) == (v8, False) and again.rebased == res.rebased
        with pytest.raises(LedgerConflict):
            ledger.revert(3, rebase=plan, expected_head=v7, caller="test")
        assert ledger.check_integrity().ok

        # nothing committed after the consolidation: the re-solve alone
        ledger.rollback(v5)
        only = ledger.plan_rebase(4, recompute, removal=plan_fact_removal(ledger, _covs, 4))
        assert (only.replaced, only.outcomes) == ((), ())
        v10 = ledger.revert(4, rebase=only, caller="test").version
        assert ledger.active_ids(v10) == (p2.digest, only.removal.patch.digest)

        # rollback to before the rebase: weights and keys bit for bit
        ledger.rollback(v7)
        again_w = ledger.weights.materialize(v7)
        assert all(torch.equal(again_w[n], weights_v7[n]) for n in weights_v7)
        assert ledger.preserved_keys().blocks == keys_v7.blocks


def test_patches_of_a_layer_with_neuron_slots_are_consolidated_in_its_own_neurons(tmp_path) -> None:
    """A covariance method's patch on a layer with E neuron slots has keys of the own neurons [d_in] and
    factors with E zero rows (`slots.pad_to_slots`): consolidation solves on the own rows and pads the
    result back (the slots stay zero), also with an earlier consolidation held; a keyed patch that
    writes slot rows is refused, naming the layer, and nothing is written."""
    slots = 4
    wide = (D_OUT, D_IN + slots)

    def padded(seed: int):
        p = synth_patch(seed, shape=SHAPE)
        return replace(p, deltas=tuple(replace(d, v=torch.cat([d.v, torch.zeros(slots, d.rank)])) for d in p.deltas))

    with Ledger.open(tmp_path / "ledger", FP, create=True) as ledger:
        patches = [padded(s) for s in (1, 2, 3, 4)]
        ledger.commit(patches[0], expected_head=0, base={NAME: base_weights(wide)[NAME]}, preserved=_keys(patches[0], 1))
        ledger.commit(patches[1], expected_head=1, preserved=_keys(patches[1], 2))
        state = ledger.preserved_keys(2)
        before = ledger.weights.materialize(2)[NAME].double()
        plan = plan_consolidation(ledger, _covs, ConsolidateParams(ridge=0.1))
        (delta,) = plan.patch.deltas
        assert delta.v.shape[0] == D_IN + slots and not delta.v[D_IN:].any(), "the slots stay zero"
        v = ledger.consolidate(plan, caller="test")
        after = ledger.weights.materialize(v)[NAME].double()
        k = torch.cat([state.keys(0).double(), torch.zeros(slots, state.keys(0).shape[1], dtype=torch.float64)])
        assert ((after - before) @ k).abs().max() <= 1e-4 * ((before - base_weights(wide)[NAME].double()) @ k).abs().max()
        assert torch.equal(after[:, D_IN:], before[:, D_IN:])

        for i, p in enumerate(patches[2:], start=3):                 # a second consolidation holds the first
            ledger.commit(p, expected_head=ledger.head(), preserved=_keys(p, i))
        second = plan_consolidation(ledger, _covs, ConsolidateParams(ridge=0.1))
        assert second.held and not second.patch.deltas[0].v[D_IN:].any()

        slot = synth_patch(9, shape=wide)                             # a keyed patch that writes the slot rows
        ledger.commit(slot, expected_head=ledger.head(), preserved=_keys(slot, 9))
        head = ledger.head()
        with pytest.raises(ConsolidationError, match="layer 0: factors of 36 rows do not fit keys of width 32"):
            plan_consolidation(ledger, _covs, ConsolidateParams(ridge=0.1))
        assert ledger.head() == head
