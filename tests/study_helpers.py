"""Tiny models and a fake encoder for the study tests (importable by Ray workers through PYTHONPATH)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tiny_models import LETTERS, tiny_llama, tiny_tokenizer


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


def make_tiny_pair(root: Path) -> tuple[Path, Path]:
    """Two variants of one random 2-layer Llama (16-token vocabulary, 0 = <eos>): ``base`` as initialised and
    ``tuned`` after a few SGD steps toward a target distribution (short sequences over a, b, c ending in EOS),
    each saved with its tokenizer."""
    import torch

    tok = tiny_tokenizer()
    model = tiny_llama(lm_head_scale=4.0)
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
