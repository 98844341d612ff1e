"""`editserve.metrics`: real HTTP scrapes of a registry served by prometheus_client, label checks,
the multi-process registry vLLM uses, and the per-layer drift maths.

The end-to-end scrape of vLLM's own /metrics with the engine plugin loaded lives with the engine tests.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
import torch
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.parser import text_string_to_metric_families

from editserve.editing.edit import METHODS
from editserve.errors import MetricsError
from editserve.metrics import (
    CompletionVersions,
    DriftParts,
    EditOutcome,
    EditStage,
    Metrics,
    SwapOutcome,
    drift_parts,
    metric_names,
    relative_drift,
)

N_LAYERS = 30
REPO = Path(__file__).resolve().parents[1]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - wsgiref's signature
        pass


class Scraper:
    """Serves one registry on a loopback port and scrapes it over HTTP."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # prometheus_client's own WSGI app, on a loopback port; a short poll interval keeps teardown fast.
        self.server = make_server("127.0.0.1", 0, make_wsgi_app(registry), handler_class=_QuietHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"
        self.last_text = ""

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with urllib.request.urlopen(self.url, timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            self.last_text = resp.read().decode()
        out = {}
        for family in text_string_to_metric_families(self.last_text):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture()
def served() -> Iterator[tuple[Metrics, Scraper]]:
    registry = CollectorRegistry()
    metrics = Metrics(registry, N_LAYERS)
    scraper = Scraper(registry)
    try:
        yield metrics, scraper
    finally:
        scraper.close()


def value(samples: dict, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    if key not in samples:
        raise KeyError(f"no sample {name}{labels} in scrape")
    return samples[key]


def test_scrape_starts_with_every_fixed_series_at_zero(served):
    metrics, scraper = served
    s = scraper.samples()
    for method in METHODS:
        for outcome in EditOutcome:
            assert value(s, "editserve_edits_total", method=method, outcome=outcome.value) == 0
            assert value(s, "editserve_edit_latency_seconds_count", method=method, outcome=outcome.value) == 0
    for stage in EditStage:
        assert value(s, "editserve_edit_duration_seconds_count", stage=stage.value) == 0
    for result in SwapOutcome:
        assert value(s, "editserve_swaps_total", result=result.value) == 0
    for versions in CompletionVersions:
        assert value(s, "editserve_completions_total", versions=versions.value) == 0
    for name in ("editserve_rollbacks_total", "editserve_reverts_total", "editserve_parity_failures_total",
                 "editserve_swap_pause_seconds_count", "editserve_head_version", "editserve_active_patches",
                 "editserve_ledger_size_bytes", "editserve_last_canary_kl", "editserve_sidecar_up",
                 "editserve_sidecar_restarts_total"):
        assert value(s, name) == 0
    # No drift series until a layer has been measured.
    assert not [k for k in s if k[0] == "editserve_layer_drift_ratio"]


def test_counters_gauges_histograms_move_with_edits_rejections_rollbacks(served):
    metrics, scraper = served
    metrics.record_edit("rome", EditOutcome.COMMITTED,
                        {EditStage.KEYS: 0.3, EditStage.VALUES: 4.0, EditStage.SOLVE: 0.02,
                         EditStage.PROBE: 1.1, EditStage.COMMIT: 0.004, EditStage.SWAP: 0.03})
    metrics.record_swap(0.012)
    metrics.set_head(1, 1)
    metrics.record_probe(1.0, 0.75, 0.9, 0.0123)
    metrics.set_drift(5, 0.0042)
    metrics.set_ledger_bytes(65_536)
    s = scraper.samples()
    assert value(s, "editserve_edits_total", method="rome", outcome="committed") == 1
    assert value(s, "editserve_edits_total", method="rome", outcome="rejected") == 0
    assert value(s, "editserve_edit_duration_seconds_count", stage="values") == 1
    assert value(s, "editserve_edit_duration_seconds_sum", stage="values") == pytest.approx(4.0)
    # 4.0 s lies in the (2.5, 5] bucket.
    assert value(s, "editserve_edit_duration_seconds_bucket", stage="values", le="2.5") == 0
    assert value(s, "editserve_edit_duration_seconds_bucket", stage="values", le="5.0") == 1
    assert value(s, "editserve_edit_latency_seconds_sum", method="rome", outcome="committed") == pytest.approx(5.454)
    assert value(s, "editserve_swap_pause_seconds_count") == 1
    assert value(s, "editserve_swap_pause_seconds_bucket", le="0.01") == 0
    assert value(s, "editserve_swap_pause_seconds_bucket", le="0.025") == 1
    assert value(s, "editserve_head_version") == 1
    assert value(s, "editserve_active_patches") == 1
    assert value(s, "editserve_last_probe_score", score="efficacy") == 1.0
    assert value(s, "editserve_last_probe_score", score="paraphrase") == 0.75
    assert value(s, "editserve_last_probe_score", score="neighbourhood") == 0.9
    assert value(s, "editserve_last_canary_kl") == pytest.approx(0.0123)
    assert value(s, "editserve_layer_drift_ratio", layer="5") == pytest.approx(0.0042)
    assert value(s, "editserve_ledger_size_bytes") == 65_536

    # A rejection (probe gate): no commit or swap stage; explicit end-to-end time.
    metrics.record_edit("memit", "rejected", {"keys": 0.2, "values": 3.0, "solve": 0.05, "probe": 0.9},
                        total_seconds=4.3)
    metrics.record_probe(0.2, 0.1, 0.95, 0.5)
    # A failed swap, then a rollback, a revert and a parity failure.
    metrics.record_edit("rome", "failed", {"keys": 0.3, "values": 4.0, "solve": 0.02, "probe": 1.0,
                                           "commit": 0.01, "swap": 0.5})
    metrics.record_rollback()
    metrics.record_revert()
    metrics.record_revert()
    metrics.parity_failure()
    metrics.set_head(0, 0)
    metrics.set_drifts({5: 0.0, 6: 0.001})
    s = scraper.samples()
    assert value(s, "editserve_edits_total", method="memit", outcome="rejected") == 1
    assert value(s, "editserve_edits_total", method="rome", outcome="failed") == 1
    assert value(s, "editserve_edits_total", method="rome", outcome="committed") == 1
    assert value(s, "editserve_edit_latency_seconds_sum", method="memit", outcome="rejected") == pytest.approx(4.3)
    assert value(s, "editserve_edit_duration_seconds_count", stage="probe") == 3
    assert value(s, "editserve_edit_duration_seconds_count", stage="commit") == 2
    assert value(s, "editserve_edit_duration_seconds_count", stage="swap") == 2
    assert value(s, "editserve_rollbacks_total") == 1
    assert value(s, "editserve_reverts_total") == 2
    assert value(s, "editserve_parity_failures_total") == 1
    assert value(s, "editserve_head_version") == 0
    assert value(s, "editserve_active_patches") == 0
    assert value(s, "editserve_last_probe_score", score="efficacy") == pytest.approx(0.2)
    assert value(s, "editserve_last_canary_kl") == pytest.approx(0.5)
    assert value(s, "editserve_layer_drift_ratio", layer="5") == 0.0
    assert value(s, "editserve_layer_drift_ratio", layer="6") == pytest.approx(0.001)


def test_swaps_completions_and_sidecar_health_move(served):
    metrics, scraper = served
    metrics.record_swap_result("ok")
    metrics.record_swap_result(SwapOutcome.OK)
    metrics.record_swap_result("failed")
    metrics.record_completion(False)
    metrics.record_completion(False)
    metrics.record_completion(False)
    metrics.record_completion(True)
    metrics.set_sidecar_up(True)
    s = scraper.samples()
    assert value(s, "editserve_swaps_total", result="ok") == 2
    assert value(s, "editserve_swaps_total", result="failed") == 1
    assert value(s, "editserve_completions_total", versions="one") == 3
    assert value(s, "editserve_completions_total", versions="spanning") == 1
    assert value(s, "editserve_sidecar_up") == 1
    assert value(s, "editserve_sidecar_restarts_total") == 0
    # The sidecar dies and is replaced: down, one restart, up again once it mirrors the served version.
    metrics.set_sidecar_up(False)
    metrics.record_sidecar_restart()
    s = scraper.samples()
    assert value(s, "editserve_sidecar_up") == 0
    assert value(s, "editserve_sidecar_restarts_total") == 1
    metrics.set_sidecar_up(True)
    assert value(scraper.samples(), "editserve_sidecar_up") == 1
    # No other label values appeared.
    assert {dict(k[1])["result"] for k in s if k[0] == "editserve_swaps_total"} == {"ok", "failed"}
    assert {dict(k[1])["versions"] for k in s if k[0] == "editserve_completions_total"} == {"one", "spanning"}


def test_probe_scores_not_measured_read_as_nan(served):
    """A probe without paraphrase/neighbourhood prompts or canaries leaves no stale value behind."""
    metrics, scraper = served
    metrics.record_probe(1.0, 0.75, 0.9, 0.0123)
    metrics.record_probe(0.5, None, None, None)
    s = scraper.samples()
    assert value(s, "editserve_last_probe_score", score="efficacy") == 0.5
    assert math.isnan(value(s, "editserve_last_probe_score", score="paraphrase"))
    assert math.isnan(value(s, "editserve_last_probe_score", score="neighbourhood"))
    assert math.isnan(value(s, "editserve_last_canary_kl"))
    with pytest.raises(MetricsError, match="efficacy"):
        metrics.record_probe(None, 0.5, 0.5, 0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize("call, named", [
    (lambda m: m.record_edit("alphaedit?", "committed", {}), "alphaedit?"),
    (lambda m: m.record_edit("rome", "accepted", {}), "accepted"),
    (lambda m: m.record_edit("rome", "committed", {"warmup": 1.0}), "warmup"),
    (lambda m: m.record_edit("rome", "committed", {"keys": -1.0}), "-1.0"),
    (lambda m: m.record_edit("rome", "committed", {"keys": 0.1}, total_seconds=math.nan), "nan"),
    (lambda m: m.record_swap(math.inf), "inf"),
    (lambda m: m.set_head(-1, 0), "-1"),
    (lambda m: m.set_head(2, 1.5), "1.5"),
    (lambda m: m.record_probe(1.2, 0.5, 0.5, 0.1), "1.2"),
    (lambda m: m.record_probe(1.0, 0.5, 0.5, -0.1), "-0.1"),
    (lambda m: m.set_drift(N_LAYERS, 0.1), str(N_LAYERS)),
    (lambda m: m.set_drift(-1, 0.1), "-1"),
    (lambda m: m.set_drift("5", 0.1), "'5'"),
    (lambda m: m.set_drifts({3: 0.1, 99: 0.1}), "99"),
    (lambda m: m.set_ledger_bytes(-5), "-5"),
    (lambda m: m.set_null_space_taken({3: 0.1, N_LAYERS: 0.2}), str(N_LAYERS)),
    (lambda m: m.set_null_space_taken({3: 1.5}), "1.5"),
    (lambda m: m.set_null_space_taken({3: math.nan}), "nan"),
    (lambda m: m.set_perplexity_ratio(math.inf), "inf"),
    (lambda m: m.set_perplexity_ratio(-0.5), "-0.5"),
    (lambda m: m.set_perplexity_ratio("1.1"), "'1.1'"),
    (lambda m: m.record_swap_result("partial"), "partial"),
    (lambda m: m.record_swap_result("OK"), "OK"),
    (lambda m: m.record_completion(1), "1"),
    (lambda m: m.record_completion("spanning"), "spanning"),
    (lambda m: m.set_sidecar_up(1), "1"),
    (lambda m: m.set_sidecar_up(None), "None"),
])
def test_bad_labels_and_values_raise_and_record_nothing(served, call, named):
    metrics, scraper = served
    before = scraper.samples()
    with pytest.raises(MetricsError, match=named.replace("?", r"\?").replace(".", r"\.")):
        call(metrics)
    after = scraper.samples()
    assert after.keys() == before.keys()
    changed = {k for k in after if not k[0].endswith("_created") and after[k] != before[k]
               and not (math.isnan(after[k]) and math.isnan(before[k]))}
    assert not changed


def test_constructor_checks_and_duplicate_registration():
    with pytest.raises(MetricsError, match="0"):
        Metrics(CollectorRegistry(), 0)
    with pytest.raises(MetricsError, match="methods"):
        Metrics(CollectorRegistry(), 4, methods=())
    registry = CollectorRegistry()
    Metrics(registry, 4)
    with pytest.raises(MetricsError, match="editserve_"):
        Metrics(registry, 4)


def test_metric_names_lists_every_exported_sample_name():
    registry = CollectorRegistry()
    names = metric_names(registry)
    assert names == set()
    metrics = Metrics(registry, N_LAYERS)
    names = metric_names(registry)
    # Names of labelled metrics without series (drift) are included.
    assert "editserve_layer_drift_ratio" in names
    for base in ("editserve_edit_duration_seconds", "editserve_edit_latency_seconds", "editserve_swap_pause_seconds"):
        assert {base + "_bucket", base + "_sum", base + "_count"} <= names
    for counter in ("edits", "rollbacks", "reverts", "parity_failures", "swaps", "completions", "sidecar_restarts"):
        assert f"editserve_{counter}_total" in names
    for gauge in ("head_version", "active_patches", "last_probe_score", "last_canary_kl", "ledger_size_bytes",
                  "sidecar_up", "statistics_progress"):
        assert f"editserve_{gauge}" in names
    # Every family the registry exports, with its type: nothing is registered elsewhere.
    families = {f.name: f.type for f in registry.collect()}
    assert families == {
        "editserve_edits": "counter", "editserve_rollbacks": "counter", "editserve_reverts": "counter",
        "editserve_edit_duration_seconds": "histogram", "editserve_edit_latency_seconds": "histogram",
        "editserve_swap_pause_seconds": "histogram", "editserve_head_version": "gauge",
        "editserve_active_patches": "gauge", "editserve_last_probe_score": "gauge",
        "editserve_last_canary_kl": "gauge", "editserve_layer_drift_ratio": "gauge",
        "editserve_parity_failures": "counter", "editserve_ledger_size_bytes": "gauge",
        "editserve_swaps": "counter", "editserve_completions": "counter", "editserve_sidecar_up": "gauge",
        "editserve_sidecar_restarts": "counter", "editserve_statistics_progress": "gauge",
        "editserve_version_skew": "gauge", "editserve_fleet_policy_differs": "gauge",
        "editserve_candidate_completions": "counter", "editserve_candidates_staged": "gauge",
        "editserve_edit_retention_ratio": "gauge", "editserve_edit_retention_sample_size": "gauge",
        "editserve_edit_retention_last_run_timestamp_seconds": "gauge", "editserve_retention_probes": "counter",
        "editserve_gate_retention_refusals": "counter", "editserve_consolidations": "counter",
        "editserve_layer_null_space_taken_ratio": "gauge", "editserve_heldout_perplexity_ratio": "gauge",
    }
    # Every name a scrape shows is in the set (and a scrape after recording shows the drift series).
    metrics.set_drift(0, 0.5)
    scraper = Scraper(registry)
    try:
        scraped = {k[0] for k in scraper.samples()}
    finally:
        scraper.close()
    assert scraped <= metric_names(registry)
    assert "editserve_layer_drift_ratio" in scraped


def test_scrape_passes_promtool_check_metrics(served, promtool):
    metrics, scraper = served
    metrics.record_edit("rome", "committed", {"keys": 0.1, "values": 1.0})
    metrics.set_drift(3, 0.01)
    scraper.samples()
    proc = subprocess.run([promtool, "check", "metrics"], input=scraper.last_text, capture_output=True,
                          text=True, timeout=60)
    # promtool lints naming conventions; it exits non-zero with a message on any problem.
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


def test_gauges_read_correctly_from_vllms_multiprocess_registry(tmp_path):
    """vLLM serves /metrics from a MultiProcessCollector when PROMETHEUS_MULTIPROC_DIR is set."""
    script = textwrap.dedent("""
        import json
        from prometheus_client import CollectorRegistry, multiprocess
        from editserve.metrics import Metrics
        metrics = Metrics(CollectorRegistry(), 30)
        metrics.set_head(1, 1)
        metrics.set_head(3, 2)
        metrics.set_drift(7, 0.25)
        metrics.set_sidecar_up(True)
        metrics.set_sidecar_up(False)
        metrics.record_swap_result("ok")
        metrics.record_edit("rome", "committed", {"keys": 0.5})
        metrics.record_edit("rome", "committed", {"keys": 0.5})
        served = CollectorRegistry()
        multiprocess.MultiProcessCollector(served)
        out = {}
        for family in served.collect():
            for s in family.samples:
                if s.name.startswith("editserve_"):
                    out[s.name + json.dumps(dict(sorted(s.labels.items())))] = s.value
        print(json.dumps(out))
    """)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out['editserve_head_version{}'] == 3          # most recent value, no pid label
    assert out['editserve_active_patches{}'] == 2
    assert out['editserve_layer_drift_ratio{"layer": "7"}'] == 0.25
    assert out['editserve_edits_total{"method": "rome", "outcome": "committed"}'] == 2
    assert out['editserve_edit_duration_seconds_count{"stage": "keys"}'] == 2
    assert out['editserve_sidecar_up{}'] == 0
    assert out['editserve_swaps_total{"result": "ok"}'] == 1


# -- drift -----------------------------------------------------------------------------------


def _reference(base: torch.Tensor, current: torch.Tensor) -> float:
    b, c = base.double(), current.double()
    return float(torch.linalg.norm(c - b) / torch.linalg.norm(b))


def test_relative_drift_of_a_rank_one_edit_matches_float64():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(576, 1536, generator=g)
    u, v = torch.randn(576, generator=g) * 1e-2, torch.randn(1536, generator=g)
    w = w0.clone().addr_(u, v)
    expected = float(torch.linalg.norm(torch.outer(u.double(), v.double())) / torch.linalg.norm(w0.double()))
    assert relative_drift(w0, w) == pytest.approx(expected, rel=1e-5)
    assert relative_drift(w0, w) == pytest.approx(_reference(w0, w), rel=1e-9)
    assert relative_drift(w0, w0.clone()) == 0.0
    # Block size does not change the result beyond float64 summation order.
    assert drift_parts(w0, w, block_rows=7).relative == pytest.approx(relative_drift(w0, w), rel=1e-12)


def test_relative_drift_of_bf16_weights_and_device_parameter():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(128, 512, generator=g).to(torch.bfloat16)
    w = (w0.float() + 0.05 * torch.randn(128, 512, generator=g)).to(torch.bfloat16)
    assert relative_drift(w0, w, device="cpu") == pytest.approx(_reference(w0, w), rel=1e-9)


def test_drift_parts_of_tensor_parallel_slices_add_up():
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(64, 256, generator=g)
    w = w0 + 0.01 * torch.randn(64, 256, generator=g)
    # Row-parallel down-projections are split along the input dimension (columns).
    parts = [drift_parts(b, c) for b, c in zip(w0.chunk(4, dim=1), w.chunk(4, dim=1))]
    total = parts[0] + parts[1] + parts[2] + parts[3]
    assert isinstance(total, DriftParts)
    assert total.relative == pytest.approx(_reference(w0, w), rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_relative_drift_of_a_gpu_weight_against_a_host_base_copy():
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(1024, 2048, generator=g).to(torch.bfloat16)
    live = (w0.float() + 0.02 * torch.randn(1024, 2048, generator=g)).to(torch.bfloat16).cuda()
    assert relative_drift(w0, live) == pytest.approx(_reference(w0, live.cpu()), rel=1e-6)


def test_drift_errors_name_the_bad_value():
    w = torch.ones(4, 4)
    with pytest.raises(MetricsError, match=r"\(4, 4\).*\(4, 5\)"):
        relative_drift(w, torch.ones(4, 5))
    with pytest.raises(MetricsError, match="zero base"):
        relative_drift(torch.zeros(4, 4), w)
    with pytest.raises(MetricsError, match="not finite"):
        relative_drift(w, torch.full((4, 4), math.inf))
    with pytest.raises(MetricsError, match="block_rows"):
        drift_parts(w, w, block_rows=0)


@pytest.fixture(scope="module")
def promtool() -> str:
    # `make tools` unpacks promtool from Debian's `prometheus` package into the venv.
    venv_tool = Path(sys.executable).parent / "promtool"
    path = str(venv_tool) if venv_tool.exists() else shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed; run `make tools` (Debian package `prometheus`)")
    return path


def test_statistics_progress_gauge_takes_fractions_only():
    """The warm-up gauge shows the last fraction set, and refuses values outside [0, 1]."""
    from prometheus_client import CollectorRegistry

    from editserve.metrics import Metrics, MetricsError

    registry = CollectorRegistry()
    metrics = Metrics(registry, n_layers=30)
    assert registry.get_sample_value("editserve_statistics_progress") == 0.0
    metrics.set_statistics_progress(0.4)
    metrics.set_statistics_progress(1.0)
    assert registry.get_sample_value("editserve_statistics_progress") == 1.0
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(MetricsError):
            metrics.set_statistics_progress(bad)
    assert registry.get_sample_value("editserve_statistics_progress") == 1.0


def test_version_skew_gauge_per_live_replica():
    """One series per replica in the last `set_skew`; a replica that left loses its series."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, n_layers=4)
    metrics.set_skew({"a": 0, "b": 3})
    assert registry.get_sample_value("editserve_version_skew", {"replica": "b"}) == 3.0
    metrics.set_skew({"a": 1})
    assert registry.get_sample_value("editserve_version_skew", {"replica": "a"}) == 1.0
    assert registry.get_sample_value("editserve_version_skew", {"replica": "b"}) is None
    with pytest.raises(MetricsError):
        metrics.set_skew({"a": -1})


def test_fleet_policy_differs_gauge():
    registry = CollectorRegistry()
    metrics = Metrics(registry, n_layers=4)
    assert registry.get_sample_value("editserve_fleet_policy_differs") == 0.0
    metrics.set_policy_differs(2)
    assert registry.get_sample_value("editserve_fleet_policy_differs") == 2.0
    with pytest.raises(MetricsError):
        metrics.set_policy_differs(-1)


def test_consolidations_are_counted_by_a_fixed_result():
    registry = CollectorRegistry()
    metrics = Metrics(registry, N_LAYERS)
    for result in ("ok", "refused", "failed"):          # every series exists at zero from the first scrape
        assert registry.get_sample_value("editserve_consolidations_total", {"result": result}) == 0
    metrics.record_consolidation("ok")
    metrics.record_consolidation("refused")
    metrics.record_consolidation("ok")
    assert registry.get_sample_value("editserve_consolidations_total", {"result": "ok"}) == 2
    assert registry.get_sample_value("editserve_consolidations_total", {"result": "refused"}) == 1
    with pytest.raises(MetricsError, match="'skipped'"):
        metrics.record_consolidation("skipped")


def test_heldout_perplexity_ratio_is_nan_unless_the_last_run_measured_it(served):
    metrics, scraper = served
    assert math.isnan(value(scraper.samples(), "editserve_heldout_perplexity_ratio"))
    metrics.set_perplexity_ratio(1.0)
    assert value(scraper.samples(), "editserve_heldout_perplexity_ratio") == 1.0
    metrics.set_perplexity_ratio(1.0625)
    assert value(scraper.samples(), "editserve_heldout_perplexity_ratio") == 1.0625
    metrics.set_perplexity_ratio(None)                    # a run that could not measure it: no stale value
    assert math.isnan(value(scraper.samples(), "editserve_heldout_perplexity_ratio"))


def test_null_space_taken_per_layer_and_a_layer_rolled_back_reads_zero(served):
    metrics, scraper = served
    assert not [k for k in scraper.samples() if k[0] == "editserve_layer_null_space_taken_ratio"]
    metrics.set_null_space_taken({3: 0.25, 5: 0.5})
    s = scraper.samples()
    assert value(s, "editserve_layer_null_space_taken_ratio", layer="3") == 0.25
    assert value(s, "editserve_layer_null_space_taken_ratio", layer="5") == 0.5
    metrics.set_null_space_taken({5: 0.75})             # layer 3's keys are gone (a rollback)
    s = scraper.samples()
    assert value(s, "editserve_layer_null_space_taken_ratio", layer="3") == 0.0
    assert value(s, "editserve_layer_null_space_taken_ratio", layer="5") == 0.75
    metrics.set_null_space_taken({})                      # back to the base model
    s = scraper.samples()
    assert {k: v for k, v in s.items() if k[0] == "editserve_layer_null_space_taken_ratio"} == {
        ("editserve_layer_null_space_taken_ratio", frozenset({("layer", "3")})): 0.0,
        ("editserve_layer_null_space_taken_ratio", frozenset({("layer", "5")})): 0.0}
