"""What every driver (``exact``, ``bounded``, ``sample``, stochastic beam search, the hybrid) shares: the
argument checks, the decoding policy, the backend and its EOS ids, the batch size (the backend's
``preferred_batch_size`` when the caller gives none), and the backend's cost counters and numerics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

from canopy_rs._core import Policy
from canopy_rs.backends import as_backend
from canopy_rs.errors import ArgumentTypeError, BackendOutputError, InvalidArgumentError
from canopy_rs.protocol import Backend, check_eos_token_ids

DEFAULT_MAX_NODES = 10_000_000
# Rows per model call: wide enough to amortise a forward, small enough that a V=150k float32 batch stays
# around 0.3 GB.
DEFAULT_BATCH_ELEMENTS = 1 << 26


def check_positive_int(name: str, v: Any) -> int:
    """The int arguments' check: ArgumentTypeError for a non-int, InvalidArgumentError below 1."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be an int, got {v!r}")
    if v < 1:
        raise InvalidArgumentError(f"{name} must be >= 1, got {v}")
    return int(v)


def make_policy(temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0) -> Policy:
    """The decoding policy; the core checks the values, this the types."""
    if isinstance(top_k, bool) or (top_k is not None and not isinstance(top_k, (int, np.integer))):
        raise ArgumentTypeError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise ArgumentTypeError(f"{name} must be a number, got {v!r}")
    return Policy(float(temperature), None if top_k is None else int(top_k), float(top_p))


def make_rng(seed: Any) -> np.random.Generator:
    """A generator from an int, a SeedSequence, a Generator (used as is) or None (fresh entropy)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer, np.random.SeedSequence))):
        raise InvalidArgumentError(f"seed must be an int, a numpy SeedSequence or None, got {seed!r}")
    return np.random.Generator(np.random.PCG64(seed))


def default_batch_size(vocab_size: int) -> int:
    """Rows per model call when neither the caller nor the backend says: wide calls, but a V-wide float32
    batch stays around 0.3 GB."""
    return int(min(4096, max(16, DEFAULT_BATCH_ELEMENTS // (4 * int(vocab_size)))))


@dataclass(frozen=True)
class Setup:
    """A checked run configuration: the backend, the policy and the sizes every loop needs."""

    backend: Backend
    policy: Policy
    max_new_tokens: int
    batch_size: int
    eos_token_ids: tuple[int, ...]

    @property
    def vocab_size(self) -> int:
        return int(self.backend.vocab_size)

    def policy_dict(self) -> dict[str, Any]:
        p = self.policy
        return {"temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p}


def setup(
    model: Any,
    *,
    vocab_size: Optional[int],
    eos_token_ids: Union[int, Sequence[int], None],
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int],
    top_p: float,
    batch_size: Optional[int],
) -> Setup:
    """Checks the arguments every entry point shares and wraps ``model`` as a backend. The EOS rule is the
    same for every driver: at least one id, each in ``[0, vocab_size)`` (a leaf ends in EOS or at the cap)."""
    max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
    if batch_size is not None:
        batch_size = check_positive_int("batch_size", batch_size)
    policy = make_policy(temperature, top_k, top_p)
    backend = as_backend(model, vocab_size, eos_token_ids)
    check_depth = getattr(backend, "check_max_new_tokens", None)  # optional (see canopy_rs.protocol)
    if check_depth is not None:
        check_depth(max_new_tokens)  # e.g. the model's context window, before any forward
    eos = check_eos_token_ids(backend.eos_token_ids, backend.vocab_size, source=f"{type(backend).__name__}.eos_token_ids")
    if batch_size is None:
        preferred = getattr(backend, "preferred_batch_size", None)  # optional (see canopy_rs.protocol)
        if preferred is not None:
            batch_size = check_positive_int(f"{type(backend).__name__}.preferred_batch_size", preferred)
        else:
            batch_size = default_batch_size(backend.vocab_size)
    return Setup(backend, policy, max_new_tokens, batch_size, eos)


def counters(backend: Backend) -> dict[str, float]:
    """The backend's cost counters as floats. A backend that cannot report them is broken, not silent."""
    out = {}
    for k, v in dict(backend.counters()).items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise BackendOutputError(f"{type(backend).__name__}.counters()[{k!r}] must be a number, got {v!r}")
        out[str(k)] = float(v)
    return out


def describe(backend: Backend) -> dict[str, Optional[str]]:
    """The backend's numerics and strategy for a result record (the optional ``describe()``, see
    :mod:`canopy_rs.protocol`): ``dtype``, ``logits_dtype``, ``strategy``; None where not reported."""
    get = getattr(backend, "describe", None)
    d = dict(get()) if get is not None else {}
    return {k: (None if d.get(k) is None else str(d[k])) for k in ("dtype", "logits_dtype", "strategy")}


def model_tokens(c: dict[str, float]) -> float:
    """The cost unit of every result: model tokens forwarded, the prompt excluded (``tokens_forwarded -
    prompt_tokens`` of a backend's counters; its ``rows_evaluated`` when it does not count tokens)."""
    if "tokens_forwarded" in c:
        return max(float(c["tokens_forwarded"]) - float(c.get("prompt_tokens", 0)), 0.0)
    return float(c.get("rows_evaluated", 0))


def cost(backend: Backend, nodes_expanded: int, t0: float) -> dict[str, float]:
    """A sampler's cost record: the backend's counters, ``model_tokens`` (:func:`model_tokens`), distinct
    nodes expanded and wall seconds."""
    c = counters(backend)
    c["model_tokens"] = model_tokens(c)
    c["nodes_expanded"] = float(nodes_expanded)
    c["seconds"] = time.perf_counter() - t0
    return c
