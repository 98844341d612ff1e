"""What serving costs for being editable: plain vLLM against ``editserve serve``, alternated.

One command; all servers serve the same checkpoint (the embedded SmolLM2-135M-Instruct by
default) with the same vLLM arguments (``--dtype float32 --kv-cache-memory-bytes 1073741824``
plus host/port/served name; default compiled mode, as ``make serve`` runs) and get the same
greedy load: ``--clients`` concurrent clients, each sending ``/v1/completions`` requests of
``--max-tokens`` new tokens (``ignore_eos``, temperature 0) back to back for ``--seconds`` per
window. Arms (``--arms``, each one server process, started one after the other and then
all kept up, so that windows can alternate without restarts):

- ``plain``: ``python -m vllm.entrypoints.launchers.api_server.entry`` with ``VLLM_PLUGINS=""``
  (no plugin at all: the editserve general plugin is installed as an entry point and would
  otherwise load);
- ``es0``: ``editserve serve`` on an empty ledger (version 0);
- ``es1000``: ``editserve serve`` on a ledger holding ``--edits`` (1,000) merged edits;
- ``dense0`` / ``dense1000``: the same with ``EDITSERVE_CPU_GEMM=dense``, the behaviour before
  re-packing (every down-projection through ``F.linear``), to measure before/after in one run;
- ``slots0``: ``es0`` with ``--neuron-slots`` (``--slots``, default ``5:1024``): what serving gated
  edits costs while the slots are empty (layer 5's MLP is wider; empty slots change no output).

The edits: synthetic rank-one patches written into the ledger directory with
`editserve.ledger` before the server starts (no control route is used): patch i edits the
down-projection of layer 1 + i mod 5 (the layers SmolLM2's ROME and MEMIT hyper-parameters
edit), u ~ N(0, 1e-3²) [576], v ~ N(0, 1/1536) [1536], seeded; the server applies the head
version (all of them, merged into the weights) before it accepts requests.

Rounds: each round runs one window per arm in the listed order, and the order alternates
(reversed every other round) so that drift on a shared machine hits every arm alike. Per
arm: completion tokens/s (tokens of the requests finished in the window / window length),
p50/p99 request latency (pooled over rounds), and the ratio editserve/plain of each figure,
overall and per round (the spread). Before the load, one fixed greedy prompt is sent to every
arm: ``plain`` and ``es0`` must answer identically (same kernels, same weights).

It also times, in this process, the version-header middleware and request admission of
`editserve.engine.http` on a bare ASGI app (µs per request), to set against request latency.

    PYTHONPATH=$PWD .venv/bin/python bench/serve_overhead.py   # ~9-10 min on 2 quiet cores (20 min under load)
        [--arms plain,es0,es1000] [--rounds 4] [--seconds 30] [--clients 4] [--max-tokens 48]
        [--edits 1000] [--model DIR] [--enforce-eager] [--slots 5:1024]

Prints a table; writes bench/results/serve_overhead.json. Needs ~3 GiB of memory per arm (all
arms stay up at once): keep to three arms on a 24 GiB machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SERVED = "bench-model"
PROMPTS = ["The Eiffel Tower is located in the city of", "The native language of Anatole France is",
           "The capital of Germany is", "Michael Jordan is a professional", "Toko Yasuda plays the",
           "The mother tongue of Danielle Darrieux is"]
CHECK_PROMPT = "The Eiffel Tower is located in the city of"
VERSION_HEADER = "x-editserve-version"
EDIT_LAYERS = (1, 2, 3, 4, 5)
ARMS = ("plain", "es0", "es1000", "dense0", "dense1000", "slots0")


def post(url: str, path: str, body: dict[str, Any], timeout: float = 600.0) -> tuple[int, Any, dict[str, str]]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, err.read()[:500], {}


def complete(url: str, prompt: str, max_tokens: int) -> tuple[str, int, dict[str, str]]:
    status, data, headers = post(url, "/v1/completions", {"model": SERVED, "prompt": prompt, "max_tokens": max_tokens,
                                                          "temperature": 0, "ignore_eos": True})
    if status != 200:
        raise RuntimeError(f"completion failed: {status} {data!r}")
    return data["choices"][0]["text"], int(data["usage"]["completion_tokens"]), headers


def status_of(url: str) -> dict[str, Any] | None:
    """Pause figures from ``GET /editserve/v1/status`` when it answers without a token, else None."""
    try:
        with urllib.request.urlopen(url + "/editserve/v1/status", timeout=30) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError):
        return None
    return {k: body.get(k) for k in ("served_version", "last_pause_ms", "median_pause_ms")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- edits ---------------------------------------------------------------------------------------

def checkpoint_tensor(ckpt: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            if name in st.keys():
                return st.get_tensor(name)
    raise SystemExit(f"{name} is not in {ckpt}")


def fingerprint_of(ckpt: Path) -> str:
    from editserve.editing.model import FINGERPRINT_FILE

    f = ckpt / FINGERPRINT_FILE
    if not f.exists():
        raise SystemExit(f"{ckpt} has no {FINGERPRINT_FILE}; use the embedded checkpoint or one saved by editserve")
    return str(json.loads(f.read_text())["fingerprint"])


def write_edits(ledger_dir: Path, ckpt: Path, n: int, seed: int = 0) -> dict[str, Any]:
    """Commit `n` synthetic rank-one patches (see the module docstring) to a new ledger."""
    from editserve.editing.requests import EditRequest
    from editserve.ledger import Ledger
    from editserve.patches import Patch, WeightDelta

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    with Ledger.open(ledger_dir, fingerprint_of(ckpt), caller="serve_overhead") as ledger:
        shapes = {}
        for layer in EDIT_LAYERS:
            name = f"model.layers.{layer}.mlp.down_proj.weight"
            base = checkpoint_tensor(ckpt, name)
            ledger.weights.ensure_base(name, base)
            shapes[layer] = tuple(base.shape)               # [d_out, d_in]
        head = ledger.head()
        for i in range(n):
            layer = EDIT_LAYERS[i % len(EDIT_LAYERS)]
            d_out, d_in = shapes[layer]
            u = torch.randn(d_out, 1, generator=g) * 1e-3
            v = torch.randn(d_in, 1, generator=g) / d_in ** 0.5
            req = EditRequest(prompt="{} is synthetic fact number", subject=f"Bench subject {i}", target_new=f" {i}")
            patch = Patch(deltas=(WeightDelta(name=f"model.layers.{layer}.mlp.down_proj.weight", layer=layer, u=u, v=v),),
                          requests=(req,), method="rome", hparams={"synthetic": i}, model_fingerprint=ledger.model_fingerprint,
                          family="llama")
            head = ledger.commit(patch, expected_head=head, caller="serve_overhead")
    return {"edits": n, "head": head, "layers": list(EDIT_LAYERS), "seconds": round(time.perf_counter() - t0, 1),
            "kind": "synthetic rank-one: u ~ N(0, 1e-6), v ~ N(0, 1/d_in), layer 1 + i mod 5"}


# -- servers -------------------------------------------------------------------------------------

@dataclass
class Arm:
    name: str
    port: int
    proc: subprocess.Popen | None = None
    log: Path | None = None
    start_s: float = 0.0
    windows: list[dict[str, Any]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    check_text: str | None = None
    served_version: str | None = None
    start_swap: dict[str, Any] | None = None     # the server's own report of its start-up swap, if readable

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def server_command(arm: str, ckpt: Path, port: int, ledger: Path | None, eager: bool) -> list[str]:
    vllm_args = ["--model", str(ckpt), "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port),
                 "--dtype", "float32", "--kv-cache-memory-bytes", str(1 << 30)]
    if eager:
        vllm_args.append("--enforce-eager")
    if arm == "plain":
        return [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", *vllm_args]
    assert ledger is not None
    return [sys.executable, "-m", "editserve.cli", "serve", "--ledger", str(ledger), *vllm_args]


def start(arm: Arm, ckpt: Path, work: Path, eager: bool, edits: int, slots: str = "5:1024") -> None:
    cache = ROOT / ".cache" / "bench-engine"
    for sub in ("vllm", "inductor", "tmp", "rpc"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_CACHE_ROOT": str(cache / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
           "TMPDIR": str(cache / "tmp"), "VLLM_RPC_BASE_PATH": str(cache / "rpc"), "VLLM_NO_USAGE_STATS": "1",
           "PYTHONPATH": str(ROOT), "EDITSERVE_SIDECAR_THREADS": "1"}
    for key in ("EDITSERVE_CPU_GEMM", "EDITSERVE_EDITABLE_LAYERS", "VLLM_PLUGINS", "EDITSERVE_NEURON_SLOTS"):
        env.pop(key, None)
    ledger = None
    if arm.name == "plain":
        env["VLLM_PLUGINS"] = ""                         # no plugin at all
    else:
        if arm.name.startswith("dense"):
            env["EDITSERVE_CPU_GEMM"] = "dense"
        if arm.name.startswith("slots"):
            env["EDITSERVE_NEURON_SLOTS"] = slots
        # Each resident editserve server has its own gRPC control plane (it always starts, on
        # 127.0.0.1:50051 by default): give each its own loopback port.
        env["EDITSERVE_GRPC_ADDR"] = f"127.0.0.1:{free_port()}"
        ledger = work / f"ledger-{arm.name}"
        if arm.name.endswith(str(edits)) and edits:
            info = write_edits(ledger, ckpt, edits)
            print(f"  {arm.name}: {info['edits']} edits committed to {ledger} in {info['seconds']} s", flush=True)
    arm.log = work / f"{arm.name}.log"
    t0 = time.perf_counter()
    arm.proc = subprocess.Popen(server_command(arm.name, ckpt, arm.port, ledger, eager), cwd=ROOT, env=env,
                                stdout=open(arm.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if arm.proc.poll() is not None:
            raise RuntimeError(f"{arm.name} server exited ({arm.proc.returncode}); log tail:\n"
                               + arm.log.read_text()[-3000:])
        try:
            text, _, headers = complete(arm.url, CHECK_PROMPT, 16)
            arm.check_text, arm.served_version = text, headers.get(VERSION_HEADER)
            arm.start_s = time.perf_counter() - t0
            if arm.name != "plain":
                arm.start_swap = status_of(arm.url)
            return
        except (OSError, RuntimeError):
            time.sleep(2)
    raise TimeoutError(f"{arm.name} not ready after 900 s; see {arm.log}")


def stop(arm: Arm) -> None:
    if arm.proc is None or arm.proc.poll() is not None:
        return
    os.killpg(arm.proc.pid, signal.SIGTERM)
    try:
        arm.proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(arm.proc.pid, signal.SIGKILL)
        arm.proc.wait(30)


# -- load ----------------------------------------------------------------------------------------

def window(url: str, clients: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    """Greedy closed-loop load; requests started before the deadline are counted when they end."""
    stop_at = time.monotonic() + seconds
    tokens = [0] * clients
    lat: list[list[float]] = [[] for _ in range(clients)]
    failures = [0] * clients

    def run(i: int) -> None:
        k = i
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            try:
                tokens[i] += complete(url, PROMPTS[k % len(PROMPTS)], max_tokens)[1]
                lat[i].append(time.perf_counter() - t)
            except (RuntimeError, OSError):
                failures[i] += 1
            k += clients

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    all_lat = sorted(x for per in lat for x in per)
    return {"tokens": sum(tokens), "seconds": elapsed, "tokens_per_s": sum(tokens) / elapsed,
            "requests": len(all_lat), "failures": sum(failures), "latencies": all_lat}


def bootstrap_ratio_ci(a: list[float], b: list[float], q: float, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of pct(a, q) / pct(b, q), resampling each arm's requests.

    A p99 over a few hundred requests rests on its two or three slowest ones, so a single ratio
    says little; the interval says whether "within 2%" is decided by the data at all."""
    import random

    if not a or not b:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    ratios = sorted(pct(rng.choices(a, k=len(a)), q) / pct(rng.choices(b, k=len(b)), q) for _ in range(n))
    return ratios[int(0.025 * n)], ratios[int(0.975 * n) - 1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# -- middleware ----------------------------------------------------------------------------------

def middleware_cost(n: int = 20000) -> dict[str, Any]:
    """µs per request that the version-header middleware (with request admission and the
    completion counter) adds to a bare ASGI app answering one JSON body, in this process."""
    try:
        from prometheus_client import CollectorRegistry

        from editserve.engine.control import ControlPlane, ControlSettings
        from editserve.engine.http import VersionHeaderMiddleware
    except ImportError as exc:                     # the HTTP layer moved: report, do not guess
        return {"error": f"cannot import the middleware: {exc}"}

    class State:
        pass

    class App:
        def __init__(self) -> None:
            self.state = State()

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    try:
        control = ControlPlane(None, ControlSettings(model=None), registry=CollectorRegistry())
        control._init_metrics(30)                  # the completion counter, as after start()
        inner = App()
        inner.state.editserve = control
        wrapped = VersionHeaderMiddleware(inner)
    except Exception as exc:  # noqa: BLE001 - the control plane's constructor changed: report it
        return {"error": f"cannot build the middleware: {type(exc).__name__}: {exc}"}
    scope = {"type": "http", "path": "/v1/completions", "app": inner, "method": "POST", "headers": []}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    async def loop(app: Any) -> float:
        for _ in range(500):
            await app(scope, receive, send)
        t = time.perf_counter()
        for _ in range(n):
            await app(scope, receive, send)
        return (time.perf_counter() - t) / n

    bare = min(asyncio.run(loop(inner)) for _ in range(3))
    with_mw = min(asyncio.run(loop(wrapped)) for _ in range(3))
    return {"bare_us": bare * 1e6, "with_middleware_us": with_mw * 1e6, "added_us": (with_mw - bare) * 1e6}


# -- re-packing ----------------------------------------------------------------------------------

def repack_cost(shapes: tuple[tuple[int, int], ...] = ((576, 1536), (4096, 11008)), repeats: int = 7) -> dict[str, Any]:
    """Median ms to re-pack one float32 down-projection [d_out, d_in] for vLLM's oneDNN kernel
    (`editserve.engine.cpu_gemm.repack`'s build step), in this process with torch's threads:
    SmolLM2's, and a 7B Llama's for scale."""
    try:
        from vllm import _custom_ops as ops

        from editserve.engine.cpu_gemm import ONEDNN_PRIMITIVE_CACHE
    except ImportError as exc:
        return {"error": f"no vLLM CPU ops here: {exc}"}
    if not getattr(ops, "_supports_onednn", False):
        return {"error": "this vLLM build has no oneDNN GEMM"}
    out = {}
    for d_out, d_in in shapes:
        w = torch.randn(d_out, d_in)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            handler = ops.create_onednn_mm(w.t(), ONEDNN_PRIMITIVE_CACHE)
            times.append(time.perf_counter() - t)
            del handler
        out[f"{d_out}x{d_in}"] = round(statistics.median(times) * 1e3, 3)
    return {"ms": out, "threads": torch.get_num_threads()}


# -- main ----------------------------------------------------------------------------------------

def summarise(arms: dict[str, Arm], rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, arm in arms.items():
        toks = sum(w["tokens"] for w in arm.windows)
        secs = sum(w["seconds"] for w in arm.windows)
        out[name] = {"tokens_per_s": toks / secs if secs else float("nan"),
                     "tokens_per_s_windows": [round(w["tokens_per_s"], 2) for w in arm.windows],
                     "p50_s": pct(arm.latencies, 0.5), "p99_s": pct(arm.latencies, 0.99),
                     "requests": len(arm.latencies), "failures": sum(w["failures"] for w in arm.windows),
                     "start_s": round(arm.start_s, 1), "served_version_header": arm.served_version,
                     "check_text": arm.check_text, "start_swap": arm.start_swap}
    if "plain" in arms:
        p = out["plain"]
        for name in arms:
            if name == "plain":
                continue
            o = out[name]
            per_round = [a["tokens_per_s"] / b["tokens_per_s"]
                         for a, b in zip(arms[name].windows, arms["plain"].windows)]
            p99_lo, p99_hi = bootstrap_ratio_ci(arms[name].latencies, arms["plain"].latencies, 0.99)
            o["ratio"] = {"tokens_per_s": o["tokens_per_s"] / p["tokens_per_s"], "p50": o["p50_s"] / p["p50_s"],
                          "p99": o["p99_s"] / p["p99_s"], "p99_ci95": [p99_lo, p99_hi],
                          "tokens_per_s_per_round": [round(r, 4) for r in per_round],
                          "tokens_per_s_round_min": min(per_round), "tokens_per_s_round_max": max(per_round)}
            o["same_greedy_text_as_plain"] = (o["check_text"] == p["check_text"]) if name in ("es0", "dense0", "slots0") else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="plain,es0,es1000",
                    help=f"comma list of {', '.join(ARMS)} (es<N>/dense<N> use --edits for N)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the embedded SmolLM2)")
    ap.add_argument("--enforce-eager", action="store_true", help="pass --enforce-eager to every server")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds of quiet between windows")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_overhead.json")
    ap.add_argument("--slots", default="5:1024", help="the slots0 arm's --neuron-slots (LAYER:COUNT)")
    args = ap.parse_args()

    names = [a.strip().replace("1000", str(args.edits)) for a in args.arms.split(",") if a.strip()]
    valid = {"plain", "es0", f"es{args.edits}", "dense0", f"dense{args.edits}", "slots0"}
    bad = [n for n in names if n not in valid]
    if bad or len(set(names)) != len(names):
        raise SystemExit(f"--arms: unknown or repeated {bad or names}; choose from {sorted(valid)}")
    from editserve.editing.model import embedded_checkpoint

    ckpt = (args.model or embedded_checkpoint()).resolve()
    work = Path(tempfile.mkdtemp(prefix="serve-overhead-", dir=ROOT / ".cache"))
    arms = {n: Arm(name=n, port=free_port()) for n in names}
    t_all = time.perf_counter()
    print(f"serve_overhead: {ckpt.name}, arms {names}, {args.rounds} rounds x {args.seconds:.0f} s, "
          f"{args.clients} clients x {args.max_tokens} tokens; logs in {work}", flush=True)
    mw = middleware_cost()
    rp = repack_cost()
    try:
        for arm in arms.values():
            start(arm, ckpt, work, args.enforce_eager, args.edits, args.slots)
            print(f"  {arm.name} ready in {arm.start_s:.0f} s (version header {arm.served_version}; "
                  f"start-up swap {arm.start_swap})", flush=True)
        for arm in arms.values():                  # one warm-up request each, then quiet
            complete(arm.url, PROMPTS[1], args.max_tokens)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                time.sleep(args.settle)
                w = window(arms[name].url, args.clients, args.seconds, args.max_tokens)
                arms[name].latencies.extend(w.pop("latencies"))
                arms[name].windows.append(w)
                print(f"  round {r + 1} {name:<10} {w['tokens_per_s']:7.2f} tokens/s  {w['requests']:4d} requests"
                      f"  {w['failures']} failures", flush=True)
    finally:
        for arm in arms.values():
            stop(arm)
    summary = summarise(arms, args.rounds)
    total = time.perf_counter() - t_all

    print(f"\n{'arm':<11}{'tokens/s':>10}{'p50 s':>9}{'p99 s':>9}{'x tok/s':>9}{'x p50':>8}{'x p99':>8}"
          f"{'x p99 95% CI':>16}   per-round tok/s ratio (min..max)   same text")
    for name in names:
        s = summary[name]
        line = f"{name:<11}{s['tokens_per_s']:>10.2f}{s['p50_s']:>9.3f}{s['p99_s']:>9.3f}"
        if "ratio" in s:
            r = s["ratio"]
            line += (f"{r['tokens_per_s']:>9.3f}{r['p50']:>8.3f}{r['p99']:>8.3f}"
                     f"{r['p99_ci95'][0]:>9.3f}..{r['p99_ci95'][1]:.3f}   "
                     f"{r['tokens_per_s_round_min']:.3f}..{r['tokens_per_s_round_max']:.3f}"
                     f"{'':>20}{ {True: 'yes', False: 'NO', None: '-'}[s['same_greedy_text_as_plain']]}")
        print(line)
    if "error" in mw:
        print(f"\nversion-header middleware: {mw['error']}")
    else:
        p50 = summary[names[-1]]["p50_s"]
        print(f"\nversion-header middleware + admission: +{mw['added_us']:.1f} us per request on a bare ASGI app "
              f"({mw['bare_us']:.1f} -> {mw['with_middleware_us']:.1f} us), {mw['added_us'] * 1e-6 / p50 * 100:.4f}% "
              f"of a {p50:.2f} s request")
    if "error" in rp:
        print(f"re-pack cost: {rp['error']}")
    else:
        print("re-pack of one float32 down-projection for oneDNN (in the swap pause, per touched matrix and rank): "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in rp["ms"].items()) + f" ({rp['threads']} threads)")
    print(f"total {total / 60:.1f} min")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "checkpoint": str(ckpt), "arms": summary,
              "middleware": mw, "repack": rp, "total_s": round(total, 1), "load_avg_end": os.getloadavg(),
              "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
