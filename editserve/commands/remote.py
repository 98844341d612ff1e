"""Commands that talk to a running server's gRPC control plane (`editserve.client.EditClient`).

``editserve edit|probe|status|watch`` and, for everything, ``editserve remote
edit|rollback|revert|versions|diff|probe|status|watch`` (``versions``, ``diff``, ``rollback`` and
``revert`` at the top level are the local-ledger commands of `editserve.commands.ledger`).
Server: ``--server HOST:PORT`` or ``EDITSERVE_GRPC_TARGET`` (default 127.0.0.1:50051); token:
``--token-file`` or ``EDITSERVE_CONTROL_TOKEN``; TLS: ``--ca`` (and ``--cert``/``--key`` for mutual TLS).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

TOP_LEVEL = ("edit", "probe", "status", "watch")


def _conn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None, help="HOST:PORT of the gRPC control plane")
    p.add_argument("--token-file", default=None, help="file holding the bearer token (else $EDITSERVE_CONTROL_TOKEN)")
    p.add_argument("--ca", default=None, help="CA certificate (PEM) for TLS")
    p.add_argument("--cert", default=None, help="client certificate (PEM) for mutual TLS")
    p.add_argument("--key", default=None, help="client key (PEM) for mutual TLS")
    p.add_argument("--json", action="store_true", help="print the raw response as JSON")


def _add(sub: argparse._SubParsersAction, name: str) -> None:
    if name == "edit":
        p = sub.add_parser("edit", help="edit a fact on the served model (probe gate, commit, live swap)")
        p.add_argument("--prompt", required=True, help='template with "{}" for the subject')
        p.add_argument("--subject", required=True)
        p.add_argument("--target-new", required=True)
        p.add_argument("--target-true", default="")
        p.add_argument("--method", default="rome", choices=["rome", "memit"])
        p.add_argument("--layer", type=int, action="append", default=[])
        p.add_argument("--dry-run", action="store_true", help="probe only, commit nothing")
        p.add_argument("--expected-head", type=int, default=None)
        p.add_argument("--idempotency-key", default="")
        p.add_argument("--paraphrase", action="append", default=[], help="paraphrase prompt for the gate")
        p.add_argument("--neighbour", action="append", default=[], help="neighbourhood prompt for the gate")
        for t in ("min-efficacy", "min-paraphrase", "max-ns-drop", "max-canary-kl"):
            p.add_argument(f"--{t}", type=float, default=None)
    elif name == "rollback":
        p = sub.add_parser("rollback", help="serve version V (the ledger head moves there)")
        p.add_argument("version", type=int)
        p.add_argument("--expected-head", type=int, default=None)
    elif name == "revert":
        p = sub.add_parser("revert", help="serve a new version without the patch of version V")
        p.add_argument("version", type=int)
        p.add_argument("--expected-head", type=int, default=None)
    elif name == "versions":
        p = sub.add_parser("versions", help="the server's ledger versions")
        p.add_argument("--limit", type=int, default=0)
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
        p.add_argument("--since", type=int, default=0)
        p.add_argument("--history", action="store_true")
        p.add_argument("--count", type=int, default=0, help="stop after N events")
    else:
        raise ValueError(name)
    _conn(p)
    p.set_defaults(func=run, remote_command=name)


def register(sub: argparse._SubParsersAction) -> None:
    existing = set(sub.choices)
    for name in TOP_LEVEL:
        if name not in existing:
            _add(sub, name)
    group = sub.add_parser("remote", help="all control-plane commands against a running server (gRPC)")
    inner = group.add_subparsers(dest="remote_cmd", required=True)
    for name in ("edit", "rollback", "revert", "versions", "diff", "probe", "status", "watch"):
        _add(inner, name)


def _client(args: argparse.Namespace) -> Any:
    from editserve.client import EditClient

    token = Path(args.token_file).read_text().strip() if args.token_file else None
    return EditClient(args.server, token, ca=args.ca, cert=args.cert, key=args.key)


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class _Spinner:
    """A progress line on stderr while a long call runs (elapsed seconds)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        for ch in itertools.cycle("|/-\\"):
            if self._stop.wait(0.25):
                break
            if sys.stderr.isatty():
                sys.stderr.write(f"\r{ch} {self.label} {time.monotonic() - t0:5.1f} s")
                sys.stderr.flush()

    def __enter__(self) -> "_Spinner":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if sys.stderr.isatty():
            sys.stderr.write("\r" + " " * (len(self.label) + 12) + "\r")


def _dump(msg: Any) -> str:
    from google.protobuf.json_format import MessageToDict

    return json.dumps(MessageToDict(msg, preserving_proto_field_name=True), indent=2)


