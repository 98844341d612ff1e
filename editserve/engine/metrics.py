"""Serving-side metrics that `editserve.metrics.Metrics` does not cover: swap outcomes and
whether each completion came from one version or spanned a swap.

Registered on vLLM's own registry (`registry_for`), so ``/metrics`` shows them next to
``vllm:*`` and the edit-health metrics. The served version itself is
``editserve_head_version`` (set by the control plane through `Metrics.set_head`).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter

from editserve.errors import MetricsError

SWAP_RESULTS = ("ok", "failed")


def registry_for() -> Any:
    """The registry vLLM's ``/metrics`` route serves."""
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    return get_prometheus_registry()


class EngineMetrics:
    """``editserve_swaps_total{result}`` and ``editserve_completions_total{versions}``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        try:
            self._swaps = Counter("editserve_swaps", "Version changes of the engine by result (a failed swap "
                                  "restored the previous version).", ["result"], registry=registry)
            self._completions = Counter("editserve_completions", "Completions by whether one version produced "
                                        "them ('one') or a swap happened while they ran ('spanning').",
                                        ["versions"], registry=registry)
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
