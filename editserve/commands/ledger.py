"""``editserve ledger ...``: ``versions``, ``show``, ``diff``, ``rollback``, ``revert``, ``consolidate``, ``export``,
``import``, ``events``, ``check-ledger`` on a ledger directory, without a server.

(The top-level ``editserve versions|show|diff|rollback|revert|...`` talk to a running server's
gRPC control plane, `editserve.commands.remote`; a server follows a head moved here at its next
version change, or at ``POST /editserve/v1/sync``.) Every command takes ``--ledger PATH``;
without it the ledger under ``$EDITSERVE_HOME/ledger/`` is used when there is exactly one (else
the command lists them and asks for ``--ledger``). ``--ledger`` also takes a ``postgresql://``
DSN; ``$EDITSERVE_LEDGER_DSN_FILE`` (a file holding the DSN, which keeps the password off the
command line) or ``$EDITSERVE_LEDGER``, when set, are used before the search.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from editserve.errors import InvalidRequestError


def _add_ledger_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ledger", default=None, metavar="PATH|DSN",
                   help="ledger directory or postgresql:// DSN (default: $EDITSERVE_LEDGER_DSN_FILE, "
                        "$EDITSERVE_LEDGER, else the only ledger under $EDITSERVE_HOME/ledger/)")
    p.add_argument("--caller", default="cli", help="identity recorded in the audit log (default: cli)")


def register(parent: argparse._SubParsersAction) -> None:
    group = parent.add_parser("ledger", help="inspect or change a ledger directory directly (no server)")
    sub = group.add_subparsers(dest="ledger_command", required=True, metavar="COMMAND")
    p = sub.add_parser("versions", help="list the ledger's versions (head marked *)")
    _add_ledger_arg(p)
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("show", help="one version: requests, method, hyper-parameters, probe report, active patches")
    _add_ledger_arg(p)
    p.add_argument("version", type=int)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("diff", help="which edits differ between two versions, and ‖ΔW‖ per layer")
    _add_ledger_arg(p)
    p.add_argument("a", type=int)
    p.add_argument("b", type=int)
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("rollback", help="move the head to version V (back, or forward to a version in history)")
    _add_ledger_arg(p)
    p.add_argument("version", type=int)
    p.add_argument("--expected-head", type=int, default=None, help="refuse if the head is not this version")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("revert", help="new version without the patch of version V (optionally recomputing later ones)")
    _add_ledger_arg(p)
    p.add_argument("version", type=int)
    p.add_argument("--rebase", action="store_true", help="recompute the later patches on the new base (loads the model); for a fact a consolidation took in, that consolidation is re-solved without it first")
    p.add_argument("--model", default=None, help="checkpoint for --rebase (default: the embedded SmolLM2-135M)")
    p.add_argument("--max-steps", type=int, default=None, help="override the value optimisation steps when rebasing")
    p.add_argument("--from-consolidation", action="store_true",
                   help="the version's patch was consolidated: re-solve the consolidated patch without its facts, "
                        "check the others still hold and the reverted ones do not (loads the model)")
    p.add_argument("--corpus", default=None, help="text for the key statistics with --from-consolidation "
                   "(default: the bundled excerpt)")
    p.add_argument("--max-drop", type=float, default=None,
                   help="with --from-consolidation: share of the other facts that hold now allowed to stop holding "
                        "(default 0)")
    p.add_argument("--expected-head", type=int, default=None)
    p.set_defaults(func=cmd_revert)

    p = sub.add_parser("consolidate", help="replace the active patches that carry preserved keys and were committed "
                       "since the last consolidation by one least-disturbance patch with the same outputs on every "
                       "committed key (loads the model)")
    _add_ledger_arg(p)
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded SmolLM2-135M)")
    p.add_argument("--ridge", type=float, default=0.1, help="μ of A = C + μ·(tr C/d)·I (default 0.1)")
    p.add_argument("--corpus", default=None, help="text for the key statistics (default: the bundled excerpt)")
    p.add_argument("--max-drop", type=float, default=0.0,
                   help="share of the committed facts that hold now allowed to stop holding (default 0)")
    p.add_argument("--dry-run", action="store_true", help="compute and check, write nothing")
    p.add_argument("--whole", action="store_true",
                   help="take the earlier consolidated patches in too and re-solve everything (after the statistics "
                        "or --ridge changed; the patch then has the rank of every committed key, up to d_out)")
    p.add_argument("--expected-head", type=int, default=None)
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser("export", help="export version V (or, with --patch, the patch it added) as safetensors + manifest")
    _add_ledger_arg(p)
    p.add_argument("version", type=int)
    p.add_argument("dest", help="output directory")
    p.add_argument("--patch", action="store_true", help="export only the patch version V added")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="import an exported patch (added on top of the head) or version (replaces it)")
    _add_ledger_arg(p)
    p.add_argument("src", help="export directory")
    p.add_argument("--expected-head", type=int, default=None, help="default: the current head")
    p.add_argument("--model", default=None,
                   help="checkpoint to take base weights from when the ledger has no base copy of a touched matrix")
    p.add_argument("--max-relative-norm", type=float, default=None, help="bound on ‖ΔW‖/‖W‖ (default 0.5)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("events", help="the audit log")
    _add_ledger_arg(p)
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("check-ledger", help="verify every version's blobs and checksums")
    _add_ledger_arg(p)
    p.add_argument("--deep", action="store_true", help="also load every patch and check its digest")
    p.set_defaults(func=cmd_check)


# ---------------------------------------------------------------------------------------------


def resolve_ledger_path(path: str | None) -> Any:
    """The `LedgerLocation` to open: `path` (directory or DSN), the environment's, or the only one under home."""
    from editserve.config import home
    from editserve.ledger.errors import LedgerError
    from editserve.ledger.ledger import DB_FILE
    from editserve.ledger.location import LedgerLocation, location_from_env

    if path is not None:
        return LedgerLocation.parse(path)
    from_env = location_from_env()
    if from_env is not None:
        return from_env
    parent = home() / "ledger"
    found = sorted(d for d in parent.iterdir() if (d / DB_FILE).exists()) if parent.exists() else []
    if len(found) == 1:
        return LedgerLocation(path=found[0])
    if not found:
        raise LedgerError(f"no ledger under {str(parent)!r}; pass --ledger PATH")
    raise LedgerError(f"{len(found)} ledgers under {str(parent)!r} ({', '.join(d.name for d in found)}); pass --ledger PATH")


