"""The ``editserve`` command line as a new user meets it: the default token, one-line errors for
the usual mistakes, the leading-space warning, the gate table, and the ``serve`` options.

The remote commands run against a real gRPC control plane on loopback (tests/_cli_loopback.py:
`start_server` over a real ledger, no engine); the error paths run ``python -m editserve.cli`` as
a subprocess, so that what is checked is exactly what a terminal shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from editserve.cli import main as cli_main
from editserve.control.home import ensure_local_admin_token, local_admin_token
from tests._cli_loopback import LoopbackControl

ROOT = Path(__file__).resolve().parents[1]
TOKEN_ENVS = ("EDITSERVE_CONTROL_TOKEN", "EDITSERVE_CONTROL_TOKENS_FILE", "EDITSERVE_GRPC_TARGET")


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $EDITSERVE_HOME and no token in the environment."""
    h = tmp_path / "home"
    monkeypatch.setenv("EDITSERVE_HOME", str(h))
    for name in TOKEN_ENVS:
        monkeypatch.delenv(name, raising=False)
    return h


@pytest.fixture()
def server(home: Path, tmp_path: Path):
    """A control plane whose only token is the local admin token of `home` (what `editserve serve`
    creates when no token is configured)."""
    s = LoopbackControl(tmp_path, ensure_local_admin_token()).start()
    yield s
    s.stop()


def _cli(args: list[str], home: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in TOKEN_ENVS}
    base.update({"EDITSERVE_HOME": str(home), "PYTHONPATH": str(ROOT), **(env or {})})
    return subprocess.run([sys.executable, "-m", "editserve.cli", *args], cwd=cwd, env=base, capture_output=True,
                          text=True, timeout=120)


