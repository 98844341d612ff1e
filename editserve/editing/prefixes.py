"""Context prefixes that keys and values are averaged over (ROME §3.1, "k* over prefixes").

Short texts sampled from the model itself with a fixed seed, generated once per
(model fingerprint, prefix parameters) and cached as JSON under ``$EDITSERVE_HOME/prefixes/``.
"""

from __future__ import annotations

import json
import logging

import torch

from editserve.atomicfile import publish
from editserve.config import cache_dir
from editserve.editing.hparams import PrefixParams

log = logging.getLogger(__name__)

_SEEDS = ("The", "Therefore", "Because", "I", "You", "It", "In", "When", "This", "We")


def context_prefixes(model: torch.nn.Module, tok: object, model_fp: str, params: PrefixParams) -> tuple[str, ...]:
    """`params.n_prefixes` sampled prefixes, each ending so that a prompt can follow (". ")."""
    if params.n_prefixes == 0:
        return ()
    path = cache_dir("prefixes") / f"{model_fp[:16]}-n{params.n_prefixes}-t{params.prefix_tokens}-s{params.seed}.json"
    if path.exists():
        return tuple(json.loads(path.read_text()))
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(params.seed)
    prefixes = []
    body_vocab = model.get_output_embeddings().weight.shape[0]
    with torch.no_grad():
        for i in range(params.n_prefixes):
            ids = tok(_SEEDS[i % len(_SEEDS)], add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)  # type: ignore[operator]
            for _ in range(params.prefix_tokens):
                logits = model(input_ids=ids).logits[0, -1, :body_vocab].float()
                top = torch.topk(logits, 5)
                probs = torch.softmax(top.values, -1).cpu()
                nxt = top.indices[torch.multinomial(probs, 1, generator=gen)]
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
            text = tok.decode(ids[0], skip_special_tokens=True)  # type: ignore[attr-defined]
            text = " ".join(text.replace("{", " ").replace("}", " ").split())
            prefixes.append(text.rstrip(".") + ". ")
    publish(path, lambda tmp: tmp.write_text(json.dumps(prefixes)))
    log.info("generated %d context prefixes", len(prefixes))
    return tuple(prefixes)
