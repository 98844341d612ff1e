"""Lifelong editing benchmark: a stream of known CounterFact records committed one after another.

Each commit is computed on the model that holds every earlier one, as the server's sidecar does:
``compute_edit`` on the current model (with the preserved-keys state of the current version), then
``apply_patch``. Single edits or batches (``--batch 1,10,100``), up to ``--n`` edits per run, for
plain ROME, plain MEMIT and AlphaEdit, and gated edits (``--methods gated --neuron-slots 5:1024``: the
model's layer-5 MLP is widened first, as the server's is). At every checkpoint (``--every`` edits) it measures:

- retention: ES and PS over all records committed so far (ES/PS as in editing/evaluate.py);
- NS of those records' neighbourhood prompts, and its ratio to NS on the unedited model;
- fluency: weighted 2/3-gram entropy of greedy 50-token generations from 40 fixed neutral prompts
  (editing/lifelong.py), and its ratio to the unedited model's;
- perplexity of editserve/data/heldout.txt (neutral prose written for this benchmark; not the
  statistics corpus), and its ratio to the unedited model's;
- ‖W − W₀‖_F / ‖W₀‖_F of every edited down-projection;
- seconds per edit (compute + apply, excluding the checkpoint evaluations);
- the share of AlphaEdit's null space the committed keys take at each layer (editing/nullspace.py,
  `null_space_use`: directions of range(P) where the committed keys weigh more than α + λ·threshold,
  over the m directions of range(P)), whatever method wrote the keys.

A run stops early when it has collapsed: retained ES below ``--collapse-es`` (0.5) or held-out
perplexity above ``--collapse-ppl`` (2.0) times the unedited model's, at a checkpoint. The state
records the reason, and a rerun does not continue a collapsed run.

The stream: records of the CounterFact file in file order, kept when the unedited model ranks
the true object above the new one on the rewrite prompt; built once per output folder
(``stream.json``) and shared by every run, so all methods see the same edits.

State is saved at every checkpoint (``<out>/<method>-b<batch>/``: the edited weights, the
preserved-keys blocks, the rows so far) and a rerun of the same command resumes from it
(``--fresh`` starts over). A resumed run loads the saved edited weights as its new base, so later
merges sum from there (float32 rounding may differ from an uninterrupted run in the last bits).

``--corpus`` computes the key statistics from another text (file or folder) than the default
Wikipedia excerpt; ``--consolidate-every K`` re-solves the accumulated update every K edits as the
least-disturbance update with the same outputs on the committed keys (editing/consolidate.py).
Both are recorded in the run's state, and a resume with other values is refused.

    PYTHONPATH=$PWD python bench/lifelong.py --methods alphaedit,rome,memit --n 200 --every 50
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data" / "counterfact" / "counterfact-edit.json"
log = logging.getLogger("lifelong")


@dataclass
class Row:
    n_edits: int
    es: float
    ps: float
    ns: float
    ns_ratio: float
    fluency: float
    fluency_ratio: float
    ppl: float
    ppl_ratio: float
    norm_growth: dict[str, float] = field(default_factory=dict)   # layer -> ‖W − W₀‖/‖W₀‖
    seconds_per_edit: float = float("nan")
    null_space_taken: dict[str, float] = field(default_factory=dict)   # layer -> share of AlphaEdit's null space
    #                                    the committed keys take (editing.nullspace.null_space_use; rows before
    #                                    wave 2 session 10 lack it)


# ---------------------------------------------------------------------------------------- stream


def build_stream(data: Path, n: int, out: Path) -> dict:
    """The first `n` known records of `data` with their unedited scores; cached in out/stream.json."""
    from editserve.editing.counterfact import load_counterfact
    from editserve.editing.evaluate import known_records
    from editserve.editing import load_model
    from editserve.editing.lifelong import FLUENCY_PROMPTS, generation_fluency, heldout_perplexity

    path = out / "stream.json"
    if path.exists():
        s = json.loads(path.read_text())
        same = Path(s["data"]).resolve() == data.resolve()          # a relative --data names the same file
        if not same and any(out.glob("*-b*/state.json")):
            raise SystemExit(f"{out} holds runs on the stream of {s['data']}; give another --out for {data}")
        if same and len(s["case_ids"]) >= n:
            if s.get("fluency_prompts") != len(FLUENCY_PROMPTS):       # the baseline of a changed metric
                model, tok = load_model()
                s["fluency"], s["fluency_prompts"] = generation_fluency(model, tok), len(FLUENCY_PROMPTS)
                path.write_text(json.dumps(s))
            return s
    model, tok = load_model()
    found = known_records(model, tok, load_counterfact(data), n)
    s = {"data": str(data), "case_ids": [r.case_id for r in found.records], "ns_before": [sc.ns for sc in found.scores],
         "scanned": found.scanned,
         "ppl": heldout_perplexity(model, tok), "fluency": generation_fluency(model, tok),
         "fluency_prompts": len(FLUENCY_PROMPTS)}
    path.write_text(json.dumps(s))
    return s


def checkpoint_scores(model, tok, committed, stream: dict) -> tuple[dict, list]:
    """The measures of a checkpoint row for the model as it runs now, after the stream's first
    len(committed) records: ES, PS, NS (and its ratio to the unedited NS of the same records), fluency and
    held-out perplexity (and their ratios to the unedited model's). Also returns each record's scores."""
    from editserve.editing.evaluate import score_records, summarize
    from editserve.editing.lifelong import generation_fluency, heldout_perplexity

    per_record = score_records(model, tok, committed)
    summ = summarize(per_record)
    ns_b = sum(stream["ns_before"][: len(committed)]) / len(committed)
    flu = generation_fluency(model, tok)
    ppl = heldout_perplexity(model, tok)
    return ({"es": summ.es, "ps": summ.ps, "ns": summ.ns, "ns_ratio": summ.ns / ns_b if ns_b else float("nan"),
             "fluency": flu, "fluency_ratio": flu / stream["fluency"], "ppl": ppl, "ppl_ratio": ppl / stream["ppl"]},
            per_record)


# ---------------------------------------------------------------------------------------- one run


def _save(run: Path, model, touched: set[str], preserved, rows: list[Row], done: int, seconds: float,
          setup: dict, collapsed: str | None = None) -> None:
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    tmp = run / "weights.tmp"
    save_file({n: params[n].detach().contiguous() for n in sorted(touched)}, str(tmp))
    tmp.replace(run / "weights.safetensors")
    if preserved.blocks:
        save_file(preserved.tensors(), str(run / "preserved.tmp"))
        (run / "preserved.tmp").replace(run / "preserved.safetensors")
    (run / "state.tmp").write_text(json.dumps({"done": done, "seconds": seconds, "rows": [asdict(r) for r in rows],
                                                   **setup, "collapsed": collapsed}))
    (run / "state.tmp").replace(run / "state.json")


def load_run(run: Path, model):
    """A run's saved state (`_save`): its edited weights copied into `model`, and (edits done,
    seconds, checkpoint rows, touched weight names, preserved keys). Also used by bench/edit_prices.py."""
    from safetensors.torch import load_file

    from editserve.editing.alphaedit import PreservedKeys

    st = json.loads((run / "state.json").read_text())
    weights = load_file(str(run / "weights.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    pk = run / "preserved.safetensors"
    preserved = PreservedKeys.from_tensors(load_file(str(pk))) if pk.exists() else PreservedKeys()
    return st["done"], st["seconds"], [Row(**r) for r in st["rows"]], set(weights), preserved


def _rss_mib() -> float:
    """This process's resident memory (Linux /proc; NaN elsewhere), logged at each checkpoint."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


