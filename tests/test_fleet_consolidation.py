"""Automatic consolidation in a fleet (editserve/engine/autoconsolidate.py, engine/fleet.py).

Two compute replicas, a and b, serve one PostgreSQL ledger, both with EDITSERVE_CONSOLIDATE_EVERY=2.
Before, each replica counted only the commits it served itself and every replica with the policy on
consolidated on its own, so two of them raced for the same head (the later refused inside its swap).
Now the fleet has one consolidator — the smallest id among the live compute replicas that have the
policy on, here a — and it counts the commits it follows. Both facts are committed through b: b
never starts a consolidation, a (which served neither edit itself) consolidates the two, and b
follows that version.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

pytest.importorskip("vllm")
pytest.importorskip("psycopg")

from tests._fleet import Replica  # noqa: E402
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
        b = Replica(tmp / "b", pg_server.dsn(db), "b", env)
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
