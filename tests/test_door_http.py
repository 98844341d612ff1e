"""The HTTP control routes in process (FastAPI's test client, a real ledger, no engine): every
route refuses a missing, malformed, unknown or too-low token with the status of the one table
and an audit line; `caller` and unknown fields are refused; reads answer the ledger's state.
Every gRPC method, on a real gRPC server on loopback over the same `Operations`, obeys the same
table. The same routes against a real ``editserve serve`` are in tests/test_grpc.py."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

fastapi = pytest.importorskip("fastapi")

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from editserve.control.http import ROUTES, router  # noqa: E402
from editserve.control.operations import Operations  # noqa: E402
from editserve.control.principals import OPERATION_ROLES, TokenTable  # noqa: E402
from editserve.engine.control import ControlPlane, ControlSettings  # noqa: E402
from editserve.ledger import Ledger  # noqa: E402

TOKENS = {"viewer": "vwr-http-0123456789", "editor": "edt-http-0123456789", "admin": "adm-http-0123456789"}
BELOW = {"viewer": None, "editor": "viewer", "admin": "editor"}


def _control(tmp_path: Path) -> tuple[Any, Any]:
    ledger = Ledger.open(tmp_path / "ledger", model_fingerprint="c" * 64)
    control = ControlPlane(None, ControlSettings(model=None))
    control.ledger = ledger                    # what `start` opens; no engine, no sidecar
    table = TokenTable()
    for role, token in TOKENS.items():
        table.add(token, role, f"{role}-user")
    control.operations = Operations(control, table)
    return control, ledger


@pytest.fixture()
def client(tmp_path: Path) -> Any:
    control, ledger = _control(tmp_path)
    app = FastAPI()
    app.state.editserve = control
    app.include_router(router())
    with TestClient(app) as c:
        yield c
    ledger.close()


def _call(c: TestClient, verb: str, path: str, token: str | None = None, header: str | None = None,
          **kw: Any) -> Any:
    headers = {"authorization": header if header is not None else f"Bearer {token}"} if (token or header) else {}
    return c.request(verb, "/editserve/v1" + path, headers=headers, **kw)


def test_every_route_needs_a_token_of_its_role(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="editserve.audit"):
        for verb, path, operation in ROUTES:
            concrete = path.replace("{version}", "0").replace("{cid}", "abcdef")
            body = {"json": {"version": 0}} if verb == "POST" else {}
            cases = [({}, 401), ({"token": "unknown-token-0123"}, 401), ({"header": "Basic YWI6Y2Q="}, 401),
                     ({"header": "Bearer"}, 401)]
            low = BELOW[OPERATION_ROLES[operation]]
            if low:
                cases.append(({"token": TOKENS[low]}, 403))
            for auth, status in cases:
                r = _call(client, verb, concrete, **auth, **body)
                assert r.status_code == status, (verb, path, auth, r.text)
                err = r.json()["error"]
                assert err["code"] == ("UNAUTHENTICATED" if status == 401 else "PERMISSION_DENIED")
                assert not any(t in r.text for t in TOKENS.values())
    refusals = [rec.getMessage() for rec in caplog.records if "audit: refused" in rec.getMessage()]
    assert len(refusals) >= 4 * len(ROUTES) and any("over http" in m for m in refusals)
    assert not any(t in m for m in refusals for t in TOKENS.values())


def test_rebase_route_is_admin_only_and_validated(client: TestClient) -> None:
    """POST /rebase (issue 16.3) is in the role table as revert is; its body is a RebaseRequest."""
    assert ("POST", "/rebase", "rebase") in ROUTES and OPERATION_ROLES["rebase"] == OPERATION_ROLES["revert"] == "admin"
    r = _call(client, "POST", "/rebase", TOKENS["editor"], json={"version": 2})
    assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
    for body, fragment in (({"version": -3}, "-3"), ({"version": 1, "idempotency_key": "a b"}, "'a b'"),
                           ({"version": 1, "rebase": True}, "rebase"), ({"version": 1, "caller": "x"}, "caller")):
        r = _call(client, "POST", "/rebase", TOKENS["admin"], json=body)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], (body, r.text)


def test_consolidate_route_is_admin_only_and_validated(client: TestClient) -> None:
    """POST /consolidate (issue 16) moves the head without the gate, so it is an admin's; its body is
    a ConsolidateRequest whose ridge and max_drop are checked before anything is computed."""
    assert ("POST", "/consolidate", "consolidate") in ROUTES and OPERATION_ROLES["consolidate"] == "admin"
    r = _call(client, "POST", "/consolidate", TOKENS["editor"], json={})
    assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
    for body, fragment in (({"ridge": 0}, "ridge"), ({"ridge": -1.5}, "-1.5"), ({"ridge": 1e9}, "ridge"),
                           ({"max_drop": 1.5}, "1.5"), ({"max_drop": -0.1}, "-0.1"),
                           ({"expected_head": -2}, "-2"), ({"idempotency_key": "a b"}, "'a b'"),
                           ({"caller": "x"}, "caller"), ({"layers": [5]}, "layers")):
        r = _call(client, "POST", "/consolidate", TOKENS["admin"], json=body)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], (body, r.text)


def test_reads_answer_the_ledger(client: TestClient) -> None:
    r = _call(client, "GET", "/versions", TOKENS["viewer"])
    assert r.status_code == 200 and [v["kind"] for v in r.json()["versions"]] == ["base"]
    r = _call(client, "GET", "/versions/0", TOKENS["viewer"])
    assert r.status_code == 200 and r.json()["is_head"] is True
    r = _call(client, "GET", "/versions/7", TOKENS["viewer"])
    assert (r.status_code, r.json()["error"]["code"]) == (404, "NOT_FOUND") and "version 7" in r.text


@pytest.mark.parametrize("verb,path,body,status,fragment", [
    ("POST", "/edit", {"facts": [], "caller": "mallory"}, 400, "'caller' is not accepted"),
    ("POST", "/rollback", {"version": 0, "caller": "mallory"}, 400, "mallory"),
    ("POST", "/rollback", {"version": 0, "force": True}, 400, "force"),
    ("POST", "/edit", {"requests": []}, 400, "requests"),
    ("POST", "/edit", {"facts": []}, 400, "at least one fact"),
    ("POST", "/rollback", {"version": -1}, 400, "-1"),
    ("POST", "/rollback", {"version": True}, 400, "version must be a number, got true"),
    ("POST", "/revert", {"version": 0, "idempotency_key": "a b"}, 400, "'a b'"),
    ("POST", "/revert", {"version": 0, "max_drop": -0.25}, 400, "max_drop must be a share in [0, 1], got -0.25"),
    ("POST", "/import", {"manifest_json": "", "factors": ""}, 400, "0 and 0 bytes"),
])
def test_bad_bodies(client: TestClient, verb: str, path: str, body: Any, status: int, fragment: str) -> None:
    r = _call(client, verb, path, TOKENS["admin"], json=body)
    assert r.status_code == status and fragment in r.json()["error"]["message"], r.text


def test_body_size_and_json_checks(client: TestClient) -> None:
    r = _call(client, "POST", "/rollback", TOKENS["admin"], content=b"{not json")
    assert r.status_code == 400 and "not UTF-8 JSON" in r.text
    r = _call(client, "POST", "/rollback", TOKENS["admin"], json=[1, 2])
    assert r.status_code == 400 and "JSON object" in r.text


@pytest.fixture()
def grpc_target(tmp_path: Path) -> Any:
    """A real gRPC server on loopback over the same kind of `Operations` (its own event loop thread)."""
    from editserve.control.server import start_server

    control, ledger = _control(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(start_server(control.operations, f"127.0.0.1:{port}"), loop).result(60)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(60)
        ledger.close()


def test_every_rpc_needs_a_token_of_its_role(grpc_target: str) -> None:
    """Every method of the service (the candidates' included) refuses no / unknown / too-low
    tokens; with its role, a candidates RPC on a server without --candidates is FAILED_PRECONDITION."""
    import grpc

    from editserve.control.gen import pb2
    from editserve.control.principals import GRPC_OPERATIONS

    methods = {m.name: m for m in pb2.DESCRIPTOR.services_by_name["EditService"].methods}
    assert set(methods) == set(GRPC_OPERATIONS)
    for name in ("ListCandidates", "StageCandidate", "PromoteCandidate", "DiscardCandidate", "CompareCandidate"):
        assert name in methods
    with grpc.insecure_channel(grpc_target) as ch:
        for name, m in methods.items():
            request = getattr(pb2, m.input_type.name)()
            needed = OPERATION_ROLES[GRPC_OPERATIONS[name]]
            attempts = [(None, "UNAUTHENTICATED"), ("unknown-token-0123", "UNAUTHENTICATED")]
            if BELOW[needed]:
                attempts.append((TOKENS[BELOW[needed]], "PERMISSION_DENIED"))
            path = f"/editserve.v1.EditService/{name}"
            for token, code in attempts:
                meta = [("authorization", f"Bearer {token}")] if token else []
                if m.server_streaming:
                    call = ch.unary_stream(path, request_serializer=type(request).SerializeToString,
                                           response_deserializer=lambda b: b)
                    with pytest.raises(grpc.RpcError) as e:
                        next(iter(call(request, metadata=meta, timeout=30)))
                else:
                    call = ch.unary_unary(path, request_serializer=type(request).SerializeToString,
                                          response_deserializer=lambda b: b)
                    with pytest.raises(grpc.RpcError) as e:
                        call(request, metadata=meta, timeout=30)
                assert e.value.code().name == code, (name, token, e.value)
                assert not any(t in (e.value.details() or "") for t in TOKENS.values())
        call = ch.unary_unary("/editserve.v1.EditService/ListCandidates",
                              request_serializer=pb2.ListCandidatesRequest.SerializeToString,
                              response_deserializer=pb2.ListCandidatesResponse.FromString)
        with pytest.raises(grpc.RpcError) as e:
            call(pb2.ListCandidatesRequest(), metadata=[("authorization", f"Bearer {TOKENS['viewer']}")], timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--candidates" in e.value.details()
        # A bad candidate id is named (the role passes first).
        call = ch.unary_unary("/editserve.v1.EditService/DiscardCandidate",
                              request_serializer=pb2.DiscardCandidateRequest.SerializeToString,
                              response_deserializer=pb2.CandidateOutcome.FromString)
        with pytest.raises(grpc.RpcError) as e:
            call(pb2.DiscardCandidateRequest(candidate="ZZ"), metadata=[("authorization", f"Bearer {TOKENS['editor']}")],
                 timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'ZZ'" in e.value.details()


@pytest.mark.parametrize("body,fragment", [
    ({"version": 1, "ref": "abcd"}, "exactly one"),
    ({}, "exactly one"),
    ({"ref": "xyz!"}, "'xyz!'"),
    ({"version": -2}, "-2"),
    ({"version": 1, "share": 1.5}, "1.5"),
    ({"manifest_json": "e30="}, "both"),
    ({"edit": {"facts": []}}, "at least one fact"),
    ({"edit": {"facts": [{"prompt": "{} is in", "subject": "X", "target_new": " Y"}], "expected_head": 3}},
     "expected_head"),
    ({"version": 1, "shares": 0.5}, "shares"),
    ({"to_version": -1}, "-1"),
    ({"to_version": 0, "version": 1}, "exactly one"),
    ({"version": 1, "share": True}, "share must be a number, got true"),
    ({"edit": {"facts": [{"prompt": "{} is in", "subject": "X", "target_new": " Y"}], "layers": [True]}},
     "edit.layers must be a number, got [true]"),
])
def test_bad_stage_bodies(client: TestClient, body: Any, fragment: str) -> None:
    r = _call(client, "POST", "/candidates", TOKENS["admin"], json=body)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def test_bad_compare_bodies(client: TestClient) -> None:
    r = _call(client, "POST", "/candidates/abcdef/compare", TOKENS["editor"],
              json={"items": [{"prompt": "", "target": " x"}]})
    assert r.status_code == 400 and "non-empty" in r.text
    r = _call(client, "POST", "/candidates/abcdef/compare", TOKENS["editor"],
              json={"items": [{"prompt": "p", "target": " x"}] * 65})
    assert r.status_code == 413 and "65 items" in r.text
    r = _call(client, "POST", "/candidates/ABCDEF/compare", TOKENS["editor"], json={})
    assert r.status_code == 400 and "'ABCDEF'" in r.text
    r = _call(client, "POST", "/candidates/abcdef/compare", TOKENS["editor"], json={})
    assert r.status_code == 409 and r.json()["error"]["type"] == "CandidatesDisabled"
