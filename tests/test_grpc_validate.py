"""Property-based fuzz of the Edit request validation (no server): any EditRequest message either
validates into an `EditArgs` whose facts are well-formed `EditRequest`s, or raises a typed
editserve error whose status code is a client error (never INTERNAL) and whose message is not empty.
Also the codegen, token table and status mapping basics."""

from __future__ import annotations

import io
import math
import re

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from editserve.control.errors import PermissionDenied, Unauthenticated, http_status, status_code
from editserve.control.principals import GRPC_OPERATIONS, OPERATION_ROLES, TokenTable, authorize, bearer_token
from editserve.control.gen import pb2
from editserve.control.validate import edit_args
from editserve.errors import EditserveError

CLIENT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED}

text = st.one_of(st.text(max_size=40), st.sampled_from(["{} is in", "The Eiffel Tower", " Rome", "", "{}", "{ }"]),
                 st.text(alphabet=st.characters(codec="utf-8"), min_size=1990, max_size=2100))
fact = st.builds(pb2.Fact, prompt=text, subject=text, target_new=text, target_true=text)
floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))


@st.composite
def edit_requests(draw):
    th = {k: v for k in ("min_efficacy", "min_paraphrase", "max_ns_drop", "max_canary_kl")
          if (v := draw(floats)) is not None}
    msg = pb2.EditRequest(facts=draw(st.lists(fact, max_size=4)), method=draw(st.sampled_from(["", "rome", "memit", "x"])),
                          layers=draw(st.lists(st.integers(-2 ** 31, 2 ** 31 - 1), max_size=3)),
                          dry_run=draw(st.booleans()), idempotency_key=draw(st.text(max_size=8)),
                          thresholds=pb2.ProbeThresholds(**th),
                          paraphrases=[pb2.GatePrompt(prompt=p, fact_index=i) for p, i in
                                       draw(st.lists(st.tuples(text, st.integers(0, 5)), max_size=3))])
    if draw(st.booleans()):
        msg.expected_head = draw(st.integers(-5, 2 ** 40))
    return msg


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edit_requests())
def test_edit_validation_fuzz(msg) -> None:
    try:
        args = edit_args(msg, n_layers=30)
    except EditserveError as exc:
        assert status_code(exc) in CLIENT_CODES, (type(exc), exc)
        assert str(exc)
        return
    assert 1 <= len(args.requests) <= 32
    for r in args.requests:
        assert r.text and r.subject in r.text and r.target_new.strip()
    assert args.layers is None or all(0 <= x < 30 for x in args.layers)
    th = args.gate.thresholds
    assert all(math.isfinite(v) for v in (th.min_efficacy, th.min_paraphrase, th.max_ns_drop, th.max_canary_kl))


def test_tokens_and_roles() -> None:
    t = TokenTable()
    t.add("viewer-token-1", "viewer", "v")
    t.add("admin-token-12", "admin")
    assert authorize(t, "status", bearer_token("Bearer viewer-token-1")).name == "v"
    with pytest.raises(PermissionDenied):
        authorize(t, "edit", bearer_token("Bearer viewer-token-1"))
    with pytest.raises(Unauthenticated) as e:
        authorize(t, "status", bearer_token("Bearer wrong-token-xx"))
    assert "wrong-token" not in str(e.value)
    admin = authorize(t, "import", bearer_token(b"bearer admin-token-12"))
    assert admin.role == "admin" and admin.caller.startswith("token:token-") and "admin-token" not in admin.caller
    for header in (None, "Basic abc", "Bearer ", "admin-token-12"):
        with pytest.raises(Unauthenticated):
            authorize(t, "status", bearer_token(header))
    with pytest.raises(PermissionDenied):
        authorize(t, "no-such-operation", bearer_token("Bearer admin-token-12"))


def test_every_rpc_has_an_operation_and_role() -> None:
    methods = {m.name for m in pb2.DESCRIPTOR.services_by_name["EditService"].methods}
    assert set(GRPC_OPERATIONS) == methods
    assert all(OPERATION_ROLES[op] in ("viewer", "editor", "admin") for op in GRPC_OPERATIONS.values())


