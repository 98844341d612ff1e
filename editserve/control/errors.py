"""Errors of the gRPC control plane and the mapping of every editserve error to a status code."""

from __future__ import annotations

from typing import Any

import grpc

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


class ThresholdOutOfBounds(InvalidRequestError):
    """A requested probe threshold is looser than the server allows."""


class RequestTooLarge(InvalidRequestError):
    """A batch or list in the request has more entries than the server accepts."""


class AuthError(EditserveError):
    """Base of authentication/authorisation failures (never carries the token)."""


class Unauthenticated(AuthError):
    pass


class PermissionDenied(AuthError):
    pass


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status of an error (most specific class first)."""
    from editserve.engine.errors import (
        ChecksumMismatch,
        EngineStateUnknown,
        ParityError,
        PluginSetupError,
        SidecarError,
        SwapFailed,
    )
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

    table: tuple[tuple[type, grpc.StatusCode], ...] = (
        (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
        (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
        (ProbeRejected, grpc.StatusCode.FAILED_PRECONDITION),
        (LedgerConflict, grpc.StatusCode.ABORTED),
        (IdempotencyMismatch, grpc.StatusCode.ALREADY_EXISTS),
        ((VersionNotFound, PatchNotFound), grpc.StatusCode.NOT_FOUND),
        (LayerOutOfRangeError, grpc.StatusCode.OUT_OF_RANGE),
        (ThresholdOutOfBounds, grpc.StatusCode.OUT_OF_RANGE),
        (RequestTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ((RevertError, LedgerModelMismatch, BaseCopyMissing, PatchStateError), grpc.StatusCode.FAILED_PRECONDITION),
        ((ImportRejected, BaseCopyMismatch, NonFiniteError, PatchMismatchError, DataError, InvalidRequestError),
         grpc.StatusCode.INVALID_ARGUMENT),
        (LedgerCorrupt, grpc.StatusCode.DATA_LOSS),
        ((SwapFailed, SidecarError, EngineStateUnknown, PluginSetupError, LedgerBusy), grpc.StatusCode.UNAVAILABLE),
        ((ParityError, ChecksumMismatch), grpc.StatusCode.INTERNAL),
        (LedgerError, grpc.StatusCode.FAILED_PRECONDITION),
    )
    for classes, code in table:
        if isinstance(exc, classes):
            return code
    if isinstance(exc, EditserveError) and isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL
