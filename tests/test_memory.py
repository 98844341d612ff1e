"""editserve.memory.trim_heap gives freed heap memory back (glibc), where a long-running editing
process would otherwise keep it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# Run in a fresh interpreter: the heap layout of the test process is whatever earlier tests left.
SCRIPT = textwrap.dedent("""
    import os, torch
    from editserve.memory import trim_heap

    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    big = torch.empty(24 * 2**20 // 4)       # freeing a 24 MiB mmapped chunk raises glibc's mmap threshold
    del big
    chunks, live = [], []
    for _ in range(100):                     # 400 MiB freed between 100 small allocations that stay live
        chunks.append(torch.ones(4 * 2**20 // 4))
        live.append(torch.ones(64 * 2**10 // 4))
    del chunks
    held = rss_mib()
    ran = trim_heap()
    print(ran, held, rss_mib())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc are Linux")
def test_trim_heap_returns_freed_heap_memory():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    ran, held, after = out.stdout.split()
    assert ran == "True"
    assert float(held) - float(after) >= 32, (held, after)     # ≥ 32 MiB of the freed chunks went back


def test_trim_heap_is_safe_to_call_repeatedly():
    from editserve.memory import trim_heap

    assert trim_heap() == trim_heap()
