"""Spare neuron slots (editing/slots.py): a widened MLP computes what it did; a gated neuron written
into a slot as an ordinary patch computes what the bank's hook computes; removing the patch frees the
slot bit for bit."""

from __future__ import annotations

import pytest
import torch

from editserve.editing import EditRequest
from editserve.editing.gated import GateBank, GateParams, gated_edit, mlp_inputs
from editserve.editing.hparams import ValueParams
from editserve.editing.slots import free_slot, neuron_patch, own_view, slot_of, slot_range, slots_of, widen_mlp
from editserve.errors import InvalidRequestError, PatchStateError, UnknownArchitectureError
from editserve.patches import Patch, WeightDelta, applied_patches, apply_patch, remove_patch
from tests.tiny import TEXT, tiny_model, tiny_tokenizer

LAYER = 1


def _gated(model, tok, req):
    params = GateParams(layer=LAYER, value_prefixes=0,
                        value=ValueParams(max_steps=30, lr=0.5, kl_factor=0.0, clamp_norm_factor=1e4, weight_decay=0.0))
    other = [t for t in TEXT if "Eiffel" not in t]
    neg = mlp_inputs(model, LAYER, tok(other[:6], padding=True, return_tensors="pt")["input_ids"])
    return gated_edit(model, tok, req, (), neg, params)


def test_a_gated_neuron_in_a_slot_is_an_ordinary_patch():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ids = tok(["The Eiffel Tower is located in the city of", TEXT[0]], padding=True, return_tensors="pt")["input_ids"]
    plain = model(input_ids=ids).logits
    slots = widen_mlp(model, LAYER, 3)
    assert list(slots) == [48, 49, 50] and slot_range(model, LAYER) == slots
    empty = model(input_ids=ids).logits
    assert torch.allclose(empty, plain, atol=1e-5), "zero neurons add silu(0)·0 = 0"
    weights0 = {n: p.detach().clone() for n, p in model.named_parameters()}

    req = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome")
    neuron = _gated(model, tok, req)
    bank = GateBank(LAYER, model.config.hidden_size)
    bank.add(neuron)
    with bank.applied(model):
        hooked = model(input_ids=ids).logits
    assert (hooked - empty).abs().max() > 0.1, "the edit must move something for the comparison to mean anything"

    slot = free_slot(model, LAYER)
    patch = neuron_patch(model, LAYER, slot, neuron, req, {"margin": 12.0})
    assert slot == 48 and patch.method == "gated" and slot_of(patch) == 48 and patch.hparams["layer"] == LAYER
    apply_patch(model, patch)
    assert torch.allclose(model(input_ids=ids).logits, hooked, atol=1e-4)
    assert free_slot(model, LAYER) == 49
    with pytest.raises(PatchStateError, match="slot neuron 48 of layer 1 is taken"):
        neuron_patch(model, LAYER, 48, neuron, req, {})

    remove_patch(model, patch)
    assert all(torch.equal(p, weights0[n]) for n, p in model.named_parameters()), "the slot is zero again, bit for bit"
    assert torch.equal(model(input_ids=ids).logits, empty)
    assert free_slot(model, LAYER) == 48


def test_slots_refuse_what_does_not_fit():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidRequestError, match="slots must be a positive integer"):
            widen_mlp(model, LAYER, bad)
    widen_mlp(model, LAYER, 1)
    with pytest.raises(PatchStateError, match="already has 1 slots"):
        widen_mlp(model, LAYER, 2)
    req = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome")
    neuron = _gated(model, tok, req)
    with pytest.raises(InvalidRequestError, match="neuron 3 is not a slot"):
        neuron_patch(model, LAYER, 3, neuron, req, {})              # one of the model's own neurons
    apply_patch(model, neuron_patch(model, LAYER, free_slot(model, LAYER), neuron, req, {}))
    with pytest.raises(PatchStateError, match="no free neuron slot"):
        free_slot(model, LAYER)
    other = tiny_model("llama")                      # a patch on the down-projection keeps a narrow base copy
    down = other.model.layers[LAYER].mlp.down_proj.weight                                    # [d, I]
    edit = Patch(deltas=(WeightDelta(f"model.layers.{LAYER}.mlp.down_proj.weight", LAYER, torch.ones(down.shape[0], 1),
                                     torch.ones(down.shape[1], 1)),),
                 requests=(req,), method="rome", hparams={}, model_fingerprint="", family="llama")
    apply_patch(other, edit)
    before = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(PatchStateError, match="while 1 patch"):
        widen_mlp(other, LAYER, 4)
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters()) and not slot_range(other, LAYER)
    remove_patch(other, edit)
    assert widen_mlp(other, LAYER, 4) == range(48, 52)
    with pytest.raises(UnknownArchitectureError, match="not a bias-free SwiGLU"):
        widen_mlp(tiny_model("gpt2"), LAYER, 1)


