"""Build the packaged neighbour pool ``editserve/data/neighbours.json`` from CounterFact.

``python -m editserve.control.pool ../shared/data/counterfact [out.json]``

The pool has two parts, both derived from CounterFact records (simplified or original format):

- ``by_object``: true object → filled prompts of records with that true object (their own
  prompt with their subject), used as automatically drawn neighbourhood prompts;
- ``templates``: prompt template → other templates of the same relation, derived from the
  records' paraphrase prompts (subject replaced by ``{}``, any leading filler sentence cut).

Sizes are capped so that the file stays under 300 KB; a user pool in the same format can be
given with ``EDITSERVE_NEIGHBOUR_POOL`` (docs/control.md).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from editserve.errors import DataError

MAX_BYTES = 300_000


def build_pool(records: list, per_object: int = 12, per_template: int = 4, max_objects: int = 900) -> dict:
    by_object: dict[str, list[str]] = defaultdict(list)
    templates: dict[str, set[str]] = defaultdict(set)
    for rec in records:
        req = rec.request
        obj = (req.target_true or "").strip()
        if obj and len(by_object[obj]) < per_object:
            by_object[obj].append(req.text)
        for para in rec.paraphrases:
            if req.subject in para:
                tail = para[para.rfind(". ", 0, para.find(req.subject)) + 2:] if ". " in para[:para.find(req.subject)] \
                    else para
                t = tail.replace(req.subject, "{}", 1)
                if t.count("{}") == 1 and "{" not in t.replace("{}", "") and "}" not in t.replace("{}", "") \
                        and t != req.prompt and len(t) < 120:
                    templates[req.prompt].add(t.strip())
    objects = sorted((o for o in by_object if len(by_object[o]) >= 2), key=lambda o: -len(by_object[o]))[:max_objects]
    pool = {"source": "CounterFact (MIT), grouped by true object",
            "by_object": {o: by_object[o] for o in sorted(objects)},
            "templates": {t: sorted(v)[:per_template] for t, v in sorted(templates.items()) if v}}
    return pool


def main(argv: list[str]) -> int:
    from editserve.editing.counterfact import load_counterfact
    from editserve.control.probe import POOL_FILE

    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    src = Path(argv[0])
    files = sorted(src.glob("counterfact*.json")) if src.is_dir() else [src]
    records = [r for f in files for r in load_counterfact(f)]
    if not records:
        raise DataError(f"no CounterFact records under {str(src)!r}")
    out = Path(argv[1]) if len(argv) > 1 else POOL_FILE
    per_object, max_objects = 12, 900
    while True:
        text = json.dumps(build_pool(records, per_object=per_object, max_objects=max_objects), separators=(",", ":"))
        if len(text.encode()) <= MAX_BYTES:
            break
        max_objects = int(max_objects * 0.85)
    out.write_text(text)
    pool = json.loads(text)
    print(f"wrote {out}: {len(pool['by_object'])} objects, {len(pool['templates'])} templates, {len(text)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
