"""The sidecar's child process: the Hugging Face model that mirrors the ledger head, and the work on it.

`sidecar_main` is the process's entry point (spawned by `editserve.engine.sidecar.client.SidecarClient`):
it loads the checkpoint, announces `Ready`, starts the statistics warm-up and answers one request
at a time (`_serve`). `_Worker` holds the model, its tokenizer, the open ledger and the merged
patches; each request type of `editserve.engine.sidecar.protocol` is one of its methods.
This module imports torch and transformers only, never vLLM.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import replace
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import torch

from editserve.editing.arch import MLP_HALVES, Layout
from editserve.engine.errors import SidecarError
from editserve.engine.sidecar.protocol import (ComputeConsolidation, ComputeEdit, ComputeFactRemoval, ComputeRebase,
                                               ConsolidationComputed, EditComputed, Failed, FactRemovalComputed,
                                               LedgerOpened, OpenLedger, ProbePrompt, ProbeRetention, Progress, Ready,
                                               RebaseComputed, RetentionMeasured, Scored, ScorePrompts, Shutdown,
                                               SidecarConfig, Sync, Synced, TraceFact, Traced)
from editserve.engine.wire import rank_range, weight_checksum
from editserve.errors import EditserveError
from editserve.memory import trim_heap

log = logging.getLogger(__name__)


def _target_logprob(model: torch.nn.Module, tok: Any, prompt: str, target: str) -> float:
    """Mean per-token log p(target | prompt) (what `editserve.editing.scoring.target_nll` negates)."""
    from editserve.editing.prompts import target_ids

    device = next(model.parameters()).device
    pids = tok(prompt)["input_ids"]
    tids = target_ids(tok, target)
    ids = torch.tensor([pids + tids], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits[len(pids) - 1: len(pids) - 1 + len(tids)], dim=-1)
    return float(logp[torch.arange(len(tids)), torch.tensor(tids, device=device)].mean())


class _Worker:
    """State of the child process: the model, its tokenizer, the ledger and the merged patches."""

    def __init__(self, config: SidecarConfig) -> None:
        from editserve.editing.arch import num_layers, spec_for
        from editserve.editing.model import fingerprint, load_model

        t0 = time.perf_counter()
        if config.threads:
            torch.set_num_threads(int(config.threads))
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, config.dtype)
        self.model, self.tok = load_model(config.checkpoint, device=device, dtype=dtype)
        self.spec = spec_for(self.model)
        self.fingerprint = fingerprint(self.model)          # of the checkpoint's weights, before any widening
        if config.neuron_slots:
            from editserve.editing.slots import widen_mlp

            for layer, count in config.neuron_slots:
                widen_mlp(self.model, int(layer), int(count))
        self.ready = Ready(fingerprint=self.fingerprint, family=self.spec.family, n_layers=num_layers(self.model),
                           device=str(device), checkpoint=str(getattr(self.model, "editserve_checkpoint", "")),
                           seconds=time.perf_counter() - t0)
        self.ledger: Any = None
        self.version = 0
        self.preserved: Any = None               # PreservedKeys of `version` (set by _hold)
        self.notify: Callable[[Progress], None] | None = None     # sidecar_main: send to the parent
        self.warmup: Any = None                  # a StatisticsWarmup once sidecar_main has started it
        # The text the held-out perplexity is measured on (None: the packaged prose), read once so
        # that the reference and every later measurement see the same text; an unreadable file
        # fails the start (a configuration error, named), unlike a failed measurement.
        self.heldout_text: str | None = None
        if config.heldout_text:
            from editserve.engine.health import read_heldout_text

            self.heldout_text = read_heldout_text(config.heldout_text)
        # The unedited model's held-out perplexity, the retention probe's reference (the model is the
        # base checkpoint until the first `_hold`). None when it cannot be measured: the probe then
        # leaves the perplexity out.
        self.base_heldout_ppl = self._heldout_ppl("the unedited model")
        self._base_prefixes()
        # (digests of the merged patches, their held-out perplexity): the last measured weights
        self._held_ppl: tuple[tuple[str, ...], float] | None = None

    def _base_prefixes(self) -> None:
        """The context prefixes of every method, sampled from the unedited model (before the first
        `_hold`) into their cache, once per ``$EDITSERVE_HOME``: otherwise a method's first edit sampled
        them from whatever version the sidecar held then (SmolLM2 on 2 cores, cold home: 5.3 s for
        AlphaEdit's 5, about twice that for ROME's 10). One list per prefix length and seed, the
        longest any method asks for: a shorter list is its head (`editing.prefixes`)."""
        from editserve.control.methods import EDIT_METHODS
        from editserve.editing.edit import default_hparams
        from editserve.editing.hparams import PrefixParams
        from editserve.editing.prefixes import context_prefixes

        longest: dict[tuple[int, int], PrefixParams] = {}
        for hp in default_hparams(self.model, EDIT_METHODS, "sidecar prefix sampling"):
            params = hp.prefixes
            key = (params.prefix_tokens, params.seed)
            if params.n_prefixes > 0 and (key not in longest or params.n_prefixes > longest[key].n_prefixes):
                longest[key] = params
        for params in longest.values():
            context_prefixes(self.model, self.tok, self.fingerprint, params)

    def plan_warmup(self, state_file: Any) -> None:
        """Decide which statistics the warm-up builds and publish that state (before `Ready`, so a
        client reading the state after `Ready` sees the plan); `warmup.start()` then builds them."""
        from editserve.engine.stats_warmup import StatisticsWarmup

        self.warmup = StatisticsWarmup(self.model, self.tok, self.fingerprint, self.ready.checkpoint, state_file)

    def _wait_for_statistics(self, method: str, layers: Sequence[int] | None = None,
                             hparams: dict[str, Any] | None = None) -> None:
        """An edit (or a consolidation) whose statistics the warm-up is building waits for them
        (never builds them twice), reporting the wait as stage ``statistics``."""
        if self.warmup is None:
            return
        from editserve.editing.edit import resolve_hparams
        from editserve.editing.hparams import statistics_of

        try:
            hp = resolve_hparams(self.model, method, list(layers) if layers is not None else None, hparams)
        except EditserveError:
            return                                   # compute_patch reports the bad request itself

        def report(st: Any) -> None:
            text = st.message or f"building covariance statistics for layers {list(st.layers)}"
            if st.state != "building":
                text = f"covariance statistics {st.state}" + (f": {st.error}" if st.error else "")
            self._progress("statistics", round(0.05 * float(st.fraction), 4), text)

        stats = statistics_of(hp)
        if stats is not None:                        # (a gated edit reads none)
            self.warmup.wait_for(tuple(hp.layers), stats, report)

    def _progress(self, stage: str, fraction: float, message: str = "") -> None:
        if self.notify is not None:
            self.notify(Progress(stage=stage, fraction=fraction, message=message))

    def handle(self, msg: object) -> object:
        if isinstance(msg, OpenLedger):
            return self.open_ledger(msg)
        if isinstance(msg, Sync):
            return self.sync(msg)
        if isinstance(msg, ComputeEdit):
            return self.compute(msg)
        if isinstance(msg, ComputeRebase):
            return self.rebase(msg)
        if isinstance(msg, ComputeConsolidation):
            return self.consolidate(msg)
        if isinstance(msg, ComputeFactRemoval):
            return self.remove_fact(msg)
        if isinstance(msg, ScorePrompts):
            return self.score_prompts(msg)
        if isinstance(msg, TraceFact):
            return self.trace_fact(msg)
        if isinstance(msg, ProbeRetention):
            return self.probe_retention(msg)
        raise SidecarError(f"the sidecar does not understand a {type(msg).__name__} message")

    def open_ledger(self, msg: OpenLedger) -> LedgerOpened:
        from editserve.ledger import Ledger

        if self.ledger is not None:
            self.ledger.close()
        self.ledger = Ledger.open(msg.location, self.fingerprint, caller="sidecar", create=False, verify="quick")
        return LedgerOpened(root=str(msg.location), head=self.ledger.head())

    def _need_ledger(self) -> Any:
        if self.ledger is None:
            raise SidecarError("the sidecar has no ledger open yet (send OpenLedger first)")
        return self.ledger

    def _hold(self, version: int) -> None:
        """Merge exactly the active patches of `version`, in ledger order."""
        from editserve.patches import applied_patches, hold_patches

        ledger = self._need_ledger()
        if ledger.damage is not None:                 # the ledger's own checks refuse damaged versions
            want = ledger.active_patches(version)
        else:                                         # reuse the patches held; load only the others
            held = {p.digest: p for p in applied_patches(self.model)}
            ids = ledger.active_ids(version)
            if sum(d not in held for d in ids) > 64:  # e.g. a restart: the ledger loads them in bulk
                want = ledger.active_patches(version)
            else:
                want = [held.get(d) or ledger.patch(d) for d in ids]
        # One rebuild per touched weight from base copies (never subtracted), or, when only
        # appending, the new deltas on kept accumulators: the cost of a sync does not grow with
        # the number of active patches (issue 16).
        hold_patches(self.model, want)
        # The preserved-keys state of `version`: the blocks stored with its active patches, in order
        # (rebuilt from the ledger, so a restart or a rollback gives exactly that version's state).
        self.preserved = ledger.preserved_keys(version)
        self.version = version

    def checksums(self, names: tuple[str, ...], tp_size: int) -> dict[tuple[str, int], str]:
        params = dict(self.model.named_parameters())
        out: dict[tuple[str, int], str] = {}
        for name in names:
            if name not in params:
                raise SidecarError(f"the sidecar model has no weight {name!r}")
            w = params[name].detach()
            w = w if self.spec.hf_layout is self.spec.vllm_layout else w.t()  # → vLLM orientation
            if self.spec.vllm_layout is not Layout.OUT_IN:
                raise SidecarError(f"family {self.spec.family!r}: vLLM layout {self.spec.vllm_layout} is not [out, in]")
            for r in range(tp_size):
                lo, hi = rank_range(int(w.shape[1]), tp_size, r)
                out[(name, r)] = weight_checksum(w[:, lo:hi])
        return out

    def drift(self, names: tuple[str, ...]) -> dict[int, float]:
        from editserve.editing.arch import get_module
        from editserve.editing.slots import own_neurons
        from editserve.metrics import relative_drift
        from editserve.patches import base_state_dict

        base = base_state_dict(self.model)
        out = {}
        halves = {self.spec.half_weight_name(i, h) for i in range(self.ready.n_layers) for h in MLP_HALVES}
        for name in names:
            layer = next((i for i in range(self.ready.n_layers) if self.spec.weight_name(i) == name), None)
            if layer is None and name in halves:
                continue                             # drift is of the down-projections (a gated edit moves its layer's too)
            if layer is None:
                raise SidecarError(f"{name!r} is not a down-projection of the sidecar's model")
            live, b = get_module(self.model, self.spec.down_proj_name(layer)).weight, base[name]
            own = own_neurons(self.model, layer, live.shape[1])           # not the neuron slots' columns
            out[layer] = relative_drift(b[:, :own], live[:, :own])
        return out

    def sync(self, msg: Sync) -> Synced:
        from editserve.patches import applied_patches

        t0 = time.perf_counter()
        self._hold(msg.version)
        names = tuple(msg.names or self.ledger.weights.touched_names(msg.version))
        return Synced(version=msg.version, active=tuple(p.digest for p in applied_patches(self.model)),
                      checksums=self.checksums(names, msg.tp_size), seconds=time.perf_counter() - t0,
                      drift=self.drift(names))

    def compute(self, msg: ComputeEdit) -> EditComputed:
        from editserve.editing.edit import compute_edit
        from editserve.patches import apply_patch, base_state_dict, remove_patch

        t0 = time.perf_counter()
        ledger = self._need_ledger()
        self._wait_for_statistics(msg.method, msg.layers, msg.hparams)
        self._hold(msg.version)
        self._progress("compute", 0.05, f"{msg.method} for {len(msg.requests)} fact(s) at version {msg.version}: "
                                        "keys → values → solve")
        # The preserved-keys state of the version edited (rebuilt from the ledger by _hold): AlphaEdit
        # keeps those keys in place; every method returns the new patch's own key blocks.
        result = compute_edit(self.model, self.tok, list(msg.requests), method=msg.method,
                              layers=list(msg.layers) if msg.layers is not None else None, hparams=msg.hparams,
                              preserved=self.preserved)
        patch = result.patch
        # compute_patch reports its stages only when it is done: their times, in order.
        for stage, fraction in (("keys", 0.2), ("values", 0.5), ("solve", 0.6)):
            if stage in patch.timings:
                self._progress(stage, fraction, f"{patch.timings[stage]:.2f} s")
        t_probe = time.perf_counter()
        probes = [ProbePrompt(prompt=r.text, target=r.target_new, other=r.target_true, kind="efficacy")
                  for r in msg.requests] + list(msg.probes)
        self._progress("probe", 0.65, f"{len(probes)} prompt(s)" + (" and the probe gate" if msg.gate else ""))
        # Without the gate (which measures it itself), the canary drift is measured here so that
        # every probe report has it: mean KL(head ‖ head + patch) of the next-token distributions.
        canaries = _canaries() if msg.gate is None else ()
        before = [self._score(p) for p in probes]
        canary_before = self._next_token_logprobs(canaries)
        apply_patch(self.model, patch)
        try:
            after = [self._score(p) for p in probes]
            canary_after = self._next_token_logprobs(canaries)
        finally:
            remove_patch(self.model, patch)
        report = _probe_report(probes, before, after)
        if canaries:
            report["canary_kl"] = _mean_kl(canary_before, canary_after)
        report["compute_seconds"] = {k: round(v, 4) for k, v in patch.timings.items()}
        passed = True
        if msg.gate is not None:                   # the control plane's probe gate (editserve.control.probe)
            from editserve.control.probe import probe_gate

            report["gate"] = probe_gate(self.model, self.tok, patch, list(msg.requests), msg.gate).to_dict()
            passed = bool(report["gate"]["passed"])
            self._progress("probe", 0.85, "gate passed" if passed else "gate failed: " + "; ".join(
                report["gate"]["failures"]))
        if msg.gate is not None and msg.retention is not None and msg.retention.enabled:
            from editserve.control.gate import check_retention, merge_retention
            from editserve.editing.retention import sample_facts

            facts = self._known(sample_facts(self.committed_facts(), msg.retention.sample_size, msg.retention.seed,
                                             at_risk=[r.subject for r in msg.requests]))
            report["gate"] = merge_retention(report["gate"], check_retention(self.model, self.tok, patch, facts,
                                                                             msg.retention))
            if passed and not report["gate"]["passed"]:
                passed = False
                self._progress("probe", 0.9, "gate failed: " + report["gate"]["failures"][-1])
        if msg.gate is not None and msg.damage is not None and msg.damage.enabled:
            from editserve.control.gate import check_damage, merge_damage

            head_ppl = self.held_ppl()
            if self.base_heldout_ppl is None or head_ppl is None:
                raise SidecarError("the damage bound is set but the held-out perplexity could not be measured "
                                   "(see the sidecar log)")
            report["gate"] = merge_damage(report["gate"], check_damage(self.model, self.tok, patch,
                                                                       self.base_heldout_ppl, head_ppl, msg.damage,
                                                                       self.heldout_text))
            if passed and not report["gate"]["passed"]:
                passed = False
                self._progress("probe", 0.92, "gate failed: " + report["gate"]["failures"][-1])
        report["probe_seconds"] = round(time.perf_counter() - t_probe, 4)
        if msg.store_bases and passed:
            # The ledger keeps the original of every matrix a patch touches; the sidecar has them.
            # Only for a patch about to be committed: a dry run or a rejection leaves the ledger as it was.
            base = base_state_dict(self.model)
            for d in patch.deltas:
                ledger.weights.ensure_base(d.name, base[d.name], self.spec.hf_layout)
        return EditComputed(patch=patch, probe_report=report, seconds=time.perf_counter() - t0,
                            keys=result.preserved.for_patch(patch.digest))

    def rebase(self, msg: ComputeRebase) -> RebaseComputed:
        """Plan the rebase on the base weights (every merged patch is removed, restoring the saved
        base copies), then hold `msg.head` again, whatever happened. When a consolidation took the
        reverted patch in, the consolidated patch is first re-solved without it and checked while
        holding the head (as a revert out of a consolidation), and the patches after the last
        consolidated one are recomputed on top of the re-solved patch."""
        from editserve.ledger import RebasedPatch
        from editserve.ledger.rebase import ModelRecompute
        from editserve.patches import applied_patches, base_state_dict, remove_patch

        t0 = time.perf_counter()
        ledger = self._need_ledger()
        ids = list(ledger.active_ids(msg.head))
        removed = ledger.version(msg.version).patch_id
        removal = check = None
        if removed not in ids and ledger.consolidated_into(removed, msg.head) is not None:
            removal, check = self._plan_fact_removal(msg.version, msg.head, "rebase", (0.01, 0.03))
        # what is recomputed: the patches after the reverted one, or after the consolidation that held it
        anchor = removed if removal is None else removal.holder
        later = len(ids) - 1 - ids.index(anchor) if anchor in ids else len(ids)

        def progress(i: int, step: Any) -> None:
            self._progress("rebase", round(0.05 + 0.9 * i / max(1, later), 4),
                           f"recomputing the patch of version {step.version} ({step.method}, "
                           f"{len(step.requests)} fact(s)) with {len(step.new_preserved.blocks)} preserved key block(s)")

        for p in reversed(list(applied_patches(self.model))):
            remove_patch(self.model, p)
        try:
            plan = ledger.plan_rebase(msg.version, ModelRecompute(self.model, self.tok, progress=progress),
                                      expected_head=msg.head, removal=removal)
            base = base_state_dict(self.model)
            for patch in plan.patches:          # normally stored already (the replaced patches touch them)
                for d in patch.deltas:
                    ledger.weights.ensure_base(d.name, base[d.name], self.spec.hf_layout)
        finally:
            self._hold(msg.head)
        if removal is not None and check is not None:
            # the re-solved consolidation is the first rebased entry: its other facts before and after
            n = max(1, len(check.kept))
            entry = RebasedPatch(original_version=removal.holder_version, old_patch=removal.holder,
                                 new_patch=removal.patch.digest,
                                 metrics_before={"efficacy": check.held_before / n, "facts_held": check.held_before},
                                 metrics_after={"efficacy": check.held_after / n, "facts_held": check.held_after})
            plan = replace(plan, rebased=(entry,) + tuple(plan.rebased))
        return RebaseComputed(plan=plan, seconds=time.perf_counter() - t0, check=check)

    def _covariances(self, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """AlphaEdit's key statistics at `layers` (what consolidation weighs ordinary keys with);
        statistics not cached yet are built on the base weights, the patches taken out for it."""
        from editserve.editing.lifelong import consolidation_covariances, statistics_cached
        from editserve.patches import hold_patches

        if not statistics_cached(self.model, layers):
            hold_patches(self.model, [])                 # statistics are of the unedited model
        return consolidation_covariances(self.model, self.tok, layers)

    def consolidate(self, msg: ComputeConsolidation) -> ConsolidationComputed:
        """Plan and check a consolidation while holding `msg.head` (`check_consolidation` scores
        "before" on it as held and merges only the consolidated set; statistics not cached yet are
        built on the base weights, the patches taken out for it), then hold `msg.head` again,
        whatever happened."""
        from editserve.editing.consolidate import ConsolidateParams
        from editserve.ledger.consolidation import check_consolidation, plan_consolidation

        t0 = time.perf_counter()
        ledger = self._need_ledger()
        self._wait_for_statistics("alphaedit")             # consolidation uses AlphaEdit's statistics
        self._progress("consolidate", 0.05, f"re-solving the patches with preserved keys at version {msg.head}")
        self._hold(msg.head)
        try:
            plan = plan_consolidation(ledger, self._covariances, ConsolidateParams(ridge=msg.ridge), expected_head=msg.head,
                                      whole=msg.whole)
            self._progress("consolidate", 0.6, f"{len(plan.constituents)} patches → 1; scoring their facts "
                                               "before and after")
            check = check_consolidation(self.model, self.tok, ledger, plan)
        finally:
            self._hold(msg.head)
        return ConsolidationComputed(plan=plan, check=check, seconds=time.perf_counter() - t0)

    def remove_fact(self, msg: ComputeFactRemoval) -> FactRemovalComputed:
        """Plan and check taking one patch out of a consolidation while holding `msg.head` (as
        `consolidate`), then hold `msg.head` again, whatever happened."""
        t0 = time.perf_counter()
        plan, check = self._plan_fact_removal(msg.version, msg.head, "revert", (0.05, 0.6))
        return FactRemovalComputed(plan=plan, check=check, seconds=time.perf_counter() - t0)

    def _plan_fact_removal(self, version: int, head: int, stage: str,
                           fractions: tuple[float, float]) -> tuple[Any, Any]:
        """(`plan_fact_removal`, `check_fact_removal`) for taking the patch of `version` out of the
        consolidated patch active at `head` that holds it, computed while holding `head` (the prompt
        keys are read on it), which is held again afterwards whatever happened. `stage` names the
        operation in the progress messages (a revert, or the first step of a rebase), `fractions` where
        its re-solve and its scoring start."""
        from editserve.ledger.consolidation import check_fact_removal, model_prompt_keys, plan_fact_removal

        ledger = self._need_ledger()
        self._wait_for_statistics("alphaedit")             # the re-solve uses AlphaEdit's statistics
        self._progress(stage, fractions[0], f"re-solving the consolidation that holds version {version} without it")
        self._hold(head)
        try:
            plan = plan_fact_removal(ledger, self._covariances, version, expected_head=head,
                                     prompt_keys=model_prompt_keys(self.model, self.tok))
            self._progress(stage, fractions[1], f"{len(plan.patch.requests)} facts stay; scoring them before and after")
            check = check_fact_removal(self.model, self.tok, ledger, plan)
        finally:
            self._hold(head)
        return plan, check

    def _next_token_logprobs(self, prompts: tuple[str, ...]) -> torch.Tensor | None:
        if not prompts:
            return None
        from editserve.control.probe import next_token_logprobs

        return next_token_logprobs(self.model, self.tok, prompts)

    def score_prompts(self, msg: ScorePrompts) -> Scored:
        from editserve.control.probe import score_items

        self._hold(msg.version)
        return Scored(version=msg.version, rows=tuple(score_items(self.model, self.tok, list(msg.items))))

    def committed_facts(self) -> list[Any]:
        """The facts of the patches merged now (the held version), in ledger order, as
        `editserve.editing.retention.CommittedFact` (target_true "" where the request had none)."""
        from editserve.editing.retention import CommittedFact
        from editserve.patches import applied_patches

        origin = dict(self._need_ledger().active_origins(self.version))
        return [CommittedFact(version=origin[p.digest], prompt=r.text, subject=r.subject, target_new=r.target_new,
                              target_true=r.target_true or "")
                for p in applied_patches(self.model) for r in p.requests]

    def _known(self, facts: list[Any]) -> list[Any]:
        """`facts` with the replaced object filled in from the committing versions' gate rows where
        the request named none (those still unknown are checked greedily)
        (`editserve.editing.retention.with_replaced_objects`)."""
        from editserve.editing.retention import with_replaced_objects

        ledger = self._need_ledger()
        return with_replaced_objects(facts, lambda v: ledger.version(v).probe_report)

    def probe_retention(self, msg: ProbeRetention) -> RetentionMeasured:
        from editserve.editing.retention import facts_hold, sample_facts

        t0 = time.perf_counter()
        self._hold(msg.version)
        facts = self.committed_facts()
        sample = self._known(sample_facts(facts, msg.sample_size, msg.seed))
        rows = tuple({**f.to_dict(), "holds": ok, "new_logprob": round(new, 5), "true_logprob": round(true, 5)}
                     for f, (ok, new, true) in zip(sample, facts_hold(self.model, self.tok, sample)))
        ppl = self.held_ppl() if self.base_heldout_ppl is not None else None
        return RetentionMeasured(version=msg.version, facts=len(facts), rows=rows, seconds=time.perf_counter() - t0,
                                 null_space=self.null_space_taken(), heldout_ppl=ppl,
                                 base_heldout_ppl=self.base_heldout_ppl)

    def held_ppl(self) -> float | None:
        """The held-out perplexity of the model as held now, measured once per set of merged
        patches (the retention probe and the damage bound at the same head share it)."""
        from editserve.patches import applied_patches

        merged = tuple(p.digest for p in applied_patches(self.model))
        if self._held_ppl is not None and self._held_ppl[0] == merged:
            return self._held_ppl[1]
        ppl = self._heldout_ppl(f"version {self.version}")
        if ppl is not None:                       # a failure is measured again next time
            self._held_ppl = (merged, ppl)
        return ppl

    def _heldout_ppl(self, what: str) -> float | None:
        """`editserve.editing.lifelong.heldout_perplexity` of the model as it is now on the held-out
        text (the packaged one: about 1,000 tokens, one forward pass per 256); a failure is logged
        and gives None."""
        from editserve.editing.lifelong import heldout_perplexity

        try:
            ppl = heldout_perplexity(self.model, self.tok, self.heldout_text)
        except Exception:  # noqa: BLE001 - a health measurement must not stop the sidecar; logged, left out
            log.warning("held-out perplexity of %s not measured", what, exc_info=True)
            return None
        if not math.isfinite(ppl):
            log.warning("held-out perplexity of %s is not finite (%r)", what, ppl)
            return None
        return ppl

    def null_space_taken(self) -> dict[int, float]:
        """`editserve.editing.lifelong.null_space_uses` of the held version's preserved keys, from the
        cached statistics only (statistics are built on the unedited model, never here). A failure
        is logged and leaves the measurement out; the retention result stands."""
        from editserve.editing.lifelong import null_space_uses

        try:
            uses = null_space_uses(self.model, self.tok, self.preserved, only_cached=True)
        except EditserveError as exc:
            log.warning("null-space use of version %d not measured: %s: %s", self.version, type(exc).__name__, exc)
            return {}
        return {layer: use.ratio for layer, use in uses.items()}

    def trace_fact(self, msg: TraceFact) -> Traced:
        from editserve.editing.tracing import trace
        from editserve.tracing_plot import render_png

        self._hold(msg.version)
        result = trace(self.model, self.tok, msg.prompt, msg.subject, target=msg.target, kind=msg.kind,
                       samples=msg.samples, seed=msg.seed, window=msg.window, noise_scale=msg.noise_scale)
        name = os.path.basename(os.path.normpath(self.ready.checkpoint)) if self.ready.checkpoint else "the model"
        return Traced(version=msg.version, result=result.to_dict(), png=render_png(result, model_name=name))

    def _score(self, p: ProbePrompt) -> tuple[float, float | None]:
        target = _target_logprob(self.model, self.tok, p.prompt, p.target)
        other = _target_logprob(self.model, self.tok, p.prompt, p.other) if p.other else None
        return target, other


def _canaries() -> tuple[str, ...]:
    from editserve.control.probe import CANARIES

    return tuple(CANARIES)


def _mean_kl(p_log: torch.Tensor | None, q_log: torch.Tensor | None) -> float:
    """Mean over rows of KL(p ‖ q), from log-probabilities."""
    if p_log is None or q_log is None:
        raise SidecarError("canary log-probabilities are missing")
    kl = (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0.0)
    return round(float(kl.mean()), 6)


def _probe_report(probes: list[ProbePrompt], before: list[tuple[float, float | None]],
                  after: list[tuple[float, float | None]]) -> dict[str, Any]:
    """Per probe: mean per-token log-probabilities before/after, and its outcome as the gate and
    the evaluation mean it (`editserve.editing.scoring.fact_success`, `target` being the new
    answer and `other` the true one). A probe without `other` (a fact given without
    ``target_true``) has no outcome (None) and is left out of the fractions per kind."""
    from editserve.editing.scoring import fact_success

    rows = []
    by_kind: dict[str, list[bool]] = {}
    for p, (tb, ob), (ta, oa) in zip(probes, before, after):
        ok = fact_success(p.kind, ta, oa) if oa is not None else None
        rows.append({"kind": p.kind, "prompt": p.prompt, "target": p.target, "other": p.other,
                     "target_logprob_before": round(tb, 4), "target_logprob_after": round(ta, 4),
                     "other_logprob_before": None if ob is None else round(ob, 4),
                     "other_logprob_after": None if oa is None else round(oa, 4), "success": ok})
        if ok is not None:
            by_kind.setdefault(p.kind, []).append(ok)
    return {"scores": {k: sum(v) / len(v) for k, v in by_kind.items()}, "probes": rows}


def sidecar_main(conn: Connection, config: SidecarConfig) -> None:
    """Entry point of the child process: load, announce `Ready`, then serve requests until EOF."""
    if config.editserve_home:
        os.environ["EDITSERVE_HOME"] = config.editserve_home
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s sidecar %(name)s: %(message)s")
    try:
        worker = _Worker(config)
    except Exception as exc:  # reported to the parent, which raises it
        log.exception("sidecar failed to start")
        conn.send(Failed(type(exc).__name__, str(exc)))
        return
    from editserve.engine.stats_warmup import state_path

    try:
        worker.plan_warmup(state_path(os.getpid(), config.editserve_home))
    except Exception:  # the warm-up is an optimisation: edits build their own statistics without it
        log.exception("sidecar: the statistics warm-up could not be planned")
    conn.send(worker.ready)
    worker.notify = conn.send
    if worker.warmup is not None:
        worker.warmup.start()                      # in the background, once the parent has `Ready`
    try:
        _serve(conn, worker)
    finally:
        if worker.warmup is not None:
            worker.warmup.close()


def _serve(conn: Connection, worker: _Worker) -> None:
    """The request loop: one request, one reply, until EOF or `Shutdown`."""
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            log.info("sidecar: parent closed the connection; exiting")
            return
        if isinstance(msg, Shutdown):
            return
        try:
            reply = worker.handle(msg)
        except Exception as exc:  # every failure goes back to the caller as a typed reply
            log.exception("sidecar request %s failed", type(msg).__name__)
            reply = Failed(type(exc).__name__, str(exc))
        conn.send(reply)
        if isinstance(msg, (ComputeEdit, ComputeRebase, ComputeConsolidation, ComputeFactRemoval, Sync)):
            # After the reply, so it costs the caller nothing: an edit, a rebase or a sync frees
            # tens of MiB of transient tensors that glibc would otherwise keep (editserve/memory.py).
            trim_heap()
