"""Scoring continuations: mean per-token NLL of a target after a prompt, batched, and what a
probe prompt's outcome means (`fact_success`).

Right-padded batches through the model body; the LM head runs only at the positions that
predict target tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from editserve.editing.arch import get_module, spec_for
from editserve.editing.prompts import mean_per_sequence, target_ids


PROBE_KINDS = ("efficacy", "paraphrase", "neighbourhood")


def fact_success(kind: str, new_logprob: float, true_logprob: float) -> bool:
    """The one meaning of a probe prompt's outcome, shared by the probe gate
    (editserve/control/probe.py), the sidecar's edit report (editserve/engine/sidecar.py) and the
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
    spec = spec_for(model)
    body = get_module(model, spec.base)
    head = get_module(model, spec.lm_head)
    device = next(model.parameters()).device
    pad = tok.pad_token_id  # type: ignore[attr-defined]
    out = []
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
            logp = torch.log_softmax(head(hidden[r, torch.tensor(cols, device=device)]).float(), -1)
            nll = -logp.gather(1, torch.tensor(tids, device=device)[:, None])[:, 0]
            out.append(mean_per_sequence(nll, r, len(seqs)).cpu())
    return torch.cat(out) if out else torch.zeros(0)