def test_remote_commands_use_the_local_admin_token_by_default(server: LoopbackControl, home: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert local_admin_token() is not None and (home / "control-tokens.json").stat().st_mode & 0o777 == 0o600
    assert cli_main(["status", "--server", server.target]) == 0
    out = capsys.readouterr().out
    assert "ledger head" in out and str(server.ledger.root) in out
    assert cli_main(["versions", "--server", server.target]) == 0
    assert "head = version 0" in capsys.readouterr().out
    # An explicit token wins over the local one: a wrong one is refused, with a hint on the same line.
    assert cli_main(["status", "--server", server.target, "--token", "not-a-token"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "UNAUTHENTICATED" in err[0] and "--token-file" in err[0]


def test_missing_token_file_is_a_one_line_error(home: Path, tmp_path: Path) -> None:
    r = _cli(["status", "--server", "127.0.0.1:1", "--token-file", str(tmp_path / "nope")], home, tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "--token-file" in lines[0] and "nope" in lines[0] and "no such file" in lines[0]
    empty = tmp_path / "empty"
    empty.write_text("\n")
    r = _cli(["status", "--token-file", str(empty)], home, tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "one token" in r.stderr


def test_no_token_anywhere_names_every_way_to_give_one(home: Path, tmp_path: Path) -> None:
    r = _cli(["versions"], home, tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for name in ("--token-file", "--token ", "EDITSERVE_CONTROL_TOKEN", "control-tokens.json"):
        assert name in lines[0], lines[0]


def test_a_server_that_is_not_there_is_a_one_line_error(home: Path, tmp_path: Path) -> None:
    from tests._cli_loopback import free_port

    r = _cli(["status", "--server", f"127.0.0.1:{free_port()}", "--token", "t"], home, tmp_path)
    assert r.returncode == 3 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "UNAVAILABLE" in lines[0] and "editserve serve" in lines[0]


def test_target_without_a_leading_space_gets_a_warning(server: LoopbackControl,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    edit = ["edit", "--server", server.target, "--prompt", "{} is located in the city of", "--subject",
            "The Eiffel Tower", "--no-progress"]
    cli_main([*edit, "--target-new", "Rome"])           # the engine-less server then refuses the edit itself
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if "warning" in line]
    assert len(warnings) == 1, err
    assert '"Rome"' in warnings[0] and '"ofRome"' in warnings[0] and '" Rome"' in warnings[0]
    cli_main([*edit, "--target-new", " Rome", "--target-true", " Paris"])
    assert not [line for line in capsys.readouterr().err.splitlines() if "warning" in line]


def _report(passed: bool):
    from editserve.control.gen import pb2

    def row(kind: str, nb: float, tb: float, na: float, ta: float) -> object:
        ok = (ta > na) if kind == "neighbourhood" else (na > ta)
        return pb2.ProbeRow(kind=kind, prompt=f"a {kind} prompt", target_new=" Rome", target_true=" Paris",
                            new_logprob_before=nb, true_logprob_before=tb, new_logprob_after=na,
                            true_logprob_after=ta, success=ok)

    rows = [row("efficacy", -9.0, -1.0, -0.5, -6.0),
            row("neighbourhood", -3.0, -1.0, -3.1, -1.1),      # right before, right after
            row("neighbourhood", -1.0, -4.0, -0.9, -4.2),      # wrong before, still wrong
            row("neighbourhood", -3.0, -1.0, -0.5, -2.0),      # right before, broken by the edit
            row("neighbourhood", -1.0, -2.0, -3.0, -1.0)]      # wrong before, right after
    return pb2.ProbeReport(passed=passed, efficacy=1.0, paraphrase=-1, neighbourhood_before=0.5,
                           neighbourhood_after=0.5, rows=rows)


def test_gate_table_judges_neighbours_against_before_and_quotes_targets() -> None:
    from editserve.commands.remote import _report_table

    table = _report_table(_report(passed=True))
    lines = table.splitlines()
    assert lines[0].startswith("probe gate: PASSED")
    body = {i: line for i, line in enumerate(lines[3:])}         # after the header line and its rule
    assert body[0].rstrip().endswith("yes") and '" Rome"' in body[0] and '" Paris"' in body[0]
    assert body[1].rstrip().endswith("yes")
    assert body[2].rstrip().endswith("was wrong before (unchanged)")
    assert body[3].rstrip().endswith("NO (broken by the edit)")
    assert body[4].rstrip().endswith("fixed by the edit")
    assert sum(line.rstrip().endswith(" NO") for line in lines) == 0


def test_serve_takes_grpc_addr_and_insecure() -> None:
    from editserve.commands.serve import HELP, split_args
    from editserve.engine.launch import ServeOptions
    from editserve.errors import InvalidRequestError

    own, rest = split_args(["--insecure", "--grpc-addr", "0.0.0.0:50051", "--ledger=/l", "m", "--port", "8000"])
    assert own == {"insecure": "1", "grpc_addr": "0.0.0.0:50051", "ledger": "/l"}
    assert rest == ["m", "--port", "8000"]
    with pytest.raises(InvalidRequestError, match="takes no value"):
        split_args(["--insecure=yes"])
    env = ServeOptions(grpc_addr="10.0.0.1:6000", insecure=True).environment()
    assert env == {"EDITSERVE_GRPC_ADDR": "10.0.0.1:6000", "EDITSERVE_GRPC_INSECURE": "1"}
    assert ServeOptions().environment() == {}
    assert "--grpc-addr" in HELP and "--insecure" in HELP


def test_serve_refuses_a_bad_grpc_addr(home: Path, tmp_path: Path) -> None:
    r = _cli(["serve", "--grpc-addr", "nowhere", "--port", "8000"], home, tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--grpc-addr must be HOST:PORT" in r.stderr


def test_status_lines_for_edit_health() -> None:
    """What `editserve status` prints for the retention probe's last run and the gate's bounds, from
    the Status message the server sends (built from the probe's status dict as the server does)."""
    from editserve.commands.remote import bounds_text, health_text
    from editserve.control.convert import _health_to_pb

    probe = {"enabled": True, "runs": 3, "last_error": None,
             "gate": {"sample_size": 16, "max_drop": 0.0, "max_perplexity_ratio": 1.05},
             "last": {"version": 7, "facts": 40, "sampled": 16, "held": 15, "ratio": 15 / 16, "at": 1.7e9,
                      "seconds": 2.5, "broken": [], "null_space": {"3": 0.25, "5": 0.4375},
                      "perplexity_ratio": 1.0421}}
    h = _health_to_pb(probe)
    assert (h.version, h.facts, h.sampled, h.held, h.retention_ratio, h.perplexity_ratio) == (7, 40, 16, 15, 0.9375,
                                                                                             1.0421)
    assert dict(h.null_space_taken) == {3: 0.25, 5: 0.4375} and h.max_perplexity_ratio == 1.05
    assert health_text(h) == ("version 7: 15 of 16 sampled facts hold (40 committed); held-out perplexity ×1.0421; "
                              "null space taken 44% at layer 5")
    assert bounds_text(h) == ("retention: 16 facts, max drop 0; damage: perplexity ≤ ×1.05, 84% of it spent at "
                              "version 7 (held-out text: packaged)")
    nothing = _health_to_pb({**probe, "last": {**probe["last"], "facts": 0, "sampled": 0, "held": 0, "ratio": None,
                                               "null_space": {}, "perplexity_ratio": None}})
    assert not nothing.HasField("retention_ratio") and not nothing.HasField("perplexity_ratio")
    assert health_text(nothing) == "version 7: no committed fact; held-out perplexity not measured"
    assert health_text(_health_to_pb({**probe, "last": None, "last_error": "SidecarError: dead"})) == \
        "no probe run yet (last error: SidecarError: dead)"
    assert health_text(_health_to_pb(None)) == "retention probe off"        # a serve-only replica
    off = _health_to_pb({**probe, "gate": {"sample_size": 0, "max_drop": 0.0, "max_perplexity_ratio": 0.0}})
    assert bounds_text(off) == "retention check off; damage bound off (held-out text: packaged)"
    assert "spent" not in bounds_text(_health_to_pb({**probe, "last": None}))     # nothing measured yet
    own = _health_to_pb({**probe, "heldout_text": "support-de.txt"})
    assert own.heldout_text == "support-de.txt" and bounds_text(own).endswith("(held-out text: support-de.txt)")


def test_status_line_for_the_statistics_warm_up() -> None:
    """What `editserve status` prints for the warm-up once the control plane reports it (the
    dict is `SidecarClient.statistics()`'s shape; the status message carries the same fields)."""
    from editserve.commands.remote import statistics_text

    building = {"state": "building", "fraction": 0.4, "layers": [1, 2, 3, 4, 5], "seconds": 21.7, "error": None}
    assert statistics_text(building) == "building for layers 1, 2, 3, 4, 5: 40% after 22 s"
    ready = {**building, "state": "ready", "fraction": 1.0, "seconds": 48.2}
    assert statistics_text(ready) == "ready for layers 1, 2, 3, 4, 5 (48 s)"
    failed = {**building, "state": "failed", "error": "DataError: corpus too short"}
    assert statistics_text(failed) == "failed for layers 1, 2, 3, 4, 5; DataError: corpus too short"
    assert statistics_text({"state": "off", "fraction": 0.0, "layers": [], "seconds": 0.0, "error": None}) == "off"
