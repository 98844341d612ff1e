"""The probe gate: score a candidate patch before anything is committed or swapped.

`probe_gate(model, tok, patch, requests, config)` is a pure function of its arguments (the
model is left exactly as it was given: the patch is applied for the "after" scores and then
removed, restoring the saved base copies). It runs in the sidecar, on the model at the ledger
head, and measures, with CounterFact's criteria (mean per-token NLL of each continuation,
`editserve.editing.scoring.target_nll`):

- **efficacy**: on each request's own prompt, P(target_new) > P(target_true) after the edit;
- **generalisation**: the same on paraphrases (given by the caller, else generated from the
  relation templates of the neighbour pool: other phrasings of the same prompt template);
- **specificity**: on neighbourhood prompts (about other subjects whose true object is the edited
  fact's true object: given, else drawn from the pool), the neighbourhood score NS = fraction
  with P(target_true) > P(target_new), before and after; the gate bounds the drop;
- **drift**: KL(current ‖ candidate) of the next-token distributions on a fixed canary set of
  unrelated prompts (`CANARIES`); the gate bounds the mean.

When a request has no target_true, the model's current greedy continuation of its prompt is used.
Default thresholds (`DEFAULT_THRESHOLDS`) and the loosest values a caller may ask for
(`LOOSEST_THRESHOLDS`) come from measurements on SmolLM2-135M (docs/control.md).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from editserve.editing.requests import EditRequest
from editserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

POOL_FILE = Path(__file__).resolve().parents[1] / "data" / "neighbours.json"

# Unrelated prompts whose next-token distribution must not move (drift canaries).
CANARIES: tuple[str, ...] = (
    "The chemical symbol for gold is",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "Photosynthesis converts sunlight into",
    "The square root of sixty-four is",
    "Shakespeare wrote the play",
    "The Great Wall was built in",
    "A group of lions is called a",
    "The human heart has four",
    "To bake bread you need flour, water and",
    "The first man to walk on the moon was",
    "In music, a piece for solo piano is often called a",
    "The currency of Japan is the",
    "DNA stands for",
    "Mount Everest is part of the",
    "The speed of light is approximately",
    "Once upon a time, there was a",
    "def add(a, b):\n    return",
    "The opposite of hot is",
    "My favourite breakfast is a bowl of",
)


@dataclass(frozen=True)
class Thresholds:
    """Gate criteria. Efficacy/paraphrase/NS are fractions in [0, 1]; KL in nats."""

    min_efficacy: float = 1.0
    min_paraphrase: float = 0.0
    max_ns_drop: float = 0.2
    max_canary_kl: float = 0.05

    def __post_init__(self) -> None:
        for name in ("min_efficacy", "min_paraphrase", "max_ns_drop"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
                raise InvalidRequestError(f"threshold {name} must be a number in [0, 1], got {v!r}")
        v = self.max_canary_kl
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0.0:
            raise InvalidRequestError(f"threshold max_canary_kl must be a finite number >= 0, got {v!r}")

    def within(self, loosest: "Thresholds") -> None:
        """Raise `InvalidRequestError` if any criterion is looser than `loosest` allows."""
        if self.min_efficacy < loosest.min_efficacy:
            raise InvalidRequestError(f"min_efficacy {self.min_efficacy} is below the server's bound {loosest.min_efficacy}")
        if self.min_paraphrase < loosest.min_paraphrase:
            raise InvalidRequestError(
                f"min_paraphrase {self.min_paraphrase} is below the server's bound {loosest.min_paraphrase}")
        if self.max_ns_drop > loosest.max_ns_drop:
            raise InvalidRequestError(f"max_ns_drop {self.max_ns_drop} is above the server's bound {loosest.max_ns_drop}")
        if self.max_canary_kl > loosest.max_canary_kl:
            raise InvalidRequestError(
                f"max_canary_kl {self.max_canary_kl} is above the server's bound {loosest.max_canary_kl}")


DEFAULT_THRESHOLDS = Thresholds()
LOOSEST_THRESHOLDS = Thresholds(min_efficacy=0.5, min_paraphrase=0.0, max_ns_drop=0.5, max_canary_kl=0.5)


@dataclass(frozen=True)
class GateConfig:
    """What the gate needs besides the model and the patch (picklable, sent to the sidecar)."""

    thresholds: Thresholds = DEFAULT_THRESHOLDS
    paraphrases: tuple[tuple[str, int], ...] = ()     # (prompt text, request index); empty: from templates
    neighbours: tuple[tuple[str, int], ...] = ()      # (prompt text, request index); empty: from the pool
    canaries: tuple[str, ...] = CANARIES
    max_paraphrases: int = 3
    max_neighbours: int = 10
    pool_path: str | None = None                      # None: the packaged editserve/data/neighbours.json


@dataclass(frozen=True)
class ProbeRow:
    kind: str
    prompt: str
    target_new: str
    target_true: str
    new_logprob_before: float
    true_logprob_before: float
    new_logprob_after: float
    true_logprob_after: float
    success: bool


@dataclass(frozen=True)
class ProbeReport:
    passed: bool
    failures: tuple[str, ...]
    efficacy: float
    paraphrase: float                 # -1: no paraphrases
    neighbourhood_before: float       # -1: no neighbours
    neighbourhood_after: float
    ns_drop: float
    canary_kl_mean: float
    canary_kl_max: float
    canaries: int
    thresholds: Thresholds
    rows: tuple[ProbeRow, ...] = field(default_factory=tuple)
    seconds: float = 0.0
    neighbour_source: str = "none"
    paraphrase_source: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProbeReport":
        return cls(**{**d, "failures": tuple(d["failures"]), "thresholds": Thresholds(**d["thresholds"]),
                      "rows": tuple(ProbeRow(**r) for r in d["rows"])})


@lru_cache(maxsize=4)
def load_pool(path: str | None = None) -> dict[str, Any]:
    """The neighbour pool: ``{"by_object": {object: [prompt, ...]}, "templates": {template: [paraphrase
    template, ...]}}`` (see `editserve.control.pool`)."""
    from editserve.errors import DataError

    p = Path(path) if path else POOL_FILE
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the neighbour pool {str(p)!r}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("by_object"), dict) \
            or not isinstance(data.get("templates"), dict):
        raise DataError(f"the neighbour pool {str(p)!r} needs 'by_object' and 'templates' objects")
    return data


def _greedy(model: torch.nn.Module, tok: Any, prompts: Sequence[str]) -> list[str]:
    dist = next_token_logprobs(model, tok, prompts)
    return [tok.decode([int(i)]) for i in dist.argmax(-1)]


def next_token_logprobs(model: torch.nn.Module, tok: Any, prompts: Sequence[str]) -> torch.Tensor:
    """log p(next token | prompt) [n, vocab] (float32, CPU), right-padded batch."""
    if not prompts:
        return torch.zeros(0)
    device = next(model.parameters()).device
    enc = [tok(p)["input_ids"] for p in prompts]
    L = max(len(e) for e in enc)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(enc), L), int(pad), dtype=torch.long)
    mask = torch.zeros((len(enc), L), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    last = torch.tensor([len(e) - 1 for e in enc], device=device)
    return torch.log_softmax(logits[torch.arange(len(enc), device=device), last].float(), -1).cpu()


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row from log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0.0)


def _template_of(req: EditRequest) -> str:
    return req.prompt


def _draw_paraphrases(req: EditRequest, idx: int, pool: dict[str, Any], n: int) -> list[tuple[str, int]]:
    out = []
    for t in pool["templates"].get(_template_of(req), [])[:n]:
        if isinstance(t, str) and t.count("{}") == 1 and t != req.prompt:
            out.append((t.replace("{}", req.subject), idx))
    return out


def _draw_neighbours(req: EditRequest, idx: int, true_obj: str, pool: dict[str, Any], n: int) -> list[tuple[str, int]]:
    prompts = pool["by_object"].get(true_obj.strip(), [])
    chosen = [p for p in prompts if isinstance(p, str) and req.subject not in p][:n]
    return [(p, idx) for p in chosen]


def opens_sequence(tok: Any, req: EditRequest) -> bool:
    """Whether `req`'s subject is its prompt's first token (a one-token subject opening the prompt,
    on a tokenizer that adds no BOS token): the edit's key is then read at position 0."""
    from editserve.editing.prompts import subject_last_index

    if req.prompt.index("{}") != 0:
        return False
    _, idx = subject_last_index(tok, req.text, len(req.subject))
    return idx == 0


