"""Lifelong editing, fast version (bench/lifelong.py is the full benchmark): 30 known CounterFact
records committed one after another on SmolLM2-135M, each computed on the model holding the
earlier ones, once with AlphaEdit (preserved-keys state carried), once with plain ROME and once as
gated edits in the neuron slots of a widened copy of the model; then
AlphaEdit's commits written to a ledger and consolidated there by ``editserve ledger consolidate``
after 15 and again after 30 commits (the second incremental: editing/consolidate.py, ledger/consolidation.py).
AlphaEdit and gated edits must retain the edits, keep neighbourhood facts and held-out perplexity at
least as well as ROME, and above absolute floors. About 8 minutes on a quiet 2-core machine."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

from editserve.editing import load_model
from editserve.editing.alphaedit import PreservedKeys
from editserve.editing.corpus import load_corpus
from editserve.editing.counterfact import load_counterfact
from editserve.editing.edit import resolve_hparams
from editserve.editing.evaluate import known_records, score_records, summarize
from editserve.editing.lifelong import commit, consolidate_model, down_proj_weights, heldout_perplexity, norm_growth
from editserve.ledger import Ledger
from editserve.patches import applied_patches, remove_patch

# ../shared from the repository root; one level further up from a worktree under /work/wt/<name>
DATA = next((p / "shared" / "data" / "counterfact" / "counterfact-edit.json" for p in Path(__file__).resolve().parents[2:4]
             if (p / "shared" / "data" / "counterfact" / "counterfact-edit.json").exists()),
            Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact-edit.json")
N = 30
HALF = 15                      # consolidated after HALF commits, and again after N (incrementally)


REVERTED = 5                   # the version taken out of the consolidation again


@pytest.fixture(scope="module")
def setup():
    model, tok = load_model()
    records = load_counterfact(DATA, limit=60)
    found = known_records(model, tok, records, N)
    assert len(found.records) == N and found.scanned == len(records) and all(s.es == 0.0 for s in found.scores)
    known = list(zip(found.records, found.scores))
    return model, tok, known, heldout_perplexity(model, tok), down_proj_weights(model)


def _stream(model, tok, known, method):
    corpus = load_corpus(None)
    state = PreservedKeys()
    committed = []                       # (patch, its own key blocks) in commit order
    for rec, _ in known:
        res = commit(model, tok, [rec.request], method, state, corpus)
        state = res.preserved
        committed.append((res.patch, state.for_patch(res.patch.digest)))
    after = summarize(score_records(model, tok, [r for r, _ in known]))
    return after, state, committed


def _cli(argv: list[str]) -> tuple[int, str]:
    from editserve.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue() + err.getvalue()


def _consolidate_through_the_cli(model, committed, snap, root: Path) -> tuple[int, str, dict[str, torch.Tensor],
                                                                             dict[str, torch.Tensor]]:
    """The commits written to a SQLite ledger as the server's sidecar writes them, with
    ``editserve ledger consolidate`` run after the first HALF and again after all of them (the
    second takes in only the commits since the first, on every committed key): (exit code of the
    second, both outputs, the head's weights, the weights just before the second)."""
    from editserve.editing.model import fingerprint

    names = sorted({d.name for p, _ in committed for d in p.deltas})
    texts = []
    for part in (committed[:HALF], committed[HALF:]):
        with Ledger.open(root, fingerprint(model), create=True) as ledger:
            for patch, own in part:
                ledger.commit(patch, expected_head=ledger.head(), base={n: snap[n] for n in names}, preserved=own)
            before = ledger.weights.materialize(names=names)
        rc, text = _cli(["ledger", "consolidate", "--ledger", str(root)])
        texts.append(text)
    with Ledger.open(root, fingerprint(model)) as ledger:
        return rc, "".join(texts), ledger.weights.materialize(names=names), before


def _revert_one_through_the_cli(model, root: Path, version: int) -> tuple[int, str, dict[str, torch.Tensor]]:
    """``editserve ledger revert V --rebase`` on the consolidated ledger (V's fact is in a consolidated
    patch, so its consolidation is re-solved without it; nothing was committed after it to recompute):
    (exit code, its output, the head's weights)."""
    from editserve.editing.model import fingerprint

    rc, text = _cli(["ledger", "revert", str(version), "--rebase", "--max-drop", "0.05",
                     "--ledger", str(root)])
    with Ledger.open(root, fingerprint(model)) as ledger:
        names = [n for n in ledger.weights.base_names()]
        return rc, text, ledger.weights.materialize(names=names)


@pytest.fixture(scope="module")
def results(setup, tmp_path_factory):
    model, tok, known, ppl0, w0 = setup
    ns0 = summarize([s for _, s in known]).ns
    out = {}
    for method in ("alphaedit", "rome"):
        snap = {n: p.detach().clone() for n, p in model.named_parameters()}
        after, state, committed = _stream(model, tok, known, method)
        out[method] = {"es": after.es, "ps": after.ps, "ns_ratio": after.ns / ns0,
                       "ppl_ratio": heldout_perplexity(model, tok) / ppl0,
                       "norm": max(norm_growth(model, w0).values()), "state": state}
        if method == "alphaedit":
            # the accumulated update re-solved on the committed keys: as a ledger version written by
            # the CLI (what is scored), and by the library on the model (which must agree with it)
            root = tmp_path_factory.mktemp("cons") / "ledger"
            rc, text, weights, before = _consolidate_through_the_cli(model, committed, snap, root)
            params = dict(model.named_parameters())
            with torch.no_grad():                   # the library's re-solve of everything the ledger held
                for n, w in before.items():        # before its second (incremental) consolidation
                    params[n].copy_(w)
            layers = consolidate_model(model, tok, state, load_corpus(None), w0)
            assert not applied_patches(model) and sorted(layers) == list(state.layers)
            library_gap = max(float((params[n] - w).abs().max() / (w - snap[n]).abs().max()) for n, w in weights.items())
            with torch.no_grad():
                for n, w in weights.items():
                    params[n].copy_(w)
            cons = summarize(score_records(model, tok, [r for r, _ in known]))
            out["consolidated"] = {"es": cons.es, "ps": cons.ps, "ns_ratio": cons.ns / ns0,
                                   "ppl_ratio": heldout_perplexity(model, tok) / ppl0,
                                   "norm": max(norm_growth(model, w0).values()), "library_gap": library_gap,
                                   "penalty": {k: (c.penalty_before, c.penalty_after) for k, c in layers.items()},
                                   "cli": (rc, text)}
            # one fact (version REVERTED) taken out of the consolidated patch by the CLI
            before_revert = score_records(model, tok, [r for r, _ in known])
            rc2, text2, weights2 = _revert_one_through_the_cli(model, root, REVERTED)
            with torch.no_grad():
                for n, w in weights2.items():
                    params[n].copy_(w)
            after_revert = score_records(model, tok, [r for r, _ in known])
            out["reverted"] = {"cli": (rc2, text2), "before": before_revert, "after": after_revert}
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(snap[n])
        for p in reversed(applied_patches(model)):
            remove_patch(model, p)
        assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters())
    # gated edits, the default of a server with neuron slots: on a second copy of the model, widened at the
    # gated layer as `editserve serve --neuron-slots` widens the sidecar's copy
    from editserve.editing.slots import slot_of, widen_mlp

    gmodel, _ = load_model()
    slots = widen_mlp(gmodel, resolve_hparams(gmodel, "gated").layer, N)
    after, _, committed = _stream(gmodel, tok, known, "gated")
    out["gated"] = {"es": after.es, "ps": after.ps, "ns_ratio": after.ns / ns0,
                    "ppl_ratio": heldout_perplexity(gmodel, tok) / ppl0,
                    "norm": max(norm_growth(gmodel, w0).values(), default=0.0), "slots": ([slot_of(p) for p, _ in committed], slots)}
    print({m: {k: v for k, v in r.items() if k not in ("state", "penalty", "cli", "before", "after")}
           for m, r in out.items()})
    return out


