"""Serve-only settings and refusals without starting a server (the fleet behaviour itself, with real
processes, is in tests/test_fleet.py::test_serve_only_replica_refuses_edits_naming_compute_replicas_and_follows)."""

from __future__ import annotations

import json

import pytest

from editserve.commands.serve import split_args
from editserve.control.errors import status_of
from editserve.editing.model import FINGERPRINT_FILE, embedded_checkpoint
from editserve.engine.launch import ServeOptions
from editserve.engine.serveonly import SIDECAR_ENV, ServeOnlyReplica, checkpoint_fingerprint, refusal, serve_only_from_env
from editserve.engine.settings import ControlSettings
from editserve.errors import InvalidRequestError


@pytest.mark.parametrize("raw, expected", [("", False), ("1", False), ("yes", False), ("0", True), ("off", True),
                                           ("False", True)])
def test_sidecar_env_values(raw: str, expected: bool) -> None:
    assert serve_only_from_env({SIDECAR_ENV: raw}) is expected
    assert ControlSettings.from_env("m", environ={SIDECAR_ENV: raw}).serve_only is expected


def test_bad_sidecar_env_is_refused_naming_the_value() -> None:
    with pytest.raises(InvalidRequestError, match="EDITSERVE_SIDECAR.*'maybe'"):
        serve_only_from_env({SIDECAR_ENV: "maybe"})


def test_serve_only_flag_sets_the_environment() -> None:
    own, rest = split_args(["--serve-only", "--ledger", "postgresql:///x", "model-dir", "--port", "8001"])
    assert own == {"serve_only": "1", "ledger": "postgresql:///x"} and rest == ["model-dir", "--port", "8001"]
    assert ServeOptions(serve_only=True).environment() == {SIDECAR_ENV: "0"}
    assert SIDECAR_ENV not in ServeOptions().environment()
    with pytest.raises(InvalidRequestError, match="takes no value"):
        split_args(["--serve-only=1"])


def test_refusal_names_live_compute_replicas_only() -> None:
    rows = [{"replica_id": "a", "address": "10.0.0.5:50051", "live": True, "role": "compute"},
            {"replica_id": "c", "address": "10.0.0.7:50051", "live": False, "role": "compute"},
            {"replica_id": "d", "address": "10.0.0.8:50051", "live": True, "role": "serve-only"},
            {"replica_id": "b", "address": "10.0.0.6:50051", "live": True, "role": "compute"}]
    err = refusal("an edit", "b", rows)
    assert isinstance(err, ServeOnlyReplica)
    assert err.edit_replicas == ("a (10.0.0.5:50051)",)
    assert "replica b is serve-only" in str(err) and "a (10.0.0.5:50051)" in str(err)
    status = status_of(err)
    assert (status.grpc, status.http) == ("FAILED_PRECONDITION", 409)
    none = refusal("an edit", "b", [])
    assert none.edit_replicas == () and "no live replica with a sidecar" in str(none)


def test_fingerprint_is_the_sidecars() -> None:
    ckpt = embedded_checkpoint()
    assert checkpoint_fingerprint(None, "float32") == json.loads((ckpt / FINGERPRINT_FILE).read_text())["fingerprint"]


@pytest.mark.slow
def test_fingerprint_of_another_dtype_is_computed_like_the_sidecars() -> None:
    import torch

    from editserve.editing.model import fingerprint, load_model

    model, _ = load_model(None, dtype=torch.bfloat16)
    assert checkpoint_fingerprint(None, "bfloat16") == fingerprint(model)
