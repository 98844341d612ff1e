"""Gated edits: one extra SwiGLU neuron per fact, which fires only on its subject.

Every other method here (ROME, MEMIT, AlphaEdit, consolidation) changes a down-projection linearly, so
each ordinary token whose key has a component along an edit's key moves too; that cost grows with the
ledger and is what keeps a long ledger from issue 16's perplexity bound (docs/lifelong.md, "What the
floor leaves open"). A gated edit instead adds, to the MLP of one layer, a neuron of the MLP's own
(SwiGLU) form whose input weights are fit to the subject:

    a(x) = silu(g·x) · (u·x)          x [d]: the MLP's input (after the layer's norm)
    mlp(x) += a(x) · δ                δ [d]: the usual value (editing.values), written at that layer

- g is a linear classifier (no bias: a llama MLP has none) of the subject's MLP inputs at its last
  token — the bare prompt and the prompt after each context prefix — against ordinary tokens (MLP inputs
  on statistics-corpus text), scaled so that the least of the subject's inputs has g·x = `margin`;
  ordinary tokens then sit at g·x < 0, where silu is ≈ 0.
- `guard` > 0 adds, as a third class-weighted group of negatives, the subject inputs of the edits
  already in the bank (except inputs identical to this subject's: the same subject edited again), so a
  new gate stays shut on earlier subjects; without it a later gate may open on an earlier subject's
  prompt, and its δ then overwrites that earlier edit.
- u is scaled so that a averages 1 over the subject's prompts; δ is optimised with each prompt's own a
  as its scale (`strength` < 1 asks δ to hold at that share of it, for paraphrases the gate meets less).

The neurons of a ledger form a `GateBank` [E neurons]: G, U, V [E, d], and K [M, d], the subject
inputs each neuron was fit on (what later gates are guarded against). A bank acts through a hook
(`GateBank.applied`), which is how it is measured here (bench/gated.py). A neuron is also an ordinary
patch on a spare neuron slot of a widened MLP (editing/slots.py), which is how a server holds it:
``compute_edit(method="gated")`` and ``editserve serve --neuron-slots`` (docs/lifelong.md, "Gated edits").
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from editserve.editing.arch import spec_for
from editserve.editing.hooks import Hooks
from editserve.editing.hparams import GateParams
from editserve.editing.keys import compute_keys
from editserve.editing.requests import EditRequest
from editserve.editing.values import optimise_values
from editserve.errors import InvalidRequestError
from editserve.patches import applied_patches

__all__ = ["GateBank", "GateParams", "GatedNeuron", "activations", "cached_corpus_inputs", "corpus_inputs", "fit_gate",
           "gated_edit", "mlp_inputs", "subject_inputs", "up_weights"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatedNeuron:
    """One gated neuron: what a gated edit adds to its layer's MLP."""

    g: torch.Tensor                    # [d] gate weights
    u: torch.Tensor                    # [d] up weights
    v: torch.Tensor                    # [d] down weights (δ)
    keys: torch.Tensor                 # [P, d] the subject inputs g was fit on

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """a(x) [...] for MLP inputs x [..., d]."""
        return activations(x, self.g[None], self.u[None])[..., 0]


