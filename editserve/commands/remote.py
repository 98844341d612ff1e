"""Commands that talk to a running server's gRPC control plane (`editserve.client.EditClient`):
``editserve edit|rollback|revert|versions|show|diff|probe|status|watch``.

(The same operations on a ledger directory, without a server, are ``editserve ledger ...``,
`editserve.commands.ledger`.) Server: ``--server HOST:PORT`` or ``EDITSERVE_GRPC_TARGET``
(default 127.0.0.1:50051); token: ``--token``, ``--token-file`` or ``EDITSERVE_CONTROL_TOKEN``, else the
admin token that a server on this machine wrote to ``$EDITSERVE_HOME/control-tokens.json``
(`editserve.client.resolve_token`); TLS: ``--ca`` (and ``--cert``/``--key`` for mutual TLS). ``edit`` shows a progress bar on stderr, fed by the
edit's progress events (``WatchEvents``); ``--no-progress`` turns it off.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from editserve.commands import parse_hparams
from editserve.editing.requests import METHODS

COMMANDS = ("edit", "rollback", "revert", "consolidate", "versions", "show", "diff", "probe", "status", "watch")


def _conn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None, help="HOST:PORT of the gRPC control plane (else $EDITSERVE_GRPC_TARGET)")
    add_token_options(p)
    p.add_argument("--ca", default=None, help="CA certificate (PEM) for TLS")
    p.add_argument("--cert", default=None, help="client certificate (PEM) for mutual TLS")
    p.add_argument("--key", default=None, help="client key (PEM) for mutual TLS")
    p.add_argument("--json", action="store_true", help="print the raw response as JSON")


def add_token_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--token`` and ``--token-file`` (shared with ``editserve trace --server``)."""
    p.add_argument("--token-file", default=None,
                   help=prefix + "file holding the bearer token (else $EDITSERVE_CONTROL_TOKEN, else the local admin "
                        "token in $EDITSERVE_HOME/control-tokens.json)")
    p.add_argument("--token", default=None, help=prefix + "the bearer token itself (visible in the process list: "
                                                       "prefer --token-file)")


