"""Architecture table on tiny random models of every family: hooks read the right tensors,
patches change exactly the intended weight in the declared orientation."""

from __future__ import annotations

import pytest
import torch

from editserve.editing.arch import Layout, edited_weight, spec_for, spec_for_model_type
from editserve.editing.hooks import Hooks
from editserve.errors import LayerOutOfRangeError, UnknownArchitectureError
from editserve.patches import Patch, WeightDelta, apply_patch, remove_patch
from tests.tiny import FAMILIES, tiny_model, tiny_tokenizer


def _mlp_hidden(family: str, mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's intermediate activation computed by hand from its input x (the expected key)."""
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    if family == "gpt2":
        return mlp.act(mlp.c_fc(x))
    if family == "gptj":
        return mlp.act(mlp.fc_in(x))
    return mlp.act(mlp.dense_h_to_4h(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_declared_names_exist(family):
    model = tiny_model(family)
    spec = spec_for(model)
    for name in (spec.layers, spec.base, spec.embed, spec.final_norm, spec.lm_head, spec.layer_name(3),
                 spec.mlp_name(3), spec.attn_name(3), spec.down_proj_name(3)):
        model.get_submodule(name)
    assert spec.weight_name(3) in dict(model.named_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_read_keys_and_values(family):
    model = tiny_model(family)
    spec = spec_for(model)
    ids = tiny_tokenizer()("The Eiffel Tower is in Paris", return_tensors="pt")["input_ids"]
    layer = 2
    with Hooks(model) as h:
        h.capture_input(spec.mlp_name(layer))
        h.capture_input(spec.down_proj_name(layer))
        h.capture_output(spec.mlp_name(layer))
        h.capture_output(spec.down_proj_name(layer))
        h.run(input_ids=ids)
    mlp = model.get_submodule(spec.mlp_name(layer))
    key = h.inputs[spec.down_proj_name(layer)]
    torch.testing.assert_close(key, _mlp_hidden(family, mlp, h.inputs[spec.mlp_name(layer)]))
    # value = W k (+ bias) in the declared HF layout
    w = edited_weight(model, layer)
    w_oi = w if spec.hf_layout is Layout.OUT_IN else w.T
    bias = getattr(model.get_submodule(spec.down_proj_name(layer)), "bias", None)
    expected = key @ w_oi.T + (bias if bias is not None else 0)
    torch.testing.assert_close(h.outputs[spec.down_proj_name(layer)], expected)
    # hooks are removed on exit
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_changes_exactly_the_intended_weight(family):
    model = tiny_model(family)
    spec = spec_for(model)
    layer = 1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    w = edited_weight(model, layer)
    d_out, d_in = (w.shape if spec.hf_layout is Layout.OUT_IN else w.shape[::-1])
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(d_out, 2, generator=g), torch.randn(d_in, 2, generator=g)
    patch = Patch(deltas=(WeightDelta(spec.weight_name(layer), layer, u, v),), requests=(), method="test",
                  hparams={}, model_fingerprint="x", family=spec.family)
    ptr = w.data_ptr()
    k = torch.randn(3, d_in, generator=g)
    down = model.get_submodule(spec.down_proj_name(layer))
    y0 = down(k)
    apply_patch(model, patch)
    assert edited_weight(model, layer).data_ptr() == ptr, "the weight must be edited in place"
    for name, p in model.named_parameters():
        if name == spec.weight_name(layer):
            assert not torch.equal(p, before[name])
        else:
            assert torch.equal(p, before[name]), f"{name} changed"
    # ΔW acts on keys as U Vᵀ in (d_out, d_in) orientation
    torch.testing.assert_close(down(k) - y0, k @ v @ u.T, rtol=1e-4, atol=1e-4)
    remove_patch(model, patch)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_unknown_architecture_and_layers():
    with pytest.raises(UnknownArchitectureError, match="'bloom'"):
        spec_for_model_type("bloom")
    from editserve.editing.arch import check_layers

    model = tiny_model("llama", n_layers=4)
    with pytest.raises(LayerOutOfRangeError, match="layer 4 is out of range"):
        check_layers(model, [4])
    with pytest.raises(LayerOutOfRangeError, match="-1"):
        check_layers(model, [-1])
