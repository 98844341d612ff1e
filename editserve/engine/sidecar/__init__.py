"""The sidecar: a separate process with a Hugging Face copy of the served checkpoint.

It mirrors the ledger head (the engine tells it which version to hold after every swap) and
does the work that needs autograd over a Hugging Face model: computing patches (v*
optimisation, solve) and probing them. Serving never waits on it: the engine keeps
generating while the sidecar computes, and only the swap pauses generation.

The sidecar runs on a GPU when there is one, else on the CPU. Its weights are the base
checkpoint with the head's active patches merged by `editserve.patches.apply_patch`, so after
each swap its touched matrices, seen in vLLM's orientation (arch table) and cut into the
engine's tensor-parallel slices, must have the same checksums as the engine's.

Protocol: frozen dataclasses pickled over a `multiprocessing` pipe, one request and one reply
at a time. Every request gets either its reply type or `Failed` (error type and message),
which the client raises as `SidecarError` (or the original editserve error type when known).
A long request (`ComputeEdit`) may send `Progress` messages before its reply; the client
hands them to the caller's callback.

After `Ready`, a background thread builds the covariance statistics of the default edit layers
(`editserve.engine.stats_warmup`); an edit that needs them while they are being built waits and
says so in a ``statistics`` progress stage. Its state is read by `SidecarClient.statistics`
from a state file, never through the pipe.
`ProbeRetention` re-scores a sample of the committed facts on the held version (the retention
probe of `editserve.engine.health`); with a gate, `ComputeEdit.retention` adds the gate's
retention check (`editserve.control.gate.check_retention`) to the probe gate's report.
This package imports torch and transformers only, never vLLM. Its parts: `protocol` (the
configuration and the messages), `process` (the child: `_Worker`, `sidecar_main`), `client`
(the parent: `SidecarClient`); the names callers use are re-exported here.
"""

from editserve.engine.sidecar.client import SidecarClient
from editserve.engine.sidecar.process import sidecar_main
from editserve.engine.sidecar.protocol import (ComputeConsolidation, ComputeEdit, ComputeFactRemoval, ComputeRebase,
                                               ConsolidationComputed, EditComputed, FactRemovalComputed, Failed,
                                               LedgerOpened, OpenLedger, ProbePrompt, ProbeRetention, Progress,
                                               Ready, RebaseComputed, RetentionMeasured, ScorePrompts, Scored,
                                               Shutdown, SidecarConfig, Sync, Synced, TraceFact, Traced)

__all__ = [
    'ComputeConsolidation', 'ComputeEdit', 'ComputeFactRemoval', 'ComputeRebase', 'ConsolidationComputed',
    'EditComputed', 'FactRemovalComputed', 'Failed', 'LedgerOpened', 'OpenLedger', 'ProbePrompt', 'ProbeRetention',
    'Progress', 'Ready', 'RebaseComputed', 'RetentionMeasured', 'ScorePrompts', 'Scored', 'Shutdown', 'SidecarClient',
    'SidecarConfig', 'Sync', 'Synced', 'TraceFact', 'Traced', 'sidecar_main',
]