def _add(sub: argparse._SubParsersAction, name: str) -> None:
    if name == "edit":
        p = sub.add_parser("edit", help="edit a fact on the served model (probe gate, commit, live swap)")
        p.add_argument("--prompt", required=True, help='template with "{}" for the subject')
        p.add_argument("--subject", required=True)
        p.add_argument("--target-new", required=True)
        p.add_argument("--target-true", default="")
        p.add_argument("--method", default="", choices=["", *METHODS],
                       help="editing method (default: the server's: EDITSERVE_DEFAULT_METHOD there, else gated "
                            "with neuron slots, else alphaedit)")
        p.add_argument("--layer", type=int, action="append", default=[])
        p.add_argument("--hparams", default=None,
                       help="JSON object of hyper-parameter overrides, e.g. '{\"value\": {\"max_steps\": 40}}' "
                            "(allowed keys and bounds: docs/security.md)")
        p.add_argument("--dry-run", action="store_true", help="probe only, commit nothing")
        p.add_argument("--expected-head", type=int, default=None)
        p.add_argument("--idempotency-key", default="")
        p.add_argument("--paraphrase", action="append", default=[], help="paraphrase prompt for the gate")
        p.add_argument("--neighbour", action="append", default=[], help="neighbourhood prompt for the gate")
        for t in ("min-efficacy", "min-paraphrase", "max-ns-drop", "max-canary-kl"):
            p.add_argument(f"--{t}", type=float, default=None)
        p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    elif name == "rollback":
        p = sub.add_parser("rollback", help="serve version V (the ledger head moves there)")
        p.add_argument("version", type=int)
        p.add_argument("--expected-head", type=int, default=None)
    elif name == "revert":
        p = sub.add_parser("revert", help="serve a new version without the patch of version V (later patches kept, "
                                          "or recomputed on the new base with --rebase)")
        p.add_argument("version", type=int)
        p.add_argument("--expected-head", type=int, default=None)
        p.add_argument("--idempotency-key", default="")
        p.add_argument("--rebase", action="store_true",
                       help="recompute every later patch on the new base on the server's sidecar (one swap at the "
                            "end); prints each later edit's probe scores before → after")
        p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr (with --rebase)")
        p.add_argument("--max-drop", type=float, default=None,
                       help="when a consolidation holds the patch: share of the other facts that hold now allowed "
                            "to stop holding (default 0)")
    elif name == "consolidate":
        p = sub.add_parser("consolidate", help="replace the active patches that carry preserved keys by one "
                                               "least-disturbance patch on the server (one swap; admin)")
        p.add_argument("--expected-head", type=int, default=None)
        p.add_argument("--idempotency-key", default="")
        p.add_argument("--ridge", type=float, default=None, help="μ of A = C + μ·(tr C/d)·I (server default 0.1)")
        p.add_argument("--max-drop", type=float, default=None,
                       help="share of the committed facts that hold now allowed to stop holding (default 0)")
        p.add_argument("--whole", action="store_true", default=None,
                       help="re-solve the earlier consolidated patches too (after the ridge or the statistics changed)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    elif name == "versions":
        p = sub.add_parser("versions", help="the server's ledger versions (head marked *)")
        p.add_argument("--limit", type=int, default=0, help="only the last N versions")
    elif name == "show":
        p = sub.add_parser("show", help="one version on the server: facts, method, patches, probe report")
        p.add_argument("version", type=int)
    elif name == "diff":
        p = sub.add_parser("diff", help="patches and ‖ΔW‖ between two versions on the server")
        p.add_argument("a", type=int)
        p.add_argument("b", type=int)
    elif name == "probe":
        p = sub.add_parser("probe", help="score a continuation on the live version")
        p.add_argument("prompt")
        p.add_argument("target")
        p.add_argument("other", nargs="?", default="")
    elif name == "status":
        p = sub.add_parser("status", help="served model, head version, sidecar parity, patch count")
    elif name == "watch":
        p = sub.add_parser("watch", help="stream commits, rollbacks, rejections and edit progress")
        p.add_argument("--since", type=int, default=0, help="ledger events after this id")
        p.add_argument("--history", action="store_true", help="replay the whole audit log first")
        p.add_argument("--count", type=int, default=0, help="stop after N events")
    else:
        raise ValueError(name)
    _conn(p)
    p.set_defaults(func=run, remote_command=name)


def register(sub: argparse._SubParsersAction) -> None:
    for name in COMMANDS:
        _add(sub, name)


def _client(args: argparse.Namespace) -> Any:
    from editserve.client import EditClient, resolve_token

    token, _source = resolve_token(getattr(args, "token", None), getattr(args, "token_file", None))
    return EditClient(args.server, token, ca=args.ca, cert=args.cert, key=args.key)


def _shown(text: str) -> str:
    """A target as it is scored, quoted so that a leading space is visible (``" Rome"``)."""
    return json.dumps(text, ensure_ascii=False)


def target_warnings(prompt: str, target_new: str, target_true: str = "") -> list[str]:
    """One line per target that does not start with a space: the model would continue the prompt
    right after its last word (learning "ofRome" instead of "of Rome")."""
    words = prompt.replace("{}", "X").split()
    last = words[-1] if words else ""
    out = []
    for flag, value, effect in (("--target-new", target_new, "the model would learn"),
                                ("--target-true", target_true, "the gate would score")):
        if value and not value[0].isspace():
            out.append(f"editserve: warning: {flag} {_shown(value)} has no leading space: {effect} {_shown(last + value)} "
                       f"(glued to the prompt's last word); did you mean {_shown(' ' + value)}?")
    return out


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class ProgressBar:
    """An edit's progress on `stream` (stderr): on a terminal one bar redrawn in place with the
    elapsed time; otherwise one line per stage."""

    WIDTH = 24

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.fraction = 0.0
        self.text = "waiting for the server"
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="editserve-progress-bar", daemon=True)
        self._width = 0

    def _line(self) -> str:
        done = int(round(self.fraction * self.WIDTH))
        return (f"{self.label} [{'#' * done}{'.' * (self.WIDTH - done)}] {self.fraction * 100:3.0f}% "
                f"{_cut(self.text, 60)} ({time.monotonic() - self._t0:.1f} s)")

    def _draw(self) -> None:
        line = self._line()
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                self._draw()

    def update(self, event: Any) -> None:
        """One ``Event`` of the edit (kind ``progress`` or ``rejected``)."""
        with self._lock:
            if event.kind == "progress":
                self.fraction = max(self.fraction, min(1.0, float(event.progress)))
            self.text = event.message if event.kind == "progress" else f"rejected: {event.message}"
            if self.tty:
                self._draw()
            else:
                self.stream.write(f"[{self.fraction * 100:3.0f}%] {_cut(self.text, 120)}\n")
                self.stream.flush()

    def __enter__(self) -> "ProgressBar":
        if self.tty:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.tty:
            self._thread.join()
            with self._lock:
                self.stream.write("\r" + " " * self._width + "\r")
                self.stream.flush()


