"""Context prefixes that keys and values are averaged over (ROME §3.1, "k* over prefixes").

Short texts sampled from the model itself with a fixed seed, generated once per
(model fingerprint, prefix parameters) and cached as JSON under ``$EDITSERVE_HOME/prefixes/``.
Prefix i depends only on the seed, the length and the prefixes before it (one generator, drawn in
order), so the first n of a longer cached list with the same length and seed *are* the n-prefix list:
it is read from there instead of being sampled again (ROME's 10 serve AlphaEdit's and MEMIT's 5).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from editserve.atomicfile import publish
from editserve.config import cache_dir
from editserve.editing.hparams import PrefixParams

log = logging.getLogger(__name__)

_LENGTH = re.compile(r"-n(?P<n>[0-9]+)-t")          # the list length in a cache file's name
_SEEDS = ("The", "Therefore", "Because", "I", "You", "It", "In", "When", "This", "We")


def context_prefixes(model: torch.nn.Module, tok: object, model_fp: str, params: PrefixParams) -> tuple[str, ...]:
    """`params.n_prefixes` sampled prefixes, each ending so that a prompt can follow (". ")."""
    if params.n_prefixes == 0:
        return ()
    folder = cache_dir("prefixes")
    path = folder / _file_name(model_fp, params.n_prefixes, params)
    if path.exists():
        return tuple(json.loads(path.read_text()))
    longer = _longer_cached(folder, model_fp, params)
    if longer is not None:
        return longer
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


def _file_name(model_fp: str, n: int | str, params: PrefixParams) -> str:
    return f"{model_fp[:16]}-n{n}-t{params.prefix_tokens}-s{params.seed}.json"


def _longer_cached(folder: Path, model_fp: str, params: PrefixParams) -> tuple[str, ...] | None:
    """The shortest cached list longer than `params.n_prefixes` with the same model, length and seed
    (its first n are the n-prefix list), or None."""
    longer: list[tuple[int, Path]] = []
    for f in folder.glob(_file_name(model_fp, "*", params)):
        m = _LENGTH.search(f.name)
        if m and int(m["n"]) > params.n_prefixes:
            longer.append((int(m["n"]), f))
    for n, f in sorted(longer):
        try:
            prefixes = json.loads(f.read_text())
        except (OSError, ValueError) as exc:      # removed or unreadable meanwhile: try the next
            log.warning("context prefixes: cannot read the cached %d-prefix list: %s", n, exc)
            continue
        if isinstance(prefixes, list) and len(prefixes) == n:
            return tuple(prefixes[:params.n_prefixes])
    return None
