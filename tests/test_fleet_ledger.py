"""The ledger's replica registry and head notifications (docs/fleet.md), on SQLite and a real
PostgreSQL server, without an engine: rows per replica with the store's clock, a forgotten replica,
a bad role refused by the schema; on PostgreSQL a commit and a rollback each NOTIFY the new head
inside their transaction (a listener hears the head only once it is visible), and a listener whose
server went away raises `LedgerUnavailable` without the DSN's secret, then reconnects."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from editserve.ledger import Ledger
from tests._ledger_util import FP, Backend, backend, base_weights, synth_patch  # noqa: F401
from tests._pg import pg_server  # noqa: F401


@pytest.fixture
def base() -> dict[str, torch.Tensor]:
    return base_weights()


def test_replica_registry(backend: Backend, base: dict[str, torch.Tensor]) -> None:
    with Ledger.open(backend.location(), model_fingerprint=FP) as led:
        assert led.replicas.all() == []
        led.replicas.record("a", 0, "compute", "10.0.0.1:50051", 100.0, {"pid": 1})
        led.commit(synth_patch(1), 0, base=base)
        led.replicas.record("b", 1, "serve-only", "10.0.0.2:50051", 200.0)
        time.sleep(0.05)
        led.replicas.record("a", 1, "compute", "10.0.0.1:50051", 100.0, {"pid": 1})
        rows = {r.replica_id: r for r in led.replicas.all()}
        assert set(rows) == {"a", "b"}
        assert (rows["a"].version, rows["a"].role, rows["a"].details) == (1, "compute", {"pid": 1})
        assert (rows["b"].version, rows["b"].role, rows["b"].started_at) == (1, "serve-only", 200.0)
        assert rows["a"].updated_at > rows["b"].updated_at and 0 <= rows["a"].age_s < 30
        with pytest.raises(Exception):
            led.replicas.record("c", 0, "primary", "x", 0.0)          # not a role
        with pytest.raises(Exception):
            led.replicas.record("c", 7, "compute", "x", 0.0)          # no version 7
        assert led.replicas.forget("b") and not led.replicas.forget("b")
        assert [r.replica_id for r in led.replicas.all()] == ["a"]
        assert led.store.check_consistency() == []


def test_head_notifications(pg_server, base: dict[str, torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    from editserve.ledger import LedgerUnavailable

    dsn = pg_server.dsn(pg_server.create_database())
    with Ledger.open(dsn, model_fingerprint=FP) as led:
        listener = led.replicas.listener()
        assert listener.wait(0.1) is None                        # connects and LISTENs; nothing yet
        heard: list[int | None] = []
        t = threading.Thread(target=lambda: heard.append(listener.wait(30)))
        t.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        led.commit(synth_patch(1), 0, base=base)
        t.join(30)
        assert heard == [1] and time.monotonic() - t0 < 10
        led.commit(synth_patch(2), 1, base=base)
        led.rollback(0, caller="test")
        got = [listener.wait(5)]                                 # both sent; in commit order
        while got[-1] is not None:
            got.append(listener.wait(0.5))
        assert got[:-1] in ([0], [2, 0])
        listener.close()
    # A listener on a server that is down: typed, no secret; heard again after a restart.
    pg_server.add_password_role("listener", "pw-listen-secret")
    db = pg_server.create_database()
    pg_server.execute(f'GRANT ALL ON DATABASE "{db}" TO listener')
    pg_server.execute("GRANT ALL ON SCHEMA public TO listener", dbname=db)
    secret_dsn = pg_server.dsn(db, user="listener", password="pw-listen-secret")
    with Ledger.open(secret_dsn, model_fingerprint=FP) as led:
        listener = led.replicas.listener()
        assert listener.wait(0.1) is None
        pg_server.stop_server()
        try:
            with pytest.raises(LedgerUnavailable) as err:
                listener.wait(2)
                listener.wait(2)
            assert "pw-listen-secret" not in str(err.value)
        finally:
            pg_server.start_server()
        assert listener.wait(0.1) is None                        # reconnected
        with pytest.raises(LedgerUnavailable):                   # the ledger's own connection was cut too:
            led.head()                                           # one failure, then it reconnects
        led.commit(synth_patch(3), 0, base=base)
        assert listener.wait(10) == 1
        listener.close()
