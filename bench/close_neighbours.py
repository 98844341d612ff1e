"""Build the close-neighbour test set editserve/data/close_neighbours/close_neighbours.json.

Reads the hand-written groups in editserve/data/close_neighbours/candidates.json (entities that
share one fact: landmarks of one city, products of one maker, members of one band, ...) and keeps,
on the embedded SmolLM2-135M-Instruct, the edits the model knows and whose neighbours it knows:

- a subject is an edit candidate for a new object n when P(true) > P(n) on its prompt (known);
- its neighbourhood prompts are the group's other members, same prompt, same true object, kept
  only when the model also ranks the true object above n on them; the edit is kept with the
  first 4 such members (list order), else dropped;
- at most `--per-group` edits per group (first known members, in list order), the new objects
  alternating between the group's two candidates;
- split by group: even-numbered groups form the "tune" half, odd-numbered ones the "report" half,
  so no neighbour prompt is shared between halves.

Records are written in CounterFact's original format (load with editing.counterfact.load_counterfact)
plus "split" and "group" fields.

    PYTHONPATH=$PWD python bench/close_neighbours.py
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1] / "editserve" / "data" / "close_neighbours"
log = logging.getLogger("close_neighbours")


def build(model, tok, cand: dict, per_group: int = 2, n_neigh: int = 4) -> list[dict]:
    from editserve.editing.scoring import target_nll

    out = []
    for gi, g in enumerate(cand["groups"]):
        kind = cand["kinds"][g["kind"]]
        prompts = [kind["prompt"].format(m) for m in g["members"]]
        answers = [g["answer"]] + list(g["new"])
        ps, ts = [], []
        for p in prompts:
            for a in answers:
                ps.append(p)
                ts.append(a)
        nll = target_nll(model, tok, ps, ts).view(len(prompts), len(answers))     # [members, 1 + n_new]
        knows = nll[:, :1] < nll[:, 1:]                                           # [members, n_new]
        taken = 0
        for si, subject in enumerate(g["members"]):
            if taken >= per_group:
                break
            j = taken % len(g["new"])
            if not knows[si, j]:
                continue
            neigh = [prompts[k] for k in range(len(prompts)) if k != si and knows[k, j]][:n_neigh]
            if len(neigh) < n_neigh:
                continue
            out.append({
                "case_id": 100_000 + len(out),
                "group": gi,
                "kind": g["kind"],
                "split": "tune" if gi % 2 == 0 else "report",
                "requested_rewrite": {"prompt": kind["prompt"], "subject": subject,
                                      "target_new": {"str": g["new"][j].strip()},
                                      "target_true": {"str": g["answer"].strip()}},
                "paraphrase_prompts": [kind["paraphrase"].format(subject)],
                "neighborhood_prompts": neigh,
                "generation_prompts": [],
            })
            taken += 1
        log.info("group %d %s%s: %d edits (known: %s)", gi, g["kind"], g["answer"], taken,
                 knows.all(dim=1).sum().item())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-group", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "close_neighbours.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from editserve.editing import load_model

    model, tok = load_model()
    torch.manual_seed(0)
    cand = json.loads((ROOT / "candidates.json").read_text())
    recs = build(model, tok, cand, args.per_group)
    Path(args.out).write_text(json.dumps(recs, indent=1, ensure_ascii=False) + "\n")
    n_t = sum(r["split"] == "tune" for r in recs)
    print(f"{len(recs)} edits ({n_t} tune, {len(recs) - n_t} report) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
