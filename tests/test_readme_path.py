"""The README's path as a new user takes it: ``make serve``, then ``editserve edit ...`` and
``editserve rollback ...``, with no token set up by hand.

``editserve serve`` runs with the flags ``make serve`` gives it (read from the Makefile) and a fresh
``$EDITSERVE_HOME``, in which the embedded checkpoint and the default corpus are linked from the
usual home (so nothing is converted or downloaded; statistics use the usual home's cache too). The
only changes to the user's commands are the ports: free ones instead of 8000 and 50051, which other
servers on this machine may hold (``--port`` and ``--grpc-addr`` for the server, ``--server`` for
the CLI). No token option, variable or file is given: the server creates its admin token under
``$EDITSERVE_HOME`` and the CLI finds it. A call with no token is refused.

Needs the server side of issue 12 (the gRPC plane always on, the local admin token): without it
the CLI cannot reach an authenticated control plane and this test fails.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from editserve.editing.corpus import DEFAULT_NAME, default_corpus  # noqa: E402
from editserve.editing.model import embedded_checkpoint  # noqa: E402
from tests._cli_loopback import free_port  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TOKEN_ENVS = ("EDITSERVE_CONTROL_TOKEN", "EDITSERVE_CONTROL_TOKENS_FILE", "EDITSERVE_GRPC_TARGET",
              "EDITSERVE_GRPC_ADDR", "EDITSERVE_GRPC_INSECURE", "EDITSERVE_LEDGER", "VLLM_API_KEY")


def make_serve_args() -> list[str]:
    """The arguments ``make serve`` passes to ``editserve serve`` on a machine without a GPU."""
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^serve: venv\n\t\$\(BIN\)/editserve serve (.*)$", text, re.M)
    assert recipe and recipe.group(1) == "$(SERVE_EDIT_ARGS) $(SERVE_CPU_ARGS) $(SERVE_ARGS)", \
        "make serve changed; update this test"
    edit = re.search(r"^SERVE_EDIT_ARGS \?= (.*)$", text, re.M).group(1)
    cpu = re.search(r"^SERVE_CPU_ARGS := (.*)$", text, re.M).group(1)
    serve = re.search(r"^SERVE_ARGS \?= (.*)$", text, re.M).group(1)
    return shlex.split(edit) + shlex.split(cpu) + shlex.split(serve)


def readme_cli_commands() -> list[list[str]]:
    """The ``.venv/bin/editserve ...`` commands of the README's quick start, as argument lists."""
    text = (ROOT / "README.md").read_text()
    return [shlex.split(line)[1:] for line in text.splitlines() if line.startswith(".venv/bin/editserve ")]


def test_readme_quick_start_is_make_serve_then_edit_then_rollback() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make serve" in readme
    commands = readme_cli_commands()
    assert [c[0] for c in commands] == ["edit", "rollback"], commands
    assert not any(a.startswith("--token") or a == "--server" for c in commands for a in c)
    args = make_serve_args()
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert args[0] == "--neuron-slots", "editserve's own options lead (the rest goes to vLLM)"
    from editserve.editing.hparams import load_hparams

    gated_layer = load_hparams("gated", [embedded_checkpoint().name.lower(), "llama"]).layer
    assert args[1] == f"{gated_layer}:1024", "make serve's slots must be at the embedded model's gated layer"


def _home(tmp: Path) -> Path:
    """A fresh home; model, corpus and the statistics cache linked from the usual one."""
    ckpt = embedded_checkpoint()
    default_corpus()
    usual = ckpt.parents[1]
    home = tmp / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / ckpt.name).symlink_to(ckpt, target_is_directory=True)
    assert (usual / "corpora" / f"{DEFAULT_NAME}.txt").is_file()
    (home / "corpora").symlink_to(usual / "corpora", target_is_directory=True)
    (usual / "stats").mkdir(exist_ok=True)
    (home / "stats").symlink_to(usual / "stats", target_is_directory=True)
    return home


def test_make_serve_then_edit_and_rollback_with_no_setup(tmp_path: Path) -> None:
    home = _home(tmp_path)
    http_port, grpc_port = free_port(), free_port()
    grpc = f"127.0.0.1:{grpc_port}"
    args = make_serve_args()
    args[args.index("--port") + 1] = str(http_port)
    cache = ROOT / ".cache" / "test-readme"
    for sub in ("vllm", "inductor", "tmp", "rpc"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in TOKEN_ENVS}
    env.update({"EDITSERVE_HOME": str(home), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
                "VLLM_CACHE_ROOT": str(cache / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
                "TMPDIR": str(cache / "tmp"), "VLLM_RPC_BASE_PATH": str(cache / "rpc"), "VLLM_NO_USAGE_STATS": "1"})
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "editserve.cli", "serve", "--grpc-addr", grpc, *args],
                                  cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)

    def tail() -> str:
        return log_path.read_text(errors="replace")[-6000:]

    def cli(*argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "editserve.cli", *argv, "--server", grpc], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=timeout)

    try:
        deadline = time.monotonic() + 900
        while True:
            assert server.poll() is None, f"server exited with {server.returncode}:\n{tail()}"
            assert time.monotonic() < deadline, f"server not up in 900 s:\n{tail()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(3)
        # The server made its admin token, readable by its owner only.
        tokens = home / "control-tokens.json"
        assert tokens.is_file() and tokens.stat().st_mode & 0o777 == 0o600, tail()
        status = cli("status", timeout=120)
        assert status.returncode == 0, status.stderr + tail()
        assert "ledger head" in status.stdout
        # Nothing is open: a call without a token is refused.
        from editserve.client import ControlError, EditClient

        with EditClient(grpc, token="", timeout_s=60) as c:
            with pytest.raises(ControlError) as refused:
                c.status()
        assert refused.value.code == "UNAUTHENTICATED"
        # The README's edit, then its rollback, as written there.
        edit_cmd, rollback_cmd = readme_cli_commands()
        edit = cli(*edit_cmd)
        assert edit.returncode == 0, edit.stdout + edit.stderr + tail()
        assert "now serving version 1 (was 0)" in edit.stdout, edit.stdout
        assert "probe gate: PASSED" in edit.stdout and "warning" not in edit.stderr
        rollback = cli(*rollback_cmd, timeout=300)
        assert rollback.returncode == 0, rollback.stdout + rollback.stderr + tail()
        assert "now serving version 0 (was 1)" in rollback.stdout
        versions = cli("versions", timeout=120)
        assert versions.returncode == 0 and "head = version 0" in versions.stdout
        assert "local-admin" in versions.stdout          # the audit names the token's holder
        # make serve's neuron slots make the README's edit, which names no method, a gated edit
        assert re.search(r"\bgated\b", versions.stdout), versions.stdout
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(90)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
