"""Tiny models and a fake encoder for the study tests (importable by Ray workers through PYTHONPATH)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LETTERS = "abcdefghijklm"


class LetterEncoder:
    """A deterministic stand-in for a sentence encoder: letter counts of the text, its word count and a
    constant (so that the empty text has a defined, non-zero embedding)."""

    def encode(self, texts):
        out = np.zeros((len(texts), len(LETTERS) + 2))
        for i, t in enumerate(texts):
            for c in t:
                j = LETTERS.find(c)
                if j >= 0:
                    out[i, j] += 1.0
            out[i, -2] = len(t.split())
            out[i, -1] = 1.0
        return out


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, "<bos>": 2}
    for i, c in enumerate(LETTERS):
        vocab[c] = 3 + i
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", bos_token="<bos>",
                                   pad_token="<eos>")


def make_tiny_pair(root: Path) -> tuple[Path, Path]:
    """Two variants of one random 2-layer Llama (16-token vocabulary, 0 = <eos>): ``base`` as initialised and
    ``tuned`` after a few SGD steps toward a target distribution (short sequences over a, b, c ending in EOS),
    each saved with its tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=2, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    model.generation_config = GenerationConfig(eos_token_id=0, bos_token_id=2, pad_token_id=0)
    base = root / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)

    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(8):
        lengths = torch.randint(1, 5, (16,), generator=gen)
        seqs = torch.zeros(16, 7, dtype=torch.long)
        seqs[:, 0] = 2
        for i, n in enumerate(lengths.tolist()):
            seqs[i, 1 : n + 1] = torch.randint(3, 6, (n,), generator=gen)  # a, b, c
        loss = model(input_ids=seqs, labels=seqs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    tuned = root / "tuned"
    model.save_pretrained(tuned)
    tok.save_pretrained(tuned)
    return base, tuned
