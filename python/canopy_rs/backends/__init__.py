"""Model backends: anything that turns a batch of tree nodes into next-token distributions.

* :class:`~canopy_rs.backends.callable.CallableModel` wraps a plain ``logits_fn`` (the generic path).
* :class:`~canopy_rs.backends.transformers.TransformersModel` drives a transformers causal LM with shared-prefix
  KV reuse (imported lazily: torch is only loaded when it is used).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from canopy_rs._core import Policy, normalize_support, policy_support
from canopy_rs.backends.callable import CallableModel, as_logits_array
from canopy_rs.errors import ArgumentTypeError, InvalidArgumentError
from canopy_rs.protocol import Backend, NextTokenLogits, NodeBatch, PolicySupport

__all__ = ["CallableModel", "as_backend", "expand_support", "TransformersModel"]


def as_backend(model: Any, vocab_size: int | None = None, eos_token_ids: int | Sequence[int] | None = None) -> Backend:
    """A :class:`~canopy_rs.protocol.Backend` for ``model``: backends pass through (``vocab_size`` and
    ``eos_token_ids``, if given, must agree with them); plain callables are wrapped in :class:`CallableModel`."""
    if isinstance(model, Backend):
        if vocab_size is not None and int(vocab_size) != model.vocab_size:
            raise InvalidArgumentError(f"vocab_size={vocab_size} disagrees with the backend's vocab_size={model.vocab_size}")
        if eos_token_ids is not None:
            ids = [eos_token_ids] if isinstance(eos_token_ids, (int, np.integer)) else list(eos_token_ids)
            if sorted(set(int(e) for e in ids)) != sorted(set(model.eos_token_ids)):
                raise InvalidArgumentError(
                    f"eos_token_ids={ids} disagrees with the backend's {list(model.eos_token_ids)}; "
                    "set EOS ids on the backend (e.g. TransformersModel(..., eos_token_ids=...))"
                )
        return model
    return CallableModel(model, vocab_size, eos_token_ids)  # type: ignore[arg-type]


def expand_support(
    backend: Backend, batch: NodeBatch, policy: Policy
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Expand ``batch`` and return the normalised policy support as CSR arrays
    ``(offsets, tokens, logprobs, entropy)``, whichever kind of output the backend gives."""
    out = backend.expand(batch, policy)
    if isinstance(out, NextTokenLogits):
        logits = as_logits_array(out.logits, len(batch), backend.vocab_size, source=type(backend).__name__)
        return policy_support(logits, policy)
    if isinstance(out, PolicySupport):
        offsets, tokens, logprobs = _support_arrays(out)
        if len(offsets) != len(batch) + 1:
            raise InvalidArgumentError(f"{type(backend).__name__} returned {len(offsets) - 1} support rows for {len(batch)} nodes")
        return normalize_support(offsets, tokens, logprobs, backend.vocab_size)
    raise ArgumentTypeError(f"{type(backend).__name__}.expand must return NextTokenLogits or PolicySupport, got {type(out).__name__}")


def _support_arrays(out: PolicySupport) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.ascontiguousarray(out.offsets, dtype=np.int64),
        np.ascontiguousarray(out.tokens, dtype=np.int64),
        np.ascontiguousarray(out.logprobs, dtype=np.float64),
    )


def __getattr__(name: str) -> Any:
    if name == "TransformersModel":
        from canopy_rs.backends.transformers import TransformersModel

        return TransformersModel
    raise AttributeError(name)
