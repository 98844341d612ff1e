"""Principals, roles and the table of which operation needs which role, for every transport.

A caller is authenticated by a bearer token (``Authorization: Bearer <token>`` on HTTP, the
``authorization`` metadata on gRPC) and becomes a `Principal` (a name and a role). Roles are
cumulative: ``viewer`` < ``editor`` < ``admin``. `OPERATION_ROLES` names the least role of
each transport-neutral operation; `GRPC_OPERATIONS` maps the gRPC methods onto those
operations (the HTTP routes name their operation directly, `editserve.control.http`), so
both transports obey one table.

Tokens come from a tokens file (``EDITSERVE_CONTROL_TOKENS_FILE``: JSON
``{"<token>": "viewer"|"editor"|"admin"}`` or ``{"<token>": {"role": ..., "name": ...}}``) and/or
``EDITSERVE_CONTROL_TOKEN`` (one admin token). With neither, `TokenTable.from_env` creates
(once) and uses the local admin tokens file under ``$EDITSERVE_HOME``
(`editserve.control.home`): there is no open mode. Tokens are kept only as SHA-256 digests and
compared in constant time; logs and the audit log see the principal's name (``name`` from the
file, else ``token-<first 8 hex of its sha256>``), never the token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from editserve.control.errors import PermissionDenied, Unauthenticated
from editserve.errors import DataError, InvalidRequestError

log = logging.getLogger(__name__)

TOKEN_ENV = "EDITSERVE_CONTROL_TOKEN"
TOKENS_FILE_ENV = "EDITSERVE_CONTROL_TOKENS_FILE"
ROLES = ("viewer", "editor", "admin")
MIN_TOKEN_CHARS = 8

# The least role of each operation (transport-neutral names).
OPERATION_ROLES: Mapping[str, str] = {
    # read: the served version, the ledger, live checksums
    "status": "viewer", "versions": "viewer", "version": "viewer", "diff": "viewer", "events": "viewer",
    "export": "viewer", "checksums": "viewer",
    # change the model through the gate, or read it through the sidecar
    "edit": "editor", "probe": "editor", "trace": "editor",
    # move the head without the gate
    "rollback": "admin", "revert": "admin", "import": "admin", "sync": "admin", "rebase": "admin",
    "consolidate": "admin",
    # options of an edit that only an admin may use (checked by the operations, not the adapters)
    "edit.skip_gate": "admin", "edit.hparams.admin": "admin",
    # candidates (editserve.candidates, docs/candidates.md)
    "candidates": "viewer", "stage": "editor", "stage.share": "admin", "compare": "editor",
    "discard": "editor", "promote": "admin",
}

# gRPC method → operation.
GRPC_OPERATIONS: Mapping[str, str] = {
    "Status": "status", "ListVersions": "versions", "GetVersion": "version", "Diff": "diff",
    "WatchEvents": "events", "ExportPatch": "export",
    "Edit": "edit", "Probe": "probe", "Trace": "trace",
    "Rollback": "rollback", "Revert": "revert", "ImportPatch": "import",
    "Rebase": "rebase", "Consolidate": "consolidate",
    # candidates
    "ListCandidates": "candidates", "StageCandidate": "stage", "PromoteCandidate": "promote",
    "DiscardCandidate": "discard", "CompareCandidate": "compare",
}


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    name: str
    role: str

    def allows(self, needed: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(needed)

    @property
    def caller(self) -> str:
        """What the audit log records as the caller (the same over every transport)."""
        return f"token:{self.name}"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenTable:
    """sha256(token) → `Principal`."""

    def __init__(self, entries: Mapping[str, Principal] | None = None, source: str = "") -> None:
        self._by_digest: dict[str, Principal] = dict(entries or {})
        self.source = source                      # where the tokens came from (for the start-up log)

    def __len__(self) -> int:
        return len(self._by_digest)

    def add(self, token: str, role: str, name: str | None = None) -> None:
        if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
            raise InvalidRequestError(f"control tokens must be strings of at least {MIN_TOKEN_CHARS} characters")
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
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read the control tokens file {str(path)!r}: {type(exc).__name__}") from None
        if not isinstance(data, dict):
            raise DataError(f"the control tokens file {str(path)!r} must be a JSON object token → role")
        table = cls(source=str(path))
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
        """The configured tokens; with none configured, the local admin tokens file (created once)."""
        env = os.environ if environ is None else environ
        if not env.get(TOKENS_FILE_ENV) and not env.get(TOKEN_ENV):
            from editserve.control.home import ensure_local_admin_token

            return cls.from_file(ensure_local_admin_token(dict(env)))
        table = cls.from_file(env[TOKENS_FILE_ENV]) if env.get(TOKENS_FILE_ENV) else cls(source=TOKEN_ENV)
        if env.get(TOKEN_ENV):
            table.add(env[TOKEN_ENV], "admin", "control-token")
        if not len(table):
            raise DataError(f"the control tokens file {env.get(TOKENS_FILE_ENV)!r} holds no token")
        return table


def bearer_token(value: str | bytes | None) -> str | None:
    """The token of an ``Authorization`` value: None when absent, "" when not ``Bearer <token>``."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ""


def authorize(table: TokenTable, operation: str, token: str | None, what: str | None = None) -> Principal:
    """The principal allowed to run `operation` with bearer `token` (`bearer_token`'s result), or
    raise `Unauthenticated` (no / malformed / unknown token) or `PermissionDenied` (role too low).
    `what` names the call in the message (default: the operation). The token never appears in
    a message."""
    what = what or operation
    if token is None:
        raise Unauthenticated(f"{what}: no 'Authorization: Bearer <token>' (see docs/security.md)")
    if token == "":
        raise Unauthenticated(f"{what}: the authorization is not of the form 'Bearer <token>'")
    principal = table.lookup(token)
    if principal is None:
        raise Unauthenticated(f"{what}: unknown token")
    return require(principal, operation, what)


def require(principal: Principal, operation: str, what: str | None = None) -> Principal:
    """`principal` if its role allows `operation`, else `PermissionDenied`."""
    needed = OPERATION_ROLES.get(operation)
    if needed is None:
        raise PermissionDenied(f"{operation!r} is not an operation of the control plane")
    if not principal.allows(needed):
        raise PermissionDenied(f"{what or operation} needs role {needed!r}; {principal.name} has role "
                               f"{principal.role!r}")
    return principal
