"""Helpers of tests/test_candidates.py: a real ``editserve serve --candidates 2`` and HTTP calls."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.test_grpc import TOKENS, GrpcServer


class CandidateServer(GrpcServer):
    """The gRPC test server, started with candidates enabled (LoRA rank <= 8, 2 slots)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.cmd[4:4] = ["--candidates", "2", "--candidate-max-rank", "8"]

    def start(self, timeout_s: float = 600.0) -> None:
        """Start (again): the log of an earlier run of this server is kept as ``server.log.<n>``."""
        if self.log_path.exists():
            n = 1
            while self.log_path.with_name(f"server.log.{n}").exists():
                n += 1
            self.log_path.rename(self.log_path.with_name(f"server.log.{n}"))
        super().start(timeout_s)

    def control(self, method: str, path: str, role: str = "admin", body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/editserve/v1{path}", data=data, method=method,
                                     headers={"content-type": "application/json",
                                              "authorization": f"Bearer {TOKENS[role]}"})
        try:
            with urllib.request.urlopen(req, timeout=600) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def generate(self, prompt: str, model: str = "smollm2", max_tokens: int = 6, request_id: str | None = None,
                 ) -> tuple[list[int], str, str]:
        """(greedy token ids, text, x-editserve-version header)."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "return_token_ids": True}
        headers = {"content-type": "application/json"}
        if request_id is not None:
            headers["x-request-id"] = request_id
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", data=json.dumps(body).encode(),
                                     headers=headers)
        with urllib.request.urlopen(req, timeout=300) as resp:
            out = json.loads(resp.read())
            return list(out["choices"][0]["token_ids"]), out["choices"][0]["text"], resp.headers["x-editserve-version"]

    def models(self) -> list[str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=60) as resp:
            return [m["id"] for m in json.loads(resp.read())["data"]]


class Load:
    """Default-model completions with request ids from `threads` threads until stopped: every
    failure is kept, and (monotonic start time, version label) of every response."""

    def __init__(self, server: CandidateServer, prompts: tuple[str, ...], threads: int = 2, prefix: str = "load") -> None:
        import threading

        self.server, self.prompts, self.prefix = server, prompts, prefix
        self.failures: list[str] = []
        self.labels: list[tuple[float, str]] = []
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]

    def _run(self, k: int) -> None:
        i = 0
        while not self._done.is_set():
            t0 = time.monotonic()
            try:
                _, _, label = self.server.generate(self.prompts[i % len(self.prompts)], max_tokens=2,
                                                   request_id=f"{self.prefix}-{k}-{i}")
                self.labels.append((t0, label))
            except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
                self.failures.append(repr(exc))
            i += 1

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for t in self._threads:
            t.join(300)