def _dump(msg: Any) -> str:
    from google.protobuf.json_format import MessageToDict

    return json.dumps(MessageToDict(msg, preserving_proto_field_name=True), indent=2)


def _report_table(report: Any) -> str:
    para = f"{report.paraphrase:.2f}" if report.paraphrase >= 0 else "-"
    ns = (f"{report.neighbourhood_before:.2f}→{report.neighbourhood_after:.2f}"
          if report.neighbourhood_before >= 0 else "-")
    lines = [f"probe gate: {'PASSED' if report.passed else 'REJECTED'}  efficacy {report.efficacy:.2f}  "
             f"paraphrase {para}  NS {ns}  canary KL {report.canary_kl_mean:.4f} (max {report.canary_kl_max:.4f}, "
             f"{report.canaries} prompts)  {report.seconds:.1f} s"]
    lines += [f"  failed: {f}" for f in report.failures]
    rows = [[r.kind, _cut(r.prompt, 50), _shown(r.target_new), f"{r.new_logprob_before:.2f}→{r.new_logprob_after:.2f}",
             _shown(r.target_true) if r.target_true else "-", f"{r.true_logprob_before:.2f}→{r.true_logprob_after:.2f}",
             row_verdict(r)] for r in report.rows]
    if rows:
        lines.append(_table(rows, ["kind", "prompt", "new", "log p(new)", "true", "log p(true)", "ok"]))
    return "\n".join(lines)


def row_verdict(r: Any) -> str:
    """The "ok" cell of a gate row. Efficacy and paraphrase rows: did the new target win after the edit.
    A neighbourhood row is judged against where it stood before: one the model already got wrong
    (the new target above the true one before the edit) is not the edit's failure."""
    if r.kind != "neighbourhood":
        return "yes" if r.success else "NO"
    right_before = r.true_logprob_before > r.new_logprob_before
    if right_before:
        return "yes" if r.success else "NO (broken by the edit)"
    return "fixed by the edit" if r.success else "was wrong before (unchanged)"


def _fact_text(f: Any) -> str:
    return f"{f.prompt.replace('{}', f.subject)} → {_shown(f.target_new)}"


def _what(v: Any) -> str:
    if v.kind == "base":
        return "base model"
    if v.kind == "revert" and v.facts:             # a consolidated patch re-solved without a reverted fact
        return (f"revert out of consolidated {', '.join(p[:12] for p in v.removed[:1])}: "
                f"{len(v.facts)} facts stay" + (f", recomputes {len(v.added) - 1}" if len(v.added) > 1 else ""))
    if v.kind == "revert":
        return "revert: removes " + ", ".join(p[:12] for p in v.removed[:1]) + (
            f", recomputes {len(v.added)}" if v.added else "")
    if v.kind == "consolidate":
        return f"consolidation of {len(v.removed)} patches ({len(v.facts)} facts)"
    if v.facts:
        return "; ".join(_fact_text(f) for f in v.facts)
    if v.kind == "import":
        return f"import of {len(v.added)} patch(es)"
    return ""


