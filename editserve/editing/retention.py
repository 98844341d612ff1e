"""Retention of committed facts: does an edited model still hold the facts of earlier edits?

A committed fact is one edit request of an active patch (its rewrite prompt with the subject
filled in, its new target and the object it replaced) and the ledger version that added it.
It *holds* on a model when the new target is the more likely continuation of the rewrite
prompt — the efficacy outcome of `editserve.editing.scoring.fact_success`, the one meaning
the probe gate and the CounterFact evaluation use. A fact whose replaced object is not known
(an edit committed with the gate skipped, or imported, whose request named none) holds when
the model answers the new target greedily: every target token the most likely next token.

`sample_facts` draws a fixed-size sample (facts "at risk" — about a given subject — first,
the rest by a seeded random draw, so a sample is reproducible); `facts_hold` scores a list of
facts on a model in batches; `RetentionGate` configures the retention part of the commit gate
(`editserve.control.gate`). Used there and by the retention probe (`editserve.engine.health`).
Imports torch only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from editserve.errors import InvalidRequestError


@dataclass(frozen=True)
class CommittedFact:
    """One edit request of an active patch, with the version that committed it."""

    version: int
    prompt: str            # the rewrite prompt with the subject filled in
    subject: str
    target_new: str
    target_true: str       # the object the edit replaced (what the new target must outscore); "" unknown

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return f"version {self.version}: {self.prompt!r} -> {self.target_new!r} (was {self.target_true!r})"


@dataclass(frozen=True)
class RetentionGate:
    """The retention check of the commit gate (`editserve.control.gate.check_retention`):
    `sample_size` committed facts (0: off); refuse when more than `max_drop` of those that held
    before the candidate patch no longer hold with it."""

    sample_size: int = 16
    max_drop: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.sample_size, bool) or not isinstance(self.sample_size, int) or self.sample_size < 0:
            raise InvalidRequestError(f"retention gate sample_size must be an integer >= 0, got {self.sample_size!r}")
        v = self.max_drop
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise InvalidRequestError(f"retention gate max_drop must be a number in [0, 1], got {v!r}")

    @property
    def enabled(self) -> bool:
        return self.sample_size > 0


def _subject_key(subject: str) -> str:
    return " ".join(subject.lower().split())


def sample_facts(facts: Sequence[CommittedFact], size: int, seed: int,
                 at_risk: Iterable[str] = ()) -> list[CommittedFact]:
    """Up to `size` of `facts`: first those whose subject is one of `at_risk` (case and spacing
    ignored; newest first), then a uniform random draw (``random.Random(seed)``) from the rest,
    kept in ledger order. ``size <= 0`` gives an empty sample."""
    if size <= 0 or not facts:
        return []
    risky = {_subject_key(s) for s in at_risk}
    first = [f for f in reversed(facts) if _subject_key(f.subject) in risky][:size]
    chosen = set(id(f) for f in first)
    rest = [f for f in facts if id(f) not in chosen]
    k = min(size - len(first), len(rest))
    drawn = sorted(random.Random(seed).sample(range(len(rest)), k)) if k > 0 else []
    return first + [rest[i] for i in drawn]


def with_replaced_objects(facts: Sequence[CommittedFact],
                          report_of: Callable[[int], Mapping[str, Any] | None]) -> list[CommittedFact]:
    """`facts` with the replaced object filled in where the request had none, from the probe gate's
    efficacy rows in the probe report of the version that committed each (``report_of(version)``,
    read once per version: the greedy answer the gate used then). A fact whose replaced object is
    still unknown (gate skipped, imported) is kept as it is: `facts_hold` checks it greedily."""
    from dataclasses import replace

    out, reports = [], {}
    for f in facts:
        if f.target_true:
            out.append(f)
            continue
        if f.version not in reports:
            reports[f.version] = report_of(f.version) or {}
        rows = (reports[f.version].get("gate") or {}).get("rows") or ()
        true = next((r["target_true"] for r in rows if r.get("kind") == "efficacy" and r.get("prompt") == f.prompt
                     and r.get("target_new") == f.target_new), "")
        out.append(replace(f, target_true=true) if true else f)
    return out


def facts_hold(model: torch.nn.Module, tok: Any, facts: Sequence[CommittedFact],
               batch_size: int = 32) -> list[tuple[bool, float, float]]:
    """Per fact: (holds, mean log p(target_new), mean log p(target_true)) on `model` as it is. For a
    fact with no known replaced object the third value is the mean log-probability of the model's
    most likely tokens along the target (equal to the second where the fact holds)."""
    from editserve.editing.scoring import fact_success, target_scores

    if not facts:
        return []
    known = [i for i, f in enumerate(facts) if f.target_true]
    prompts = [f.prompt for f in facts] + [facts[i].prompt for i in known]
    targets = [f.target_new for f in facts] + [facts[i].target_true for i in known]
    scores = target_scores(model, tok, prompts, targets, batch_size=batch_size)
    n = len(facts)
    new = [-float(x) for x in scores.nll[:n]]
    out = [(bool(scores.greedy[i]), new[i], float(scores.top_logprob[i])) for i in range(n)]
    for j, i in enumerate(known):
        true = -float(scores.nll[n + j])
        out[i] = (fact_success("efficacy", new[i], true), new[i], true)
    return out
