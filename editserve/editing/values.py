"""Values v*: an optimised additive change δ of a module's output at the subject's last token.

For each request, δ ∈ R^d is added to the output of `module` (ROME: the MLP at the edit
layer; MEMIT: the block at the last edit layer) at the subject's last token of every
prompt (bare and prefixed) and optimised with Adam to minimise

    mean_p NLL(target_new | prompt_p)                       efficacy over prefixes
  + kl_factor · KL(P_orig ‖ P_edited) on "{subject} is a"    keep what the subject *is*
  + weight_decay · ‖δ‖² / ‖h‖²                               small change

with ‖δ‖ clamped to clamp_norm_factor · ‖h‖ (h = the original output) and early stopping
once every request's target NLL is below `early_stop_nll`. All requests of a batch are
optimised together in one forward/backward per step (their losses are independent).

Each step only computes what δ can change: the tokens from the subject's last token on (the
prefix before it is run once and cached, see `prompts.PrefixRunner`) and the blocks from the
edit layer up (the blocks below it replay the output they produced in the first pass).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from editserve.editing.arch import spec_for
from editserve.editing.hooks import Hooks
from editserve.editing.hparams import ValueParams
from editserve.editing.keys import prefixed_texts
from editserve.editing.prompts import PrefixRunner, mean_per_sequence, split_batch, target_ids
from editserve.editing.requests import EditRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueResult:
    delta: torch.Tensor        # [n, d] float32, the optimised δ per request
    init_output: torch.Tensor  # [n, d] float32, h: original output at the bare prompt's subject token
    steps: int
    final_nll: torch.Tensor    # [n] mean target NLL with δ applied


def optimise_values(
    model: torch.nn.Module,
    tok: object,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    module: str,
    params: ValueParams,
    prompt_scales: torch.Tensor | None = None,
    chunk_size: int = 16,
    frozen_below: int = 0,
) -> ValueResult:
    """Optimise δ for each request (in chunks of `chunk_size` requests); the model is unchanged.

    prompt_scales [n, 1 + n_prefixes]: δ is added as ``scale · δ`` on each (bare, prefixed) prompt —
    the factor by which the final low-rank update will actually move that prompt's output
    (ROME: uᵀk_i / uᵀk*). The KL prompt shares the bare prompt's subject key, so its scale.
    frozen_below: blocks 0 … frozen_below−1 are computed once, not per step; `module` must lie at or
    above block `frozen_below` (ROME and MEMIT pass their edit layer).
    """
    parts = [
        _optimise_chunk(model, tok, requests[i:i + chunk_size], prefixes, module, params,
                        None if prompt_scales is None else prompt_scales[i:i + chunk_size], frozen_below)
        for i in range(0, len(requests), chunk_size)
    ]
    return ValueResult(
        delta=torch.cat([p.delta for p in parts]),
        init_output=torch.cat([p.init_output for p in parts]),
        steps=max(p.steps for p in parts),
        final_nll=torch.cat([p.final_nll for p in parts]),
    )


def _optimise_chunk(
    model: torch.nn.Module,
    tok: object,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    module: str,
    params: ValueParams,
    prompt_scales: torch.Tensor | None,
    frozen_below: int,
) -> ValueResult:
    spec = spec_for(model)
    frozen = [spec.layer_name(i) for i in range(frozen_below)]                  # blocks δ cannot change
    if any(module == f or module.startswith(f + ".") for f in frozen):
        raise ValueError(f"module {module!r} lies below frozen_below={frozen_below}")
    device = next(model.parameters()).device
    n = len(requests)
    items, req_of_seq, is_kl, scales = [], [], [], []
    for r, req in enumerate(requests):
        tgt = target_ids(tok, req.target_new)
        for j, (text, end) in enumerate(prefixed_texts(req, prefixes)):
            items.append((text, end, tgt))
            req_of_seq.append(r)
            is_kl.append(False)
            scales.append(1.0 if prompt_scales is None else float(prompt_scales[r, j]))
    for r, req in enumerate(requests):  # one KL prompt per request, appended after the rewrites
        kl_text = params.kl_prompt.format(req.subject)
        items.append((kl_text, params.kl_prompt.index("{}") + len(req.subject), []))
        req_of_seq.append(r)
        is_kl.append(True)
        scales.append(1.0 if prompt_scales is None else float(prompt_scales[r, 0]))
    batch = split_batch(tok, items, tok.pad_token_id).to(device)  # type: ignore[attr-defined]
    B = len(items)
    req_of_seq_t = torch.tensor(req_of_seq, device=device)
    scale_t = torch.tensor(scales, device=device)[:, None]                      # [B, 1]
    kl_rows = torch.nonzero(torch.tensor(is_kl, device=device))[:, 0]          # [n]
    rewrite = ~torch.tensor(is_kl, device=device)
    bare_rows = torch.tensor([i for i, (r, k) in enumerate(zip(req_of_seq, is_kl)) if not k and (i == 0 or req_of_seq[i - 1] != r)], device=device)
    runner = PrefixRunner(model, batch)

    d_hidden: list[torch.Tensor] = []
    with torch.no_grad(), Hooks(model) as hooks:
        hooks.capture_output(module)
        if frozen:
            hooks.capture_output(frozen[-1], whole=True)
        hidden = runner.suffix_hidden()
        frozen_output = hooks.whole_outputs.get(frozen[-1]) if frozen else None
        h_init = hooks.outputs[module][bare_rows, 0].float()                     # [n, d]
        kl_logits = runner.logits_at(hidden, kl_rows, batch.last_cols[kl_rows])
        kl_ref = torch.log_softmax(kl_logits, -1)                                # [n, vocab]
    d = h_init.shape[-1]
    delta = torch.zeros((n, d), device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=params.lr)
    max_norm = params.clamp_norm_factor * h_init.norm(dim=-1)                   # [n]
    init_sq = (h_init.norm(dim=-1) ** 2).clamp(min=1e-12)
    rewrite_seq = torch.nonzero(rewrite)[:, 0]
    nll = torch.full((n,), float("inf"), device=device)
    steps = 0

    def add_delta(out: torch.Tensor) -> torch.Tensor:
        rows = (delta[req_of_seq_t] * scale_t).to(out.dtype)                     # [B, d]
        return torch.cat([out[:, :1] + rows[:, None, :], out[:, 1:]], dim=1)

    for step in range(params.max_steps):
        with Hooks(model) as hooks:
            hooks.edit_output(module, add_delta)
            if frozen:
                hooks.replay_output(frozen, frozen_output)
            hidden = runner.suffix_hidden()
        tok_nll = runner.target_nll(hidden)                                      # [T]
        seq_nll = mean_per_sequence(tok_nll, batch.score_rows, B)                # [B]
        per_req = torch.zeros(n, device=device).index_add(0, req_of_seq_t[rewrite_seq], seq_nll[rewrite_seq])
        per_req = per_req / torch.bincount(req_of_seq_t[rewrite_seq], minlength=n).clamp(min=1)
        nll = per_req.detach()
        steps = step + 1
        if bool((nll < params.early_stop_nll).all()):
            break
        kl_now = torch.log_softmax(runner.logits_at(hidden, kl_rows, batch.last_cols[kl_rows]), -1)
        kl = torch.nn.functional.kl_div(kl_now, kl_ref, log_target=True, reduction="none").sum(-1)  # [n]
        decay = (delta.norm(dim=-1) ** 2) / init_sq
        loss = (per_req + params.kl_factor * kl + params.weight_decay * decay)
        done = (nll < params.early_stop_nll).float()                             # freeze converged requests
        opt.zero_grad()
        (loss * (1 - done)).sum().backward()
        before = delta.detach().clone()
        opt.step()
        with torch.no_grad():
            delta[done.bool()] = before[done.bool()]  # Adam momentum must not move converged requests
            norms = delta.norm(dim=-1)
            scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
            delta.mul_(scale[:, None])
    log.debug("values: %d requests, %d steps, final nll %s", n, steps, nll.tolist())
    return ValueResult(delta=delta.detach().float().cpu(), init_output=h_init.cpu(), steps=steps, final_nll=nll.cpu())
