"""Request admission around swaps, for the served-version header middleware (editserve/engine/http.py).

`Admission` holds requests that arrive while a swap is in progress, counts the requests in
flight, and lets a ``wait``-mode swap wait until none is. It is on the path of every
inference request, so it is kept to a few attribute operations per request (no lock, no
allocation beyond the returned mark).
"""

from __future__ import annotations

import asyncio

VERSION_HEADER = "x-editserve-version"
VERSION_START_HEADER = "x-editserve-version-start"


class Admission:
    """Swap gate and in-flight counter (one event loop)."""

    def __init__(self) -> None:
        self._not_swapping = asyncio.Event()
        self._not_swapping.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.inflight = 0                            # HTTP requests past the version middleware

    async def admit(self) -> None:
        """Wait while a swap is in progress, then count one request in flight. Pair with `release`."""
        while not self._not_swapping.is_set():
            await self._not_swapping.wait()
        self.inflight += 1
        self._idle.clear()

    def release(self) -> None:
        self.inflight -= 1
        if self.inflight <= 0:
            self.inflight = 0
            self._idle.set()

    def begin_swap(self) -> None:
        """From now on new requests wait (until `end_swap`)."""
        self._not_swapping.clear()

    def end_swap(self) -> None:
        self._not_swapping.set()

    async def drained(self, timeout_s: float) -> bool:
        """Wait until no admitted request is in flight; False if `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True
