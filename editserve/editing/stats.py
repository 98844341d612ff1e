"""Covariance statistics C = E[k kᵀ] of the MLP down-projection input (the keys).

One pass over the corpus serves every requested layer: text is tokenised once and packed into
sequences of at most `seq_len` tokens (no padding), the forward pass stops after the last
needed layer, and k kᵀ is accumulated in float32. Results are cached on disk keyed by
(model fingerprint, layer, corpus fingerprint, token count, sequence length, dtype).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from editserve.atomicfile import publish
from editserve.config import cache_dir
from editserve.editing.arch import Layout, check_layers, edited_weight, spec_for
from editserve.editing.corpus import Corpus
from editserve.editing.hooks import Hooks
from editserve.editing.hparams import StatsParams
from editserve.errors import DataError, NonFiniteError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerStats:
    layer: int
    cov: torch.Tensor      # [d_in, d_in] float32, E[k kᵀ]
    n_tokens: int


@dataclass(frozen=True)
class StatsRun:
    """Timing of a computation (absent when everything came from cache)."""

    seconds: float
    tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def stats_key(corpus: Corpus, layer: int, p: StatsParams, dtype: torch.dtype) -> str:
    """What one layer's statistics depend on besides the model: corpus, layer, token count, length, dtype."""
    dt = str(dtype).replace("torch.", "")
    return f"{corpus.fingerprint[:16]}-L{layer}-n{p.n_tokens}-s{p.seq_len}-{dt}"


def _cache_path(model_fp: str, corpus: Corpus, layer: int, p: StatsParams, dtype: torch.dtype) -> Path:
    return cache_dir("stats", model_fp[:16]) / f"{stats_key(corpus, layer, p, dtype)}.safetensors"


def stats_cached(model_fp: str, corpus: Corpus, layer: int, p: StatsParams, dtype: torch.dtype) -> bool:
    """Whether `layer_stats` would read this layer's statistics from the cache (not compute them)."""
    return _cache_path(model_fp, corpus, layer, p, dtype).exists()


def _pack(tok: object, corpus: Corpus, p: StatsParams) -> torch.Tensor:
    """Token ids [n_seq, seq_len] covering at least n_tokens tokens (whole sequences only)."""
    ids: list[int] = []
    need = p.n_tokens + p.seq_len
    for paragraph in corpus.text.split("\n"):
        if not paragraph.strip():
            continue
        ids.extend(tok(paragraph + "\n", add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        if len(ids) >= need:
            break
    n_seq = -(-p.n_tokens // p.seq_len)
    if len(ids) < n_seq * p.seq_len:
        raise DataError(
            f"corpus {corpus.name!r} has {len(ids)} tokens; n_tokens={p.n_tokens} needs at least {n_seq * p.seq_len}"
        )
    return torch.tensor(ids[: n_seq * p.seq_len]).view(n_seq, p.seq_len)


def layer_stats(
    model: torch.nn.Module,
    tok: object,
    layers: tuple[int, ...] | list[int],
    corpus: Corpus,
    model_fp: str,
    params: StatsParams = StatsParams(),
    progress: bool = True,
) -> tuple[dict[int, LayerStats], StatsRun | None]:
    """E[k kᵀ] at each of `layers`, from cache where present; computes the missing ones in one pass."""
    layers = check_layers(model, list(layers))
    spec = spec_for(model)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    out: dict[int, LayerStats] = {}
    missing = []
    from safetensors.torch import load_file, save_file

    for layer in layers:
        path = _cache_path(model_fp, corpus, layer, params, dtype)
        if path.exists():
            cov = load_file(str(path))["cov"]
            if tuple(cov.shape) == (width := key_width(model, layer),) * 2:
                out[layer] = LayerStats(layer, _checked(cov, layer), params.n_tokens)
                continue
            # (e.g. computed over a widened layer's neuron slots, not its own neurons: computed again)
            log.warning("cached statistics of layer %d are %s, not [%d, %d]: computing them again",
                        layer, tuple(cov.shape), width, width)
        missing.append(layer)
    if not missing:
        return out, None

    batches = _pack(tok, corpus, params)
    names = {layer: spec.down_proj_name(layer) for layer in missing}
    sums = {layer: None for layer in missing}
    count = 0
    t0 = time.perf_counter()
    from editserve.editing.slots import own_view

    # A layer with neuron slots: the statistics of its own neurons' keys ([I, I]), whatever the slots hold.
    with torch.no_grad(), own_view(model, missing), Hooks(model) as hooks:
        for name in names.values():
            hooks.capture_input(name)
        hooks.stop_when_captured()
        bar = tqdm(total=batches.numel(), unit="tok", desc="covariance", disable=not progress, leave=False)
        for start in range(0, batches.shape[0], params.batch_size):
            chunk = batches[start:start + params.batch_size].to(device)
            hooks.run(input_ids=chunk)
            for layer, name in names.items():
                k = hooks.inputs[name].reshape(-1, hooks.inputs[name].shape[-1]).to(torch.float32)  # [tokens, d_in]
                s = k.T @ k
                sums[layer] = s if sums[layer] is None else sums[layer] + s
            count += chunk.numel()
            bar.update(chunk.numel())
        bar.close()
    seconds = time.perf_counter() - t0
    for layer in missing:
        cov = (sums[layer] / count).contiguous().cpu()  # type: ignore[operator]
        cov = _checked(cov, layer)
        path = _cache_path(model_fp, corpus, layer, params, dtype)
        publish(path, lambda tmp: save_file({"cov": cov}, str(tmp)))
        out[layer] = LayerStats(layer, cov, count)
    log.info("covariance for layers %s: %d tokens in %.1fs", missing, count, seconds)
    return out, StatsRun(seconds=seconds, tokens=count)


def key_width(model: torch.nn.Module, layer: int) -> int:
    """The width of layer `layer`'s keys: its down-projection's input, less any neuron slots."""
    from editserve.editing.slots import own_neurons

    w = edited_weight(model, layer)
    return own_neurons(model, layer, int(w.shape[1] if spec_for(model).hf_layout is Layout.OUT_IN else w.shape[0]))


def _checked(cov: torch.Tensor, layer: int) -> torch.Tensor:
    if not torch.isfinite(cov).all():
        raise NonFiniteError(f"covariance statistics for layer {layer} contain NaN or infinity")
    return cov