@dataclass(frozen=True)
class Collapse:
    """When a run counts as collapsed (checked at every checkpoint)."""
    es_below: float = 0.5
    ppl_ratio_above: float = 2.0

    def reason(self, row: Row) -> str | None:
        if row.es < self.es_below:
            return f"retained ES {row.es:.3f} < {self.es_below}"
        if row.ppl_ratio > self.ppl_ratio_above:
            return f"held-out perplexity ×{row.ppl_ratio:.2f} > ×{self.ppl_ratio_above}"
        return None


def run_method(records, stream, method: str, batch: int, n: int, every: int, out: Path,
               hparams: dict | None, fresh: bool, deadline: float, report_only: bool = False,
               collapse: Collapse = Collapse(), corpus_path: str | None = None,
               consolidate_every: int = 0, across_layers: bool = False,
               neuron_slots: dict[int, int] | None = None) -> list[Row]:
    from editserve.editing.alphaedit import PreservedKeys
    from editserve.editing.consolidate import ConsolidateParams
    from editserve.editing.corpus import load_corpus
    from editserve.editing.lifelong import commit, consolidate_model, norm_growth, null_space_uses
    from editserve.memory import trim_heap

    run = out / f"{method}-b{batch}"
    run.mkdir(parents=True, exist_ok=True)
    from editserve.editing import load_model
    from editserve.editing.lifelong import down_proj_weights

    if (run / "state.json").exists() and not fresh:
        st = json.loads((run / "state.json").read_text())
        if st.get("collapsed"):
            log.info("%s: collapsed at %d edits (%s); not continued", run.name, st["done"], st["collapsed"])
        if st["done"] >= n or report_only or st.get("collapsed"):
            return [Row(**r) for r in st["rows"] if r["n_edits"] <= n]
    if report_only:
        return []
    corpus = load_corpus(corpus_path)
    setup = {"corpus": corpus.fingerprint, "consolidate_every": consolidate_every,
             "consolidate_across_layers": across_layers}      # a saved state without a key is not checked on it
    model, tok = load_model()                                   # a fresh model: no merge state from another run
    if neuron_slots:
        from editserve.editing.slots import widen_mlp

        setup["neuron_slots"] = {str(k): v for k, v in sorted(neuron_slots.items())}
        for layer, count in sorted(neuron_slots.items()):       # as the sidecar does (editserve serve --neuron-slots)
            widen_mlp(model, layer, count)
    from editserve.editing.edit import resolve_hparams
    from editserve.editing.hparams import to_dict
    # the method's resolved settings (model file + --hparams): a default that changed between sessions must
    # not change a resumed run's method silently
    setup["hparams"] = json.loads(json.dumps(to_dict(resolve_hparams(model, method, overrides=hparams))))
    if (run / "state.json").exists() and not fresh:
        saved = json.loads((run / "state.json").read_text())
        for key, value in setup.items():
            if key in saved and saved[key] != value:
                raise SystemExit(f"{run} was computed with {key} {saved[key]!r}, this command asks for {value!r}: "
                                 f"pass the same options, another --out, or --fresh")
    w0 = down_proj_weights(model)
    if (run / "state.json").exists() and not fresh:
        done, seconds, rows, touched, preserved = load_run(run, model)
        log.info("%s: resumed at %d edits", run.name, done)
    else:
        done, seconds, rows, touched, preserved = 0, 0.0, [], set(), PreservedKeys()
    since, since_t = 0, 0.0
    while done < n and time.time() < deadline:
        recs = records[done:done + batch]
        t = time.perf_counter()
        res = commit(model, tok, [r.request for r in recs], method, preserved, corpus, hparams)
        dt = time.perf_counter() - t
        trim_heap()                                 # as the sidecar does after each edit (editserve/memory.py)
        preserved = res.preserved
        touched |= set(res.patch.weight_names)
        done += len(recs)
        seconds += dt
        since += len(recs)
        since_t += dt
        if consolidate_every and done % consolidate_every == 0:
            t = time.perf_counter()
            cons = consolidate_model(model, tok, preserved, corpus, w0, hparams if method == "alphaedit" else None,
                                     ConsolidateParams(across_layers=across_layers))
            log.info("%s %d edits: consolidated in %.1fs; tr(ΔW A ΔWᵀ) by layer %s", run.name, done,
                     time.perf_counter() - t, " ".join(f"{c.layer}: {c.penalty_before:.3g}→{c.penalty_after:.3g}"
                                                       for c in cons.values()))
        if done % every == 0 or done >= n:
            scores, _ = checkpoint_scores(model, tok, records[:done], stream)
            row = Row(n_edits=done, **scores, norm_growth={str(k): v for k, v in norm_growth(model, w0).items()}, seconds_per_edit=since_t / since,
                      null_space_taken={str(k): u.ratio for k, u in
                                        null_space_uses(model, tok, preserved, corpus,
                                                        hparams if method == "alphaedit" else None,
                                                        only_cached=True).items()})
            rows.append(row)
            trim_heap()
            since, since_t = 0, 0.0
            collapsed = collapse.reason(row)
            _save(run, model, touched, preserved, rows, done, seconds, setup, collapsed)
            log.info("%s %d edits: ES %.3f PS %.3f NS ratio %.3f ppl ×%.3f fluency ×%.3f max ‖ΔW‖/‖W‖ %.4f %.1fs/edit "
                     "null space taken %s (RSS %.0f MiB)", run.name, done, row.es, row.ps, row.ns_ratio, row.ppl_ratio,
                     row.fluency_ratio, max(row.norm_growth.values(), default=0.0), row.seconds_per_edit,
                     " ".join(f"{k}: {v:.3f}" for k, v in row.null_space_taken.items()), _rss_mib())
            if collapsed:
                log.info("%s: collapsed at %d edits (%s); stopping this run", run.name, done, collapsed)
                break
    return rows


