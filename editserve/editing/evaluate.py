"""CounterFact evaluation of edits: efficacy, paraphrase, neighbourhood, fluency.

Per record, with P(x) = exp(−mean token NLL of x):

    ES / EM   on the rewrite prompt:        1[P(new) > P(true)]  /  P(new) − P(true)
    PS / PM   on paraphrase prompts:        same, averaged over the record's paraphrases
    NS / NM   on neighbourhood prompts:     1[P(true) > P(new)]  /  P(true) − P(new)
    S         harmonic mean of ES, PS, NS
    fluency   weighted bi/tri-gram entropy of greedy generations (where generation prompts exist)

Each score is taken before and after the edit. A record is *known* when the model ranks the
true object above the new one on the rewrite prompt before editing.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from editserve.editing.counterfact import CounterFactRecord
from editserve.editing.scoring import target_nll

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordScores:
    es: float
    em: float
    ps: float
    pm: float
    ns: float
    nm: float
    fluency: float | None = None


@dataclass(frozen=True)
class RecordResult:
    case_id: int
    before: RecordScores
    after: RecordScores
    seconds: float


@dataclass(frozen=True)
class Summary:
    n: int
    es: float
    ps: float
    ns: float
    em: float
    pm: float
    nm: float
    s: float
    fluency: float | None


@dataclass(frozen=True)
class EvalReport:
    method: str
    records_scanned: int
    records_known: int           # known among the scanned records
    records_edited: int
    before: Summary
    after: Summary
    ns_ratio: float
    seconds_per_edit: float
    timings: dict[str, float] = field(default_factory=dict)
    results: tuple[RecordResult, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


def harmonic(*xs: float) -> float:
    if any(x <= 0 for x in xs):
        return 0.0
    return len(xs) / sum(1 / x for x in xs)


def ngram_entropy(text: str, n: int) -> float:
    tokens = text.split()
    grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in grams.values())


def fluency(texts: Sequence[str]) -> float:
    """ROME's generation entropy: mean over texts of (2/3·H2 + 4/3·H3) / 2."""
    if not texts:
        return float("nan")
    return sum((2 / 3 * ngram_entropy(t, 2) + 4 / 3 * ngram_entropy(t, 3)) / 2 for t in texts) / len(texts)


def _generate(model: torch.nn.Module, tok: object, prompts: Sequence[str], max_new_tokens: int = 50) -> list[str]:
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt")["input_ids"].to(device)  # type: ignore[operator]
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)  # type: ignore[attr-defined]
            out.append(tok.decode(gen[0][ids.shape[1]:], skip_special_tokens=True))  # type: ignore[attr-defined]
    return out


def score_records(model: torch.nn.Module, tok: object, records: Sequence[CounterFactRecord],
                  with_fluency: bool = False) -> list[RecordScores]:
    """Scores of each record on the model as it is now (one batched pass for all records)."""
    prompts: list[str] = []
    targets: list[str] = []
    spans = []
    for rec in records:
        groups = [[rec.request.text], list(rec.paraphrases), list(rec.neighbourhood)]
        rec_spans = []
        for g in groups:
            start = len(prompts)
            for p in g:
                prompts += [p, p]
                targets += [rec.request.target_new, rec.request.target_true or ""]
            rec_spans.append((start, len(prompts)))
        spans.append(rec_spans)
    nll = target_nll(model, tok, prompts, targets)
    out = []
    for rec, rec_spans in zip(records, spans):
        vals = []
        for k, (a, b) in enumerate(rec_spans):
            if a == b:
                vals.append((float("nan"), float("nan")))
                continue
            p_new = torch.exp(-nll[a:b:2])
            p_true = torch.exp(-nll[a + 1:b:2])
            if k < 2:
                vals.append(((p_new > p_true).float().mean().item(), (p_new - p_true).mean().item()))
            else:
                vals.append(((p_true > p_new).float().mean().item(), (p_true - p_new).mean().item()))
        flu = fluency(_generate(model, tok, rec.generation_prompts)) if with_fluency and rec.generation_prompts else None
        out.append(RecordScores(es=vals[0][0], em=vals[0][1], ps=vals[1][0], pm=vals[1][1],
                                ns=vals[2][0], nm=vals[2][1], fluency=flu))
    return out


@dataclass(frozen=True)
class KnownRecords:
    """The records a model knows, found by `known_records`."""

    records: tuple[CounterFactRecord, ...]
    scores: tuple[RecordScores, ...]       # their scores on the model as it was (ES 0 each)
    scanned: int                           # records scored to find them


