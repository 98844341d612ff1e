"""The transport-neutral operations of the control plane: the one door every change goes through.

`Operations` is what the gRPC servicer (`editserve.control.service`) and the HTTP routes
(`editserve.control.http`) call, with an authenticated `Principal` and a validated request
(`editserve.control.validate`): edit, rollback, revert, rebase, consolidate, import, sync, probe, trace, status,
versions, version, diff, export, checksums, the event stream, and the candidates' stage, list,
compare, promote and discard (`editserve.candidates.operations`). Each operation checks the
principal's role again (`editserve.control.principals.OPERATION_ROLES`), applies the gate
policy (`editserve.control.gate`) and the limits (`editserve.control.limits`), records the
caller from the principal (never from the request), writes one audit line
(logger ``editserve.audit``) and publishes its progress to the `EventHub`, whatever the
transport. The adapters only translate messages and map errors (`editserve.control.errors`).

Dependency direction: ``control`` drives ``engine``. `Operations` uses the engine's
`editserve.engine.control.ControlPlane` through the small interface it exposes (``edit``,
``rollback``, ``revert``, ``rebase``, ``consolidate``, ``import_patch``, ``follow``, ``score``, ``trace``, ``status``,
``engine_checksums``, ``ledger``, ``settings``, ``metrics``); it imports nothing of
``editserve.engine`` at module import time, and ``editserve.engine`` imports ``control`` only
inside functions (the plugin's wiring). One `Operations` exists per control plane
(`Operations.of`), shared by both transports, with the token table and the event hub.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editserve.control import gate as gate_policy
from editserve.control import validate
from editserve.control.errors import AuthError, ProbeRejected
from editserve.control.events import DEFAULT_MAX_STREAMS, Event, EventHub
from editserve.control.methods import DEFAULT_METHOD
from editserve.control.principals import Principal, TokenTable, authorize, require
from editserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from editserve.ledger.transfer import PatchFiles

log = logging.getLogger(__name__)
audit = logging.getLogger("editserve.audit")

MAX_STREAMS_ENV = "EDITSERVE_MAX_EVENT_STREAMS"
EVENT_POLL_S = 0.25
EVENT_READ_THREADS = 2          # threads of the event streams' own ledger reads (`Operations.events`)
OPERATION_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def operation_id(value: str | None) -> str:
    """A caller-chosen operation id (to follow its own edit on an event stream), else a random one."""
    if value is None:
        return uuid.uuid4().hex[:12]
    if not OPERATION_RE.fullmatch(value):
        raise InvalidRequestError(f"operation id {value!r} must be 1-64 characters of [A-Za-z0-9._:-]")
    return value


@dataclass(frozen=True)
class RebaseReport:
    """What a rebase did: the version change and, per later edit, its scores before and after
    (the ``rebased`` entries of the revert version's details: `editserve.ledger.RebasedPatch.to_dict`)."""

    change: Any                                  # editserve.engine.changes.VersionChange
    reverted_version: int
    removed_patch: str
    rebased: tuple[dict[str, Any], ...]

    @classmethod
    def of(cls, change: Any, details: Mapping[str, Any]) -> "RebaseReport":
        return cls(change=change, reverted_version=int(details["reverted"]), removed_patch=str(details["removed_patch"]),
                   rebased=tuple(dict(r) for r in details.get("rebased", ())))

    def to_dict(self) -> dict[str, Any]:
        return {"change": self.change.to_dict(), "reverted_version": self.reverted_version,
                "removed_patch": self.removed_patch, "rebased": [dict(r) for r in self.rebased]}


@dataclass(frozen=True)
class ConsolidationReport:
    """What a consolidation did: the version change, the versions whose patches it replaced, per
    layer the keys kept and the disturbance before / after, and the constituents' facts that held
    before and after (read back from the written version's details and probe report)."""

    change: Any                                  # editserve.engine.changes.VersionChange
    constituent_versions: tuple[int, ...]
    layers: tuple[dict[str, Any], ...]           # `editserve.ledger.consolidation.LayerConsolidation.to_dict`
    facts: int
    held_before: int
    held_after: int

    @classmethod
    def of(cls, change: Any, details: Mapping[str, Any], probe_report: Mapping[str, Any] | None) -> "ConsolidationReport":
        check = (probe_report or {}).get("consolidation") or {}
        return cls(change=change, constituent_versions=tuple(int(c["version"]) for c in details.get("constituents", ())),
                   layers=tuple(dict(x) for x in details.get("layers", ())), facts=int(check.get("n_facts", 0)),
                   held_before=int(check.get("held_before", 0)), held_after=int(check.get("held_after", 0)))

    def to_dict(self) -> dict[str, Any]:
        return {"change": self.change.to_dict(), "constituent_versions": list(self.constituent_versions),
                "layers": [dict(x) for x in self.layers], "facts": self.facts, "held_before": self.held_before,
                "held_after": self.held_after}


class Operations:
    """See the module docstring."""

    def __init__(self, engine: Any, tokens: TokenTable, hub: EventHub | None = None) -> None:
        self.engine = engine
        self.tokens = tokens
        self.hub = hub if hub is not None else EventHub()      # (an empty hub is falsy)
        # The event streams read the ledger on threads of their own, not on the event loop's default
        # executor: that one also runs every blocking sidecar call (compute, score, retention probes),
        # which wait on the sidecar's one lock and can hold all its threads for minutes on a loaded
        # machine; a stream polling there would deliver nothing, local events included, until they end.
        self._event_reads = ThreadPoolExecutor(EVENT_READ_THREADS, thread_name_prefix="editserve-events")

    @classmethod
    def of(cls, engine: Any, environ: Mapping[str, str] | None = None) -> "Operations":
        """The control plane's `Operations`, created on first use (tokens from the environment,
        creating the local admin token file when none is configured)."""
        ops = getattr(engine, "operations", None)
        if ops is None:
            env = os.environ if environ is None else environ
            streams = env.get(MAX_STREAMS_ENV, "")
            if streams and not streams.isdigit():
                raise InvalidRequestError(f"{MAX_STREAMS_ENV} must be a positive integer, got {streams!r}")
            tokens = TokenTable.from_env(env)
            ops = cls(engine, tokens, EventHub(max_streams=int(streams) if streams else DEFAULT_MAX_STREAMS))
            engine.operations = ops
            log.info("control plane: %d token(s) from %s", len(tokens), tokens.source or "the environment")
        return ops

    # -- authentication (called by both adapters) ------------------------------------------

    def authenticate(self, operation: str, token: str | None, what: str, transport: str) -> Principal:
        try:
            return authorize(self.tokens, operation, token, what)
        except AuthError as exc:
            audit.warning("audit: refused %s over %s: %s: %s", what, transport, type(exc).__name__, exc)
            raise

    def n_layers(self) -> int | None:
        m = getattr(self.engine, "metrics", None)
        return int(m.n_layers) if m is not None and getattr(m, "n_layers", None) else None

    def default_method(self) -> str:
        """The method of an edit that names none: this server's, chosen when it started
        (``EDITSERVE_DEFAULT_METHOD``, else gated with neuron slots at the gated layer, else AlphaEdit;
        the value its edit policy records)."""
        method = self.engine.settings.default_method
        return DEFAULT_METHOD if method is None else str(method)    # None: no start has chosen one (no slots known)

    # -- changes ---------------------------------------------------------------------------

    def _publish(self, op: str, caller: str, stage: str, fraction: float, message: str = "",
                 version: int = -1) -> None:
        self.hub.publish(Event(kind="progress", operation_id=op, caller=caller, progress=fraction,
                               message=f"{stage}: {message}" if message else stage, version=version))

    async def edit(self, who: Principal, args: validate.EditArgs, op: str, keep_bases: bool = False) -> Any:
        """Compute, gate, commit and serve an edit; progress goes to the event hub under `op`.
        `keep_bases`: a dry run to be staged stores the touched matrices' base copies (engine `edit`)."""
        require(who, "edit")
        if args.hparams.needs_admin:
            require(who, "edit.hparams.admin", "an edit overriding statistics or prefix hyper-parameters")
        gate = gate_policy.gate_for(who, args.gate, args.skip_gate)
        caller = who.caller
        progress = self._progress_to(op, caller)
        self._publish(op, caller, "accepted", 0.0, f"{len(args.requests)} fact(s), method {args.method}")
        try:
            change = await self.engine.edit(
                list(args.requests), method=args.method, layers=args.layers, hparams=args.hparams.nested(),
                expected_head=args.expected_head, caller=caller, idempotency_key=args.idempotency_key, gate=gate,
                dry_run=args.dry_run, progress=progress,
                report_extra=gate_policy.skip_record(who) if gate is None else None, keep_bases=keep_bases)
        except ProbeRejected as exc:
            self.hub.publish(Event(kind="rejected", operation_id=op, caller=caller, message=str(exc),
                                   details_json=json.dumps(exc.report, default=str)))
            audit.info("audit: edit by %s rejected by the probe gate", caller)
            raise
        except Exception as exc:
            audit.info("audit: edit by %s failed: %s", caller, type(exc).__name__)
            raise
        if not args.dry_run:
            change = await self._rollout(change, args.wait_for_replicas_s)
        self._publish(op, caller, "dry_run" if args.dry_run else "committed", 1.0, version=change.version)
        audit.info("audit: edit by %s → %s version %d (patch %s)", caller, change.kind, change.version,
                   (change.patch_id or "")[:12])
        return change

    async def rollback(self, who: Principal, args: validate.RollbackArgs, origin: str = "") -> Any:
        """Serve version `args.version` and move the head there; `origin` (e.g. the candidate
        whose promotion this is) goes into the audit line."""
        require(who, "rollback")
        change = await self.engine.rollback(args.version, expected_head=args.expected_head, caller=who.caller)
        change = await self._rollout(change, args.wait_for_replicas_s)
        audit.info("audit: rollback by %s → version %d%s", who.caller, change.version,
                   f" ({origin})" if origin else "")
        return change

    async def _rollout(self, change: Any, wait_s: float | None) -> Any:
        """`change` with the live replicas that serve its version (after waiting up to `wait_s` for
        all of them, when given). The registry is read once this replica has recorded the version."""
        from dataclasses import replace

        fleet = getattr(self.engine, "fleet", None)
        if fleet is None:
            return change
        try:
            await fleet.report()
            if wait_s is not None:
                serving, lagging = await fleet.wait_for_replicas(change.version, wait_s)
            else:
                rows = [r for r in await fleet.fleet() if r["live"]]
                serving = sorted(r["replica_id"] for r in rows if r["version"] == change.version)
                lagging = sorted(r["replica_id"] for r in rows if r["version"] != change.version)
        except Exception as exc:   # committed and served here; the registry is only a report
            log.warning("replica registry not readable after version %d: %s", change.version, exc)
            return change
        return replace(change, serving_replicas=tuple(serving), lagging_replicas=tuple(lagging))

    async def revert(self, who: Principal, args: validate.RevertArgs) -> Any:
        require(who, "revert")
        change = await self.engine.revert(args.version, caller=who.caller, expected_head=args.expected_head,
                                          idempotency_key=args.idempotency_key, max_drop=args.max_drop)
        audit.info("audit: revert of version %d by %s → version %d", args.version, who.caller, change.version)
        return change

    async def rebase(self, who: Principal, args: validate.RebaseArgs, op: str) -> "RebaseReport":
        """Revert `args.version`'s patch and recompute the later ones (`ControlPlane.rebase`); the
        report is read back from the written ledger version, so a repeated idempotency key returns
        the same report (its change is ``kind="replayed"``)."""
        require(who, "rebase")
        caller = who.caller
        progress = self._progress_to(op, caller)
        self._publish(op, caller, "accepted", 0.0, f"rebase: revert version {args.version}, recompute later patches")
        try:
            change = await self.engine.rebase(args.version, caller=caller, expected_head=args.expected_head,
                                              idempotency_key=args.idempotency_key, progress=progress,
                                              max_drop=args.max_drop)
        except Exception as exc:
            audit.info("audit: rebase of version %d by %s failed: %s", args.version, caller, type(exc).__name__)
            raise
        change = await self._rollout(change, args.wait_for_replicas_s)
        info = await asyncio.to_thread(self.engine.ledger.version, change.version)
        report = RebaseReport.of(change, info.details)
        self._publish(op, caller, "committed", 1.0, f"{len(report.rebased)} patch(es) rebased", version=change.version)
        audit.info("audit: rebase of version %d by %s → version %d (%d later patch(es) recomputed)%s", args.version,
                   caller, change.version, len(report.rebased),
                   " replayed: nothing new was written" if change.kind == "replayed" else "")
        return report

    def _progress_to(self, op: str, caller: str) -> Callable[[str, float, str], None]:
        """A progress callback that publishes on this operation's event stream from any thread."""
        loop, loop_thread = asyncio.get_running_loop(), threading.get_ident()

        def progress(stage: str, fraction: float, message: str) -> None:
            if threading.get_ident() == loop_thread:          # in order with the events published here
                self._publish(op, caller, stage, fraction, message)
            else:                                             # from the thread waiting on the sidecar
                loop.call_soon_threadsafe(self._publish, op, caller, stage, fraction, message)

        return progress

    async def consolidate(self, who: Principal, args: validate.ConsolidateArgs, op: str) -> ConsolidationReport:
        """Replace the active patches that carry preserved keys by one (`ControlPlane.consolidate`);
        the report is read back from the written ledger version, so a repeated idempotency key
        returns the same report (its change is ``kind="replayed"``)."""
        require(who, "consolidate")
        caller = who.caller
        self._publish(op, caller, "accepted", 0.0, f"consolidate (ridge {args.ridge:g}, max drop {args.max_drop:g})")
        try:
            change = await self.engine.consolidate(caller=caller, expected_head=args.expected_head,
                                                   idempotency_key=args.idempotency_key, ridge=args.ridge,
                                                   max_drop=args.max_drop, progress=self._progress_to(op, caller),
                                                   whole=args.whole)
        except Exception as exc:
            audit.info("audit: consolidation by %s failed: %s", caller, type(exc).__name__)
            raise
        change = await self._rollout(change, args.wait_for_replicas_s)
        info = await asyncio.to_thread(self.engine.ledger.version, change.version)
        report = ConsolidationReport.of(change, info.details, info.probe_report)
        self._publish(op, caller, "committed", 1.0, f"{len(report.constituent_versions)} patches consolidated",
                      version=change.version)
        audit.info("audit: consolidation by %s → version %d (%d patches → 1; facts holding %d → %d of %d)%s", caller,
                   change.version, len(report.constituent_versions), report.held_before, report.held_after,
                   report.facts, " replayed: nothing new was written" if change.kind == "replayed" else "")
        return report

    async def import_patch(self, who: Principal, args: validate.ImportArgs) -> Any:
        require(who, "import")
        with tempfile.TemporaryDirectory(prefix="editserve-import-") as tmp:
            src = await asyncio.to_thread(args.files.write, Path(tmp))
            change = await self.engine.import_patch(src, caller=who.caller, expected_head=args.expected_head,
                                                    idempotency_key=args.idempotency_key)
        audit.info("audit: import of patch %s by %s → version %d", (change.patch_id or "")[:12], who.caller,
                   change.version)
        return change

    async def sync(self, who: Principal) -> Any:
        require(who, "sync")
        change = await self.engine.follow(settle=True)       # the sidecar mirrors it when this returns
        if change is not None:
            audit.info("audit: sync by %s → version %d", who.caller, change.version)
        return change

    # -- reads through the sidecar -------------------------------------------------------------

    async def probe(self, who: Principal, items: tuple[tuple[str, str, str | None], ...]) -> Any:
        require(who, "probe")
        return await self.engine.score(items)

    async def trace(self, who: Principal, a: validate.TraceArgs) -> Any:
        require(who, "trace")
        return await self.engine.trace(a.prompt, a.subject, target=a.target, kind=a.kind, samples=a.samples,
                                       seed=a.seed, window=a.window, noise_scale=a.noise_scale)

    # -- reads ---------------------------------------------------------------------------------

    async def status(self, who: Principal) -> dict[str, Any]:
        """The engine's status (`ControlPlane.status`) plus the gate's threshold bounds and the model."""
        from dataclasses import asdict

        from editserve.control.probe import DEFAULT_THRESHOLDS, LOOSEST_THRESHOLDS

        require(who, "status")
        st = dict(await self.engine.status())
        st["model"] = str(self.engine.settings.model or "")
        served = st.get("served_version")
        st["active_patches"] = (len(await asyncio.to_thread(self.engine.ledger.active_ids, served))
                                if served is not None else 0)
        st["threshold_bounds"] = {"defaults": asdict(DEFAULT_THRESHOLDS), "loosest": asdict(LOOSEST_THRESHOLDS)}
        st["event_streams"] = {"open": len(self.hub), "max": self.hub.max_streams}
        return st

    async def versions(self, who: Principal, limit: int) -> tuple[list[Any], int]:
        require(who, "versions")
        ledger = self.engine.ledger
        infos = await asyncio.to_thread(ledger.versions)
        head = await asyncio.to_thread(ledger.head)
        return (infos[-limit:] if limit else infos), head

    async def version(self, who: Principal, version: int) -> tuple[Any, int]:
        require(who, "version")
        ledger = self.engine.ledger
        info = await asyncio.to_thread(ledger.version, version)
        return info, await asyncio.to_thread(ledger.head)

    async def diff(self, who: Principal, a: int, b: int) -> Any:
        require(who, "diff")
        return await asyncio.to_thread(self.engine.ledger.weights.diff, a, b)

    async def export(self, who: Principal, ref: str | int) -> tuple[str, PatchFiles]:
        """(patch id, the export's files: manifest JSON, factors, preserved keys) of a patch (a digest
        prefix or the version that added it)."""
        from editserve.ledger.transfer import PatchFiles, export_patch

        require(who, "export")
        with tempfile.TemporaryDirectory(prefix="editserve-export-") as tmp:
            out = await asyncio.to_thread(export_patch, self.engine.ledger, ref, Path(tmp) / "patch")
            files = await asyncio.to_thread(PatchFiles.read, out)
        return str(json.loads(files.manifest_json).get("digest", "")), files

    async def checksums(self, who: Principal, names: tuple[str, ...] | None) -> dict[str, dict[int, str]]:
        require(who, "checksums")
        return await self.engine.engine_checksums(names)

    async def events(self, who: Principal, since: int, include_history: bool) -> AsyncIterator[Any]:
        """Ledger events after `since` (with `since` 0 and no history: from now) interleaved with
        this server's local events, starting with one ``watching`` `Event` whose details say
        ``{"after_event": N}``. Bounded by the hub's stream cap."""
        require(who, "events")
        ledger = self.engine.ledger
        loop = asyncio.get_running_loop()
        local = self.hub.subscribe()
        try:
            if since == 0 and not include_history:
                existing = await loop.run_in_executor(self._event_reads, ledger.events, 0)
                last = existing[-1].id if existing else 0
            else:
                last = since
            yield Event(kind="watching", operation_id="", caller="",
                        message=f"ledger events after #{last} and this server's events from now on",
                        details_json=json.dumps({"after_event": last}))
            while True:
                for e in await loop.run_in_executor(self._event_reads, ledger.events, last):
                    last = max(last, e.id)
                    yield e
                try:
                    yield await asyncio.wait_for(local.get(), EVENT_POLL_S)
                    while not local.empty():
                        yield local.get_nowait()
                except asyncio.TimeoutError:
                    continue
        finally:
            self.hub.unsubscribe(local)

    # -- candidates (editserve.candidates.operations; docs/candidates.md) ----------------------

    async def stage(self, who: Principal, args: Any, op: str | None = None) -> Any:
        """Stage a candidate (`editserve.candidates.validate.StageArgs`). A share > 0 (asked for, or
        the server's default) needs the admin role; an edit to stage is computed as a dry run
        through `edit` (its role, gate policy and progress events)."""
        from editserve.candidates import operations as candidate_ops

        require(who, "stage")
        if candidate_ops.candidates_of(self.engine).effective_share(args.share) > 0:
            require(who, "stage.share", "staging with a share of default traffic")
        computed = None
        if args.edit is not None:
            computed = await self.edit(who, args.edit, operation_id(op), keep_bases=True)
        return await candidate_ops.stage(self.engine, who.caller, args.ref, args.export, args.share, computed,
                                         to_version=args.to_version)

    async def candidates(self, who: Principal) -> Any:
        from editserve.candidates import operations as candidate_ops

        require(who, "candidates")
        return candidate_ops.listing(self.engine)

    async def compare(self, who: Principal, cid: str, items: Any) -> Any:
        from editserve.candidates import operations as candidate_ops

        require(who, "compare")
        return await candidate_ops.compare(self.engine, who.caller, cid, items)

    async def promote(self, who: Principal, cid: str) -> Any:
        from editserve.candidates import operations as candidate_ops

        require(who, "promote")
        if (candidate_ops.outcome_of(self.engine, cid) is None
                and candidate_ops.candidates_of(self.engine).get(cid).to_version is not None):
            require(who, "rollback", "promoting a to_version candidate (a rollback)")

        async def rollback(version: int, head: int) -> Any:     # a to_version candidate's promotion
            return await self.rollback(who, validate.RollbackArgs(version=version, expected_head=head),
                                       origin=f"promote of candidate {cid}")

        return await candidate_ops.promote(self.engine, who.caller, cid, rollback)

    async def discard(self, who: Principal, cid: str) -> Any:
        from editserve.candidates import operations as candidate_ops

        require(who, "discard")
        return await candidate_ops.discard(self.engine, who.caller, cid)
