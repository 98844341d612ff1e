"""The candidate adapter (patch → PEFT LoRA directory), request bucketing and request validation,
without an engine (the engine-backed tests are in test_candidates.py)."""

from __future__ import annotations

import json

import pytest
import torch

from editserve.candidates.adapter import CONFIG_FILE, WEIGHTS_FILE, RankTooLarge, factors_of, peft_key, write_adapter
from editserve.candidates.staging import CandidateSettings, bucket
from editserve.candidates.validate import candidate_id
from editserve.candidates.validate import stage_args as _stage_args
from editserve.errors import InvalidRequestError
from editserve.patches import Patch, WeightDelta


def stage_args(body: dict) -> object:
    """A JSON body through the HTTP route's parsing (`editserve.control.http._message`) into `stage_args`."""
    from editserve.control.gen import pb2
    from editserve.control.http import _message

    return _stage_args(_message(body, pb2.StageCandidateRequest))


def _patch(seed: int, layers: tuple[int, ...], rank: int = 1) -> Patch:
    g = torch.Generator().manual_seed(seed)
    deltas = tuple(WeightDelta(name=f"model.layers.{i}.mlp.down_proj.weight", layer=i,
                               u=torch.randn(6, rank, generator=g), v=torch.randn(10, rank, generator=g))
                   for i in layers)
    return Patch(deltas=deltas, requests=(), method="rome", hparams={}, model_fingerprint="f" * 64, family="llama")


def test_factors_are_the_signed_sum_of_the_patches() -> None:
    a, b = _patch(0, (3, 4), rank=1), _patch(1, (4,), rank=2)
    f = factors_of([(1, a), (-1, b)])
    assert f.rank == 3 and f.weight_names == ("model.layers.3.mlp.down_proj.weight",
                                              "model.layers.4.mlp.down_proj.weight")
    for name in f.weight_names:
        want = sum(s * d.dense() for s, p in ((1, a), (-1, b)) for d in p.deltas if d.name == name)
        torch.testing.assert_close(f.b[name] @ f.a[name], want, rtol=0, atol=1e-6)   # B[d_out,r] A[r,d_in]
        assert f.a[name].shape == (3, 10) and f.b[name].shape == (6, 3)


def test_to_version_difference_is_w_v_minus_w_head() -> None:
    """A to_version candidate: head holds a, b, c; version V holds a and d (a revert between them):
    the adapter's B A is exactly Σ_V UVᵀ − Σ_head UVᵀ per weight, with rank = the sum of the ranks."""
    a, b, c, d = _patch(0, (3,)), _patch(1, (3, 4), rank=2), _patch(2, (4,)), _patch(3, (3,))
    head, at_v = [a, b, c], [a, d]
    removed = [p for p in head if p.digest not in {q.digest for q in at_v}]
    added = [p for p in at_v if p.digest not in {q.digest for q in head}]
    f = factors_of([(-1, p) for p in removed] + [(1, p) for p in added])
    assert f.rank == 3                                            # layer 3: b (2) + d (1); layer 4: b (2) + c (1)
    for name in f.weight_names:
        def total(ps: list) -> torch.Tensor:
            return sum((dl.dense() for p in ps for dl in p.deltas if dl.name == name), torch.zeros(6, 10))
        torch.testing.assert_close(f.b[name] @ f.a[name], total(at_v) - total(head), rtol=0, atol=1e-5)


def test_adapter_directory_is_peft(tmp_path) -> None:
    from safetensors.torch import load_file

    f = factors_of([(1, _patch(0, (2,), rank=2))])
    out = write_adapter(f, tmp_path / "ad", "model", max_rank=8)
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 2 and cfg["target_modules"] == ["down_proj"]
    tensors = load_file(str(out / WEIGHTS_FILE))
    assert set(tensors) == {"base_model.model.model.layers.2.mlp.down_proj.lora_A.weight",
                            "base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"}
    with pytest.raises(RankTooLarge, match="rank 2.*max_lora_rank 1"):
        write_adapter(f, tmp_path / "ad2", "model", max_rank=1)
    with pytest.raises(InvalidRequestError):
        peft_key("model.layers.2.mlp.down_proj", "A")


def test_bucket_is_deterministic_and_uniform() -> None:
    assert bucket("req-1") == bucket("req-1")
    xs = [bucket(f"r{i}") for i in range(4000)]
    assert all(0 <= x < 1 for x in xs)
    assert 0.27 < sum(x < 0.3 for x in xs) / len(xs) < 0.33


def test_settings_and_requests_are_validated() -> None:
    assert CandidateSettings.from_env({}).vllm_args() == []
    s = CandidateSettings.from_env({"EDITSERVE_CANDIDATES": "2", "EDITSERVE_CANDIDATE_MAX_RANK": "8"})
    assert s.vllm_args() == ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
                             "--lora-target-modules", "down_proj"]
    with pytest.raises(InvalidRequestError, match="'two'"):
        CandidateSettings.from_env({"EDITSERVE_CANDIDATES": "two"})
    with pytest.raises(InvalidRequestError, match="1.5"):
        CandidateSettings.from_env({"EDITSERVE_CANDIDATE_SHARE": "1.5"})
    assert stage_args({"version": 3}).ref == 3
    assert stage_args({"ref": "abcd12", "share": 0.25}).share == 0.25
    assert stage_args({"to_version": 0}).to_version == 0 and stage_args({"to_version": 2}).ref is None
    for bad, word in (({}, "exactly one"), ({"version": -1}, "-1"), ({"ref": "xyz"}, "xyz"),
                      ({"version": 1, "share": 1.5}, "1.5"), ({"version": 1, "color": 1}, "color"),
                      ({"to_version": -2}, "-2"), ({"to_version": 1, "version": 1}, "to_version")):
        with pytest.raises(InvalidRequestError, match=word):
            stage_args(bad)
    assert candidate_id("a1b2c3") == "a1b2c3"
    with pytest.raises(InvalidRequestError, match="ABCDEF"):
        candidate_id("ABCDEF")
