"""Edit health (issue 16), without a server: the fact sample, the gate's retention check on a real
(tiny) model with a real ROME patch, the health settings and the retention metrics on a real scrape.

The end-to-end checks (a real vLLM server, /metrics, the gate refusing an edit that breaks an
earlier one, the drift gauge on rollback) are in tests/test_health_server.py.
"""

from __future__ import annotations

import math
import urllib.request

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from editserve.control.errors import DamageRejected
from editserve.control.gate import DamageGate, check_damage, check_retention, merge_damage, merge_retention
from editserve.editing import EditRequest, compute_patch
from editserve.editing.corpus import load_corpus
from editserve.editing.lifelong import heldout_perplexity
from editserve.editing.retention import CommittedFact, RetentionGate, facts_hold, sample_facts
from editserve.engine.health import HealthSettings, read_heldout_text
from editserve.errors import InvalidRequestError, MetricsError
from editserve.metrics import Metrics
from editserve.patches import apply_patch, remove_patch
from tests.test_metrics import Scraper
from tests.tiny import TEXT, tiny_model, tiny_tokenizer

FAST = {"stats": {"n_tokens": 200, "seq_len": 20}, "prefixes": {"n_prefixes": 0},
        "value": {"max_steps": 30, "lr": 0.5, "kl_factor": 0.0, "clamp_norm_factor": 1e4, "weight_decay": 0.0}}


def _fact(i: int, subject: str = "") -> CommittedFact:
    return CommittedFact(version=i, prompt=f"fact {i} is", subject=subject or f"S{i}", target_new=" a",
                         target_true=" b")


def test_sample_is_reproducible_bounded_and_puts_the_subject_at_risk_first():
    facts = [_fact(i) for i in range(1, 101)] + [_fact(101, "The Eiffel Tower")]
    a, b = sample_facts(facts, 10, seed=7), sample_facts(facts, 10, seed=7)
    assert a == b and len(a) == 10 and len(set(a)) == 10
    assert [f.version for f in a] == sorted(f.version for f in a)          # ledger order
    assert sample_facts(facts, 10, seed=8) != a                            # another run, another sample
    risky = sample_facts(facts, 5, seed=7, at_risk=["the  eiffel tower"])
    assert risky[0].version == 101 and len(risky) == 5
    assert sample_facts(facts, 0, seed=1) == [] and sample_facts([], 5, seed=1) == []
    assert len(sample_facts(facts[:3], 10, seed=1)) == 3


def test_settings_from_env_and_typed_errors():
    s = HealthSettings.from_env({"EDITSERVE_RETENTION_PROBE_SAMPLE": "8", "EDITSERVE_RETENTION_PROBE_INTERVAL_S": "0",
                                 "EDITSERVE_RETENTION_GATE_SAMPLE": "0", "EDITSERVE_RETENTION_GATE_MAX_DROP": "0.25"})
    assert (s.probe_sample, s.probe_interval_s, s.gate.sample_size, s.gate.max_drop) == (8, 0.0, 0, 0.25)
    assert not s.gate.enabled
    d = HealthSettings.from_env({})
    assert (d.probe_sample, d.probe_interval_s, d.probe_min_gap_s, d.gate.sample_size, d.gate.max_drop) == \
        (16, 900.0, 30.0, 16, 0.0)
    with pytest.raises(InvalidRequestError, match="EDITSERVE_RETENTION_PROBE_SAMPLE.*'-1'"):
        HealthSettings.from_env({"EDITSERVE_RETENTION_PROBE_SAMPLE": "-1"})
    with pytest.raises(InvalidRequestError, match="EDITSERVE_RETENTION_PROBE_INTERVAL_S.*'soon'"):
        HealthSettings.from_env({"EDITSERVE_RETENTION_PROBE_INTERVAL_S": "soon"})
    with pytest.raises(InvalidRequestError, match="max_drop.*1.5"):
        HealthSettings.from_env({"EDITSERVE_RETENTION_GATE_MAX_DROP": "1.5"})
    with pytest.raises(InvalidRequestError, match="sample_size"):
        RetentionGate(sample_size=-2)
    # The damage bound: off by default, a ratio >= 1 when set.
    assert not d.damage.enabled and d.damage.max_perplexity_ratio == 0.0
    b = HealthSettings.from_env({"EDITSERVE_GATE_MAX_PERPLEXITY_RATIO": "1.05"})
    assert b.damage.enabled and b.damage.max_perplexity_ratio == 1.05
    with pytest.raises(InvalidRequestError, match="EDITSERVE_GATE_MAX_PERPLEXITY_RATIO.*0.5"):
        HealthSettings.from_env({"EDITSERVE_GATE_MAX_PERPLEXITY_RATIO": "0.5"})
    with pytest.raises(InvalidRequestError, match="EDITSERVE_GATE_MAX_PERPLEXITY_RATIO.*'lots'"):
        HealthSettings.from_env({"EDITSERVE_GATE_MAX_PERPLEXITY_RATIO": "lots"})
    for bad in (0.99, math.nan, math.inf, True, "1.1"):
        with pytest.raises(InvalidRequestError, match="max_perplexity_ratio"):
            DamageGate(max_perplexity_ratio=bad)


