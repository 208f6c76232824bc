"""The interface every transformers expansion strategy implements, and what they share.

:class:`canopy_rs.backends.transformers.TransformersModel` owns the prompt, the policy and the counters; it
hands each strategy (an *engine*) plain int64 numpy arrays and receives next-token logits on the device:

* ``prefill(root_id, prompt_ids) -> [1, V]``: a fresh run; forward the prompt (the root's distribution);
* ``expand(node_ids, parent_ids, tokens, depths) -> [F, V]``: one token per node on top of its parent's
  state (no root among them, parents expanded earlier and not released), logits in input order;
* ``release(node_ids)``: those nodes' own state is no longer needed (descendants may still need it);
* ``reset()``; and the gauges ``live_kv_tokens``, ``live_nodes``, ``peak_live_kv_tokens``, ``compactions``,
  ``kv_bytes()``, plus ``kv_tokens_per_row(prompt_len, depth)`` (what one more expanded node costs in live KV
  tokens, for sizing calls).

The base class keeps the bookkeeping that is the same for all of them: batch checks, the live-KV budget and its
error, peak tracking.
"""

from __future__ import annotations

import abc
from typing import Any, Optional, Sequence

import numpy as np
import torch

from canopy_rs.errors import EngineStateError, InvalidArgumentError, KVBudgetExceededError

from .runner import ModelRunner

__all__ = ["KVEngine", "HostToDevice", "tensor_bytes"]


class HostToDevice:
    """Copies small int64 host arrays to the device without stalling it: on CUDA through a reused pinned
    buffer and an asynchronous copy (a copy from pageable memory would wait for the queued kernels); the
    buffer is rewritten only after the previous copy's event has passed. Elsewhere a plain conversion."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.buf: Optional[torch.Tensor] = None
        self.event: Any = None

    def __call__(self, arr: np.ndarray) -> torch.Tensor:
        arr = np.ascontiguousarray(arr, dtype=np.int64)
        if not self.cuda:
            return torch.from_numpy(arr).to(self.device)
        n = arr.size
        if self.buf is None or self.buf.numel() < n:
            self.buf = torch.empty(max(n, 2 * (0 if self.buf is None else self.buf.numel()), 4096), dtype=torch.int64).pin_memory()
        elif self.event is not None:
            self.event.synchronize()
        staged = self.buf[:n].view(arr.shape)
        staged.numpy()[...] = arr
        out = staged.to(self.device, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()
        return out


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors held by a transformers cache's layers (dict-valued state included)."""
    total = 0
    for layer in getattr(obj, "layers", ()):
        for v in vars(layer).values():
            if isinstance(v, torch.Tensor) and v.ndim >= 1:
                total += v.numel() * v.element_size()
            elif isinstance(v, dict):
                total += sum(t.numel() * t.element_size() for t in v.values() if isinstance(t, torch.Tensor))
    return int(total)


class KVEngine(abc.ABC):
    """Base of the expansion strategies (see the module docstring for the contract)."""

    #: The strategy's name (``TransformersModel(strategy=...)``).
    name: str = ""
    #: How to lower the live KV when the budget is exceeded (appended to the error).
    budget_fix: str = "use order='depth-first', a smaller batch_size, or raise max_live_kv_tokens"

    def __init__(self, runner: ModelRunner, device: torch.device, *, max_live_kv_tokens: Optional[int] = None) -> None:
        self.runner = runner
        self.device = device
        self.max_live_kv_tokens = max_live_kv_tokens
        self.peak_live_kv_tokens = 0
        self.compactions = 0
        self.P = 0
        self.root_id: Optional[int] = None

    # --- the contract ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def _clear(self) -> None:
        """Drop all per-run state (not the peak/compaction gauges)."""

    @abc.abstractmethod
    def prefill(self, root_id: int, prompt_ids: Sequence[int]) -> torch.Tensor: ...

    @abc.abstractmethod
    def expand(self, node_ids: np.ndarray, parent_ids: np.ndarray, tokens: np.ndarray, depths: np.ndarray) -> torch.Tensor: ...

    @abc.abstractmethod
    def release(self, node_ids: Sequence[int]) -> None: ...

    @property
    @abc.abstractmethod
    def live_kv_tokens(self) -> int: ...

    @property
    @abc.abstractmethod
    def live_nodes(self) -> int: ...

    @abc.abstractmethod
    def kv_bytes(self) -> int:
        """Bytes held by the engine's KV storage now (allocated capacity, dead entries included)."""

    @abc.abstractmethod
    def kv_tokens_per_row(self, prompt_len: int, depth: int) -> int:
        """Live KV tokens one more expanded node at ``depth`` adds."""

    # --- shared --------------------------------------------------------------------------------------
    def reset(self) -> None:
        self._clear()
        self.peak_live_kv_tokens = 0
        self.compactions = 0

    def _start(self, root_id: int, prompt_ids: Sequence[int]) -> None:
        """Common start of ``prefill``: clear, check the prompt against the budget."""
        self._clear()
        if self.max_live_kv_tokens is not None and len(prompt_ids) > self.max_live_kv_tokens:
            raise KVBudgetExceededError(
                f"the prompt ({len(prompt_ids)} tokens) alone exceeds max_live_kv_tokens={self.max_live_kv_tokens}; "
                "raise max_live_kv_tokens or shorten the prompt"
            )
        self.root_id = int(root_id)
        self.P = len(prompt_ids)

    def _check_batch(self, node_ids: np.ndarray, started: bool) -> int:
        if not started:
            raise EngineStateError("expand() before the root (the prompt) was expanded: expand the root first")
        F = int(len(node_ids))
        if F == 0:
            raise InvalidArgumentError("expand() got an empty batch: pass at least one node")
        return F

    def _check_budget(self, needed: int, detail: str) -> None:
        if self.max_live_kv_tokens is not None and needed > self.max_live_kv_tokens:
            raise KVBudgetExceededError(
                f"{self.name} needs {needed} live KV tokens ({detail}) > max_live_kv_tokens="
                f"{self.max_live_kv_tokens}; {self.budget_fix}"
            )

    def _note_peak(self) -> None:
        self.peak_live_kv_tokens = max(self.peak_live_kv_tokens, self.live_kv_tokens)
