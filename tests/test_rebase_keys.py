"""Issue 16.3, unit level: a rebase recomputes AlphaEdit's later patches against the preserved keys
rebuilt from the ledger (the kept patches' blocks plus the recomputed ones'), not against none
and not against the old state (which still held the reverted patch's keys).

Three AlphaEdit edits on a tiny llama are committed with their key blocks to a SQLite ledger; the
2nd is reverted with rebase (`ModelRecompute`, the path the CLI and the sidecar share). The
recomputed 3rd patch must be bit-identical to an AlphaEdit edit computed by hand on base + patch 1
with the state of version 1, and differ from one computed without preserved keys.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tests.tiny import TEXT, tiny_model, tiny_tokenizer

from editserve.editing import EditRequest, apply_patch, remove_patch
from editserve.editing.corpus import load_corpus
from editserve.editing.edit import compute_edit
from editserve.editing.hparams import StatsParams
from editserve.editing.model import fingerprint
from editserve.editing.stats import layer_stats
from editserve.ledger import Ledger, RebasePlan, RevertError
from editserve.ledger.rebase import ModelRecompute, probe_items
from editserve.patches import applied_patches

STATS = {"n_tokens": 200, "seq_len": 20}
HP = {"stats": STATS, "prefixes": {"n_prefixes": 0}, "alpha": 1.0,
      "value": {"max_steps": 10, "lr": 0.5, "kl_factor": 0.0, "clamp_norm_factor": 1e4, "weight_decay": 0.0}}
LAYERS = [1, 2]
REQS = [EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome",
                    target_true=" Paris"),
        EditRequest(prompt="{} speaks", subject="Michel Rocard", target_new=" English", target_true=" French"),
        EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new=" piano", target_true=" guitar")]


def _same(a, b) -> bool:
    return (len(a.blocks) == len(b.blocks) and
            all(x.tag == y.tag and x.layer == y.layer and torch.equal(x.keys, y.keys) for x, y in zip(a.blocks, b.blocks)))


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSERVE_HOME", str(tmp_path / "home"))
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n".join(TEXT * 3))
    corpus = load_corpus(corpus_file)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    # an eigenvalue threshold keeping ~60% of each edited layer's directions (as in test_alphaedit.py)
    stats, _ = layer_stats(model, tok, LAYERS, corpus, fingerprint(model), StatsParams(**STATS), progress=False)
    thr = max(float(torch.quantile(torch.linalg.eigvalsh(s.cov.double()), 0.6)) for s in stats.values())
    hp = {**HP, "nullspace_threshold": thr}
    params = dict(model.named_parameters())
    patches, state, base = [], None, None
    for r in REQS:
        res = compute_edit(model, tok, [r], method="alphaedit", layers=LAYERS, hparams=hp, corpus=corpus,
                           preserved=state)
        if base is None:
            base = {d.name: params[d.name].detach().clone() for d in res.patch.deltas}
        apply_patch(model, res.patch)
        patches.append((res.patch, res.preserved.for_patch(res.patch.digest)))
        state = res.preserved
    for p, _ in reversed(patches):
        remove_patch(model, p)
    ledger = Ledger.open(tmp_path / "ledger", fingerprint(model), create=True)
    for i, (p, own) in enumerate(patches):
        ledger.commit(p, expected_head=ledger.head(), base=base, preserved=own, probe_report={"marker": i + 1})
    yield ledger, model, tok, corpus, patches
    ledger.close()


def test_alphaedit_rebase_uses_the_rebuilt_preserved_keys(setup) -> None:
    ledger, model, tok, corpus, patches = setup
    steps = []
    recompute = ModelRecompute(model, tok, corpus=corpus)

    def spy(step):
        steps.append(step)
        return recompute(step)

    plan = ledger.plan_rebase(2, spy)
    assert not applied_patches(model)                               # the model is back at its base
    assert isinstance(plan, RebasePlan) and plan.kept == (patches[0][0].digest,)
    assert plan.replaced == (patches[2][0].digest,) and len(plan.outcomes) == 1
    (step,) = steps
    # the step's states: old = the state at version 2 (patches 1, 2), new = the state at version 1
    assert _same(step.old_preserved, ledger.preserved_keys(2))
    assert _same(step.new_preserved, ledger.preserved_keys(1)) and step.new_preserved.tags == (patches[0][0].digest,)
    new = plan.outcomes[0].patch
    # by hand: AlphaEdit on base + patch 1 with the state of version 1 gives the same patch, bit for bit
    apply_patch(model, patches[0][0])
    try:
        want = compute_edit(model, tok, [REQS[2]], method="alphaedit", hparams=step.hparams, corpus=corpus,
                            preserved=ledger.preserved_keys(1))
        without = compute_edit(model, tok, [REQS[2]], method="alphaedit", hparams=step.hparams, corpus=corpus)
    finally:
        remove_patch(model, patches[0][0])
    assert want.patch.digest == new.digest
    assert without.patch.digest != new.digest                        # the preserved keys changed the update
    assert all(torch.equal(a.v, b.v) for a, b in zip(want.patch.deltas, new.deltas))
    # the recomputed patch's own key blocks travel with it
    assert _same(plan.outcomes[0].keys, want.preserved.for_patch(new.digest))

    res = ledger.revert(2, caller="test", rebase=plan, expected_head=3, idempotency_key="rebase-2")
    assert res.version == 4 and res.created and [r.original_version for r in res.rebased] == [3]
    assert ledger.active_ids(4) == (patches[0][0].digest, new.digest)
    # the state of the new version: patch 1's blocks, then the recomputed patch's, rebuilt from the ledger
    assert _same(ledger.preserved_keys(4), ledger.preserved_keys(1).extend(want.preserved.for_patch(new.digest)))
    info = ledger.version(4)
    assert info.details["mode"] == "rebase" and info.details["reverted"] == 2
    r = info.details["rebased"][0]
    assert {"efficacy", "efficacy.margin", "fact0.logprob_new", "fact0.logprob_true"} <= set(r["metrics_after"])
    assert set(r["changes"]) == set(r["metrics_before"]) & set(r["metrics_after"])
    # a repeat with the same key writes nothing and returns the same result
    again = ledger.revert(2, caller="test", rebase=plan, expected_head=3, idempotency_key="rebase-2")
    assert (again.version, again.created) == (4, False) and again.rebased == res.rebased
    assert len(ledger.versions()) == 5

    # rebasing again (out the 1st at head 4): the recomputed patch's old context is what was below it
    # in the version that added it (patch 1), and its probe report is its original commit's
    steps.clear()
    ledger.plan_rebase(1, spy)
    (step,) = steps
    assert step.version == 4 and step.old_patch.digest == new.digest
    assert [p.digest for p in step.old_context] == [patches[0][0].digest] and step.new_context == ()
    assert _same(step.old_preserved, ledger.preserved_keys(1)) and step.new_preserved.blocks == ()
    assert step.old_probe_report == {"marker": 3}


def test_plan_checks(setup) -> None:
    ledger, model, tok, corpus, patches = setup
    with pytest.raises(RevertError, match="version 0"):
        ledger.plan_rebase(0, ModelRecompute(model, tok, corpus=corpus))
    with pytest.raises(RevertError, match="last active patch"):
        ledger.plan_rebase(3, ModelRecompute(model, tok, corpus=corpus))
    plan = ledger.plan_rebase(2, ModelRecompute(model, tok, corpus=corpus, hparams_overrides={"value": {"max_steps": 2}}))
    # a plan is written only for the revert and the head it was computed for
    with pytest.raises(RevertError, match="computed for reverting version 2 at head 3"):
        ledger.revert(1, rebase=plan)
    with pytest.raises(RevertError, match="at head 2, not version 2 at head 3"):
        ledger.revert(2, rebase=replace(plan, head=2), expected_head=3)
    assert ledger.head() == 3 and len(ledger.versions()) == 4


def test_probe_items_follow_the_recorded_gate_report() -> None:
    from editserve.ledger import RebaseStep
    from editserve.patches import Patch

    gate_rows = [{"kind": "efficacy", "prompt": REQS[0].text, "target_new": " Rome", "target_true": " Paris"},
                 {"kind": "neighbourhood", "prompt": "The Louvre is located in the city of", "target_new": " Rome",
                  "target_true": " Paris"}]
    patch = Patch(deltas=(), requests=(REQS[0],), method="rome", hparams={}, model_fingerprint="f" * 64, family="llama")
    step = RebaseStep(version=1, old_patch=patch, old_context=(), new_context=(),
                      old_probe_report={"gate": {"rows": gate_rows}})
    items = probe_items(step)
    assert [(i.kind, i.fact) for i in items] == [("efficacy", 0), ("neighbourhood", -1)]
    bare = probe_items(replace(step, old_probe_report=None))
    assert [(i.kind, i.prompt, i.target_true) for i in bare] == [("efficacy", REQS[0].text, " Paris")]


def test_rebase_replays_fields_a_patch_predates_with_class_defaults() -> None:
    """A patch computed before `cov_weight` (or `value.escalate_clamp`) existed stores no such field; its
    rebase must replay it as computed (λ = 0, no escalation), not with today's per-model file (λ = 750)."""
    from editserve.editing.hparams import load_hparams, to_dict
    from editserve.ledger.rebase import _deep_merge, _defaults

    today = load_hparams("alphaedit", ["smollm2-135m-instruct"])
    assert today.cov_weight == 750.0
    stored = to_dict(today)
    del stored["cov_weight"], stored["value"]["escalate_clamp"]
    replayed = load_hparams("alphaedit", ["smollm2-135m-instruct"], _deep_merge(_defaults("alphaedit"), stored))
    assert replayed.cov_weight == 0.0 and replayed.value.escalate_clamp == ()
    assert replayed.layers == today.layers and replayed.value.clamp_norm_factor == today.value.clamp_norm_factor
