"""Which gated edits open on ordinary text, and what that costs in its perplexity.

A gated edit's neuron (editing/gated.py) should fire only on its subject. Its gate is fit against a
sample of statistics-corpus tokens, so a word that sample holds rarely can still open it: a subject
whose last word is a common noun ("Dawa River", "Boston Market") opens on "the river" or "the weekly
market" in ordinary prose, and the layer's output there moves by that edit's value. This reads a
bench/lifelong.py run folder of gated edits (one run with ``--neuron-slots``) and prints

- every token of a text at which a slot neuron's activation |a| exceeds ``--bound``, with the edit's
  number in the run, its subject and the text before the token;
- the text's perplexity, as a ratio to the same model with every slot neuron switched off (which is
  the unedited model up to float rounding), with all the run's neurons, with the firing ones off, and
  with each ``--groups`` consecutive edits off.

    PYTHONPATH=$PWD python bench/gate_leaks.py bench/results/lifelong/gated-b100 [--text FILE] [--bound 0.05] [--groups 100]

The default text is the held-out text of bench/lifelong.py's perplexity (editserve/data/heldout.txt).
A bench run frees no slot and slots are taken lowest first (editing.slots.free_slots), so the k-th
occupied slot holds the run's k-th edit; the subjects come from the run's stream (``<run>/../stream.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/lifelong.py, also under `python -m`
from lifelong import load_run  # noqa: E402  (the lifelong benchmark's run folders)


@dataclass(frozen=True)
class Firing:
    """One token of the text at which a slot neuron is open."""

    edit: int              # 1-based: the run's edit held by the neuron
    subject: str
    activation: float      # a(x) at the token (1 on the edit's subject, on average)
    context: str           # the text up to and including the token


def _mlp(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    from editserve.editing.arch import get_module, spec_for

    return get_module(model, spec_for(model).mlp_name(layer))


def occupied_slots(model: torch.nn.Module, layer: int) -> list[int]:
    """The slot neurons of `layer` that hold an edit (a nonzero gate, up or down weight), lowest first."""
    from editserve.editing.slots import slot_range

    rng = slot_range(model, layer)
    mlp = _mlp(model, layer)
    held = (mlp.gate_proj.weight[rng.start:rng.stop].any(1) | mlp.up_proj.weight[rng.start:rng.stop].any(1)
            | mlp.down_proj.weight[:, rng.start:rng.stop].any(0))                      # [E]
    return [rng.start + int(i) for i in held.nonzero().flatten()]


@contextlib.contextmanager
def switched_off(model: torch.nn.Module, layer: int, neurons: Sequence[int]) -> Iterator[None]:
    """Within, the slot `neurons` of `layer` are zero (a zero SwiGLU neuron adds nothing); their
    weights are restored from copies on exit, bit for bit."""
    mlp = _mlp(model, layer)
    idx = torch.tensor(sorted(neurons), dtype=torch.long)
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    saved = (gate[idx].clone(), up[idx].clone(), down[:, idx].clone())
    try:
        with torch.no_grad():
            gate[idx] = 0
            up[idx] = 0
            down[:, idx] = 0
        yield
    finally:
        with torch.no_grad():
            gate[idx], up[idx], down[:, idx] = saved


def firings(model: torch.nn.Module, tok, layer: int, neurons: Sequence[int], subjects: Sequence[str], text: str,
            bound: float, seq_len: int = 256) -> list[Firing]:
    """Every token of `text` (read in windows of `seq_len` tokens, as editing.lifelong.perplexity reads
    it) at which the slot neuron `neurons[k]` (edit k+1, `subjects[k]`) has |a| > bound."""
    from editserve.editing.gated import activations, mlp_inputs

    ids = tok(text, add_special_tokens=False)["input_ids"]
    mlp = _mlp(model, layer)
    idx = torch.tensor(list(neurons), dtype=torch.long)
    g = mlp.gate_proj.weight[idx].detach().float()                   # [E, d]
    u = mlp.up_proj.weight[idx].detach().float()                     # [E, d]
    out = []
    for s in range(0, len(ids), seq_len):
        window = ids[s:s + seq_len]
        x = mlp_inputs(model, layer, torch.tensor(window)[None])      # [T, d]
        a = activations(x, g, u)                                      # [T, E]
        for t, k in (a.abs() > bound).nonzero().tolist():
            out.append(Firing(k + 1, subjects[k], float(a[t, k]), tok.decode(window[max(0, t - 7): t + 1])))
    return out


def main() -> int:
    from editserve.editing import load_model
    from editserve.editing.counterfact import load_counterfact
    from editserve.editing.lifelong import HELDOUT_TEXT, perplexity
    from editserve.editing.slots import widen_mlp

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a bench/lifelong.py run folder of gated edits (<out>/gated-b<batch>)")
    ap.add_argument("--text", type=Path, default=HELDOUT_TEXT, help="the text (default: the held-out text)")
    ap.add_argument("--bound", type=float, default=0.05, help="|a| above which a neuron counts as open")
    ap.add_argument("--groups", type=int, default=0, help="also switch off each this many consecutive edits")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("editserve").setLevel(logging.WARNING)
    state, stream_path = args.run / "state.json", args.run.parent / "stream.json"
    if not state.is_file() or not stream_path.is_file():
        raise SystemExit(f"{args.run} is not a bench/lifelong.py run folder ({state} and {stream_path} are needed)")
    slots = json.loads(state.read_text()).get("neuron_slots")
    if not slots:
        raise SystemExit(f"{args.run} has no neuron slots (its run was not made with --neuron-slots): no gated edits")
    if len(slots) != 1:
        raise SystemExit(f"{args.run} has slots at layers {sorted(slots)}; this reads one gated layer")
    (layer, count), = ((int(k), int(v)) for k, v in slots.items())
    stream = json.loads(stream_path.read_text())
    subject_of = {r.case_id: r.request.subject for r in load_counterfact(stream["data"])}   # either file format

    model, tok = load_model()
    widen_mlp(model, layer, count)
    done = load_run(args.run, model)[0]
    neurons = occupied_slots(model, layer)
    if len(neurons) != done:
        raise SystemExit(f"{args.run}: {len(neurons)} occupied slots for {done} edits; slots were freed or reused, "
                         "so slot order is not edit order")
    subjects = [subject_of[c] for c in stream["case_ids"][:done]]
    text = args.text.read_text()

    fired = firings(model, tok, layer, neurons, subjects, text, args.bound)
    print(f"{args.run}: {done} gated edits at layer {layer}; {args.text} "
          f"({len(tok(text, add_special_tokens=False)['input_ids'])} tokens)\n")
    print(f"| edit | subject | a | text up to the token (|a| > {args.bound}) |\n|---|---|---|---|")
    for f in fired:
        print(f"| {f.edit} | {f.subject} | {f.activation:.3f} | {f.context!r} |")
    open_edits = sorted({f.edit for f in fired})

    with switched_off(model, layer, neurons):
        base = perplexity(model, tok, text)
    cases: list[tuple[str, list[int]]] = [("all the run's neurons", []),
                                          (f"the {len(open_edits)} open ones off", [neurons[e - 1] for e in open_edits])]
    if args.groups > 0:
        cases += [(f"edit {s + 1} off" if min(s + args.groups, done) == s + 1 else
                   f"edits {s + 1}–{min(s + args.groups, done)} off", neurons[s:s + args.groups])
                  for s in range(0, done, args.groups)]
    print(f"\nperplexity of the text {base:.3f} with every slot neuron off (= unedited); ratios to that:\n")
    print("| neurons | ppl ratio |\n|---|---|")
    for name, off in cases:
        with switched_off(model, layer, off):
            print(f"| {name} | ×{perplexity(model, tok, text) / base:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
