"""Causal tracing (Meng et al., 2022, "Locating and Editing Factual Associations in GPT", §2).

Three kinds of runs on one prompt whose next token should be the object o of a fact:

- **clean**: the plain forward pass; its hidden states are kept;
- **corrupted**: Gaussian noise (std ``noise_scale`` × the embedding matrix's std, 3× by default)
  is added to the embeddings of the subject's tokens, one noise draw per sample;
- **restored**: the corrupted run, except that one state at one token is set back to its clean
  value. ``kind="hidden"`` restores the residual stream after block l; ``"mlp"`` and ``"attn"``
  restore the MLP / attention output at that token over a window of layers [l - w/2, l + w/2)
  clipped to the model (w = 10, as in the paper).

The indirect effect of a state is P_restored(o) − P_corrupted(o), averaged over noise samples.

Batching. Every (sample, token, layer) cell is one row of a batch, and all rows share the noise of
their sample. A row is identical to its sample's corrupted run until the first layer it restores,
so rows are not carried from the start: the batch begins with one corrupted row per sample and
grows as the forward pass goes deeper — the rows that restore from layer l on are appended (as
copies of their sample's corrupted row) at the input of block l. A whole grid thus costs one
forward pass of a batch whose rows average about half the depth of the model; the pass is split
into chunks of at most ``max_batch_tokens`` tokens. This relies on the blocks treating the batch
dimension independently and on the attention mask and rotary tables of a single unpadded prompt
broadcasting over it (batch 1), which holds for every family of the architecture table; the tests
compare the batched grid with one unbatched forward per cell.

The noise is added at the input of the first block, which equals adding it to the token embeddings
for every family in the table (GPT-2's position embeddings are added before, and noise is additive).

Cells at tokens before the subject are not run: the noise only reaches positions at or after the
subject (attention is causal), so there the clean and corrupted states are equal and restoring one
changes nothing; their P_restored is P_corrupted exactly.

Pure torch + transformers; the heatmap lives in `editserve.tracing_plot`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from editserve.editing.arch import ArchSpec, get_module, num_layers, spec_for
from editserve.editing.hooks import Hooks
from editserve.editing.requests import MAX_TEXT_CHARS
from editserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

KINDS = ("hidden", "mlp", "attn")
DEFAULT_SAMPLES = 10
DEFAULT_WINDOW = 10
DEFAULT_NOISE_SCALE = 3.0
DEFAULT_TOP_K = 3
MAX_SAMPLES = 256
DEFAULT_MAX_BATCH_TOKENS = 32_768


@dataclass(frozen=True)
class TraceResult:
    """One causal trace: P(o) restored for every (token, layer), plus the clean and corrupted P(o).

    ``scores[t][l]`` is the mean over noise samples of P(o) when the state of `kind` at token t and
    layer l (window centre for mlp/attn) is restored. ``mlp_subject_last[l]`` is the same for the
    MLP (window) at the subject's last token, whatever `kind` is, and ``top_mlp_layers`` are the
    layers where it is highest — reported, not used to choose edit layers (see docs/layers.md).
    """

    kind: str
    prompt: str                          # the full text that was run
    subject: str
    target: str                          # decoded target token o
    target_id: int
    tokens: tuple[str, ...]              # decoded prompt tokens
    subject_range: tuple[int, int]       # token indices [start, end) of the subject
    num_layers: int
    window: int
    samples: int
    seed: int
    noise_std: float                     # absolute std of the embedding noise
    p_clean: float
    p_corrupted: float                   # mean over samples
    scores: tuple[tuple[float, ...], ...]          # [tokens][layers] mean P_restored(o)
    mlp_subject_last: tuple[float, ...]            # [layers] mean P(o) restoring MLP windows at subject's last token
    top_mlp_layers: tuple[int, ...]
    seconds: float = field(default=0.0, compare=False)

    @property
    def subject_last(self) -> int:
        return self.subject_range[1] - 1

    def indirect_effect(self) -> tuple[tuple[float, ...], ...]:
        """[tokens][layers] P_restored(o) − P_corrupted(o)."""
        return tuple(tuple(s - self.p_corrupted for s in row) for row in self.scores)

    def max_effect(self, token: int) -> tuple[int, float]:
        """(layer, indirect effect) of the best restoration at `token`."""
        row = self.scores[token]
        layer = max(range(len(row)), key=row.__getitem__)
        return layer, row[layer] - self.p_corrupted

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["indirect_effect"] = [list(r) for r in self.indirect_effect()]
        return d

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TraceResult":
        try:
            return cls(
                kind=str(d["kind"]), prompt=str(d["prompt"]), subject=str(d["subject"]), target=str(d["target"]),
                target_id=int(d["target_id"]), tokens=tuple(str(t) for t in d["tokens"]),
                subject_range=(int(d["subject_range"][0]), int(d["subject_range"][1])),
                num_layers=int(d["num_layers"]), window=int(d["window"]), samples=int(d["samples"]),
                seed=int(d["seed"]), noise_std=float(d["noise_std"]), p_clean=float(d["p_clean"]),
                p_corrupted=float(d["p_corrupted"]),
                scores=tuple(tuple(float(x) for x in row) for row in d["scores"]),
                mlp_subject_last=tuple(float(x) for x in d["mlp_subject_last"]),
                top_mlp_layers=tuple(int(x) for x in d["top_mlp_layers"]),
                seconds=float(d.get("seconds", 0.0)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InvalidRequestError(f"not a trace result: {exc!r}") from exc


def restored_layers(kind: str, layer: int, window: int, n_layers: int) -> range:
    """Layers whose `kind` state a cell centred at `layer` restores (the paper's clipped window)."""
    if kind == "hidden":
        return range(layer, layer + 1)
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def subject_span(tok: object, prompt: str, subject: str) -> tuple[str, list[int], tuple[int, int]]:
    """(text, token ids, token range [start, end) of the subject) for a prompt and subject.

    `prompt` is either a template with one ``{}`` for the subject or a sentence containing the
    subject literally (its first occurrence is used). Needs a fast tokenizer (offset mapping).
    """
    if not isinstance(prompt, str) or not isinstance(subject, str):
        raise InvalidRequestError(f"prompt and subject must be strings, got {prompt!r} and {subject!r}")
    if not subject.strip():
        raise InvalidRequestError(f"subject must not be empty, got {subject!r}")
    if "{}" in prompt:
        if prompt.count("{}") != 1:
            raise InvalidRequestError(f"prompt must contain at most one '{{}}' placeholder, got {prompt!r}")
        start = prompt.index("{}")
        text = prompt[:start] + subject + prompt[start + 2:]
    else:
        start = prompt.find(subject)
        if start < 0:
            raise InvalidRequestError(f"subject {subject!r} does not occur in prompt {prompt!r}")
        text = prompt
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidRequestError(f"prompt is {len(text)} characters long; the limit is {MAX_TEXT_CHARS}")
    end = start + len(subject)
    if not getattr(tok, "is_fast", False):
        raise InvalidRequestError(f"causal tracing needs a fast tokenizer (offsets), got {type(tok).__name__}")
    enc = tok(text, return_offsets_mapping=True)  # type: ignore[operator]
    ids: list[int] = list(enc["input_ids"])
    inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end and e > start]
    if not inside:
        raise InvalidRequestError(f"subject {subject!r} maps to no token of {text!r}")
    if inside[-1] == len(ids) - 1:
        raise InvalidRequestError(f"prompt {text!r} ends with the subject {subject!r}; the object must follow it")
    return text, ids, (inside[0], inside[-1] + 1)