def _open(args: argparse.Namespace, strict: bool = True):  # type: ignore[no-untyped-def]
    from editserve.ledger import Ledger

    return Ledger.open(resolve_ledger_path(args.ledger), create=False, strict=strict)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _requests_text(requests: Any, limit: int = 60) -> str:
    parts = [f"{r.text} →{r.target_new}" for r in requests]
    text = "; ".join(parts) if parts else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def cmd_versions(args: argparse.Namespace) -> int:
    with _open(args, strict=False) as ledger:
        head = ledger.head()
        rows = []
        for v in ledger.versions():
            what = _requests_text(v.requests)
            if v.kind == "revert":
                what = f"revert of version {v.details.get('reverted')}"
                if v.details.get("rebased"):
                    what += f", {len(v.details['rebased'])} rebased"
                if v.details.get("consolidation"):
                    what += (f", out of the consolidation of version {v.details['consolidation']['version']} "
                             f"({len(v.requests)} requests stay)")
            elif v.kind == "consolidate":
                what = f"consolidation of {len(v.removed)} patches ({len(v.requests)} requests)"
            elif v.kind == "import" and not v.patch_id:
                what = f"import of {len(v.added)} patch(es) from {v.details.get('source', '?')}"
            elif v.kind == "base":
                what = "base model"
            rows.append(["*" if v.version == head else "", str(v.version), "" if v.parent is None else str(v.parent),
                         v.kind, (v.patch_id or "")[:12], v.method or "", v.caller, _when(v.created_at), what])
        print(f"ledger {ledger.location} (model {ledger.model_fingerprint[:16]}), head = version {head}")
        print(_table(["", "version", "parent", "kind", "patch", "method", "caller", "created", "edit"], rows))
        if ledger.damage is not None:
            print(f"\nWARNING: {ledger.damage.describe()}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _open(args, strict=False) as ledger:
        v = ledger.version(args.version)
        head = ledger.head()
        print(f"version     {v.version}{'  (head)' if v.version == head else ''}")
        print(f"parent      {v.parent}")
        print(f"kind        {v.kind}")
        print(f"caller      {v.caller}")
        print(f"created     {_when(v.created_at)}")
        if v.idempotency_key:
            print(f"idem. key   {v.idempotency_key}")
        if v.patch_id:
            print(f"patch       {v.patch_id}")
            print(f"method      {v.method}")
            print("requests")
            for r in v.requests:
                print(f"  - {r.text!r} → {r.target_new!r}" + (f" (was {r.target_true!r})" if r.target_true else ""))
            print("hparams     " + json.dumps(v.hparams, sort_keys=True))
            p = ledger.patch(v.patch_id)
            for d in p.deltas:
                print(f"  weight    {d.name}  shape {d.shape}  rank {d.rank}  ‖ΔW‖ {float(d.dense().norm()):.4g}")
        for op, ids in (("added", v.added), ("removed", v.removed)):
            if ids and not (op == "added" and ids == (v.patch_id,)):
                print(f"{op:<11} " + ", ".join(i[:12] for i in ids))
        if v.details:
            print("details     " + json.dumps(v.details, sort_keys=True, indent=2).replace("\n", "\n            "))
        print("probe       " + (json.dumps(v.probe_report, sort_keys=True) if v.probe_report else "(none)"))
        active = ledger.active_ids(v.version)
        print(f"active      {len(active)} patch(es): " + ", ".join(a[:12] for a in active))
        for e in ledger.events():
            if e.version == v.version:
                print(f"event       #{e.id} {e.kind} by {e.caller} at {_when(e.ts)} (from {e.from_version})")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    with _open(args, strict=False) as ledger:
        d = ledger.weights.diff(args.a, args.b)
        print(f"version {d.a} → version {d.b}: {len(d.common)} patch(es) in both, "
              f"{len(d.only_a)} only in {d.a}, {len(d.only_b)} only in {d.b}")
        for label, ids in ((f"only in {d.a}", d.only_a), (f"only in {d.b}", d.only_b)):
            for pid in ids:
                p = ledger.patch(pid)
                print(f"  {label}: {pid[:12]} {p.method:<6} {_requests_text(p.requests, 80)}")
        if d.weights:
            print()
            print(_table(["layer", "weight", "‖ΔW‖_F", "‖ΔW‖/‖W‖"],
                         [[str(w.layer), w.name, f"{w.norm:.5g}", "" if w.relative is None else f"{w.relative:.4g}"]
                          for w in d.weights]))
        else:
            print("no weight differs")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    with _open(args, strict=False) as ledger:
        before = ledger.head()
        head = ledger.rollback(args.version, caller=args.caller, expected_head=args.expected_head)
        print(f"head: version {before} → version {head}" if before != head else f"head already at version {head}")
    return 0


def _ledger_model(ledger: Any, checkpoint: str | None) -> tuple[Any, Any]:
    """(model, tokenizer) of `checkpoint` (default: the embedded model), refused unless it is the ledger's model."""
    from editserve.editing.model import fingerprint, load_model
    from editserve.ledger.errors import LedgerModelMismatch

    model, tok = load_model(checkpoint)
    if fingerprint(model) != ledger.model_fingerprint:
        raise LedgerModelMismatch(f"model {fingerprint(model)[:16]} is not the ledger's model "
                                  f"{ledger.model_fingerprint[:16]}")
    return model, tok


def _revert_from_consolidation(ledger: Any, args: argparse.Namespace) -> int:
    from editserve.editing.lifelong import consolidation_covariances
    from editserve.ledger.consolidation import allowed_drop, check_fact_removal, model_prompt_keys, plan_fact_removal
    from editserve.patches import hold_patches

    max_drop = allowed_drop(0.0 if args.max_drop is None else args.max_drop)     # before the model loads
    model, tok = _ledger_model(ledger, args.model)
    head = ledger.head() if args.expected_head is None else args.expected_head
    covs = consolidation_covariances(model, tok, ledger.preserved_keys(head).layers, args.corpus)   # unedited model
    hold_patches(model, ledger.active_patches(head))            # the bare prompts' keys are measured on the head
    try:
        plan = plan_fact_removal(ledger, lambda layers: {layer: covs[layer] for layer in layers}, args.version,
                                 expected_head=head, prompt_keys=model_prompt_keys(model, tok))
    finally:
        hold_patches(model, [])
    print(f"version {plan.head}: the patch of version {args.version} ({plan.removed[:12]}) taken out of the "
          f"consolidated patch of version {plan.holder_version} → {plan.patch.digest[:12]} "
          f"({len(plan.patch.requests)} requests stay)")
    for x in plan.layers:
        print(f"  layer {x.layer}: {x.n_keys} keys kept, tr(ΔW A ΔWᵀ) {x.penalty_before:.4g} → {x.penalty_after:.4g}")
    check = check_fact_removal(model, tok, ledger, plan)
    print(f"  facts that stay and hold: {check.held_before}/{len(check.kept)} before, {check.held_after}/"
          f"{len(check.kept)} after; reverted facts still holding: {len(check.still_held)}/{len(check.removed)}")
    check.refuse(max_drop)
    for f in check.still_held:
        print(f"  still answered after the revert (another edit's reach, not this patch): {f}")
    if not args.rebase:
        res = ledger.revert_consolidated(plan, caller=args.caller, probe_report=check.probe_report())
        print(f"version {res.version}: reverted version {res.reverted_version} (patch {res.removed_patch[:12]}) out "
              f"of the consolidation of version {plan.holder_version}")
        return 0
    from editserve.ledger.rebase import ModelRecompute

    over = {"value": {"max_steps": args.max_steps}} if args.max_steps else None
    rebase = ledger.plan_rebase(args.version, ModelRecompute(model, tok, hparams_overrides=over),  # on the base
                                expected_head=head, removal=plan)
    res = ledger.revert(args.version, caller=args.caller, rebase=rebase, expected_head=head,
                        probe_report=check.probe_report())
    print(f"version {res.version}: reverted version {res.reverted_version} (patch {res.removed_patch[:12]}) out of "
          f"the consolidation of version {plan.holder_version}, {len(res.rebased)} later patch(es) recomputed")
    _print_rebased(res.rebased)
    return 0


def _print_rebased(rebased: Any) -> None:
    for r in rebased:
        changes = ", ".join(f"{k} {r.metrics_before.get(k, float('nan')):.3f}→{r.metrics_after[k]:.3f}"
                            for k in r.changes) or "(no comparable metrics)"
        print(f"  rebased version {r.original_version}: {r.old_patch[:12]} → {r.new_patch[:12]}: {changes}")


def cmd_revert(args: argparse.Namespace) -> int:
    with _open(args) as ledger:
        if args.from_consolidation or (args.rebase and _consolidated(ledger, args)):
            return _revert_from_consolidation(ledger, args)        # with --rebase: the later patches recomputed
        if args.max_drop is not None:
            raise InvalidRequestError("--max-drop applies to a revert out of a consolidation (--from-consolidation)")
        rebase = None
        if args.rebase:
            from editserve.ledger.rebase import ModelRecompute

            model, tok = _ledger_model(ledger, args.model)
            over = {"value": {"max_steps": args.max_steps}} if args.max_steps else None
            rebase = ModelRecompute(model, tok, hparams_overrides=over)
        res = ledger.revert(args.version, caller=args.caller, rebase=rebase, expected_head=args.expected_head)
        print(f"version {res.version}: reverted version {res.reverted_version} (patch {res.removed_patch[:12]})")
        _print_rebased(res.rebased)
    return 0


def _consolidated(ledger: Any, args: argparse.Namespace) -> bool:
    """Whether a consolidation active at the expected head (default: the head) holds the patch of `args.version`."""
    patch_id = ledger.version(args.version).patch_id
    head = ledger.head() if args.expected_head is None else args.expected_head
    return patch_id is not None and ledger.consolidated_into(patch_id, head) is not None


def cmd_consolidate(args: argparse.Namespace) -> int:
    from editserve.editing.consolidate import ConsolidateParams
    from editserve.editing.lifelong import consolidation_covariances
    from editserve.ledger.consolidation import allowed_drop, check_consolidation, plan_consolidation, refuse_broken

    allowed_drop(args.max_drop)                                   # a typed refusal before the model loads
    with _open(args) as ledger:
        model, tok = _ledger_model(ledger, args.model)
        plan = plan_consolidation(ledger, lambda layers: consolidation_covariances(model, tok, layers, args.corpus),
                                  ConsolidateParams(ridge=args.ridge), expected_head=args.expected_head,
                                  whole=args.whole)
        print(f"version {plan.head}: {len(plan.constituents)} patches with preserved keys → one patch "
              f"{plan.patch.digest[:12]} ({len(plan.patch.requests)} requests"
              + (f"; {len(plan.held)} consolidated before kept as they are" if plan.held else "") + ")")
        for x in plan.layers:
            print(f"  layer {x.layer}: {x.n_patches} patches, {x.n_keys} keys, "
                  f"tr(ΔW A ΔWᵀ) {x.penalty_before:.4g} → {x.penalty_after:.4g}")
        check = check_consolidation(model, tok, ledger, plan)
        print(f"  committed facts that hold: {check.held_before}/{len(check.facts)} before, "
              f"{check.held_after}/{len(check.facts)} after"
              + (f" ({check.unscored} facts of earlier consolidations not in the sample scored)" if check.unscored else ""))
        refuse_broken(check, args.max_drop)
        if args.dry_run:
            print("dry run: nothing was written")
            return 0
        version = ledger.consolidate(plan, caller=args.caller, probe_report=check.probe_report())
        print(f"version {version}: consolidated {len(plan.constituents)} patches into {plan.patch.digest[:12]}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from editserve.ledger.transfer import export_patch, export_version

    with _open(args) as ledger:
        out = export_patch(ledger, args.version, args.dest) if args.patch else export_version(ledger, args.version, args.dest)
        print(f"exported {'patch of ' if args.patch else ''}version {args.version} to {out}")
    return 0


def _checkpoint_weights(ckpt: str | None, names: list[str]) -> dict[str, Any]:
    from safetensors import safe_open

    from editserve.editing.model import resolve_checkpoint

    root = resolve_checkpoint(ckpt)
    out: dict[str, Any] = {}
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in names:
                if name in st.keys():
                    out[name] = st.get_tensor(name)
    return out


def cmd_import(args: argparse.Namespace) -> int:
    from editserve.ledger.errors import ImportRejected
    from editserve.ledger.transfer import MANIFEST_FILE, import_patch, import_version

    src = Path(args.src)
    try:
        manifest = json.loads((src / MANIFEST_FILE).read_text())
        kind = manifest["export"]["kind"]
        weights = manifest["weights"] if kind == "patch" else [w for p in manifest["patches"] for w in p["weights"]]
        names = sorted({w["name"] for w in weights})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImportRejected(f"{str(src)!r} is not a readable editserve export: {exc}") from exc
    with _open(args) as ledger:
        kwargs: dict[str, Any] = {}
        if args.model is not None:
            kwargs["base"] = _checkpoint_weights(args.model, [n for n in names if n not in ledger.weights.base_names()])
        if args.max_relative_norm is not None:
            kwargs["max_relative_norm"] = args.max_relative_norm
        expected = ledger.head() if args.expected_head is None else args.expected_head
        fn = import_patch if kind == "patch" else import_version
        version = fn(ledger, src, expected, caller=args.caller, **kwargs)
        print(f"imported {kind} from {src} as version {version}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    with _open(args, strict=False) as ledger:
        events = ledger.events()[-args.limit:]
        print(_table(["#", "time", "event", "version", "from", "caller", "details"],
                     [[str(e.id), _when(e.ts), e.kind, "" if e.version is None else str(e.version),
                       "" if e.from_version is None else str(e.from_version), e.caller,
                       json.dumps(e.details, sort_keys=True)[:70]] for e in events]))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    with _open(args, strict=False) as ledger:
        report = ledger.integrity_report(deep=args.deep)
        print(report.describe())
    return 0 if report.ok else 1
