"""Serving-side metrics that `editserve.metrics.Metrics` does not cover: swap outcomes, whether
each completion came from one version or spanned a swap, and the sidecar process's health.

Registered on vLLM's own registry (`registry_for`), so ``/metrics`` shows them next to
``vllm:*`` and the edit-health metrics. The served version itself is
``editserve_head_version`` (set by the control plane through `Metrics.set_head`).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from editserve.errors import MetricsError

SWAP_RESULTS = ("ok", "failed")


def registry_for() -> Any:
    """The registry vLLM's ``/metrics`` route serves."""
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    return get_prometheus_registry()


class EngineMetrics:
    """``editserve_swaps_total{result}``, ``editserve_completions_total{versions}``,
    ``editserve_sidecar_up`` (1 while the sidecar process runs and mirrors the served version)
    and ``editserve_sidecar_restarts_total`` (sidecar processes found dead and replaced)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        try:
            self._swaps = Counter("editserve_swaps", "Version changes of the engine by result (a failed swap "
                                  "restored the previous version).", ["result"], registry=registry)
            self._completions = Counter("editserve_completions", "Completions by whether one version produced "
                                        "them ('one') or a swap happened while they ran ('spanning').",
                                        ["versions"], registry=registry)
            self._sidecar_up = Gauge("editserve_sidecar_up", "1 while the sidecar process is alive and holds the "
                                     "served version, else 0.", multiprocess_mode="mostrecent", registry=registry)
            self._sidecar_restarts = Counter("editserve_sidecar_restarts", "Sidecar processes that died and were "
                                             "replaced by a new one.", registry=registry)
        except ValueError as exc:  # duplicated time series
            raise MetricsError(f"cannot register editserve engine metrics on {registry!r}: {exc}") from exc
        for r in SWAP_RESULTS:
            self._swaps.labels(result=r)
        for v in ("one", "spanning"):
            self._completions.labels(versions=v)

    def swap(self, result: str) -> None:
        if result not in SWAP_RESULTS:
            raise MetricsError(f"unknown swap result {result!r}; expected one of {list(SWAP_RESULTS)}")
        self._swaps.labels(result=result).inc()

    def completion(self, spanned: bool) -> None:
        self._completions.labels(versions="spanning" if spanned else "one").inc()

    def sidecar_up(self, up: bool) -> None:
        self._sidecar_up.set(1 if up else 0)

    def sidecar_restart(self) -> None:
        self._sidecar_restarts.inc()
