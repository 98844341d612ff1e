"""Helpers for the one-door tests: HTTP calls to the control routes with a bearer token, and the
HTTP request equivalent to an `EditClient` call (the same protobuf message, in its JSON form)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from google.protobuf import json_format

from editserve.client import EditClient

PREFIX = "/editserve/v1"
# The HTTP status of each gRPC code the catalogue expects (docs/security.md's table).
HTTP_OF = {"INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "RESOURCE_EXHAUSTED": 413, "NOT_FOUND": 404,
           "ABORTED": 409, "FAILED_PRECONDITION": 409, "ALREADY_EXISTS": 409, "UNAUTHENTICATED": 401,
           "PERMISSION_DENIED": 403, "DEADLINE_EXCEEDED": 504}


def http_call(port: int, method: str, path: str, body: Any = None, token: str | None = None,
              query: dict[str, Any] | None = None, timeout: float = 900.0,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{port}{PREFIX}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query, doseq=True)
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    h = {"content-type": "application/json", **(headers or {})}
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


class _Captured(Exception):
    def __init__(self, name: str, request: Any) -> None:
        super().__init__(name)
        self.name, self.request = name, request


class _Recorder:
    def __getattr__(self, name: str) -> Any:
        def call(request: Any, metadata: Any = None, timeout: Any = None) -> Any:
            raise _Captured(name, request)
        return call


def message_of(method: str, kwargs: dict[str, Any]) -> tuple[str, Any]:
    """(gRPC method name, request message) that ``EditClient.<method>(**kwargs)`` would send."""
    client = EditClient("127.0.0.1:9", "unused-token")
    client.stub = _Recorder()
    try:
        getattr(client, method)(**kwargs)
    except _Captured as c:
        return c.name, c.request
    finally:
        client.close()
    raise AssertionError(f"EditClient.{method} sent nothing")


def http_request_of(method: str, kwargs: dict[str, Any]) -> tuple[str, str, Any, dict[str, Any] | None]:
    """(HTTP method, path, JSON body, query) of the route doing what ``EditClient.<method>`` does."""
    rpc, msg = message_of(method, kwargs)
    data = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    if rpc == "GetVersion":
        return "GET", f"/versions/{msg.version}", None, None
    if rpc in ("Diff", "ExportPatch", "ListVersions"):
        path = {"Diff": "/diff", "ExportPatch": "/export", "ListVersions": "/versions"}[rpc]
        return "GET", path, None, data
    path = {"Edit": "/edit", "Rollback": "/rollback", "Revert": "/revert", "Probe": "/probe", "Trace": "/trace",
            "ImportPatch": "/import", "Rebase": "/rebase", "Consolidate": "/consolidate"}[rpc]
    return "POST", path, data, None