def _first_token_hint(tok: Any, req: EditRequest, index: int) -> str:
    """Why request `index` may not hold on its own prompt, if its subject opens the sequence."""
    if not opens_sequence(tok, req):
        return ""
    return (f"; request {index}'s subject {req.subject!r} is its prompt's first token, and an edit cannot reach "
            "position 0 on this model (no BOS token; the first position is the attention sink): prompts that "
            "open with the subject keep their old answer while prompts with words before it change "
            "(docs/lifelong.md, 'Subjects at position 0') - put words before the subject")


def probe_gate(model: torch.nn.Module, tok: Any, patch: Any, requests: Sequence[EditRequest],
               config: GateConfig = GateConfig()) -> ProbeReport:
    """Score `patch` on `model` (see the module docstring); the model is unchanged on return."""
    from editserve.editing.scoring import target_nll
    from editserve.patches import apply_patch, remove_patch

    t0 = time.perf_counter()
    from editserve.editing.scoring import fact_success

    reqs = list(requests)
    if not reqs:
        raise InvalidRequestError("the probe gate needs at least one edit request")
    for name, items in (("paraphrase", config.paraphrases), ("neighbour", config.neighbours)):
        for text, i in items:
            if not 0 <= i < len(reqs):
                raise InvalidRequestError(f"{name} prompt {text!r} names fact_index {i}; there are {len(reqs)} facts")
    missing = [i for i, r in enumerate(reqs) if not r.target_true]
    greedy = _greedy(model, tok, [reqs[i].text for i in missing]) if missing else []
    true_of = {i: r.target_true for i, r in enumerate(reqs) if r.target_true}
    true_of.update(dict(zip(missing, greedy)))
    needs_pool = not config.paraphrases or not config.neighbours
    pool = load_pool(config.pool_path) if needs_pool else {"by_object": {}, "templates": {}}
    if config.paraphrases:
        paraphrases, p_source = list(config.paraphrases), "request"
    else:
        paraphrases = [x for i, r in enumerate(reqs) for x in _draw_paraphrases(r, i, pool, config.max_paraphrases)]
        p_source = "templates" if paraphrases else "none"
    if config.neighbours:
        neighbours, n_source = list(config.neighbours), "request"
    else:
        neighbours = [x for i, r in enumerate(reqs)
                      for x in _draw_neighbours(r, i, true_of[i], pool, config.max_neighbours)]
        n_source = "pool" if neighbours else "none"
    items = ([("efficacy", r.text, i) for i, r in enumerate(reqs)] + [("paraphrase", t, i) for t, i in paraphrases]
             + [("neighbourhood", t, i) for t, i in neighbours])
    prompts = [t for _, t, _ in items] * 2
    targets = [reqs[i].target_new for _, _, i in items] + [true_of[i] for _, _, i in items]

    def score() -> tuple[list[float], torch.Tensor]:
        nll = target_nll(model, tok, prompts, targets)
        return [-float(x) for x in nll], next_token_logprobs(model, tok, config.canaries)

    before, canary_before = score()
    apply_patch(model, patch)
    try:
        after, canary_after = score()
    finally:
        remove_patch(model, patch)
    n = len(items)
    rows = []
    for k, (kind, text, i) in enumerate(items):
        nb, tb, na, ta = before[k], before[n + k], after[k], after[n + k]
        ok = fact_success(kind, na, ta)
        rows.append(ProbeRow(kind=kind, prompt=text, target_new=reqs[i].target_new, target_true=true_of[i],
                             new_logprob_before=round(nb, 5), true_logprob_before=round(tb, 5),
                             new_logprob_after=round(na, 5), true_logprob_after=round(ta, 5), success=bool(ok)))

    def frac(kind: str, pred: Any) -> float:
        sel = [r for r in rows if r.kind == kind]
        return sum(1 for r in sel if pred(r)) / len(sel) if sel else -1.0

    efficacy = frac("efficacy", lambda r: r.success)
    paraphrase = frac("paraphrase", lambda r: r.success)
    ns_before = frac("neighbourhood", lambda r: r.true_logprob_before > r.new_logprob_before)
    ns_after = frac("neighbourhood", lambda r: r.success)
    ns_drop = max(0.0, ns_before - ns_after) if ns_before >= 0 else 0.0
    if len(config.canaries):
        kl = _kl(canary_before, canary_after)
        kl_mean, kl_max = float(kl.mean()), float(kl.max())
    else:
        kl_mean = kl_max = 0.0
    th = config.thresholds
    failures = []
    if efficacy < th.min_efficacy:
        failed = sorted({i for r, (_, _, i) in zip(rows, items) if r.kind == "efficacy" and not r.success})
        failures.append(f"efficacy {efficacy:.3f} < min_efficacy {th.min_efficacy}"
                        + "".join(_first_token_hint(tok, reqs[i], i) for i in failed))
    if paraphrase >= 0 and paraphrase < th.min_paraphrase:
        failures.append(f"paraphrase {paraphrase:.3f} < min_paraphrase {th.min_paraphrase}")
    if ns_drop > th.max_ns_drop + 1e-9:
        failures.append(f"neighbourhood score drop {ns_drop:.3f} ({ns_before:.3f} -> {ns_after:.3f}) "
                        f"> max_ns_drop {th.max_ns_drop}")
    if not math.isfinite(kl_mean) or kl_mean > th.max_canary_kl:
        failures.append(f"canary KL {kl_mean:.4f} > max_canary_kl {th.max_canary_kl}")
    report = ProbeReport(passed=not failures, failures=tuple(failures), efficacy=efficacy, paraphrase=paraphrase,
                         neighbourhood_before=ns_before, neighbourhood_after=ns_after, ns_drop=ns_drop,
                         canary_kl_mean=kl_mean, canary_kl_max=kl_max, canaries=len(config.canaries), thresholds=th,
                         rows=tuple(rows), seconds=round(time.perf_counter() - t0, 4),
                         neighbour_source=n_source, paraphrase_source=p_source)
    log.info("probe gate: %s (efficacy %.2f, paraphrase %.2f, NS %.2f->%.2f, canary KL %.4f) in %.2f s",
             "passed" if report.passed else "REJECTED: " + "; ".join(failures), efficacy, paraphrase, ns_before,
             ns_after, kl_mean, report.seconds)
    return report


def with_thresholds(config: GateConfig, thresholds: Thresholds) -> GateConfig:
    return replace(config, thresholds=thresholds)


def score_items(model: torch.nn.Module, tok: Any, items: Sequence[tuple[str, str, str | None]]) -> list[dict[str, Any]]:
    """Mean per-token log-probability of each item's target (and `other`) after its prompt, and the
    greedy next token (the gRPC Probe call, run on the sidecar at the served version)."""
    from editserve.editing.scoring import target_nll

    if not items:
        return []
    prompts = [p for p, _, _ in items]
    tgt = [-float(x) for x in target_nll(model, tok, prompts, [t for _, t, _ in items])]
    with_other = [(k, p, o) for k, (p, _, o) in enumerate(items) if o]
    oth = [-float(x) for x in target_nll(model, tok, [p for _, p, _ in with_other], [o for _, _, o in with_other])] \
        if with_other else []
    other_of = {k: v for (k, _, _), v in zip(with_other, oth)}
    top = _greedy(model, tok, prompts)
    return [{"prompt": p, "target": t, "target_logprob": tgt[k], "other": o or "", "other_logprob": other_of.get(k),
             "top_token": top[k]} for k, (p, t, o) in enumerate(items)]
