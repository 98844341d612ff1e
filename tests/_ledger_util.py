"""Helpers shared by the ledger tests: small synthetic patches and their base weight, and the
`backend` fixture that runs a test on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib
import itertools
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from editserve.editing.requests import EditRequest
from editserve.ledger import Ledger
from editserve.patches import Patch, WeightDelta
from tests._pg import TempPostgres

FP = hashlib.sha256(b"synthetic test model").hexdigest()
NAME = "model.layers.0.mlp.down_proj.weight"
NAME2 = "model.layers.1.mlp.down_proj.weight"
SHAPE = (64, 32)          # (d_out, d_in)


def base_weights(shape: tuple[int, int] = SHAPE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {NAME: torch.randn(shape, generator=g), NAME2: torch.randn(shape, generator=g)}


def synth_patch(seed: int, names: tuple[str, ...] = (NAME,), shape: tuple[int, int] = SHAPE, rank: int = 1,
                scale: float = 0.05, fp: str = FP) -> Patch:
    g = torch.Generator().manual_seed(seed)
    deltas = tuple(WeightDelta(name=n, layer=int(n.split(".")[2]), u=torch.randn(shape[0], rank, generator=g) * scale,
                               v=torch.randn(shape[1], rank, generator=g)) for n in names)
    req = EditRequest(prompt="{} is located in the city of", subject=f"Landmark {seed}", target_new=" Rome")
    return Patch(deltas=deltas, requests=(req,), method="rome", hparams={"layer": 0, "seed": seed},
                 model_fingerprint=fp, family="llama")


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


# -- the two storage backends ------------------------------------------------------------------

BACKENDS = ("sqlite", "postgresql")


@dataclass
class Backend:
    """Fresh ledger locations on one backend, and ways to damage a ledger's storage behind its back.

    sqlite: directories under `tmp`; postgresql: a new database on `server` per location.
    Damage on PostgreSQL is done as the superuser with ``session_replication_role = replica``
    (which skips the append-only triggers and foreign keys), as a storage fault or an operator
    with superuser rights would.
    """

    name: str
    tmp: Path
    server: TempPostgres | None = None
    _n: itertools.count = field(default_factory=itertools.count)

    def location(self) -> str:
        """A new, empty ledger location (directory path or DSN)."""
        if self.server is None:
            return str(self.tmp / f"ledger{next(self._n)}")
        return self.server.dsn(self.server.create_database())

    def _sql(self, ledger: Ledger, *statements: tuple[str, tuple]) -> None:
        import psycopg

        with psycopg.connect(ledger.location.dsn, autocommit=True) as conn:
            with conn.transaction():
                conn.execute("SET LOCAL session_replication_role = replica")
                for sql, args in statements:
                    conn.execute(sql, args)

    def corrupt_blob(self, ledger: Ledger, digest: str) -> None:
        """Flip one byte near the end of the blob."""
        if self.server is None:
            path = ledger.blobs.path(digest)
            data = bytearray(path.read_bytes())
            data[-3] ^= 0x55
            path.write_bytes(bytes(data))
            return
        import psycopg

        with psycopg.connect(ledger.location.dsn, autocommit=True) as conn:
            seq, data = conn.execute("SELECT seq, data FROM blob_chunks WHERE digest = %s ORDER BY seq DESC LIMIT 1",
                                     (digest,)).fetchone()
        data = bytearray(data)
        data[-3] ^= 0x55
        self._sql(ledger, ("UPDATE blob_chunks SET data = %s WHERE digest = %s AND seq = %s", (bytes(data), digest, seq)))

    def remove_blob(self, ledger: Ledger, digest: str) -> None:
        if self.server is None:
            ledger.blobs.path(digest).unlink()
        else:
            self._sql(ledger, ("DELETE FROM blob_chunks WHERE digest = %s", (digest,)),
                      ("DELETE FROM blobs WHERE digest = %s", (digest,)))

    def raw_write_fails(self, ledger: Ledger, sql: str) -> str:
        """Run `sql` on the ledger's database directly (as its owner) and return the error text; fails if it works."""
        if self.server is None:
            conn = sqlite3.connect(str(ledger.root / "ledger.sqlite3"))
            try:
                with pytest.raises(sqlite3.IntegrityError) as exc:
                    conn.execute(sql)
            finally:
                conn.close()
            return str(exc.value)
        import psycopg

        with psycopg.connect(ledger.location.dsn, autocommit=True) as conn:
            with pytest.raises(psycopg.Error) as exc:
                conn.execute(sql)
        return str(exc.value)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Parametrises a test over SQLite and PostgreSQL (the module must also import `pg_server`)."""
    server = request.getfixturevalue("pg_server") if request.param == "postgresql" else None
    return Backend(request.param, tmp_path, server)
