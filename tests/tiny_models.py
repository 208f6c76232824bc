"""The tiny random Llama the CLI, model, semantic and study tests share: a 16-token vocabulary (0 = <eos>,
2 = <bos>, then the letters a..m) with a whitespace word-level tokenizer, so texts like "a b c" round-trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LETTERS = "abcdefghijklm"


def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, "<bos>": 2}
    for i, c in enumerate(LETTERS):
        vocab[c] = 3 + i
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", bos_token="<bos>",
                                   pad_token="<eos>")


def tiny_llama(lm_head_scale: float) -> Any:
    """A random 2-layer Llama (seed 0); ``lm_head_scale`` > 1 makes its next-token distributions peakier."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=2, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
    model.generation_config = GenerationConfig(eos_token_id=0, bos_token_id=2, pad_token_id=0)
    return model


def make_tiny_model(path: Path, lm_head_scale: float = 8.0) -> Path:
    """:func:`tiny_llama` and :func:`tiny_tokenizer` saved to ``path`` (a local model folder)."""
    tiny_llama(lm_head_scale).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