def run(args: argparse.Namespace) -> int:
    from editserve.client import ControlError

    cmd = args.remote_command
    try:
        with _client(args) as c:
            return _run(c, cmd, args)
    except ControlError as exc:
        print(f"editserve: {exc}{_hint(exc, args)}", file=sys.stderr)
        if exc.report is not None:
            print(_report_table(exc.report), file=sys.stderr)
        return 3


def statistics_text(st: Any) -> str:
    """One line for the covariance-statistics warm-up (a StatusResponse's ``statistics``, or the
    dict of ``SidecarClient.statistics()``): state, percent, layers, seconds, error."""
    get = st.get if isinstance(st, dict) else lambda k: getattr(st, k)
    layers = list(get("layers") or [])
    where = f" for layers {', '.join(str(x) for x in layers)}" if layers else ""
    text = f"{get('state')}{where}"
    if get("state") == "building":
        text += f": {float(get('fraction')) * 100:.0f}% after {float(get('seconds')):.0f} s"
    elif get("state") == "ready":
        text += f" ({float(get('seconds')):.0f} s)"
    if get("error"):
        text += f"; {get('error')}"
    return text


def health_text(h: Any) -> str:
    """One line for the retention probe's last run (a StatusResponse's ``health``): the version,
    facts holding, held-out perplexity ratio and the fullest layer's null-space share."""
    if not h.probe_enabled:
        return "retention probe off"
    if h.version < 0:
        return "no probe run yet" + (f" (last error: {h.last_error})" if h.last_error else "")
    text = f"version {h.version}: "
    text += (f"{h.held} of {h.sampled} sampled facts hold ({h.facts} committed)" if h.sampled
             else "no committed fact")
    text += f"; held-out perplexity ×{h.perplexity_ratio:.4f}" if h.HasField("perplexity_ratio") else \
        "; held-out perplexity not measured"
    if h.null_space_taken:
        layer, share = max(h.null_space_taken.items(), key=lambda kv: kv[1])
        text += f"; null space taken {share:.0%} at layer {layer}"
    if h.last_error:
        text += f" (the latest run failed: {h.last_error})"
    return text


def bounds_text(h: Any) -> str:
    """The gate's health bounds (a StatusResponse's ``health``)."""
    retention = (f"retention: {h.retention_gate_sample} facts, max drop {h.retention_gate_max_drop:g}"
                 if h.retention_gate_sample else "retention check off")
    damage = f"damage: perplexity ≤ ×{h.max_perplexity_ratio:g}" if h.max_perplexity_ratio else "damage bound off"
    if h.max_perplexity_ratio > 1.0 and h.HasField("perplexity_ratio"):
        # how much of the budget the served version has spent (every edit spends some: docs/lifelong.md)
        used = (h.perplexity_ratio - 1.0) / (h.max_perplexity_ratio - 1.0)
        damage += f", {max(used, 0.0):.0%} of it spent at version {h.version}"
    return f"{retention}; {damage} (held-out text: {h.heldout_text or 'packaged'})"


def _hint(exc: Any, args: argparse.Namespace) -> str:
    """What to try next, for the errors a new user meets first (kept on the same line)."""
    from editserve.client import TOKEN_HINT

    if exc.code == "UNAUTHENTICATED":
        return f" (check the token; {TOKEN_HINT})"
    if exc.code == "PERMISSION_DENIED":
        return " (this token's role is too low for the call; use an editor or admin token)"
    if exc.code == "UNAVAILABLE":
        where = args.server or "the default 127.0.0.1:50051"
        return f" (is `editserve serve` running with its gRPC control plane on {where}? see --server)"
    return ""