def test_heldout_text_setting_is_checked_at_start(tmp_path):
    """EDITSERVE_HELDOUT_TEXT: a deployment's own held-out prose, refused at start (naming the
    variable, the path and the fault) unless it is a readable UTF-8 file of 1,000 to 200,000
    characters; unset, the packaged prose."""
    from editserve.engine.policy import PACKAGED, heldout_token

    unset = HealthSettings.from_env({})
    assert unset.heldout_text is None and unset.heldout_digest == PACKAGED
    good = tmp_path / "heldout-de.txt"
    good.write_text("Der Fluss fließt ruhig durch das Tal, und am Ufer wachsen Weiden. " * 30, encoding="utf-8")
    read = HealthSettings.from_env({"EDITSERVE_HELDOUT_TEXT": str(good)})
    # the digest the edit policy records is of the text read at start (the file is not read again for it)
    assert read.heldout_text == str(good) and read.heldout_digest == heldout_token(good.read_text(encoding="utf-8"))
    assert read_heldout_text(str(good)) == good.read_text(encoding="utf-8")
    short, latin1, huge = tmp_path / "short.txt", tmp_path / "latin1.txt", tmp_path / "huge.txt"
    short.write_text("Too short to measure anything.")
    latin1.write_bytes("Der Fluss fließt ruhig. ".encode("latin-1") * 100)
    huge.write_text("word " * 50_000)
    for path, fault in ((tmp_path / "missing.txt", "cannot be read"), (tmp_path, "cannot be read"),
                        (short, "holds 30 characters"), (latin1, "is not UTF-8"), (huge, "holds 249999 characters")):
        with pytest.raises(InvalidRequestError, match=f"EDITSERVE_HELDOUT_TEXT='{path}'.* {fault}"):
            HealthSettings.from_env({"EDITSERVE_HELDOUT_TEXT": str(path)})


