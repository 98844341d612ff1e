"""Automatic consolidation in a fleet (editserve/engine/autoconsolidate.py, engine/fleet.py).

Two compute replicas, a and b, serve one PostgreSQL ledger, both with EDITSERVE_CONSOLIDATE_EVERY=2.
Before, each replica counted only the commits it served itself and every replica with the policy on
consolidated on its own, so two of them raced for the same head (the later refused inside its swap).
Now the fleet has one consolidator — the smallest id among the live compute replicas that have the
policy on, here a — and it counts the commits it follows. Both facts are committed through b: b
never starts a consolidation, a (which served neither edit itself) consolidates the two, and b
follows that version.

b is also started with another retention gate (``EDITSERVE_RETENTION_GATE_MAX_DROP``): the fleet shows
that its edit policy differs from a's (status rows, the CLI's table, ``editserve_fleet_policy_differs``,
a warning in a's log) — an edit sent to b is gated by other rules than one sent to a.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest

pytest.importorskip("vllm")
pytest.importorskip("psycopg")

from tests._fleet import TOKENS, Replica  # noqa: E402
from tests._scrape import metric_sample, wait_for_served_head_after  # noqa: E402
from tests._pg import pg_server  # noqa: E402,F401

pytestmark = pytest.mark.slow

CITY = "{} is located in the city of"
LOOSE = {"max_ns_drop": 0.5, "max_canary_kl": 0.5, "min_efficacy": 0.5}
FACTS = [("The Space Needle", " London"), ("The Golden Gate Bridge", " Tokyo")]


def _metric(r: Replica, sample: str) -> float:
    return metric_sample(r.port, sample, r.name)


@pytest.fixture(scope="module")
def fleet(pg_server: Any, tmp_path_factory: Any) -> Any:
    db = pg_server.create_database()
    tmp = tmp_path_factory.mktemp("fleet-consolidation")
    env = {"EDITSERVE_RECONCILE_S": "3", "EDITSERVE_HEARTBEAT_S": "2", "EDITSERVE_CONSOLIDATE_EVERY": "2"}
    a = Replica(tmp / "a", pg_server.dsn(db), "a", env)
    a.start()
    try:
        a.wait_ready()                      # a creates the ledger; b opens it
        b = Replica(tmp / "b", pg_server.dsn(db), "b", {**env, "EDITSERVE_RETENTION_GATE_MAX_DROP": "0.25"})
        b.start()
        try:
            b.wait_ready()
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


def test_one_replica_consolidates_for_the_fleet_counting_the_commits_it_follows(fleet: Any) -> None:
    a, b = fleet
    with b.client("editor") as ed:
        versions = []
        for subject, target in FACTS:
            r = ed.edit([{"prompt": CITY, "subject": subject, "target_new": target}], thresholds=LOOSE)
            assert r.report.passed and r.change.kind == "edit", r.report
            versions.append(r.change.version)
    last = versions[-1]
    deadline = time.monotonic() + 600
    with b.client("viewer") as c:
        st, info = wait_for_served_head_after(c, last)
    assert st.ledger_head == last + 1 and st.served_version == last + 1, (st, a.tail(), b.tail())
    assert info.kind == "consolidate" and info.caller == "auto-consolidation", info
    assert (len(info.removed), len(info.added), len(info.facts)) == (2, 1, 2), info
    while _metric(a, 'editserve_consolidations_total{result="ok"}') == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _metric(a, 'editserve_consolidations_total{result="ok"}') == 1
    for result in ("ok", "refused", "failed"):                 # b never started one
        assert _metric(b, f'editserve_consolidations_total{{result="{result}"}}') == 0, result
    with b.client("viewer") as c:
        assert c.status().swaps_failed == 0
    for subject, target in FACTS:
        assert target.strip() in b.complete(f"{subject} is located in the city of"), subject


def test_the_fleet_shows_a_replica_whose_edit_policy_differs(fleet: Any) -> None:
    a, b = fleet
    with a.client("viewer") as c:
        rows = {r.replica_id: r for r in c.status().fleet}
    assert set(rows) == {"a", "b"}
    assert len(rows["a"].policy) == 12 and list(rows["a"].policy_differs) == [], rows["a"]
    assert rows["b"].policy != rows["a"].policy and list(rows["b"].policy_differs) == ["retention_gate_max_drop"]
    with b.client("viewer") as c:                       # b sees a differ in the same field
        rows_b = {r.replica_id: r for r in c.status().fleet}
    assert list(rows_b["a"].policy_differs) == ["retention_gate_max_drop"] and not rows_b["b"].policy_differs
    assert rows_b["a"].policy == rows["a"].policy and rows_b["b"].policy == rows["b"].policy
    deadline = time.monotonic() + 60                     # published with the skew, at the next heartbeat
    while _metric(a, "editserve_fleet_policy_differs") != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _metric(a, "editserve_fleet_policy_differs") == 1 and _metric(b, "editserve_fleet_policy_differs") == 1
    assert "the edit policy of live replica(s) b differs from this one's (b: retention_gate_max_drop)" in a.log_text()
    cli = subprocess.run([sys.executable, "-m", "editserve.cli", "status"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "EDITSERVE_GRPC_TARGET": a.target, "EDITSERVE_CONTROL_TOKEN": TOKENS["viewer"]})
    assert cli.returncode == 0, cli.stderr
    line_b = next(line for line in cli.stdout.splitlines() if line.lstrip("* ").startswith("b "))
    assert f"{rows['b'].policy} DIFFERS: retention_gate_max_drop" in line_b, cli.stdout
