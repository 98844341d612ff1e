"""The durable, versioned patch ledger: every change made to a served model, never lost or half-written.

Public API::

    from editserve.ledger import Ledger, LedgerConflict
    ledger = Ledger.open(model_fingerprint=fp)          # $EDITSERVE_HOME/ledger/<fp[:16]>
    ledger = Ledger.open("postgresql://editserve@db/ledger", model_fingerprint=fp)   # or a DSN
    v = ledger.commit(patch, expected_head=ledger.head(), base={name: base_weight})
    ledger.rollback(0); ledger.rollback(v)              # back to the base model, forward again
    weights = ledger.weights.materialize(v)             # base copies + Σ UVᵀ, bit-reproducible

See `editserve.ledger.ledger` for the data model, `editserve.ledger.transfer` for export and
import, `editserve.ledger.rebase` for recomputing later patches after a revert,
`editserve.ledger.consolidation` for replacing many active patches by one,
`editserve.ledger.objects` for the patches, key blocks and base copies versions refer to,
`editserve.ledger.weights` for the weights a version stands for (``ledger.weights``),
`editserve.ledger.replicas` for the fleet's replica registry (``ledger.replicas``), and
`editserve.ledger.integrity` for the check run at open.
"""

from __future__ import annotations

from editserve.ledger.errors import (
    BaseCopyMismatch,
    BaseCopyMissing,
    ConsolidationError,
    IdempotencyMismatch,
    ImportRejected,
    LedgerBusy,
    LedgerConflict,
    LedgerCorrupt,
    LedgerError,
    LedgerModelMismatch,
    LedgerSchemaError,
    LedgerUnavailable,
    PatchNotFound,
    RevertError,
    VersionNotFound,
)
from editserve.ledger.integrity import IntegrityReport
from editserve.ledger.ledger import Ledger
from editserve.ledger.records import (
    RebasedPatch,
    RebaseOutcome,
    RebasePlan,
    RebaseStep,
    RevertResult,
    VersionInfo,
)
from editserve.ledger.location import LedgerLocation, redact_dsn
from editserve.ledger.store import Event, LedgerStore
from editserve.ledger.weights import LedgerWeights, VersionDiff, WeightDiff, tensor_sha256
from editserve.ledger.replicas import Replicas

__all__ = [
    "Ledger", "VersionInfo", "Event", "RevertResult", "RebaseStep", "RebaseOutcome", "RebasePlan", "RebasedPatch",
    "IntegrityReport", "VersionDiff", "WeightDiff", "LedgerStore", "LedgerWeights", "Replicas", "tensor_sha256",
    "LedgerError", "LedgerConflict", "IdempotencyMismatch", "VersionNotFound", "PatchNotFound",
    "LedgerModelMismatch", "LedgerCorrupt", "LedgerBusy", "BaseCopyMissing", "BaseCopyMismatch",
    "RevertError", "ConsolidationError", "ImportRejected", "LedgerUnavailable", "LedgerSchemaError", "LedgerLocation", "redact_dsn",
]
