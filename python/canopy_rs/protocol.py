"""The engine <-> model protocol: everything needed to write a backend.

The canopy (the prefix tree) lives in Rust; a model's state (its KV cache, or nothing) lives in the backend.
A *driver* (``canopy_rs.exact``, ``bounded``, ``sample``, ``stochastic_beam_search``, ``estimate_hybrid``)
asks the backend to **expand** batches of nodes and tells it which nodes' state will never be read again.
``canopy_rs.testing.check_backend(backend)`` checks an implementation against every rule below.

**What a backend is.** Any object with the five members of :class:`Backend` (duck-typed; no base class):

* ``vocab_size`` (int >= 1) and ``eos_token_ids`` (at least one distinct int in ``[0, vocab_size)``; every
  id is its own outcome and ends a rollout). Both are constant for the backend's life.
* ``reset()``: forget every node and zero every counter. Called before each run; a run is everything
  between two ``reset()`` calls. Node ids may be reused after it.
* ``expand(batch, policy) -> NextTokenLogits | PolicySupport``: one row per node of ``batch``, in the order of
  ``batch.node_ids``.
* ``release(node_ids)``: a memory hint (see 4 below).
* ``counters() -> dict[str, float]``: cost since the last ``reset()`` (see "Counters").
* optional ``preferred_batch_size`` (int or None): rows per ``expand()`` the backend works best with; drivers
  use it when the caller passes no ``batch_size``. A backend that sizes it from memory also exposes
  ``memory_per_row_bytes`` (device bytes one more row of a call needs: its logits and temporaries plus the
  live state one more expanded node keeps), for callers that budget memory themselves.
* optional ``check_max_new_tokens(max_new_tokens)``: raises :class:`canopy_rs.errors.InvalidArgumentError`
  when the backend cannot serve canopies that deep (a transformers model: prompt + ``max_new_tokens`` beyond
  its context window). Every driver calls it before the first ``expand()``.
* optional ``describe() -> dict`` with ``dtype`` (the model's compute dtype), ``logits_dtype`` (what the
  policy is computed from) and ``strategy`` (strings); drivers copy them into every result's record.

**Nodes.** A node is a prefix of generated tokens. The **backend owns the prompt**: it is part of the
backend's state (tokenised, chat-templated, prefilled), never of a node; ``batch.prefixes()`` and
``depths`` count generated tokens only. The root (the prompt alone) has ``parent_id == -1``,
``token == -1``, ``depth == 0``. Any other node has ``depth >= 1`` and ``token`` = its last generated token.
Expanding a node means: feed its last token on top of its parent's state (the root: feed the prompt) and
return the distribution of the *next* token. Ids are non-negative ints chosen by the driver; they need not
be contiguous or start at 0 (the hybrid estimator continues a canopy's numbering). The arrays of a
:class:`NodeBatch` are int64; a backend must not modify them.

**Rules every driver keeps (a backend may rely on them).**

1. After ``reset()``, the first ``expand()`` holds the root **alone**; the root never shares a batch and is
   expanded once per run (so the prompt is prefilled once).
2. Ids in a batch are distinct and were never expanded before in this run.
3. Every parent in a batch was expanded in an earlier call of this run and has not been released. Siblings
   may be spread over several calls, with other nodes' calls in between (depth-first and best-first orders
   do this), so a parent's state must survive until it is released.
4. ``release(ids)`` lists expanded nodes whose state no later ``expand()`` of this run will read. Releasing
   only saves memory: outputs must never depend on when, or whether, ``release`` is called.

**Output.** Either

* :class:`NextTokenLogits`: raw next-token logits ``[B, vocab_size]``, float32 or float64 (a torch tensor is
  accepted); the Rust core applies the policy. The generic path (plain callables); or
* :class:`PolicySupport`: the policy already applied on the model's device, so that only k-wide rows cross to
  the host. It must equal what the core would compute from the same logits, **exactly as a set**:

  - ``z = logits / temperature``;
  - **top-k** (``policy.top_k`` not None) keeps every token whose logit is >= the k-th largest logit:
    **ties at the threshold are all kept**, so a row can hold more than k tokens;
  - **top-p** (``policy.top_p < 1``) sorts the kept tokens by ``z`` descending, ties by ascending token id,
    and keeps the smallest prefix whose cumulative probability (softmax of ``z`` over the top-k set)
    reaches ``top_p * (1 - 1e-12)``; the token that crosses it is kept, and so is the first token always;
  - renormalise over the kept set; a token whose probability is 0 (logit -inf, or f64 underflow) is not in
    the support.

  Row ``i`` is ``tokens[offsets[i]:offsets[i+1]]`` (distinct ids in ``[0, vocab_size)``) with their
  log-probabilities (finite, <= 0, summing to 1 within 1e-4; the core renormalises in f64 and computes the
  entropy). List a row's tokens in ascending id order, as the core does: the samplers walk a row in the
  order given, so the same seed then draws the same rollouts from any backend.

A malformed output (wrong kind, row count, shape, dtype, CSR layout, NaN or +inf logits, a row that does not
sum to 1) makes every driver raise the same :class:`canopy_rs.errors.BackendOutputError`.

**Counters.** ``counters()`` returns numbers (int or float) for the run since the last ``reset()``: all zero
right after it, and the cumulative ones (all below but ``kv_bytes``, a current value) never decrease within
a run. Drivers read:

* ``model_calls`` (required): calls into the model (forwards), reported as ``RunInfo.model_calls``;
* ``rows_evaluated`` (required): nodes expanded, i.e. the sum of ``len(batch)`` over ``expand()`` calls;
* ``tokens_forwarded``: tokens run through the model, prompt included; ``prompt_tokens``: the prompt's share
  of it. Their difference is ``model_tokens``, the cost unit of every result (``Budget(tokens=)``, the
  estimators' cost dicts, the tokens-per-node figure);
* ``peak_live_kv_tokens``: the most KV positions alive at once; ``kv_bytes``: bytes held now
  (``Budget(memory_bytes=)``).

A missing optional counter reads as 0. Other keys are allowed and passed through to ``cost`` records.

**Out of capacity.** A backend that cannot hold the state it is asked to keep (a KV budget, device memory)
raises :class:`canopy_rs.errors.KVBudgetExceededError` (a ``MemoryError``) from ``expand()``, with a message
naming the limit and the way out (a smaller ``batch_size``, ``order="depth-first"``, a larger budget). The
driver lets it propagate; a run is not resumed after an error (the caller starts over, which resets). Any
other failure raises a :mod:`canopy_rs.errors` class, never returns a partial batch.

Drivers call a backend from one thread, one call at a time.
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
    """The decoding policy applied by the backend (see the module docstring for the exact rules).

    Row ``i`` owns ``tokens[offsets[i]:offsets[i+1]]`` (int64, distinct, in ``[0, vocab_size)``, ascending)
    and their policy log-probabilities ``logprobs[...]`` (float64, finite). Rows must be non-empty and must
    sum to 1 within 1e-4; the core renormalises them exactly in f64.
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
        """Cost counters since the last ``reset()``: at least ``model_calls`` and ``rows_evaluated`` (see the
        module docstring for the ones drivers read)."""
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
