"""Start the gRPC control plane next to vLLM's API server, on the same event loop and the same
`ControlPlane` object as the HTTP routes.

Settings (environment, also `editserve serve --grpc-addr` etc.):

- ``EDITSERVE_GRPC_ADDR``: listen address (default ``0.0.0.0:50051``; ``off`` disables it). The
  server starts when tokens are configured (``EDITSERVE_CONTROL_TOKEN`` and/or
  ``EDITSERVE_CONTROL_TOKENS_FILE``) or the address is set explicitly; with no token at all every
  call is UNAUTHENTICATED.
- ``EDITSERVE_GRPC_TLS_CERT`` / ``EDITSERVE_GRPC_TLS_KEY`` (TLS), plus
  ``EDITSERVE_GRPC_TLS_CLIENT_CA`` (mutual TLS: client certificates required).

Also served: standard health checking (``grpc.health.v1.Health``, SERVING for ``""`` and
``editserve.v1.EditService``) and server reflection.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import grpc

from editserve.control.auth import TOKEN_ENV, TOKENS_FILE_ENV, TLSConfig, TokenTable
from editserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

ADDR_ENV = "EDITSERVE_GRPC_ADDR"
DEFAULT_ADDR = "0.0.0.0:50051"
MAX_MESSAGE_BYTES = 64 << 20


async def start_server(control: Any, addr: str, tokens: TokenTable, tls: TLSConfig | None = None) -> Any:
    """Start and return a ``grpc.aio.Server`` serving `control` on `addr` (raises if it cannot bind)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from editserve.control.gen import SERVICE_NAME, pb2, pb2_grpc
    from editserve.control.interceptors import ControlInterceptor
    from editserve.control.service import EditService

    methods = pb2.DESCRIPTOR.services_by_name["EditService"].methods
    type_names = {m.name: m.input_type.full_name for m in methods}
    server = grpc.aio.server(interceptors=[ControlInterceptor(tokens, type_names)], options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    service = EditService(control)
    pb2_grpc.add_EditServiceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_secure_port(addr, tls.server_credentials()) if tls else server.add_insecure_port(addr)
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
             "mutual TLS" if tls and tls.client_ca else "TLS" if tls else "plaintext", len(tokens))
    return server


async def maybe_start(control: Any, environ: Mapping[str, str] | None = None) -> Any:
    """Start the gRPC server per the environment (see the module docstring); None when off."""
    env = os.environ if environ is None else environ
    addr = env.get(ADDR_ENV, "").strip()
    if addr.lower() in ("off", "none", "0"):
        return None
    tokens = TokenTable.from_env(env)
    if not addr and not (env.get(TOKEN_ENV) or env.get(TOKENS_FILE_ENV)):
        log.info("gRPC control plane off: no %s / %s and no %s", TOKEN_ENV, TOKENS_FILE_ENV, ADDR_ENV)
        return None
    return await start_server(control, addr or DEFAULT_ADDR, tokens, TLSConfig.from_env(env))
