"""Validation of the candidate operations' requests (HTTP JSON bodies), each error naming the bad value."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from editserve.candidates.staging import check_share
from editserve.errors import InvalidRequestError

CANDIDATE_ID_RE = re.compile(r"[0-9a-f]{6}")
REF_RE = re.compile(r"[0-9a-f]{4,64}")


@dataclass(frozen=True)
class StageArgs:
    """Stage a ledger patch (`ref` digest prefix, or `version` that added it) or an uploaded export."""

    ref: str | int | None
    export: tuple[bytes, bytes] | None      # (manifest JSON, factors safetensors)
    share: float | None


def candidate_id(value: Any) -> str:
    if not isinstance(value, str) or not CANDIDATE_ID_RE.fullmatch(value):
        raise InvalidRequestError(f"candidate id {value!r} must be 6 lowercase hex digits")
    return value


def stage_args(body: dict[str, Any]) -> StageArgs:
    unknown = sorted(set(body) - {"ref", "version", "manifest_json", "factors", "share"})
    if unknown:
        raise InvalidRequestError(f"unknown field(s) {unknown} in a stage request")
    share = body.get("share")
    if share is not None:
        if isinstance(share, bool):
            raise InvalidRequestError(f"share must be a number in [0, 1], got {share!r}")
        share = check_share(share)
    given = [k for k in ("ref", "version", "manifest_json") if k in body]
    if len(given) != 1:
        raise InvalidRequestError(f"give exactly one of 'ref', 'version' or 'manifest_json'+'factors', got {given}")
    if "ref" in body:
        ref = body["ref"]
        if not isinstance(ref, str) or not REF_RE.fullmatch(ref):
            raise InvalidRequestError(f"ref {ref!r} must be a patch digest or a prefix of >= 4 hex digits")
        return StageArgs(ref=ref, export=None, share=share)
    if "version" in body:
        v = body["version"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InvalidRequestError(f"version must be a non-negative integer, got {v!r}")
        return StageArgs(ref=v, export=None, share=share)
    try:
        manifest = base64.b64decode(body["manifest_json"], validate=True)
        factors = base64.b64decode(body.get("factors", ""), validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise InvalidRequestError(f"manifest_json and factors must be base64: {exc}") from None
    if not factors:
        raise InvalidRequestError("an uploaded patch needs 'factors' (base64 safetensors)")
    return StageArgs(ref=None, export=(manifest, factors), share=share)