def test_retention_metrics_on_a_real_scrape():
    registry = CollectorRegistry()
    m = Metrics(registry, n_layers=30)
    scraper = Scraper(registry)
    try:
        def values() -> dict[str, float]:
            with urllib.request.urlopen(scraper.url, timeout=10) as resp:
                text = resp.read().decode()
            return {(s.name + str(sorted(s.labels.items())) if s.labels else s.name): s.value
                    for fam in text_string_to_metric_families(text) for s in fam.samples}

        v = values()
        assert math.isnan(v["editserve_edit_retention_ratio"])             # nothing probed yet
        assert v["editserve_edit_retention_sample_size"] == 0
        assert v["editserve_retention_probes_total[('result', 'failed')]"] == 0
        m.set_retention(0.75, 4, 1_700_000_000.0)
        m.record_retention_probe(True)
        m.record_retention_refusal()
        v = values()
        assert v["editserve_edit_retention_ratio"] == 0.75 and v["editserve_edit_retention_sample_size"] == 4
        assert v["editserve_edit_retention_last_run_timestamp_seconds"] == 1_700_000_000.0
        assert v["editserve_retention_probes_total[('result', 'ok')]"] == 1
        assert v["editserve_gate_retention_refusals_total"] == 1
        m.set_retention(None, 0, 1_700_000_100.0)
        assert math.isnan(values()["editserve_edit_retention_ratio"])
        with pytest.raises(MetricsError, match="retention ratio"):
            m.set_retention(1.5, 3, 1.0)
        with pytest.raises(MetricsError, match="sample size"):
            m.set_retention(0.5, -1, 1.0)
    finally:
        scraper.close()


def test_gate_retention_check_names_the_fact_a_real_patch_breaks(tmp_path, monkeypatch):
    """A fact that holds on the model; a real ROME patch that makes its replaced object win again
    breaks it: the check names it, with log-probabilities, and leaves the model unchanged."""
    monkeypatch.setenv("EDITSERVE_HOME", str(tmp_path / "home"))
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n".join(TEXT * 3))
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompt = "The Eiffel Tower is located in the city of"
    probe = [CommittedFact(1, prompt, "The Eiffel Tower", " Rome", " Paris")]
    holds = facts_hold(model, tok, probe)[0][0]
    # The fact that holds on this (random) model, as version 1 committed it.
    new, old = (" Rome", " Paris") if holds else (" Paris", " Rome")
    fact = CommittedFact(version=1, prompt=prompt, subject="The Eiffel Tower", target_new=new, target_true=old)
    assert facts_hold(model, tok, [fact])[0][0]
    # The candidate: the same prompt back to the replaced object.
    req = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=old)
    patch = compute_patch(model, tok, [req], method="rome", layers=[2], hparams=FAST,
                          corpus=load_corpus(corpus_file))
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = check_retention(model, tok, patch, [fact], RetentionGate(sample_size=4, max_drop=0.0))
    assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters())
    assert report["sampled"] == 1 and report["held_before"] == 1 and report["held_after"] == 0
    assert not report["passed"] and report["drop"] == 1.0
    (b,) = report["broken"]
    assert (b["version"], b["prompt"], b["target_new"]) == (1, prompt, new)
    assert b["new_logprob_before"] > b["true_logprob_before"] and b["new_logprob_after"] < b["true_logprob_after"]
    # Merged into the probe gate's report: a failure line naming it, and passed false.
    merged = merge_retention({"passed": True, "failures": []}, report)
    assert merged["passed"] is False and f"version 1: {prompt!r} -> {new!r}" in merged["failures"][0]
    # A looser bound lets the same patch through.
    loose = check_retention(model, tok, patch, [fact], RetentionGate(sample_size=4, max_drop=1.0))
    assert loose["passed"] and merge_retention({"passed": True, "failures": []}, loose)["passed"] is True


