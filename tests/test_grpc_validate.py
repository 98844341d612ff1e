"""Property-based fuzz of the Edit request validation (no server): any EditRequest message either
validates into an `EditArgs` whose facts are well-formed `EditRequest`s, or raises a typed
editserve error whose status code is a client error (never INTERNAL) and whose message is not empty.
Also the codegen, token table and status mapping basics."""

from __future__ import annotations

import io
import math

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from editserve.control.auth import TokenTable, authenticate
from editserve.control.errors import PermissionDenied, Unauthenticated, status_code
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
    meta = lambda tok: (("authorization", f"Bearer {tok}"),)  # noqa: E731
    assert authenticate(t, "/editserve.v1.EditService/Status", meta("viewer-token-1")).name == "v"
    with pytest.raises(PermissionDenied):
        authenticate(t, "/editserve.v1.EditService/Edit", meta("viewer-token-1"))
    with pytest.raises(Unauthenticated) as e:
        authenticate(t, "/editserve.v1.EditService/Status", meta("wrong-token-xx"))
    assert "wrong-token" not in str(e.value)
    admin = authenticate(t, "/editserve.v1.EditService/ImportPatch", meta("admin-token-12"))
    assert admin.role == "admin" and admin.caller.startswith("grpc:token-") and "admin-token" not in admin.caller
    with pytest.raises(Unauthenticated):
        authenticate(t, "/editserve.v1.EditService/Status", ())


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
