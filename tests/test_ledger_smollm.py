"""The ledger on the real SmolLM2-135M checkpoint: real ROME patches on layer 5's down_proj.

Checks rollback to the base and roll-forward bit for bit by hashing tensors (the touched
matrix and the whole model), conflicts and idempotency, revert with rebase (recomputing
later edits on the new base and reporting metric changes), export/import with validation,
damage detection with the last good version still usable, and the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from editserve.cli import main as cli_main
from editserve.editing import EditRequest, apply_patch, compute_patch, fingerprint, load_model, remove_patch
from editserve.editing.arch import spec_for
from editserve.editing.model import weights_fingerprint
from editserve.ledger import ImportRejected, Ledger, LedgerConflict, LedgerCorrupt
from editserve.ledger.rebase import ModelRecompute, request_metrics
from editserve.ledger.transfer import export_patch, export_version, import_patch, import_version
from editserve.patches import applied_patches
from tests._ledger_util import tensor_hash

pytestmark = pytest.mark.slow

HP = {"value": {"max_steps": 8}}          # short value optimisation keeps the test fast
REQUESTS = [
    EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome", target_true=" Paris"),
    EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new=" English", target_true=" French"),
    EditRequest(prompt="{} plays the sport of", subject="LeBron James", target_new=" football", target_true=" basketball"),
]


@pytest.fixture(scope="module")
def real() -> SimpleNamespace:
    """The model and three ROME patches computed in sequence (each on the model with the earlier ones)."""
    model, tok = load_model()
    fp = fingerprint(model)
    name = spec_for(model).weight_name(5)
    params = dict(model.named_parameters())
    base = {name: params[name].detach().clone()}
    patches, reports = [], []
    for r in REQUESTS:
        p = compute_patch(model, tok, [r], method="rome", hparams=HP)
        apply_patch(model, p)
        reports.append(request_metrics(model, tok, [r]))
        patches.append(p)
    for p in reversed(patches):
        remove_patch(model, p)
    assert not applied_patches(model)
    return SimpleNamespace(model=model, tok=tok, fp=fp, name=name, base=base, patches=patches, reports=reports,
                           base_hash=tensor_hash(base[name]), model_hash=weights_fingerprint(model.state_dict()))


def _ledger(root: Path, real: SimpleNamespace, n: int = 3) -> Ledger:
    led = Ledger.open(root, model_fingerprint=real.fp, caller="test")
    for p, rep in zip(real.patches[:n], real.reports[:n]):
        led.commit(p, led.head(), caller="alice", probe_report=rep, base=real.base)
    return led


def _load_into_model(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """What an engine does on a swap: copy materialised weights into the existing storage."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)


def test_checkpoint_fingerprint_is_the_weights_hash(real: SimpleNamespace) -> None:
    assert real.model_hash == real.fp


def test_rollback_and_roll_forward_are_bit_identical(tmp_path: Path, real: SimpleNamespace) -> None:
    model, name = real.model, real.name
    with _ledger(tmp_path / "l", real) as led:
        info = led.version(1)
        assert info.requests == (REQUESTS[0],) and info.method == "rome" and info.hparams["value"]["max_steps"] == 8
        assert info.probe_report == real.reports[0] and info.caller == "alice"
        # Materialising twice gives the same bytes; v0 gives the original matrix.
        for v in range(4):
            assert led.weights.expected_checksums(v) == led.weights.expected_checksums(v)
        assert tensor_hash(led.weights.materialize(0)[name]) == real.base_hash
        # Version v equals merging the first v patches into the model.
        for v in range(1, 4):
            for p in real.patches[:v]:
                apply_patch(model, p)
            assert torch.equal(dict(model.named_parameters())[name], led.weights.materialize(v)[name])
            for p in reversed(real.patches[:v]):
                remove_patch(model, p)
        try:
            _load_into_model(model, led.weights.materialize(3))
            at3 = request_metrics(model, real.tok, REQUESTS)
            assert all(at3[f"{i}.top1_new"] == 1.0 for i in range(3))      # the edits are live
            assert weights_fingerprint(model.state_dict()) != real.fp
            led.rollback(0)
            _load_into_model(model, led.weights.materialize())
            assert weights_fingerprint(model.state_dict()) == real.fp          # the whole model, bit for bit
            assert tensor_hash(dict(model.named_parameters())[name]) == real.base_hash
            led.rollback(3)                                                    # roll forward
            _load_into_model(model, led.weights.materialize())
            assert request_metrics(model, real.tok, REQUESTS) == at3
            led.rollback(1)
            _load_into_model(model, led.weights.materialize())
            at1 = request_metrics(model, real.tok, REQUESTS)
            assert at1["0.top1_new"] == 1.0 and at1["2.top1_new"] == 0.0
        finally:
            _load_into_model(model, real.base)
        assert weights_fingerprint(model.state_dict()) == real.fp
        assert [e.kind for e in led.events()] == ["create", "commit", "commit", "commit", "rollback", "roll_forward",
                                                  "rollback"]


def test_conflict_and_idempotency_with_real_patches(tmp_path: Path, real: SimpleNamespace) -> None:
    with Ledger.open(tmp_path / "l", model_fingerprint=real.fp) as led:
        v1 = led.commit(real.patches[0], 0, base=real.base, idempotency_key="edit-eiffel")
        assert led.commit(real.patches[0], 0, base=real.base, idempotency_key="edit-eiffel") == v1
        with pytest.raises(LedgerConflict):
            led.commit(real.patches[1], 0, base=real.base)
        assert len(led.versions()) == 2