def test_damage_bound_measures_a_real_patch_and_refuses_above_the_bound(tmp_path, monkeypatch):
    """The damage bound on a real (tiny) model and a real ROME patch: the ratio with the patch is
    the held-out perplexity measured with it merged, the model is unchanged afterwards, and a bound
    under that ratio refuses it with a failure line naming both ratios and the way out."""
    monkeypatch.setenv("EDITSERVE_HOME", str(tmp_path / "home"))
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n".join(TEXT * 3))
    model, tok = tiny_model("llama"), tiny_tokenizer()
    req = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome")
    patch = compute_patch(model, tok, [req], method="rome", layers=[2], hparams=FAST, corpus=load_corpus(corpus_file))
    base = heldout_perplexity(model, tok)
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    loose = check_damage(model, tok, patch, base, base, DamageGate(max_perplexity_ratio=1e6))
    assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters())
    apply_patch(model, patch)
    want = heldout_perplexity(model, tok) / base
    remove_patch(model, patch)
    assert loose["passed"] and loose["perplexity_ratio_head"] == 1.0
    assert loose["perplexity_ratio_after"] == pytest.approx(want, abs=1e-6) and want != 1.0
    assert merge_damage({"passed": True, "failures": []}, loose) == {"passed": True, "failures": [], "damage": loose}
    # A bound under the ratio the patch gives (and a head already over it) refuses it.
    tight = DamageGate(max_perplexity_ratio=max(1.0, want * 0.999))
    report = check_damage(model, tok, patch, base, base * 1.2, tight)
    assert not report["passed"] and report["perplexity_ratio_head"] == 1.2
    merged = merge_damage({"passed": True, "failures": []}, report)
    assert merged["passed"] is False and len(merged["failures"]) == 1
    line = merged["failures"][0]
    assert f"×{report['perplexity_ratio_after']:.4f}" in line and "×1.2000 at the head" in line
    assert "EDITSERVE_GATE_MAX_PERPLEXITY_RATIO" in line and "consolidate" in line
    err = DamageRejected("rejected", merged)
    assert err.perplexity_ratio == report["perplexity_ratio_after"] and err.report["damage"] == report
    # On a deployment's own held-out text (EDITSERVE_HELDOUT_TEXT): measured on that text.
    own = " ".join(reversed(TEXT)) * 12
    own_base = heldout_perplexity(model, tok, own)
    apply_patch(model, patch)
    own_want = heldout_perplexity(model, tok, own) / own_base
    remove_patch(model, patch)
    mine = check_damage(model, tok, patch, own_base, own_base, DamageGate(max_perplexity_ratio=1e6), own)
    assert mine["perplexity_ratio_after"] == pytest.approx(own_want, abs=1e-6) and own_want != pytest.approx(want)


def test_a_fact_whose_replaced_object_is_unknown_is_kept():
    """With no request target_true and no gate row naming one (gate skipped, imported), a fact is kept
    as it is — `facts_hold` checks it greedily (tests/test_smollm2_edits.py); a gate row fills it in."""
    from editserve.editing.retention import with_replaced_objects

    prompt = "The Eiffel Tower is located in the city of"
    unknown = CommittedFact(1, prompt, "The Eiffel Tower", " Rome", "")
    rows = {"gate": {"rows": [{"kind": "efficacy", "prompt": prompt, "target_new": " Rome", "target_true": " Paris"}]}}
    skipped = {"gate_skipped": {"by": "admin", "role": "admin"}}
    assert with_replaced_objects([unknown], lambda v: None) == [unknown]
    assert with_replaced_objects([unknown], lambda v: skipped) == [unknown]
    assert with_replaced_objects([unknown, _fact(2)], lambda v: rows) == \
        [CommittedFact(1, prompt, "The Eiffel Tower", " Rome", " Paris"), _fact(2)]