def embedding_std(model: torch.nn.Module) -> float:
    """Standard deviation of all entries of the token embedding matrix."""
    weight = get_module(model, spec_for(model).embed).weight
    return float(weight.detach().float().std())


@dataclass(frozen=True)
class TraceSetup:
    """A prompt's clean run and noise, computed once and shared by every restoration (`prepare`)."""

    spec: ArchSpec
    n_layers: int
    text: str
    ids: torch.Tensor                    # [1, T]
    subject_range: tuple[int, int]       # token indices [start, end)
    noise: torch.Tensor                  # [S, T, d], zero outside the subject
    noise_std: float
    seed: int
    clean: dict[str, torch.Tensor]       # module name -> clean output [T, d]
    target_id: int
    p_clean: float
    window: int
    max_batch_tokens: int

    @property
    def samples(self) -> int:
        return int(self.noise.shape[0])


def _module_name(spec: ArchSpec, kind: str, layer: int) -> str:
    if kind == "hidden":
        return spec.layer_name(layer)
    if kind == "mlp":
        return spec.mlp_name(layer)
    return spec.attn_name(layer)


def _lm_head(model: torch.nn.Module, spec: ArchSpec) -> torch.nn.Module:
    """The unembedding; transformers' own accessor first (GPT-NeoX renamed ``embed_out`` in v5)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, torch.nn.Module) else get_module(model, spec.lm_head)


def _target_prob(model: torch.nn.Module, spec: ArchSpec, hidden: torch.Tensor, target_id: int | slice) -> torch.Tensor:
    """P(target) [B] (or [B, vocab] for a slice) from the final-normed hidden states [B, T, d] at the last position."""
    logits = _lm_head(model, spec)(hidden[:, -1]).float()
    return torch.softmax(logits, dim=-1)[:, target_id]


def _body_hidden(out: Any) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _clean_run(model: torch.nn.Module, spec: ArchSpec, ids: torch.Tensor, n_layers: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Final-normed hidden states of the clean run [1, T, d] and every block/MLP/attention output [T, d]."""
    names = [_module_name(spec, k, l) for k in KINDS for l in range(n_layers)]
    with Hooks(model) as hooks:
        for name in names:
            hooks.capture_output(name)
        hidden = _body_hidden(get_module(model, spec.base)(input_ids=ids, use_cache=False))
        clean = {name: hooks.outputs[name][0] for name in names}
    return hidden, clean


