"""Head-word negatives for a gated edit's gate: do they shut it on the subject's last word in ordinary
prose, and what do they cost on paraphrases? (docs/lifelong.md, "Why the held-out perplexity rose past
1,000".)

A gate (editing/gated.fit_gate) is fit to the subject's MLP inputs at its last token against ordinary
corpus tokens. For "Dawa River" that last token is " River", and the gate also opens on "the river" in
prose (bench/gate_leaks.py). This fits each record's gate twice, gate only (no value is computed):

- today's fit;
- the same with the head word's inputs ("The river", "a river", "River", … in eight short templates,
  in the word's own, lower and capitalised forms) as a third negative group of weight share s, through
  fit_gate's guard group, for each ``--shares`` s;

and reports, with a(x) = silu(g·x)·(u·x) scaled to average 1 on the subject's own prompts as a gated edit
scales it: a on the record's paraphrases at the subject's last token (where a paraphrase must open the
gate to hold the edit), the largest a on the head-word templates, and ordinary statistics-corpus tokens
that the negatives never read with |a| > 0.05.

    PYTHONPATH=$PWD python bench/gate_headword.py --n 120

Default data: counterfact-train (the tuning split), the first --n records whose subject has two or
more words and ends in a word of letters.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/lifelong.py, also under `python -m`
from lifelong import SHARED  # noqa: E402  (the shared CounterFact files)

TRAIN = SHARED.parent / "counterfact-train.json"
TEMPLATES = ("The {w}", "the {w}", "A {w}", "a {w}", "{w}", "this {w}", "of the {w}", "and {w}")


@dataclass
class Tally:
    """One fit's measures over the records."""

    paraphrase: list[float] = field(default_factory=list)     # a at each paraphrase's subject
    headword: list[float] = field(default_factory=list)       # per record: the largest |a| on its templates
    leaks: list[int] = field(default_factory=list)            # per record: unread corpus tokens with |a| > 0.05

    def row(self, name: str) -> str:
        p, h = self.paraphrase, self.headword
        return (f"| {name} | {statistics.mean(p):.3f} / {sum(x >= 0.5 for x in p) / len(p):.3f} | "
                f"{statistics.mean(h):.3f} / {sum(x > 0.05 for x in h) / len(h):.3f} | {statistics.mean(self.leaks):.2f} |")


def headword_inputs(model, tok, layer: int, word: str) -> torch.Tensor:
    """[F, d]: the MLP inputs at `layer` at the last token of each template filled with `word`'s forms."""
    from editserve.editing.gated import mlp_inputs

    rows = []
    for form in dict.fromkeys([word, word.lower(), word.capitalize()]):
        for template in TEMPLATES:
            ids = tok(template.format(w=form), add_special_tokens=False)["input_ids"]
            rows.append(mlp_inputs(model, layer, torch.tensor(ids)[None])[-1])
    return torch.stack(rows)


def scaled_activation(g: torch.Tensor, pos: torch.Tensor):
    """a(x) of a gated edit with gate g on subject inputs `pos` [P, d], scaled to mean 1 on `pos`."""
    from editserve.editing.gated import activations, up_weights

    u, _ = up_weights(g, pos)
    return lambda x: activations(x, g[None], u[None])[..., 0]


def main() -> int:
    from editserve.editing import load_model
    from editserve.editing.corpus import load_corpus
    from editserve.editing.counterfact import load_counterfact
    from editserve.editing.gated import corpus_inputs, fit_gate, subject_inputs
    from editserve.editing.hparams import GateParams, PrefixParams
    from editserve.editing.model import fingerprint
    from editserve.editing.prefixes import context_prefixes
    from editserve.editing.requests import EditRequest

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=TRAIN, help="CounterFact file (default: counterfact-train)")
    ap.add_argument("--n", type=int, default=120, help="records")
    ap.add_argument("--shares", default="0.1,0.3,0.5", help="weight shares of the head-word group to try")
    args = ap.parse_args()
    params = GateParams()
    layer = params.layer
    model, tok = load_model()
    corpus = load_corpus()
    prefixes = context_prefixes(model, tok, fingerprint(model), PrefixParams())
    neg = corpus_inputs(model, tok, layer, corpus.text, params.negatives)
    # corpus_inputs reads at most 8 characters per token: text past that was never a negative
    unread = corpus_inputs(model, tok, layer, corpus.text[8 * params.negatives + 1000:], 8192)
    records = [r for r in load_counterfact(args.data)
               if len(r.request.subject.split()) >= 2 and r.request.subject.split()[-1].isalpha()][:args.n]
    shares = [float(s) for s in args.shares.split(",") if s]
    tallies = {"today's gate": Tally(), **{f"head-word share {s}": Tally() for s in shares}}
    for r in records:
        req = r.request
        pos = subject_inputs(model, tok, req, prefixes, layer)                          # [P, d]
        paras = [p.replace(req.subject, "{}", 1) for p in r.paraphrases if req.subject in p]
        para = [subject_inputs(model, tok, EditRequest(p, req.subject, " x"), (), layer) for p in paras]
        hw = headword_inputs(model, tok, layer, req.subject.split()[-1])
        gates = [fit_gate(pos, neg, params)] + [fit_gate(pos, neg, replace(params, guard=s), guarded=hw) for s in shares]
        for tally, g in zip(tallies.values(), gates):
            act = scaled_activation(g, pos)
            tally.paraphrase += [float(act(x)[0]) for x in para]
            tally.headword.append(float(act(hw).abs().max()))
            tally.leaks.append(int((act(unread).abs() > 0.05).sum()))
    print(f"{len(records)} records of {args.data.name} with multi-word subjects; {len(unread)} unread corpus tokens\n")
    print("| gate | paraphrase a: mean / share ≥ 0.5 | head-word templates, largest a: mean / share > 0.05 "
          "| unread corpus tokens with a > 0.05, per edit |\n|---|---|---|---|")
    for name, tally in tallies.items():
        print(tally.row(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
