"""The HTTP control routes in process (FastAPI's test client, a real ledger, no engine): every
route refuses a missing, malformed, unknown or too-low token with the status of the one table
and an audit line; `caller` and unknown fields are refused; reads answer the ledger's state.
The same routes against a real ``editserve serve`` are in tests/test_grpc.py."""

from __future__ import annotations

import logging
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


@pytest.fixture()
def client(tmp_path: Path) -> Any:
    ledger = Ledger.open(tmp_path / "ledger", model_fingerprint="c" * 64)
    control = ControlPlane(None, ControlSettings(model=None))
    control.ledger = ledger                    # what `start` opens; no engine, no sidecar
    table = TokenTable()
    for role, token in TOKENS.items():
        table.add(token, role, f"{role}-user")
    control.operations = Operations(control, table)
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
            concrete = path.replace("{version}", "0")
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
    ("POST", "/revert", {"version": 0, "idempotency_key": "a b"}, 400, "'a b'"),
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