# ---------------------------------------------------------------------------------------- report


def table(results: dict[str, list[Row]]) -> str:
    lines = ["| run | edits | ES | PS | NS ratio | ppl ratio | fluency ratio | max ‖W−W₀‖/‖W₀‖ | s/edit "
             "| max null space taken |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for r in rows:
            taken = f"{max(r.null_space_taken.values()):.3f}" if r.null_space_taken else "—"
            lines.append(f"| {name} | {r.n_edits} | {r.es:.3f} | {r.ps:.3f} | {r.ns_ratio:.3f} | {r.ppl_ratio:.3f} | "
                         f"{r.fluency_ratio:.3f} | {max(r.norm_growth.values(), default=0.0):.4f} | {r.seconds_per_edit:.1f} "
                         f"| {taken} |")
    return "\n".join(lines)


def plot(results: dict[str, list[Row]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    panels = [("es", "retained ES"), ("ps", "retained PS"), ("ns_ratio", "NS / unedited NS"),
              ("ppl_ratio", "held-out perplexity / unedited"), ("fluency_ratio", "fluency / unedited"),
              ("norm", "max ‖W−W₀‖/‖W₀‖")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title) in zip(axes.flat, panels):
        for name, rows in results.items():
            xs = [0] + [r.n_edits for r in rows]
            if key == "norm":
                ys = [0.0] + [max(r.norm_growth.values(), default=0.0) for r in rows]
            else:
                ys = [1.0] + [getattr(r, key) for r in rows]
            ax.plot(xs, ys, marker="o", label=name)
        if key == "ppl_ratio" and max((r.ppl_ratio for rows in results.values() for r in rows), default=1.0) > 3:
            ax.set_yscale("log")             # a collapsed run (×8) would flatten every other curve
            ax.yaxis.set_major_formatter(FormatStrFormatter("×%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("×%g"))
        ax.set_title(title)
        ax.set_xlabel("sequential edits")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    rows_of_legend = -(-len(labels) // 3)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3))
    fig.tight_layout(rect=(0, 0.035 * rows_of_legend, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


GATED_KEYS = ("es", "ps", "ns", "ns_ratio", "fluency", "fluency_ratio", "ppl", "ppl_ratio")


def saved_row(r: dict) -> Row:
    """A saved checkpoint row as a `Row`: this benchmark's, `bench/gated.py`'s ("n", "s_per_edit", and gate
    statistics that a `Row` has no place for: a gated edit leaves the layer's own neurons as they were, so its
    norm growth is empty, read as 0), or a recorded one (bench/recorded/lifelong/*.json) whose unrecorded
    measures are null, read as NaN (a gap in the plot)."""
    if "n" in r:
        r = {"n_edits": r["n"], "seconds_per_edit": r.get("s_per_edit", float("nan")),
             **{k: r[k] for k in GATED_KEYS}}
    nan = float("nan")
    values = {k: nan if v is None else v for k, v in {"ns": nan, "fluency": nan, "ppl": nan, **r}.items()}
    values["norm_growth"] = {k: nan if v is None else v for k, v in values.get("norm_growth", {}).items()}
    return Row(**values)


def compare_runs(specs: list[str], png: str | None) -> int:
    """``--runs``: the saved rows of several run folders, each under its label, in one table and plot."""
    if not png:
        raise SystemExit("--runs needs --plot PATH")
    results: dict[str, list[Row]] = {}
    for spec in specs:
        label, sep, where = spec.partition("=")
        state = Path(where) / "state.json" if Path(where).is_dir() else Path(where)
        if not sep or not label or not state.exists():
            raise SystemExit(f"--runs takes LABEL=DIR with a saved run in DIR (DIR/state.json), or LABEL=FILE.json "
                             f"with its rows, got {spec!r}")
        st = json.loads(state.read_text())
        results[label] = [saved_row(r) for r in st["rows"]]
        if st.get("consolidate_every"):
            log.info("%s: consolidated every %d edits", label, st["consolidate_every"])
    print(table(results))
    plot(results, Path(png))
    print(f"wrote {png}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description="Lifelong (sequential) editing benchmark")
    ap.add_argument("--methods", default="alphaedit,rome,memit")
    ap.add_argument("--batch", default="1", help="comma-separated edits per commit, e.g. 1,10,100")
    ap.add_argument("--n", type=int, default=2000, help="edits per run")
    ap.add_argument("--every", type=int, default=100, help="checkpoint every this many edits")
    ap.add_argument("--data", default=str(SHARED), help="CounterFact JSON (default ../shared/.../counterfact-edit.json)")
    ap.add_argument("--out", default="bench/results/lifelong", help="state and results folder")
    ap.add_argument("--hparams", default=None, help="JSON object: method -> hyper-parameter overrides")
    ap.add_argument("--fresh", action="store_true", help="ignore saved state and start over")
    ap.add_argument("--max-minutes", type=float, default=float("inf"), help="stop starting new commits after this")
    ap.add_argument("--report-only", action="store_true",
                    help="compute nothing: table, JSON and plot from the saved checkpoints only")
    ap.add_argument("--collapse-es", type=float, default=0.5, help="stop a run whose retained ES falls below this")
    ap.add_argument("--collapse-ppl", type=float, default=2.0,
                    help="stop a run whose held-out perplexity ratio rises above this")
    ap.add_argument("--corpus", default=None,
                    help="statistics corpus: a text file or folder (default: the Wikipedia excerpt, editing/corpus.py)")
    ap.add_argument("--consolidate-every", type=int, default=0,
                    help="every this many edits, replace the accumulated update by its least-disturbance "
                         "re-solve on the committed keys (editing/consolidate.py); 0 = never")
    ap.add_argument("--consolidate-across-layers", action="store_true",
                    help="consolidate keeping the edits' summed output over the layer range, not each layer's")
    ap.add_argument("--neuron-slots", default=None, metavar="LAYER:N",
                    help="widen these MLPs by N zero neurons first, as `editserve serve --neuron-slots` does "
                         "(needed by --methods gated)")
    ap.add_argument("--plot", default=None, help="PNG path (default <out>/lifelong.png)")
    ap.add_argument("--runs", nargs="+", metavar="LABEL=DIR", default=None,
                    help="compute nothing: table and plot of saved run folders (<out>/<method>-b<batch>, from "
                         "different --out or settings, or bench/gated.py's) or of recorded rows "
                         "(bench/recorded/lifelong/*.json) under the given labels; --plot is required")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("editserve").setLevel(logging.WARNING)
    if args.runs:
        return compare_runs(args.runs, args.plot)
    from editserve.editing.counterfact import load_counterfact

    deadline = time.time() + 60 * args.max_minutes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stream = build_stream(Path(args.data), args.n, out)
    by_id = {r.case_id: r for r in load_counterfact(Path(args.data))}
    records = [by_id[c] for c in stream["case_ids"]]
    n = min(args.n, len(records))
    overrides = json.loads(args.hparams) if args.hparams else {}
    from editserve.engine.neuron_slots import parse_slots

    slots = parse_slots(args.neuron_slots)
    results: dict[str, list[Row]] = {}
    for b in [int(x) for x in args.batch.split(",")]:
        for m in [x for x in args.methods.split(",") if x]:
            results[f"{m}-b{b}"] = run_method(records, stream, m, b, n, args.every, out,
                                              overrides.get(m), args.fresh, deadline, args.report_only,
                                              Collapse(args.collapse_es, args.collapse_ppl), args.corpus,
                                              args.consolidate_every, args.consolidate_across_layers, slots)
    print(f"\nstream: {len(records)} known records of {stream['scanned']} scanned in {args.data}; unedited "
          f"held-out perplexity {stream['ppl']:.2f}, fluency {stream['fluency']:.3f}")
    print(table(results))
    for name in results:
        state = out / name / "state.json"
        if state.exists() and json.loads(state.read_text()).get("collapsed"):
            st = json.loads(state.read_text())
            print(f"{name}: collapsed at {st['done']} edits: {st['collapsed']}")
    (out / "lifelong.json").write_text(json.dumps(
        {"stream": {k: stream[k] for k in ("data", "scanned", "ppl", "fluency")},
         "runs": {k: [asdict(r) for r in v] for k, v in results.items()}}, indent=1))
    png = Path(args.plot) if args.plot else out / "lifelong.png"
    plot(results, png)
    print(f"wrote {out / 'lifelong.json'} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
