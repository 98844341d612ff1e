"""Helpers the server tests share: one sample of a real ``/metrics`` scrape, and waiting for a
version the server makes by itself (an automatic consolidation) to become the served head."""

from __future__ import annotations

import re
import time
import urllib.request
from typing import Any


def metric_sample(port: int, sample: str, who: str = "the server") -> float:
    """The value of `sample` (a metric name with its labels, as exported) on ``/metrics`` at `port`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as resp:
        text = resp.read().decode()
    m = re.search(rf"^{re.escape(sample)} ([0-9.e+]+)$", text, re.M)
    assert m, f"{sample} is not exported by {who}"
    return float(m.group(1))


def wait_for_served_head_after(client: Any, last: int, timeout_s: float = 600.0) -> tuple[Any, Any]:
    """Poll `client` (an `editserve.client.EditClient`) until the ledger head is past `last` and
    served; (the last status, the head version's record) — the caller asserts what it expected."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = client.status()
        if (st.ledger_head > last and st.served_version == st.ledger_head) or time.monotonic() >= deadline:
            return st, client.get_version(st.ledger_head)
        time.sleep(1.0)
