"""Validation of request messages before anything reaches the control plane.

Every check raises a typed error naming the bad value (mapped to a status code by the
interceptor); nothing is computed, committed or swapped for a request that fails here.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from editserve.control.errors import RequestTooLarge, ThresholdOutOfBounds
from editserve.control.limits import HparamOverrides, hparam_overrides
from editserve.control.methods import DEFAULT_METHOD, EDIT_METHODS
from editserve.control.probe import DEFAULT_THRESHOLDS, LOOSEST_THRESHOLDS, GateConfig, Thresholds
from editserve.editing.requests import MAX_TEXT_CHARS, EditRequest
from editserve.errors import InvalidRequestError, LayerOutOfRangeError

if TYPE_CHECKING:
    from editserve.ledger.transfer import PatchFiles

METHODS = EDIT_METHODS
MAX_FACTS = 32
MAX_GATE_PROMPTS = 32
MAX_PROBE_ITEMS = 64
MAX_TARGET_CHARS = 200
MAX_KEY_CHARS = 128
KEY_RE = re.compile(r"[A-Za-z0-9._:\-]+")


def _show(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "…")


def check_text(field: str, value: str, limit: int = MAX_TEXT_CHARS, allow_empty: bool = False) -> str:
    if not value.strip() and not allow_empty:
        raise InvalidRequestError(f"{field} must not be empty, got {_show(value)}")
    if len(value) > limit:
        raise RequestTooLarge(f"{field} is {len(value)} characters long ({_show(value)}); the limit is {limit}")
    bad = [c for c in value if unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn") and c not in "\n\t"]
    if bad:
        raise InvalidRequestError(f"{field} {_show(value)} contains control or unassigned character {bad[0]!r}")
    return value


def fact_request(f: Any, i: int) -> EditRequest:
    where = f"facts[{i}]"
    prompt = check_text(f"{where}.prompt", f.prompt)
    subject = check_text(f"{where}.subject", f.subject)
    target_new = check_text(f"{where}.target_new", f.target_new, MAX_TARGET_CHARS)
    target_true = check_text(f"{where}.target_true", f.target_true, MAX_TARGET_CHARS, allow_empty=True) or None
    if "{}" in subject or "{" in subject or "}" in subject:
        raise InvalidRequestError(f"{where}.subject {_show(subject)} may not contain braces")
    if target_true is not None and not target_true.strip():
        raise InvalidRequestError(f"{where}.target_true {_show(target_true)} is blank")
    if target_true is not None and target_new.strip() == target_true.strip():
        raise InvalidRequestError(f"{where}.target_new {_show(target_new)} equals target_true: nothing to change")
    if "{}" not in prompt:
        if subject not in prompt:
            raise InvalidRequestError(f"{where}: subject {_show(subject)} is not in prompt {_show(prompt)} "
                                      "(and the prompt has no '{}' placeholder)")
        return EditRequest.from_sentence(prompt, subject, target_new, target_true)
    return EditRequest(prompt=prompt, subject=subject, target_new=target_new, target_true=target_true)


@dataclass(frozen=True)
class EditArgs:
    requests: tuple[EditRequest, ...]
    method: str
    layers: tuple[int, ...] | None
    dry_run: bool
    expected_head: int | None
    idempotency_key: str | None
    gate: GateConfig
    hparams: HparamOverrides = HparamOverrides()
    skip_gate: bool = False
    wait_for_replicas_s: float | None = None


def thresholds_from(msg: Any, defaults: Thresholds = DEFAULT_THRESHOLDS,
                    loosest: Thresholds = LOOSEST_THRESHOLDS) -> Thresholds:
    values = {}
    for name in ("min_efficacy", "min_paraphrase", "max_ns_drop", "max_canary_kl"):
        if msg.HasField(name):
            v = getattr(msg, name)
            if not math.isfinite(v):
                raise InvalidRequestError(f"threshold {name} must be finite, got {v!r}")
            values[name] = v
        else:
            values[name] = getattr(defaults, name)
    th = Thresholds(**values)
    try:
        th.within(loosest)
    except InvalidRequestError as exc:
        raise ThresholdOutOfBounds(str(exc)) from None
    return th


def edit_args(msg: Any, n_layers: int | None, default_method: str = DEFAULT_METHOD) -> EditArgs:
    """An EditRequest checked (InvalidRequestError and its kinds, naming the bad value). `n_layers`:
    the served model's (None: unknown, layers unchecked); `default_method`: the method of a request
    that names none (the server's ``ControlSettings.default_method``, checked when it started)."""
    if not msg.facts:
        raise InvalidRequestError("facts must hold at least one fact, got none")
    if len(msg.facts) > MAX_FACTS:
        raise RequestTooLarge(f"{len(msg.facts)} facts in one request; the limit is {MAX_FACTS}")
    method = msg.method or default_method
    if method not in METHODS:
        raise InvalidRequestError(f"unknown method {_show(method)}; choose one of {list(METHODS)}")
    reqs = tuple(fact_request(f, i) for i, f in enumerate(msg.facts))
    seen: dict[tuple[str, str], int] = {}
    for i, r in enumerate(reqs):
        key = (r.prompt, r.subject)
        if key in seen:
            raise InvalidRequestError(f"facts[{i}] repeats facts[{seen[key]}] (subject {_show(r.subject)})")
        seen[key] = i
    if method == "rome" and len(reqs) != 1:
        raise InvalidRequestError(f"method 'rome' edits one fact at a time, got {len(reqs)} facts; use 'memit'")
    layers: tuple[int, ...] | None = tuple(msg.layers) if len(msg.layers) else None
    if layers is not None:
        for x in layers:
            if x < 0 or (n_layers is not None and x >= n_layers):
                raise LayerOutOfRangeError(f"layer {x} is out of range; the model has layers 0..{(n_layers or 1) - 1}")
        if len(set(layers)) != len(layers):
            raise InvalidRequestError(f"layers {list(layers)} repeat a layer")
        if method in ("rome", "gated") and len(layers) != 1:
            raise InvalidRequestError(f"method {method!r} edits one layer, got layers {list(layers)}")
    expected_head = msg.expected_head if msg.HasField("expected_head") else None
    if expected_head is not None and expected_head < 0:
        raise InvalidRequestError(f"expected_head must be a version number >= 0, got {expected_head}")
    key = msg.idempotency_key or None
    if key is not None and (len(key) > MAX_KEY_CHARS or not KEY_RE.fullmatch(key)):
        raise InvalidRequestError(f"idempotency_key {_show(key)} must be 1..{MAX_KEY_CHARS} characters of "
                                  "[A-Za-z0-9._:-]")
    gate_prompts = {}
    for field in ("paraphrases", "neighbours"):
        items = getattr(msg, field)
        if len(items) > MAX_GATE_PROMPTS:
            raise RequestTooLarge(f"{len(items)} {field}; the limit is {MAX_GATE_PROMPTS}")
        out = []
        for j, g in enumerate(items):
            check_text(f"{field}[{j}].prompt", g.prompt)
            if g.fact_index >= len(reqs):
                raise InvalidRequestError(f"{field}[{j}].fact_index {g.fact_index} names no fact "
                                          f"(there are {len(reqs)})")
            out.append((g.prompt, int(g.fact_index)))
        gate_prompts[field] = tuple(out)
    th = thresholds_from(msg.thresholds)
    return EditArgs(requests=reqs, method=method, layers=layers, dry_run=bool(msg.dry_run),
                    expected_head=expected_head, idempotency_key=key,
                    gate=GateConfig(thresholds=th, paraphrases=gate_prompts["paraphrases"],
                                    neighbours=gate_prompts["neighbours"]),
                    hparams=hparam_overrides(method, msg.hparams_json), skip_gate=bool(msg.skip_gate),
                    wait_for_replicas_s=wait_for_replicas(msg))


def version_number(field: str, value: int) -> int:
    if value < 0:
        raise InvalidRequestError(f"{field} must be a version number >= 0, got {value}")
    return int(value)


def probe_items(items: Sequence[Any]) -> tuple[tuple[str, str, str | None], ...]:
    if not items:
        raise InvalidRequestError("items must hold at least one prompt to score, got none")
    if len(items) > MAX_PROBE_ITEMS:
        raise RequestTooLarge(f"{len(items)} probe items; the limit is {MAX_PROBE_ITEMS}")
    out = []
    for i, it in enumerate(items):
        check_text(f"items[{i}].prompt", it.prompt)
        check_text(f"items[{i}].target", it.target, MAX_TARGET_CHARS)
        other = check_text(f"items[{i}].other", it.other, MAX_TARGET_CHARS, allow_empty=True) or None
        out.append((it.prompt, it.target, other))
    return tuple(out)


TRACE_KINDS = ("hidden", "mlp", "attn")
MAX_TRACE_SAMPLES = 64
MAX_TRACE_WINDOW = 64
MAX_NOISE_SCALE = 100.0


@dataclass(frozen=True)
class TraceArgs:
    """A validated Trace request (defaults filled in for unset fields)."""

    prompt: str
    subject: str
    target: str | None
    kind: str
    samples: int
    seed: int
    window: int
    noise_scale: float


def trace_args(request: Any) -> TraceArgs:
    prompt = check_text("prompt", request.prompt)
    subject = check_text("subject", request.subject)
    target = check_text("target", request.target, MAX_TARGET_CHARS, allow_empty=True) or None
    kind = request.kind or "hidden"
    if kind not in TRACE_KINDS:
        raise InvalidRequestError(f"unknown trace kind {kind!r}; choose one of {list(TRACE_KINDS)}")
    samples = int(request.samples) or 10
    if samples > MAX_TRACE_SAMPLES:
        raise RequestTooLarge(f"samples={samples}; the limit is {MAX_TRACE_SAMPLES}")
    window = int(request.window) or 10
    if window > MAX_TRACE_WINDOW:
        raise InvalidRequestError(f"window={window} is out of range; it must be 1..{MAX_TRACE_WINDOW}")
    noise = float(request.noise_scale) if request.noise_scale else 3.0
    if not math.isfinite(noise) or noise <= 0 or noise > MAX_NOISE_SCALE:
        raise InvalidRequestError(f"noise_scale={noise!r} is out of range; it must be in (0, {MAX_NOISE_SCALE:g}]")
    return TraceArgs(prompt=prompt, subject=subject, target=target, kind=kind, samples=samples,
                     seed=int(request.seed), window=window, noise_scale=noise)


# ------------------------------------------------------------------- version changes and reads


@dataclass(frozen=True)
class RollbackArgs:
    version: int
    expected_head: int | None
    wait_for_replicas_s: float | None = None


@dataclass(frozen=True)
class RevertArgs:
    version: int
    expected_head: int | None
    idempotency_key: str | None
    max_drop: float = 0.0


@dataclass(frozen=True)
class RebaseArgs:
    version: int
    expected_head: int | None
    idempotency_key: str | None
    wait_for_replicas_s: float | None = None
    max_drop: float = 0.0                 # when a consolidation holds the patch, as in RevertArgs


@dataclass(frozen=True)
class ConsolidateArgs:
    expected_head: int | None
    idempotency_key: str | None
    ridge: float = 0.1
    max_drop: float = 0.0
    wait_for_replicas_s: float | None = None
    whole: bool = False                   # re-solve the earlier consolidated patches too


@dataclass(frozen=True)
class ImportArgs:
    files: PatchFiles
    expected_head: int | None
    idempotency_key: str | None


MAX_IMPORT_BYTES = 64 << 20
MAX_CHECKSUM_NAMES = 256
MAX_LIST_LIMIT = 100_000
WEIGHT_NAME_RE = re.compile(r"[A-Za-z0-9_.]{1,200}")
REF_RE = re.compile(r"[0-9a-f]{4,64}")


def _expected_head(msg: Any) -> int | None:
    if not msg.HasField("expected_head"):
        return None
    return version_number("expected_head", msg.expected_head)


def idempotency_key(value: str) -> str | None:
    key = value or None
    if key is not None and (len(key) > MAX_KEY_CHARS or not KEY_RE.fullmatch(key)):
        raise InvalidRequestError(f"idempotency_key {_show(key)} must be 1..{MAX_KEY_CHARS} characters of "
                                  "[A-Za-z0-9._:-]")
    return key


MAX_WAIT_FOR_REPLICAS_S = 600.0


def wait_for_replicas(msg: Any) -> float | None:
    """``wait_for_replicas_s``: None when unset, else seconds in (0, 600]."""
    if not msg.HasField("wait_for_replicas_s"):
        return None
    value = float(msg.wait_for_replicas_s)
    if not (math.isfinite(value) and 0 < value <= MAX_WAIT_FOR_REPLICAS_S):
        raise InvalidRequestError(f"wait_for_replicas_s must be in (0, {MAX_WAIT_FOR_REPLICAS_S:.0f}] seconds, "
                                  f"got {value!r}")
    return value


def rollback_args(msg: Any) -> RollbackArgs:
    return RollbackArgs(version=version_number("version", msg.version), expected_head=_expected_head(msg),
                        wait_for_replicas_s=wait_for_replicas(msg))


def revert_args(msg: Any) -> RevertArgs:
    """A ``RevertRequest``: max_drop in [0, 1] (default 0), used when a consolidation holds the patch."""
    return RevertArgs(version=version_number("version", msg.version), expected_head=_expected_head(msg),
                      idempotency_key=idempotency_key(msg.idempotency_key), max_drop=_max_drop(msg))


def _max_drop(msg: Any) -> float:
    from editserve.ledger.consolidation import allowed_drop          # (imports torch: not at module load)

    return allowed_drop(float(msg.max_drop)) if msg.HasField("max_drop") else 0.0


def rebase_args(msg: Any) -> RebaseArgs:
    """A ``RebaseRequest``: max_drop in [0, 1] (default 0), used when a consolidation holds the patch;
    whether `version` has a patch with later ones is the ledger's to say."""
    return RebaseArgs(version=version_number("version", msg.version), expected_head=_expected_head(msg),
                      idempotency_key=idempotency_key(msg.idempotency_key), wait_for_replicas_s=wait_for_replicas(msg),
                      max_drop=_max_drop(msg))


MAX_RIDGE = 1e6


def consolidate_args(msg: Any) -> ConsolidateArgs:
    """A ``ConsolidateRequest``: ridge in (0, 1e6] (default 0.1), max_drop in [0, 1] (default 0), whole
    (default false: incremental);
    whether there is anything to consolidate is the ledger's to say."""
    ridge = float(msg.ridge) if msg.HasField("ridge") else 0.1
    if not (math.isfinite(ridge) and 0 < ridge <= MAX_RIDGE):
        raise InvalidRequestError(f"ridge must be in (0, {MAX_RIDGE:g}], got {ridge!r}")
    return ConsolidateArgs(expected_head=_expected_head(msg), idempotency_key=idempotency_key(msg.idempotency_key),
                           ridge=ridge, max_drop=_max_drop(msg), wait_for_replicas_s=wait_for_replicas(msg),
                           whole=bool(msg.whole) if msg.HasField("whole") else False)


def patch_upload(msg: Any) -> PatchFiles:
    """The patch export an ``ImportPatchRequest`` or a ``StageCandidateRequest`` uploads
    (``manifest_json``, ``factors``, ``keys``): both parts present, within the size limit, the
    manifest a JSON object, and ``keys`` present exactly when the manifest lists a keys file, so
    that an AlphaEdit patch never arrives without its preserved keys. The export itself (checksums,
    fingerprint, tensors, norms) is checked once by the ledger's reader before anything is swapped."""
    import json

    from editserve.ledger.errors import ImportRejected
    from editserve.ledger.transfer import KEYS_FILE, PatchFiles

    if not msg.manifest_json or not msg.factors:
        raise ImportRejected("an uploaded patch needs both 'manifest_json' and 'factors', got "
                             f"{len(msg.manifest_json)} and {len(msg.factors)} bytes")
    size = len(msg.manifest_json) + len(msg.factors) + len(msg.keys)
    if size > MAX_IMPORT_BYTES:
        raise RequestTooLarge(f"the uploaded patch is {size} bytes; the limit is {MAX_IMPORT_BYTES}")
    try:
        manifest = json.loads(msg.manifest_json.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ImportRejected(f"manifest_json is not UTF-8 JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ImportRejected(f"manifest_json must be a JSON object, got {type(manifest).__name__}")
    export = manifest.get("export")
    files = export.get("files") if isinstance(export, dict) else None
    listed = files.get(KEYS_FILE) if isinstance(files, dict) else None
    if listed is not None and not msg.keys:
        listed_size = listed.get("size") if isinstance(listed, dict) else listed
        raise ImportRejected(f"the manifest lists {KEYS_FILE} ({listed_size!r} bytes), the patch's preserved keys, but "
                             "'keys' is empty: send the export's keys (ExportPatchResponse.keys) with it")
    if listed is None and msg.keys:
        raise ImportRejected(f"'keys' has {len(msg.keys)} bytes but the manifest lists no {KEYS_FILE}")
    return PatchFiles(manifest_json=bytes(msg.manifest_json), factors=bytes(msg.factors), keys=bytes(msg.keys))


def import_args(msg: Any) -> ImportArgs:
    """An ``ImportPatchRequest``: the upload (`patch_upload`), the head it expects, its key."""
    return ImportArgs(files=patch_upload(msg), expected_head=_expected_head(msg),
                      idempotency_key=idempotency_key(msg.idempotency_key))


def export_ref(msg: Any) -> str | int:
    if msg.ref:
        if not REF_RE.fullmatch(msg.ref):
            raise InvalidRequestError(f"ref {_show(msg.ref)} must be a patch digest or a prefix of >= 4 hex digits")
        return str(msg.ref)
    return version_number("version", msg.version)


def list_limit(value: int) -> int:
    if value < 0 or value > MAX_LIST_LIMIT:
        raise InvalidRequestError(f"limit must be in 0..{MAX_LIST_LIMIT} (0: all), got {value}")
    return int(value)


def checksum_names(names: Sequence[str]) -> tuple[str, ...] | None:
    """The weight names of a checksums query: deduplicated (first occurrence kept), at most
    `MAX_CHECKSUM_NAMES`, each a plain parameter name; None (the served matrices) when empty."""
    if not names:
        return None
    unique = tuple(dict.fromkeys(names))
    if len(unique) > MAX_CHECKSUM_NAMES:
        raise RequestTooLarge(f"{len(unique)} weight names; the limit is {MAX_CHECKSUM_NAMES}")
    for n in unique:
        if not WEIGHT_NAME_RE.fullmatch(n):
            raise InvalidRequestError(f"weight name {_show(n)} must be 1..200 characters of [A-Za-z0-9_.]")
    return unique


def since_id(value: int) -> int:
    if value < 0:
        raise InvalidRequestError(f"since_id must be >= 0, got {value}")
    return int(value)