def _restore_chunk(model: torch.nn.Module, setup: TraceSetup, kind: str, cells: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """P(o) for every sample × cell [S, len(cells)] and of the corrupted runs [S], in one growing batch."""
    spec, L = setup.spec, setup.n_layers
    S = setup.noise.shape[0]
    spans = [restored_layers(kind, layer, setup.window, L) for _t, layer in cells]
    # Batch rows: S corrupted rows, then one row per (cell, sample), ordered by the layer it joins at.
    order = sorted(range(len(cells)), key=lambda i: spans[i].start)
    row_of: dict[tuple[int, int], int] = {}
    joins: list[list[int]] = [[] for _ in range(L)]   # per layer: the sample each joining row copies
    restore: list[tuple[list[int], list[int]]] = [([], []) for _ in range(L)]  # per layer: (rows, tokens)
    next_row = S
    for i in order:
        token = cells[i][0]
        for s in range(S):
            row_of[(i, s)] = next_row
            joins[spans[i].start].append(s)
            for layer in spans[i]:
                restore[layer][0].append(next_row)
                restore[layer][1].append(token)
            next_row += 1
    device = setup.noise.device
    join_idx = [torch.tensor(j, dtype=torch.long, device=device) for j in joins]
    restore_idx = [(torch.tensor(r, dtype=torch.long, device=device), torch.tensor(t, dtype=torch.long, device=device))
                   for r, t in restore]

    def corrupt(x: torch.Tensor) -> torch.Tensor:
        base = x + setup.noise.to(x.dtype)                       # [1, T, d] + [S, T, d]
        return torch.cat([base, base[join_idx[0]]]) if len(joins[0]) else base

    def restorer(layer: int, name: str, append_next: bool):
        rows, toks = restore_idx[layer]
        clean = setup.clean[name][toks] if len(rows) else None

        def fn(y: torch.Tensor) -> torch.Tensor:
            if clean is not None:
                y = y.clone()
                y[rows, toks] = clean.to(y.dtype)
            if append_next and len(joins[layer + 1]):
                y = torch.cat([y, y[join_idx[layer + 1]]])
            return y
        return fn

    def appender(layer: int):
        def fn(y: torch.Tensor) -> torch.Tensor:
            return torch.cat([y, y[join_idx[layer + 1]]]) if len(joins[layer + 1]) else y
        return fn

    with torch.no_grad(), Hooks(model) as hooks:
        hooks.edit_input(spec.layer_name(0), corrupt)
        for layer in range(L):
            last = layer == L - 1
            if kind == "hidden":
                hooks.edit_output(spec.layer_name(layer), restorer(layer, spec.layer_name(layer), not last))
            else:
                name = _module_name(spec, kind, layer)
                if restore[layer][0]:
                    hooks.edit_output(name, restorer(layer, name, False))
                if not last:
                    hooks.edit_output(spec.layer_name(layer), appender(layer))
        hidden = _body_hidden(get_module(model, spec.base)(input_ids=setup.ids, use_cache=False))
        if hidden.shape[0] != next_row:
            raise RuntimeError(f"batch ended with {hidden.shape[0]} rows, expected {next_row}")
        p = _target_prob(model, spec, hidden, setup.target_id)
    rows = torch.tensor([[row_of[(i, s)] for i in range(len(cells))] for s in range(S)], dtype=torch.long, device=p.device)
    return p[rows], p[:S]


def restore_cells(model: torch.nn.Module, setup: TraceSetup, kind: str, cells: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """P(o) restoring `kind` at each (token, layer) cell, averaged over samples [len(cells)], and the
    corrupted P(o) of each sample [S]. Float32 on the CPU."""
    if kind not in KINDS:
        raise InvalidRequestError(f"unknown trace kind {kind!r}; choose one of {list(KINDS)}")
    S, T, L = setup.samples, int(setup.ids.shape[1]), setup.n_layers
    for t, layer in cells:
        if not (0 <= t < T and 0 <= layer < L):
            raise InvalidRequestError(f"cell (token {t}, layer {layer}) is outside the {T} tokens × {L} layers")
    first = setup.subject_range[0]
    run = [i for i, (t, _l) in enumerate(cells) if t >= first]
    # Chunks in the order rows join the batch, so that late-joining cells share a cheap pass.
    run.sort(key=lambda i: (restored_layers(kind, cells[i][1], setup.window, L).start, cells[i][0]))
    per_chunk = max(1, setup.max_batch_tokens // (T * S) - 1)   # cells per pass (S rows each)
    per_sample = torch.empty(S, len(cells), dtype=torch.float32)
    p_corr = None
    for start in range(0, len(run), per_chunk):
        idx = run[start:start + per_chunk]
        p, pc = _restore_chunk(model, setup, kind, [cells[i] for i in idx])
        per_sample[:, idx] = p.float().cpu()
        p_corr = pc.float().cpu() if p_corr is None else p_corr
    if p_corr is None:  # nothing to restore: one pass of the corrupted rows alone
        p_corr = _restore_chunk(model, setup, kind, [])[1].float().cpu()
    skipped = [i for i, (t, _l) in enumerate(cells) if t < first]
    if skipped:
        per_sample[:, skipped] = p_corr[:, None]
    return per_sample.mean(0), p_corr


def _check_number(name: str, value: object, low: float, integer: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok_type or isinstance(value, bool) or not math.isfinite(value) or value < low:  # type: ignore[arg-type]
        kind = "an integer" if integer else "a finite number"
        raise InvalidRequestError(f"{name} must be {kind} >= {low:g}, got {value!r}")


def prepare(
    model: torch.nn.Module,
    tok: object,
    prompt: str,
    subject: str,
    target: str | None = None,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    window: int = DEFAULT_WINDOW,
    noise_scale: float = DEFAULT_NOISE_SCALE,
    noise_std: float | None = None,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> TraceSetup:
    """Validate a trace request, run the clean pass and draw the noise (arguments as in `trace`)."""
    _check_number("samples", samples, 1, integer=True)
    if samples > MAX_SAMPLES:
        raise InvalidRequestError(f"samples must be at most {MAX_SAMPLES}, got {samples!r}")
    _check_number("window", window, 1, integer=True)
    _check_number("max_batch_tokens", max_batch_tokens, 1, integer=True)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InvalidRequestError(f"seed must be an integer, got {seed!r}")
    if noise_std is None:
        _check_number("noise_scale", noise_scale, 0)
        noise_std = float(noise_scale) * embedding_std(model)
    else:
        _check_number("noise_std", noise_std, 0)
    spec = spec_for(model)
    L = num_layers(model)
    text, ids, (s0, s1) = subject_span(tok, prompt, subject)
    if target is not None:
        if not isinstance(target, str) or not target.strip():
            raise InvalidRequestError(f"target must be a non-empty string or None, got {target!r}")
        target_tokens = tok(target, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        if not target_tokens:
            raise InvalidRequestError(f"target {target!r} tokenises to nothing")
    param = next(model.parameters())
    ids_t = torch.tensor([ids], dtype=torch.long, device=param.device)
    with torch.no_grad():
        hidden, clean = _clean_run(model, spec, ids_t, L)
        p_all = _target_prob(model, spec, hidden, slice(None))[0]
    target_id = int(p_all.argmax()) if target is None else int(target_tokens[0])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    d = clean[spec.layer_name(0)].shape[-1]
    noise = torch.zeros(samples, len(ids), d, dtype=torch.float32)
    noise[:, s0:s1] = torch.randn(samples, s1 - s0, d, generator=gen) * noise_std
    return TraceSetup(
        spec=spec, n_layers=L, text=text, ids=ids_t, subject_range=(s0, s1), noise=noise.to(param.device),
        noise_std=float(noise_std), seed=seed, clean=clean, target_id=target_id, p_clean=float(p_all[target_id]),
        window=window, max_batch_tokens=max_batch_tokens,
    )


def trace(
    model: torch.nn.Module,
    tok: object,
    prompt: str,
    subject: str,
    target: str | None = None,
    kind: str = "hidden",
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    window: int = DEFAULT_WINDOW,
    noise_scale: float = DEFAULT_NOISE_SCALE,
    noise_std: float | None = None,
    top_k: int = DEFAULT_TOP_K,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> TraceResult:
    """Causally trace the fact `prompt` (with `subject`) → `target` in `model`; see the module docs.

    prompt:      a template with one ``{}`` for the subject, or text containing the subject.
    target:      the object o; only its first token is scored. Default: the clean run's top token.
    kind:        "hidden" (residual stream), "mlp" or "attn" (restored over `window` layers).
    samples:     noise draws to average over; draw i comes from `seed` and is shared by all cells.
    noise_std:   absolute noise std; default `noise_scale` × the std of the embedding matrix.
    top_k:       how many layers `top_mlp_layers` lists.
    max_batch_tokens: rows × tokens per batched pass (memory bound); more cells take more passes.
    """
    t0 = time.perf_counter()
    if kind not in KINDS:
        raise InvalidRequestError(f"unknown trace kind {kind!r}; choose one of {list(KINDS)}")
    _check_number("top_k", top_k, 1, integer=True)
    setup = prepare(model, tok, prompt, subject, target, samples, seed, window, noise_scale, noise_std, max_batch_tokens)
    T, L = int(setup.ids.shape[1]), setup.n_layers
    s0, s1 = setup.subject_range
    with torch.no_grad():
        mean, p_corr = restore_cells(model, setup, kind, [(t, layer) for t in range(T) for layer in range(L)])
        scores = tuple(tuple(float(x) for x in mean[t * L:(t + 1) * L]) for t in range(T))
        if kind == "mlp":
            mlp_last = scores[s1 - 1]
        else:
            mlp_mean, _ = restore_cells(model, setup, "mlp", [(s1 - 1, layer) for layer in range(L)])
            mlp_last = tuple(float(x) for x in mlp_mean)
    top = tuple(sorted(range(L), key=lambda l: -mlp_last[l])[:top_k])
    ids = setup.ids[0].tolist()
    result = TraceResult(
        kind=kind, prompt=setup.text, subject=subject, target=tok.decode([setup.target_id]),  # type: ignore[attr-defined]
        target_id=setup.target_id, tokens=tuple(tok.decode([i]) for i in ids),  # type: ignore[attr-defined]
        subject_range=(s0, s1), num_layers=L, window=window, samples=samples, seed=seed, noise_std=setup.noise_std,
        p_clean=setup.p_clean, p_corrupted=float(p_corr.mean()), scores=scores, mlp_subject_last=mlp_last,
        top_mlp_layers=top, seconds=time.perf_counter() - t0,
    )
    log.info("trace %s of %r -> %r: p clean %.3f, corrupted %.3f, top MLP layers %s (%.1fs)",
             kind, setup.text, result.target, result.p_clean, result.p_corrupted, list(top), result.seconds)
    return result
