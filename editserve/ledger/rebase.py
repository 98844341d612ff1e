"""The one recompute path of a rebase (``Ledger.plan_rebase`` / ``Ledger.revert(..., rebase=...)``),
backed by a Hugging Face model: the local ``editserve ledger revert --rebase`` and the server's
sidecar (``Rebase`` RPC, ``POST /editserve/v1/rebase``) both use `ModelRecompute`.

The ledger itself holds no model code. For each `RebaseStep` `ModelRecompute`

1. merges the step's *old* context and the old patch into the model and scores the old patch's
   probe prompts (the metrics before),
2. restores the base weights, merges the *new* context, recomputes the requests with the old
   patch's method and hyper-parameters (`compute_edit`) **against the new context's preserved-keys
   state** (``step.new_preserved``: the key blocks stored with the kept patches plus those of the
   patches recomputed before this one; AlphaEdit keeps exactly those keys in place, ROME and MEMIT
   ignore them), merges the new patch and scores again (the metrics after),
3. restores the base weights (from saved copies; nothing is subtracted),

and returns the new patch with its own key blocks, stored with it by the ledger.

Metrics (`probe_metrics`) are the scores the probe gate uses (`editserve.control.probe`,
`editserve.editing.scoring.fact_success`): the probe prompts are those of the old patch's
recorded gate report (efficacy, paraphrase and neighbourhood rows with their new and true
targets), else its sidecar report's probes, else each request's own prompt (with target_true).
Per kind present: ``<kind>`` the fraction of prompts that succeed and ``<kind>.margin`` the mean
log p(target_new) − log p(target_true); per request ``i``: ``fact<i>.logprob_new`` and, with a
true target, ``fact<i>.logprob_true``. `request_metrics` is the older, request-only measure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from editserve.editing.requests import EditRequest
from editserve.errors import PatchStateError
from editserve.ledger.records import RebaseOutcome, RebaseStep
from editserve.patches import Patch, applied_patches, apply_patch, remove_patch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeItem:
    """One prompt scored before and after a rebase (a row of the probe gate)."""

    kind: str                  # efficacy | paraphrase | neighbourhood
    prompt: str
    target_new: str
    target_true: str | None
    fact: int                  # index of the request it is about (-1: unknown)


MetricFn = Callable[[torch.nn.Module, Any, RebaseStep], dict[str, float]]
ProgressFn = Callable[[int, RebaseStep], None]


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
    """Request-only efficacy measures on the model as it is now: ``i.logprob_new`` (mean
    log-probability of target_new after the prompt), ``i.top1_new`` (1.0 if greedy decoding's
    first token is target_new's first) and ``i.logprob_true`` when the request names its true object."""
    out: dict[str, float] = {}
    for i, r in enumerate(requests):
        lp, top1 = _mean_logprob(model, tok, r.text, r.target_new)
        out[f"{i}.logprob_new"] = lp
        out[f"{i}.top1_new"] = 1.0 if top1 else 0.0
        if r.target_true:
            out[f"{i}.logprob_true"] = _mean_logprob(model, tok, r.text, r.target_true)[0]
    return out


def _fact_index(requests: Sequence[EditRequest], prompt: str, target_new: str) -> int:
    for i, r in enumerate(requests):
        if r.text == prompt and r.target_new == target_new:
            return i
    return -1


def probe_items(step: RebaseStep) -> tuple[ProbeItem, ...]:
    """The prompts to score for `step` (see the module docstring), in a fixed order."""
    from editserve.editing.scoring import PROBE_KINDS

    reqs = step.requests
    report = step.old_probe_report if isinstance(step.old_probe_report, dict) else {}
    gate = report.get("gate") if isinstance(report.get("gate"), dict) else None
    items: list[ProbeItem] = []
    if gate and isinstance(gate.get("rows"), list):
        for r in gate["rows"]:
            if isinstance(r, dict) and r.get("kind") in PROBE_KINDS:
                items.append(ProbeItem(kind=r["kind"], prompt=str(r["prompt"]), target_new=str(r["target_new"]),
                                       target_true=str(r["target_true"]) if r.get("target_true") else None,
                                       fact=_fact_index(reqs, str(r["prompt"]), str(r["target_new"]))))
    elif isinstance(report.get("probes"), list):
        for r in report["probes"]:
            if isinstance(r, dict) and r.get("kind") in PROBE_KINDS:
                items.append(ProbeItem(kind=r["kind"], prompt=str(r["prompt"]), target_new=str(r["target"]),
                                       target_true=str(r["other"]) if r.get("other") else None,
                                       fact=_fact_index(reqs, str(r["prompt"]), str(r["target"]))))
    if not any(it.kind == "efficacy" for it in items):
        items = [ProbeItem(kind="efficacy", prompt=r.text, target_new=r.target_new, target_true=r.target_true,
                           fact=i) for i, r in enumerate(reqs)] + items
    return tuple(items)


def score_probe_items(model: torch.nn.Module, tok: Any, items: Sequence[ProbeItem]) -> dict[str, float]:
    """The metrics of `items` on the model as it is now (see the module docstring)."""
    from editserve.editing.scoring import fact_success, target_nll

    if not items:
        return {}
    prompts = [it.prompt for it in items]
    new = [-float(x) for x in target_nll(model, tok, prompts, [it.target_new for it in items])]
    with_true = [k for k, it in enumerate(items) if it.target_true]
    true_lp = dict(zip(with_true, (-float(x) for x in target_nll(
        model, tok, [items[k].prompt for k in with_true], [items[k].target_true for k in with_true])))) \
        if with_true else {}
    out: dict[str, float] = {}
    by_kind: dict[str, list[tuple[bool, float]]] = {}
    for k, it in enumerate(items):
        if it.kind == "efficacy" and it.fact >= 0:
            out[f"fact{it.fact}.logprob_new"] = round(new[k], 5)
            if k in true_lp:
                out[f"fact{it.fact}.logprob_true"] = round(true_lp[k], 5)
        if k in true_lp:
            by_kind.setdefault(it.kind, []).append((fact_success(it.kind, new[k], true_lp[k]), new[k] - true_lp[k]))
    for kind, rows in by_kind.items():
        out[kind] = round(sum(ok for ok, _ in rows) / len(rows), 5)
        out[f"{kind}.margin"] = round(sum(m for _, m in rows) / len(rows), 5)
    return out


def probe_metrics(model: torch.nn.Module, tok: Any, step: RebaseStep) -> dict[str, float]:
    """`score_probe_items` of `probe_items(step)`: the default `ModelRecompute` metric."""
    return score_probe_items(model, tok, probe_items(step))


def _defaults(method: str) -> dict[str, Any]:
    from editserve.editing.hparams import class_defaults

    return class_defaults(method)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class ModelRecompute:
    """``rebase`` callable: recompute each later patch on `model` at the new base (module docstring).

    corpus:            text for covariance statistics, as for `compute_edit`.
    hparams_overrides: merged over each old patch's hyper-parameters (e.g. fewer value steps).
    metrics:           ``(model, tok, step) -> {name: value}`` measured before and after.
    progress:          called with (index of the step, step) before each recompute.
    """

    def __init__(self, model: torch.nn.Module, tok: Any, corpus: str | Path | None = None,
                 hparams_overrides: dict[str, Any] | None = None, metrics: MetricFn = probe_metrics,
                 progress: ProgressFn | None = None) -> None:
        self.model = model
        self.tok = tok
        self.corpus = corpus
        self.hparams_overrides = dict(hparams_overrides or {})
        self.metrics = metrics
        self.progress = progress
        self.steps = 0

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
        from editserve.editing.edit import compute_edit

        if applied_patches(self.model):
            raise PatchStateError(f"rebase needs the model at its base weights; {len(applied_patches(self.model))} "
                                  f"patch(es) are merged")
        if self.progress is not None:
            self.progress(self.steps, step)
        self.steps += 1
        before = self._with(list(step.old_context) + [step.old_patch],
                            lambda: self.metrics(self.model, self.tok, step))
        # The old patch's own hyper-parameters, complete: a field it predates takes the class default,
        # not today's per-model file (a patch from before cov_weight existed replays with λ = 0).
        hparams = _deep_merge(_deep_merge(_defaults(step.method), step.hparams), self.hparams_overrides)

        def recompute() -> tuple[Any, dict[str, float]]:
            # The preserved keys of the new context, rebuilt from the ledger's per-patch blocks
            # (AlphaEdit keeps them in place; the old state held the reverted patch's keys).
            result = compute_edit(self.model, self.tok, list(step.requests), method=step.method, hparams=hparams,
                                  corpus=self.corpus, preserved=step.new_preserved)
            after = self._with([result.patch], lambda: self.metrics(self.model, self.tok, step))
            return result, after

        result, after = self._with(step.new_context, recompute)
        new = result.patch
        log.info("rebased patch of version %d: %s -> %s (%s, %d preserved key block(s))", step.version,
                 step.old_patch.digest[:12], new.digest[:12], step.method, len(step.new_preserved.blocks))
        return RebaseOutcome(patch=new, metrics_before=before, metrics_after=after,
                             keys=result.preserved.for_patch(new.digest))
