"""Commands for staged candidates on a running server (docs/candidates.md), over the gRPC control
plane like `editserve.commands.remote` (same ``--server``/token/TLS options):

- ``editserve candidates``: the staged candidates, with the requests routed to each and to the head;
- ``editserve stage``: stage a ledger patch (``--version N`` / ``--ref DIGEST``), a patch export
  directory (``--export DIR``, as written by ``editserve ledger export``), or an edit computed as a
  dry run through the probe gate (``--prompt/--subject/--target-new`` as for ``editserve edit``),
  or an earlier version's difference from the head (``--to-version V``: the candidate serves
  version V; its promote is a rollback to V); ``--share S`` sends a share of default traffic to it
  (admin);
- ``editserve compare ID``: the gate's prompts of its facts (plus ``--item PROMPT TARGET [OTHER]``)
  scored on the head and on the candidate, side by side;
- ``editserve promote ID`` / ``editserve discard ID``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from editserve.commands.remote import _client, _conn, _cut, _dump, _hint, _shown, _table, target_warnings

COMMANDS = ("candidates", "stage", "compare", "promote", "discard")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("candidates", help="staged candidates on the server, with the requests routed to each")
    _conn(p)
    p.set_defaults(func=run, candidates_command="candidates")

    p = sub.add_parser("stage", help="stage a patch, a dry-run edit or an earlier version as a candidate (a LoRA "
                                     "adapter beside the head)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--version", type=int, default=None, help="the patch that this ledger version added")
    src.add_argument("--ref", default=None, help="a ledger patch digest (or a prefix of >= 4 hex digits)")
    src.add_argument("--export", default=None, metavar="DIR", help="a patch export directory (manifest.json, "
                                                                   "patch.safetensors)")
    src.add_argument("--prompt", default=None, help='an edit to compute as a dry run: template with "{}"')
    src.add_argument("--to-version", type=int, default=None, metavar="V",
                     help="serve the earlier version V (its difference from the head); promote rolls back to V")
    p.add_argument("--subject", default=None)
    p.add_argument("--target-new", default=None)
    p.add_argument("--target-true", default="")
    p.add_argument("--method", default="", choices=["", "rome", "memit", "alphaedit"])
    p.add_argument("--layer", type=int, action="append", default=[])
    p.add_argument("--paraphrase", action="append", default=[], help="paraphrase prompt for the gate")
    p.add_argument("--neighbour", action="append", default=[], help="neighbourhood prompt for the gate")
    p.add_argument("--share", type=float, default=None, help="share of default traffic (0..1; > 0 needs admin)")
    _conn(p)
    p.set_defaults(func=run, candidates_command="stage")

    p = sub.add_parser("compare", help="probe scores of a candidate and the head, side by side")
    p.add_argument("candidate")
    p.add_argument("--item", nargs="+", action="append", default=[], metavar="TEXT",
                   help="PROMPT TARGET [OTHER]: a prompt of your own, scored after the gate's (repeatable)")
    _conn(p)
    p.set_defaults(func=run, candidates_command="compare")

    for name, text in (("promote", "commit a candidate as the next version (admin) and unload its adapter"),
                       ("discard", "unload a candidate; commits nothing")):
        p = sub.add_parser(name, help=text)
        p.add_argument("candidate")
        _conn(p)
        p.set_defaults(func=run, candidates_command=name)


def run(args: argparse.Namespace) -> int:
    from editserve.client import ControlError
    from editserve.errors import InvalidRequestError

    try:
        with _client(args) as c:
            return _run(c, args)
    except ControlError as exc:
        print(f"editserve: {exc}{_hint(exc, args)}", file=sys.stderr)
        return 3
    except InvalidRequestError as exc:
        print(f"editserve: error: {exc}", file=sys.stderr)
        return 2


def _run(c: Any, args: argparse.Namespace) -> int:
    cmd = args.candidates_command
    if cmd == "candidates":
        r = c.candidates()
        if args.json:
            print(_dump(r))
            return 0
        print(f"serving version {r.served_version}; {len(r.candidates)} of {r.max_candidates} candidate(s) staged "
              f"(LoRA rank <= {r.max_rank}); head: {r.head_requests} request(s) while candidates were staged")
        if r.candidates:
            rows = [[x.id, x.model, _what(x), x.source, x.rank, f"{x.share:g}", x.staged_at_head, x.caller,
                     x.routed_requests] for x in r.candidates]
            print(_table(rows, ["id", "model", "change", "source", "rank", "share", "staged at", "caller",
                                "requests"]))
        return 0
    if cmd == "stage":
        return _stage(c, args)
    if cmd == "compare":
        items = []
        for it in args.item:
            if len(it) not in (2, 3):
                from editserve.errors import InvalidRequestError

                raise InvalidRequestError(f"--item takes PROMPT TARGET [OTHER], got {len(it)} value(s): {it!r}")
            items.append(tuple(it))
        r = c.compare(args.candidate, items)
        if args.json:
            print(_dump(r))
            return 0
        print(compare_text(r))
        return 0
    out = c.promote(args.candidate) if cmd == "promote" else c.discard(args.candidate)
    if args.json:
        print(_dump(out))
        return 0
    if out.outcome == "promoted" and out.committed_as == "rollback":
        print(f"candidate {out.candidate} promoted: rolled back, now serving version {out.version}")
    elif out.outcome == "promoted":
        print(f"candidate {out.candidate} promoted: now serving version {out.version} (patch {out.patch_id[:12]})")
    else:
        print(f"candidate {out.candidate} discarded{f' (patch {out.patch_id[:12]})' if out.patch_id else ''}; "
              "nothing committed")
    return 0


def _stage(c: Any, args: argparse.Namespace) -> int:
    from editserve.control.gen import pb2
    from editserve.errors import InvalidRequestError

    kwargs: dict[str, Any] = {"share": args.share}
    if args.to_version is not None:
        kwargs["to_version"] = args.to_version
    elif args.version is not None:
        kwargs["version"] = args.version
    elif args.ref is not None:
        kwargs["ref"] = args.ref
    elif args.export is not None:
        from editserve.ledger.transfer import PatchFiles

        try:
            files = PatchFiles.read(Path(args.export))
            kwargs.update(manifest_json=files.manifest_json, factors=files.factors, keys=files.keys)
        except OSError as exc:
            raise InvalidRequestError(f"--export {args.export!r} is not a patch export directory: {exc}") from None
    else:
        if not args.subject or not args.target_new:
            raise InvalidRequestError("staging an edit needs --prompt, --subject and --target-new")
        for line in target_warnings(args.prompt, args.target_new, args.target_true):
            print(line, file=sys.stderr)
        fact = pb2.Fact(prompt=args.prompt, subject=args.subject, target_new=args.target_new,
                        target_true=args.target_true)
        kwargs["edit"] = pb2.EditRequest(facts=[fact], method=args.method, layers=args.layer, dry_run=True,
                                         paraphrases=[pb2.GatePrompt(prompt=p) for p in args.paraphrase],
                                         neighbours=[pb2.GatePrompt(prompt=p) for p in args.neighbour])
    cand = c.stage(**kwargs)
    if args.json:
        print(_dump(cand))
        return 0
    print(f"staged candidate {cand.id}: model {cand.model!r}, {_what(cand)} ({cand.source}), "
          f"rank {cand.rank}, share {cand.share:g}, on head {cand.staged_at_head}")
    return 0


def _what(c: Any) -> str:
    """A ``Candidate``'s change: its patch, or the version it serves and the patches that differ."""
    if c.HasField("to_version"):
        return f"version {c.to_version} (-{len(c.removed_patches)}/+{len(c.added_patches)} patches)"
    return f"patch {c.patch_id[:12]}"


