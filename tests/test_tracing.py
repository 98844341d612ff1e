"""Causal tracing: the batched restorations equal one forward per cell (tiny models of every family
in the architecture table), and on SmolLM2 a known fact is destroyed by the corruption and brought
back by restoring the subject's last token at early-to-middle layers. Also JSON, PNG and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from editserve.editing.hooks import Hooks
from editserve.editing.tracing import (
    KINDS, TraceResult, prepare, restore_cells, restored_layers, subject_span, trace,
)
from editserve.errors import InvalidRequestError

# A fact SmolLM2-135M-Instruct knows, with a two-token subject ('Windows', ' XP'), from CounterFact (case 937).
FACT = ("{}, a product manufactured by", "Windows XP", " Microsoft")
# A short prompt with tokens before the subject, for full grids.
SHORT = ("The official language of {} is", "France", " French")


@pytest.fixture(scope="module")
def smol():
    from editserve.editing import load_model

    torch.manual_seed(0)
    return load_model()


def _tiny(model_type: str, attn: str = "eager") -> torch.nn.Module:
    """A randomly initialised 4-layer model of `model_type` with SmolLM2's vocabulary size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    # Weights ten times the default init, so that attention is not uniform and the subject matters.
    common = dict(vocab_size=49152, bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    sizes = {
        "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2),
        "gpt2": dict(n_embd=64, n_layer=4, n_head=4, n_positions=128),
        "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
        "gptj": dict(n_embd=64, n_layer=4, n_head=4, n_positions=128, rotary_dim=8),
    }
    torch.manual_seed(1)
    config = AutoConfig.for_model(model_type, **common, **sizes[model_type])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    model.eval()
    return model


def _module(spec, kind: str, layer: int) -> str:
    return {"hidden": spec.layer_name, "mlp": spec.mlp_name, "attn": spec.attn_name}[kind](layer)


def _reference(model, setup, kind: str, token: int, layer: int) -> float:
    """P(o) restoring one cell, one unbatched forward per noise sample (the definition)."""
    spec = setup.spec
    clean = setup.clean
    probs = []
    for s in range(setup.samples):
        with torch.no_grad(), Hooks(model) as hooks:
            def corrupt(x, s=s):
                return x + setup.noise[s]
            hooks.edit_output(spec.embed, corrupt)   # noise on the token embeddings, as in the paper
            for k in restored_layers(kind, layer, setup.window, setup.n_layers):
                name = _module(spec, kind, k)

                def put(y, name=name):
                    y = y.clone()
                    y[0, token] = clean[name][token]
                    return y
                hooks.edit_output(name, put)
            logits = model(input_ids=setup.ids).logits[0, -1]
        probs.append(float(torch.softmax(logits.float(), -1)[setup.target_id]))
    return sum(probs) / len(probs)


@pytest.mark.parametrize("model_type,attn", [("llama", "eager"), ("llama", "sdpa"), ("gpt2", "eager"),
                                             ("gpt_neox", "eager"), ("gptj", "eager")])
def test_batched_restorations_equal_one_forward_per_cell(smol, model_type, attn):
    _, tok = smol
    model = _tiny(model_type, attn)
    setup = prepare(model, tok, "The official language of {} is known as", "New South Wales",
                    samples=2, seed=3, window=2, max_batch_tokens=200)   # small budget: several passes
    s0, s1 = setup.subject_range
    assert s1 - s0 == 3 and s0 > 0
    T, L = setup.ids.shape[1], setup.n_layers
    cells = [(t, l) for t in range(T) for l in range(L)]
    for kind in KINDS:
        batched, p_corr = restore_cells(model, setup, kind, cells)
        some = [(s0, 0), (s1 - 1, 1), (s1 - 1, L - 1), (T - 1, 2), (s0 - 1, 1), (T - 2, 3)]
        for t, l in some:
            ref = _reference(model, setup, kind, t, l)
            got = float(batched[cells.index((t, l))])
            assert got - float(p_corr.mean()) == pytest.approx(ref - float(p_corr.mean()), rel=1e-3, abs=1e-7), (kind, t, l)
        # Restoring every state of the last token at the last layer gives back the clean run.
        if kind == "hidden":
            assert float(batched[cells.index((T - 1, L - 1))]) == pytest.approx(setup.p_clean, rel=1e-4)
        # And the corruption and restorations moved P(o) at all (else the comparison proves nothing).
        assert abs(float(p_corr.mean()) - setup.p_clean) > 0.01 * setup.p_clean
        assert float((batched - p_corr.mean()).abs().max()) > 0.01 * setup.p_clean


def test_subject_span_and_validation(smol):
    _, tok = smol
    text, ids, (s0, s1) = subject_span(tok, "{} is located in the country of", "Darmstadt")
    assert text == "Darmstadt is located in the country of"
    assert s0 == 0 and "".join(tok.decode([i]) for i in ids[s0:s1]) == "Darmstadt"
    # A sentence with the subject written in works too.
    _, _, span = subject_span(tok, "Where is Darmstadt? It is in", "Darmstadt")
    assert span[0] == 2
    with pytest.raises(InvalidRequestError, match="Munich"):
        subject_span(tok, "Darmstadt is in", "Munich")
    with pytest.raises(InvalidRequestError, match="ends with the subject"):
        subject_span(tok, "The city is {}", "Darmstadt")
    model, _ = smol
    with pytest.raises(InvalidRequestError, match="'resid'"):
        trace(model, tok, *FACT, kind="resid")
    with pytest.raises(InvalidRequestError, match="samples"):
        trace(model, tok, *FACT, samples=0)
    with pytest.raises(InvalidRequestError, match="nan"):
        trace(model, tok, *FACT, noise_std=float("nan"))


def test_smollm2_fact_corrupted_and_restored_at_last_subject_token(smol):
    model, tok = smol
    prompt, subject, target = FACT
    setup = prepare(model, tok, prompt, subject, target, samples=10, seed=0)
    s0, s1 = setup.subject_range
    assert [tok.decode([i]) for i in setup.ids[0, s0:s1]] == ["Windows", " XP"]
    L = setup.n_layers
    mean, p_corr = restore_cells(model, setup, "hidden", [(s1 - 1, l) for l in range(L)])
    p_corrupted = float(p_corr.mean())
    recovered = [(float(m) - p_corrupted) / (setup.p_clean - p_corrupted) for m in mean]
    print(f"P clean {setup.p_clean:.3f} corrupted {p_corrupted:.4f}; restored at {tok.decode([int(setup.ids[0, s1 - 1])])!r}: "
          + " ".join(f"{float(m):.2f}" for m in mean))
    # Measured (10 samples): clean 0.662; corrupted 0.0066 (seed 0) / 0.0054 (seed 1);
    # best recovery in layers 2..15 0.77 at layer 12 (seed 0) / 0.69 (seed 1); layers 25..29 ≤ 0.01.
    assert setup.p_clean > 0.5
    assert p_corrupted < 0.05 * setup.p_clean
    assert max(recovered[2:16]) > 0.5
    # Late layers at the subject's last token no longer matter: by then the fact has moved on.
    assert max(recovered[25:]) < 0.1


def test_full_trace_json_png_and_determinism(smol, tmp_path):
    from editserve.tracing_plot import render_png, save_png

    model, tok = smol
    r = trace(model, tok, *SHORT, kind="hidden", samples=3, seed=7)
    T = len(r.tokens)
    assert r.num_layers == 30 and len(r.scores) == T and all(len(row) == 30 for row in r.scores)
    assert r.tokens[r.subject_range[0]] == " France" and r.target == " French"
    assert r.p_corrupted < 0.5 * r.p_clean
    # Tokens before the subject carry no noise: restoring them changes nothing.
    for t in range(r.subject_range[0]):
        assert r.scores[t] == tuple([r.p_corrupted] * 30)
    # The last token's final state is the clean one.
    assert r.scores[T - 1][29] == pytest.approx(r.p_clean, rel=1e-4)
    assert len(r.top_mlp_layers) == 3 and len(r.mlp_subject_last) == 30
    back = TraceResult.from_dict(json.loads(r.to_json()))
    assert back == r
    assert json.loads(r.to_json())["indirect_effect"][T - 1][29] == pytest.approx(r.p_clean - r.p_corrupted, abs=1e-5)
    again = trace(model, tok, *SHORT, kind="hidden", samples=3, seed=7)
    assert again.scores == r.scores
    png = render_png(r, "SmolLM2-135M")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert save_png(r, tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_mlp_trace_reports_top_layers_from_its_own_grid(smol):
    model, tok = smol
    r = trace(model, tok, *SHORT, kind="mlp", samples=2, seed=1, top_k=4)
    assert r.mlp_subject_last == r.scores[r.subject_last]
    ranked = sorted(range(30), key=lambda l: -r.mlp_subject_last[l])
    assert list(r.top_mlp_layers) == ranked[:4]


def test_cli_writes_json_and_png(smol, tmp_path, capsys):
    from editserve.cli import main

    out = tmp_path / "o"
    code = main(["trace", "--prompt", SHORT[0], "--subject", SHORT[1], "--kind", "attn", "--samples", "2",
                 "--out", str(out)])
    assert code == 0
    data = json.loads((out / "trace.json").read_text())
    assert data["kind"] == "attn" and data["subject"] == "France" and len(data["scores"]) == len(data["tokens"])
    assert (out / "trace.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "top MLP layers" in printed and "wrote" in printed
    # A subject that is not in the sentence is a typed error: exit code 2, message names it.
    assert main(["trace", "--prompt", "The official language of France is", "--subject", "Spain",
                 "--samples", "2", "--out", str(tmp_path / "bad")]) == 2
    assert "'Spain'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
