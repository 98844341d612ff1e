"""Errors of the serving side: swaps, checksum verification, the sidecar, plugin setup."""

from __future__ import annotations

from editserve.errors import EditserveError


class EngineError(EditserveError):
    """Base class of the errors raised by `editserve.engine`."""


class SwapFailed(EngineError, RuntimeError):
    """A version change did not complete; the previous version was restored on every worker
    and the ledger head did not move. `restored_version` is what the engine serves now."""

    def __init__(self, message: str, restored_version: int | None = None) -> None:
        super().__init__(message)
        self.restored_version = restored_version


class ChecksumMismatch(EngineError, ValueError):
    """A worker's weights after a swap differ from the ledger's (or the sidecar's) expected values."""


class EngineStateUnknown(EngineError, RuntimeError):
    """Restoring the previous version after a failed swap failed too: the engine's weights are
    not known to match any version. Edits are refused until a restart or a successful swap."""


class SidecarError(EngineError, RuntimeError):
    """The sidecar process failed, exited, or answered something unexpected."""


class ParityError(EngineError, RuntimeError):
    """The sidecar's materialised weights disagree with the engine's after a swap."""


class PluginSetupError(EngineError, RuntimeError):
    """The engine was not started with the editserve plugin in place (e.g. packed CPU weights)."""


class SidecarTimeout(SidecarError):
    """A sidecar call (compute, probe, trace, sync) ran past its deadline. The sidecar process
    was killed (a restart follows) and nothing was committed; the version lock is released.
    Maps to gRPC DEADLINE_EXCEEDED and HTTP 504."""

    def __init__(self, message: str, call: str = "", timeout_s: float | None = None) -> None:
        super().__init__(message)
        self.call = call
        self.timeout_s = timeout_s
