"""Request routing to staged candidates, called by the version middleware (editserve/engine/http.py).

Only while at least one candidate is staged does the middleware buffer a ``POST`` body of the
OpenAI generation routes (`ROUTED_PATHS`) and call `route`:

- a body naming ``<served-name>@candidate-<id>`` goes to that candidate (vLLM's own LoRA
  routing; no rewrite), unless the candidate is leaving (being promoted or discarded): then
  it is rewritten to the served name (the head);
- a body naming the served model (or none) goes to the candidate whose share holds the
  request id's hash (`Candidates.route_share`): the ``model`` field is rewritten to the
  candidate's name. The request id is the ``x-request-id`` header, else the body's
  ``request_id``, else its ``user``; a request with none of them stays on the head (a share
  must be deterministic per request, so a retried request lands on the same side).

Every routed request is counted per side (`Candidates.count`: the head or the candidate's id),
what ``editserve candidates`` and ``compare`` show.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from editserve.candidates.staging import Candidate, Candidates

ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")
REQUEST_ID_HEADER = b"x-request-id"
MAX_ROUTED_BODY = 16 << 20

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


def wants_routing(cands: Candidates | None, scope: MutableMapping[str, Any]) -> bool:
    return (cands is not None and bool(cands.list()) and scope.get("method") == "POST"
            and str(scope.get("path", "")) in ROUTED_PATHS)


def _header(scope: MutableMapping[str, Any], name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


async def route(cands: Candidates, scope: MutableMapping[str, Any], receive: Receive,
                ) -> tuple[Receive, Candidate | None]:
    """(the receive callable to pass on, the candidate that serves the request or None)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":          # a disconnect before the body ended
            return _replay([message], receive), None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False) or size > MAX_ROUTED_BODY:
            more = message.get("more_body", False)
            break
    raw = b"".join(chunks)
    if more:                                           # too large to route: pass it on untouched
        return _replay([{"type": "http.request", "body": raw, "more_body": True}], receive), None
    body, cand = _decide(cands, scope, raw)
    cands.count(cand)
    if body is not raw:
        scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        scope["headers"].append((b"content-length", str(len(body)).encode()))
    return _replay([{"type": "http.request", "body": body, "more_body": False}], receive), cand


def _decide(cands: Candidates, scope: MutableMapping[str, Any], raw: bytes) -> tuple[bytes, Candidate | None]:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return raw, None                               # vLLM answers the bad body itself
    if not isinstance(data, dict):
        return raw, None
    model = data.get("model")
    named = cands.by_model(model) if isinstance(model, str) else None
    if named is not None:
        if cands.leaving(named.id):
            data["model"] = cands.served_name
            return json.dumps(data).encode(), None
        return raw, named
    if model not in (None, cands.served_name):
        return raw, None
    rid = _header(scope, REQUEST_ID_HEADER) or data.get("request_id") or data.get("user")
    if not isinstance(rid, str) or not rid:
        return raw, None
    cand = cands.route_share(rid)
    if cand is None:
        return raw, None
    data["model"] = cand.model
    return json.dumps(data).encode(), cand


def _replay(first: list[MutableMapping[str, Any]], receive: Receive) -> Receive:
    pending = list(first)

    async def replay() -> MutableMapping[str, Any]:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
