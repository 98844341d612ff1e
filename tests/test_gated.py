"""Gated edits (editing/gated.py): the gate fit, the bank's hook, and one edit on a tiny llama and on
the embedded SmolLM2 — it holds on its prompt and a paraphrase while ordinary text barely moves."""

from __future__ import annotations

import pytest
import torch

from editserve.editing import EditRequest
from editserve.editing.gated import GateBank, GateParams, fit_gate, gated_edit, mlp_inputs, subject_inputs
from editserve.editing.hparams import ValueParams
from editserve.editing.scoring import target_nll
from editserve.errors import InvalidRequestError
from tests.tiny import TEXT, tiny_model, tiny_tokenizer


def test_fit_gate_scales_the_least_subject_input_to_the_margin():
    torch.manual_seed(0)
    centre = torch.randn(16)
    pos = centre + 0.05 * torch.randn(6, 16)
    neg = 0.5 * torch.randn(500, 16) - centre                                        # all lean away from the subject
    g = fit_gate(pos, neg, GateParams(margin=4.0))
    assert torch.isclose((pos @ g).min(), torch.tensor(4.0), atol=1e-4)
    assert (neg @ g).max() < 0, "separable data: every ordinary input must fall where silu is closed"


def test_fit_gate_refuses_inputs_it_cannot_separate():
    x = torch.ones(8)
    with pytest.raises(InvalidRequestError, match="cannot separate"):
        fit_gate(x[None], 2 * x[None].repeat(50, 1), GateParams())     # every ordinary input is 2× the subject's


def test_fit_gate_with_a_guard_stays_shut_on_earlier_subjects():
    """An earlier subject that leans the way this one does opens an unguarded gate; the guard shuts it,
    except on inputs equal to this subject's own (the same subject edited again)."""
    torch.manual_seed(0)
    centre = torch.randn(16)
    pos = centre + 0.05 * torch.randn(6, 16)
    neg = 0.5 * torch.randn(500, 16) - centre
    side = torch.randn(16)
    side -= (side @ centre) / (centre @ centre) * centre                          # ⊥ the subject
    earlier = 0.8 * centre + 0.6 * side * centre.norm() / side.norm() + 0.05 * torch.randn(11, 16)
    open_ = fit_gate(pos, neg, GateParams(margin=4.0))
    assert (earlier @ open_).max() > 0, "the case this guards against: an earlier subject opens the gate"
    shut = fit_gate(pos, neg, GateParams(margin=4.0, guard=0.5), torch.cat([earlier, pos[:2]]))
    assert torch.isclose((pos @ shut).min(), torch.tensor(4.0), atol=1e-4)
    assert (earlier @ shut).max() < 0 and (neg @ shut).max() < 0


@pytest.mark.parametrize("field, value", [("margin", 0), ("strength", -1.0), ("l2", -1e-3), ("layer", -2), ("value_prefixes", 1.5),
                                          ("guard", 1.0), ("guard", -0.1)])
def test_gate_params_name_the_bad_value(field, value):
    with pytest.raises(InvalidRequestError, match=field):
        GateParams(**{field: value})


def test_gated_edit_on_a_tiny_llama_fires_on_its_subject_only():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    req = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome")
    params = GateParams(layer=1, value_prefixes=0,
                        value=ValueParams(max_steps=30, lr=0.5, kl_factor=0.0, clamp_norm_factor=1e4, weight_decay=0.0))
    other = [t for t in TEXT if "Eiffel" not in t]
    ids = tok(other[:6], padding=True, return_tensors="pt")["input_ids"]
    neg = mlp_inputs(model, 1, ids)                                                  # [6·T, d]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x_other = tok(other[0], return_tensors="pt")["input_ids"]
    logits_before = model(input_ids=x_other).logits
    nll_before = target_nll(model, tok, [req.text], [req.target_new])

    bank = GateBank(1, model.config.hidden_size)
    neuron = gated_edit(model, tok, req, (), neg, params)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "computing must not change the model"
    bank.add(neuron)
    pos = subject_inputs(model, tok, req, (), 1)
    assert torch.isclose(neuron.activation(pos)[0], torch.tensor(1.0), atol=1e-4)    # a = 1 on the subject
    a_neg = neuron.activation(neg).abs()
    assert a_neg.mean() < 0.01 and a_neg.max() < 0.25                               # ≈ 0 on ordinary tokens
    with bank.applied(model):
        nll_after = target_nll(model, tok, [req.text], [req.target_new])
        moved = (model(input_ids=x_other).logits - logits_before).abs().max()
    assert nll_after < nll_before - 0.5, (nll_before, nll_after)
    # A random 32-wide model separates its subject less cleanly than SmolLM2 (next test): a bound, not ≈ 0.
    assert moved < 0.25 * (nll_before - nll_after).abs().item(), moved
    # Outside `applied` the hook is gone: the model computes exactly what it did.
    assert torch.equal(model(input_ids=x_other).logits, logits_before)


@pytest.fixture(scope="module")
def smollm():
    from editserve.editing import load_model

    return load_model()


def test_gated_edit_on_smollm2_holds_and_leaves_ordinary_text(smollm):
    """The Eiffel Tower → Rome as one gated neuron at layer 5: the prompt and a paraphrase answer Rome,
    a close neighbour (the Louvre) keeps Paris, and the held-out prose moves by less than 0.05 %
    (a ROME edit of the same fact moves it by ×1.0006: tests/test_damage_server.py)."""
    from editserve.editing.corpus import load_corpus
    from editserve.editing.edit import resolve_hparams
    from editserve.editing.lifelong import heldout_perplexity
    from editserve.editing.model import fingerprint
    from editserve.editing.prefixes import context_prefixes

    model, tok = smollm
    params = GateParams()
    prefixes = context_prefixes(model, tok, fingerprint(model), resolve_hparams(model, "rome").prefixes)
    ids = tok(load_corpus().text[:20000], add_special_tokens=False)["input_ids"][: 8 * 256]
    neg = mlp_inputs(model, params.layer, torch.tensor(ids).view(8, 256))
    req = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome")
    para = "Where is the Eiffel Tower? It is in the city of"
    near = "The Louvre is located in the city of"

    def prefers_rome(prompt: str) -> bool:
        nll = target_nll(model, tok, [prompt, prompt], [" Rome", " Paris"])
        return bool(nll[0] < nll[1])

    assert not any(prefers_rome(p) for p in (req.text, para, near))
    p0 = heldout_perplexity(model, tok)
    bank = GateBank(params.layer, model.config.hidden_size)
    bank.add(gated_edit(model, tok, req, prefixes, neg, params))
    with bank.applied(model):
        assert prefers_rome(req.text) and prefers_rome(para)
        assert not prefers_rome(near)
        ratio = heldout_perplexity(model, tok) / p0
    assert abs(ratio - 1) < 5e-4, ratio                       # measured ×0.999976 (margin 6: ×0.99973)
    assert heldout_perplexity(model, tok) == p0
