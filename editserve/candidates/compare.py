"""Compare a staged candidate with the head: probe scores side by side, scored by the serving engine.

The prompts are the gate's prompts of the candidate's facts (efficacy, paraphrase and
neighbourhood rows of the probe report its patch was gated with; without a report, the
efficacy prompt of each fact) followed by the caller's (``kind`` ``caller``). Each prompt is
scored twice by the running vLLM engine, in one batch: without an adapter (the head, exactly what
default traffic gets) and with the candidate's adapter (exactly what its traffic gets). A score
is the mean per-token log-probability of the target (and of ``other``) after the prompt, from
vLLM's prompt log-probabilities of ``prompt + target`` (the raw model distribution, like the gate's
`editserve.editing.scoring.target_nll`), and the greedy next token after the prompt. A gate row
succeeds per `editserve.editing.scoring.fact_success`.

Each side also reports vLLM's weight-version label of the tokens it produced
(``CompletionOutput.weight_versions``): vLLM keeps one engine-wide label (editserve sets it to
the served version after every swap), so both sides carry the head's version — the label does
not distinguish an adapter; the ``<v>+candidate-<id>`` label does (docs/candidates.md).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from editserve.editing.scoring import PROBE_KINDS, fact_success
from editserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

CALLER = "caller"
MAX_CALLER_ITEMS = 64
MAX_TEXT_CHARS = 2000


@dataclass(frozen=True)
class CompareItem:
    """One prompt to score on both sides: a target and, optionally, an alternative (`other`)."""

    kind: str                 # efficacy | paraphrase | neighbourhood | caller
    prompt: str
    target: str
    other: str | None = None


@dataclass(frozen=True)
class SideScore:
    target_logprob: float
    other_logprob: float | None
    top_token: str


@dataclass(frozen=True)
class ComparedRow:
    item: CompareItem
    head: SideScore
    candidate: SideScore

    def success(self, side: SideScore) -> bool:
        """The gate's criterion on one side (False for caller rows and rows without `other`)."""
        if self.item.kind not in PROBE_KINDS or side.other_logprob is None:
            return False
        return fact_success(self.item.kind, side.target_logprob, side.other_logprob)


@dataclass(frozen=True)
class Side:
    """One side's summary: label, fraction of successful gate rows per kind (-1: none), requests."""

    label: str
    efficacy: float
    paraphrase: float
    neighbourhood: float
    requests: int
    weight_version: str


@dataclass(frozen=True)
class Comparison:
    candidate: str
    served_version: int
    head: Side
    staged: Side
    rows: tuple[ComparedRow, ...]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        def side(s: SideScore) -> dict[str, Any]:
            return {"target_logprob": s.target_logprob, "other_logprob": s.other_logprob, "top_token": s.top_token}

        return {"candidate": self.candidate, "served_version": self.served_version,
                "head": vars(self.head).copy(), "staged": vars(self.staged).copy(), "seconds": self.seconds,
                "scores": [{"kind": r.item.kind, "prompt": r.item.prompt, "target": r.item.target,
                            "other": r.item.other or "", "head": side(r.head), "candidate": side(r.candidate),
                            "head_success": r.success(r.head), "candidate_success": r.success(r.candidate)}
                           for r in self.rows]}


def gate_items(requests: Sequence[Any], report: dict[str, Any] | None) -> tuple[CompareItem, ...]:
    """The gate's prompts of a patch: the rows of its probe report (``report["gate"]``, as the
    ledger and a dry run keep it), else each fact's efficacy prompt."""
    gate = (report or {}).get("gate") if isinstance(report, dict) else None
    rows = gate.get("rows") if isinstance(gate, dict) else None
    if isinstance(rows, list) and rows:
        return tuple(CompareItem(kind=str(r["kind"]), prompt=str(r["prompt"]), target=str(r["target_new"]),
                                 other=str(r["target_true"]) or None) for r in rows
                     if isinstance(r, dict) and r.get("kind") in PROBE_KINDS)
    return tuple(CompareItem(kind="efficacy", prompt=r.text, target=r.target_new, other=r.target_true or None)
                 for r in requests)


