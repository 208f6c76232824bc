"""Model backends: anything that turns a batch of tree nodes into next-token distributions.

* :class:`~canopy_rs.backends.callable.CallableModel` wraps a plain ``logits_fn`` (the generic path).
* :class:`~canopy_rs.backends.transformers.TransformersModel` drives a transformers causal LM with shared-prefix
  KV reuse (its module imports torch: import it from there, or as ``canopy_rs.TransformersModel``).
* :class:`~canopy_rs.backends.cached.CachedModel` answers repeated prefixes from a table.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from canopy_rs.backends.callable import CallableModel
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.protocol import Backend

__all__ = ["CallableModel", "as_backend"]


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

