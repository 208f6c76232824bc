"""The generic path: a plain ``logits_fn(prefixes) -> logits`` callable, wrapped in the backend protocol.

It recomputes every prefix from scratch (no state to reuse), so it is the slow but universal reference
that the model backends are tested against.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from canopy_rs._core import Policy
from canopy_rs.errors import ArgumentTypeError
from canopy_rs.protocol import NextTokenLogits, NodeBatch, check_eos_token_ids, check_vocab_size

LogitsFn = Callable[[list[list[int]]], Any]


class CallableModel:
    """Backend for a callable ``logits_fn(prefixes: list[list[int]]) -> array [len(prefixes), vocab_size]``.

    Prefixes are the generated tokens only (the prompt is the callable's business)."""

    def __init__(self, logits_fn: LogitsFn, vocab_size: int, eos_token_ids: int | Sequence[int]) -> None:
        if not callable(logits_fn):
            raise ArgumentTypeError(f"model must be a callable logits_fn or a canopy_rs Backend, got {type(logits_fn).__name__}")
        self.logits_fn = logits_fn
        self._vocab_size = check_vocab_size(vocab_size)
        self._eos = check_eos_token_ids(eos_token_ids, self._vocab_size)
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
        logits = self.logits_fn(prefixes)  # the driver checks shape and dtype, naming logits_fn
        self._calls += 1
        self._rows += len(prefixes)
        self._tokens += sum(len(p) for p in prefixes)
        return NextTokenLogits(logits)

    def release(self, node_ids: np.ndarray) -> None:
        """Nothing is cached."""

    def counters(self) -> dict[str, float]:
        return {"model_calls": self._calls, "rows_evaluated": self._rows, "tokens_forwarded": self._tokens}
