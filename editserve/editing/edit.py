"""`compute_patch` / `compute_edit`: turn edit requests into a `Patch` with ROME, MEMIT, AlphaEdit or a
gated neuron;
never changes the model.

`compute_edit` also takes and returns the preserved-keys state (`alphaedit.PreservedKeys`): the
keys of the committed edits that AlphaEdit keeps in place. It is a pure value: the caller passes
the state of the version being edited and stores the returned one (the old blocks plus this
patch's keys, tagged with the patch's digest) with the new version.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from dataclasses import dataclass, replace

from editserve.editing.alphaedit import PreservedKeys, alphaedit_factors
from editserve.editing.arch import check_layers, spec_for
from editserve.editing.corpus import Corpus, load_corpus
from editserve.editing.hooks import Hooks
from editserve.editing.hparams import (GateParams, HParams, MemitParams, RomeParams, ValueParams, file_names, load_hparams,
                                      to_dict)
from editserve.editing.keys import compute_keys
from editserve.editing.memit import memit_factors, preserved_columns
from editserve.editing.model import fingerprint
from editserve.editing.prefixes import context_prefixes
from editserve.editing.requests import METHODS, EditRequest
from editserve.editing.rome import prompt_scales, rome_direction, rome_factors
from editserve.editing.scoring import target_nll
from editserve.editing.nullspace import cached_null_space
from editserve.editing.stats import layer_stats, stats_key
from editserve.editing.values import optimise_values
from editserve.errors import EditserveError, InvalidRequestError
from editserve.patches import Patch, WeightDelta

log = logging.getLogger(__name__)

MAX_BATCH = 10_000


def model_names(model: torch.nn.Module) -> list[str]:
    """Names to look hyper-parameter files up by: the checkpoint's folder name, then the family."""
    ckpt = getattr(model, "editserve_checkpoint", None) or getattr(model.config, "_name_or_path", "")
    return file_names(ckpt or None, spec_for(model).family)


def resolve_hparams(
    model: torch.nn.Module, method: str, layers: Sequence[int] | None = None, overrides: dict[str, Any] | None = None
) -> HParams:
    """Hyper-parameters for `method` on `model`, with `layers` and `overrides` applied and checked.
    Layers other than the model file's drop its ``spread`` weights (they belong to its layer range)
    unless `overrides` gives its own."""
    over = dict(overrides or {})
    names = model_names(model)
    if layers is not None:
        layers = list(layers)
        if method in ("rome", "gated"):
            if len(layers) != 1:
                raise InvalidRequestError(f"{'ROME' if method == 'rome' else 'a gated edit'} edits exactly one layer, "
                                          f"got layers={layers!r}")
            over["layer"] = layers[0]
        else:
            over["layers"] = layers
    if method != "rome" and "layers" in over and "spread" not in over:
        if list(load_hparams(method, names).layers) != list(over["layers"]):
            over["spread"] = []
    hp = load_hparams(method, names, over)
    check_layers(model, list(hp.layers))
    return hp


def default_hparams(model: torch.nn.Module, methods: Sequence[str], purpose: str) -> Iterator[HParams]:
    """The default hyper-parameters for `model` of each of `methods`, in order (`resolve_hparams`
    without layers or overrides). A method whose defaults do not apply to this model (e.g. layers
    it does not have) is skipped and logged, naming `purpose` (what wanted them): edits with it on
    this model name their own layers."""
    for method in methods:
        try:
            hp = resolve_hparams(model, method)
        except EditserveError as exc:
            log.info("%s: no default %s hyper-parameters for this model, skipped (%s)", purpose, method, exc)
            continue
        yield hp


@dataclass(frozen=True)
class EditResult:
    patch: Patch
    preserved: PreservedKeys     # the state passed in plus this patch's keys (tag = patch.digest)


def compute_patch(
    model: torch.nn.Module,
    tok: object,
    requests: Sequence[EditRequest],
    method: str = "rome",
    layers: Sequence[int] | None = None,
    hparams: dict[str, Any] | None = None,
    corpus: Corpus | str | Path | None = None,
    progress: bool = False,
    preserved: PreservedKeys | None = None,
) -> Patch:
    """The patch of `compute_edit` (see there)."""
    return compute_edit(model, tok, requests, method, layers, hparams, corpus, progress, preserved).patch