def test_revert_with_rebase_recomputes_later_edits(tmp_path: Path, real: SimpleNamespace) -> None:
    model, tok = real.model, real.tok
    with _ledger(tmp_path / "l", real) as led:
        before3 = led.weights.expected_checksums(3)
        res = led.revert(1, caller="bob", rebase=ModelRecompute(model, tok))
        assert not applied_patches(model)
        assert weights_fingerprint(model.state_dict()) == real.fp             # the model is back at base
        assert res.version == 4 and [r.original_version for r in res.rebased] == [2, 3]
        new_ids = [r.new_patch for r in res.rebased]
        assert new_ids != [p.digest for p in real.patches[1:]]                 # recomputed on another model
        assert led.active_ids() == tuple(new_ids)
        for r, req in zip(res.rebased, REQUESTS[1:]):
            assert led.patch(r.new_patch).requests == (req,)
            # the probe gate's scores (editserve.ledger.rebase.probe_metrics) on the request's prompt
            assert set(r.changes) == {"efficacy", "efficacy.margin", "fact0.logprob_new", "fact0.logprob_true"}
            assert r.metrics_after["efficacy"] == 1.0                          # the edit still holds
        # The "before" metrics were measured on the model as it was when the edit was committed.
        before = res.rebased[0].metrics_before
        assert before["fact0.logprob_new"] == pytest.approx(real.reports[1]["0.logprob_new"], abs=1e-3)
        assert before["fact0.logprob_true"] == pytest.approx(real.reports[1]["0.logprob_true"], abs=1e-3)
        details = led.version(4).details
        assert details["reverted"] == 1 and len(details["rebased"]) == 2 and "changes" in details["rebased"][0]
        assert led.weights.expected_checksums(3) == before3                            # history untouched
        _load_into_model(model, led.weights.materialize(4))
        try:
            m = request_metrics(model, tok, REQUESTS)
            assert m["0.top1_new"] == 0.0 and m["1.top1_new"] == 1.0 and m["2.top1_new"] == 1.0
        finally:
            _load_into_model(model, real.base)


def test_export_import_real_version(tmp_path: Path, real: SimpleNamespace) -> None:
    with _ledger(tmp_path / "a", real) as a:
        export_version(a, 3, tmp_path / "v3")
        export_patch(a, 2, tmp_path / "p2")
        want = a.weights.expected_checksums(3)
    manifest = json.loads((tmp_path / "v3" / "manifest.json").read_text())
    assert manifest["export"]["model_fingerprint"] == real.fp and len(manifest["patches"]) == 3
    assert manifest["patches"][0]["weights"][0]["shape"] == [576, 1536]
    with Ledger.open(tmp_path / "b", model_fingerprint=real.fp) as b:
        with pytest.raises(ImportRejected, match="the bound is 0.01"):
            import_version(b, tmp_path / "v3", 0, base=real.base, max_relative_norm=0.01)
        assert b.head() == 0 and b.weights.base_names() == ()
        v = import_version(b, tmp_path / "v3", 0, caller="replica-2", base=real.base)
        assert b.weights.expected_checksums(v) == want
        assert b.rollback(0) == 0 and tensor_hash(b.weights.materialize()[real.name]) == real.base_hash
        v2 = import_patch(b, tmp_path / "p2", 0)
        assert b.active_ids(v2) == (real.patches[1].digest,)
    with Ledger.open(tmp_path / "c", model_fingerprint="0" * 64) as c:
        with pytest.raises(ImportRejected, match="this ledger is for 0000000000000000"):
            import_patch(c, tmp_path / "p2", 0, base=real.base)


def test_damaged_real_ledger_keeps_last_good_version(tmp_path: Path, real: SimpleNamespace) -> None:
    with _ledger(tmp_path / "l", real) as led:
        good = led.weights.expected_checksums(2)
        blob = led.blobs.path(led.store.patch(real.patches[2].digest).blob)
    blob.write_bytes(blob.read_bytes()[:-8])                  # a torn write
    with pytest.raises(LedgerCorrupt, match=blob.name) as exc:
        Ledger.open(tmp_path / "l", model_fingerprint=real.fp)
    assert exc.value.last_good == 2 and exc.value.bad_versions == (3,)
    with Ledger.open(tmp_path / "l", model_fingerprint=real.fp, strict=False) as led:
        assert led.rollback(2) == 2 and led.weights.expected_checksums() == good


def test_cli_on_real_ledger(tmp_path: Path, real: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "l")
    _ledger(tmp_path / "l", real).close()

    def run(*argv: str) -> str:
        code = cli_main(["ledger", *argv, "--ledger", root])
        out = capsys.readouterr()
        assert code == 0, out.err
        return out.out

    out = run("versions")
    assert "The Eiffel Tower is located in the city of → Rome" in out and "head = version 3" in out
    out = run("show", "1")
    assert "' Rome'" in out and "was ' Paris'" in out and '"max_steps": 8' in out and "shape (576, 1536)" in out
    out = run("diff", "0", "3")
    assert "3 only in 3" in out and "model.layers.5.mlp.down_proj.weight" in out
    row = next(line for line in out.splitlines() if line.startswith("5 "))
    assert 0.01 < float(row.split()[-1]) < 0.5                              # ‖ΔW‖/‖W‖ of three ROME edits
    assert "version 3 → version 0" in run("rollback", "0")
    run("rollback", "3")
    assert "reverted version 2" in run("revert", "2")
    run("export", "4", str(tmp_path / "exp"))
    assert (tmp_path / "exp" / "version.safetensors").exists()
