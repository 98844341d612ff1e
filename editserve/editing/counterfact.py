"""CounterFact records: reading the simplified (EasyEdit/MEND) and the original ROME formats,
and the close-neighbour test set shipped in editserve/data/close_neighbours/.

Simplified: ``{case_id, prompt, subject, target_new, ground_truth, rephrase_prompt,
locality_prompt, locality_ground_truth}`` with the subject written into the prompt.
Original: ``{case_id, requested_rewrite: {prompt: "{} ...", subject, target_new: {str},
target_true: {str}}, paraphrase_prompts, neighborhood_prompts, generation_prompts, ...}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editserve.editing.requests import EditRequest
from editserve.errors import DataError, InvalidRequestError


@dataclass(frozen=True)
class CounterFactRecord:
    case_id: int
    request: EditRequest                 # target_new / target_true with a leading space
    paraphrases: tuple[str, ...]
    neighbourhood: tuple[str, ...]       # prompts whose true object is request.target_true
    generation_prompts: tuple[str, ...] = ()


def _space(s: str) -> str:
    s = s.strip()
    return " " + s


def _from_simplified(d: dict[str, Any]) -> CounterFactRecord:
    req = EditRequest.from_sentence(d["prompt"], d["subject"], _space(d["target_new"]), _space(d["ground_truth"]))
    if d.get("locality_ground_truth") not in (None, d["ground_truth"]):
        raise DataError(f"record {d.get('case_id')}: locality_ground_truth {d['locality_ground_truth']!r} differs from ground_truth")
    return CounterFactRecord(
        case_id=int(d["case_id"]),
        request=req,
        paraphrases=(d["rephrase_prompt"],) if d.get("rephrase_prompt") else (),
        neighbourhood=(d["locality_prompt"],) if d.get("locality_prompt") else (),
    )


def _from_original(d: dict[str, Any]) -> CounterFactRecord:
    rw = d["requested_rewrite"]
    req = EditRequest(prompt=rw["prompt"], subject=rw["subject"],
                      target_new=_space(rw["target_new"]["str"]), target_true=_space(rw["target_true"]["str"]))
    return CounterFactRecord(
        case_id=int(d["case_id"]),
        request=req,
        paraphrases=tuple(d.get("paraphrase_prompts", ())),
        neighbourhood=tuple(d.get("neighborhood_prompts", ())),
        generation_prompts=tuple(d.get("generation_prompts", ())),
    )


def parse_record(d: dict[str, Any]) -> CounterFactRecord:
    try:
        return _from_original(d) if "requested_rewrite" in d else _from_simplified(d)
    except (KeyError, TypeError) as exc:
        raise DataError(f"CounterFact record {d.get('case_id', '?')} lacks field {exc}") from exc


def load_counterfact(path: str | Path, limit: int | None = None, skip_invalid: bool = True) -> list[CounterFactRecord]:
    """Records from a JSON list file in either format; invalid records are skipped (or raise)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"CounterFact file {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"CounterFact file {str(p)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise DataError(f"CounterFact file {str(p)!r} must hold a JSON list of records")
    out = []
    for d in data:
        try:
            out.append(parse_record(d))
        except (InvalidRequestError, DataError):
            if not skip_invalid:
                raise
        if limit is not None and len(out) >= limit:
            break
    return out


CLOSE_NEIGHBOUR_SPLITS = ("tune", "report")


def load_close_neighbours(split: str | None = None) -> list[CounterFactRecord]:
    """The close-neighbour test set (editserve/data/close_neighbours/README.md): edits SmolLM2-135M
    knows, each with 4 neighbourhood prompts about entities closely tied to the subject. `split`:
    "tune" (choose hyper-parameters on it), "report" (report on it) or None (both)."""
    from importlib import resources

    if split is not None and split not in CLOSE_NEIGHBOUR_SPLITS:
        raise InvalidRequestError(f"unknown split {split!r}; choose one of {list(CLOSE_NEIGHBOUR_SPLITS)}")
    f = resources.files("editserve").joinpath("data", "close_neighbours", "close_neighbours.json")
    data = json.loads(f.read_text())
    return [parse_record(d) for d in data if split is None or d["split"] == split]
