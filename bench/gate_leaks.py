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

With ``--fluency`` it reads bench/lifelong.py's fluency measure instead: the greedy generations from the
fluency prompts (editing.lifelong.FLUENCY_PROMPTS, or one prompt per line of ``--prompts``). It prints
each prompt whose generation changes when the run's neurons are switched on, with its entropy both ways,
its share of the fluency ratio, the first token that differs, and the slot neurons open on the tokens
before it (the prompt and the generated tokens both versions share); then the fluency ratio with each
``--groups`` consecutive edits off.

    PYTHONPATH=$PWD python bench/gate_leaks.py <run> --fluency [--prompts FILE] [--groups 100]

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
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return [f for s in range(0, len(ids), seq_len)
            for f in firings_in(model, tok, layer, neurons, subjects, ids[s:s + seq_len], bound)]


def firings_in(model: torch.nn.Module, tok, layer: int, neurons: Sequence[int], subjects: Sequence[str],
               window: Sequence[int], bound: float) -> list[Firing]:
    """`firings` on one window of token ids, read as one sequence."""
    from editserve.editing.gated import activations, mlp_inputs

    mlp = _mlp(model, layer)
    idx = torch.tensor(list(neurons), dtype=torch.long)
    g = mlp.gate_proj.weight[idx].detach().float()                   # [E, d]
    u = mlp.up_proj.weight[idx].detach().float()                     # [E, d]
    x = mlp_inputs(model, layer, torch.tensor(list(window))[None])    # [T, d]
    a = activations(x, g, u)                                          # [T, E]
    return [Firing(k + 1, subjects[k], float(a[t, k]), tok.decode(window[max(0, t - 7): t + 1]))
            for t, k in (a.abs() > bound).nonzero().tolist()]


@dataclass(frozen=True)
class Generation:
    """One prompt's greedy continuation, as editing.evaluate's fluency generations are made."""

    prompt_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    text: str              # the decoded continuation (what the fluency measure reads)

    @property
    def entropy(self) -> float:
        from editserve.editing.evaluate import fluency

        return fluency([self.text])


