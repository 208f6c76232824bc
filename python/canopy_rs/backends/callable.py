"""The generic path: a plain ``logits_fn(prefixes) -> logits`` callable, wrapped in the backend protocol.

It recomputes every prefix from scratch (no state to reuse), so it is the slow but universal reference
that the model backends are tested against.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from canopy_rs._core import Policy
from canopy_rs.errors import ArgumentTypeError, InvalidArgumentError
from canopy_rs.protocol import NextTokenLogits, NodeBatch

LogitsFn = Callable[[list[list[int]]], Any]


def as_logits_array(out: Any, rows: int, vocab_size: int, source: str = "logits_fn") -> np.ndarray:
    """Checks a logits batch and returns it as a C-contiguous float32/float64 array (no copy if already so)."""
    if hasattr(out, "detach") and hasattr(out, "cpu"):  # a torch tensor
        out = out.detach().float().cpu().numpy() if str(out.dtype) in ("torch.bfloat16", "torch.float16") else out.detach().cpu().numpy()
    arr = np.asarray(out)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if arr.dtype not in (np.float32, np.float64):
        raise ArgumentTypeError(f"{source} must return float32 or float64 logits, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape != (rows, vocab_size):
        raise InvalidArgumentError(
            f"{source} returned logits of shape {arr.shape}; expected (len(prefixes), vocab_size) = ({rows}, {vocab_size})"
        )
    return np.ascontiguousarray(arr)


class CallableModel:
    """Backend for a callable ``logits_fn(prefixes: list[list[int]]) -> array [len(prefixes), vocab_size]``.

    Prefixes are the generated tokens only (the prompt is the callable's business)."""

    def __init__(self, logits_fn: LogitsFn, vocab_size: int, eos_token_ids: int | Sequence[int]) -> None:
        if not callable(logits_fn):
            raise ArgumentTypeError(f"model must be a callable logits_fn or a canopy_rs Backend, got {type(logits_fn).__name__}")
        self.logits_fn = logits_fn
        self._vocab_size = _check_vocab(vocab_size)
        self._eos = _check_eos(eos_token_ids, self._vocab_size)
        self.reset()

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    def reset(self) -> None:
        self._calls = 0
        self._rows = 0
        self._tokens = 0

    def expand(self, batch: NodeBatch, policy: Policy) -> NextTokenLogits:
        prefixes = batch.prefixes()
        logits = as_logits_array(self.logits_fn(prefixes), len(prefixes), self._vocab_size)
        self._calls += 1
        self._rows += len(prefixes)
        self._tokens += sum(len(p) for p in prefixes)
        return NextTokenLogits(logits)

    def release(self, node_ids: np.ndarray) -> None:
        """Nothing is cached."""

    def counters(self) -> dict[str, float]:
        return {"model_calls": self._calls, "rows_evaluated": self._rows, "tokens_forwarded": self._tokens}


def _check_vocab(vocab_size: Any) -> int:
    if vocab_size is None:
        raise ArgumentTypeError("vocab_size is required when the model is a plain logits_fn callable")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise InvalidArgumentError(f"vocab_size must be a positive int, got {vocab_size!r}")
    return int(vocab_size)


def _check_eos(eos_token_ids: Any, vocab_size: int) -> tuple[int, ...]:
    if eos_token_ids is None:
        raise ArgumentTypeError("eos_token_ids is required when the model is a plain logits_fn callable (an int or a list)")
    ids = [eos_token_ids] if isinstance(eos_token_ids, (int, np.integer)) else list(eos_token_ids)
    if not ids:
        raise InvalidArgumentError("eos_token_ids must name at least one EOS id")
    out = []
    for e in ids:
        if isinstance(e, bool) or not isinstance(e, (int, np.integer)):
            raise ArgumentTypeError(f"eos_token_ids must hold ints, got {e!r}")
        if not 0 <= e < vocab_size:
            raise InvalidArgumentError(f"eos_token_ids: EOS id {e} is outside the vocabulary [0, vocab_size={vocab_size})")
        out.append(int(e))
    return tuple(dict.fromkeys(out))
