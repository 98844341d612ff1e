"""Staged candidates: patches loaded into the running engine as LoRA adapters, beside the head.

`Candidates` (one per control plane, created by `attach` when ``EDITSERVE_CANDIDATES`` > 0)
keeps the staged candidates in memory (they are removed on restart: nothing of a candidate is
durable except its audit line and, once promoted, the ledger version). A candidate is either one
patch (a ledger patch, an uploaded patch export or a dry run's) applied as +UVᵀ on top of
whatever the head serves, or an earlier version's difference from the head (`stage_to_version`:
−UVᵀ for each patch active at the head but not at that version, +UVᵀ for the reverse, so the
candidate serves that version's weights; its promote is a rollback). Requests reach it by model
name ``<served-name>@candidate-<id>`` (registered with vLLM's OpenAI model registry, so it is
listed in ``/v1/models``) or by a share of default traffic (`route_share`, deterministic per
request id).

"Still applies on top": a candidate staged at head h stays valid at a later head h' when the
patches active at h' that were not active at h touch none of the candidate's weights, and the
patches active at h that are gone at h' touched none of them either (then head' + candidate is
exactly what the adapter computes). A ``to_version`` candidate is promoted by a rollback, which
restores every weight of that version, so it applies only while the head holds exactly the
patches it held at staging. Otherwise promote is refused with `CandidateConflict`; discard
always works.

Leaving (promote, discard): the candidate is first marked as leaving — requests naming it are
served by the head from then on and share routing skips it — then the requests already running
on its adapter are drained (`drain`: until vLLM's output processor holds none of them for
`QUIET_S`, at most `DRAIN_TIMEOUT_S`), and only then is the adapter removed. Its files stay on
disk for `RETIRE_S` more (vLLM re-loads an adapter from its path if a request still names it; a
missing directory would fail that request), and are removed at shutdown at the latest.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from editserve.candidates.adapter import factors_of, write_adapter
from editserve.envparse import whole_number
from editserve.errors import InvalidRequestError, PatchStateError
from editserve.ledger.errors import PatchNotFound
from editserve.patches import Patch

log = logging.getLogger(__name__)

CANDIDATES_ENV = "EDITSERVE_CANDIDATES"
MAX_RANK_ENV = "EDITSERVE_CANDIDATE_MAX_RANK"
SHARE_ENV = "EDITSERVE_CANDIDATE_SHARE"
DEFAULT_MAX_RANK = 16
NAME_SEP = "@candidate-"
SOURCES = ("ledger", "upload", "dry_run", "to_version")
QUIET_S = 0.5
DRAIN_TIMEOUT_S = 120.0
DRAIN_POLL_S = 0.05
RETIRE_S = 600.0


class CandidatesDisabled(PatchStateError):
    """The server was started without ``--candidates N``."""


class CandidateConflict(PatchStateError):
    """The head moved since staging and touched the candidate's weights (or too many are staged)."""


class CandidateNotFound(PatchNotFound):
    """No staged candidate has this id."""


@dataclass(frozen=True)
class CandidateSettings:
    """How many candidates may be staged, their largest LoRA rank, the default traffic share."""

    max_candidates: int = 0
    max_rank: int = DEFAULT_MAX_RANK
    share: float = 0.0

    def __post_init__(self) -> None:
        if self.max_candidates < 0:
            raise InvalidRequestError(f"{CANDIDATES_ENV} must be >= 0, got {self.max_candidates}")
        if self.max_rank < 1:
            raise InvalidRequestError(f"{MAX_RANK_ENV} must be >= 1, got {self.max_rank}")
        check_share(self.share)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "CandidateSettings":
        env = os.environ if environ is None else environ

        def integer(name: str, default: int) -> int:
            return whole_number(env, name, default)

        raw_share = env.get(SHARE_ENV, "").strip()
        try:
            share = float(raw_share) if raw_share else 0.0
        except ValueError:
            raise InvalidRequestError(f"{SHARE_ENV} must be a number in [0, 1], got {raw_share!r}") from None
        return cls(max_candidates=integer(CANDIDATES_ENV, 0), max_rank=integer(MAX_RANK_ENV, DEFAULT_MAX_RANK),
                   share=share)

    def vllm_args(self) -> list[str]:
        """The ``vllm serve`` flags that enable LoRA for the candidates (none when disabled)."""
        if self.max_candidates == 0:
            return []
        return ["--enable-lora", "--max-loras", str(self.max_candidates), "--max-lora-rank", str(self.max_rank),
                "--lora-target-modules", "down_proj"]


