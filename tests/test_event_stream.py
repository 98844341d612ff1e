"""The event stream (`Operations.events`, behind gRPC WatchEvents and HTTP /events) keeps delivering
while every thread of the event loop's default executor is busy: that executor also runs the blocking
sidecar calls (compute, score, retention probes), which wait on the sidecar's one lock and can hold all
its threads for minutes on a loaded machine. A real SQLite ledger, no engine."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests._ledger_util import FP, base_weights, synth_patch

from editserve.control.events import Event
from editserve.control.operations import Operations
from editserve.control.principals import Principal, TokenTable
from editserve.engine.control import ControlPlane, ControlSettings
from editserve.ledger import Ledger

WAIT_S = 10.0          # far above a quiet poll (0.25 s), far below the blocked executor's release


async def _watch(ops: Operations, ledger: Ledger) -> tuple[list, int]:
    """Events of a stream opened from now on, while the default executor is blocked: its `watching`
    event, a local event and a ledger commit made after it opened (and that commit's version)."""
    stream = ops.events(Principal("viewer-user", "viewer"), 0, False)
    seen = []
    try:
        seen.append(await asyncio.wait_for(anext(stream), WAIT_S))
        ops.hub.publish(Event(kind="progress", operation_id="op-1", caller="token:x", message="compute: 10%"))
        seen.append(await asyncio.wait_for(anext(stream), WAIT_S))
        version = ledger.commit(synth_patch(1), 0, caller="alice", base=base_weights())   # quick, on this thread
        seen.append(await asyncio.wait_for(anext(stream), WAIT_S))
    finally:
        await stream.aclose()
    return seen, version


def test_stream_delivers_while_the_default_executor_is_blocked(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "ledger", model_fingerprint=FP)
    control = ControlPlane(None, ControlSettings(model=None))
    control.ledger = ledger
    ops = Operations(control, TokenTable())
    release = threading.Event()
    loop = asyncio.new_event_loop()
    blocked = ThreadPoolExecutor(1)
    loop.set_default_executor(blocked)

    async def main() -> tuple[list, int]:
        hog = loop.run_in_executor(None, release.wait, 120.0)     # a sidecar call waiting on its lock
        try:
            return await _watch(ops, ledger)
        finally:
            release.set()
            await hog

    try:
        seen, version = loop.run_until_complete(main())
    finally:
        release.set()
        loop.close()
        blocked.shutdown()
        ledger.close()
    assert [e.kind for e in seen] == ["watching", "progress", "commit"], seen
    assert seen[1].message == "compute: 10%" and seen[2].version == version and seen[2].caller == "alice", seen