def compute_edit(
    model: torch.nn.Module,
    tok: object,
    requests: Sequence[EditRequest],
    method: str = "rome",
    layers: Sequence[int] | None = None,
    hparams: dict[str, Any] | None = None,
    corpus: Corpus | str | Path | None = None,
    progress: bool = False,
    preserved: PreservedKeys | None = None,
) -> EditResult:
    """Compute the low-rank patch that rewrites `requests` (see module docs of rome/memit/alphaedit).

    method:    "rome" (one request), "memit", "alphaedit" or "gated" (one or many; gated: one neuron per
               request, into the free neuron slots of a widened MLP: editing/slots.py).
    layers:    edit layer(s); default from the per-model hyper-parameter file.
    hparams:   overrides of hyper-parameter fields, e.g. {"value": {"max_steps": 10}}.
    corpus:    text for covariance statistics (default: the Wikipedia excerpt).
    preserved: keys of the edits committed in the model being edited (AlphaEdit keeps them in place;
               ROME and MEMIT ignore them). The result's state adds this patch's keys, whatever the method.
    """
    if method not in METHODS:
        raise InvalidRequestError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if preserved is None:
        preserved = PreservedKeys()
    elif not isinstance(preserved, PreservedKeys):
        raise InvalidRequestError(f"preserved must be a PreservedKeys, got {type(preserved).__name__}")
    requests = tuple(requests)
    if not requests:
        raise InvalidRequestError("at least one edit request is required, got none")
    if len(requests) > MAX_BATCH:
        raise InvalidRequestError(f"batch of {len(requests)} requests exceeds the limit of {MAX_BATCH}")
    for r in requests:
        if not isinstance(r, EditRequest):
            raise InvalidRequestError(f"requests must be EditRequest instances, got {type(r).__name__}")
    if method == "rome" and len(requests) != 1:
        raise InvalidRequestError(f"ROME edits one fact at a time, got {len(requests)} requests; use method='memit'")
    spec = spec_for(model)
    hp = resolve_hparams(model, method, layers, hparams)
    fp = fingerprint(model)
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus)
    timings: dict[str, float] = {}
    if isinstance(hp, GateParams):
        return EditResult(patch=_gated(model, tok, requests, hp, corpus, fp, timings), preserved=preserved)
    from editserve.editing.slots import own_view, pad_to_slots

    # A layer with neuron slots is edited in its own neurons: keys, statistics and the delta's columns
    # leave the slots out (editing/slots.py, `own_view`); the delta is then padded to the full width.
    with own_view(model, hp.layers):
        t = time.perf_counter()
        stats, _run = layer_stats(model, tok, hp.layers, corpus, fp, hp.stats, progress=progress)
        timings["stats"] = time.perf_counter() - t
        prefixes = context_prefixes(model, tok, fp, hp.prefixes)

        if isinstance(hp, RomeParams):
            def attempt(clamps: torch.Tensor, stops: torch.Tensor):
                return _rome(model, tok, requests, prefixes, hp, stats[hp.layer].cov, timings, clamps, stops)
        elif isinstance(hp, MemitParams):
            covs = {l: s.cov for l, s in stats.items()}

            def solve(layer: int, keys: torch.Tensor, prompt_keys: torch.Tensor, resid: torch.Tensor):
                return memit_factors(covs[layer], keys, resid, hp.cov_weight,
                                     prompt_keys if hp.keys == "per_prompt" else None)

            def attempt(clamps: torch.Tensor, stops: torch.Tensor):
                return _spread(model, tok, requests, prefixes, hp.layers, hp.spread, hp.value, solve, timings, clamps,
                               stops, per_prompt=hp.keys == "per_prompt")
        else:
            t = time.perf_counter()
            dtype = next(model.parameters()).dtype
            projs = {l: cached_null_space(s.cov, hp.nullspace_threshold, l, fp, stats_key(corpus, l, hp.stats, dtype))
                     for l, s in stats.items()}
            timings["projection"] = time.perf_counter() - t

            def solve(layer: int, keys: torch.Tensor, prompt_keys: torch.Tensor, resid: torch.Tensor):
                gram = preserved.gram(layer, keys.shape[-1])                                 # [d_in, d_in] float64
                return alphaedit_factors(projs[layer].p, keys, resid, gram, hp.alpha, stats[layer].cov, hp.cov_weight,
                                         prompt_keys if hp.keys == "per_prompt" else None)

            def attempt(clamps: torch.Tensor, stops: torch.Tensor):
                return _spread(model, tok, requests, prefixes, hp.layers, hp.spread, hp.value, solve, timings, clamps,
                               stops, per_prompt=hp.keys == "per_prompt")

        deltas, new_keys = _escalating(model, tok, requests, hp.value, attempt, timings)
    deltas = [pad_to_slots(model, d) for d in deltas]
    patch = Patch(
        deltas=tuple(deltas), requests=requests, method=method, hparams=to_dict(hp),
        model_fingerprint=fp, family=spec.family, timings=timings,
    )
    state = preserved
    for layer, k in new_keys.items():
        state = state.add(patch.digest, layer, k.T.contiguous())                         # [d_in, n]
    log.info("%s patch for %d request(s): %s", method, len(requests),
             ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return EditResult(patch=patch, preserved=state)


def _gated(model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], hp: GateParams, corpus: Corpus, fp: str,
           timings: dict[str, float]) -> Patch:
    """One gated neuron per request (editing/gated.py), written into the lowest free neuron slots of its
    layer (editing/slots.py), computed on the model as it runs now: earlier neurons are merged in their
    slots, and each neuron of a batch is computed with the batch's earlier ones in place (through a hook),
    as if they had been committed one by one. No covariance statistics and no preserved keys: the gate is
    fit against corpus tokens."""
    from editserve.editing.gated import GateBank, cached_corpus_inputs, gated_edit
    from editserve.editing.slots import free_slots, neurons_patch, slot_range

    if not slot_range(model, hp.layer):
        raise InvalidRequestError(f"a gated edit needs neuron slots at layer {hp.layer}; the model has none there "
                                  "(serve with --neuron-slots LAYER:COUNT)")
    if hp.guard:
        raise InvalidRequestError(f"gate guard {hp.guard!r} needs the subject inputs of earlier neurons, which the "
                                  "ledger does not keep; served gated edits take guard 0")
    slots = free_slots(model, hp.layer, len(requests))
    t = time.perf_counter()
    negatives = cached_corpus_inputs(model, tok, hp.layer, corpus.fingerprint, corpus.text, hp.negatives)
    timings["negatives"] = time.perf_counter() - t
    t = time.perf_counter()
    prefixes = context_prefixes(model, tok, fp, hp.prefixes)
    batch = GateBank(hp.layer, negatives.shape[1])
    neurons = []
    for request in requests:
        with batch.applied(model):
            neurons.append(gated_edit(model, tok, request, prefixes, negatives, hp))
        batch.add(neurons[-1])
    timings["neurons"] = time.perf_counter() - t
    patch = neurons_patch(model, hp.layer, slots, neurons, requests, to_dict(hp))
    log.info("gated patch for %d fact(s) in slots %s of layer %d: %s", len(requests), slots, hp.layer,
             ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return replace(patch, timings=timings)


def _escalating(model, tok, requests, value: ValueParams, attempt, timings):
    """`attempt(clamp factors [n], early-stop NLLs [n])` -> (deltas, keys), first with
    `value.clamp_norm_factor` and `value.early_stop_nll` for every request; then, while a request's
    edit does not hold (`_holds`) and `value.escalate_clamp` has a next factor, again with that
    factor and no early stop for the requests that failed (the others keep theirs).

    Both knobs matter. A clamp that bounds δ can be too small for the fact; and the value
    optimisation stops on the mean NLL over the bare and prefixed prompts (0.05 ≈ p 0.95 at the
    residual δ is added to), which a spread or regularised solve (MEMIT, AlphaEdit) realises only in
    part, so an early-stopped δ can leave the bare prompt unflipped whatever the clamp (a retry with
    only a larger clamp computed the same δ). A small clamp and an early stop keep each patch's norm,
    and so a long ledger's drift, low; the retry spends more only where an edit needs it. Timings
    accumulate over attempts; ``timings["check"]`` is the time spent checking."""
    clamps = torch.full((len(requests),), float(value.clamp_norm_factor))
    stops = torch.full((len(requests),), float(value.early_stop_nll))
    deltas, keys = attempt(clamps, stops)
    for factor in value.escalate_clamp:
        t = time.perf_counter()
        held = _holds(model, tok, requests, deltas)
        timings["check"] = timings.get("check", 0.0) + time.perf_counter() - t
        if bool(held.all()):
            break
        log.info("%d of %d edit(s) do not hold; retrying them with clamp factor %.2f and no early stop",
                 int((~held).sum()), len(requests), factor)
        clamps = torch.where(held, clamps, torch.full_like(clamps, float(factor)))
        stops = torch.where(held, stops, torch.zeros_like(stops))
        deltas, keys = attempt(clamps, stops)
    return deltas, keys


def _holds(model, tok, requests, deltas) -> torch.Tensor:
    """[n] bool: with `deltas` added (hooks; the weights are untouched), request i's own prompt makes
    its new target more likely than its true one (CounterFact's efficacy; `fact_success`); without a
    true target, the new target's mean per-token probability exceeds 1/2."""
    spec = spec_for(model)
    prompts, targets = [], []
    for r in requests:
        prompts += [r.text, r.text]
        targets += [r.target_new, r.target_true or r.target_new]
    with Hooks(model) as hooks:
        for d in deltas:
            hooks.add_low_rank(spec.down_proj_name(d.layer), d.u, d.v)
        nll = target_nll(model, tok, prompts, targets)                                  # [2n]
    new, true = -nll[0::2], -nll[1::2]
    has_true = torch.tensor([r.target_true is not None for r in requests])
    return torch.where(has_true, new > true, new > math.log(0.5))


def _rome(model, tok, requests, prefixes, hp: RomeParams, cov, timings, clamps: torch.Tensor,
          stops: torch.Tensor):
    """([delta], {layer: keys [1, d_in]})."""
    spec = spec_for(model)
    t = time.perf_counter()
    keys = compute_keys(model, tok, requests, prefixes, [hp.layer])
    key = keys.keys[hp.layer][0]                                                       # [d_in]
    # Each prompt's output will move by (uᵀk_i / uᵀk*)·δ: optimise δ for exactly that.
    direction = rome_direction(cov, key)                                               # C⁻¹k* [d_in]
    scales = prompt_scales(direction, key, keys.prompt_keys[hp.layer])                 # [1, n_prompts]
    timings["keys"] = timings.get("keys", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    values = optimise_values(model, tok, requests, prefixes, spec.mlp_name(hp.layer), hp.value,
                             prompt_scales=scales, frozen_below=hp.layer, clamp_factors=clamps, stop_nll=stops)
    timings["values"] = timings.get("values", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    u, v = rome_factors(direction, key, values.delta[0])
    timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
    return [WeightDelta(name=spec.weight_name(hp.layer), layer=hp.layer, u=u, v=v)], {hp.layer: key[None, :]}


def _spread(model, tok, requests, prefixes, layers: tuple[int, ...], weights: tuple[float, ...], value_params, solve,
            timings, clamps: torch.Tensor, stops: torch.Tensor, per_prompt: bool = False):
    """MEMIT's machinery (memit.py): δ at the last edit layer's residual stream, then layer by layer
    `solve(layer, keys [n,d_in], prompt_keys [n,m,d_in], resid [n,d_out]) -> (U, V)` with the earlier
    layers' updates in effect; layer i is asked for w_i / Σ_{j≥i} w_j of what is still missing at
    the top (`weights`; () = equal, MEMIT's 1/(L − i); the last layer is asked for all of it).
    Returns ([deltas], {layer: keys the state preserves}): the mean keys [n, d_in] used in the solve, or
    with `per_prompt` every prompt's key scaled by 1/√m [n·m, d_in] (memit.preserved_columns)."""
    spec = spec_for(model)
    top = spec.layer_name(layers[-1])                    # residual stream after the last edit layer
    t = time.perf_counter()
    values = optimise_values(model, tok, requests, prefixes, top, value_params, frozen_below=layers[-1],
                             clamp_factors=clamps, stop_nll=stops)
    timings["values"] = timings.get("values", 0.0) + time.perf_counter() - t
    timings.setdefault("keys", 0.0)
    timings.setdefault("solve", 0.0)
    z0 = None
    deltas: list[WeightDelta] = []
    used: dict[int, torch.Tensor] = {}

    def earlier(hooks: Hooks) -> None:
        for d in deltas:
            hooks.add_low_rank(spec.down_proj_name(d.layer), d.u, d.v)

    for i, layer in enumerate(layers):
        t = time.perf_counter()
        res = compute_keys(model, tok, requests, prefixes, [layer], capture_outputs=[top], extra_hooks=earlier)
        timings["keys"] += time.perf_counter() - t
        t = time.perf_counter()
        cur = res.outputs[top]                            # [n, d_model] with earlier layers' updates
        if z0 is None:
            z0 = cur
        resid = (z0 + values.delta - cur) / (len(layers) - i) if not weights else (
            (z0 + values.delta - cur) * (weights[i] / sum(weights[i:])))
        u, v = solve(layer, res.keys[layer], res.prompt_keys[layer], resid)
        deltas.append(WeightDelta(name=spec.weight_name(layer), layer=layer, u=u, v=v))
        used[layer] = preserved_columns(res.keys[layer], res.prompt_keys[layer] if per_prompt else None)
        timings["solve"] += time.perf_counter() - t
    return deltas, used
