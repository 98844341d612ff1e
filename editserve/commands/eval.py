"""``editserve eval``: CounterFact (or close-neighbour) evaluation of ROME, MEMIT or AlphaEdit, table + JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from editserve.commands import parse_hparams
from editserve.errors import DataError

_SHARED_DEFAULT = Path("../shared/data/counterfact/counterfact-edit.json")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="CounterFact evaluation (ES/PS/NS/EM/PM/NM/S/fluency) before and after edits")
    p.add_argument("--method", default="rome", choices=["rome", "memit", "alphaedit"])
    p.add_argument("--records", type=int, default=50, help="number of known records to edit")
    p.add_argument("--batch", type=int, default=None, help="edits per MEMIT batch (default: all records in one batch)")
    p.add_argument("--data", default=None, help="CounterFact JSON (simplified or original format); "
                   "default $EDITSERVE_COUNTERFACT or ../shared/data/counterfact/counterfact-edit.json")
    p.add_argument("--close-neighbours", default=None, choices=["tune", "report", "all"],
                   help="evaluate on the shipped close-neighbour set (this half) instead of CounterFact")
    p.add_argument("--hparams", default=None, help="JSON object of hyper-parameter overrides, e.g. '{\"alpha\": 1}'")
    p.add_argument("--model", default=None, help="checkpoint directory (default: embedded SmolLM2-135M)")
    p.add_argument("--layers", default=None, help="comma-separated edit layers (default: per-model hyper-parameters)")
    p.add_argument("--fluency", action="store_true", help="also score generation fluency (needs generation prompts)")
    p.add_argument("--out", default="eval.json", help="where to write the JSON report")
    p.set_defaults(func=run)


def _data_path(arg: str | None) -> Path:
    for cand in (arg, os.environ.get("EDITSERVE_COUNTERFACT"), str(_SHARED_DEFAULT)):
        if cand:
            p = Path(cand).expanduser()
            if p.is_file():
                return p
            if cand == arg:
                raise DataError(f"CounterFact file {cand!r} does not exist")
    raise DataError("no CounterFact data: pass --data PATH or set EDITSERVE_COUNTERFACT")


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def run(args: argparse.Namespace) -> int:
    from editserve.editing import compute_patch, load_model
    from editserve.editing.counterfact import load_counterfact
    from editserve.editing.evaluate import evaluate

    if args.close_neighbours:
        from editserve.editing.counterfact import load_close_neighbours

        records = load_close_neighbours(None if args.close_neighbours == "all" else args.close_neighbours)
    else:
        records = load_counterfact(_data_path(args.data))
    hparams = parse_hparams(args.hparams)
    model, tok = load_model(args.model)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    batch = 1 if args.method == "rome" else (args.batch or args.records)
    report = evaluate(
        model, tok, records,
        make_patch=lambda recs: compute_patch(model, tok, [r.request for r in recs], method=args.method, layers=layers,
                                         hparams=hparams),
        n_known=args.records, batch=batch, method=args.method, with_fluency=args.fluency,
    )
    print(f"\n{args.method.upper()}: {report.records_edited} edits (batch {batch}); "
          f"{report.records_known}/{report.records_scanned} scanned records known")
    print(f"{'':8} {'ES':>6} {'PS':>6} {'NS':>6} {'EM':>7} {'PM':>7} {'NM':>7} {'S':>6} {'fluency':>8}")
    for name, s in (("before", report.before), ("after", report.after)):
        print(f"{name:8} {_fmt(s.es):>6} {_fmt(s.ps):>6} {_fmt(s.ns):>6} {_fmt(s.em):>7} {_fmt(s.pm):>7} "
              f"{_fmt(s.nm):>7} {_fmt(s.s):>6} {_fmt(s.fluency):>8}")
    print(f"NS after/before {report.ns_ratio:.3f}; {report.seconds_per_edit:.2f} s per edit ("
          + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()) + ")")
    Path(args.out).write_text(json.dumps(report.to_dict(), indent=1))
    print(f"wrote {args.out}")
    return 0
