"""A backend's ``expand()`` output, checked and converted the same way for every caller.

Whichever driver (or wrapping backend, such as :class:`~canopy_rs.backends.cached.CachedModel`) calls
``expand()``, the same mistake raises the same :class:`~canopy_rs.errors.BackendOutputError` with the same
message. It lives in the backend layer so backends can use it without importing the driver (layers import
downwards only: cli -> study -> estimators -> drivers -> backends -> model; tests/test_layering.py).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, NamedTuple, Union

import numpy as np

from canopy_rs._core import Policy, normalise_support, policy_support
from canopy_rs.backends.callable import CallableModel
from canopy_rs.errors import BackendOutputError
from canopy_rs.protocol import Backend, NextTokenLogits, NodeBatch, PolicySupport

__all__ = ["Support", "as_support", "backend_name", "blame_backend", "expand_checked", "expand_support", "logits_array"]


def backend_name(backend: Backend) -> str:
    """Who to name in an output error: the user's function for a wrapped callable."""
    return "logits_fn" if isinstance(backend, CallableModel) else f"{type(backend).__name__}.expand"


def logits_array(out: Any, rows: int, vocab_size: int, who: str) -> np.ndarray:
    """A logits batch as a C-contiguous float32/float64 ``[rows, vocab_size]`` array (no copy if it is one).
    Torch tensors are accepted (half precision is widened)."""
    if hasattr(out, "detach") and hasattr(out, "cpu"):  # a torch tensor
        t = out.detach()
        out = (t.float() if str(t.dtype) in ("torch.bfloat16", "torch.float16") else t).cpu().numpy()
    arr = np.asarray(out)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if arr.dtype not in (np.float32, np.float64):
        raise BackendOutputError(f"{who} must return float32 or float64 logits, got dtype {arr.dtype}")
    if arr.shape != (rows, vocab_size):
        raise BackendOutputError(
            f"{who} returned logits of shape {arr.shape}; expected (len(prefixes), vocab_size) = ({rows}, {vocab_size})"
        )
    return np.ascontiguousarray(arr)


def _csr_array(x: Any, name: str, kind: str, dtype: type, who: str) -> np.ndarray:
    arr = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in kind):
        raise BackendOutputError(f"{who} returned PolicySupport.{name} of dtype {arr.dtype} and shape {arr.shape}; "
                                 f"expected a 1-D {np.dtype(dtype).name} array")
    return np.ascontiguousarray(arr, dtype=dtype)


def expand_checked(backend: Backend, batch: NodeBatch, policy: Policy) -> Union[NextTokenLogits, PolicySupport]:
    """``backend.expand(batch, policy)`` with its output checked and converted to the core's dtypes."""
    out = backend.expand(batch, policy)
    who, n = backend_name(backend), len(batch)
    if isinstance(out, NextTokenLogits):
        return NextTokenLogits(logits_array(out.logits, n, backend.vocab_size, who))
    if isinstance(out, PolicySupport):
        offsets = _csr_array(out.offsets, "offsets", "iu", np.int64, who)
        if offsets.shape[0] != n + 1:
            raise BackendOutputError(f"{who} returned {offsets.shape[0] - 1} support rows for {n} nodes")
        return PolicySupport(offsets, _csr_array(out.tokens, "tokens", "iu", np.int64, who),
                             _csr_array(out.logprobs, "logprobs", "f", np.float64, who))
    raise BackendOutputError(f"{who} must return NextTokenLogits or PolicySupport, got {type(out).__name__}")


@contextlib.contextmanager
def blame_backend(backend: Backend) -> Iterator[None]:
    """The core checks row contents (NaN logits, CSR layout, supports that do not sum to 1): name the
    backend in its message, the same way on every path."""
    try:
        yield
    except BackendOutputError as e:
        raise BackendOutputError(f"{backend_name(backend)}: {e}") from None


class Support(NamedTuple):
    """Normalised policy supports in CSR form, plus each row's entropy."""

    offsets: np.ndarray
    tokens: np.ndarray
    logprobs: np.ndarray
    entropy: np.ndarray


def as_support(backend: Backend, out: Union[NextTokenLogits, PolicySupport], policy: Policy) -> Support:
    with blame_backend(backend):
        if isinstance(out, NextTokenLogits):
            return Support(*policy_support(out.logits, policy))
        return Support(*normalise_support(out.offsets, out.tokens, out.logprobs, backend.vocab_size))


def expand_support(
    backend: Backend,
    policy: Policy,
    node_ids: np.ndarray,
    parent_ids: np.ndarray,
    tokens: np.ndarray,
    depths: np.ndarray,
    prefix_fn: Callable[[slice], list[list[int]]],
    batch_size: int,
) -> Support:
    """Expands the nodes in chunks of ``batch_size`` rows (``prefix_fn(slice)`` gives a chunk's prefixes on
    demand) and returns one concatenated support."""
    n = node_ids.shape[0]
    parts = []
    for a in range(0, n, batch_size):
        sl = slice(a, min(n, a + batch_size))
        batch = NodeBatch(node_ids[sl], parent_ids[sl], tokens[sl], depths[sl], lambda sl=sl: prefix_fn(sl))
        parts.append(as_support(backend, expand_checked(backend, batch, policy), policy))
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return Support(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0))
    offs, base = [np.zeros(1, dtype=np.int64)], 0
    for p in parts:
        offs.append(p.offsets[1:] + base)
        base += int(p.offsets[-1])
    return Support(np.concatenate(offs), *(np.concatenate([getattr(p, f) for p in parts]) for f in Support._fields[1:]))