def check_share(share: float) -> float:
    if not (isinstance(share, (int, float)) and 0.0 <= float(share) <= 1.0):
        raise InvalidRequestError(f"share must be a number in [0, 1], got {share!r}")
    return float(share)


def bucket(request_id: str) -> float:
    """A request id's fixed point in [0, 1) (sha256), so a retried request lands on the same side."""
    h = hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


@dataclass(frozen=True)
class Candidate:
    """A staged candidate (as listed)."""

    id: str
    model: str                     # <served-name>@candidate-<id>
    patch_id: str
    weights: tuple[str, ...]
    rank: int
    staged_at_head: int
    share: float
    caller: str
    staged_at: float
    lora_int_id: int
    source: str = "ledger"         # one of SOURCES
    to_version: int | None = None  # source "to_version": the version it serves ("" patch_id)
    added: tuple[str, ...] = ()    # source "to_version": patches active there, not at the head (+UVᵀ)
    removed: tuple[str, ...] = ()  # source "to_version": patches active at the head, not there (−UVᵀ)

    def label(self, version: int) -> str:
        return f"{version}+candidate-{self.id}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Candidates:
    """The staged candidates of one server (see the module docstring)."""

    def __init__(self, engine: Any, serving_models: Any, served_name: str, settings: CandidateSettings,
                 workdir: Path) -> None:
        self.engine = engine                 # editserve.engine.control.ControlPlane
        self.serving_models = serving_models  # vLLM's OpenAIServingModels
        self.served_name = served_name
        self.settings = settings
        self.workdir = workdir
        self._staged: dict[str, tuple[Candidate, Patch | None, Path | None]] = {}   # (…, None, None): to_version
        self._lock = asyncio.Lock()
        self._next_int_id = 1_000_000        # away from vLLM's own counter for API-loaded adapters
        self._leaving: set[str] = set()      # ids being promoted or discarded: their traffic goes to the head
        self._promoting: set[str] = set()    # ids being promoted (a discard is refused meanwhile)
        self._probes: dict[str, tuple[Any, ...]] = {}   # id → the gate's prompts (editserve.candidates.compare)
        self._routed: dict[str, int] = {}    # id → generation requests routed to it
        self.head_routed = 0                 # generation requests left on the head while candidates were staged
        self._retired: list[tuple[float, Path]] = []    # (when, adapter files) of unloaded candidates

    # -- reads -----------------------------------------------------------------------------------

    def list(self) -> list[Candidate]:
        return [c for c, _, _ in self._staged.values()]

    def get(self, cid: str) -> Candidate:
        hit = self._staged.get(cid)
        if hit is None:
            raise CandidateNotFound(f"no staged candidate {cid!r} (staged: {sorted(self._staged) or 'none'})")
        return hit[0]

    def by_model(self, model: str) -> Candidate | None:
        if NAME_SEP not in model:
            return None
        hit = self._staged.get(model.rpartition(NAME_SEP)[2])
        return hit[0] if hit is not None and hit[0].model == model else None

    def route_share(self, request_id: str) -> Candidate | None:
        """The candidate a default-model request with this id goes to, or None (the head).
        The candidates' shares partition [0, 1) in staging order."""
        x, lo = bucket(request_id), 0.0
        for c, _, _ in self._staged.values():
            if c.share > 0 and lo <= x < lo + c.share:
                return None if c.id in self._leaving else c
            lo += c.share
        return None

    def leaving(self, cid: str) -> bool:
        return cid in self._leaving

    def begin_leaving(self, cid: str, promotion: bool = False) -> None:
        """From now on the candidate's traffic (by name or share) is served by the head (before a
        promotion: once its patch is committed, head + adapter would apply the patch twice)."""
        self.get(cid)
        self._leaving.add(cid)
        if promotion:
            self._promoting.add(cid)

    def end_leaving(self, cid: str) -> None:
        self._leaving.discard(cid)
        self._promoting.discard(cid)

    def promoting(self, cid: str) -> bool:
        return cid in self._promoting

    def count(self, cand: Candidate | None) -> None:
        """Count one generation request routed while candidates are staged (to `cand`, or the head)."""
        if cand is None:
            self.head_routed += 1
        else:
            self._routed[cand.id] = self._routed.get(cand.id, 0) + 1

    def routed(self, cid: str) -> int:
        return self._routed.get(cid, 0)

    def probes(self, cid: str) -> tuple[Any, ...]:
        """The gate's prompts of the candidate's facts (`editserve.candidates.compare.CompareItem`)."""
        self.get(cid)
        return self._probes.get(cid, ())

    def in_flight(self, cand: Candidate) -> int | None:
        """Requests vLLM is running on the candidate's adapter now (None: not observable here)."""
        processor = getattr(self.engine.engine, "output_processor", None)
        states = getattr(processor, "request_states", None)
        if not isinstance(states, dict):
            return None
        return sum(1 for st in list(states.values()) if getattr(st, "lora_name", None) == cand.model)

    async def drain(self, cid: str, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Wait (the candidate leaving) until no request runs on its adapter for `QUIET_S`; False
        when that could not be observed or `timeout_s` passed first."""
        cand = self.get(cid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        quiet_since: float | None = None
        t0, most = loop.time(), 0
        while loop.time() < deadline:
            n = self.in_flight(cand)
            if n is None:
                log.warning("candidate %s: vLLM's running requests are not observable here; unloading its "
                            "adapter after %.1f s", cid, QUIET_S)
                await asyncio.sleep(QUIET_S)
                return False
            now = loop.time()
            most = max(most, n)
            if n:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= QUIET_S:
                log.info("candidate %s: drained (at most %d request(s) still ran on its adapter; %.2f s)", cid, most,
                         now - t0)
                return True
            await asyncio.sleep(DRAIN_POLL_S)
        log.warning("candidate %s: requests still ran on its adapter after %.0f s; unloading it anyway "
                    "(its files stay, so a late request re-loads it)", cid, timeout_s)
        return False

    # -- changes ---------------------------------------------------------------------------------

    def effective_share(self, share: float | None) -> float:
        """The share a stage request gets: its own, else the server's ``--candidate-share``."""
        return self.settings.share if share is None else check_share(share)

    async def stage(self, patch: Patch, export_dir: Path, caller: str, share: float | None = None,
                    source: str = "ledger", probes: tuple[Any, ...] = ()) -> Candidate:
        """Load `patch` as an adapter (head + patch); the patch must not be active at the head.
        `probes`: the gate's prompts of its facts, for `compare`."""
        share = self.effective_share(share)
        if source not in SOURCES:
            raise InvalidRequestError(f"source must be one of {list(SOURCES)}, got {source!r}")
        self._prune_retired()
        async with self._lock:
            self._check_room(share)
            head = await asyncio.to_thread(self.engine.ledger.head)
            active = await asyncio.to_thread(self.engine.ledger.active_ids, head)
            if patch.digest in active:
                raise CandidateConflict(f"patch {patch.digest[:12]} is already active at the head (version {head})")
            for c, _, _ in self._staged.values():
                if c.patch_id == patch.digest:
                    raise CandidateConflict(f"patch {patch.digest[:12]} is already staged as candidate {c.id}")
            cid = secrets.token_hex(3)
            kept = self.workdir / cid / "patch"
            shutil.copytree(export_dir, kept)
            return await self._load(cid, [(1, patch)], dict(patch_id=patch.digest, staged_at_head=head, share=share,
                                                            caller=caller, source=source), patch, kept, probes)

    def _check_room(self, share: float) -> None:
        """(Under the lock) a free slot, and room for `share` among the staged candidates' shares."""
        if len(self._staged) >= self.settings.max_candidates:
            raise CandidateConflict(f"{len(self._staged)} candidate(s) are staged, the maximum "
                                    f"(--candidates {self.settings.max_candidates}); promote or discard one first")
        if sum(c.share for c, _, _ in self._staged.values()) + share > 1.0 + 1e-9:
            raise InvalidRequestError(f"share {share} would send more than all default traffic to candidates")

    async def _load(self, cid: str, signed: Sequence[tuple[int, Patch]], fields: dict[str, Any],
                    patch: Patch | None, kept: Path | None, probes: Sequence[Any]) -> Candidate:
        """(Under the lock) write the adapter of Σ sign · UVᵀ (`RankTooLarge` above the bound),
        load it into vLLM, register its model name, and record the candidate."""
        from vllm.lora.request import LoRARequest

        try:
            factors = factors_of(signed)
            adapter_dir = write_adapter(factors, self.workdir / cid / "adapter", str(self.engine.settings.model),
                                        self.settings.max_rank)
            int_id = self._next_int_id
            self._next_int_id += 1
            cand = Candidate(id=cid, model=f"{self.served_name}{NAME_SEP}{cid}", weights=factors.weight_names,
                             rank=factors.rank, staged_at=time.time(), lora_int_id=int_id, **fields)
            request = LoRARequest(lora_name=cand.model, lora_int_id=int_id, lora_path=str(adapter_dir))
            await self.engine.engine.add_lora(request)
        except BaseException:
            shutil.rmtree(self.workdir / cid, ignore_errors=True)     # nothing of a refused candidate stays
            raise
        self.serving_models.lora_requests[cand.model] = request
        self._staged[cid] = (cand, patch, kept)
        self._probes[cid] = tuple(probes)
        self._gauge()
        return cand

    async def stage_to_version(self, version: int, caller: str, share: float | None = None,
                               probes: Callable[[Sequence[Patch], Sequence[Patch]], Sequence[Any]] | None = None,
                               ) -> Candidate:
        """Load the difference W_version − W_head as an adapter, so the candidate serves ledger
        `version` (an earlier version than the head): −UVᵀ for each patch active at the head and
        not at `version`, +UVᵀ for each active there and not at the head (ranks add up).
        `probes(removed, added)`: the gate's prompts of those patches' facts, for `compare`."""
        share = self.effective_share(share)
        self._prune_retired()
        ledger = self.engine.ledger
        async with self._lock:
            self._check_room(share)
            head = await asyncio.to_thread(ledger.head)
            await asyncio.to_thread(ledger.version, version)          # VersionNotFound, naming it
            if version >= head:
                raise InvalidRequestError(f"to_version {version} must be an earlier version than the head "
                                          f"(version {head})")
            now = await asyncio.to_thread(ledger.active_ids, head)
            then = await asyncio.to_thread(ledger.active_ids, version)
            removed = tuple(d for d in now if d not in then)               # −UVᵀ
            added = tuple(d for d in then if d not in now)                 # +UVᵀ (a revert between them)
            if not removed and not added:
                raise CandidateConflict(f"to_version {version} holds the same patches as the head (version {head}); "
                                        "as a candidate it would change nothing")
            for c, _, _ in self._staged.values():
                if c.to_version == version:
                    raise CandidateConflict(f"to_version {version} is already staged as candidate {c.id}")
            gone = [await asyncio.to_thread(ledger.patch, d) for d in removed]
            back = [await asyncio.to_thread(ledger.patch, d) for d in added]
            items = await asyncio.to_thread(probes, gone, back) if probes is not None else ()
            return await self._load(secrets.token_hex(3), [(-1, p) for p in gone] + [(1, p) for p in back],
                                    dict(patch_id="", staged_at_head=head, share=share, caller=caller,
                                         source="to_version", to_version=version, added=added, removed=removed),
                                    None, None, items)

    async def check_applies(self, cand: Candidate) -> int:
        """The head, if `cand` still applies on top of it; `CandidateConflict` otherwise."""
        ledger = self.engine.ledger
        head = await asyncio.to_thread(ledger.head)
        if head == cand.staged_at_head:
            return head
        before = set(await asyncio.to_thread(ledger.active_ids, cand.staged_at_head))
        now = set(await asyncio.to_thread(ledger.active_ids, head))
        touched: set[str] = set()
        for digest in before ^ now:
            touched.update((await asyncio.to_thread(ledger.patch, digest)).weight_names)
        if cand.to_version is not None:
            if touched:       # a rollback restores all of version to_version: every difference counts
                raise CandidateConflict(
                    f"the head moved from version {cand.staged_at_head} to {head} and changed {sorted(touched)}: "
                    f"a rollback to version {cand.to_version} would no longer give what candidate {cand.id} "
                    "serves; discard it and stage it again")
            return head
        if cand.patch_id in now:
            return head
        clash = sorted(touched & set(cand.weights))
        if clash:
            raise CandidateConflict(
                f"the head moved from version {cand.staged_at_head} to {head} and changed {clash} that candidate "
                f"{cand.id} also changes; it no longer applies on top: discard it and stage it again")
        return head

    async def unload(self, cid: str) -> Candidate | None:
        """Remove a candidate's adapter after draining its requests (None if it is not staged:
        idempotent). Its traffic goes to the head from the first moment."""
        if cid not in self._staged:
            return None
        self._leaving.add(cid)
        await self.drain(cid)
        async with self._lock:
            hit = self._staged.pop(cid, None)
            if hit is None:
                return None
            cand = hit[0]
            self._probes.pop(cid, None)
            self._routed.pop(cid, None)
            self._gauge()
            self.serving_models.lora_requests.pop(cand.model, None)
            try:
                await self.engine.engine.remove_lora(cand.lora_int_id)
            finally:
                self._leaving.discard(cid)
                self._promoting.discard(cid)
                self._retired.append((time.monotonic(), self.workdir / cid))
        self._prune_retired()
        return cand

    def _prune_retired(self) -> None:
        now = time.monotonic()
        keep = []
        for when, path in self._retired:
            if now - when >= RETIRE_S:
                shutil.rmtree(path, ignore_errors=True)
            else:
                keep.append((when, path))
        self._retired = keep

    def _gauge(self) -> None:
        metrics = getattr(self.engine, "metrics", None)
        if metrics is not None:
            metrics.set_candidates_staged(len(self._staged))

    def patch_dir(self, cid: str) -> Path:
        """The patch export a patch candidate was staged from (what its promote imports)."""
        cand = self.get(cid)
        kept = self._staged[cid][2]
        if kept is None:
            raise InvalidRequestError(f"candidate {cid} serves version {cand.to_version}; it has no patch to import")
        return kept

    async def close(self) -> None:
        """At shutdown: forget the candidates and remove their files (the engine, and the adapters
        in it, go away with the server; nothing is asked of it here, so shutdown cannot hang on it)."""
        self._staged.clear()
        self._leaving.clear()
        self._promoting.clear()
        self._probes.clear()
        self._retired.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


def attach(control: Any, state: Any, served_name: str, environ: Mapping[str, str] | None = None) -> Candidates | None:
    """Create the server's `Candidates` as ``control.candidates`` when ``EDITSERVE_CANDIDATES`` > 0."""
    settings = CandidateSettings.from_env(environ)
    if settings.max_candidates == 0:
        control.candidates = None
        return None
    models = getattr(state, "openai_serving_models", None)
    if models is None or not hasattr(models, "lora_requests"):
        raise CandidatesDisabled("candidates need vLLM's OpenAI model registry with LoRA support")
    workdir = Path(tempfile.mkdtemp(prefix="editserve-candidates-"))
    control.candidates = Candidates(control, models, served_name, settings, workdir)
    log.info("candidates: up to %d staged, LoRA rank <= %d, default share %.2f", settings.max_candidates,
             settings.max_rank, settings.share)
    return control.candidates
