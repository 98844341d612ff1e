"""`bench/gate_leaks.py`: which gated edits of a bench/lifelong.py run open on ordinary text, and the
text's perplexity with them switched off. The run folder holds two gated edits on SmolLM2 (known
CounterFact records whose subject ends in a common noun), committed and saved by the benchmark's own
functions (bench/lifelong.py's `commit` and `_save`; running the benchmark itself would also generate
its 40 fluency texts twice). The tool then reads it as a user runs it, as a subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COUNTERFACT = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"
CASES = (2115, 1094)          # "Dawa River, in" → Malta; "Coomera River can be found in" → Montreal
TEXT = ("Fishermen waited by the river all morning, and in the afternoon the children swam where the river "
        "was shallow. Their grandmother sold bread in the town square.\n")


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/gate_leaks.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                                            "HOME": str(Path.home())})


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    if not COUNTERFACT.is_file():
        pytest.skip(f"{COUNTERFACT} is not here")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from lifelong import _save
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from editserve.editing import load_model
    from editserve.editing.alphaedit import PreservedKeys
    from editserve.editing.corpus import load_corpus
    from editserve.editing.counterfact import load_counterfact
    from editserve.editing.lifelong import commit
    from editserve.editing.slots import widen_mlp

    out = tmp_path_factory.mktemp("lifelong")
    by_id = {r.case_id: r for r in load_counterfact(COUNTERFACT)}
    (out / "stream.json").write_text(json.dumps({"data": str(COUNTERFACT), "case_ids": list(CASES)}))
    model, tok = load_model()
    widen_mlp(model, 5, 4)
    corpus, touched = load_corpus(), set()
    for case in CASES:                                   # one commit each, as `--batch 1` does
        touched |= set(commit(model, tok, [by_id[case].request], "gated", PreservedKeys(), corpus).patch.weight_names)
    run = out / "gated-b1"
    run.mkdir()
    _save(run, model, touched, PreservedKeys(), [], len(CASES), 0.0, {"neuron_slots": {"5": 4}})
    return run


def _ratios(stdout: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| (.+?) \| ×([0-9.]+) \|$", stdout, re.M)}


def test_lists_the_edits_open_on_the_text_and_their_perplexity_cost(run_folder: Path, tmp_path: Path) -> None:
    text = tmp_path / "river.txt"
    text.write_text(TEXT)
    result = _tool(str(run_folder), "--text", str(text), "--groups", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # both gates were fit to "… River" and open on the common noun "river" in prose that names neither
    rows = re.findall(r"^\| (\d+) \| (.+?) \| (-?[0-9.]+) \| (.+) \|$", out, re.M)
    opened = {(int(e), s) for e, s, a, ctx in rows if ctx.rstrip("'\"").endswith(" river")}
    assert opened == {(1, "Dawa River"), (2, "Coomera River")}, out
    assert all(float(a) > 0.05 for _, _, a, _ in rows)
    ratios = _ratios(out)
    # every neuron is open, so switching the open ones off is the unedited model exactly: the
    # weights the tool zeroes and restores come back bit for bit (all-on is measured after an all-off)
    assert ratios["the 2 open ones off"] == 1.0
    assert ratios["all the run's neurons"] != 1.0
    assert set(ratios) == {"all the run's neurons", "the 2 open ones off", "edit 1 off", "edit 2 off"}


def test_a_folder_that_is_not_a_run_is_refused_by_name(tmp_path: Path) -> None:
    result = _tool(str(tmp_path / "nothing-here"))
    assert result.returncode != 0
    assert "nothing-here is not a bench/lifelong.py run folder" in result.stderr


PROMPTS = ("Fishermen waited by the river and", "The children swam in the river because", "My favourite food is")


def test_fluency_names_the_prompts_the_edits_change_and_what_opened_before(run_folder: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    result = _tool(str(run_folder), "--fluency", "--prompts", str(prompts), "--max-new-tokens", "20", "--groups", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "3 fluency prompts, 20 new tokens each" in out, out
    overall = float(re.search(r"with the run's neurons ×([0-9.]+)", out).group(1))
    changed = re.findall(r"^\| '(.+?)' \| ([0-9.]+) → ([0-9.]+) \| ([+-][0-9.]+) \| (.+) \| (.+) \|$", out, re.M)
    # the river prompts part from the unedited generation, after a river gate opened on " river"
    assert {p for p, *_ in changed} >= set(PROMPTS[:2]), out
    for prompt, _, _, _, _, opened in changed:
        if "river" in prompt:
            assert re.search(r"\b[12] (Dawa|Coomera) River: [0-9.]+ at '[^']* river'", opened), (prompt, opened)
    # each changed prompt's share is its entropy change over the prompt count and the base: they sum to the ratio
    assert abs(sum(float(s) for *_, s, _, _ in changed) - (overall - 1)) < 3e-4, out
    ratios = _ratios(out)
    assert ratios["all the run's neurons"] == overall
    assert ratios["the 2 open ones off"] == 1.0                        # every neuron off: the unedited texts, bit for bit
    assert {"edit 1 off", "edit 2 off"} <= set(ratios)


def test_fluency_options_are_checked_by_name(run_folder: Path, tmp_path: Path) -> None:
    for args, named in (((str(run_folder), "--prompts", str(tmp_path / "missing.txt")), "--prompts"),
                        ((str(run_folder), "--fluency", "--max-new-tokens", "0"), "--max-new-tokens 0: needs --fluency"),
                        ((str(run_folder), "--max-new-tokens", "20"), "--max-new-tokens 20: needs --fluency"),
                        ((str(run_folder), "--groups", "-1"), "--groups must be 0")):
        result = _tool(*args)
        assert result.returncode != 0 and named in result.stderr, (args, result.stderr[-2000:])