def known_records(model: torch.nn.Module, tok: object, records: Sequence[CounterFactRecord], n: int,
                  chunk: int = 64) -> KnownRecords:
    """The first `n` of `records` whose fact the model knows — its true object beats the new one on
    the rewrite prompt (ES 0 before an edit) — scored `chunk` records at a time, in order, stopping
    at the chunk where the `n`-th is found. Fewer than `n` when `records` holds fewer."""
    if n < 0 or chunk < 1:
        raise ValueError(f"known_records needs n >= 0 and chunk >= 1, got n={n!r}, chunk={chunk!r}")
    keep: list[tuple[CounterFactRecord, RecordScores]] = []
    scanned = 0
    for i in range(0, len(records), chunk):
        if len(keep) >= n:
            break
        part = records[i:i + chunk]
        scanned += len(part)
        keep += [(r, sc) for r, sc in zip(part, score_records(model, tok, part)) if sc.es == 0.0]
        log.info("known records: %d of %d scanned", len(keep), scanned)
    keep = keep[:n]
    return KnownRecords(records=tuple(r for r, _ in keep), scores=tuple(sc for _, sc in keep), scanned=scanned)


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(scores: Sequence[RecordScores]) -> Summary:
    es, ps, ns = (_mean([getattr(s, k) for s in scores]) for k in ("es", "ps", "ns"))
    flu = [s.fluency for s in scores if s.fluency is not None]
    return Summary(n=len(scores), es=es, ps=ps, ns=ns,
                   em=_mean([s.em for s in scores]), pm=_mean([s.pm for s in scores]), nm=_mean([s.nm for s in scores]),
                   s=harmonic(es, ps, ns), fluency=_mean(flu) if flu else None)


def evaluate(
    model: torch.nn.Module,
    tok: object,
    records: Sequence[CounterFactRecord],
    make_patch: Callable[[Sequence[CounterFactRecord]], object],
    n_known: int,
    batch: int = 1,
    method: str = "rome",
    with_fluency: bool = False,
    progress: bool = True,
) -> EvalReport:
    """Edit the first `n_known` known records, `batch` at a time, each batch on the unedited model.

    `make_patch(records)` returns a `Patch` for those records (e.g. via `compute_patch`).
    Records are scanned in order; unknown ones are skipped (counted in `records_scanned`).
    """
    from editserve.patches import apply_patch, remove_patch

    results: list[RecordResult] = []
    scanned = known = 0
    timings: dict[str, float] = {}
    edit_seconds = 0.0
    bar = tqdm(total=n_known, desc=f"eval {method}", unit="edit", disable=not progress)
    queue: deque[tuple[CounterFactRecord, RecordScores]] = deque()
    i = 0
    while len(results) < n_known:
        need = min(batch, n_known - len(results))
        while len(queue) < need and i < len(records):
            chunk = records[i:i + 32]
            i += len(chunk)
            for rec, sc in zip(chunk, score_records(model, tok, chunk, with_fluency)):
                scanned += 1
                if sc.es == 0.0:  # the true object beats the new one: the model knows the fact
                    known += 1
                    queue.append((rec, sc))
        if not queue:
            break
        taken = [queue.popleft() for _ in range(min(need, len(queue)))]
        recs = [r for r, _ in taken]
        t = time.perf_counter()
        patch = make_patch(recs)
        edit_seconds += time.perf_counter() - t
        for k, v in getattr(patch, "timings", {}).items():
            timings[k] = timings.get(k, 0.0) + v
        apply_patch(model, patch)
        try:
            after = score_records(model, tok, recs, with_fluency)
        finally:
            remove_patch(model, patch)
        per_record = (time.perf_counter() - t) / len(recs)
        for (rec, before), aft in zip(taken, after):
            results.append(RecordResult(case_id=rec.case_id, before=before, after=aft, seconds=per_record))
        bar.update(len(taken))
    bar.close()
    n = max(len(results), 1)
    before_s = summarize([r.before for r in results])
    after_s = summarize([r.after for r in results])
    return EvalReport(
        method=method, records_scanned=scanned, records_known=known, records_edited=len(results), before=before_s, after=after_s,
        ns_ratio=after_s.ns / before_s.ns if before_s.ns else float("nan"),
        seconds_per_edit=edit_seconds / n, timings={k: v / n for k, v in timings.items()}, results=tuple(results),
    )
