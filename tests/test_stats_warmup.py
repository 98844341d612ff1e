"""The covariance-statistics warm-up of the sidecar (editserve.engine.stats_warmup), on a real
sidecar process with the embedded SmolLM2 and a cold statistics cache.

The sidecar starts with a fresh ``$EDITSERVE_HOME`` that links the embedded checkpoint and the
default corpus from the usual home (so nothing is converted or downloaded) but has no statistics.
Checked: right after `Ready` the warm-up is ``building`` ROME's layer 5 and MEMIT's layers 1-5 in
one pass; a Probe (ScorePrompts) is answered while it builds; an edit sent meanwhile waits and says
so in a ``statistics`` progress stage, then loads the statistics instead of building them again;
the state ends ``ready`` with fraction 1; a restarted sidecar finds them in the cache.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from editserve.editing.corpus import DEFAULT_NAME, default_corpus
from editserve.editing.model import FINGERPRINT_FILE, embedded_checkpoint
from editserve.editing.requests import EditRequest
from editserve.engine.sidecar import ComputeEdit, SidecarClient, SidecarConfig
from editserve.engine.stats_warmup import StatisticsWarmup, read_state, state_path
from editserve.ledger import Ledger

pytestmark = pytest.mark.slow

EIFFEL = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new=" Rome",
                     target_true=" Paris")


@pytest.fixture(scope="module")
def cold_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(home, checkpoint): a home with the embedded model and the corpus linked in, no statistics."""
    ckpt = embedded_checkpoint()
    default_corpus()
    home = tmp_path_factory.mktemp("home")
    (home / "models").mkdir()
    (home / "models" / ckpt.name).symlink_to(ckpt, target_is_directory=True)
    corpora = ckpt.parents[1] / "corpora"
    assert (corpora / f"{DEFAULT_NAME}.txt").is_file()
    (home / "corpora").symlink_to(corpora, target_is_directory=True)
    return home, home / "models" / ckpt.name


def _stats_files(home: Path) -> list[Path]:
    return sorted((home / "stats").rglob("*.safetensors")) if (home / "stats").exists() else []


def _projection_files(home: Path) -> list[Path]:
    return sorted((home / "nullspace").rglob("*.safetensors")) if (home / "nullspace").exists() else []


