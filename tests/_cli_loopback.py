"""A gRPC control plane on a loopback port with no engine, for the CLI tests (tests/test_cli*.py).

It is the code ``editserve serve`` runs (`editserve.control.server.start_server`: the same service,
interceptor and token table) over a real `ControlPlane` whose ledger is a real SQLite ledger but
which has started no vLLM engine and no sidecar: calls that need only the ledger (Status,
ListVersions, health checking) are answered, an edit fails with a typed error. Starting vLLM for
these tests would cost minutes; tests/test_readme_path.py does that for the whole path.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from pathlib import Path
from typing import Any

FP = hashlib.sha256(b"cli test model").hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackControl:
    """`start_server` on its own event loop thread (as in vLLM's API server), tokens from a tokens file."""

    def __init__(self, tmp: Path, tokens_file: Path) -> None:
        from editserve.control.auth import TokenTable
        from editserve.engine.control import ControlPlane, ControlSettings
        from editserve.ledger import Ledger

        self.ledger = Ledger.open(tmp / "ledger", model_fingerprint=FP)
        self.control = ControlPlane(None, ControlSettings(model=None))
        self.control.ledger = self.ledger            # what `start` opens; no engine, no sidecar
        self.tokens = TokenTable.from_file(tokens_file)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-loop", daemon=True)
        self.thread.start()
        self.target = f"127.0.0.1:{free_port()}"
        self.server: Any = None

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def start(self, tls: Any = None) -> "LoopbackControl":
        """Serve plaintext, or TLS with `tls` (an `editserve.control.auth.TLSConfig`)."""
        from editserve.control.operations import Operations
        from editserve.control.server import start_server

        self.server = self.run(start_server(Operations(self.control, self.tokens), self.target, tls))
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()
        self.ledger.close()
