"""Patch type: exact merge/unmerge, order independence of removal, safe merge, serialisation."""

from __future__ import annotations

import pytest
import torch

from editserve.editing.arch import spec_for
from editserve.errors import NonFiniteError, PatchMismatchError, PatchStateError
from editserve.patches import (Patch, WeightDelta, applied_patches, apply_patch, load_patch, materialize,
                               remove_patch, save_patch)
from editserve.editing.requests import EditRequest
from editserve.editing.arch import Layout
from tests.tiny import tiny_model

REQ = EditRequest(prompt="{} is in", subject="The tower", target_new=" Rome")


def _patch(model, layer, seed, scale=1.0):
    spec = spec_for(model)
    w = model.get_submodule(spec.down_proj_name(layer)).weight
    d_out, d_in = w.shape
    g = torch.Generator().manual_seed(seed)
    return Patch(deltas=(WeightDelta(spec.weight_name(layer), layer, scale * torch.randn(d_out, 1, generator=g),
                                     torch.randn(d_in, 1, generator=g)),),
                 requests=(REQ,), method="rome", hparams={"layer": layer}, model_fingerprint="fp", family=spec.family)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, snap):
    return all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


def test_remove_in_any_order_restores_bit_identical():
    model = tiny_model("llama")
    base = _snapshot(model)
    a, b, c = _patch(model, 1, 0), _patch(model, 1, 1), _patch(model, 2, 2)
    for p in (a, b, c):
        apply_patch(model, p)
    with_all = _snapshot(model)
    remove_patch(model, b)
    remove_patch(model, a)
    # layer 1 is back to base exactly even though b was merged before a was removed
    name = spec_for(model).weight_name(1)
    assert torch.equal(dict(model.named_parameters())[name], base[name])
    remove_patch(model, c)
    assert _same(model, base)
    assert applied_patches(model) == ()
    # re-applying in the same order reproduces the same bits (fixed-order float32 sum)
    for p in (a, b, c):
        apply_patch(model, p)
    assert _same(model, with_all)


def test_materialize_matches_merge_and_is_deterministic():
    model = tiny_model("llama")
    name = spec_for(model).weight_name(1)
    base = dict(model.named_parameters())[name].detach().clone()
    ps = [_patch(model, 1, s) for s in range(3)]
    deltas = [p.deltas[0] for p in ps]
    m1 = materialize(base, deltas, Layout.OUT_IN)
    m2 = materialize(base, deltas, Layout.OUT_IN)
    assert torch.equal(m1, m2)
    assert torch.equal(materialize(base, [], Layout.OUT_IN), base)
    for p in ps:
        apply_patch(model, p)
    assert torch.equal(dict(model.named_parameters())[name], m1)


def test_non_finite_merge_is_refused_and_nothing_changes():
    model = tiny_model("llama")
    snap = _snapshot(model)
    huge = _patch(model, 1, 0, scale=1e38)
    with pytest.raises(NonFiniteError, match="down_proj"):
        apply_patch(model, huge)
    assert _same(model, snap)
    assert applied_patches(model) == ()
    with pytest.raises(NonFiniteError):
        WeightDelta("w", 0, torch.full((4, 1), float("nan")), torch.ones(3, 1))


def test_state_errors_and_mismatch():
    model = tiny_model("llama")
    p = _patch(model, 1, 0)
    with pytest.raises(PatchStateError, match="not applied"):
        remove_patch(model, p)
    apply_patch(model, p)
    with pytest.raises(PatchStateError, match="already applied"):
        apply_patch(model, p)
    other = tiny_model("gpt2")
    with pytest.raises(PatchMismatchError, match="family 'llama'"):
        apply_patch(other, p)
    bad = Patch(deltas=(WeightDelta("model.layers.1.mlp.down_proj.weight", 1, torch.ones(5, 1), torch.ones(7, 1)),),
                requests=(), method="rome", hparams={}, model_fingerprint="fp", family="llama")
    with pytest.raises(PatchMismatchError, match="shape"):
        apply_patch(model, bad)


def test_save_load_roundtrip_and_tamper_detection(tmp_path):
    model = tiny_model("llama")
    p = _patch(model, 1, 0)
    save_patch(p, tmp_path / "p")
    q = load_patch(tmp_path / "p")
    assert q.digest == p.digest and q.requests == p.requests
    assert torch.equal(q.deltas[0].u, p.deltas[0].u)
    manifest = (tmp_path / "p" / "manifest.json").read_text().replace('"rome"', '"memit"')
    (tmp_path / "p" / "manifest.json").write_text(manifest)
    with pytest.raises(PatchMismatchError, match="digest mismatch"):
        load_patch(tmp_path / "p")
    (tmp_path / "p" / "patch.safetensors").write_bytes(b"garbage")
    with pytest.raises(PatchMismatchError, match="cannot read patch"):
        load_patch(tmp_path / "p")