def test_one_status_table_for_both_transports() -> None:
    from editserve.control.errors import ProbeRejected, RequestTooLarge, TooManyStreams
    from editserve.engine.errors import SidecarError, SidecarTimeout, SwapFailed
    from editserve.errors import InvalidRequestError
    from editserve.ledger.errors import LedgerConflict, VersionNotFound

    cases = [(Unauthenticated("x"), "UNAUTHENTICATED", 401), (PermissionDenied("x"), "PERMISSION_DENIED", 403),
             (InvalidRequestError("x"), "INVALID_ARGUMENT", 400), (RequestTooLarge("x"), "RESOURCE_EXHAUSTED", 413),
             (TooManyStreams("x"), "RESOURCE_EXHAUSTED", 429), (VersionNotFound("x"), "NOT_FOUND", 404),
             (LedgerConflict("x", expected_head=1, actual_head=2), "ABORTED", 409),
             (ProbeRejected("x"), "FAILED_PRECONDITION", 422), (SidecarTimeout("x"), "DEADLINE_EXCEEDED", 504),
             (SidecarError("x"), "UNAVAILABLE", 503), (SwapFailed("x"), "UNAVAILABLE", 503),
             (RuntimeError("x"), "INTERNAL", 500)]
    for exc, code, http in cases:
        assert (status_code(exc).name, http_status(exc)) == (code, http), exc


def test_hparams_overrides_are_whitelisted_and_bounded() -> None:
    from editserve.control.limits import hparam_overrides

    ok = hparam_overrides("rome", '{"value": {"max_steps": 10, "lr": 0.5}}')
    assert ok.nested() == {"value": {"lr": 0.5, "max_steps": 10}} and not ok.needs_admin
    assert hparam_overrides("memit", '{"stats": {"n_tokens": 5000}}').needs_admin
    assert hparam_overrides("rome", '{"prefixes": {"n_prefixes": 2}}').needs_admin
    assert hparam_overrides("memit", '{"cov_weight": 100, "keys": "per_prompt"}').nested() == {
        "cov_weight": 100.0, "keys": "per_prompt"}
    assert hparam_overrides("rome", "").nested() is None
    for text, fragment in (('{"value": {"max_steps": 100000}}', "max_steps=100000"),
                           ('{"value": {"max_steps": 2.5}}', "integer"), ('{"value": {"lr": "NaN"}}', "number"),
                           ('{"layer": 3}', "'layer'"), ('{"cov_weight": 10}', "'cov_weight'"),
                           ('{"value": {"lr": true}}', "number"), ('[1]', "object"), ("{x", "not JSON"),
                           ('{"stats": {"n_tokens": 1e12}}', "n_tokens"), ('{"keys": "all"}', "keys='all'")):
        with pytest.raises(EditserveError, match=re.escape(fragment)):
            hparam_overrides("memit" if "keys\": \"all" in text else "rome", text)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_lines_and_terminal() -> None:
    from editserve.commands.remote import ProgressBar

    events = [pb2.Event(kind="progress", progress=p, message=m, operation_id="op")
              for p, m in ((0.0, "accepted: 1 fact(s)"), (0.5, "values: 9.61 s"), (1.0, "committed"))]
    out = io.StringIO()
    with ProgressBar("edit", out) as bar:
        for e in events:
            bar.update(e)
    assert out.getvalue().splitlines() == ["[  0%] accepted: 1 fact(s)", "[ 50%] values: 9.61 s", "[100%] committed"]
    term = _Terminal()
    with ProgressBar("edit", term) as bar:
        bar.update(events[1])
        assert "edit [" + "#" * 12 + "." * 12 + "]  50% values: 9.61 s" in term.getvalue()
        bar.update(pb2.Event(kind="rejected", message="the probe gate rejected the edit", operation_id="op"))
        assert "rejected: the probe gate rejected the edit" in term.getvalue()
    assert term.getvalue().endswith("\r") and "\n" not in term.getvalue()      # the bar is erased, no lines left


def test_consolidate_request_whole_defaults_to_incremental() -> None:
    """``ConsolidateRequest.whole``: absent or false → only the patches committed since the last
    consolidation (the default); true → the earlier consolidated patches re-solved too."""
    from editserve.control.validate import consolidate_args

    assert consolidate_args(pb2.ConsolidateRequest()).whole is False
    assert consolidate_args(pb2.ConsolidateRequest(whole=False)).whole is False
    args = consolidate_args(pb2.ConsolidateRequest(whole=True, ridge=0.5))
    assert (args.whole, args.ridge) == (True, 0.5)


def test_rebase_request_max_drop_defaults_to_none_breaking() -> None:
    """``RebaseRequest.max_drop`` (a consolidated fact's rebase, as ``RevertRequest.max_drop``): absent
    → 0 (no other fact of the consolidation may break); a share outside [0, 1] is refused naming it."""
    from editserve.control.validate import rebase_args
    from editserve.errors import InvalidRequestError

    assert rebase_args(pb2.RebaseRequest(version=3)).max_drop == 0.0
    assert rebase_args(pb2.RebaseRequest(version=3, max_drop=0.25)).max_drop == 0.25
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(InvalidRequestError, match="max_drop must be a share in"):
            rebase_args(pb2.RebaseRequest(version=3, max_drop=bad))
