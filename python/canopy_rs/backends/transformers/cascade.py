"""Cascade tree attention engine: prompt KV stored once, one arena column per live expanded node.

The prompt is forwarded once with the model's own attention into a plain cache, whose per-layer keys/values
become the prompt part of a :class:`~.attention.CascadeKV`. Each later forward feeds F frontier tokens (one per
node) through :func:`~.attention.cascade_attention_forward`: the new columns are written to free arena slots
and every query attends the prompt plus its own ancestors, gathered by index.

Bookkeeping (host, numpy, O(F) per step): node id -> slot, each slot's parent slot, depth and reference count
(1 while the node is unreleased, +1 per child column that exists). A slot whose count drops to 0 goes back to
the free list. On the device: ``anc[slot, j]``, the slot of the node's ancestor at depth ``j + 1`` (a row is
its parent's row plus itself), so a batch's gather index is one row lookup. Both grow geometrically.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from canopy_rs.errors import InvalidArgumentError

from .cache_ops import new_tree_cache
from .runner import ModelRunner
from ._engine import HostToDevice, KVEngine
from .attention import STEP_KWARG, CascadeKV, CascadeStep, cascade_forward

__all__ = ["CascadeEngine"]


def _grown(a: np.ndarray, n: int, fill) -> np.ndarray:
    out = np.full(n, fill, dtype=a.dtype)
    out[: len(a)] = a
    return out


class CascadeEngine(KVEngine):
    name = "cascade"
    budget_fix = "use order='depth-first', a smaller batch_size, or raise max_live_kv_tokens"

    def __init__(
        self,
        runner: ModelRunner,
        device: torch.device,
        *,
        max_live_kv_tokens: Optional[int] = None,
        initial_capacity: int = 1024,
    ) -> None:
        super().__init__(runner, device, max_live_kv_tokens=max_live_kv_tokens)
        self.initial_capacity = int(initial_capacity)
        self.last_step: Optional[CascadeStep] = None
        self.to_device = HostToDevice(device)
        self._clear()

    def _clear(self) -> None:
        self.kv: Optional[CascadeKV] = None
        self.cap = 0
        self.slot_of = np.full(0, -1, dtype=np.int64)  # node id -> slot
        self.slot_parent = np.zeros(0, dtype=np.int64)
        self.slot_ref = np.zeros(0, dtype=np.int64)
        self.slot_depth = np.zeros(0, dtype=np.int64)
        self.free = np.zeros(0, dtype=np.int64)  # a stack: free[:n_free]
        self.n_free = 0
        self.anc = torch.zeros((0, 0), dtype=torch.int64, device=self.device)

    @property
    def live_kv_tokens(self) -> int:
        """Prompt columns plus arena columns in use (a node's column lives while it or a descendant is live)."""
        return self.P + (self.cap - self.n_free) if self.kv is not None else 0

    @property
    def live_nodes(self) -> int:
        return self.cap - self.n_free

    def kv_bytes(self) -> int:
        return self.kv.nbytes() if self.kv is not None else 0

    def kv_tokens_per_row(self, prompt_len: int, depth: int) -> int:
        return 1

    # ------------------------------------------------------------------------------------------------
    def _grow(self, needed_slots: int, depth: int) -> None:
        used = self.cap - self.n_free
        if used + needed_slots > self.cap:
            cap = max(used + needed_slots, 2 * self.cap, self.initial_capacity)
            # New slots go on the stack below the existing free ones, lowest index on top.
            fresh = np.arange(cap - 1, self.cap - 1, -1, dtype=np.int64)
            free = np.empty(cap, dtype=np.int64)
            free[: len(fresh)] = fresh
            free[len(fresh) : len(fresh) + self.n_free] = self.free[: self.n_free]
            self.free, self.n_free = free, len(fresh) + self.n_free
            self.slot_parent = _grown(self.slot_parent, cap, -1)
            self.slot_ref = _grown(self.slot_ref, cap, 0)
            self.slot_depth = _grown(self.slot_depth, cap, 0)
            assert self.kv is not None
            self.kv.grow(cap)
            self.cap = cap
        rows, cols = self.anc.shape
        if rows < self.cap or cols < depth:
            width = cols if cols >= depth else max(depth, 2 * cols, 16)
            anc = torch.zeros((self.cap, width), dtype=torch.int64, device=self.device)
            anc[:rows, :cols] = self.anc
            self.anc = anc

    def prefill(self, root_id: int, prompt_ids: Sequence[int]) -> torch.Tensor:
        self._start(root_id, prompt_ids)
        cache = new_tree_cache(self.runner.model)
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        logits = self.runner(ids, cache, last_only=True)[:, -1, :]
        keys, values = [], []
        for i, layer in enumerate(cache.layers):
            k = getattr(layer, "keys", None)
            if k is None or k.ndim != 4 or k.shape[-2] != self.P:
                raise RuntimeError(f"cache layer {i} ({type(layer).__name__}) holds no [1, heads, prompt, dim] keys")
            keys.append(k[0])
            values.append(layer.values[0])
        self.kv = CascadeKV(keys, values, 0)
        self._note_peak()
        return logits

    def _slots_of_parents(self, parent_ids: np.ndarray, depths: np.ndarray) -> np.ndarray:
        is_root = parent_ids == self.root_id
        known = (parent_ids >= 0) & (parent_ids < len(self.slot_of))
        pslots = np.full(len(parent_ids), -1, dtype=np.int64)
        pslots[known] = self.slot_of[parent_ids[known]]
        bad = (pslots < 0) & ~is_root
        pslots[is_root] = -1
        if bad.any():
            raise InvalidArgumentError(
                f"parents {parent_ids[bad][:5].tolist()} were never expanded in this run or were already released "
                "(cascade)"
            )
        has = pslots >= 0
        if (depths[~has] != 1).any() or (self.slot_depth[pslots[has]] != depths[has] - 1).any():
            raise InvalidArgumentError("node depths are inconsistent with their parents' depths")
        return pslots

    def expand(self, node_ids: np.ndarray, parent_ids: np.ndarray, tokens: np.ndarray, depths: np.ndarray) -> torch.Tensor:
        F = self._check_batch(node_ids, self.kv is not None)
        if (node_ids < 0).any():
            raise InvalidArgumentError("node ids must be >= 0")
        nmax = int(node_ids.max()) + 1
        if nmax > len(self.slot_of):
            self.slot_of = _grown(self.slot_of, max(nmax, 2 * len(self.slot_of), 1024), -1)
        if (self.slot_of[node_ids] >= 0).any() or len(np.unique(node_ids)) != F:
            raise InvalidArgumentError("node ids in the batch were already expanded in this run (or repeat)")
        pslots = self._slots_of_parents(parent_ids, depths)
        live = self.cap - self.n_free
        self._check_budget(self.P + live + F, f"prompt {self.P}, live node columns {live}, batch {F}")
        D = int(depths.max())
        self._grow(F, D)

        # Host bookkeeping.
        slots = self.free[self.n_free - F : self.n_free][::-1].copy()
        self.n_free -= F
        self.slot_of[node_ids] = slots
        self.slot_parent[slots] = pslots
        self.slot_ref[slots] = 1
        self.slot_depth[slots] = depths
        has = pslots >= 0
        np.add.at(self.slot_ref, pslots[has], 1)

        # Device indices and tokens: one asynchronous host -> device transfer of [4, F].
        dev = self.device
        slots_d, pslots_d, depths_d, tokens_d = self.to_device(np.stack([slots, np.maximum(pslots, 0), depths, tokens])).unbind(0)
        rows = self.anc[pslots_d, :D]
        rows[torch.arange(F, device=dev), depths_d - 1] = slots_d
        self.anc[slots_d, :D] = rows
        valid = torch.arange(D, device=dev)[None, :] < depths_d[:, None]
        step = CascadeStep(
            kv=self.kv,  # type: ignore[arg-type]
            slots=slots_d,
            anc=torch.where(valid, rows, 0),
            valid=valid,
            positions=self.P + depths_d - 1,
            prompt_len=self.P,
        )
        input_ids = tokens_d[None]
        with cascade_forward(self.runner.model):
            logits = self.runner(input_ids, None, position_ids=step.positions[None], extra={STEP_KWARG: step})[0]
        self.last_step = step
        self._note_peak()
        return logits

    def release(self, node_ids: Sequence[int]) -> None:
        ids = np.asarray(node_ids, dtype=np.int64)
        ids = ids[(ids >= 0) & (ids < len(self.slot_of))]
        cur = self.slot_of[ids]
        cur = cur[cur >= 0]  # the root (the prompt stays until reset) and unknown ids are skipped
        self.slot_of[ids] = -1
        ref, parent = self.slot_ref, self.slot_parent
        while len(cur):
            np.subtract.at(ref, cur, 1)
            dead = np.unique(cur[ref[cur] == 0])
            n = len(dead)
            self.free[self.n_free : self.n_free + n] = dead
            self.n_free += n
            cur = parent[dead]
            cur = cur[cur >= 0]
