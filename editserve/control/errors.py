"""Errors of the control plane, and THE table from every editserve error to its status on each
transport (a gRPC status code and an HTTP status), used by both adapters.

`status_of(exc)` → `Status` (gRPC code name, HTTP status); `status_code(exc)` (gRPC) and
`http_status(exc)` read the same row. The rows are tried in order, most specific class first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from editserve.errors import (
    DataError,
    EditserveError,
    InvalidRequestError,
    LayerOutOfRangeError,
    NonFiniteError,
    PatchMismatchError,
    PatchStateError,
)


class ProbeRejected(EditserveError, RuntimeError):
    """The probe gate failed the candidate patch; nothing was committed or swapped. `report` is
    the full `editserve.control.probe.ProbeReport` as a dict."""

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report = dict(report or {})


class RetentionRejected(ProbeRejected):
    """The gate's retention check failed: the candidate patch breaks earlier edits (issue 16).
    `broken` lists them (version, prompt, subject, target_new, target_true and log-probabilities,
    from ``report["retention"]["broken"]``); the status is the probe gate's."""

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message, report)
        self.broken = tuple((self.report.get("retention") or {}).get("broken") or ())


class DamageRejected(ProbeRejected):
    """The gate's damage bound failed: with the candidate patch the held-out perplexity would
    exceed the server's `EDITSERVE_GATE_MAX_PERPLEXITY_RATIO` × the unedited model's (issue 16).
    `perplexity_ratio` is that ratio (None: not finite); the status is the probe gate's."""

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message, report)
        self.perplexity_ratio = (self.report.get("damage") or {}).get("perplexity_ratio_after")


class ThresholdOutOfBounds(InvalidRequestError):
    """A requested probe threshold is looser than the server allows."""


class RequestTooLarge(InvalidRequestError):
    """A batch, list or text in the request is larger than the server accepts."""


class TooManyStreams(EditserveError, RuntimeError):
    """More concurrent event streams than the server serves at once."""


class AuthError(EditserveError):
    """Base of authentication/authorisation failures (never carries the token)."""


class Unauthenticated(AuthError):
    pass


class PermissionDenied(AuthError):
    pass


@dataclass(frozen=True)
class Status:
    """The status of an error on each transport."""

    grpc: str          # a grpc.StatusCode name
    http: int


def _table() -> tuple[tuple[type | tuple[type, ...], Status], ...]:
    from editserve.engine.errors import (
        ChecksumMismatch,
        EngineStateUnknown,
        ParityError,
        PluginSetupError,
        SidecarError,
        SidecarTimeout,
        SwapFailed,
    )
    from editserve.engine.serveonly import ServeOnlyReplica
    from editserve.ledger.errors import (
        BaseCopyMismatch,
        BaseCopyMissing,
        IdempotencyMismatch,
        ImportRejected,
        LedgerBusy,
        LedgerConflict,
        LedgerCorrupt,
        LedgerError,
        LedgerModelMismatch,
        PatchNotFound,
        RevertError,
        VersionNotFound,
    )

    return (
        (Unauthenticated, Status("UNAUTHENTICATED", 401)),
        (PermissionDenied, Status("PERMISSION_DENIED", 403)),
        (ProbeRejected, Status("FAILED_PRECONDITION", 422)),
        (ServeOnlyReplica, Status("FAILED_PRECONDITION", 409)),
        (LedgerConflict, Status("ABORTED", 409)),
        (IdempotencyMismatch, Status("ALREADY_EXISTS", 409)),
        ((VersionNotFound, PatchNotFound), Status("NOT_FOUND", 404)),
        (LayerOutOfRangeError, Status("OUT_OF_RANGE", 400)),
        (ThresholdOutOfBounds, Status("OUT_OF_RANGE", 400)),
        (RequestTooLarge, Status("RESOURCE_EXHAUSTED", 413)),
        (TooManyStreams, Status("RESOURCE_EXHAUSTED", 429)),
        ((RevertError, LedgerModelMismatch, BaseCopyMissing, PatchStateError), Status("FAILED_PRECONDITION", 409)),
        ((ImportRejected, BaseCopyMismatch, NonFiniteError, PatchMismatchError, DataError, InvalidRequestError),
         Status("INVALID_ARGUMENT", 400)),
        (LedgerCorrupt, Status("DATA_LOSS", 500)),
        (SidecarTimeout, Status("DEADLINE_EXCEEDED", 504)),
        ((SwapFailed, SidecarError, EngineStateUnknown, PluginSetupError, LedgerBusy), Status("UNAVAILABLE", 503)),
        ((ParityError, ChecksumMismatch), Status("INTERNAL", 500)),
        (LedgerError, Status("FAILED_PRECONDITION", 409)),
    )


INTERNAL = Status("INTERNAL", 500)


def status_of(exc: BaseException) -> Status:
    """The row of `exc` (INTERNAL / 500 for anything not raised on purpose)."""
    for classes, status in _table():
        if isinstance(exc, classes):
            return status
    if isinstance(exc, EditserveError) and isinstance(exc, ValueError):
        return Status("INVALID_ARGUMENT", 400)
    return INTERNAL


def status_code(exc: BaseException) -> Any:
    """The gRPC status code (``grpc.StatusCode``) of an error."""
    import grpc

    return grpc.StatusCode[status_of(exc).grpc]


def http_status(exc: BaseException) -> int:
    """The HTTP status of an error."""
    return status_of(exc).http
