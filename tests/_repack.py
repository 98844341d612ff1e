"""Helpers of tests/test_repack.py: a tiny Llama checkpoint, an edit of it, and one vLLM engine
run per process (``python -m tests._repack SPEC.json OUT.json``).

An engine run loads the checkpoint in vLLM on CPU (in-process engine core), generates greedy
tokens with their log-probabilities for fixed prompts, and, when the spec names an edit,
applies it through the editserve worker methods (``collective_rpc("editserve_apply")``, as
the control plane does), generates again, rolls back to version 0 and generates a third
time. Each engine runs in its own process because vLLM keeps process-wide state.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

PROMPTS = ["The Eiffel Tower is located in the city of", "Danielle Darrieux speaks",
           "The capital of Germany is", "Toko Yasuda plays the"]
HIDDEN, MLP, LAYERS = 128, 256, 4
EDIT_LAYER = 2


def weight_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.down_proj.weight"


def make_checkpoint(out: Path) -> None:
    """A randomly initialised 4-layer Llama (float32) with the tests' locally trained tokenizer."""
    import transformers as tf

    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                            initializer_range=0.3, tie_word_embeddings=False, bos_token_id=None,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def edit_factors(n: int = 3, scale: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` rank-one deltas of layer EDIT_LAYER's down-projection: U [HIDDEN, n], V [MLP, n]."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(HIDDEN, n, generator=g) * scale, torch.randn(MLP, n, generator=g)


def edited_weight(base: torch.Tensor) -> torch.Tensor:
    """base + Σ u_i v_iᵀ in float32, in order: what the worker must serve (`patches.materialize`)."""
    u, v = edit_factors()
    acc = base.to(torch.float32, copy=True)
    for i in range(u.shape[1]):
        acc.addmm_(u[:, i:i + 1], v[:, i:i + 1].T)
    return acc.to(base.dtype)


def make_edited_checkpoint(src: Path, out: Path) -> None:
    """A copy of `src` whose EDIT_LAYER down-projection holds the edited weight."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    for f in out.glob("*.safetensors"):
        tensors = load_file(str(f))
        if weight_name(EDIT_LAYER) in tensors:
            tensors[weight_name(EDIT_LAYER)] = edited_weight(tensors[weight_name(EDIT_LAYER)])
            save_file(tensors, str(f), metadata={"format": "pt"})


SLOT_LAYER, SLOTS, SLOT = 2, 64, 5       # layer 2 widened by 64 neuron slots; the edit writes slot 5


def slot_neuron() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A gated neuron (g, u, δ) [HIDDEN] each, strong enough to change the greedy tokens."""
    gen = torch.Generator().manual_seed(11)
    return (torch.randn(HIDDEN, generator=gen) * 0.5, torch.randn(HIDDEN, generator=gen) * 0.5,
            torch.randn(HIDDEN, generator=gen) * 4.0)


def slot_deltas() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The slot patch as (u [d_out, 1], v [d_in, 1]) per Hugging Face weight (editing/slots.py's form)."""
    g, u, delta = slot_neuron()
    e = torch.zeros(MLP + SLOTS, 1)
    e[MLP + SLOT] = 1.0
    mlp = f"model.layers.{SLOT_LAYER}.mlp"
    return {f"{mlp}.gate_proj.weight": (e, g.reshape(-1, 1)), f"{mlp}.up_proj.weight": (e.clone(), u.reshape(-1, 1)),
            f"{mlp}.down_proj.weight": (delta.reshape(-1, 1), e.clone())}


def make_wide_checkpoint(src: Path, out: Path, with_neuron: bool) -> None:
    """`src` with every MLP widened by SLOTS zero neurons (a plain Llama of intermediate size
    MLP + SLOTS) and, `with_neuron`, the slot neuron written at layer SLOT_LAYER: what an engine
    serving `src` with slots must compute."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    config["intermediate_size"] = MLP + SLOTS
    (out / "config.json").write_text(json.dumps(config))
    deltas = slot_deltas() if with_neuron else {}
    for f in out.glob("*.safetensors"):
        tensors = load_file(str(f))
        for name, w in list(tensors.items()):
            if name.endswith(("gate_proj.weight", "up_proj.weight")):
                w = torch.cat([w, w.new_zeros(SLOTS, w.shape[1])])
            elif name.endswith("down_proj.weight"):
                w = torch.cat([w, w.new_zeros(w.shape[0], SLOTS)], 1)
            if name in deltas:
                u, v = deltas[name]
                w = w.to(torch.float32).addmm_(u, v.T).to(w.dtype)
            tensors[name] = w.contiguous()
        save_file(tensors, str(f), metadata={"format": "pt"})


def _generate(llm: Any) -> list[dict[str, Any]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=1, ignore_eos=True)
    out = []
    for o in llm.generate(PROMPTS, params, use_tqdm=False):
        c = o.outputs[0]
        out.append({"tokens": list(c.token_ids),
                    "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]})
    return out


def _message(version: int, with_edit: bool, slot_edit: bool = False) -> dict[str, Any]:
    from editserve.engine.wire import ApplyMessage, MatrixTarget, WireDelta

    matrices: tuple[MatrixTarget, ...] = ()
    if with_edit and slot_edit:
        matrices = tuple(MatrixTarget(name=name, layer=SLOT_LAYER, deltas=(WireDelta(key=f"slot:{name}", u=u, v=v),))
                         for name, (u, v) in sorted(slot_deltas().items()))
    elif with_edit:
        u, v = edit_factors()
        deltas = tuple(WireDelta(key=f"test:{i}", u=u[:, i:i + 1].contiguous(), v=v[:, i:i + 1].contiguous())
                       for i in range(u.shape[1]))
        matrices = (MatrixTarget(name=weight_name(EDIT_LAYER), layer=EDIT_LAYER, deltas=deltas),)
    return ApplyMessage(version=version, family="llama", matrices=matrices).to_wire()


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM

    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=bool(spec["eager"]), kv_cache_memory_bytes=64 << 20,
              max_model_len=256, seed=0, tensor_parallel_size=int(spec.get("tp", 1)))
    result: dict[str, Any] = {"base": _generate(llm)}
    if spec.get("edit"):
        described = llm.collective_rpc("editserve_describe")[0]
        result["kernels"], result["slots"], result["editable"] = described["kernels"], described["slots"], described["editable"]
        slot_edit = bool(spec.get("slot_edit"))
        result["edit_reports"] = llm.collective_rpc("editserve_apply", args=(_message(1, True, slot_edit),))
        result["edited"] = _generate(llm)
        result["rollback_reports"] = llm.collective_rpc("editserve_apply", args=(_message(0, False, slot_edit),))
        result["rolled_back"] = _generate(llm)
        result["edit_report"], result["rollback_report"] = result["edit_reports"][0], result["rollback_reports"][0]
    return result


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(run(spec)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    sys.exit(main(sys.argv[1:]))