def _report_table(report: Any) -> str:
    lines = [f"probe gate: {'PASSED' if report.passed else 'REJECTED'}  efficacy {report.efficacy:.2f}  "
             f"paraphrase {report.paraphrase:.2f}  NS {report.neighbourhood_before:.2f}→{report.neighbourhood_after:.2f}"
             f"  canary KL {report.canary_kl_mean:.4f} (max {report.canary_kl_max:.4f})"]
    lines += [f"  failed: {f}" for f in report.failures]
    rows = [[r.kind, r.prompt[:50], f"{r.new_logprob_before:.2f}→{r.new_logprob_after:.2f}",
             f"{r.true_logprob_before:.2f}→{r.true_logprob_after:.2f}", "yes" if r.success else "no"]
            for r in report.rows]
    lines.append(_table(rows, ["kind", "prompt", "log p(new)", "log p(true)", "ok"]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from editserve.client import ControlError

    cmd = args.remote_command
    try:
        with _client(args) as c:
            return _run(c, cmd, args)
    except ControlError as exc:
        print(f"editserve: {exc}", file=sys.stderr)
        if exc.report is not None:
            print(_report_table(exc.report), file=sys.stderr)
        return 3


def _run(c: Any, cmd: str, args: argparse.Namespace) -> int:
    if cmd == "edit":
        th = {k: v for k, v in (("min_efficacy", args.min_efficacy), ("min_paraphrase", args.min_paraphrase),
                                ("max_ns_drop", args.max_ns_drop), ("max_canary_kl", args.max_canary_kl))
              if v is not None}
        fact = {"prompt": args.prompt, "subject": args.subject, "target_new": args.target_new,
                "target_true": args.target_true}
        with _Spinner("editing (compute → probe gate → commit → swap)"):
            r = c.edit([fact], method=args.method, layers=args.layer, dry_run=args.dry_run,
                       expected_head=args.expected_head, idempotency_key=args.idempotency_key, thresholds=th,
                       paraphrases=[(p, 0) for p in args.paraphrase], neighbours=[(p, 0) for p in args.neighbour])
        if args.json:
            print(_dump(r))
            return 0
        ch = r.change
        verb = "dry run at" if not ch.committed else "now serving"
        print(f"{verb} version {ch.version} (was {ch.previous_version}); patch {ch.patch_id[:12]}; "
              f"pause {ch.pause_ms:.1f} ms; total {ch.timings_ms.get('total', ch.timings_ms.get('compute', 0)) / 1e3:.1f} s")
        if r.HasField("report"):
            print(_report_table(r.report))
        return 0
    if cmd in ("rollback", "revert"):
        fn = c.rollback if cmd == "rollback" else c.revert
        ch = fn(args.version, expected_head=args.expected_head)
        print(_dump(ch) if args.json else f"now serving version {ch.version} (was {ch.previous_version}); "
              f"{ch.active_patches} active patch(es); pause {ch.pause_ms:.1f} ms")
        return 0
    if cmd == "versions":
        r = c.versions(args.limit)
        if args.json:
            print(_dump(r))
            return 0
        rows = [[("* " if v.is_head else "  ") + str(v.version), v.kind, v.patch_id[:12], v.method, v.caller,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created_at)),
                 "; ".join(f"{f.prompt.replace('{}', f.subject)} →{f.target_new}" for f in v.facts)[:60]]
                for v in r.versions]
        print(_table(rows, ["version", "kind", "patch", "method", "caller", "created", "facts"]))
        return 0
    if cmd == "diff":
        d = c.diff(args.a, args.b)
        if args.json:
            print(_dump(d))
            return 0
        print(f"only in {d.a}: {[x[:12] for x in d.only_a]}; only in {d.b}: {[x[:12] for x in d.only_b]}; "
              f"common: {len(d.common)}")
        print(_table([[w.layer, w.name, f"{w.norm:.4g}", f"{w.relative:.4g}" if w.HasField("relative") else "-"]
                      for w in d.weights], ["layer", "weight", "‖ΔW‖", "relative"]))
        return 0
    if cmd == "probe":
        r = c.probe([(args.prompt, args.target, args.other)])
        if args.json:
            print(_dump(r))
            return 0
        rows = [[s.prompt[:50], s.target, f"{s.target_logprob:.3f}", s.other or "-",
                 f"{s.other_logprob:.3f}" if s.HasField("other_logprob") else "-", repr(s.top_token)] for s in r.scores]
        print(f"version {r.version}")
        print(_table(rows, ["prompt", "target", "log p", "other", "log p(other)", "greedy"]))
        return 0
    if cmd == "status":
        s = c.status()
        if args.json:
            print(_dump(s))
            return 0
        rows = [["model", s.model], ["family", s.family], ["served version", s.served_version],
                ["ledger head", s.ledger_head], ["active patches", s.active_patches],
                ["sidecar parity", "ok" if s.sidecar_in_sync else "NOT IN SYNC"],
                ["sidecar alive", s.sidecar_alive], ["swaps ok / failed", f"{s.swaps_ok} / {s.swaps_failed}"],
                ["degraded", s.degraded or "-"]]
        print(_table(rows, ["", "value"]))
        return 0
    if cmd == "watch":
        n = 0
        for e in c.watch(args.since, args.history):
            if args.json:
                print(_dump(e), flush=True)
            else:
                when = time.strftime("%H:%M:%S", time.localtime(e.ts))
                extra = f" {e.progress * 100:3.0f}% {e.message}" if e.kind == "progress" else f" {e.message}"
                print(f"{when} #{e.id} {e.kind:9s} v{e.version} (from v{e.from_version}) by {e.caller}{extra}",
                      flush=True)
            n += 1
            if args.count and n >= args.count:
                break
        return 0
    raise ValueError(cmd)
