"""Validation of the candidate operations' requests (the gRPC messages, which the HTTP routes parse
their JSON bodies into), each error naming the bad value."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from editserve.candidates.compare import CompareItem, caller_items
from editserve.candidates.staging import check_share
from editserve.control.methods import DEFAULT_METHOD
from editserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from editserve.ledger.transfer import PatchFiles

CANDIDATE_ID_RE = re.compile(r"[0-9a-f]{6}")
REF_RE = re.compile(r"[0-9a-f]{4,64}")


@dataclass(frozen=True)
class StageArgs:
    """Stage a ledger patch (`ref` digest prefix, or `version` that added it), an uploaded export,
    an edit computed as a dry run (`edit`, an `editserve.control.validate.EditArgs`), or an
    earlier version's difference from the head (`to_version`)."""

    ref: str | int | None
    export: PatchFiles | None               # an uploaded patch export (manifest, factors, preserved keys)
    share: float | None
    edit: Any = None
    to_version: int | None = None


def candidate_id(value: Any) -> str:
    if not isinstance(value, str) or not CANDIDATE_ID_RE.fullmatch(value):
        raise InvalidRequestError(f"candidate id {value!r} must be 6 lowercase hex digits")
    return value


def stage_args(msg: Any, n_layers: int | None = None, default_method: str = DEFAULT_METHOD) -> StageArgs:
    """A ``StageCandidateRequest`` → `StageArgs` (exactly one source; an edit's method defaults to
    `default_method`, the server's)."""
    share = None
    if msg.HasField("share"):
        if not math.isfinite(msg.share):
            raise InvalidRequestError(f"share must be a number in [0, 1], got {msg.share!r}")
        share = check_share(msg.share)
    given = [name for name, present in (("ref", bool(msg.ref)), ("version", msg.HasField("version")),
                                        ("manifest_json", bool(msg.manifest_json) or bool(msg.factors) or bool(msg.keys)),
                                        ("edit", msg.HasField("edit")),
                                        ("to_version", msg.HasField("to_version"))) if present]
    if len(given) != 1:
        raise InvalidRequestError(f"give exactly one of 'ref', 'version', 'manifest_json'+'factors', 'edit' or "
                                  f"'to_version', got {given}")
    if msg.HasField("to_version"):
        if msg.to_version < 0:
            raise InvalidRequestError(f"to_version must be a non-negative integer, got {msg.to_version!r}")
        return StageArgs(ref=None, export=None, share=share, to_version=int(msg.to_version))
    if msg.ref:
        if not REF_RE.fullmatch(msg.ref):
            raise InvalidRequestError(f"ref {msg.ref!r} must be a patch digest or a prefix of >= 4 hex digits")
        return StageArgs(ref=msg.ref, export=None, share=share)
    if msg.HasField("version"):
        if msg.version < 0:
            raise InvalidRequestError(f"version must be a non-negative integer, got {msg.version!r}")
        return StageArgs(ref=int(msg.version), export=None, share=share)
    if msg.HasField("edit"):
        from editserve.control import validate

        args = validate.edit_args(msg.edit, n_layers, default_method)
        if args.method == "gated":
            raise InvalidRequestError("method 'gated' adds a neuron, which a candidate (a LoRA adapter on the "
                                      "down-projections) cannot stage; commit it, or stage another method")
        if args.expected_head is not None or args.idempotency_key or args.wait_for_replicas_s is not None:
            raise InvalidRequestError("a staged edit commits nothing: expected_head, idempotency_key and "
                                      "wait_for_replicas_s do not apply to it")
        return StageArgs(ref=None, export=None, share=share, edit=replace(args, dry_run=True))
    from editserve.control.validate import patch_upload

    return StageArgs(ref=None, export=patch_upload(msg), share=share)


def compare_args(msg: Any) -> tuple[str, tuple[CompareItem, ...]]:
    """A ``CompareCandidateRequest`` → (candidate id, the caller's items)."""
    return candidate_id(msg.candidate), caller_items([(it.prompt, it.target, it.other or None) for it in msg.items])