def test_probe_schedule_periodic_after_changes_bounded_and_surviving_failures():
    """The scheduling side (`RetentionProbe`) with a real metrics registry; `measure` stands for the
    sidecar call (the real one runs in tests/test_health_server.py)."""
    import asyncio
    import time as _time

    from editserve.engine.health import RetentionProbe, RetentionRun

    calls: list[tuple[int, int, int]] = []

    def measure(version: int, size: int, seed: int) -> RetentionRun:
        calls.append((version, size, seed))
        if len(calls) == 2:
            raise RuntimeError("the sidecar broke")
        return RetentionRun(version=version, facts=5, sampled=4, held=3, at=_time.time(), seconds=0.01)

    async def scenario() -> None:
        registry = CollectorRegistry()
        m = Metrics(registry, n_layers=30)
        # Periodic: every 0.2 s, no gap; a failed run is counted and the next one runs.
        probe = RetentionProbe(HealthSettings(probe_sample=4, probe_interval_s=0.2, probe_min_gap_s=0.0), m,
                               measure, lambda: 7)
        probe.start()
        deadline = _time.monotonic() + 30
        while len(calls) < 4 and _time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await probe.close()
        assert len(calls) >= 4 and all(c[:2] == (7, 4) for c in calls)
        assert len({c[2] for c in calls}) == len(calls)                   # a new sample each run
        st = probe.status()
        assert st["last"]["ratio"] == 0.75 and st["runs"] == len(calls) and st["last_error"] is None
        assert registry.get_sample_value("editserve_retention_probes_total", {"result": "failed"}) == 1
        assert registry.get_sample_value("editserve_retention_probes_total", {"result": "ok"}) == len(calls) - 1
        assert registry.get_sample_value("editserve_edit_retention_ratio") == 0.75
        assert registry.get_sample_value("editserve_edit_retention_sample_size") == 4
        # Only after version changes, at most one run per gap: the run at start, then a burst of 10
        # changes during its gap gives one more run.
        calls.clear()
        probe = RetentionProbe(HealthSettings(probe_sample=4, probe_interval_s=0.0, probe_min_gap_s=1.0), m,
                               measure, lambda: 8)
        probe.start()
        await asyncio.sleep(0.1)
        for _ in range(10):
            probe.version_changed()
            await asyncio.sleep(0.01)
        await asyncio.sleep(2.5)
        await probe.close()
        assert len(calls) == 2, calls

    asyncio.run(scenario())
    off = RetentionProbe(HealthSettings(probe_sample=0), None, measure, lambda: 1)
    assert not off.enabled