def test_warmup_builds_once_while_the_sidecar_answers(cold_home: tuple[Path, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    home, ckpt = cold_home
    monkeypatch.delenv("EDITSERVE_WARM_STATISTICS", raising=False)
    fp = json.loads((ckpt / FINGERPRINT_FILE).read_text())["fingerprint"]
    Ledger.open(tmp_path / "ledger", fp).close()
    client = SidecarClient(SidecarConfig(checkpoint=str(ckpt), device="cpu", threads=1, editserve_home=str(home)))
    try:
        client.wait_ready()
        # every method's context prefixes were sampled from the unedited model before `Ready`, into
        # the cache: one list, ROME's 10, whose first 5 are AlphaEdit's and MEMIT's
        prefixes = sorted((home / "prefixes").glob("*.json"))
        assert [f.name.split("-", 1)[1] for f in prefixes] == ["n10-t10-s0.json"], prefixes
        prefix_mtime = prefixes[0].stat().st_mtime_ns
        st = client.statistics()
        assert st["state"] == "building" and st["layers"] == [1, 2, 3, 4, 5], st
        assert 0.0 <= st["fraction"] < 1.0 and st["error"] is None
        client.open_ledger(str(tmp_path / "ledger"))
        # The request loop is not held by the warm-up: a probe is answered while it builds.
        scored = client.score(0, (("The Eiffel Tower is located in the city of", " Paris", " Rome"),))
        assert scored.rows and client.statistics()["state"] == "building"
        # Progress moves and is readable at any time without the pipe.
        seen = []
        deadline = time.monotonic() + 600
        while client.statistics()["fraction"] <= 0.0 and time.monotonic() < deadline:
            time.sleep(1)
        seen.append(client.statistics())
        assert seen[-1]["state"] == "building" and 0 < seen[-1]["fraction"] < 1, seen
        assert "building covariance statistics for layers 1-5" in seen[-1]["message"]
        # An edit that needs layer 5 waits for the warm-up and says so, then reuses its statistics.
        stages: list[tuple[str, float, str]] = []
        out = client.compute(ComputeEdit(version=0, requests=(EIFFEL,), method="rome", store_bases=False,
                                         hparams={"value": {"max_steps": 3}}),
                             on_progress=lambda p: stages.append((p.stage, p.fraction, p.message)))
        waits = [s for s in stages if s[0] == "statistics"]
        assert waits, stages
        # the ROME edit read its prefixes from the cache (none sampled on the edit, none written)
        assert sorted((home / "prefixes").glob("*.json")) == prefixes
        assert prefixes[0].stat().st_mtime_ns == prefix_mtime
        assert any("building covariance statistics for layers 1-5:" in m for _, _, m in waits), waits
        assert all(0.0 <= f <= 0.05 for _, f, _ in waits)
        assert waits[-1][2] == "covariance statistics ready"
        assert stages.index(waits[-1]) < next(i for i, s in enumerate(stages) if s[0] == "compute")
        done = client.statistics()
        assert done["state"] == "ready" and done["fraction"] == 1.0 and done["error"] is None, done
        assert done["layers"] == [1, 2, 3, 4, 5] and done["seconds"] > 0
        # Built once: one cache file per layer, and the edit loaded them (far faster than building).
        files = _stats_files(home)
        assert sorted(int(f.name.split("-L")[1].split("-")[0]) for f in files) == [1, 2, 3, 4, 5], files
        stats_s = out.probe_report["compute_seconds"]["stats"]
        assert stats_s < 0.25 * done["seconds"], (stats_s, done["seconds"])
        # AlphaEdit's null-space projections of its layers were built from them too (its first edit loads them)
        projections = _projection_files(home)
        assert sorted(int(f.name.split("-L")[1].split("-")[0]) for f in projections) == [1, 2, 3, 4, 5], projections
        assert all(f.name.endswith("-t0.01.safetensors") for f in projections), projections
        mtimes = {f: f.stat().st_mtime_ns for f in files + projections}
        print(f"\nwarm-up {done['seconds']:.1f} s; edit's statistics step {stats_s:.2f} s; "
              f"{len(waits)} 'statistics' progress messages")
    finally:
        client.close()
    assert not state_path(client.pid, home).exists()            # the state file goes with the process
    assert read_state(state_path(client.pid, home), alive=False)["state"] == "failed"
    # A restarted sidecar finds every layer in the cache and builds nothing.
    again = SidecarClient(SidecarConfig(checkpoint=str(ckpt), device="cpu", threads=1, editserve_home=str(home)))
    try:
        again.wait_ready()
        deadline = time.monotonic() + 300
        while again.statistics()["state"] == "building" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert again.statistics()["state"] == "ready"
        assert {f: f.stat().st_mtime_ns for f in _stats_files(home) + _projection_files(home)} == mtimes
    finally:
        again.close()


def test_warmup_off_and_plan_from_the_hparams_files(cold_home: tuple[Path, Path], tmp_path: Path) -> None:
    """EDITSERVE_WARM_STATISTICS=0 publishes ``off`` and starts nothing; otherwise the plan is the
    union of the methods' default layers, grouped by statistics parameters."""
    from editserve.editing import load_model
    from editserve.editing.hparams import StatsParams

    _home, ckpt = cold_home
    model, tok = load_model(str(ckpt))
    off_file = tmp_path / "off.json"
    off = StatisticsWarmup(model, tok, "f" * 64, str(ckpt), off_file, environ={"EDITSERVE_WARM_STATISTICS": "0"})
    off.start()
    assert off.plan == {} and off.projections == () and off.state.state == "off"
    assert json.loads(off_file.read_text())["state"] == "off"
    assert not off.covers((5,), StatsParams())
    on = StatisticsWarmup(model, tok, "f" * 64, str(ckpt), None, environ={})
    assert on.plan == {StatsParams(): (1, 2, 3, 4, 5)} and on.layers == (1, 2, 3, 4, 5)
    assert on.projections == ((StatsParams(), 0.01, (1, 2, 3, 4, 5)),)      # AlphaEdit's SmolLM2 defaults
    assert on.covers((5,), StatsParams()) and on.covers((5, 20), StatsParams())
    assert not on.covers((20,), StatsParams()) and not on.covers((5,), StatsParams(n_tokens=5000))


def test_state_files_of_dead_sidecars_are_pruned(tmp_path: Path) -> None:
    """A killed sidecar leaves its state file; the next sidecar removes it, and the parent reads a
    dead sidecar's ``building`` as ``failed``."""
    import subprocess
    import sys

    from editserve.engine.stats_warmup import prune_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = state_path(dead.pid, tmp_path)
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"state": "building", "fraction": 0.3, "layers": [5], "seconds": 1.0,
                                 "error": None}))
    assert read_state(stale, alive=False)["state"] == "failed"
    mine = state_path(os.getpid(), tmp_path)
    mine.write_text(json.dumps({"state": "ready"}))
    assert prune_stale(stale.parent) == [stale]
    assert not stale.exists() and mine.exists()


def test_truncated_copy_gives_the_full_models_statistics_bit_for_bit(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The warm-up computes on the first L+1 blocks of the base checkpoint; the statistics must be
    exactly those the full model gives (an edit loads them in place of computing its own)."""
    import torch

    from editserve.editing.corpus import Corpus
    from editserve.editing.hparams import StatsParams
    from editserve.editing.stats import layer_stats
    from tests.tiny import TEXT, tiny_model, tiny_tokenizer

    monkeypatch.setenv("EDITSERVE_HOME", str(tmp_path / "home"))
    model, tok = tiny_model("llama", n_layers=4), tiny_tokenizer()
    ckpt = tmp_path / "tiny-llama"
    model.save_pretrained(str(ckpt))
    tok.save_pretrained(str(ckpt))
    corpus = Corpus("tiny", "\n".join(TEXT * 20))
    params = StatsParams(n_tokens=512, seq_len=64, batch_size=3)
    full, _ = layer_stats(model, tok, (1, 2), corpus, "a" * 64, params, progress=False)
    warm = StatisticsWarmup(model, tok, "b" * 64, str(ckpt), None, environ={"EDITSERVE_WARM_STATISTICS": "0"})
    short = warm._truncated(3)
    assert sum(1 for _ in short.model.layers) == 3
    cut, _ = layer_stats(short, tok, (1, 2), corpus, "b" * 64, params, progress=False)
    for layer in (1, 2):
        assert torch.equal(full[layer].cov, cut[layer].cov), layer
