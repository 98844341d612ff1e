"""Sequential (lifelong) editing: committing a stream of edits one after another, and the health
measures of the edited model (held-out perplexity, generation fluency, weight-norm growth, how much
of AlphaEdit's null space the committed keys take).

`commit` does what the server's sidecar does for one version: compute the patch on the current
model with the current preserved-keys state, then merge it. The state is a value: it is passed in
and the new one is returned with the patch. `consolidate_model` replaces the accumulated update of
a sequence of commits by its least-disturbance equivalent (editing/consolidate.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from editserve.editing.alphaedit import PreservedKeys
from editserve.editing.consolidate import Consolidated, ConsolidateParams, consolidate
from editserve.editing.corpus import Corpus
from editserve.editing.edit import EditResult, compute_edit, resolve_hparams
from editserve.errors import NonFiniteError
from editserve.editing.nullspace import NullSpaceUse
from editserve.editing.requests import EditRequest

HELDOUT_TEXT = Path(__file__).resolve().parents[1] / "data" / "heldout.txt"
# Neutral openings for `generation_fluency`. Greedy 50-token runs of a small model often fall into a
# loop, and an edit can move a loop; with few prompts that swings the mean, so there are 40.
FLUENCY_PROMPTS = (
    "The weather today is", "My favourite food is", "The history of the city begins",
    "In the morning I usually", "The best way to learn a language is", "The river flows",
    "Our neighbours have a dog that", "The museum opened in", "A good teacher", "The train to the coast",
    "When I was a child, my grandmother", "The recipe calls for", "Scientists have long wondered why",
    "The old bridge over the valley", "Every winter the village", "The meeting was postponed because",
    "She opened the letter and", "The garden behind the house", "A healthy breakfast should include",
    "The library closes early on", "He spent the summer working as", "The mountains in the north are",
    "Learning to play the piano", "The company announced that", "On the first day of school",
    "The storm knocked out power to", "Most people agree that exercise", "The painting hanging in the hall",
    "After dinner we walked along", "The small bakery on the corner", "Doctors recommend that children",
    "The football match ended with", "In the distance we could hear", "The farmer planted",
    "My brother has always wanted to", "The new road will connect", "The festival takes place every",
    "Reading books before bed", "The ship left the harbour at", "Our teacher told us a story about",
)


def commit(model: torch.nn.Module, tok: object, requests: Sequence[EditRequest], method: str,
           preserved: PreservedKeys, corpus: Corpus, hparams: dict | None = None) -> EditResult:
    """Compute `requests` on the model as it is now and merge the patch (apply_patch)."""
    from editserve.patches import apply_patch

    res = compute_edit(model, tok, requests, method=method, hparams=hparams, corpus=corpus, preserved=preserved)
    apply_patch(model, res.patch)
    return res


def consolidate_model(model: torch.nn.Module, tok: object, preserved: PreservedKeys, corpus: Corpus,
                      w0: dict[int, torch.Tensor], hparams: dict | None = None,
                      params: ConsolidateParams = ConsolidateParams()) -> dict[int, Consolidated]:
    """Re-solve every edited down-projection's update W − W₀ (`w0` from `down_proj_weights` of the
    unedited model) as the least-disturbance update with the same outputs on the committed keys
    (`preserved`), under AlphaEdit's key statistics (`hparams`: AlphaEdit overrides, for its `stats`),
    and write W₀ + ΔW* into the model. Patches merged with `apply_patch` are unmerged first (restoring
    their saved bases), so the model holds no merge state afterwards and later commits merge on top
    of the consolidated weights. Returns each layer's result (penalties before / after)."""
    from editserve.editing.arch import Layout, spec_for
    from editserve.patches import applied_patches, remove_patch

    spec = spec_for(model)
    params_by_name = dict(model.named_parameters())
    changed = norm_growth(model, w0)
    layers = sorted(changed)
    if not layers:
        return {}

    def out_in(t: torch.Tensor) -> torch.Tensor:
        return t if spec.hf_layout is Layout.OUT_IN else t.T

    deltas = {layer: out_in(params_by_name[spec.weight_name(layer)].detach().double() - w0[layer].double())
              for layer in layers}
    keys = (preserved.edit_keys(layers) if params.across_layers
            else {layer: k for layer in layers if (k := preserved.keys(layer)) is not None})
    result = consolidate(deltas, keys, consolidation_covariances(model, tok, layers, corpus, hparams), params)
    for patch in reversed(applied_patches(model)):
        remove_patch(model, patch)
    with torch.no_grad():
        for layer, r in result.items():
            new = w0[layer].to(torch.float32) + out_in(r.u @ r.v.T)
            if not torch.isfinite(new).all():
                raise NonFiniteError(f"consolidated weight of layer {layer} is not finite")
            params_by_name[spec.weight_name(layer)].copy_(new)
    return result


def consolidation_covariances(model: torch.nn.Module, tok: object, layers: Sequence[int], corpus: Corpus | None = None,
                              hparams: dict | None = None) -> dict[int, torch.Tensor]:
    """C [d_in, d_in] of each of `layers` under AlphaEdit's statistics settings (`hparams`: AlphaEdit
    overrides; `corpus`: default the bundled excerpt) — what consolidation weighs ordinary keys with.
    The statistics are cached like every edit's (`editserve.editing.stats`), so this is cheap after
    the first edit at those layers."""
    from editserve.editing.corpus import load_corpus
    from editserve.editing.model import fingerprint
    from editserve.editing.stats import layer_stats

    hp = resolve_hparams(model, "alphaedit", None, hparams)
    stats, _ = layer_stats(model, tok, list(layers), corpus if isinstance(corpus, Corpus) else load_corpus(corpus),
                           fingerprint(model), hp.stats, progress=False)
    return {layer: s.cov for layer, s in stats.items()}


