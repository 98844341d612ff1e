"""`bench/lifelong.py --runs`: one table and plot of saved runs, computing nothing. It reads this benchmark's
run folders, bench/gated.py's, and the recorded rows kept in bench/recorded/lifelong/ (runs whose folders did
not survive). Run as a user runs it, as a subprocess, on the committed files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "recorded" / "lifelong"


def _runs(tmp_path: Path, *specs: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "lifelong.py"), "--runs", *specs,
                           "--plot", str(tmp_path / "curves.png")],
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)


def _table_row(out: str, label: str, edits: int) -> list[str]:
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == [label, str(edits)]:
            return cells
    raise AssertionError(f"no row {label!r} at {edits} in:\n{out}")


def test_recorded_and_saved_runs_in_one_table_and_plot(tmp_path: Path) -> None:
    # a run folder of this benchmark, beside the committed files
    folder = tmp_path / "gated-b100"
    folder.mkdir()
    rows = json.loads((RESULTS / "gated-b100.json").read_text())["rows"]
    (folder / "state.json").write_text(json.dumps({"done": rows[-1]["n_edits"], "rows": rows}))
    result = _runs(tmp_path, f"gated={RESULTS / 'gated-b1.json'}", f"batches={folder}",
                   f"MEMIT={RESULTS / 'memit-b1.json'}", f"ROME={RESULTS / 'rome-b1.json'}")
    assert result.returncode == 0, result.stderr
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    # bench/gated.py's rows: "n" is the edit count, its gate statistics are left out, and a gated edit
    # leaves the layer's own neurons unchanged (norm growth 0)
    gated = _table_row(result.stdout, "gated", 1000)
    assert gated[2:8] == ["0.962", "0.856", "0.952", "1.004", "1.015", "0.0000"]
    assert _table_row(result.stdout, "batches", rows[-1]["n_edits"])[2] == f"{rows[-1]['es']:.3f}"
    # a recorded row keeps what was recorded; what was not is NaN, not 0
    memit = _table_row(result.stdout, "MEMIT", 800)
    assert memit[2:8] == ["0.644", "0.630", "0.707", "7.889", "0.794", "0.9300"]
    assert _table_row(result.stdout, "MEMIT", 100)[6:8] == ["nan", "nan"]
    assert _table_row(result.stdout, "ROME", 300)[5] == "2.414"


def test_every_recorded_file_names_its_source_and_loads() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from lifelong import saved_row
    finally:
        sys.path.remove(str(ROOT / "bench"))
    files = sorted(RESULTS.glob("*.json"))
    assert {f.stem for f in files} >= {"gated-b1", "gated-b100", "alphaedit-c25", "rome-b1", "memit-b1"}
    for f in files:
        saved = json.loads(f.read_text())
        assert len(saved["source"]) > 40, f
        loaded = [saved_row(r) for r in saved["rows"]]
        counts = [r.n_edits for r in loaded]
        assert counts == sorted(set(counts)) and counts[0] == 100, f
        assert all(0 <= r.es <= 1 and not math.isnan(r.ppl_ratio) for r in loaded), f


def test_a_bad_spec_is_refused_by_name(tmp_path: Path) -> None:
    result = _runs(tmp_path, f"x={tmp_path / 'missing'}")
    assert result.returncode != 0
    assert "missing" in result.stderr and "LABEL=DIR" in result.stderr