def test_alphaedit_state_holds_every_commit(results, setup):
    model = setup[0]
    state = results["alphaedit"]["state"]
    assert len(state.tags) == N
    hp = resolve_hparams(model, "alphaedit")
    assert state.layers == tuple(hp.layers)
    per_edit = 1 + hp.prefixes.n_prefixes if hp.keys == "per_prompt" else 1     # memit.preserved_columns
    assert all(state.n_keys(layer) == N * per_edit for layer in state.layers)


def test_alphaedit_at_least_as_good_as_rome(results):
    a, r = results["alphaedit"], results["rome"]
    # absolute floors (measured 30-edit values are in docs/lifelong.md)
    assert a["es"] >= 0.9 and a["ps"] >= 0.6
    assert a["ns_ratio"] >= 0.9 and a["ppl_ratio"] <= 1.03
    # against plain ROME on the same stream (one edit of slack on the retention shares)
    assert a["es"] >= r["es"] - 1 / N
    assert a["ns_ratio"] >= r["ns_ratio"] - 1 / N
    assert a["ppl_ratio"] <= r["ppl_ratio"] + 0.002


def test_gated_edits_at_least_as_good_as_rome(results):
    """The same 30 commits as gated edits (one neuron per fact, each in the next free slot): the facts are
    retained, neighbourhoods and held-out perplexity stay (floors, and against plain ROME on the same
    stream), and the model's own neurons are untouched."""
    g, r = results["gated"], results["rome"]
    taken, slots = g["slots"]
    assert taken == list(slots)
    assert g["es"] >= 0.9 and g["ps"] >= 0.6
    assert g["ns_ratio"] >= 0.9 and g["ppl_ratio"] <= 1.01
    assert g["norm"] == 0
    assert g["es"] >= r["es"] - 1 / N
    # ROME's ratio can exceed 1 (its damage moves some neighbours' answers away from the new targets: measured
    # 1.042 on this stream); an edit that leaves the neighbourhoods as they were stays at 1
    assert g["ns_ratio"] >= min(r["ns_ratio"], 1.0) - 1 / N
    assert g["ppl_ratio"] <= r["ppl_ratio"] + 0.002