def generate(model: torch.nn.Module, tok, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
    """Greedy generations from `prompts`, with the arguments of editing.evaluate's (`generation_fluency`)."""
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt")["input_ids"]
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
            out.append(Generation(tuple(ids[0].tolist()), tuple(gen.tolist()), tok.decode(gen, skip_special_tokens=True)))
    return out


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    """The first index at which `a` and `b` differ (the shorter length if one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def fluency_report(model: torch.nn.Module, tok, layer: int, neurons: Sequence[int], subjects: Sequence[str],
                   prompts: Sequence[str], bound: float, groups: Sequence[tuple[str, Sequence[int]]],
                   max_new_tokens: int) -> None:
    """Print which prompts' generations the run's neurons change and why, then the fluency ratio
    (mean entropy with neurons on / with every slot neuron off) with each of `groups` off."""
    with switched_off(model, layer, neurons):
        off = generate(model, tok, prompts, max_new_tokens)
    on = generate(model, tok, prompts, max_new_tokens)
    base = sum(g.entropy for g in off) / len(off)             # = editing.evaluate.fluency of the texts
    print(f"\nfluency with every slot neuron off (= unedited) {base:.4f}; with the run's neurons "
          f"×{sum(g.entropy for g in on) / len(on) / base:.4f}\n")
    print(f"| prompt | entropy off → on | share of the ratio | first different token (off → on) | "
          f"open before it (edit subject: a at the text ending there; |a| > {bound}) |\n|---|---|---|---|---|")
    opened: set[int] = set()
    for p, g_off, g_on in zip(prompts, off, on):
        if g_off.new_ids == g_on.new_ids:
            continue
        i = first_difference(g_off.new_ids, g_on.new_ids)
        shared = g_off.prompt_ids + g_off.new_ids[:i]          # the tokens both versions read before they part
        fired = firings_in(model, tok, layer, neurons, subjects, shared, bound)
        opened |= {f.edit for f in fired}
        parted = " → ".join(repr(tok.decode(g.new_ids[i:i + 1])) if i < len(g.new_ids) else "(end)"
                            for g in (g_off, g_on))
        print(f"| {p!r} | {g_off.entropy:.3f} → {g_on.entropy:.3f} | {(g_on.entropy - g_off.entropy) / len(off) / base:+.4f} "
              f"| {parted} after {tok.decode(shared[-6:])!r} | "
              + ("; ".join(f"{f.edit} {f.subject}: {f.activation:.2f} at {f.context!r}" for f in fired) or "none")
              + " |")
    print("\n| neurons | fluency ratio |\n|---|---|")
    print(f"| all the run's neurons | ×{sum(g.entropy for g in on) / len(on) / base:.4f} |")
    for name, off_now in [(f"the {len(opened)} open ones off", [neurons[e - 1] for e in sorted(opened)]), *groups]:
        with switched_off(model, layer, off_now):
            texts = generate(model, tok, prompts, max_new_tokens)
        print(f"| {name} | ×{sum(g.entropy for g in texts) / len(texts) / base:.4f} |", flush=True)


def main() -> int:
    from editserve.editing import load_model
    from editserve.editing.counterfact import load_counterfact
    from editserve.editing.lifelong import FLUENCY_PROMPTS, HELDOUT_TEXT, perplexity
    from editserve.editing.slots import widen_mlp

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a bench/lifelong.py run folder of gated edits (<out>/gated-b<batch>)")
    ap.add_argument("--text", type=Path, default=HELDOUT_TEXT, help="the text (default: the held-out text)")
    ap.add_argument("--bound", type=float, default=0.05, help="|a| above which a neuron counts as open")
    ap.add_argument("--groups", type=int, default=0, help="also switch off each this many consecutive edits")
    ap.add_argument("--fluency", action="store_true",
                    help="read the fluency prompts' greedy generations instead of a text's perplexity")
    ap.add_argument("--prompts", type=Path, help="with --fluency: one prompt per line (default: the benchmark's 40)")
    ap.add_argument("--max-new-tokens", type=int, help="with --fluency: tokens generated per prompt (default 50, "
                                                        "as the benchmark's)")
    args = ap.parse_args()
    if args.bound <= 0:
        ap.error(f"--bound must be positive, got {args.bound}")
    if args.groups < 0:
        ap.error(f"--groups must be 0 (none) or positive, got {args.groups}")
    if args.max_new_tokens is not None and not (args.fluency and args.max_new_tokens >= 1):
        ap.error(f"--max-new-tokens {args.max_new_tokens}: needs --fluency and must be at least 1")
    if args.prompts is not None and not (args.fluency and args.prompts.is_file()):
        ap.error(f"--prompts {args.prompts}: needs --fluency and an existing file")
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
    groups = [(f"edit {s + 1} off" if min(s + args.groups, done) == s + 1 else
               f"edits {s + 1}–{min(s + args.groups, done)} off", neurons[s:s + args.groups])
              for s in range(0, done, args.groups)] if args.groups > 0 else []
    if args.fluency:
        prompts = (tuple(line for line in args.prompts.read_text().splitlines() if line.strip())
                   if args.prompts else FLUENCY_PROMPTS)
        if not prompts:
            raise SystemExit(f"--prompts {args.prompts} holds no prompt")
        rows = json.loads(state.read_text()).get("rows") or []
        print(f"{args.run}: {done} gated edits at layer {layer}; {len(prompts)} fluency prompts, "
              f"{args.max_new_tokens or 50} new tokens each"
              + (f"; the run's last row: fluency ×{rows[-1]['fluency_ratio']:.4f} (against the unedited model)"
                 if rows else ""))
        fluency_report(model, tok, layer, neurons, subjects, prompts, args.bound, groups, args.max_new_tokens or 50)
        return 0
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
    cases += groups
    print(f"\nperplexity of the text {base:.3f} with every slot neuron off (= unedited); ratios to that:\n")
    print("| neurons | ppl ratio |\n|---|---|")
    for name, off in cases:
        with switched_off(model, layer, off):
            print(f"| {name} | ×{perplexity(model, tok, text) / base:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
