"""Issue 16: a real sidecar process computes AlphaEdit edits with the preserved-keys state of the
version it edits, rebuilt from the ledger (after a commit, a rollback and a restart), and returns
the new patch's own key blocks for the commit.

Proof: recomputing at an earlier version gives the same bytes; the sidecar's patch matches one
computed in this process on the same weights with `ledger.preserved_keys(version)` (to float
rounding across processes), far closer than one computed with another version's state.
"""

from __future__ import annotations

import json

from editserve.editing import EditRequest, apply_patch
from editserve.editing.corpus import load_corpus
from editserve.editing.edit import compute_edit
from editserve.editing.model import FINGERPRINT_FILE, weights_fingerprint
from editserve.engine.sidecar import ComputeEdit, SidecarClient, SidecarConfig
from editserve.ledger import Ledger
from tests.tiny import tiny_model, tiny_tokenizer

# The tiny random model's covariance has no eigenvalue below AlphaEdit's usual thresholds; 1e3 keeps
# every direction (P = I), so the test is about the preserved-keys term, which P does not change.
HP = {"stats": {"n_tokens": 300, "seq_len": 20}, "prefixes": {"n_prefixes": 0}, "nullspace_threshold": 1e3,
      "alpha": 1.0,
      "value": {"max_steps": 8, "lr": 0.5, "kl_factor": 0.0, "clamp_norm_factor": 1e4, "weight_decay": 0.0}}
LAYERS = (1, 2)
REQS = [EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome"),
        EditRequest(prompt="{} speaks", subject="Michel Rocard", target_new=" English"),
        EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new=" piano")]


def _local(model, tok, req, state):
    return compute_edit(model, tok, [req], method="alphaedit", layers=list(LAYERS), hparams=HP,
                        corpus=load_corpus(None), preserved=state)


def _gap(a, b) -> float:
    """Relative difference of two patches' dense updates (same layers)."""
    num = sum(float((x.dense() - y.dense()).norm()) ** 2 for x, y in zip(a.deltas, b.deltas)) ** 0.5
    return num / sum(float(x.dense().norm()) ** 2 for x in a.deltas) ** 0.5


def test_sidecar_alphaedit_uses_the_versions_state(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ckpt = tmp_path / "tiny-llama"
    model.save_pretrained(str(ckpt))
    tok.save_pretrained(str(ckpt))
    fp = weights_fingerprint(model.state_dict())
    (ckpt / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fp, "name": "tiny-llama"}))
    root = tmp_path / "ledger"
    Ledger.open(root, fp, create=True).close()
    cfg = SidecarConfig(checkpoint=str(ckpt), device="cpu", threads=1)

    def compute(client, version, req):
        return client.compute(ComputeEdit(version=version, requests=(req,), method="alphaedit", layers=LAYERS,
                                          hparams=HP), timeout_s=600)

    client = SidecarClient(cfg)
    try:
        assert client.wait_ready().fingerprint == fp
        client.open_ledger(str(root))
        first = compute(client, 0, REQS[0])
        assert first.patch.method == "alphaedit" and first.keys.tags == (first.patch.digest,)
        assert any(float(d.u.abs().max()) > 0 and float(d.v.abs().max()) > 0 for d in first.patch.deltas)
        with Ledger.open(root, fp) as ledger:                       # the sidecar stored the base copies
            v1 = ledger.commit(first.patch, 0, "test", first.probe_report, preserved=first.keys)
        second = compute(client, v1, REQS[1])
        with Ledger.open(root, fp) as ledger:
            v2 = ledger.commit(second.patch, v1, "test", second.probe_report, preserved=second.keys)
            state1, state2 = ledger.preserved_keys(v1), ledger.preserved_keys(v2)
        # rollback: computing at version 1 again uses exactly version 1's state
        again = compute(client, v1, REQS[1])
        assert again.patch.digest == second.patch.digest
    finally:
        client.close()
    # the same edit computed here with version 1's state from the ledger: the same bytes
    apply_patch(model, first.patch)
    local = _local(model, tok, REQS[1], state1)
    blind = _local(model, tok, REQS[1], None)
    assert _gap(second.patch, local.patch) < 0.05 * _gap(second.patch, blind.patch)   # the state was used
    assert [(b.tag, b.layer) for b in second.keys.blocks] == [(second.patch.digest, layer) for layer in LAYERS]
    # a restarted sidecar rebuilds version 2's state from the ledger
    client = SidecarClient(cfg)
    try:
        client.wait_ready()
        client.open_ledger(str(root))
        third = compute(client, v2, REQS[2])
    finally:
        client.close()
    apply_patch(model, second.patch)
    assert _gap(third.patch, _local(model, tok, REQS[2], state2).patch) < 0.05 * _gap(
        third.patch, _local(model, tok, REQS[2], state1).patch)