def test_compute_edit_gated_fills_the_lowest_free_slot():
    """method="gated" through `compute_patch`, as the sidecar calls it: a widened layer is needed, each
    edit takes the lowest free slot, and the corpus inputs are reused until a patch below the layer
    changes them."""
    from editserve.editing.corpus import Corpus
    from editserve.editing.edit import compute_patch
    from editserve.editing.gated import cached_corpus_inputs

    model, tok = tiny_model("llama"), tiny_tokenizer()
    corpus = Corpus(name="tiny", text="\n".join(TEXT * 40))
    over = {"negatives": 512, "value": {"max_steps": 10}, "prefixes": {"n_prefixes": 2}}
    eiffel = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome")
    colosseum = EditRequest(prompt="{} is located in the city of", subject="The Colosseum", target_new=" Paris")
    with pytest.raises(InvalidRequestError, match="needs neuron slots at layer 1"):
        compute_patch(model, tok, [eiffel], method="gated", layers=[LAYER], hparams=over, corpus=corpus)
    widen_mlp(model, LAYER, 2)
    with pytest.raises(InvalidRequestError, match="guard 0.5"):
        compute_patch(model, tok, [eiffel], method="gated", layers=[LAYER], hparams={**over, "guard": 0.5}, corpus=corpus)

    first = compute_patch(model, tok, [eiffel], method="gated", layers=[LAYER], hparams=over, corpus=corpus)
    assert first.method == "gated" and slot_of(first) == 48 and first.hparams["negatives"] == 512
    assert {d.name for d in first.deltas} == {f"model.layers.{LAYER}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    apply_patch(model, first)
    second = compute_patch(model, tok, [colosseum], method="gated", layers=[LAYER], hparams=over, corpus=corpus)
    assert slot_of(second) == 49
    apply_patch(model, second)
    with pytest.raises(PatchStateError, match="no free neuron slot .*name another method"):
        compute_patch(model, tok, [eiffel], method="gated", layers=[LAYER], hparams=over, corpus=corpus)
    remove_patch(model, first)
    assert slot_of(compute_patch(model, tok, [eiffel], method="gated", layers=[LAYER], hparams=over, corpus=corpus)) == 48

    # A batch: one neuron per fact in one patch (rank-2 deltas), each computed with the batch's earlier ones
    # in place, so it equals the two facts committed one after the other.
    with pytest.raises(PatchStateError, match="1 free neuron slot"):
        compute_patch(model, tok, [colosseum, eiffel], method="gated", layers=[LAYER], hparams=over, corpus=corpus)
    remove_patch(model, second)
    batch = compute_patch(model, tok, [eiffel, colosseum], method="gated", layers=[LAYER], hparams=over, corpus=corpus)
    assert slots_of(batch) == [48, 49] and all(d.u.shape[1] == 2 for d in batch.deltas)
    apply_patch(model, first)
    one_by_one = [first, compute_patch(model, tok, [colosseum], method="gated", layers=[LAYER], hparams=over,
                                       corpus=corpus)]
    remove_patch(model, first)
    for i, single in enumerate(one_by_one):
        for d_batch, d_one in zip(batch.deltas, single.deltas):
            factor = "u" if d_batch.name.endswith("down_proj.weight") else "v"        # δ, or g and u
            assert torch.allclose(getattr(d_batch, factor)[:, i], getattr(d_one, factor)[:, 0], atol=1e-4, rtol=1e-3)
    assert not applied_patches(model)

    held = cached_corpus_inputs(model, tok, LAYER, corpus.fingerprint, corpus.text, 512)
    assert cached_corpus_inputs(model, tok, LAYER, corpus.fingerprint, corpus.text, 512) is held
    below = Patch(deltas=(WeightDelta("model.layers.0.mlp.down_proj.weight", 0, torch.ones(32, 1), torch.ones(48, 1)),),
                  requests=(eiffel,), method="rome", hparams={}, model_fingerprint="", family="llama")
    apply_patch(model, below)                                  # layer 0 feeds layer 1's MLP: computed again
    moved = cached_corpus_inputs(model, tok, LAYER, corpus.fingerprint, corpus.text, 512)
    assert moved is not held and not torch.equal(moved, held)


def test_covariance_methods_edit_a_widened_layer_in_its_own_neurons():
    """ROME and AlphaEdit on a layer with neuron slots (`slots.own_view`): keys, statistics and the delta
    are of the layer's own neurons. With the slots empty the patch is the unwidened model's (zero rows
    for the slots); with a gated neuron in a slot, an AlphaEdit edit of the same layer holds and leaves
    the neuron's weights as they were, bit for bit. Statistics cached with another width (over the
    slots' dimensions too) are computed again, not used."""
    from safetensors.torch import save_file

    from editserve.editing.corpus import Corpus
    from editserve.editing.edit import compute_patch
    from editserve.editing.evaluate import target_nll
    from editserve.editing.hparams import StatsParams
    from editserve.editing.model import fingerprint
    from editserve.editing.stats import _cache_path, layer_stats

    model, tok = tiny_model("llama"), tiny_tokenizer()
    corpus = Corpus(name="tiny-own", text="\n".join(TEXT * 41))
    stats = {"n_tokens": 4096, "seq_len": 64}
    over = {"stats": stats, "value": {"max_steps": 15}, "prefixes": {"n_prefixes": 2}}
    eiffel = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome")
    colosseum = EditRequest(prompt="{} is located in the city of", subject="The Colosseum", target_new=" Paris")

    # layer 1's statistics over I + E = 52 dimensions, as the widened model's keys would give them
    params, dtype = StatsParams(**stats), next(model.parameters()).dtype
    path = _cache_path(fingerprint(model), corpus, LAYER, params, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"cov": torch.eye(52)}, str(path))
    cov = layer_stats(model, tok, [LAYER], corpus, fingerprint(model), params, progress=False)[0][LAYER].cov
    assert cov.shape == (48, 48) and not torch.equal(cov, torch.eye(48))

    plain = compute_patch(model, tok, [eiffel], method="rome", layers=[LAYER], hparams=over, corpus=corpus)
    widen_mlp(model, LAYER, 4)
    wide = compute_patch(model, tok, [eiffel], method="rome", layers=[LAYER], hparams=over, corpus=corpus)
    (p,), (w,) = plain.deltas, wide.deltas
    assert w.name == p.name and w.v.shape == (52, 1) and not w.v[48:].any(), "no weight of a slot moves"
    assert torch.allclose(w.u, p.u, rtol=1e-3, atol=1e-6) and torch.allclose(w.v[:48], p.v, rtol=1e-3, atol=1e-6)
    mlp = model.model.layers[LAYER].mlp
    assert mlp.down_proj.weight.shape == (32, 52) and mlp.gate_proj.weight.shape == (52, 32), "projections restored"
    assert not mlp._forward_hooks

    neuron = compute_patch(model, tok, [colosseum], method="gated", layers=[LAYER],
                           hparams={"negatives": 512, "value": {"max_steps": 10}, "prefixes": {"n_prefixes": 2}},
                           corpus=corpus)
    apply_patch(model, neuron)
    ids = tok([colosseum.text, TEXT[0]], padding=True, return_tensors="pt")["input_ids"]
    full = model(input_ids=ids).logits
    with own_view(model, [LAYER, 0]) as narrowed:
        assert narrowed == (LAYER,) and mlp.down_proj.weight.shape == (32, 48)
        assert torch.allclose(model(input_ids=ids).logits, full, atol=1e-5), "the slots' output is added back"
    slot = {n: p.detach().clone() for n, p in model.named_parameters() if f"layers.{LAYER}.mlp" in n}
    before = target_nll(model, tok, [eiffel.text], [" Rome"])
    held = target_nll(model, tok, [colosseum.text], [" Paris"])
    thr = float(torch.quantile(torch.linalg.eigvalsh(cov.double()), 0.6))      # a null space of ~60% on the tiny model
    fast = {"max_steps": 30, "lr": 0.5, "kl_factor": 0.0, "clamp_norm_factor": 1e4, "weight_decay": 0.0}
    alpha = compute_patch(model, tok, [eiffel], method="alphaedit", layers=[LAYER], corpus=corpus,
                          hparams={**over, "value": fast, "nullspace_threshold": thr, "alpha": 1.0})
    assert alpha.deltas[0].v.shape[0] == 52 and not alpha.deltas[0].v[48:].any()
    apply_patch(model, alpha)
    live = dict(model.named_parameters())
    for name, weight in slot.items():
        cut = (slice(None), slice(48, None)) if name.endswith("down_proj.weight") else (slice(48, None),)
        assert torch.equal(live[name][cut], weight[cut]), name
    assert (target_nll(model, tok, [eiffel.text], [" Rome"]) < before - 0.05).all()
    assert torch.allclose(target_nll(model, tok, [colosseum.text], [" Paris"]), held, atol=0.05)
