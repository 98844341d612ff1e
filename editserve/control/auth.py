"""gRPC transport security: the bearer token of a call's metadata, and TLS / mutual-TLS credentials.

Tokens, principals and roles are transport-neutral (`editserve.control.principals`); this module
only reads them off gRPC metadata and builds the server credentials. TLS settings:
``EDITSERVE_GRPC_TLS_CERT`` / ``EDITSERVE_GRPC_TLS_KEY`` (both or neither), plus
``EDITSERVE_GRPC_TLS_CLIENT_CA`` (mutual TLS: clients must present a certificate of that CA).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editserve.control.principals import TokenTable, bearer_token  # noqa: F401  (TokenTable: re-export)
from editserve.errors import InvalidRequestError

SERVICE_PREFIX = "/editserve.v1.EditService/"
TLS_CERT_ENV = "EDITSERVE_GRPC_TLS_CERT"
TLS_KEY_ENV = "EDITSERVE_GRPC_TLS_KEY"
TLS_CLIENT_CA_ENV = "EDITSERVE_GRPC_TLS_CLIENT_CA"


def metadata_token(metadata: Any) -> str | None:
    """The bearer token of gRPC call metadata (`principals.bearer_token` semantics)."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            return bearer_token(value)
    return None


@dataclass(frozen=True)
class TLSConfig:
    cert: str                     # server certificate chain (PEM)
    key: str                      # server private key (PEM)
    client_ca: str | None = None  # mutual TLS: clients must present a certificate signed by this CA

    def server_credentials(self) -> Any:
        import grpc

        from editserve.errors import DataError

        try:
            cert, key = Path(self.cert).read_bytes(), Path(self.key).read_bytes()
            ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        except OSError as exc:
            raise DataError(f"cannot read TLS file {exc.filename!r}: {exc.strerror}") from None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "TLSConfig | None":
        env = os.environ if environ is None else environ
        cert, key = env.get(TLS_CERT_ENV), env.get(TLS_KEY_ENV)
        if not cert and not key:
            return None
        if not cert or not key:
            raise InvalidRequestError(f"TLS needs both {TLS_CERT_ENV} and {TLS_KEY_ENV}")
        return cls(cert=cert, key=key, client_ca=env.get(TLS_CLIENT_CA_ENV) or None)