def caller_items(items: Sequence[tuple[str, str, str | None]]) -> tuple[CompareItem, ...]:
    """Caller-given (prompt, target, other) triples, checked."""
    if len(items) > MAX_CALLER_ITEMS:
        from editserve.control.errors import RequestTooLarge

        raise RequestTooLarge(f"{len(items)} items to compare; the limit is {MAX_CALLER_ITEMS}")
    out = []
    for i, (prompt, target, other) in enumerate(items):
        for name, text in (("prompt", prompt), ("target", target), ("other", other or "")):
            if len(text) > MAX_TEXT_CHARS:
                raise InvalidRequestError(f"item {i}: {name} is {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
        if not prompt or not target:
            raise InvalidRequestError(f"item {i}: prompt and target must be non-empty, got {prompt!r}, {target!r}")
        out.append(CompareItem(kind=CALLER, prompt=prompt, target=target, other=other or None))
    return tuple(out)


async def _tokenizer(engine_client: Any) -> Any:
    tok = engine_client.get_tokenizer()
    return await tok if inspect.isawaitable(tok) else tok


async def _one(engine_client: Any, tok: Any, prompt_ids: list[int], target: str, lora: Any,
               ) -> tuple[float, str, str]:
    """(mean log p of `target`'s tokens after the prompt, greedy next token, weight-version label)."""
    from vllm import SamplingParams

    target_ids = tok.encode(target, add_special_tokens=False)
    if not target_ids:
        raise InvalidRequestError(f"target {target!r} tokenises to nothing")
    seq = list(prompt_ids) + list(target_ids)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    final = None
    async for out in engine_client.generate({"prompt_token_ids": seq}, params,
                                            f"editserve-compare-{secrets.token_hex(8)}", lora_request=lora):
        final = out
    if final is None or final.prompt_logprobs is None:
        raise InvalidRequestError("the engine returned no prompt log-probabilities")
    n = len(prompt_ids)
    total = 0.0
    for j, tid in enumerate(target_ids):
        total += float(final.prompt_logprobs[n + j][tid].logprob)
    first = final.prompt_logprobs[n]
    top_id = next((t for t, lp in first.items() if lp.rank == 1), target_ids[0])
    spans = getattr(final.outputs[0], "weight_versions", None) if final.outputs else None
    label = ",".join(sorted({str(s.version) for s in spans})) if spans else ""
    return total / len(target_ids), tok.decode([top_id]), label


async def score_side(engine_client: Any, items: Sequence[CompareItem], lora: Any) -> tuple[list[SideScore], str]:
    """Score `items` with the adapter `lora` (None: the head), concurrently; and the weight-version
    label(s) vLLM reported for them."""
    tok = await _tokenizer(engine_client)
    calls = []
    for it in items:
        pids = tok.encode(it.prompt)
        calls.append(_one(engine_client, tok, pids, it.target, lora))
        if it.other:
            calls.append(_one(engine_client, tok, pids, it.other, lora))
    results = await asyncio.gather(*calls)
    out, k, labels = [], 0, set()
    for it in items:
        t_lp, top, label = results[k]
        k += 1
        labels.add(label)
        o_lp = None
        if it.other:
            o_lp, _, label = results[k]
            labels.add(label)
            k += 1
        out.append(SideScore(target_logprob=round(t_lp, 5), other_logprob=None if o_lp is None else round(o_lp, 5),
                             top_token=top))
    return out, ",".join(sorted(x for x in labels if x))


def _fraction(rows: Sequence[ComparedRow], kind: str, head: bool) -> float:
    sel = [r for r in rows if r.item.kind == kind and r.item.other]
    if not sel:
        return -1.0
    return sum(1 for r in sel if r.success(r.head if head else r.candidate)) / len(sel)


async def compare(cands: Any, cid: str, extra: Sequence[CompareItem]) -> Comparison:
    """Score the candidate's gate prompts and `extra` on the head and on the candidate."""
    t0 = time.perf_counter()
    cand = cands.get(cid)
    items = tuple(cands.probes(cid)) + tuple(extra)
    if not items:
        raise InvalidRequestError(f"candidate {cid} has no gate prompts; give prompts to compare")
    lora = cands.serving_models.lora_requests.get(cand.model)
    if lora is None or cands.leaving(cid):
        from editserve.candidates.staging import CandidateConflict

        raise CandidateConflict(f"candidate {cid} is being promoted or discarded; nothing to compare")
    engine_client = cands.engine.engine
    served = int(cands.engine.version_mark()[1])
    (head, head_wv), (staged, cand_wv) = await asyncio.gather(score_side(engine_client, items, None),
                                                              score_side(engine_client, items, lora))
    rows = tuple(ComparedRow(item=it, head=h, candidate=c) for it, h, c in zip(items, head, staged))

    def side(is_head: bool, label: str, requests: int, wv: str) -> Side:
        return Side(label=label, efficacy=_fraction(rows, "efficacy", is_head),
                    paraphrase=_fraction(rows, "paraphrase", is_head),
                    neighbourhood=_fraction(rows, "neighbourhood", is_head), requests=requests, weight_version=wv)

    return Comparison(candidate=cid, served_version=served,
                      head=side(True, str(served), cands.head_routed, head_wv),
                      staged=side(False, cand.label(served), cands.routed(cid), cand_wv),
                      rows=rows, seconds=round(time.perf_counter() - t0, 4))