def _run(c: Any, cmd: str, args: argparse.Namespace) -> int:
    if cmd == "edit":
        return _edit(c, args)
    if cmd == "revert" and args.rebase:
        return _rebase(c, args)
    if cmd == "consolidate":
        return _consolidate(c, args)
    if cmd in ("rollback", "revert"):
        if cmd == "rollback":
            ch = c.rollback(args.version, expected_head=args.expected_head)
        else:
            ch = c.revert(args.version, expected_head=args.expected_head, idempotency_key=args.idempotency_key,
                          max_drop=args.max_drop)
        print(_dump(ch) if args.json else f"now serving version {ch.version} (was {ch.previous_version}); "
              f"{ch.active_patches} active patch(es); pause {ch.pause_ms:.1f} ms")
        return 0
    if cmd == "versions":
        r = c.versions(args.limit)
        if args.json:
            print(_dump(r))
            return 0
        served_by: dict[int, list[str]] = {}
        for rep in c.status().fleet:                    # which live replica serves which version
            if rep.live:
                served_by.setdefault(rep.version, []).append(rep.replica_id)
        rows = [["*" if v.is_head else "", v.version, v.parent if v.HasField("parent") else "", v.kind,
                 v.patch_id[:12], v.method, v.caller, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created_at)),
                 _cut(_what(v), 70), ",".join(served_by.get(v.version, []))] for v in r.versions]
        print(f"head = version {r.head}")
        print(_table(rows, ["", "version", "parent", "kind", "patch", "method", "caller", "created", "edit",
                            "served by"]))
        return 0
    if cmd == "show":
        v = c.get_version(args.version)
        if args.json:
            print(_dump(v))
            return 0
        rows = [["version", f"{v.version}{'  (head)' if v.is_head else ''}"],
                ["parent", v.parent if v.HasField("parent") else "-"], ["kind", v.kind], ["caller", v.caller],
                ["created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created_at))],
                ["patch", v.patch_id or "-"], ["method", v.method or "-"],
                ["added", ", ".join(p[:12] for p in v.added) or "-"],
                ["removed", ", ".join(p[:12] for p in v.removed) or "-"]]
        rows += [[f"fact {i}", _fact_text(f) + (f" (was {_shown(f.target_true)})" if f.target_true else "")]
                 for i, f in enumerate(v.facts)]
        if v.idempotency_key:
            rows.append(["idempotency key", v.idempotency_key])
        print(_table(rows, ["", "value"]))
        if v.probe_report_json:
            gate = json.loads(v.probe_report_json).get("gate")
            if gate:
                from editserve.control.convert import report_to_pb

                print(_report_table(report_to_pb(gate)))
        return 0
    if cmd == "diff":
        d = c.diff(args.a, args.b)
        if args.json:
            print(_dump(d))
            return 0
        print(f"version {d.a} → version {d.b}: {len(d.common)} patch(es) in both, {len(d.only_a)} only in {d.a}, "
              f"{len(d.only_b)} only in {d.b}")
        for label, ids in ((f"only in {d.a}", d.only_a), (f"only in {d.b}", d.only_b)):
            for pid in ids:
                print(f"  {label}: {pid[:12]}")
        if d.weights:
            print(_table([[w.layer, w.name, f"{w.norm:.4g}", f"{w.relative:.4g}" if w.HasField("relative") else "-"]
                          for w in d.weights], ["layer", "weight", "‖ΔW‖_F", "‖ΔW‖/‖W‖"]))
        else:
            print("no weight differs")
        return 0
    if cmd == "probe":
        r = c.probe([(args.prompt, args.target, args.other)])
        if args.json:
            print(_dump(r))
            return 0
        rows = [[_cut(s.prompt, 50), _shown(s.target), f"{s.target_logprob:.3f}", _shown(s.other) if s.other else "-",
                 f"{s.other_logprob:.3f}" if s.HasField("other_logprob") else "-", repr(s.top_token)] for s in r.scores]
        print(f"version {r.version}")
        print(_table(rows, ["prompt", "target", "log p", "other", "log p(other)", "greedy"]))
        return 0
    if cmd == "status":
        s = c.status()
        if args.json:
            print(_dump(s))
            return 0
        d = s.threshold_bounds.defaults
        rows = [["model", s.model or "-"], ["family", s.family or "-"], ["served version", s.served_version],
                ["ledger head", s.ledger_head], ["active patches", s.active_patches],
                ["sidecar parity", "ok" if s.sidecar_in_sync else "NOT IN SYNC"],
                ["sidecar alive", "yes" if s.sidecar_alive else "NO"],
                ["tensor parallel", s.tensor_parallel_size],
                ["swaps ok / failed", f"{s.swaps_ok} / {s.swaps_failed}"], ["parity failures", s.parity_failures],
                ["gate defaults", f"efficacy ≥ {d.min_efficacy:g}, paraphrase ≥ {d.min_paraphrase:g}, "
                                  f"NS drop ≤ {d.max_ns_drop:g}, canary KL ≤ {d.max_canary_kl:g}"],
                ["ledger", s.ledger_root or "-"], ["degraded", s.degraded or "-"]]
        if s.HasField("health"):
            rows += [["edit health", health_text(s.health)], ["gate health bounds", bounds_text(s.health)]]
        rows.append(["consolidation", (f"every {s.consolidate_every} facts" if s.consolidate_every else "off")
                     + (" (one running)" if s.consolidating else "")])
        serve_only = any(r.replica_id == s.replica_id and r.role == "serve-only" for r in s.fleet)
        if serve_only:                      # no sidecar by design (docs/fleet.md)
            rows[5:7] = [["sidecar", "none (serve-only replica: edits, probes and traces go to a compute replica)"]]
        if not serve_only and "statistics" in s.DESCRIPTOR.fields_by_name and s.HasField("statistics"):
            rows.insert(7, ["statistics", statistics_text(s.statistics)])
        if s.replica_id:
            rows.insert(0, ["replica", f"{s.replica_id} ({'ready' if s.ready else 'NOT READY'})"])
        print(_table(rows, ["", "value"]))
        if s.fleet:
            print()
            print(fleet_table(s.fleet, s.replica_id))
        return 0
    if cmd == "watch":
        n = 0
        for e in c.watch(args.since, args.history):
            if e.kind == "watching":
                if not args.json:
                    print(f"watching: {e.message}", file=sys.stderr, flush=True)
                continue
            if args.json:
                print(json.dumps(json.loads(_dump(e))), flush=True)
            else:
                when = time.strftime("%H:%M:%S", time.localtime(e.ts))
                ident = f"#{e.id}" if e.id else f"op {e.operation_id}" if e.operation_id else "-"
                version = f"v{e.version}" if e.version >= 0 else ""
                if e.from_version >= 0:
                    version += f" (from v{e.from_version})"
                extra = f"{e.progress * 100:3.0f}% {e.message}" if e.kind == "progress" else e.message
                print(f"{when}  {ident:<16} {e.kind:<9} {version:<18} {e.caller:<20} {_cut(extra, 80)}".rstrip(),
                      flush=True)
            n += 1
            if args.count and n >= args.count:
                break
        return 0
    raise ValueError(cmd)


def _edit(c: Any, args: argparse.Namespace) -> int:
    th = {k: v for k, v in (("min_efficacy", args.min_efficacy), ("min_paraphrase", args.min_paraphrase),
                            ("max_ns_drop", args.max_ns_drop), ("max_canary_kl", args.max_canary_kl))
          if v is not None}
    for line in target_warnings(args.prompt, args.target_new, args.target_true):
        print(line, file=sys.stderr)
    fact = {"prompt": args.prompt, "subject": args.subject, "target_new": args.target_new,
            "target_true": args.target_true}
    kwargs = dict(method=args.method, layers=args.layer, hparams=parse_hparams(args.hparams),
                  dry_run=args.dry_run, expected_head=args.expected_head,
                  idempotency_key=args.idempotency_key, thresholds=th,
                  paraphrases=[(p, 0) for p in args.paraphrase], neighbours=[(p, 0) for p in args.neighbour])
    if args.no_progress or args.json:
        r = c.edit([fact], **kwargs)
    else:
        with ProgressBar("dry run" if args.dry_run else "edit") as bar:
            r = c.edit([fact], progress=bar.update, **kwargs)
    if args.json:
        print(_dump(r))
        return 0
    ch = r.change
    verb = "dry run at" if not ch.committed else "now serving"
    total = ch.timings_ms.get("total", ch.timings_ms.get("compute", 0.0)) / 1e3
    print(f"{verb} version {ch.version} (was {ch.previous_version}); patch {ch.patch_id[:12]}; "
          f"pause {ch.pause_ms:.1f} ms; total {total:.1f} s")
    if r.HasField("report"):
        print(_report_table(r.report))
    return 0


REBASE_SCORES = ("efficacy", "paraphrase", "neighbourhood")


def _rebase(c: Any, args: argparse.Namespace) -> int:
    r = _with_bar("rebase", args, lambda progress: c.rebase(
        args.version, expected_head=args.expected_head, idempotency_key=args.idempotency_key, progress=progress,
        max_drop=args.max_drop))
    if args.json:
        print(_dump(r))
        return 0
    ch = r.change
    print(f"{_now_serving(ch)}; reverted version "
          f"{r.reverted_version} (patch {r.removed_patch[:12]}); {len(r.rebased)} later patch(es) recomputed; "
          f"{ch.active_patches} active; pause {ch.pause_ms:.1f} ms")
    rows = []
    for e in r.rebased:
        cells = [e.original_version, f"{e.old_patch[:12]} → {e.new_patch[:12]}"]
        for k in REBASE_SCORES:
            cells.append(f"{e.scores_before[k]:.2f} → {e.scores_after[k]:.2f}"
                         if k in e.scores_before and k in e.scores_after else "-")
        m = "efficacy.margin"
        cells.append(f"{e.scores_before[m]:+.2f} → {e.scores_after[m]:+.2f}"
                     if m in e.scores_before and m in e.scores_after else "-")
        rows.append(cells)
    print(_table(rows, ["version", "patch", *REBASE_SCORES, "efficacy margin"]))
    return 0


def _now_serving(ch: Any) -> str:
    """"now serving version N (was M)", noting a replayed request."""
    again = " (already done: nothing new was written)" if ch.kind == "replayed" else ""
    return f"now serving version {ch.version} (was {ch.previous_version}){again}"


def _with_bar(name: str, args: argparse.Namespace, call: Callable[[Callable[[Any], None] | None], Any]) -> Any:
    """``call(progress)`` with a progress bar on stderr, or ``call(None)`` with --no-progress or --json."""
    if args.no_progress or args.json:
        return call(None)
    with ProgressBar(name) as bar:
        return call(bar.update)


def _consolidate(c: Any, args: argparse.Namespace) -> int:
    r = _with_bar("consolidate", args, lambda progress: c.consolidate(
        expected_head=args.expected_head, idempotency_key=args.idempotency_key, ridge=args.ridge,
        max_drop=args.max_drop, progress=progress, whole=args.whole))
    if args.json:
        print(_dump(r))
        return 0
    ch = r.change
    print(f"{_now_serving(ch)}; {len(r.constituent_versions)} "
          f"patches consolidated into {ch.patch_id[:12]}; {ch.active_patches} active; committed facts that hold: "
          f"{r.held_before}/{r.facts} before, {r.held_after}/{r.facts} after; pause {ch.pause_ms:.1f} ms")
    rows = [[x.layer, x.patches, x.keys, f"{x.penalty_before:.4g} → {x.penalty_after:.4g}"] for x in r.layers]
    print(_table(rows, ["layer", "patches", "keys", "tr(ΔW A ΔWᵀ)"]))
    return 0


def fleet_table(fleet: Any, me: str = "") -> str:
    """The ledger's replica registry (Status.fleet): which replica serves what (docs/fleet.md)."""
    mine = next((r.policy for r in fleet if r.replica_id == me), "")
    rows = [[("* " if r.replica_id == me else "  ") + r.replica_id, r.version, r.skew, r.role, r.address,
             f"{r.age_s:.1f}s", "yes" if r.live else "no", _policy_cell(r, mine)] for r in fleet]
    return _table(rows, ["replica", "serves", "skew", "role", "address", "last report", "live", "edit policy"])


def _policy_cell(r: Any, mine: str) -> str:
    """A fleet row's edit policy: its digest, and the fields in which it differs from the answering
    replica's (`mine`: its digest; "-": the replica records none). Another digest without a differing
    field is a serve-only side, where only the serving fields are compared."""
    if not r.policy:
        return "-"
    if r.policy_differs:
        return f"{r.policy} DIFFERS: {', '.join(r.policy_differs)}"
    return r.policy if not mine or r.policy == mine else f"{r.policy} (serving fields agree)"