def statistics_cached(model: torch.nn.Module, layers: Sequence[int], corpus: Corpus | None = None,
                      hparams: dict | None = None) -> bool:
    """Whether AlphaEdit's statistics (settings `hparams`) at every one of `layers` are cached, so that
    `consolidation_covariances` and `null_space_uses` read them instead of running the model (which
    must then be unedited)."""
    from editserve.editing.corpus import load_corpus

    hp = resolve_hparams(model, "alphaedit", list(layers), hparams)
    corpus = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    return set(layers) <= _cached_layers(model, layers, corpus, hp.stats)


def _cached_layers(model: torch.nn.Module, layers: Sequence[int], corpus: Corpus, stats: Any) -> set[int]:
    """Those of `layers` whose statistics (settings `stats`, of `corpus`) are cached for `model`."""
    from editserve.editing.model import fingerprint
    from editserve.editing.stats import stats_cached

    fp, dtype = fingerprint(model), next(model.parameters()).dtype
    return {layer for layer in layers if stats_cached(fp, corpus, layer, stats, dtype)}


def null_space_uses(model: torch.nn.Module, tok: object, preserved: PreservedKeys, corpus: Corpus | None = None,
                    hparams: dict | None = None, only_cached: bool = False) -> dict[int, NullSpaceUse]:
    """For each layer with committed keys in `preserved`: how much of AlphaEdit's null space there the
    committed keys take (`editserve.editing.nullspace.null_space_use`, bound α + λ·threshold of the
    AlphaEdit settings `hparams`), whatever method wrote the keys. Statistics and projections come
    from their caches (built on first use, like an edit's). `only_cached`: leave out the layers whose
    statistics are not cached instead of computing them (they must be computed on the unedited
    model; a sidecar holding an edited version must not)."""
    from editserve.editing.corpus import load_corpus
    from editserve.editing.model import fingerprint
    from editserve.editing.nullspace import cached_null_space, null_space_use
    from editserve.editing.stats import layer_stats, stats_key

    layers = list(preserved.layers)
    if not layers:
        return {}
    hp = resolve_hparams(model, "alphaedit", layers, hparams)
    corpus = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    fp = fingerprint(model)
    dtype = next(model.parameters()).dtype
    if only_cached:
        cached = _cached_layers(model, layers, corpus, hp.stats)
        layers = [layer for layer in layers if layer in cached]
        if not layers:
            return {}
    stats, _ = layer_stats(model, tok, layers, corpus, fp, hp.stats, progress=False)
    bound = hp.alpha + hp.cov_weight * hp.nullspace_threshold
    out = {}
    for layer in layers:
        proj = cached_null_space(stats[layer].cov, hp.nullspace_threshold, layer, fp,
                                 stats_key(corpus, layer, hp.stats, dtype))
        out[layer] = null_space_use(proj, preserved.keys(layer), bound)
    return out


def perplexity(model: torch.nn.Module, tok: object, text: str, seq_len: int = 256) -> float:
    """exp(mean token NLL) of `text` over consecutive windows of `seq_len` tokens (fewer when the
    model's context is shorter)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(context, int) and context > 0:
        seq_len = min(seq_len, context)                 # the model reads seq_len tokens of each window
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, seq_len):
            chunk = torch.tensor(ids[s:s + seq_len + 1], device=device)[None]          # [1, ≤ seq_len+1]
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk[:, :-1]).logits.float()                     # [1, T, vocab]
            total += float(torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum"))
            count += chunk.shape[1] - 1
    return math.exp(total / count)


def heldout_perplexity(model: torch.nn.Module, tok: object, text: str | None = None) -> float:
    """Perplexity of `text`, by default editserve/data/heldout.txt: neutral prose written for this
    purpose, not the statistics corpus (see its header in docs/lifelong.md). A server may name its
    own (``EDITSERVE_HELDOUT_TEXT``, editserve.engine.health)."""
    return perplexity(model, tok, HELDOUT_TEXT.read_text() if text is None else text)


def generation_fluency(model: torch.nn.Module, tok: object, prompts: Sequence[str] = FLUENCY_PROMPTS,
                       max_new_tokens: int = 50) -> float:
    """ROME's fluency (weighted 2/3-gram entropy) of greedy generations from `prompts`."""
    from editserve.editing.evaluate import _generate, fluency

    return fluency(_generate(model, tok, prompts, max_new_tokens=max_new_tokens))


def down_proj_weights(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """A float32 copy of every layer's edited weight (the down-projection), by layer: W₀ for `norm_growth`."""
    from editserve.editing.arch import spec_for

    spec = spec_for(model)
    params = dict(model.named_parameters())
    return {i: params[spec.weight_name(i)].detach().float().clone() for i in range(model.config.num_hidden_layers)}


def norm_growth(model: torch.nn.Module, w0: dict[int, torch.Tensor]) -> dict[int, float]:
    """‖W − W₀‖_F / ‖W₀‖_F for each layer of `w0` (from `down_proj_weights`) whose weight changed (of the
    model's own neurons: `editing.slots.own_neurons`)."""
    from editserve.editing.arch import spec_for
    from editserve.editing.slots import own_neurons

    spec = spec_for(model)
    params = dict(model.named_parameters())
    out: dict[int, float] = {}
    for layer, base in w0.items():
        base = base[:, :own_neurons(model, layer, base.shape[1])]         # not the neuron slots' columns
        diff = float((params[spec.weight_name(layer)].detach().float()[:, :base.shape[1]] - base).norm())
        if diff > 0:
            out[layer] = diff / float(base.norm())
    return out
