"""Bearer tokens → roles, checked by a server interceptor; TLS / mutual-TLS credentials.

Tokens come from a tokens file (``EDITSERVE_CONTROL_TOKENS_FILE``: JSON
``{"<token>": "viewer"|"editor"|"admin"}`` or ``{"<token>": {"role": ..., "name": ...}}``) and/or
``EDITSERVE_CONTROL_TOKEN`` (one admin token, the one the deploy manifests set). Tokens are kept
only as SHA-256 digests and compared in constant time; logs and the audit log see the
principal's name (``name`` from the file, else ``token-<first 8 hex of its sha256>``), never
the token.

Roles are cumulative: viewer (read), editor (viewer + Edit, Probe), admin (editor + Rollback,
Revert, ImportPatch). The standard health and reflection services are open.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from editserve.control.errors import PermissionDenied, Unauthenticated
from editserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

TOKEN_ENV = "EDITSERVE_CONTROL_TOKEN"
TOKENS_FILE_ENV = "EDITSERVE_CONTROL_TOKENS_FILE"
ROLES = ("viewer", "editor", "admin")
SERVICE_PREFIX = "/editserve.v1.EditService/"

# The least role each call needs.
METHOD_ROLES: Mapping[str, str] = {
    "ListVersions": "viewer", "GetVersion": "viewer", "Diff": "viewer", "Status": "viewer",
    "WatchEvents": "viewer", "ExportPatch": "viewer",
    "Edit": "editor", "Probe": "editor", "Trace": "editor",
    "Rollback": "admin", "Revert": "admin", "ImportPatch": "admin",
}

CURRENT_PRINCIPAL: contextvars.ContextVar["Principal | None"] = contextvars.ContextVar("editserve_principal",
                                                                                        default=None)


@dataclass(frozen=True)
class Principal:
    name: str
    role: str

    def allows(self, needed: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(needed)

    @property
    def caller(self) -> str:
        """What the audit log records."""
        return f"grpc:{self.name}"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenTable:
    """sha256(token) → `Principal`."""

    def __init__(self, entries: Mapping[str, Principal] | None = None) -> None:
        self._by_digest: dict[str, Principal] = dict(entries or {})

    def __len__(self) -> int:
        return len(self._by_digest)

    def add(self, token: str, role: str, name: str | None = None) -> None:
        if not isinstance(token, str) or len(token) < 8:
            raise InvalidRequestError("control tokens must be strings of at least 8 characters")
        if role not in ROLES:
            raise InvalidRequestError(f"unknown role {role!r}; choose one of {list(ROLES)}")
        d = _digest(token)
        self._by_digest[d] = Principal(name=name or f"token-{d[:8]}", role=role)

    def lookup(self, token: str) -> Principal | None:
        d = _digest(token)
        found = None
        for known, principal in self._by_digest.items():          # constant time over the table
            if hmac.compare_digest(known, d):
                found = principal
        return found

    @classmethod
    def from_file(cls, path: str | Path) -> "TokenTable":
        from editserve.errors import DataError

        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read the control tokens file {str(path)!r}: {type(exc).__name__}") from None
        if not isinstance(data, dict):
            raise DataError(f"the control tokens file {str(path)!r} must be a JSON object token → role")
        table = cls()
        for i, (token, value) in enumerate(data.items()):
            if isinstance(value, str):
                table.add(token, value)
            elif isinstance(value, dict) and isinstance(value.get("role"), str):
                table.add(token, value["role"], value.get("name"))
            else:
                raise DataError(f"entry {i} of {str(path)!r} must map to a role or {{'role', 'name'}}")
        return table

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "TokenTable":
        env = os.environ if environ is None else environ
        table = cls.from_file(env[TOKENS_FILE_ENV]) if env.get(TOKENS_FILE_ENV) else cls()
        if env.get(TOKEN_ENV):
            table.add(env[TOKEN_ENV], "admin", "control-token")
        return table


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


def authenticate(table: TokenTable, method: str, metadata: Any) -> Principal:
    """The principal of a call to `method` (full path), or raise Unauthenticated/PermissionDenied."""
    name = method.rsplit("/", 1)[-1]
    token = _bearer(metadata)
    if token is None:
        raise Unauthenticated(f"{name}: no 'authorization: Bearer <token>' metadata")
    if token == "":
        raise Unauthenticated(f"{name}: the authorization metadata is not of the form 'Bearer <token>'")
    principal = table.lookup(token)
    if principal is None:
        raise Unauthenticated(f"{name}: unknown token")
    needed = METHOD_ROLES.get(name)
    if needed is None:
        raise PermissionDenied(f"{name} is not a call of {SERVICE_PREFIX.strip('/')}")
    if not principal.allows(needed):
        raise PermissionDenied(f"{name} needs role {needed!r}; {principal.name} has role {principal.role!r}")
    return principal


# ------------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TLSConfig:
    cert: str                     # server certificate chain (PEM)
    key: str                      # server private key (PEM)
    client_ca: str | None = None  # mutual TLS: clients must present a certificate signed by this CA

    def server_credentials(self) -> grpc.ServerCredentials:
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
        cert, key = env.get("EDITSERVE_GRPC_TLS_CERT"), env.get("EDITSERVE_GRPC_TLS_KEY")
        if not cert and not key:
            return None
        if not cert or not key:
            raise InvalidRequestError("TLS needs both EDITSERVE_GRPC_TLS_CERT and EDITSERVE_GRPC_TLS_KEY")
        return cls(cert=cert, key=key, client_ca=env.get("EDITSERVE_GRPC_TLS_CLIENT_CA") or None)
