"""How large the value δ is, and what its size buys: ‖δ‖ and δ-level efficacy / paraphrase success per setting.

A long ledger's held-out damage grows with each edit's ‖δ‖² (docs/lifelong.md, "Session 20: the floor"):
the least penalty of writing δ at a key k is ‖δ‖² / Σ_l kᵀC⁻¹k. This prints, for value-optimisation settings
(`editing.hparams.ValueParams` overrides on the default method's parameters), each δ's size relative to the
unedited output (‖δ‖/‖h‖, and the mean of its square, which the damage follows) and what that δ does on its
own: added at the residual stream after the top edit layer, at the subject's last token of the edit's
prompt (ES_δ) and of each CounterFact paraphrase prompt (PS_δ), new target against true target — before
any weight solve (which realises δ only in part), so a fast proxy for the paraphrase generalisation a
setting can reach. ``--scales`` also scores each δ multiplied by those factors.

Records: the first `--records` records of `--data` that the unedited model knows (its greedy answer is the
true object on the prompt; CounterFact's ES = 0 before the edit), each optimised on the clean model.

    PYTHONPATH=$PWD python bench/value_size.py --records 20 --scales 0.5,0.75,1 \
        --data ../shared/data/counterfact/counterfact-train.json \
        --setting 'default={}' --setting 'slow={"lr": 0.05, "max_steps": 150, "clamp_norm_factor": 0.5}'
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "counterfact" / "counterfact-train.json"


def _setting(text: str) -> tuple[str, dict]:
    name, _, body = text.partition("=")
    over = json.loads(body or "{}")
    if not name or not isinstance(over, dict):
        raise SystemExit(f"--setting takes NAME=JSON-object, got {text!r}")
    return name, over


def _known(model, tok, data: Path, n: int) -> list:
    """The first `n` records of `data` whose true object the unedited model gives (ES 0 before the edit)."""
    from editserve.editing.counterfact import load_counterfact
    from editserve.editing.evaluate import known_records

    found = known_records(model, tok, load_counterfact(data), n)
    if len(found.records) < n:
        raise SystemExit(f"{data} holds only {len(found.records)} known records, {n} asked")
    return list(found.records)


class DeltaProbe:
    """Mean log-probability of a target after a prompt, with δ [d] added to `module`'s output at the
    subject's last token (no weight change)."""

    def __init__(self, model, tok, module: str) -> None:
        self.model, self.tok, self.module = model, tok, module

    def logprob(self, text: str, subject_end: int, target: str, delta: torch.Tensor | None) -> float:
        from editserve.editing.hooks import Hooks
        from editserve.editing.prompts import subject_last_index, target_ids

        ids, idx = subject_last_index(self.tok, text, subject_end)
        tgt = target_ids(self.tok, target)
        x = torch.tensor([ids + tgt[:-1]])                                        # [1, T]

        def add(out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[0, idx] += delta
            return out

        with torch.no_grad(), Hooks(self.model) as hooks:
            if delta is not None:
                hooks.edit_output(self.module, add)
            logp = torch.log_softmax(self.model(input_ids=x).logits[0].float(), -1)  # [T, vocab]
        return sum(logp[len(ids) - 1 + j, t].item() for j, t in enumerate(tgt)) / len(tgt)

    def wins(self, text: str, subject_end: int, new: str, true: str, delta: torch.Tensor | None) -> bool:
        return self.logprob(text, subject_end, new, delta) > self.logprob(text, subject_end, true, delta)


def success(probe: DeltaProbe, records: list, deltas: list) -> tuple[float, float]:
    """(ES_δ, PS_δ) over `records` with their δ (None: unedited)."""
    es, ps, n_ps = 0, 0, 0
    for rec, d in zip(records, deltas):
        q = rec.request
        es += probe.wins(q.text, q.prompt.index("{}") + len(q.subject), q.target_new, q.target_true, d)
        for p in rec.paraphrases:
            at = p.rfind(q.subject)
            if at >= 0:                                                            # paraphrases name the subject
                ps += probe.wins(p, at + len(q.subject), q.target_new, q.target_true, d)
                n_ps += 1
    return es / len(records), ps / max(n_ps, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--records", type=int, default=20)
    ap.add_argument("--method", default="alphaedit", choices=["alphaedit", "memit"])
    ap.add_argument("--setting", action="append", type=_setting, default=None,
                    help="NAME=JSON overrides of the value parameters (repeatable; default: the method's own)")
    ap.add_argument("--scales", default="1", help="also score each δ times these factors, e.g. 0.5,0.75,1")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from editserve.editing.arch import spec_for
    from editserve.editing.edit import resolve_hparams
    from editserve.editing.model import fingerprint, load_model
    from editserve.editing.prefixes import context_prefixes
    from editserve.editing.values import optimise_values

    model, tok = load_model()
    hp = resolve_hparams(model, args.method)
    top_layer = hp.layers[-1]
    module = spec_for(model).layer_name(top_layer)                               # MEMIT/AlphaEdit's δ: block output
    prefixes = context_prefixes(model, tok, fingerprint(model), hp.prefixes)
    records = _known(model, tok, args.data, args.records)
    probe = DeltaProbe(model, tok, module)
    scales = [float(s) for s in args.scales.split(",")]

    es0, ps0 = success(probe, records, [None] * len(records))
    print(f"{len(records)} known records of {args.data.name}; {args.method} value parameters, δ at {module}")
    print(f"unedited: ES_δ {es0:.3f}, PS_δ {ps0:.3f}\n")
    print("| setting | × | steps | reached the NLL stop | ‖δ‖/‖h‖ mean (min–max) | mean (‖δ‖/‖h‖)² | ES_δ | PS_δ | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, over in args.setting or [("default", {})]:
        params = resolve_hparams(model, args.method, None, {"value": over}).value     # checked like an API override
        t = time.perf_counter()
        res = optimise_values(model, tok, [r.request for r in records], prefixes, module, params,
                              frozen_below=top_layer)
        seconds = time.perf_counter() - t
        h = res.init_output.norm(dim=-1)                                          # [n]
        reached = float((res.final_nll < params.early_stop_nll).float().mean())
        for s in scales:
            ratio = (res.delta * s).norm(dim=-1) / h                              # [n]
            es, ps = success(probe, records, list(res.delta * s))
            print(f"| {name} | {s:g} | {res.steps} | {reached:.2f} | {ratio.mean():.3f} ({ratio.min():.2f}–{ratio.max():.2f}) "
                  f"| {(ratio ** 2).mean():.3f} | {es:.3f} | {ps:.3f} | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
