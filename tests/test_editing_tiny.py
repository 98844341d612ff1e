"""compute_patch end to end on tiny random models (GPT-2's transposed Conv1D and Llama layouts):
the model is untouched by computing, the patch hits its target, typed errors on bad input."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from editserve.editing import EditRequest, apply_patch, compute_patch, remove_patch
from editserve.editing.corpus import load_corpus
from editserve.editing.scoring import target_nll
from editserve.errors import InvalidRequestError, LayerOutOfRangeError
from tests.tiny import TEXT, tiny_model, tiny_tokenizer

FAST = {"stats": {"n_tokens": 200, "seq_len": 20}, "prefixes": {"n_prefixes": 0},
        "value": {"max_steps": 30, "lr": 0.5, "kl_factor": 0.0, "clamp_norm_factor": 1e4, "weight_decay": 0.0}}


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSERVE_HOME", str(tmp_path / "home"))
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(TEXT * 3))
    return load_corpus(f)


@pytest.mark.parametrize("family, method, layers", [("gpt2", "rome", [1]), ("llama", "rome", [2]),
                                                    ("gpt2", "memit", [1, 2]), ("gpt_neox", "memit", [0, 1])])
def test_compute_apply_remove(env, family, method, layers):
    model, tok = tiny_model(family), tiny_tokenizer()
    reqs = [EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome")]
    if method == "memit":
        reqs.append(EditRequest(prompt="{} speaks", subject="Michel Rocard", target_new=" English"))
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts, targets = [r.text for r in reqs], [r.target_new for r in reqs]
    nll_before = target_nll(model, tok, prompts, targets)
    hparams = FAST if method == "rome" else {**FAST, "cov_weight": 1.0}  # λ for a 200-token covariance
    patch = compute_patch(model, tok, reqs, method=method, layers=layers, hparams=hparams, corpus=env)
    assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters()), "computing must not change the model"
    assert [d.layer for d in patch.deltas] == layers
    assert all(d.rank == len(reqs) for d in patch.deltas)
    assert set(patch.timings) >= {"keys", "values", "solve"}
    apply_patch(model, patch)
    nll_after = target_nll(model, tok, prompts, targets)
    # A random model saturates near -1.3 nats at the edit layer; MEMIT spreads the change over
    # layers through random blocks, so only a clear drop is required here. Quality: test_smollm2_edits.
    margin = 0.5 if method == "rome" else 0.05
    assert (nll_after < nll_before - margin).all(), (nll_before, nll_after)
    remove_patch(model, patch)
    assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


def test_bad_input(env):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    req = EditRequest(prompt="{} is in", subject="The Eiffel Tower", target_new=" Rome")
    with pytest.raises(InvalidRequestError, match="'sgd'"):
        compute_patch(model, tok, [req], method="sgd", corpus=env)
    with pytest.raises(LayerOutOfRangeError, match="layer 9"):
        compute_patch(model, tok, [req], method="rome", layers=[9], corpus=env)
    with pytest.raises(InvalidRequestError, match="exactly one layer"):
        compute_patch(model, tok, [req], method="rome", layers=[1, 2], corpus=env)
    with pytest.raises(InvalidRequestError, match="2 requests"):
        compute_patch(model, tok, [req, req], method="rome", layers=[1], corpus=env)
    with pytest.raises(InvalidRequestError, match="none"):
        compute_patch(model, tok, [], method="memit", layers=[1], corpus=env)
    with pytest.raises(InvalidRequestError, match="unknown hyper-parameter"):
        compute_patch(model, tok, [req], method="rome", layers=[1], hparams={"lr": 1}, corpus=env)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gpt_neox", "qwen3"])
@pytest.mark.parametrize("rome", [True, False])
def test_frozen_blocks_give_the_same_values(family, rome):
    """Replaying the blocks below the edit layer (each v* step) changes nothing but the cost."""
    from editserve.editing.arch import spec_for
    from editserve.editing.hparams import ValueParams
    from editserve.editing.values import optimise_values

    model, tok = tiny_model(family), tiny_tokenizer()
    spec = spec_for(model)
    reqs = [EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome"),
            EditRequest(prompt="{} speaks", subject="Michel Rocard", target_new=" English")]
    prefixes = ("The city. ", "Danielle plays the piano. ")
    layer = 2
    module = spec.mlp_name(layer) if rome else spec.layer_name(layer)
    params = ValueParams(max_steps=6, early_stop_nll=0.0)
    full = optimise_values(model, tok, reqs, prefixes, module, params, frozen_below=0)
    fast = optimise_values(model, tok, reqs, prefixes, module, params, frozen_below=layer)
    assert full.steps == fast.steps == 6
    assert torch.allclose(full.delta, fast.delta, rtol=1e-5, atol=1e-6), (full.delta - fast.delta).abs().max()
    assert torch.allclose(full.final_nll, fast.final_nll, rtol=1e-5, atol=1e-6)
    assert full.delta.abs().sum() > 0
    # The replay is undone: the model computes every block again afterwards.
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_values_match_single_requests(family, monkeypatch):
    """In a batch each request's δ is what it would be alone, also after converged requests
    have left the batch (it is rebuilt without them)."""
    from editserve.editing.arch import spec_for
    from editserve.editing.hparams import ValueParams
    from editserve.editing.values import optimise_values

    model, tok = tiny_model(family), tiny_tokenizer()
    module = spec_for(model).mlp_name(1)
    reqs = [EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome"),
            EditRequest(prompt="{} speaks", subject="Michel Rocard", target_new=" English"),
            EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new=" piano")]
    prefixes = ("The city. ", "Danielle plays the piano. ")
    free = ValueParams(max_steps=30, lr=0.5, early_stop_nll=0.0, kl_factor=0.0, clamp_norm_factor=1e4, weight_decay=0.0)
    reached = sorted(optimise_values(model, tok, [r], prefixes, module, free, frozen_below=1).final_nll.item() for r in reqs)
    # Stop between the lowest and the highest NLL reached: some requests converge early, one never does.
    params = dataclasses.replace(free, early_stop_nll=(reached[0] + reached[-1]) / 2)
    alone = [optimise_values(model, tok, [r], prefixes, module, params, frozen_below=1) for r in reqs]
    from editserve.editing import values

    built = []
    real_build = values._build_prompts
    monkeypatch.setattr(values, "_build_prompts", lambda *a: built.append(list(a[3])) or real_build(*a))
    together = optimise_values(model, tok, reqs, prefixes, module, params, frozen_below=1)
    assert len(built) > 1 and len(built[-1]) < len(reqs), f"the batch was never rebuilt: {built}"
    steps = [a.steps for a in alone]
    assert len(set(steps)) > 1 and max(steps) == 30, f"requests must converge at different steps to test the rebuild, got {steps}"
    assert together.steps == max(steps)
    # Chunks of 2 are formed by suffix length ([1, 2], then [0]); results come back in request order.
    chunked = optimise_values(model, tok, reqs, prefixes, module, params, frozen_below=1, chunk_size=2)
    for res in (together, chunked):
        for i, a in enumerate(alone):
            assert torch.allclose(res.delta[i], a.delta[0], rtol=1e-4, atol=1e-5), (i, (res.delta[i] - a.delta[0]).abs().max())
            assert torch.allclose(res.final_nll[i], a.final_nll[0], rtol=1e-4, atol=1e-5)
            assert torch.allclose(res.init_output[i], a.init_output[0], rtol=1e-5, atol=1e-6)
    # A per-request early stop of 0 (an escalation retry) runs that request to max_steps, in the same
    # batch as requests that keep the configured stop; theirs are what they were.
    first = min(range(len(reqs)), key=lambda i: steps[i])
    stops = torch.full((len(reqs),), params.early_stop_nll)
    stops[first] = 0.0
    mixed = optimise_values(model, tok, reqs, prefixes, module, params, frozen_below=1, stop_nll=stops)
    full = optimise_values(model, tok, [reqs[first]], prefixes, module, free, frozen_below=1)
    assert mixed.final_nll[first] < alone[first].final_nll[0]
    assert torch.allclose(mixed.delta[first], full.delta[0], rtol=1e-4, atol=1e-5)
    for i in set(range(len(reqs))) - {first}:
        assert torch.allclose(mixed.delta[i], alone[i].delta[0], rtol=1e-4, atol=1e-5), i


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_most_probable_early_stop(family):
    """early_stop="most_probable" (MPES) stops each request at the first step where every target token
    leads on every one of its prompts by the margin: fewer steps and a smaller δ than the NLL stop, and
    the stopping δ satisfies the criterion, while the step before it does not. A per-request stop of 0
    (an escalation retry) still runs all steps."""
    from editserve.editing.arch import spec_for
    from editserve.editing.hooks import Hooks
    from editserve.editing.hparams import ValueParams
    from editserve.editing.keys import prefixed_texts
    from editserve.editing.prompts import subject_last_index, target_ids
    from editserve.editing.values import optimise_values

    model, tok = tiny_model(family), tiny_tokenizer()
    spec = spec_for(model)
    module = spec.mlp_name(1)
    # One-token targets right after the subject: what a random tiny model can learn to predict.
    reqs = [EditRequest(prompt="The tower of {}", subject="Eiffel", target_new=" the"),
            EditRequest(prompt="A man named {}", subject="Michel Rocard", target_new=" a")]
    prefixes = ("The city. ", "Danielle plays the piano. ")
    nll_stop = ValueParams(max_steps=60, lr=0.3, early_stop_nll=0.05, kl_factor=0.0, clamp_norm_factor=1e4, weight_decay=0.0)
    by_nll = optimise_values(model, tok, reqs, prefixes, module, nll_stop, frozen_below=1)
    for margin in (0.0, 0.5):
        mpes = dataclasses.replace(nll_stop, early_stop="most_probable", early_stop_margin=margin)
        res = optimise_values(model, tok, reqs, prefixes, module, mpes, frozen_below=1)
        assert res.steps < by_nll.steps, (margin, res.steps, by_nll.steps)
        for i, req in enumerate(reqs):
            alone = optimise_values(model, tok, [req], prefixes, module, mpes, frozen_below=1)
            assert torch.allclose(alone.delta[0], res.delta[i], rtol=1e-4, atol=1e-5)
            assert alone.delta[0].norm() < by_nll.delta[i].norm()
            # Stopping at step s returns δ after s − 1 updates (what the check at step s saw).
            assert alone.steps >= 3
            same, fewer = (optimise_values(model, tok, [req], prefixes, module,
                                           dataclasses.replace(nll_stop, max_steps=alone.steps - k), frozen_below=1)
                           for k in (1, 2))
            assert torch.allclose(same.delta[0], alone.delta[0], rtol=1e-5, atol=1e-6)
            for delta, want in ((alone.delta[0], True), (fewer.delta[0], False)):
                leads = []
                for text, end in prefixed_texts(req, prefixes):
                    ids_list, subj_last = subject_last_index(tok, text, end)
                    ids = torch.tensor([ids_list])
                    tgt = target_ids(tok, req.target_new)
                    full = torch.cat([ids, torch.tensor([tgt[:-1]], dtype=ids.dtype)], 1)

                    def add(out, delta=delta, subj_last=subj_last):
                        out = out.clone()
                        out[:, subj_last] += delta.to(out.dtype)
                        return out
                    with torch.no_grad(), Hooks(model) as hooks:
                        hooks.edit_output(module, add)
                        logp = torch.log_softmax(model(input_ids=full).logits[0].float(), -1)
                    for j, t in enumerate(tgt):
                        row = logp[ids.shape[1] - 1 + j].clone()
                        lead = row[t] - row.scatter(0, torch.tensor([t]), float("-inf")).max()
                        leads.append(float(lead))
                assert (min(leads) >= margin - 1e-4) == want, (margin, req.subject, want, leads)
    retry = dataclasses.replace(nll_stop, early_stop="most_probable")
    full = optimise_values(model, tok, reqs[:1], prefixes, module, retry, frozen_below=1, stop_nll=torch.zeros(1))
    assert full.steps == retry.max_steps
    with pytest.raises(InvalidRequestError, match="early_stop"):
        ValueParams(early_stop="sometimes")
    with pytest.raises(InvalidRequestError, match="early_stop_margin"):
        ValueParams(early_stop_margin=-1.0)


def test_memit_factors_solve_the_least_squares_problem():
    """ΔW = U Vᵀ minimises Σ_i w_i‖ΔW k_i − r_i‖² + λ tr(ΔW C ΔWᵀ): its gradient vanishes, for mean keys
    and for per-prompt keys (weights 1/m); with one prompt per request both modes agree."""
    from editserve.editing.memit import memit_factors

    g = torch.Generator().manual_seed(0)
    d_in, d_out, n, m, lam = 12, 7, 3, 4, 2.5
    x = torch.randn(50, d_in, generator=g, dtype=torch.float64)
    cov = x.T @ x / 50                                               # [d_in, d_in]
    pk = torch.randn(n, m, d_in, generator=g, dtype=torch.float64)   # per-prompt keys
    keys = pk.mean(1)                                                # [n, d_in]
    resid = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    for prompt_keys in (None, pk):
        u, v = memit_factors(cov, keys, resid, lam, prompt_keys)
        assert u.shape == (d_out, n) and v.shape == (d_in, n) and u.dtype == torch.float32
        dw = u.double() @ v.double().T                                # [d_out, d_in]
        ks = keys[:, None, :] if prompt_keys is None else prompt_keys  # [n, m', d_in]
        w = 1.0 / ks.shape[1]
        err = torch.einsum("oi,nmi->nmo", dw, ks) - resid[:, None, :]  # [n, m', d_out]
        grad = w * torch.einsum("nmo,nmi->oi", err, ks) + lam * dw @ cov
        assert grad.abs().max() < 1e-5, grad.abs().max()
    one = pk[:, :1]
    a = memit_factors(cov, one[:, 0], resid, lam)
    b = memit_factors(cov, one[:, 0], resid, lam, one)
    assert torch.allclose(a[1], b[1], rtol=1e-5, atol=1e-6)


def test_memit_keys_mode_is_checked():
    from editserve.editing.hparams import load_hparams

    assert load_hparams("memit", ["llama"], {"keys": "per_prompt"}).keys == "per_prompt"
    with pytest.raises(InvalidRequestError, match="'median'"):
        load_hparams("memit", ["llama"], {"keys": "median"})


def test_spread_weights_are_checked_and_follow_the_layer_range():
    """``spread``: one positive weight per layer of the range, () for MEMIT's equal shares; layers
    other than the file's drop the file's weights (they belong to its range)."""
    from editserve.editing.edit import resolve_hparams
    from editserve.editing.hparams import class_defaults, load_hparams, to_dict

    hp = load_hparams("alphaedit", ["llama"], {"layers": [1, 2, 3], "spread": [3, 2, 1]})
    assert hp.spread == (3, 2, 1) and to_dict(hp)["spread"] == [3, 2, 1]
    assert class_defaults("memit")["spread"] == [] and class_defaults("alphaedit")["spread"] == []
    for bad, fragment in (([3, 2], "2 weight(s) for 3 layer(s) [1, 2, 3]"), ([1, 0, 1], "positive"),
                          ([1, -1, 1], "positive"), ([1, True, 1], "positive"), ([1, float("nan"), 1], "nan")):
        with pytest.raises(InvalidRequestError, match=re.escape(fragment)):
            load_hparams("memit", ["llama"], {"layers": [1, 2, 3], "spread": bad})
    model = tiny_model("llama")                                                         # 4 layers
    model.editserve_checkpoint = "smollm2-135m-instruct"
    assert resolve_hparams(model, "alphaedit", [1, 2, 3]).spread == ()                  # another range
    assert resolve_hparams(model, "alphaedit", [1, 2, 3], {"spread": [1, 1, 2]}).spread == (1, 1, 2)
    assert resolve_hparams(model, "memit", [1, 2]).spread == ()


def test_default_hparams_skip_the_methods_whose_defaults_do_not_fit(caplog):
    """`default_hparams` (the sidecar's prefix sampling, the statistics warm-up): each method's file
    defaults, in order; a method whose default layers the model lacks is skipped and logged."""
    import logging

    from editserve.editing.edit import default_hparams, resolve_hparams

    methods = ("alphaedit", "rome", "memit")
    fits = tiny_model("llama", n_layers=6)                          # SmolLM2's defaults: layers 1-5
    fits.editserve_checkpoint = "smollm2-135m-instruct"
    assert list(default_hparams(fits, methods, "test")) == [resolve_hparams(fits, m) for m in methods]
    small = tiny_model("llama", n_layers=4)
    small.editserve_checkpoint = "smollm2-135m-instruct"
    with caplog.at_level(logging.INFO, logger="editserve.editing.edit"):
        assert list(default_hparams(small, methods, "statistics warm-up")) == []
    skipped = [r.getMessage() for r in caplog.records if r.name == "editserve.editing.edit"]
    assert [m.split(" hyper-parameters")[0] for m in skipped] == [
        f"statistics warm-up: no default {m}" for m in methods]


def test_spread_weights_move_the_update_to_the_front_layers(env):
    """Equal weights are MEMIT's spread (the same patch up to rounding); front-loaded weights ask
    the first layer for a larger share of the residual, and the edit still lowers the target's NLL."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    reqs = [EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome")]
    hp = {**FAST, "cov_weight": 1.0}
    plain = compute_patch(model, tok, reqs, method="memit", layers=[0, 1, 2], hparams=hp, corpus=env)
    equal = compute_patch(model, tok, reqs, method="memit", layers=[0, 1, 2], hparams={**hp, "spread": [1, 1, 1]},
                          corpus=env)
    front = compute_patch(model, tok, reqs, method="memit", layers=[0, 1, 2], hparams={**hp, "spread": [6, 2, 1]},
                          corpus=env)

    def norms(p):
        return [float((d.u @ d.v.T).norm()) for d in p.deltas]

    assert norms(equal) == pytest.approx(norms(plain), rel=1e-4)
    # the first layer is asked for 6/9 of the residual instead of 1/3: its (linear) solve doubles
    assert norms(front)[0] == pytest.approx(2 * norms(plain)[0], rel=1e-4), (norms(plain), norms(front))
    assert front.hparams["spread"] == [6, 2, 1] and plain.hparams["spread"] == []
    before = target_nll(model, tok, [reqs[0].text], [" Rome"])
    apply_patch(model, front)
    assert (target_nll(model, tok, [reqs[0].text], [" Rome"]) < before - 0.05).all()


def test_a_nested_group_given_in_part_keeps_the_methods_own_defaults():
    """GateParams' value settings are not ValueParams' defaults: an override of one value field keeps the
    others of the method (a rebase replays a gated patch's stored hyper-parameters over them too)."""
    from editserve.editing.hparams import GateParams, ValueParams, class_defaults, load_hparams

    hp = load_hparams("gated", ["no-such-model"], {"value": {"max_steps": 10}, "margin": 8})
    assert hp.margin == 8 and hp.value.max_steps == 10
    assert (hp.value.lr, hp.value.clamp_norm_factor) == (GateParams().value.lr, GateParams().value.clamp_norm_factor)
    assert (hp.value.lr, hp.value.clamp_norm_factor) != (ValueParams().lr, ValueParams().clamp_norm_factor)
    assert load_hparams("gated", ["no-such-model"], class_defaults("gated")) == GateParams()
    assert load_hparams("rome", ["no-such-model"], {"value": {"max_steps": 10}}).value.lr == ValueParams().lr
    with pytest.raises(InvalidRequestError, match="gate negatives must be a positive integer, got 0"):
        load_hparams("gated", ["no-such-model"], {"negatives": 0})


def test_which_methods_read_covariance_statistics():
    """The sidecar waits for the warm-up's statistics only for the methods that read them."""
    from editserve.editing.hparams import StatsParams, load_hparams, statistics_of

    for method in ("rome", "memit", "alphaedit"):
        assert statistics_of(load_hparams(method, ["no-such-model"], {"stats": {"n_tokens": 64}})) == StatsParams(n_tokens=64)
    assert statistics_of(load_hparams("gated", ["no-such-model"])) is None
