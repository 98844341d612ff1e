"""A recompute callable for `Ledger.revert(..., rebase=...)` backed by a Hugging Face model.

The ledger itself holds no model code; this adapter is what the CLI and the sidecar inject.
For each `RebaseStep` it

1. merges the step's *old* context and the old patch into the model and measures the old
   patch's requests (the metrics before),
2. restores the base weights, merges the *new* context, recomputes the requests with the
   old patch's method and hyper-parameters (`compute_patch`), merges the new patch and
   measures again (the metrics after),
3. restores the base weights (from saved copies; nothing is subtracted).

The model must hold no merged patch when a step starts. Metrics per request ``i``:
``i.logprob_new`` (mean log-probability of the target_new tokens after the prompt),
``i.top1_new`` (1.0 if greedy decoding's first token is target_new's first token), and
``i.logprob_true`` when the request names its true object.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from editserve.editing.requests import EditRequest
from editserve.errors import PatchStateError
from editserve.ledger.ledger import RebaseOutcome, RebaseStep
from editserve.patches import Patch, applied_patches, apply_patch, remove_patch

log = logging.getLogger(__name__)

MetricFn = Callable[[torch.nn.Module, Any, Sequence[EditRequest]], dict[str, float]]


def _mean_logprob(model: torch.nn.Module, tok: Any, prompt: str, target: str) -> tuple[float, bool]:
    device = next(model.parameters()).device
    prompt_ids = tok(prompt, return_tensors="pt")["input_ids"][0]
    target_ids = tok(target, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    ids = torch.cat([prompt_ids, target_ids]).unsqueeze(0).to(device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
    target_logp = logp.gather(1, target_ids.to(device).unsqueeze(1)).squeeze(1)
    top1 = bool(int(logp[0].argmax()) == int(target_ids[0]))
    return float(target_logp.mean()), top1


def request_metrics(model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest]) -> dict[str, float]:
    """Efficacy metrics of `requests` on the model as it is now (see module docstring)."""
    out: dict[str, float] = {}
    for i, r in enumerate(requests):
        lp, top1 = _mean_logprob(model, tok, r.text, r.target_new)
        out[f"{i}.logprob_new"] = lp
        out[f"{i}.top1_new"] = 1.0 if top1 else 0.0
        if r.target_true:
            out[f"{i}.logprob_true"] = _mean_logprob(model, tok, r.text, r.target_true)[0]
    return out


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class ModelRecompute:
    """``rebase`` callable: recompute each later patch on `model` at the new base.

    hparams_overrides: merged over each old patch's hyper-parameters (e.g. fewer value steps).
    corpus:            text for covariance statistics, as for `compute_patch`.
    """

    def __init__(self, model: torch.nn.Module, tok: Any, corpus: str | Path | None = None,
                 hparams_overrides: dict[str, Any] | None = None, metrics: MetricFn = request_metrics) -> None:
        self.model = model
        self.tok = tok
        self.corpus = corpus
        self.hparams_overrides = dict(hparams_overrides or {})
        self.metrics = metrics

    def _with(self, patches: Sequence[Patch], fn: Callable[[], Any]) -> Any:
        applied: list[Patch] = []
        try:
            for p in patches:
                apply_patch(self.model, p)
                applied.append(p)
            return fn()
        finally:
            for p in reversed(applied):
                remove_patch(self.model, p)

    def __call__(self, step: RebaseStep) -> RebaseOutcome:
        from editserve.editing.edit import compute_patch

        if applied_patches(self.model):
            raise PatchStateError(f"rebase needs the model at its base weights; {len(applied_patches(self.model))} "
                                  f"patch(es) are merged")
        requests = step.requests
        before = self._with(list(step.old_context) + [step.old_patch],
                            lambda: self.metrics(self.model, self.tok, requests))
        hparams = _deep_merge(step.hparams, self.hparams_overrides)

        def recompute() -> tuple[Patch, dict[str, float]]:
            new = compute_patch(self.model, self.tok, requests, method=step.method, hparams=hparams, corpus=self.corpus)
            after = self._with([new], lambda: self.metrics(self.model, self.tok, requests))
            return new, after

        new, after = self._with(step.new_context, recompute)
        log.info("rebased patch of version %d: %s -> %s", step.version, step.old_patch.digest[:12], new.digest[:12])
        return RebaseOutcome(patch=new, metrics_before=before, metrics_after=after)
