"""The built package, installed as a user would get it: nothing is generated or written into the
installed package at run time, and its gRPC control plane starts from the wheel alone.

Steps: build the sdist from the checkout (setuptools' PEP 517 backend), unpack it outside the
checkout and build the wheel from it (so the sdist must carry the proto and the build step),
install the wheel with ``--no-deps`` into a fresh venv outside the checkout, whose heavy
dependencies (torch, grpcio, ...) come from the project venv's site-packages through a ``.pth``
line (a 2.5 GB install otherwise), make the installed package read-only, and, from a directory
outside the checkout with ``grpc_tools`` made unimportable, start the control plane
(`editserve.control.server.start_server` over a real `ControlPlane` and SQLite ledger, no engine)
and call it: health check, Status with the local admin token, Status without a token. The
installed files must be byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import site
import stat
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = f"python{sys.version_info.major}.{sys.version_info.minor}"

# Runs inside the fresh venv, in a directory outside the checkout.
SCRIPT = r'''
import asyncio, json, os, sys
sys.modules["grpc_tools"] = None              # the build-time code generator must not be needed now
import grpc
import editserve, editserve.control.gen as gen
from grpc_health.v1 import health_pb2, health_pb2_grpc
from editserve.client import ControlError, EditClient
from editserve.control.auth import TokenTable
from editserve.control.home import ensure_local_admin_token
from editserve.control.operations import Operations
from editserve.control.server import start_server
from editserve.engine.control import ControlPlane, ControlSettings
from editserve.ledger import Ledger

addr, ledger_dir = sys.argv[1], sys.argv[2]
out = {"package": editserve.__file__, "stubs": gen.pb2.__file__, "proto": str(gen.PROTO_FILE),
       "proto_exists": gen.PROTO_FILE.is_file()}

async def main():
    ledger = Ledger.open(ledger_dir, model_fingerprint="f" * 64)
    control = ControlPlane(None, ControlSettings(model=None))
    control.ledger = ledger
    ops = Operations(control, TokenTable.from_file(ensure_local_admin_token()))
    server = await start_server(ops, addr, None)
    try:
        def calls():
            with grpc.insecure_channel(addr) as ch:
                out["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(
                    health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(service=gen.SERVICE_NAME), timeout=20).status)
            with EditClient(addr, timeout_s=20) as c:              # the local admin token, found by default
                out["token_source"] = c.token_source
                st = c.status()
                out["ledger_head"], out["ledger_root"] = st.ledger_head, st.ledger_root
            with EditClient(addr, token="", timeout_s=20) as c:
                try:
                    c.status()
                    out["no_token"] = "answered"
                except ControlError as e:
                    out["no_token"] = e.code
        await asyncio.to_thread(calls)
    finally:
        await server.stop(None)
        ledger.close()

asyncio.run(main())
print("RESULT " + json.dumps(out))
'''


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_wheel_ships_stubs_and_starts_the_control_plane_read_only(tmp_path: Path) -> None:
    from tests._cli_loopback import free_port

    assert not str(tmp_path).startswith(str(ROOT))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDITSERVE_CONTROL_TOKEN",
                                                             "EDITSERVE_CONTROL_TOKENS_FILE")}
    # 1. sdist from the checkout, wheel from the unpacked sdist.
    sdist_dir = tmp_path / "sdist"
    _run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
          "print(build_meta.build_sdist(sys.argv[1]))", str(sdist_dir)], cwd=ROOT, env=env)
    (sdist,) = sdist_dir.glob("editserve-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
        assert any(n.endswith("protos/editserve/v1/editserve.proto") for n in names), names
        assert not any("/_gen/" in n for n in names), "the sdist must not carry generated stubs"
        tf.extractall(tmp_path / "src", filter="data")
    (src,) = (tmp_path / "src").iterdir()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
          str(tmp_path / "dist"), str(src)], cwd=tmp_path, env=env)
    (wheel,) = (tmp_path / "dist").glob("editserve-*.whl")

    # 2. A fresh venv outside the checkout; heavy dependencies from the project venv.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=env)
    vpy = venv / "bin" / "python"
    target_site = Path(_run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            env=env).stdout.strip())
    deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (target_site / "editserve-test-deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "-q", "--no-deps", "--no-compile",
          str(wheel)], cwd=tmp_path, env=env)
    pkg = target_site / "editserve"
    gen = pkg / "control" / "_gen"
    for name in ("__init__.py", "editserve_pb2.py", "editserve_pb2_grpc.py", "editserve.proto"):
        assert (gen / name).is_file(), f"the wheel lacks editserve/control/_gen/{name}"

    # 3. Read-only package (for a non-root user this also makes any write fail); start and call it.
    for p in [pkg, *pkg.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = _tree_digest(pkg)
    work = tmp_path / "elsewhere"
    work.mkdir()
    run_env = {**env, "EDITSERVE_HOME": str(tmp_path / "home"), "PYTHONDONTWRITEBYTECODE": "1"}
    run_env.pop("EDITSERVE_PROTO", None)
    try:
        r = _run([str(vpy), "-c", SCRIPT, f"127.0.0.1:{free_port()}", str(tmp_path / "ledger")], cwd=work,
                 env=run_env)
    finally:
        for p in [pkg, *pkg.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert out["package"].startswith(str(pkg)), out          # the wheel's copy, not the checkout's
    assert out["stubs"].startswith(str(gen)) and out["proto_exists"], out
    assert out["health"] == "SERVING"
    assert out["token_source"].endswith("control-tokens.json")
    assert out["ledger_head"] == 0 and out["ledger_root"] == str(tmp_path / "ledger")
    assert out["no_token"] == "UNAUTHENTICATED"
    assert _tree_digest(pkg) == before, "something wrote into the installed package"
