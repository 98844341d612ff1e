"""Issue 16: alphaedit is an edit method of the control plane, with its own overrides, and the
method of a request that names none is one switch (DEFAULT_METHOD / EDITSERVE_DEFAULT_METHOD)."""

from __future__ import annotations

import pytest

from editserve.control.gen import pb2
from editserve.control.limits import hparam_overrides
from editserve.control.methods import DEFAULT_METHOD, DEFAULT_METHOD_ENV, default_method
from editserve.control.validate import edit_args
from editserve.errors import EditserveError, InvalidRequestError


def _msg(method: str = "", hparams: str = "", n: int = 1) -> pb2.EditRequest:
    facts = [pb2.Fact(prompt="{} is in", subject=f"S{i}", target_new=" X") for i in range(n)]
    return pb2.EditRequest(facts=facts, method=method, hparams_json=hparams)


def test_alphaedit_is_accepted_with_its_overrides():
    args = edit_args(_msg("alphaedit", '{"alpha": 5, "value": {"max_steps": 10}}', n=3), 30)
    assert args.method == "alphaedit" and args.hparams.nested() == {"alpha": 5.0, "value": {"max_steps": 10}}
    assert hparam_overrides("alphaedit", '{"nullspace_threshold": 0.01}').needs_admin
    for method, text in (("alphaedit", '{"cov_weight": 10}'), ("memit", '{"alpha": 1}'), ("rome", '{"alpha": 1}')):
        with pytest.raises(EditserveError, match="cannot be overridden"):
            hparam_overrides(method, text)
    with pytest.raises(EditserveError, match=r"alpha=0"):
        hparam_overrides("alphaedit", '{"alpha": 0}')
    # per-prompt keys and the most-probable early stop (wave 2 session 5), typed refusals naming the value
    text = '{"keys": "per_prompt", "value": {"early_stop": "most_probable", "early_stop_margin": 1.5}}'
    assert hparam_overrides("alphaedit", text).nested() == {
        "keys": "per_prompt", "value": {"early_stop": "most_probable", "early_stop_margin": 1.5}}
    assert not hparam_overrides("alphaedit", text).needs_admin
    with pytest.raises(EditserveError, match=r"early_stop='sometimes'"):
        hparam_overrides("alphaedit", '{"value": {"early_stop": "sometimes"}}')
    with pytest.raises(EditserveError, match=r"early_stop_margin=-1"):
        hparam_overrides("memit", '{"value": {"early_stop_margin": -1}}')
    with pytest.raises(EditserveError, match=r"keys='each'"):
        hparam_overrides("alphaedit", '{"keys": "each"}')


def test_default_method_is_one_switch(monkeypatch):
    assert default_method({}) == DEFAULT_METHOD
    assert default_method({DEFAULT_METHOD_ENV: "alphaedit"}) == "alphaedit"
    with pytest.raises(InvalidRequestError, match=DEFAULT_METHOD_ENV):
        default_method({DEFAULT_METHOD_ENV: "fancy"})
    # a request's default is the server's, checked when it started; the environment is not read again
    monkeypatch.setenv(DEFAULT_METHOD_ENV, "fancy")
    assert edit_args(_msg(), 30).method == DEFAULT_METHOD
    assert edit_args(_msg(), 30, default_method="memit").method == "memit"
    assert edit_args(_msg("rome"), 30, default_method="memit").method == "rome"
    from editserve.candidates.validate import stage_args

    staged = stage_args(pb2.StageCandidateRequest(edit=_msg()), 30, default_method="memit")
    assert staged.edit is not None and staged.edit.method == "memit" and staged.edit.dry_run


def test_a_server_with_neuron_slots_at_the_gated_layer_defaults_to_gated():
    """The method of edits that name none, as the control plane picks it at start: the operator's when set
    (even AlphaEdit on a server with slots), else gated where the gated layer has slots, else AlphaEdit."""
    from editserve.control.methods import chosen_default_method, server_default_method
    from editserve.engine.settings import ControlSettings

    assert chosen_default_method({}) is None and chosen_default_method({DEFAULT_METHOD_ENV: " "}) is None
    assert chosen_default_method({DEFAULT_METHOD_ENV: "rome"}) == "rome"
    assert ControlSettings.from_env("m", 1, {}).default_method is None
    assert server_default_method(None, True) == "gated"
    assert server_default_method(None, False) == DEFAULT_METHOD == "alphaedit"
    assert server_default_method("alphaedit", True) == "alphaedit"
    assert server_default_method("memit", False) == "memit"
