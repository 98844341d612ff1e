"""Real edits on the embedded SmolLM2-135M: the public API, and the acceptance thresholds on a
fast CounterFact subset (the full 200-edit run is `make eval` / bench/edit_bench.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from editserve.editing import EditRequest, apply_patch, compute_patch, load_model, remove_patch
from editserve.editing.counterfact import load_counterfact
from editserve.editing.evaluate import evaluate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact-edit.json"


@pytest.fixture(scope="module")
def smollm():
    return load_model()


def _complete(model, tok, prompt, n=3):
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0][ids.shape[1]:])


def _digest(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_public_api_round_trip(smollm):
    model, tok = smollm
    req = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome")
    assert _complete(model, tok, req.text).startswith(" Paris")
    before = _digest(model)
    patch = compute_patch(model, tok, [req], method="rome")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "compute_patch changed the model"
    assert patch.method == "rome" and len(patch.deltas) == 1 and patch.deltas[0].rank == 1
    assert patch.deltas[0].u.dtype == torch.float32 and patch.model_fingerprint
    apply_patch(model, patch)
    assert _complete(model, tok, req.text).startswith(" Rome")
    assert _complete(model, tok, "Where is the Eiffel Tower? It is in the city of").startswith(" Rome")
    assert _complete(model, tok, "The Louvre is located in the city of").startswith(" Paris")
    remove_patch(model, patch)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "remove_patch is not bit-identical"
    assert _complete(model, tok, req.text).startswith(" Paris")


def test_a_fact_without_its_replaced_object_holds_while_answered_greedily(smollm):
    """A committed fact whose replaced object is unknown (gate skipped, imported) holds while the
    model answers its new target greedily; the retention check names it when a real patch breaks it.
    Facts with a known replaced object score exactly as before."""
    from editserve.control.gate import check_retention
    from editserve.editing.retention import CommittedFact, RetentionGate, facts_hold

    model, tok = smollm
    prompt = "The Eiffel Tower is located in the city of"
    paris = CommittedFact(1, prompt, "The Eiffel Tower", " Paris", "")
    rome = CommittedFact(2, prompt, "The Eiffel Tower", " Rome", "")
    known = CommittedFact(2, prompt, "The Eiffel Tower", " Rome", " Paris")
    (p_ok, p_new, p_top), (r_ok, r_new, r_top), k = facts_hold(model, tok, [paris, rome, known])
    assert p_ok and p_new == p_top                                     # SmolLM2 answers " Paris"
    assert not r_ok and r_top > r_new and r_top == p_new               # the top token is " Paris"
    (alone,) = facts_hold(model, tok, [known])                         # as scored before (padding: float noise)
    assert alone[0] == k[0] is False and alone[1:] == pytest.approx(k[1:], abs=1e-5)
    assert k[1:] == pytest.approx((r_new, p_new), abs=1e-5)
    assert not facts_hold(model, tok, [CommittedFact(1, prompt, "The Eiffel Tower", " Paris Paris", "")])[0][0]

    req = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome")
    patch = compute_patch(model, tok, [req], method="rome")
    before = _digest(model)
    report = check_retention(model, tok, patch, [paris, known], RetentionGate(sample_size=4, max_drop=0.0))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert report["held_before"] == 1 and report["held_after"] == 1 and not report["passed"]
    (b,) = report["broken"]
    assert (b["target_new"], b["target_true"]) == (" Paris", "") and b["true_logprob_after"] > b["new_logprob_after"]
    apply_patch(model, patch)
    try:
        (p_ok, _, _), (r_ok, r_new, r_top) = facts_hold(model, tok, [paris, rome])
        assert not p_ok and r_ok and r_new == r_top
    finally:
        remove_patch(model, patch)


@pytest.fixture(scope="module")
def records():
    return load_counterfact(DATA, limit=80)  # tests read ../shared (DataError if it is missing)


def test_rome_fast_subset_meets_thresholds(smollm, records):
    model, tok = smollm
    report = evaluate(model, tok, records, lambda recs: compute_patch(model, tok, [recs[0].request], method="rome"),
                      n_known=10, batch=1, method="rome", progress=False)
    assert report.records_edited == 10
    assert report.after.es >= 0.95, report.after
    assert report.after.ps >= 0.70, report.after
    assert report.after.ns >= 0.9 * report.before.ns, (report.before, report.after)


def test_memit_fast_batch_meets_threshold(smollm, records):
    model, tok = smollm
    report = evaluate(model, tok, records,
                      lambda recs: compute_patch(model, tok, [r.request for r in recs], method="memit"),
                      n_known=10, batch=10, method="memit", progress=False)
    assert report.records_edited == 10
    assert report.after.es >= 0.90, report.after


def _holds_now(model, tok, req) -> bool:
    from editserve.editing.scoring import target_nll

    nll = target_nll(model, tok, [req.text, req.text], [req.target_new, req.target_true])
    return bool(nll[0] < nll[1])


@pytest.mark.parametrize("method", ["rome", "alphaedit"])
def test_clamp_escalation_retries_an_edit_that_does_not_hold(smollm, method):
    """A clamp too small for the edit (0.05·‖h‖) leaves the fact unchanged; with `escalate_clamp` the
    same request is recomputed with the next factor and holds; the model is never changed by computing."""
    model, tok = smollm
    req = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome",
                      target_true=" Paris")
    before = _digest(model)
    # `escalate_clamp: []` switches off the escalation a method's shipped hyper-parameters may carry
    # (SmolLM2's AlphaEdit file escalates to 1.5 and 4.0, so without it the weak edit would hold too).
    weak = compute_patch(model, tok, [req], method=method,
                         hparams={"value": {"clamp_norm_factor": 0.05, "escalate_clamp": []}})
    strong = compute_patch(model, tok, [req], method=method,
                           hparams={"value": {"clamp_norm_factor": 0.05, "escalate_clamp": [0.1, 4.0]}})
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "computing changed the model"
    assert weak.hparams["value"]["escalate_clamp"] == []
    assert strong.hparams["value"]["escalate_clamp"] == [0.1, 4.0]
    assert strong.timings["check"] > 0
    for patch, holds in ((weak, False), (strong, True)):
        apply_patch(model, patch)
        try:
            assert _holds_now(model, tok, req) is holds, (patch.hparams["value"], holds)
        finally:
            remove_patch(model, patch)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_escalate_clamp_must_rise():
    from editserve.editing.hparams import load_hparams
    from editserve.errors import InvalidRequestError

    for bad in ([0.5], [8.0, 6.0], ["x"], [-1.0]):
        with pytest.raises(InvalidRequestError, match="escalate_clamp"):
            load_hparams("rome", ["smollm2-135m-instruct"], {"value": {"clamp_norm_factor": 1.0, "escalate_clamp": bad}})
    hp = load_hparams("rome", ["smollm2-135m-instruct"], {"value": {"escalate_clamp": [8.0]}})
    assert hp.value.escalate_clamp == (8.0,)


def test_gate_names_a_subject_that_opens_the_prompt(smollm):
    """SmolLM2 adds no BOS token, so a one-token subject opening the prompt sits at position 0, which
    an edit at the subject cannot reach: the gate refuses the edit and says why and what to do; the
    same fact with words before the subject passes, and the first edit already changes such prompts."""
    from editserve.control.probe import opens_sequence, probe_gate

    model, tok = smollm
    bare = EditRequest(prompt="{} is located in", subject="Spain", target_new=" Antarctica", target_true=" Europe")
    assert opens_sequence(tok, bare)
    assert not opens_sequence(tok, EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new=" Rome"))
    assert not opens_sequence(tok, EditRequest(prompt="The country {} is located in", subject="Spain",
                                               target_new=" Antarctica"))
    report = probe_gate(model, tok, compute_patch(model, tok, [bare], method="alphaedit"), [bare])
    assert not report.passed and report.efficacy == 0.0
    (failure,) = [f for f in report.failures if f.startswith("efficacy")]
    assert "request 0's subject 'Spain' is its prompt's first token" in failure and "put words before" in failure
    assert any(r.kind == "paraphrase" and r.success for r in report.rows), report.rows   # words before: changed
    worded = EditRequest(prompt="The country {} is located in", subject="Spain", target_new=" Antarctica",
                         target_true=" Europe")
    report = probe_gate(model, tok, compute_patch(model, tok, [worded], method="alphaedit"), [worded])
    assert report.efficacy == 1.0 and not any("first token" in f for f in report.failures), report.failures
