"""Context prefixes (editserve.editing.prefixes): a shorter list is the head of a longer cached one.

Prefix i depends only on the seed, the length and the prefixes before it, so a method asking for n
prefixes reads the first n of any longer cached list with the same length and seed (the sidecar
samples the longest list any method needs before `Ready`). Checked on a tiny llama: the head of a
longer list equals a list of n sampled on its own in another home; reading it writes no file;
an unreadable longer list is skipped (the list is sampled), and another length or seed never
serves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from editserve.editing.hparams import PrefixParams
from editserve.editing.prefixes import context_prefixes
from tests.tiny import tiny_model, tiny_tokenizer

FP = "0123456789abcdef" * 4


def _files(home: Path) -> list[str]:
    return sorted(f.name for f in (home / "prefixes").glob("*"))


def test_a_shorter_list_is_the_head_of_a_longer_cached_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("EDITSERVE_HOME", str(a))
    six = context_prefixes(model, tok, FP, PrefixParams(n_prefixes=6, prefix_tokens=4, seed=3))
    assert len(six) == 6 and len(set(six)) > 1
    assert _files(a) == [f"{FP[:16]}-n6-t4-s3.json"]
    # sampled on its own, in a home with nothing cached: the same as the longer list's head
    monkeypatch.setenv("EDITSERVE_HOME", str(b))
    alone = context_prefixes(model, tok, FP, PrefixParams(n_prefixes=3, prefix_tokens=4, seed=3))
    assert alone == six[:3]
    # read from the longer list: nothing sampled, nothing written
    monkeypatch.setenv("EDITSERVE_HOME", str(a))
    model_calls = []
    handle = model.register_forward_hook(lambda *_: model_calls.append(1))
    try:
        assert context_prefixes(model, tok, FP, PrefixParams(n_prefixes=3, prefix_tokens=4, seed=3)) == six[:3]
        assert context_prefixes(model, tok, FP, PrefixParams(n_prefixes=6, prefix_tokens=4, seed=3)) == six
    finally:
        handle.remove()
    assert model_calls == [] and _files(a) == [f"{FP[:16]}-n6-t4-s3.json"]
    # another length or seed, or another model, is not served by it
    for params, fp in ((PrefixParams(n_prefixes=3, prefix_tokens=5, seed=3), FP),
                       (PrefixParams(n_prefixes=3, prefix_tokens=4, seed=4), FP),
                       (PrefixParams(n_prefixes=3, prefix_tokens=4, seed=3), "f" * 64)):
        context_prefixes(model, tok, fp, params)
    assert len(_files(a)) == 4, _files(a)


def test_an_unreadable_longer_list_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    monkeypatch.setenv("EDITSERVE_HOME", str(tmp_path / "a"))
    folder = tmp_path / "a" / "prefixes"
    folder.mkdir(parents=True)
    (folder / f"{FP[:16]}-n8-t4-s3.json").write_text("{not json")
    (folder / f"{FP[:16]}-n7-t4-s3.json").write_text(json.dumps(["only one. "]))     # not 7 long
    got = context_prefixes(model, tok, FP, PrefixParams(n_prefixes=3, prefix_tokens=4, seed=3))
    monkeypatch.setenv("EDITSERVE_HOME", str(tmp_path / "b"))
    assert got == context_prefixes(model, tok, FP, PrefixParams(n_prefixes=3, prefix_tokens=4, seed=3))
    assert (folder / f"{FP[:16]}-n3-t4-s3.json").is_file()
