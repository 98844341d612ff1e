"""Versioned schema migrations of the ledger databases (the plan; each backend applies it).

A backend keeps a ``schema_migrations`` table (number, name, checksum, time applied) and a
list of `Migration` s numbered 1, 2, …. Opening a ledger applies the ones not recorded yet, in
order, each in its own transaction together with its ``schema_migrations`` row, so a crash
leaves the schema at a whole migration. Concurrent openers are serialised (PostgreSQL: a
transaction-level advisory lock; SQLite: ``BEGIN IMMEDIATE``) and re-read the table under the
lock, so every migration runs once.

A database that records a migration this code does not know was written by a newer editserve:
opening it is refused (`LedgerSchemaError`) rather than risk writing rows the newer schema
forbids. A recorded checksum that differs from the code's means a migration was edited after it
was applied; that is logged, not fatal (the statements already ran).

Adding a migration: append ``Migration(n + 1, "what_it_does", (...statements...))`` to the
backend's list; never edit or renumber one that has shipped.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from editserve.ledger.errors import LedgerSchemaError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    """One schema step: its number (1, 2, …), a short name and the SQL statements it runs."""

    number: int
    name: str
    statements: tuple[str, ...]

    @property
    def checksum(self) -> str:
        return hashlib.sha256("\n;\n".join(s.strip() for s in self.statements).encode()).hexdigest()


def check_sequence(migrations: Sequence[Migration]) -> None:
    """The list must be numbered 1..n without gaps (a programming error otherwise)."""
    numbers = [m.number for m in migrations]
    if numbers != list(range(1, len(numbers) + 1)):
        raise LedgerSchemaError(f"schema migrations must be numbered 1..n in order, got {numbers}")


def pending(applied: Mapping[int, str], migrations: Sequence[Migration], where: str) -> list[Migration]:
    """Migrations still to apply, given ``{number: checksum}`` of those recorded in the database."""
    check_sequence(migrations)
    known = {m.number: m for m in migrations}
    unknown = sorted(set(applied) - set(known))
    if unknown:
        raise LedgerSchemaError(
            f"ledger {where} has schema migration(s) {unknown} that this editserve does not know (it knows 1.."
            f"{len(migrations)}); it was written by a newer editserve: upgrade before opening it")
    for number, checksum in sorted(applied.items()):
        if checksum != known[number].checksum:
            log.warning("ledger %s: schema migration %d (%s) was applied with checksum %s, the code's is %s",
                        where, number, known[number].name, checksum[:12], known[number].checksum[:12])
    return [m for m in migrations if m.number not in applied]


def latest(migrations: Sequence[Migration]) -> int:
    return migrations[-1].number if migrations else 0
