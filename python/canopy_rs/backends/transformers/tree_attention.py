"""Tree attention: one flattened single-row KV cache for the whole live canopy.

Layout. Column ``c`` of every layer's ``keys``/``values`` (``[1, kv_heads, L, head_dim]``) holds either a
prompt token (``c < P``) or one expanded tree node's token. Expanding F nodes is one forward of F tokens
(one per node: its last generated token) with

* ``position_ids = P + depth - 1`` (the position of that token in its own sequence), and
* a 4D mask ``[1, 1, F, L + F]`` whose row for node ``u`` opens the prompt columns, the columns of ``u``'s
  ancestors and ``u``'s own new column (additive float mask for eager, bool for sdpa).

The forward appends the F new columns, so every node costs exactly one token after the prompt.

Ancestors. For each node column we keep, on the device, the columns of its ancestors inside its current
*depth block* of ``W`` levels (``anc[c, j]``: the ancestor at depth ``b*W + j + 1``) and the column of the
last node of the previous block (``block_parent[c]``). A node's mask row is then ``anc[c]`` plus the ``anc``
rows of its chain of block parents: ``ceil(depth / W)`` gathers per forward, whatever the batch.

Memory. A column is needed while its node is unreleased or it has a live descendant (descendants attend to
it). Reference counts track this; when enough columns are dead the cache is compacted with an
``index_select`` along the sequence dimension of every ``cache.layers[i].keys/.values`` (public attributes
of transformers' ``DynamicLayer``; covered by the tests) and all column indices are remapped.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from canopy_rs.errors import InvalidArgumentError, TreeAttentionUnsupported

from .cache_ops import new_tree_cache
from .runner import ModelRunner
from ._engine import KVEngine, tensor_bytes

__all__ = ["TreeAttentionEngine"]


class TreeAttentionEngine(KVEngine):
    """The dense-mask reference for :class:`~.cascade.CascadeEngine` (and the path for attention that
    bypasses transformers' registry)."""

    name = "tree"
    budget_fix = "use order='depth-first', a smaller batch_size, strategy='cascade', or raise max_live_kv_tokens"

    def __init__(
        self,
        runner: ModelRunner,
        device: torch.device,
        dtype: torch.dtype,
        mask_kind: str,
        *,
        max_live_kv_tokens: Optional[int] = None,
        compact_fraction: float = 0.5,
        compact_min: int = 256,
        block: int = 64,
        sliding_window: Optional[int] = None,
    ):
        if mask_kind not in ("float", "bool"):
            raise InvalidArgumentError(f"mask_kind must be 'float' or 'bool', got {mask_kind!r}")
        super().__init__(runner, device, max_live_kv_tokens=max_live_kv_tokens)
        self.dtype = dtype
        self.mask_kind = mask_kind
        self.compact_fraction = float(compact_fraction)
        self.compact_min = int(compact_min)
        self.W = int(block)
        self.sliding_window = sliding_window
        self._clear()

    # ------------------------------------------------------------------------------------------------
    def _clear(self) -> None:
        self.cache: Any = None
        self.root_id: Optional[int] = None
        self.P = 0
        self.L = 0
        self.dead = 0
        self.node_col: dict[int, int] = {}
        self.cap = 0
        self.col_parent = np.zeros(0, dtype=np.int64)
        self.col_ref = np.zeros(0, dtype=np.int64)
        self.col_alive = np.zeros(0, dtype=bool)
        self.col_depth = np.zeros(0, dtype=np.int64)
        self.anc = torch.zeros((0, self.W), dtype=torch.int64, device=self.device)
        self.block_parent = torch.zeros(0, dtype=torch.int64, device=self.device)

    @property
    def live_kv_tokens(self) -> int:
        """Columns currently held in the cache (prompt included; dead columns until compaction)."""
        return self.L

    @property
    def live_nodes(self) -> int:
        return len(self.node_col)

    def _grow(self, needed: int) -> None:
        if needed <= self.cap:
            return
        cap = max(needed, 2 * self.cap, 256)
        extra = cap - self.cap
        self.col_parent = np.concatenate([self.col_parent, np.full(extra, -1, dtype=np.int64)])
        self.col_ref = np.concatenate([self.col_ref, np.zeros(extra, dtype=np.int64)])
        self.col_alive = np.concatenate([self.col_alive, np.zeros(extra, dtype=bool)])
        self.col_depth = np.concatenate([self.col_depth, np.zeros(extra, dtype=np.int64)])
        self.anc = torch.cat(
            [self.anc, torch.full((extra, self.W), -1, dtype=torch.int64, device=self.device)], dim=0
        )
        self.block_parent = torch.cat(
            [self.block_parent, torch.full((extra,), -1, dtype=torch.int64, device=self.device)]
        )
        self.cap = cap

    def kv_bytes(self) -> int:
        return tensor_bytes(self.cache) if self.cache is not None else 0

    def kv_tokens_per_row(self, prompt_len: int, depth: int) -> int:
        return 1

    # ------------------------------------------------------------------------------------------------
    def prefill(self, root_id: int, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Forward the prompt into a fresh cache; returns the root's next-token logits ``[1, V]``."""
        self._start(root_id, prompt_ids)
        self._check_window(len(prompt_ids), 0)
        self.cache = new_tree_cache(self.runner.model)
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        logits = self.runner(ids, self.cache, last_only=True)[:, -1, :]
        self.L = self.P
        self._grow(self.P + 256)
        self._note_peak()
        return logits

    def _check_window(self, prompt_len: int, depth: int) -> None:
        w = self.sliding_window
        if w is not None and prompt_len + depth > w:
            raise TreeAttentionUnsupported(
                f"tree attention on a sliding-window model (window {w}) is exact only while prompt + depth <= {w}; "
                f"this batch reaches depth {depth} with a {prompt_len}-token prompt: use strategy='per-row' "
                "(or a smaller max_new_tokens)"
            )

    def _parent_columns(self, parent_ids: np.ndarray, depths: np.ndarray) -> np.ndarray:
        root = self.root_id
        get = self.node_col.get
        pcols = np.fromiter(
            (-1 if p == root else get(p, -2) for p in parent_ids.tolist()), dtype=np.int64, count=len(parent_ids)
        )
        if (pcols == -2).any():
            bad = parent_ids[pcols == -2][:5].tolist()
            raise InvalidArgumentError(
                f"parents {bad} were never expanded in this run or were already released (tree attention)"
            )
        is_root = pcols < 0
        if (depths[is_root] != 1).any() or (self.col_depth[pcols[~is_root]] != depths[~is_root] - 1).any():
            raise InvalidArgumentError("node depths are inconsistent with their parents' depths")
        return pcols

    def expand(
        self, node_ids: np.ndarray, parent_ids: np.ndarray, tokens: np.ndarray, depths: np.ndarray
    ) -> torch.Tensor:
        """One forward for all nodes (none is the root); returns their logits ``[F, V]`` in input order."""
        F = self._check_batch(node_ids, self.cache is not None)
        dup = len(set(node_ids.tolist()) & self.node_col.keys())
        if dup:
            raise InvalidArgumentError("node ids in the batch were already expanded in this run")
        pcols = self._parent_columns(parent_ids, depths)
        self._check_window(self.P, int(depths.max()))

        if self.max_live_kv_tokens is not None and self.L + F > self.max_live_kv_tokens:
            if self.dead:
                self.compact()
            self._check_budget(self.L + F, f"prompt {self.P}, live node columns {self.L - self.P - self.dead}, batch {F}")

        L, P, W, dev = self.L, self.P, self.W, self.device
        self._grow(L + F)
        new = np.arange(L, L + F, dtype=np.int64)
        # Host bookkeeping.
        self.col_parent[new] = pcols
        self.col_ref[new] = 1
        self.col_alive[new] = True
        self.col_depth[new] = depths
        has_parent = pcols >= 0
        np.add.at(self.col_ref, pcols[has_parent], 1)

        # Device ancestor tables.
        d_dev = torch.as_tensor(depths, dtype=torch.int64).to(dev)
        p_dev = torch.as_tensor(pcols, dtype=torch.int64).to(dev)
        new_dev = torch.arange(L, L + F, dtype=torch.int64, device=dev)
        pos = (d_dev - 1) % W
        starts_block = (pos == 0)[:, None]
        pc = p_dev.clamp(min=0)
        anc_rows = torch.where(starts_block, torch.full_like(self.anc[pc], -1), self.anc[pc])
        anc_rows[torch.arange(F, device=dev), pos] = new_dev
        bp_rows = torch.where(starts_block[:, 0], p_dev, self.block_parent[pc])
        self.anc[new_dev] = anc_rows
        self.block_parent[new_dev] = bp_rows

        # Mask [F, L + F] (+ one scratch column for the -1 entries, cut off below).
        K = L + F
        m = torch.zeros((F, K + 1), dtype=torch.bool, device=dev)
        m[:, :P] = True
        m.scatter_(1, torch.where(anc_rows >= 0, anc_rows, K), True)
        cur = bp_rows
        for _ in range((int(depths.max()) - 1) // W):
            has = cur >= 0
            cc = cur.clamp(min=0)
            rows = self.anc[cc]
            m.scatter_(1, torch.where(has[:, None] & (rows >= 0), rows, K), True)
            cur = torch.where(has, self.block_parent[cc], cur)
        m = m[:, :K]
        if self.mask_kind == "float":
            mask = torch.zeros((F, K), dtype=self.dtype, device=dev)
            mask.masked_fill_(~m, torch.finfo(self.dtype).min)
        else:
            mask = m
        mask = mask[None, None]

        position_ids = torch.as_tensor(P + depths - 1, dtype=torch.long).to(dev)[None]
        input_ids = torch.as_tensor(tokens, dtype=torch.long).to(dev)[None]
        logits = self.runner(input_ids, self.cache, attention_mask=mask, position_ids=position_ids)[0]

        self.L = L + F
        seq = self.cache.get_seq_length()
        if int(seq) != self.L:  # pragma: no cover - a cache that does not append (static / sliding)
            raise RuntimeError(f"tree cache length {seq} != expected {self.L}: unsupported cache layout")
        self.node_col.update(zip(node_ids.tolist(), new.tolist()))
        self._note_peak()
        return logits

    # ------------------------------------------------------------------------------------------------
    def release(self, node_ids: Sequence[int]) -> None:
        col_ref, col_parent, col_alive = self.col_ref, self.col_parent, self.col_alive
        pop = self.node_col.pop
        for n in node_ids:
            c = pop(int(n), None)
            if c is None:  # the root (the prompt stays until reset) or an unknown id
                continue
            while c >= 0:
                col_ref[c] -= 1
                if col_ref[c] > 0:
                    break
                col_alive[c] = False
                self.dead += 1
                c = int(col_parent[c])
        if self.dead and self.dead >= max(self.compact_min, self.compact_fraction * (self.L - self.P)):
            self.compact()

    def compact(self) -> None:
        """Drop dead columns from every layer's keys/values and remap all column indices."""
        if self.cache is None or self.dead == 0:
            return
        L, P = self.L, self.P
        keep = np.concatenate([np.arange(P, dtype=np.int64), P + np.flatnonzero(self.col_alive[P:L])])
        n = int(len(keep))
        dev = self.device
        idx = torch.as_tensor(keep).to(dev)
        for layer in self.cache.layers:
            keys = getattr(layer, "keys", None)
            if keys is None or keys.numel() == 0:
                continue
            layer.keys = layer.keys.index_select(-2, idx)
            layer.values = layer.values.index_select(-2, idx)
        remap = np.full(L, -1, dtype=np.int64)
        remap[keep] = np.arange(n, dtype=np.int64)
        parent = self.col_parent[keep]
        parent = np.where(parent >= 0, remap[np.maximum(parent, 0)], -1)
        parent[:P] = -1
        self.col_parent[:n] = parent
        self.col_ref[:n] = self.col_ref[keep]
        self.col_alive[:n] = self.col_alive[keep]
        self.col_depth[:n] = self.col_depth[keep]
        self.col_parent[n:L] = -1
        self.col_ref[n:L] = 0
        self.col_alive[n:L] = False
        remap_dev = torch.as_tensor(remap).to(dev)
        a = self.anc[idx]
        self.anc[:n] = torch.where(a >= 0, remap_dev[a.clamp(min=0)], a)
        b = self.block_parent[idx]
        self.block_parent[:n] = torch.where(b >= 0, remap_dev[b.clamp(min=0)], b)
        if self.node_col:
            ks = np.fromiter(self.node_col.keys(), dtype=np.int64, count=len(self.node_col))
            vs = remap[np.fromiter(self.node_col.values(), dtype=np.int64, count=len(self.node_col))]
            self.node_col = dict(zip(ks.tolist(), vs.tolist()))
        self.L = n
        self.dead = 0
        self.compactions += 1
