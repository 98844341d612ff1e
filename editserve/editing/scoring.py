"""Scoring continuations: mean per-token NLL of a target after a prompt, batched, whether the
model answers it greedily (`target_scores`), and what a probe prompt's outcome means
(`fact_success`).

Right-padded batches through the model body; the LM head runs only at the positions that
predict target tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from editserve.editing.arch import get_module, spec_for
from editserve.editing.prompts import mean_per_sequence, target_ids


PROBE_KINDS = ("efficacy", "paraphrase", "neighbourhood")


def fact_success(kind: str, new_logprob: float, true_logprob: float) -> bool:
    """The one meaning of a probe prompt's outcome, shared by the probe gate
    (editserve/control/probe.py), the sidecar's edit report (editserve/engine/sidecar/process.py) and the
    CounterFact evaluation (editserve/editing/evaluate.py, vectorised there): with the mean
    per-token log-probabilities of the new and the true target after the edit, an efficacy or
    paraphrase prompt succeeds when the new target is the more likely one, a neighbourhood prompt
    when the true one still is. "Efficacy" is the fraction of successful efficacy prompts."""
    if kind not in PROBE_KINDS:
        raise ValueError(f"unknown probe kind {kind!r}; one of {PROBE_KINDS}")
    return true_logprob > new_logprob if kind == "neighbourhood" else new_logprob > true_logprob


def target_nll(
    model: torch.nn.Module, tok: object, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """Mean per-token NLL [n] of ``targets[i]`` following ``prompts[i]`` (float32, CPU)."""
    return target_scores(model, tok, prompts, targets, batch_size).nll


@dataclass(frozen=True)
class TargetScores:
    """Per target, teacher-forced after its prompt (each [n], CPU): `nll` the mean per-token NLL of
    the target; `greedy` whether every target token is the model's most likely next token (the
    model answers the target greedily); `top_logprob` the mean log-probability of those most
    likely tokens (equal to −nll where `greedy`)."""

    nll: torch.Tensor          # [n] float32
    greedy: torch.Tensor       # [n] bool
    top_logprob: torch.Tensor  # [n] float32


def target_scores(
    model: torch.nn.Module, tok: object, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32
) -> TargetScores:
    """`TargetScores` of ``targets[i]`` following ``prompts[i]``."""
    spec = spec_for(model)
    body = get_module(model, spec.base)
    head = get_module(model, spec.lm_head)
    device = next(model.parameters()).device
    pad = tok.pad_token_id  # type: ignore[attr-defined]
    nlls, greedy, tops = [], [], []
    for start in range(0, len(prompts), batch_size):
        seqs, rows, cols, tids = [], [], [], []
        for b, (p, t) in enumerate(zip(prompts[start:start + batch_size], targets[start:start + batch_size])):
            pids = tok(p)["input_ids"]  # type: ignore[operator]
            tgt = target_ids(tok, t)
            seqs.append(pids + tgt[:-1])
            for i, tid in enumerate(tgt):
                rows.append(b)
                cols.append(len(pids) - 1 + i)
                tids.append(tid)
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
            mask[b, : len(s)] = 1
        with torch.no_grad():
            hidden = body(input_ids=ids.to(device), attention_mask=mask.to(device))[0]
            r = torch.tensor(rows, device=device)
            logp = torch.log_softmax(head(hidden[r, torch.tensor(cols, device=device)]).float(), -1)  # [T, vocab]
            want = torch.tensor(tids, device=device)                                                 # [T]
            nll = -logp.gather(1, want[:, None])[:, 0]                                               # [T]
            top, top_id = logp.max(-1)                                                               # [T], [T]
            miss = (top_id != want).float()                                                          # [T]
            nlls.append(mean_per_sequence(nll, r, len(seqs)).cpu())
            tops.append(mean_per_sequence(top, r, len(seqs)).cpu())
            greedy.append((mean_per_sequence(miss, r, len(seqs)) == 0).cpu())
    if not nlls:
        return TargetScores(torch.zeros(0), torch.zeros(0, dtype=torch.bool), torch.zeros(0))
    return TargetScores(torch.cat(nlls), torch.cat(greedy), torch.cat(tops))