def activations(x: torch.Tensor, G: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """a [..., E] of gated neurons with gate weights G [E, d] and up weights U [E, d] on MLP inputs
    x [..., d]: silu(x Gᵀ) ⊙ (x Uᵀ), the SwiGLU form of the MLP's own neurons."""
    return F.silu(x @ G.T) * (x @ U.T)


def up_weights(g: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u [d], a [P]): the up weights of a neuron with gate g [d] fit to the subject inputs pos [P, d],
    along the inputs' mean x̄ (u·x̄ = 1) and scaled so that its activation a on `pos` averages 1."""
    mean = pos.mean(0)
    u = mean / mean.pow(2).sum()                                             # u·x̄ = 1
    a = F.silu(pos @ g) * (pos @ u)                                          # [P]
    return u / a.mean(), a / a.mean()


class GateBank:
    """The gated neurons of one layer: mlp(x) += (silu(x Gᵀ) ⊙ (x Uᵀ)) V."""

    def __init__(self, layer: int, d: int) -> None:
        self.layer = layer
        self.G = torch.zeros(0, d)     # [E, d]
        self.U = torch.zeros(0, d)     # [E, d]
        self.V = torch.zeros(0, d)     # [E, d]
        self.K = torch.zeros(0, d)     # [M, d] every neuron's subject inputs (P per neuron)

    def __len__(self) -> int:
        return self.G.shape[0]

    def add(self, neuron: GatedNeuron) -> None:
        self.G = torch.cat([self.G, neuron.g[None].float()])
        self.U = torch.cat([self.U, neuron.u[None].float()])
        self.V = torch.cat([self.V, neuron.v[None].float()])
        self.K = torch.cat([self.K, neuron.keys.float()])

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """[..., E] for MLP inputs x [..., d]."""
        return activations(x.float(), self.G, self.U)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """What the bank adds to the MLP's output [..., d]."""
        return self.activations(x) @ self.V

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """The model's forward with the bank in its layer's MLP, for the duration of the block."""
        with Hooks(model) as hooks:
            if len(self):
                hooks.add_to_output(spec_for(model).mlp_name(self.layer), self.output)
            yield


def mlp_inputs(model: torch.nn.Module, layer: int, input_ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The MLP inputs of `layer` at every token of `input_ids` [B, T] -> [B·T, d] float32."""
    name = spec_for(model).mlp_name(layer)
    out = []
    with torch.no_grad(), Hooks(model) as hooks:
        hooks.capture_input(name)
        hooks.stop_when_captured()
        for b in range(0, input_ids.shape[0], batch_size):
            hooks.run(input_ids=input_ids[b:b + batch_size])
            x = hooks.inputs[name]
            out.append(x.reshape(-1, x.shape[-1]).float())
    return torch.cat(out)


def corpus_inputs(model: torch.nn.Module, tok: Any, layer: int, text: str, n_tokens: int,
                  seq_len: int = 256) -> torch.Tensor:
    """Ordinary tokens' MLP inputs at `layer` (a gate's negatives): the first n_tokens // seq_len rows of
    seq_len tokens of `text` (at most the model's context) -> [n, d] float32."""
    seq_len = min(seq_len, int(getattr(getattr(model, "config", None), "max_position_embeddings", seq_len)))
    rows = n_tokens // seq_len
    ids = tok(text[: 8 * n_tokens], add_special_tokens=False)["input_ids"]
    if rows < 1 or len(ids) < rows * seq_len:
        raise InvalidRequestError(f"the corpus text gives {len(ids)} tokens; {max(rows, 1) * seq_len} gate negatives "
                                  f"(negatives={n_tokens}) were asked")
    return mlp_inputs(model, layer, torch.tensor(ids[: rows * seq_len]).view(rows, seq_len))


_NEGATIVES_ATTR = "_editserve_gate_negatives"      # model attribute: (key, [n, d]) of the last corpus_inputs


def cached_corpus_inputs(model: torch.nn.Module, tok: Any, layer: int, corpus_fingerprint: str, text: str,
                         n_tokens: int) -> torch.Tensor:
    """`corpus_inputs`, kept on the model for the next edit while nothing that feeds `layer`'s MLP changes:
    keyed by the layer, the corpus, the token count and the patches merged below the layer (a patch at
    the layer itself or above does not move its MLP's inputs). One entry: SmolLM2, 8,192 tokens: 19 MB."""
    below = tuple(p.digest for p in applied_patches(model) if any(d.layer < layer for d in p.deltas))
    key = (layer, corpus_fingerprint, n_tokens, below)
    held = getattr(model, _NEGATIVES_ATTR, None)
    if held is not None and held[0] == key:
        return held[1]
    inputs = corpus_inputs(model, tok, layer, text, n_tokens)
    object.__setattr__(model, _NEGATIVES_ATTR, (key, inputs))
    return inputs


def subject_inputs(model: torch.nn.Module, tok: object, req: EditRequest, prefixes: Sequence[str],
                   layer: int) -> torch.Tensor:
    """The MLP inputs of `layer` at the subject's last token of the bare prompt and of the prompt after
    each prefix -> [1 + len(prefixes), d] float32."""
    name = spec_for(model).mlp_name(layer)
    return compute_keys(model, tok, [req], prefixes, layers=(), capture_inputs=(name,)).prompt_inputs[name][0]


def fit_gate(pos: torch.Tensor, neg: torch.Tensor, params: GateParams,
             guarded: torch.Tensor | None = None) -> torch.Tensor:
    """g [d]: logistic regression of `pos` [P, d] against `neg` [N, d] (classes weighted equally, no
    bias), scaled so that min over pos of g·x = params.margin.

    guarded [M, d]: earlier subjects' inputs, a negative group of weight share `params.guard` among the
    negatives (rows equal to a row of `pos`, the same subject edited before, are left out)."""
    scale = neg.norm(dim=-1).mean().clamp(min=1e-12)
    groups = [(pos, 0.5), (neg, 0.5)]
    if guarded is not None and params.guard > 0 and len(guarded):
        # equal up to batching's rounding (~1e-7 relative): the same subject in the same context
        guarded = guarded[torch.cdist(guarded.double(), pos.double()).min(dim=1).values > 1e-4 * scale]
        if len(guarded):
            groups = [(pos, 0.5), (neg, 0.5 * (1 - params.guard)), (guarded, 0.5 * params.guard)]
    X = torch.cat([x for x, _ in groups]).double() / scale
    y = torch.cat([torch.ones(len(pos))] + [torch.zeros(len(x)) for x, _ in groups[1:]]).double()
    w = torch.cat([torch.full((len(x),), share / len(x)) for x, share in groups]).double()
    g = (pos.mean(0).double() / scale).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([g], max_iter=params.max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w * F.binary_cross_entropy_with_logits(X @ g, y, reduction="none")).sum() + params.l2 * g.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    g = g.detach() / scale                                                   # back to input units
    least = (pos.double() @ g).min()
    if not bool(least > 0):
        raise InvalidRequestError("the gate cannot separate this subject's inputs from ordinary text "
                                  f"(least subject score {float(least):.3g} ≤ 0)")
    g = g * (params.margin / least)
    if len(groups) == 3:
        log.debug("gate: largest score of an earlier subject %.3g (margin %g)",
                  float((groups[2][0].double() @ g).max()), params.margin)
    return g.float()


def gated_edit(model: torch.nn.Module, tok: object, req: EditRequest, prefixes: Sequence[str],
               negatives: torch.Tensor, params: GateParams, guarded: torch.Tensor | None = None) -> GatedNeuron:
    """One gated neuron writing `req` at `params.layer`, computed on the model as it runs now (apply the
    ledger's bank around the call: ``with bank.applied(model): gated_edit(...)``).

    negatives [N, d]: ordinary tokens' MLP inputs at the layer (`mlp_inputs` on corpus text);
    guarded [M, d]: the bank's subject inputs (`GateBank.K`), used when `params.guard` > 0."""
    pos = subject_inputs(model, tok, req, prefixes, params.layer)            # [P, d]
    g = fit_gate(pos, negatives, params, guarded)
    u, a = up_weights(g, pos)                                                # a on each prompt, mean 1
    n_val = min(params.value_prefixes, len(prefixes))
    value = replace(params.value, clamp_norm_factor=params.value.clamp_norm_factor / params.strength)
    res = optimise_values(model, tok, [req], list(prefixes[:n_val]), spec_for(model).layer_name(params.layer),
                          value, prompt_scales=params.strength * a[None, : 1 + n_val], frozen_below=params.layer)
    log.debug("gated edit %r: a on the subject's prompts %s, ‖δ‖/‖h‖ %.3f, final nll %.3f", req.subject,
              [round(float(x), 2) for x in a], float(res.delta.norm() / res.init_output.norm()),
              float(res.final_nll[0]))
    return GatedNeuron(g=g, u=u, v=res.delta[0], keys=pos)
