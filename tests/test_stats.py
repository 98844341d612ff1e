"""Covariance statistics: equal to a hand computation, cached by key, non-finite rejected."""

from __future__ import annotations

import pytest
import torch

from editserve.editing.arch import spec_for
from editserve.editing.corpus import load_corpus, strip_wiki_markup
from editserve.editing.hooks import Hooks
from editserve.editing.hparams import StatsParams
from editserve.editing.stats import _cache_path, layer_stats
from editserve.errors import DataError, NonFiniteError
from tests.tiny import TEXT, tiny_model, tiny_tokenizer


@pytest.fixture()
def corpus(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(TEXT * 3))
    return load_corpus(f)


def test_covariance_matches_hand_computation_and_caches(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSERVE_HOME", str(tmp_path / "home"))
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    params = StatsParams(n_tokens=200, seq_len=20, batch_size=3)
    stats, run = layer_stats(model, tok, [1, 2], corpus, "fp" * 8, params, progress=False)
    assert run is not None and run.tokens == 200
    # by hand: the same packed token stream, one forward per sequence
    from editserve.editing.stats import _pack

    ids = _pack(tok, corpus, params)
    spec = spec_for(model)
    ks = []
    with Hooks(model) as h:
        h.capture_input(spec.down_proj_name(2))
        for row in ids:
            h.run(input_ids=row[None])
            ks.append(h.inputs[spec.down_proj_name(2)][0])
    k = torch.cat(ks).double()
    torch.testing.assert_close(stats[2].cov.double(), k.T @ k / k.shape[0], rtol=1e-4, atol=1e-6)
    # second call: served from the cache, nothing computed
    again, run2 = layer_stats(model, tok, [2], corpus, "fp" * 8, params, progress=False)
    assert run2 is None and torch.equal(again[2].cov, stats[2].cov)
    # a different token count is a different cache entry
    _, run3 = layer_stats(model, tok, [2], corpus, "fp" * 8, StatsParams(n_tokens=100, seq_len=20), progress=False)
    assert run3 is not None and run3.tokens == 100


def test_non_finite_statistics_rejected(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITSERVE_HOME", str(tmp_path / "home"))
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    params = StatsParams(n_tokens=100, seq_len=20)
    from safetensors.torch import save_file

    path = _cache_path("fp" * 8, corpus, 1, params, torch.float32)
    save_file({"cov": torch.full((128, 128), float("nan"))}, str(path))
    with pytest.raises(NonFiniteError, match="layer 1"):
        layer_stats(model, tok, [1], corpus, "fp" * 8, params, progress=False)


def test_corpus_errors_and_markup(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt or .md"):
        load_corpus(tmp_path / "empty")
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    small = tmp_path / "small.txt"
    small.write_text("a few words only\n")
    with pytest.raises(DataError, match="n_tokens=1000"):
        layer_stats(model, tok, [1], load_corpus(small), "fp", StatsParams(n_tokens=1000, seq_len=20), progress=False)
    text = strip_wiki_markup(
        "{{Infobox|name=x}}'''Paris''' is the [[capital city|capital]] of [[France]].<ref>cite</ref> "
        "It has many [[museum]]s and a long history of art.\n[[Category:Cities]]"
    )
    assert text == "Paris is the capital of France. It has many museums and a long history of art."
