"""Values v*: an optimised additive change δ of a module's output at the subject's last token.

For each request, δ ∈ R^d is added to the output of `module` (ROME: the MLP at the edit
layer; MEMIT: the block at the last edit layer) at the subject's last token of every
prompt (bare and prefixed) and optimised with Adam to minimise

    mean_p NLL(target_new | prompt_p)                       efficacy over prefixes
  + kl_factor · KL(P_orig ‖ P_edited) on "{subject} is a"    keep what the subject *is*
  + weight_decay · ‖δ‖² / ‖h‖²                               small change

with ‖δ‖ clamped to clamp_norm_factor · ‖h‖ (h = the original output) and early stopping
once every request's target NLL is below `early_stop_nll` or, with early_stop="most_probable", once
each target token is the most probable one on every prompt by `early_stop_margin` (ENCORE's MPES: δ no
larger than the edit needs). Clamp and stop are per request if asked: an edit that did not hold is
retried with a larger clamp and no early stop, see `edit._escalating`. All
requests of a batch are optimised together in one forward/backward per step (their losses are
independent).

Each step only computes what δ can change: the tokens from the subject's last token on (the
prefix before it is run once and cached, see `prompts.PrefixRunner`) and the blocks from the
edit layer up (the blocks below it replay the output they produced in the first pass).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from editserve.editing.arch import spec_for
from editserve.editing.hooks import Hooks
from editserve.editing.hparams import ValueParams
from editserve.editing.keys import prefixed_texts
from editserve.editing.prompts import PrefixRunner, SplitBatch, mean_per_sequence, split_batch, target_ids
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
    clamp_factors: torch.Tensor | None = None,
    stop_nll: torch.Tensor | None = None,
) -> ValueResult:
    """Optimise δ for each request (in chunks of `chunk_size` requests); the model is unchanged.

    prompt_scales [n, 1 + n_prefixes]: δ is added as ``scale · δ`` on each (bare, prefixed) prompt —
    the factor by which the final low-rank update will actually move that prompt's output
    (ROME: uᵀk_i / uᵀk*). The KL prompt shares the bare prompt's subject key, so its scale.
    frozen_below: blocks 0 … frozen_below−1 are computed once, not per step; `module` must lie at or
    above block `frozen_below` (ROME and MEMIT pass their edit layer).
    clamp_factors [n]: ‖δ_i‖ ≤ clamp_factors[i]·‖h_i‖ instead of `params.clamp_norm_factor` for all.
    stop_nll [n]: request i stops once its target NLL is below stop_nll[i] instead of
    `params.early_stop_nll` (0: it runs all `params.max_steps`).
    """
    if clamp_factors is None:
        clamp_factors = torch.full((len(requests),), float(params.clamp_norm_factor))
    if stop_nll is None:
        stop_nll = torch.full((len(requests),), float(params.early_stop_nll))
    # Chunks of requests with similar suffix lengths pad less.
    order = sorted(range(len(requests)), key=lambda i: _suffix_tokens(tok, requests[i]))
    parts = []
    for i in range(0, len(requests), chunk_size):
        idx = order[i:i + chunk_size]
        parts.append(_optimise_chunk(model, tok, [requests[j] for j in idx], prefixes, module, params,
                                     None if prompt_scales is None else prompt_scales[idx], frozen_below,
                                     clamp_factors[idx], stop_nll[idx]))
    back = torch.argsort(torch.tensor(order))                                     # sorted position of each request
    return ValueResult(
        delta=torch.cat([p.delta for p in parts])[back],
        init_output=torch.cat([p.init_output for p in parts])[back],
        steps=max(p.steps for p in parts),
        final_nll=torch.cat([p.final_nll for p in parts])[back],
    )


def _suffix_tokens(tok: object, req: EditRequest) -> int:
    """About how many tokens a step runs per prompt of `req`: prompt after the subject + target."""
    after = req.prompt[req.prompt.index("{}") + 2:]
    return len(tok(after, add_special_tokens=False)["input_ids"]) + len(target_ids(tok, req.target_new))  # type: ignore[operator]


@dataclass
class _Prompts:
    """The prompts of some requests of a chunk, split at the subject and with their prefixes cached.

    B sequences: for each included request its bare and prefixed rewrite prompts, then one KL
    prompt per included request (in `reqs` order).
    """

    reqs: torch.Tensor           # [m] chunk index of each included request
    batch: SplitBatch
    runner: PrefixRunner
    req_of_seq: torch.Tensor     # [B] chunk index of each sequence's request
    scale: torch.Tensor          # [B, 1] factor on δ per sequence
    rewrite_seq: torch.Tensor    # [R] sequence indices of the rewrite prompts
    kl_seq: torch.Tensor         # [m] sequence index of each included request's KL prompt
    bare_seq: torch.Tensor       # [m] sequence index of each included request's bare prompt
    frozen_output: Any = None    # output of the last frozen block on this batch (see Hooks.replay_output)


def _build_prompts(
    model: torch.nn.Module,
    tok: object,
    requests: Sequence[EditRequest],
    include: Sequence[int],
    prefixes: Sequence[str],
    params: ValueParams,
    prompt_scales: torch.Tensor | None,
) -> _Prompts:
    device = next(model.parameters()).device
    items, req_of_seq, scales, bare_seq = [], [], [], []
    for r in include:
        req = requests[r]
        tgt = target_ids(tok, req.target_new)
        bare_seq.append(len(items))
        for j, (text, end) in enumerate(prefixed_texts(req, prefixes)):
            items.append((text, end, tgt))
            req_of_seq.append(r)
            scales.append(1.0 if prompt_scales is None else float(prompt_scales[r, j]))
    n_rewrite = len(items)
    for r in include:  # one KL prompt per request, after the rewrites; it shares the bare prompt's key
        items.append((params.kl_prompt.format(requests[r].subject), params.kl_prompt.index("{}") + len(requests[r].subject), []))
        req_of_seq.append(r)
        scales.append(1.0 if prompt_scales is None else float(prompt_scales[r, 0]))
    batch = split_batch(tok, items, tok.pad_token_id).to(device)  # type: ignore[attr-defined]
    return _Prompts(
        reqs=torch.tensor(list(include), device=device), batch=batch, runner=PrefixRunner(model, batch),
        req_of_seq=torch.tensor(req_of_seq, device=device),
        scale=torch.tensor(scales, device=device)[:, None],
        rewrite_seq=torch.arange(n_rewrite, device=device),
        kl_seq=torch.arange(n_rewrite, len(items), device=device),
        bare_seq=torch.tensor(bare_seq, device=device),
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
    clamp_factors: torch.Tensor,
    stop_nll: torch.Tensor,
) -> ValueResult:
    """Optimise δ for `requests` together; converged requests leave the batch (it is rebuilt
    without them once a quarter of its requests have converged), so each step only computes
    the requests still optimising."""
    spec = spec_for(model)
    frozen = [spec.layer_name(i) for i in range(frozen_below)]                  # blocks δ cannot change
    if any(module == f or module.startswith(f + ".") for f in frozen):
        raise ValueError(f"module {module!r} lies below frozen_below={frozen_below}")
    device = next(model.parameters()).device
    n = len(requests)

    def prepare(include: Sequence[int]) -> tuple[_Prompts, Hooks, torch.Tensor]:
        """Prompts of `include` after one unedited pass, which captured the frozen blocks' output
        and `module`'s output; returns them with that pass's hooks and final hidden states."""
        P = _build_prompts(model, tok, requests, include, prefixes, params, prompt_scales)
        with torch.no_grad(), Hooks(model) as hooks:
            hooks.capture_output(module)
            if frozen:
                hooks.capture_output(frozen[-1], whole=True)
            hidden = P.runner.suffix_hidden()
        P.frozen_output = hooks.whole_outputs.get(frozen[-1]) if frozen else None
        return P, hooks, hidden

    P, first, hidden = prepare(range(n))
    h_init = first.outputs[module][P.bare_seq, 0].float()                         # [n, d] unedited output
    with torch.no_grad():
        kl_ref = torch.log_softmax(P.runner.logits_at(hidden, P.kl_seq, P.batch.last_cols[P.kl_seq]), -1)  # [n, vocab]
    d = h_init.shape[-1]
    delta = torch.zeros((n, d), device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=params.lr)
    max_norm = clamp_factors.to(device=device, dtype=h_init.dtype) * h_init.norm(dim=-1)   # [n]
    stop = stop_nll.to(device=device, dtype=torch.float32)                                  # [n]
    init_sq = (h_init.norm(dim=-1) ** 2).clamp(min=1e-12)
    nll = torch.full((n,), float("inf"), device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    steps = 0

    def add_delta(out: torch.Tensor) -> torch.Tensor:
        rows = (delta[P.req_of_seq] * P.scale).to(out.dtype)                     # [B, d]
        return torch.cat([out[:, :1] + rows[:, None, :], out[:, 1:]], dim=1)

    for step in range(params.max_steps):
        active = torch.nonzero(~done)[:, 0]
        if 0 < len(active) <= 0.75 * len(P.reqs):
            P, _, _ = prepare(active.tolist())                                 # the references stay as they are
        with Hooks(model) as hooks:
            hooks.edit_output(module, add_delta)
            if frozen:
                hooks.replay_output(frozen, P.frozen_output)
            hidden = P.runner.suffix_hidden()
        mpes = params.early_stop == "most_probable"
        tok_nll, tok_margin = P.runner.target_scores(hidden) if mpes else (P.runner.target_nll(hidden), None)  # [T], [T]
        seq_nll = mean_per_sequence(tok_nll, P.batch.score_rows, len(P.req_of_seq))  # [B]
        rw = P.req_of_seq[P.rewrite_seq]
        per_req = torch.zeros(n, device=device).index_add(0, rw, seq_nll[P.rewrite_seq])
        per_req = per_req / torch.bincount(rw, minlength=n).clamp(min=1)         # [n], 0 outside P.reqs
        nll[P.reqs] = per_req[P.reqs].detach()
        steps = step + 1
        done = done | (nll < stop)
        if mpes:
            # Most-probable stop: every target token of every rewrite prompt leads by the margin.
            # A request with stop_nll 0 (a retry) runs all steps.
            tok_req = P.req_of_seq[P.batch.score_rows]                            # [T] request of each token
            worst = torch.full((n,), float("inf"), device=device).scatter_reduce(
                0, tok_req, tok_margin, reduce="amin")                            # [n]; rewrite tokens only (KL prompts score none)
            seen = torch.zeros(n, dtype=torch.bool, device=device)
            seen[P.reqs] = True
            done = done | (seen & (stop > 0) & (worst >= params.early_stop_margin))
        if bool(done.all()):
            break
        kl_now = torch.log_softmax(P.runner.logits_at(hidden, P.kl_seq, P.batch.last_cols[P.kl_seq]), -1)
        kl = torch.zeros(n, device=device).index_add(
            0, P.reqs, torch.nn.functional.kl_div(kl_now, kl_ref[P.reqs], log_target=True, reduction="none").sum(-1))
        decay = (delta.norm(dim=-1) ** 2) / init_sq
        loss = per_req + params.kl_factor * kl + params.weight_decay * decay     # [n]
        train = torch.zeros(n, dtype=torch.bool, device=device)
        train[P.reqs] = True
        train &= ~done                                                           # converged requests are frozen
        opt.zero_grad()
        (loss * train.float()).sum().backward()
        before = delta.detach().clone()
        opt.step()
        with torch.no_grad():
            delta[~train] = before[~train]  # Adam momentum must not move frozen requests
            norms = delta.norm(dim=-1)
            scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
            delta.mul_(scale[:, None])
    log.debug("values: %d requests, %d steps, final nll %s, ‖δ‖/‖h‖ %s", n, steps, nll.tolist(),
              (delta.detach().norm(dim=-1) / h_init.norm(dim=-1)).tolist())
    return ValueResult(delta=delta.detach().float().cpu(), init_output=h_init.cpu(), steps=steps, final_nll=nll.cpu())
