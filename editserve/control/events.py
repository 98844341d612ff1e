"""Server-local events (edit progress, rejections) fanned out to the open event streams.

`EventHub` holds one bounded queue per open stream and at most ``max_streams`` streams at once
(`TooManyStreams` beyond: RESOURCE_EXHAUSTED / HTTP 429). A slow stream loses its oldest local
events, never blocks the publisher. Events are plain `Event` dataclasses; the gRPC adapter
turns them into ``editserve.v1.Event`` messages.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from editserve.control.errors import TooManyStreams

DEFAULT_MAX_STREAMS = 64
DEFAULT_QUEUE_SIZE = 1000


@dataclass(frozen=True)
class Event:
    """One server-local event (id 0: not a ledger event)."""

    kind: str                                   # progress | rejected
    operation_id: str
    caller: str
    message: str = ""
    progress: float = 0.0
    version: int = -1
    details_json: str = ""
    ts: float = field(default_factory=time.time)


class EventHub:
    """Fan-out of server-local events to at most `max_streams` subscribers (bounded queues)."""

    def __init__(self, max_streams: int = DEFAULT_MAX_STREAMS, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self._queues: set[asyncio.Queue[Event]] = set()
        self._queue_size = queue_size
        self.max_streams = max_streams

    def __len__(self) -> int:
        return len(self._queues)

    def subscribe(self) -> asyncio.Queue[Event]:
        if len(self._queues) >= self.max_streams:
            raise TooManyStreams(f"{len(self._queues)} event streams are open; the limit is {self.max_streams} "
                                 "(close one, or raise EDITSERVE_MAX_EVENT_STREAMS)")
        q: asyncio.Queue[Event] = asyncio.Queue(self._queue_size)
        self._queues.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Event]) -> None:
        self._queues.discard(q)

    def publish(self, event: Event) -> None:
        for q in list(self._queues):
            if q.full():
                q.get_nowait()                  # a slow watcher loses its oldest local event
            q.put_nowait(event)
