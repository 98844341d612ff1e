"""Keys k*: the down-projection input at the subject's last token, averaged over context prefixes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from editserve.editing.arch import spec_for
from editserve.editing.hooks import Hooks
from editserve.editing.prompts import subject_last_index
from editserve.editing.requests import EditRequest


def prefixed_texts(req: EditRequest, prefixes: Sequence[str]) -> list[tuple[str, int]]:
    """(text, subject_end_char) for the bare prompt and each prefixed copy of it."""
    at = req.prompt.index("{}")
    out = []
    for prefix in ("",) + tuple(prefixes):
        text = prefix + req.prompt.format(req.subject)
        out.append((text, len(prefix) + at + len(req.subject)))
    return out


@dataclass(frozen=True)
class KeyResult:
    keys: dict[int, torch.Tensor]            # layer -> [n_requests, d_in] float32, prefix-averaged
    outputs: dict[str, torch.Tensor]         # module name -> [n_requests, d] float32, prefix-averaged
    prompt_keys: dict[int, torch.Tensor]     # layer -> [n_requests, 1 + n_prefixes, d_in] float32, per prompt
    prompt_inputs: dict[str, torch.Tensor]   # module name -> [n_requests, 1 + n_prefixes, d] float32, per prompt


def compute_keys(
    model: torch.nn.Module,
    tok: object,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    layers: Sequence[int],
    capture_outputs: Sequence[str] = (),
    capture_inputs: Sequence[str] = (),
    extra_hooks: Callable[[Hooks], None] | None = None,
    batch_size: int = 64,
) -> KeyResult:
    """Prefix-averaged keys at `layers` (and outputs of `capture_outputs`) at each subject's last token;
    also, per prompt, the inputs of the modules `capture_inputs` there.

    Only the text up to the subject is run, and the forward stops after the deepest layer needed.
    `extra_hooks` may install further hooks (e.g. not-yet-merged deltas) before the passes.
    """
    spec = spec_for(model)
    device = next(model.parameters()).device
    pad = tok.pad_token_id  # type: ignore[attr-defined]
    items: list[tuple[list[int], int, int]] = []  # (ids, subject_last, request index)
    for r, req in enumerate(requests):
        for text, end in prefixed_texts(req, prefixes):
            ids, s_last = subject_last_index(tok, text[:end], end)
            items.append((ids[: s_last + 1], s_last, r))
    names = {layer: spec.down_proj_name(layer) for layer in layers}
    n = len(requests)
    key_sums = {layer: None for layer in layers}
    per_prompt: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    out_sums: dict[str, torch.Tensor | None] = {name: None for name in capture_outputs}
    in_rows: dict[str, list[torch.Tensor]] = {name: [] for name in capture_inputs}
    counts = torch.zeros(n)
    with torch.no_grad(), Hooks(model) as hooks:
        if extra_hooks is not None:
            extra_hooks(hooks)
        for name in {*names.values(), *capture_inputs}:
            hooks.capture_input(name)
        for name in capture_outputs:
            hooks.capture_output(name)
        hooks.stop_when_captured()
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            L = max(len(ids) for ids, _, _ in chunk)
            ids_t = torch.full((len(chunk), L), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), L), dtype=torch.long)
            for b, (ids, _, _) in enumerate(chunk):
                ids_t[b, : len(ids)] = torch.tensor(ids)
                mask[b, : len(ids)] = 1
            rows = torch.arange(len(chunk))
            cols = torch.tensor([s for _, s, _ in chunk])
            req_idx = torch.tensor([r for _, _, r in chunk])
            hooks.run(input_ids=ids_t.to(device), attention_mask=mask.to(device))
            onehot = torch.nn.functional.one_hot(req_idx, n).T.float()  # [n, b]
            for layer, name in names.items():
                k = hooks.inputs[name][rows, cols].float().cpu()
                per_prompt[layer].append(k)
                key_sums[layer] = onehot @ k if key_sums[layer] is None else key_sums[layer] + onehot @ k
            for name in capture_outputs:
                o = hooks.outputs[name][rows, cols].float().cpu()
                out_sums[name] = onehot @ o if out_sums[name] is None else out_sums[name] + onehot @ o  # type: ignore[operator]
            for name in capture_inputs:
                in_rows[name].append(hooks.inputs[name][rows, cols].float().cpu())
            counts += onehot.sum(1)
    keys = {layer: (s / counts[:, None]) for layer, s in key_sums.items()}  # type: ignore[operator]
    outs = {name: (s / counts[:, None]) for name, s in out_sums.items()}  # type: ignore[operator]
    per = {layer: torch.cat(ks).view(n, -1, ks[0].shape[-1]) for layer, ks in per_prompt.items()}
    ins = {name: torch.cat(xs).view(n, -1, xs[0].shape[-1]) for name, xs in in_rows.items()}
    return KeyResult(keys=keys, outputs=outs, prompt_keys=per, prompt_inputs=ins)