def test_consolidation_keeps_the_edits_and_lowers_the_damage(results):
    """The 30 AlphaEdit commits' update re-solved on their keys (editing/consolidate.py), written as
    ledger versions by ``editserve ledger consolidate`` after 15 commits and again after 30 (the
    second re-solves only the 15 since, on all 30 keys, and keeps the first; its check scores all 30
    facts): the edits and neighbourhoods hold as well (one edit of slack), the held-out perplexity is
    no worse and the largest relative change of a weight is smaller; the library's one re-solve of
    all 30 on the model gives the same weights (incremental = whole on the real model)."""
    a, c = results["alphaedit"], results["consolidated"]
    rc, text = c["cli"]
    assert rc == 0, text
    assert f"version {HALF + 1}: consolidated {HALF} patches" in text, text
    assert (f"{N - HALF} patches with preserved keys" in text and "1 consolidated before kept as they are" in text
            and f"version {N + 2}: consolidated {N - HALF} patches" in text), text
    held = re.findall(r"committed facts that hold: (\d+)/(\d+) before, (\d+)/(\d+) after", text)
    assert len(held) == 2 and int(held[1][1]) == N and int(held[1][2]) >= int(held[1][0]), text   # every fact checked
    assert c["library_gap"] < 1e-3
    assert all(after < before for before, after in c["penalty"].values())
    assert c["es"] >= a["es"] - 1 / N and c["ps"] >= a["ps"] - 2 / N
    assert c["ns_ratio"] >= a["ns_ratio"] - 1 / N
    assert c["ppl_ratio"] <= a["ppl_ratio"]
    assert c["norm"] < a["norm"]


def test_one_fact_reverted_out_of_the_consolidation(results):
    """``editserve ledger revert V --rebase`` on the consolidated ledger: the fact of version V stops
    holding (the model prefers the object it replaced again), the other 29 facts hold as they did in
    the consolidated patch (one edit of slack), and the CLI reports its check and the (no) later
    patches it recomputed."""
    r = results["reverted"]
    rc, text = r["cli"]
    assert rc == 0, text
    assert (f"the patch of version {REVERTED}" in text and f"consolidated patch of version {HALF + 1}" in text
            and f"version {N + 3}: reverted version {REVERTED}" in text
            and "0 later patch(es) recomputed" in text), text
    i = REVERTED - 1
    assert r["before"][i].es == 1.0 and r["after"][i].es == 0.0, (r["before"][i], r["after"][i])
    others_before = sum(s.es for j, s in enumerate(r["before"]) if j != i)
    others_after = sum(s.es for j, s in enumerate(r["after"]) if j != i)
    assert others_after >= others_before - 1, (others_before, others_after)
