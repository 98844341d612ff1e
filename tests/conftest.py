"""The CPU share of a pytest-xdist worker (``make test`` runs two, each taking whole modules).

Torch's and vLLM's OpenMP threads spin while they wait for each other: two workers each running two
threads on a 2-core machine ran the lifelong fixture (tests/test_lifelong_smollm2.py) three times
slower than alone. So each worker gets its own cores: its threads (and every server, sidecar and
engine it starts, which inherit the binding and the environment) run on them, torch uses one thread
per core, and vLLM binds its engine threads to the same cores (``VLLM_CPU_OMP_THREADS_BIND``).
Without xdist (``TEST_WORKERS=0``), or with fewer cores than workers, nothing changes. Fixtures
live in the modules that use them (``from tests._pg import pg_server``), not here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def worker_cpus(worker: str, count: int, cpus: list[int]) -> list[int]:
    """The cores of xdist worker `worker` ("gw<i>") of `count`: every count-th of `cpus` from i."""
    index = int(worker.removeprefix("gw"))
    if count <= 1 or len(cpus) < count:
        return cpus
    return cpus[index::count]


def pytest_configure(config: object) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or not hasattr(os, "sched_setaffinity"):
        return
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cpus = worker_cpus(worker, count, sorted(os.sched_getaffinity(0)))
    for task in Path("/proc/self/task").iterdir():          # every thread of this worker, not only this one
        os.sched_setaffinity(int(task.name), cpus)
    os.environ["OMP_NUM_THREADS"] = str(len(cpus))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cpus)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(len(cpus))
