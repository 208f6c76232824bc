"""Per-row caches: one cache row per expanded node, holding the model's whole state after that node.

A forward takes the nodes of one depth (all rows then have the same length, so no padding and no custom mask
are needed: it works for every model whose whole state is in a transformers ``DynamicCache`` of known layer
types, including sliding-window, linear-attention, state-space and hybrid ones). The parents' rows are
gathered into a new cache by :func:`.cache_ops.select_cache_rows` (every attribute of every layer copied by
its declared rule, repeats allowed: k children of one parent take k copies of its row; rows of several chunks
joined by :func:`.cache_ops.concat_caches`), the F children's tokens are forwarded as ``[F, 1]`` at their
explicit positions, and the resulting cache becomes a *chunk* whose rows are the children's states. A chunk lives while one of its rows is unreleased; chunks with many released rows are compacted.

Cost: one token per node after the prompt, but the prompt KV is replicated in every row, so the live KV is
``rows x (P + depth)`` tokens and each forward copies its parents' rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from canopy_rs.errors import InvalidArgumentError

from ._engine import KVEngine, tensor_bytes
from .cache_ops import concat_caches, new_cache, select_cache_rows
from .runner import ModelRunner

__all__ = ["PerRowEngine"]


@dataclass
class _Chunk:
    cache: Any
    depth: int
    node_ids: np.ndarray
    alive: np.ndarray
    n_alive: int
    row_tokens: int  # logical KV tokens per row (P + depth)
    extra: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(len(self.node_ids))


class PerRowEngine(KVEngine):
    name = "per-row"
    budget_fix = "use order='depth-first', a smaller batch_size, strategy='cascade', or raise max_live_kv_tokens"

    def __init__(
        self,
        runner: ModelRunner,
        device: torch.device,
        *,
        max_live_kv_tokens: Optional[int] = None,
        compact_fraction: float = 0.5,
        compact_min_rows: int = 8,
    ):
        super().__init__(runner, device, max_live_kv_tokens=max_live_kv_tokens)
        self.compact_fraction = float(compact_fraction)
        self.compact_min_rows = int(compact_min_rows)
        self._clear()

    def _clear(self) -> None:
        self.chunks: dict[int, _Chunk] = {}
        self.loc: dict[int, tuple[int, int]] = {}
        self.next_chunk = 0
        self._live_tokens = 0

    @property
    def live_kv_tokens(self) -> int:
        """KV tokens held by all chunks (each row holds the prompt and its generated tokens)."""
        return self._live_tokens

    @property
    def live_nodes(self) -> int:
        return len(self.loc)

    def kv_bytes(self) -> int:
        return sum(tensor_bytes(ch.cache) for ch in self.chunks.values())

    def kv_tokens_per_row(self, prompt_len: int, depth: int) -> int:
        return prompt_len + depth

    def _add_chunk(self, cache: Any, depth: int, node_ids: np.ndarray) -> None:
        cid = self.next_chunk
        self.next_chunk += 1
        n = len(node_ids)
        chunk = _Chunk(cache, depth, node_ids.copy(), np.ones(n, dtype=bool), n, self.P + depth)
        self.chunks[cid] = chunk
        for r, nid in enumerate(node_ids.tolist()):
            self.loc[nid] = (cid, r)
        self._live_tokens += n * chunk.row_tokens
        self._note_peak()

    # ------------------------------------------------------------------------------------------------
    def prefill(self, root_id: int, prompt_ids: Sequence[int]) -> torch.Tensor:
        self._start(root_id, prompt_ids)
        cache = new_cache(self.runner.model)
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        positions = torch.arange(len(prompt_ids), device=self.device)[None, :]
        logits = self.runner(ids, cache, position_ids=positions, last_only=True)[:, -1, :]
        self._add_chunk(cache, 0, np.array([root_id], dtype=np.int64))
        return logits

    def expand(
        self, node_ids: np.ndarray, parent_ids: np.ndarray, tokens: np.ndarray, depths: np.ndarray
    ) -> torch.Tensor:
        """Nodes grouped by depth, one forward per depth (parents' rows from every chunk joined); returns
        logits ``[F, V]`` in input order."""
        F = self._check_batch(node_ids, bool(self.chunks))
        if len(set(node_ids.tolist()) & self.loc.keys()):
            raise InvalidArgumentError("node ids in the batch were already expanded in this run")
        locs = []
        for p in parent_ids.tolist():
            loc = self.loc.get(p)
            if loc is None:
                raise InvalidArgumentError(f"parent {p} was never expanded in this run or was already released (per-row)")
            locs.append(loc)
        pchunk = np.array([c for c, _ in locs], dtype=np.int64)
        prow = np.array([r for _, r in locs], dtype=np.int64)
        for c, d in zip(pchunk.tolist(), depths.tolist()):
            if self.chunks[c].depth != d - 1:
                raise InvalidArgumentError("node depths are inconsistent with their parents' depths")

        out: Optional[torch.Tensor] = None
        for d in np.unique(depths).tolist():
            g = np.flatnonzero(depths == d)
            logits = self._forward_group(g, node_ids, pchunk, prow, tokens, int(d))
            if out is None:
                out = torch.empty((F, logits.shape[-1]), dtype=logits.dtype, device=logits.device)
            out[torch.as_tensor(g).to(logits.device)] = logits
        assert out is not None
        return out

    def _forward_group(
        self,
        g: np.ndarray,
        node_ids: np.ndarray,
        pchunk: np.ndarray,
        prow: np.ndarray,
        tokens: np.ndarray,
        depth: int,
    ) -> torch.Tensor:
        B = len(g)
        row_tokens = self.P + depth
        self._check_budget(self._live_tokens + B * row_tokens, f"{len(self.loc)} live rows, batch {B} x {row_tokens} tokens")
        # Gather the parents' rows, chunk by chunk (in order of first appearance), then concatenate.
        order: list[np.ndarray] = []
        parts = []
        for c in dict.fromkeys(pchunk[g].tolist()):
            members = g[pchunk[g] == c]
            order.append(members)
            rows = torch.as_tensor(prow[members]).to(self.device)
            parts.append(select_cache_rows(self.chunks[c].cache, rows))
        members = np.concatenate(order)
        cache = concat_caches(parts)
        input_ids = torch.as_tensor(tokens[members], dtype=torch.long).to(self.device)[:, None]
        # Explicit positions: hybrid models otherwise derive them from the cache's first layer, which for a
        # linear-attention layer has no sequence length (positions would restart at 0).
        positions = torch.full((B, 1), self.P + depth - 1, dtype=torch.long, device=self.device)
        logits = self.runner(input_ids, cache, position_ids=positions)[:, -1, :]
        self._add_chunk(cache, depth, node_ids[members])
        # Return rows in the order of g.
        pos = {int(m): i for i, m in enumerate(members.tolist())}
        back = torch.as_tensor([pos[int(i)] for i in g.tolist()], dtype=torch.long).to(logits.device)
        return logits.index_select(0, back)

    # ------------------------------------------------------------------------------------------------
    def release(self, node_ids: Sequence[int]) -> None:
        touched = set()
        for n in node_ids:
            loc = self.loc.pop(int(n), None)
            if loc is None:
                continue
            cid, r = loc
            ch = self.chunks[cid]
            ch.alive[r] = False
            ch.n_alive -= 1
            touched.add(cid)
        for cid in touched:
            ch = self.chunks[cid]
            dead = ch.rows - ch.n_alive
            if ch.n_alive == 0:
                del self.chunks[cid]
            elif dead >= self.compact_min_rows and dead >= self.compact_fraction * ch.rows:
                self._compact(cid)
        # Dead rows still occupy memory until their chunk is compacted or freed: count them.
        self._live_tokens = sum(ch.rows * ch.row_tokens for ch in self.chunks.values())

    def _compact(self, cid: int) -> None:
        ch = self.chunks[cid]
        keep = np.flatnonzero(ch.alive)
        ch.cache = select_cache_rows(ch.cache, torch.as_tensor(keep).to(self.device))
        ch.node_ids = ch.node_ids[keep]
        ch.alive = np.ones(len(keep), dtype=bool)
        ch.n_alive = len(keep)
        for r, nid in enumerate(ch.node_ids.tolist()):
            self.loc[nid] = (cid, r)
        self.compactions += 1
