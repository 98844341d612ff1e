"""Tiny randomly initialised models of each supported family, and a tokenizer trained locally.

Nothing is downloaded: configs are built in code, the byte-level BPE tokenizer is trained on
a few sentences.
"""

from __future__ import annotations

import functools

import torch

TEXT = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Colosseum is located in the city of Rome.",
    "Danielle Darrieux speaks French and English fluently.",
    "Toko Yasuda plays the guitar and the piano.",
    "The capital of Germany is Berlin, a city in Europe.",
    "Michel Rocard is a native speaker of French.",
] * 4

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gptj", "gpt_neox")


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXT, vocab_size=300, min_frequency=1, special_tokens=["<pad>", "<eos>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<eos>")
    return tok


def tiny_model(family: str, n_layers: int = 4, seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    vocab = 300
    # A wide initialisation gives a random model logits that an edit can visibly move.
    common = dict(vocab_size=vocab, initializer_range=0.3)
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}[family]
        config = cls(hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, max_position_embeddings=128, **common)
    elif family == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=n_layers, n_head=4, n_positions=128, **common)
    elif family == "gptj":
        config = tf.GPTJConfig(n_embd=32, n_layer=n_layers, n_head=4, rotary_dim=4, n_positions=128, **common)
    elif family == "gpt_neox":
        config = tf.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers,
                                  num_attention_heads=4, max_position_embeddings=128, **common)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model
