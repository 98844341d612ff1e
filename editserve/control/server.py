"""Start the gRPC control plane next to vLLM's API server, on the same event loop and the same
`editserve.control.operations.Operations` (tokens, roles, limits, audit) as the HTTP routes.

The gRPC plane always starts with the server. Settings (environment; ``editserve serve
--grpc-addr ADDR`` sets ``EDITSERVE_GRPC_ADDR`` and ``editserve serve --insecure`` sets
``EDITSERVE_GRPC_INSECURE=1``):

- ``EDITSERVE_GRPC_ADDR``: listen address, default ``127.0.0.1:50051``; ``off`` disables the
  gRPC plane (the HTTP routes stay, with the same tokens).
- ``EDITSERVE_GRPC_TLS_CERT`` / ``EDITSERVE_GRPC_TLS_KEY`` (TLS), plus
  ``EDITSERVE_GRPC_TLS_CLIENT_CA`` (mutual TLS: client certificates required).
- A non-loopback address without TLS is refused at start (`InsecureAddress`), unless
  ``EDITSERVE_GRPC_INSECURE=1``: then the server starts in plaintext and logs a WARNING on
  every start (bearer tokens then cross the network in the clear).
- Tokens: ``EDITSERVE_CONTROL_TOKENS_FILE`` / ``EDITSERVE_CONTROL_TOKEN``; with neither, the
  local admin token file under ``$EDITSERVE_HOME`` is created and used
  (`editserve.control.principals.TokenTable.from_env`). No call is ever open.

Also served (without a token): standard health checking (``grpc.health.v1.Health``, SERVING
for ``""`` and ``editserve.v1.EditService``) and server reflection.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from editserve.control.auth import TLSConfig
from editserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

ADDR_ENV = "EDITSERVE_GRPC_ADDR"
INSECURE_ENV = "EDITSERVE_GRPC_INSECURE"
DEFAULT_ADDR = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 64 << 20
OFF = ("off", "none", "0", "false")


class InsecureAddress(InvalidRequestError):
    """Plaintext gRPC on an address other hosts can reach, without an explicit opt-in."""


@dataclass(frozen=True)
class GrpcSettings:
    """Where and how the gRPC plane listens (None address: off)."""

    addr: str | None
    tls: TLSConfig | None
    insecure_ok: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "GrpcSettings":
        """Read and check the settings; raises `InsecureAddress` for plaintext on a non-loopback address."""
        env = os.environ if environ is None else environ
        addr = env.get(ADDR_ENV, "").strip() or DEFAULT_ADDR
        if addr.lower() in OFF:
            return cls(addr=None, tls=None)
        insecure = env.get(INSECURE_ENV, "").strip().lower() in ("1", "true", "yes")
        settings = cls(addr=addr, tls=TLSConfig.from_env(env), insecure_ok=insecure)
        if settings.tls is None and not is_loopback(addr) and not insecure:
            raise InsecureAddress(
                f"refusing plaintext gRPC on {addr!r}, an address other hosts can reach: bearer tokens would cross "
                f"the network in the clear. Set EDITSERVE_GRPC_TLS_CERT and EDITSERVE_GRPC_TLS_KEY, listen on "
                f"127.0.0.1, or pass 'editserve serve --insecure' ({INSECURE_ENV}=1) to accept the risk")
        return settings

    @property
    def plaintext_exposed(self) -> bool:
        return self.addr is not None and self.tls is None and not is_loopback(self.addr)


def is_loopback(addr: str) -> bool:
    """Whether a gRPC listen address (``host:port``, ``[v6]:port``, ``unix:…``) reaches only this host."""
    if addr.startswith("unix:") or addr.startswith("unix-abstract:"):
        return True
    host = addr.rsplit(":", 1)[0] if ":" in addr else addr
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False                           # a host name other than localhost, or a wildcard


async def start_server(ops: Any, addr: str, tls: TLSConfig | None = None) -> Any:
    """Start and return a ``grpc.aio.Server`` serving `ops` (an `Operations`) on `addr` (raises if
    it cannot bind). No policy here: `maybe_start` checks the address first."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from editserve.control.gen import SERVICE_NAME, pb2, pb2_grpc
    from editserve.control.interceptors import ControlInterceptor
    from editserve.control.service import EditService

    methods = pb2.DESCRIPTOR.services_by_name["EditService"].methods
    type_names = {m.name: m.input_type.full_name for m in methods}
    server = grpc.aio.server(interceptors=[ControlInterceptor(ops, type_names)], options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    service = EditService(ops)
    pb2_grpc.add_EditServiceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = server.add_secure_port(addr, tls.server_credentials()) if tls else server.add_insecure_port(addr)
    except RuntimeError as exc:
        raise InvalidRequestError(f"the gRPC control plane cannot listen on {addr!r}: {exc}") from None
    if port == 0:
        raise InvalidRequestError(f"the gRPC control plane cannot listen on {addr!r}")
    await server.start()
    for name in ("", SERVICE_NAME):
        status = health_pb2.HealthCheckResponse.SERVING
        result = health_servicer.set(name, status)
        if hasattr(result, "__await__"):
            await result
    server.editserve_service = service  # type: ignore[attr-defined]
    log.info("gRPC control plane on %s (%s, %d token(s))", addr,
             "mutual TLS" if tls and tls.client_ca else "TLS" if tls else "plaintext", len(ops.tokens))
    return server


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def ensure_log_output() -> None:
    """Make editserve's log records (the audit lines, the plaintext warning) reach stderr in the
    API-server process, whatever vLLM's and uvicorn's logging set-up left in place (there, records
    propagated to the root logger are not written): loggers of the ``editserve`` tree that a
    logging configuration disabled are enabled again, and the ``editserve`` logger gets its own
    stderr handler at INFO (once) and stops propagating."""
    import sys

    for name, lg in list(logging.root.manager.loggerDict.items()):
        if name.startswith("editserve") and isinstance(lg, logging.Logger):
            lg.disabled = False
    tree = logging.getLogger("editserve")
    if any(getattr(h, "name", None) == "editserve" for h in tree.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.name = "editserve"
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    tree.addHandler(handler)
    if tree.level == logging.NOTSET:
        tree.setLevel(logging.INFO)
    tree.propagate = False


async def maybe_start(control: Any, environ: Mapping[str, str] | None = None) -> Any:
    """Create the control plane's `Operations` (tokens; the HTTP routes share it) and start the gRPC
    server per the environment (see the module docstring); returns it, or None when off."""
    from editserve.control.operations import Operations

    ensure_log_output()
    env = os.environ if environ is None else environ
    settings = GrpcSettings.from_env(env)
    ops = Operations.of(control, env)
    if settings.addr is None:
        log.info("gRPC control plane off (%s=off); the HTTP control routes need the same tokens", ADDR_ENV)
        return None
    if settings.plaintext_exposed:
        log.warning("WARNING: the gRPC control plane listens in PLAINTEXT on %s, reachable from other hosts "
                    "(%s=1): bearer tokens cross the network unencrypted; use TLS (EDITSERVE_GRPC_TLS_CERT/"
                    "EDITSERVE_GRPC_TLS_KEY) or a loopback address", settings.addr, INSECURE_ENV)
    return await start_server(ops, settings.addr, settings.tls)