def test_sidecar_retention_probe_on_a_real_sidecar_process(tmp_path):
    """A real sidecar process on a tiny Llama and a real ledger with three committed patches: the
    probe scores the facts of the version it is asked about, in ledger order, with the committing
    version; a fact committed without target_true takes the gate's compared object from its
    version's report, one with neither is checked greedily; the outcomes equal an in-process scoring."""
    import json

    from editserve.editing.arch import Layout
    from editserve.editing.model import FINGERPRINT_FILE, weights_fingerprint
    from editserve.engine.health import run_of
    from editserve.engine.sidecar import ProbeRetention, SidecarClient, SidecarConfig
    from editserve.ledger import Ledger
    from editserve.patches import Patch, WeightDelta, apply_patch

    model, tok = tiny_model("llama"), tiny_tokenizer()
    ckpt = tmp_path / "tiny-llama"
    model.save_pretrained(str(ckpt))
    tok.save_pretrained(str(ckpt))
    fp = weights_fingerprint(model.state_dict())
    (ckpt / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fp, "name": "tiny-llama"}))
    name = "model.layers.1.mlp.down_proj.weight"
    w = model.state_dict()[name].clone()
    g = torch.Generator().manual_seed(5)

    def patch(req: EditRequest) -> Patch:
        d = WeightDelta(name=name, layer=1, u=torch.randn(w.shape[0], 1, generator=g),
                        v=torch.randn(w.shape[1], 1, generator=g))
        return Patch(deltas=(d,), requests=(req,), method="rome", hparams={}, model_fingerprint=fp, family="llama")

    reqs = [EditRequest("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris"),
            EditRequest("{} speaks", "Michel Rocard", " English"),             # truth from the gate report
            EditRequest("{} plays the", "Toko Yasuda", " piano")]              # no truth anywhere: greedy
    patches = [patch(r) for r in reqs]
    gate_row = {"kind": "efficacy", "prompt": "Michel Rocard speaks", "target_new": " English",
                "target_true": " French"}
    with Ledger.open(tmp_path / "ledger", fp) as ledger:
        ledger.weights.ensure_base(name, w, Layout.OUT_IN)
        v1 = ledger.commit(patches[0], expected_head=0)
        v2 = ledger.commit(patches[1], expected_head=v1, probe_report={"gate": {"rows": [gate_row]}})
        v3 = ledger.commit(patches[2], expected_head=v2)
    own = tmp_path / "heldout-own.txt"                   # a deployment's own held-out text (below)
    own.write_text(" ".join(TEXT) * 12)
    base_ppl, own_base = heldout_perplexity(model, tok), heldout_perplexity(model, tok, own.read_text())
    for p in patches:
        apply_patch(model, p)
    edited_ppl, own_edited = heldout_perplexity(model, tok), heldout_perplexity(model, tok, own.read_text())
    want = facts_hold(model, tok, [CommittedFact(v1, "The Eiffel Tower is located in the city of", "The Eiffel Tower",
                                                 " Rome", " Paris"),
                                   CommittedFact(v2, "Michel Rocard speaks", "Michel Rocard", " English", " French"),
                                   CommittedFact(v3, "Toko Yasuda plays the", "Toko Yasuda", " piano", "")])
    client = SidecarClient(SidecarConfig(checkpoint=str(ckpt), device="cpu", threads=1))
    try:
        client.wait_ready()
        client.open_ledger(str(tmp_path / "ledger"))
        got = client.probe_retention(ProbeRetention(version=v3, sample_size=16, seed=1), timeout_s=300)
        assert got.version == v3 and got.facts == 3
        assert [(r["version"], r["target_new"], r["target_true"]) for r in got.rows] == \
            [(v1, " Rome", " Paris"), (v2, " English", " French"), (v3, " piano", "")]
        assert [r["holds"] for r in got.rows] == [ok for ok, _, _ in want]
        assert [r["new_logprob"] for r in got.rows] == pytest.approx([n for _, n, _ in want], abs=1e-4)
        run = run_of(got)
        assert run.sampled == 3 and run.held == sum(ok for ok, _, _ in want) and run.facts == 3
        # The held-out perplexity of the version probed, and of the unedited model (measured at start).
        assert got.base_heldout_ppl == pytest.approx(base_ppl, rel=1e-5)
        assert got.heldout_ppl == pytest.approx(edited_ppl, rel=1e-5) and edited_ppl != pytest.approx(base_ppl)
        assert run.perplexity_ratio == pytest.approx(edited_ppl / base_ppl, rel=1e-5)
        # An earlier version: only its facts; a sample of 1 scores one of them.
        got1 = client.probe_retention(ProbeRetention(version=v1, sample_size=16, seed=1), timeout_s=300)
        assert got1.facts == 1 and [r["version"] for r in got1.rows] == [v1]
        assert len(client.probe_retention(ProbeRetention(version=v3, sample_size=1, seed=2)).rows) <= 1
        at0 = client.probe_retention(ProbeRetention(version=0, sample_size=16))
        assert at0.rows == () and run_of(at0).perplexity_ratio == 1.0     # the base weights, bit for bit
    finally:
        client.close()
    # A sidecar given the deployment's own held-out text (EDITSERVE_HELDOUT_TEXT) measures that text,
    # for the unedited model and for the version probed.
    assert own_base != pytest.approx(base_ppl) and own_edited != pytest.approx(edited_ppl)
    client = SidecarClient(SidecarConfig(checkpoint=str(ckpt), device="cpu", threads=1, heldout_text=str(own)))
    try:
        client.wait_ready()
        client.open_ledger(str(tmp_path / "ledger"))
        got = client.probe_retention(ProbeRetention(version=v3, sample_size=16, seed=1), timeout_s=300)
        assert got.base_heldout_ppl == pytest.approx(own_base, rel=1e-5)
        assert got.heldout_ppl == pytest.approx(own_edited, rel=1e-5)
    finally:
        client.close()