def _frac(x: float) -> str:
    return "-" if x < 0 else f"{x:.2f}"


def compare_text(r: Any) -> str:
    """A ``CompareCandidateResponse`` as text: the two sides' summaries, then one row per prompt."""
    h, s = r.head, r.staged
    lines = [f"candidate {r.candidate} on served version {r.served_version} ({r.seconds:.1f} s)",
             _table([["head", h.label, _frac(h.efficacy), _frac(h.paraphrase), _frac(h.neighbourhood), h.requests,
                      h.weight_version or "-"],
                     ["candidate", s.label, _frac(s.efficacy), _frac(s.paraphrase), _frac(s.neighbourhood),
                      s.requests, s.weight_version or "-"]],
                    ["", "label", "efficacy", "paraphrase", "neighbourhood", "requests", "vLLM weight version"])]
    rows = []
    for x in r.scores:
        other = (f"{x.head_other_logprob:.2f} → {x.candidate_other_logprob:.2f}"
                 if x.HasField("head_other_logprob") and x.HasField("candidate_other_logprob") else "-")
        ok = (f"{'yes' if x.head_success else 'no'} → {'yes' if x.candidate_success else 'no'}"
              if x.kind != "caller" and x.other else "")
        rows.append([x.kind, _cut(x.prompt, 44), _shown(x.target), f"{x.head_target_logprob:.2f} → "
                     f"{x.candidate_target_logprob:.2f}", _shown(x.other) if x.other else "-", other,
                     f"{x.head_top_token!r} → {x.candidate_top_token!r}", ok])
    lines.append(_table(rows, ["kind", "prompt", "target", "log p (head → cand.)", "other", "log p(other)",
                               "greedy", "ok"]))
    return "\n".join(lines)
