"""The engine <-> model protocol.

The canopy (the prefix tree) lives in Rust; a model's state (a KV cache) lives in the backend. The driver
(``canopy_rs.exact``, ``bounded``, ``sample``, ...) asks the backend to *expand* batches of nodes and tells it
which nodes' state will never be needed again.

A node is a generated prefix. It is named by an integer id chosen by the driver, unique within one run
(between two ``reset()`` calls). The root (the prompt, no generated token) has ``parent_id == -1`` and
``token == -1``. Expanding a node means: run the model on the node's last token on top of its parent's cached
state (for the root: on the prompt) and return the next-token distribution. A node is only ever expanded
after its parent was expanded and before its parent is released, so a backend never recomputes a prefix.

A backend returns either

* :class:`NextTokenLogits`: raw next-token logits ``[B, vocab_size]`` (float32 or float64); the Rust core
  applies the decoding policy. The generic path, used by plain callables.
* :class:`PolicySupport`: the policy already applied (on the model's device): for each row the support
  (token ids with non-zero policy probability) and their log-probabilities, in CSR form. Only k-wide rows
  cross to the host. The Rust core renormalises in f64 and computes the entropy.

Rules a backend can rely on:

1. ``reset()`` is called before a run; it frees all state.
2. Ids in a batch are distinct and have never been expanded before in this run.
3. Every parent in a batch was expanded earlier in this run and has not been released.
4. ``release(ids)`` lists expanded nodes whose state no driver will read again (all their children that
   needed it have been expanded). Releasing is a hint for memory; results never depend on it.

Optional: a ``preferred_batch_size`` attribute (an int, or None): the rows per ``expand()`` call the backend
works best with. Drivers use it when the caller passes no ``batch_size``. A backend that sizes it from memory
also exposes ``memory_per_row_bytes`` (device bytes one more row of a call needs: its logits and
temporaries plus the live state one more expanded node keeps), for callers that budget memory themselves.
Optional: ``describe() -> dict`` with ``dtype`` (the model's compute dtype), ``logits_dtype`` (what the
policy is computed from) and ``strategy`` (strings); drivers copy them into every result's record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, Union, runtime_checkable

import numpy as np

from canopy_rs._core import Policy
from canopy_rs.errors import ArgumentTypeError, InvalidArgumentError

__all__ = [
    "Backend",
    "NodeBatch",
    "NextTokenLogits",
    "PolicySupport",
    "Policy",
    "BackendOutput",
    "check_vocab_size",
    "check_eos_token_ids",
]


@dataclass(frozen=True)
class NodeBatch:
    """Nodes to expand in one model call. All arrays are int64 of length B."""

    node_ids: np.ndarray
    parent_ids: np.ndarray  # -1 for the root
    tokens: np.ndarray  # the node's last generated token; -1 for the root
    depths: np.ndarray  # number of generated tokens in the prefix (root: 0)
    _prefixes: Callable[[], list[list[int]]]

    def __len__(self) -> int:
        return int(self.node_ids.shape[0])

    def prefixes(self) -> list[list[int]]:
        """The full generated-token prefixes (prompt excluded). Computed on demand: backends that reuse
        parent state never need them."""
        return self._prefixes()


@dataclass(frozen=True)
class NextTokenLogits:
    """Raw next-token logits, shape ``[B, vocab_size]``, float32 or float64, C-contiguous."""

    logits: np.ndarray


@dataclass(frozen=True)
class PolicySupport:
    """The decoding policy applied by the backend.

    Row ``i`` owns ``tokens[offsets[i]:offsets[i+1]]`` (int64, distinct, in ``[0, vocab_size)``) and their
    policy log-probabilities ``logprobs[...]`` (float64, finite). Rows must be non-empty and must sum to 1
    within 1e-4; the core renormalises them exactly in f64.
    """

    offsets: np.ndarray
    tokens: np.ndarray
    logprobs: np.ndarray


BackendOutput = Union[NextTokenLogits, PolicySupport]


@runtime_checkable
class Backend(Protocol):
    """What ``canopy_rs.exact`` and friends accept besides a plain ``logits_fn`` callable."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_ids(self) -> Sequence[int]: ...

    def reset(self) -> None: ...

    def expand(self, batch: NodeBatch, policy: Policy) -> BackendOutput: ...

    def release(self, node_ids: np.ndarray) -> None: ...

    def counters(self) -> dict[str, float]:
        """Cost counters since the last ``reset()``: at least ``model_calls`` and ``rows_evaluated``;
        model backends add ``tokens_forwarded``, ``peak_live_kv_tokens``."""
        ...


def check_vocab_size(vocab_size: Any, source: str = "vocab_size") -> int:
    """A backend's ``vocab_size``: a positive int."""
    if vocab_size is None:
        raise ArgumentTypeError(f"{source} is required (the number of logits per row)")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise InvalidArgumentError(f"{source} must be a positive int, got {vocab_size!r}")
    return int(vocab_size)


def check_eos_token_ids(eos_token_ids: Any, vocab_size: int, source: str = "eos_token_ids") -> tuple[int, ...]:
    """A backend's ``eos_token_ids`` as a tuple of distinct ints: at least one, each in ``[0, vocab_size)``.
    An int is one id."""
    if eos_token_ids is None:
        raise ArgumentTypeError(f"{source} is required (an int or a list of ints)")
    ids = [eos_token_ids] if isinstance(eos_token_ids, (int, np.integer)) else list(eos_token_ids)
    if not ids:
        raise InvalidArgumentError(
            f"{source} must name at least one EOS id (a leaf ends in an EOS id or at max_new_tokens)"
        )
    out = []
    for e in ids:
        if isinstance(e, bool) or not isinstance(e, (int, np.integer)):
            raise ArgumentTypeError(f"{source} must hold ints, got {e!r}")
        if not 0 <= e < vocab_size:
            raise InvalidArgumentError(f"{source}: EOS id {e} is outside the vocabulary [0, vocab_size={vocab_size})")
        out.append(int(e))
    return tuple(dict.fromkeys(out))
