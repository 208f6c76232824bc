"""A backend that remembers every policy support it has seen, keyed by the generated prefix.

Estimator studies run the same estimator hundreds of times on one model and one prompt. The model is
deterministic, so a node's next-token support is the same in every repeat: :class:`CachedModel` computes it
once and answers later requests from a table, while its counters still report the cost *as if fresh* (one
model call per ``expand``, one row per node, and the tokens the wrapped backend would forward: the whole
generated prefix per row for a callable, which recomputes it, one token per row below the root for a backend
that keeps its parents' state, whose root forwards the prompt), so estimator costs in model tokens, and the
plans of estimators that spend them, are unchanged.

Misses go to the wrapped backend. Stateful backends compute a node on top of its parent's cached state, so a
miss whose parent was answered from the table first re-materialises the ancestor chain in the inner backend
(a fresh inner run: root, then each ancestor level in one batch). Those extra forwards show up only in
``inner_rows`` / ``inner_calls``, never in the reported cost.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from canopy_rs.backends import as_backend
from canopy_rs.backends.callable import CallableModel
from canopy_rs.backends.output import expand_support
from canopy_rs.protocol import NodeBatch, PolicySupport

__all__ = ["CachedModel"]


class CachedModel:
    """Wraps a backend (or a ``logits_fn`` with ``vocab_size``/``eos_token_ids``) with a prefix -> support
    table shared by every run. The table is per decoding policy (temperature, top-k, top-p)."""

    def __init__(self, model: Any, vocab_size: Optional[int] = None, eos_token_ids: Any = None) -> None:
        self.inner = as_backend(model, vocab_size, eos_token_ids)
        # A callable is stateless: fresh, each row forwards its whole prefix.
        self._prefix_cost = isinstance(self.inner, CallableModel)
        self.tables: dict[tuple, dict[tuple, tuple[np.ndarray, np.ndarray]]] = {}
        self.inner_rows = 0
        self.inner_calls = 0
        self.hits = 0
        self.misses = 0
        self.reset()

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    @property
    def eos_token_ids(self):
        return self.inner.eos_token_ids

    def table_size(self) -> int:
        return sum(len(t) for t in self.tables.values())

    def save_tables(self, path: Any) -> None:
        """Write the tables (pickle; a local cache, not an exchange format)."""
        import pickle

        with open(path, "wb") as fh:
            pickle.dump(self.tables, fh, protocol=pickle.HIGHEST_PROTOCOL)

    def load_tables(self, path: Any) -> None:
        """Merge tables written by :meth:`save_tables` for the same model and prompt (only load files you
        wrote: pickle runs code)."""
        import pickle

        with open(path, "rb") as fh:
            for key, table in pickle.load(fh).items():
                self.tables.setdefault(key, {}).update(table)

    def reset(self) -> None:
        self._prefix: dict[int, tuple] = {}  # this run's node id -> generated prefix
        self._parent: dict[int, int] = {}
        self._inner_live: set[int] = set()  # ids whose state the inner backend holds (this inner run)
        self._inner_started = False
        self._calls = 0
        self._rows = 0
        self._tokens = 0

    # --- the inner backend ----------------------------------------------------------------------
    def _inner_expand(self, ids: np.ndarray, policy: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        pre = [self._prefix[int(i)] for i in ids]
        parents = np.array([self._parent[int(i)] for i in ids], dtype=np.int64)
        toks = np.array([p[-1] if p else -1 for p in pre], dtype=np.int64)
        deps = np.array([len(p) for p in pre], dtype=np.int64)
        off, tok, lp, _ = expand_support(self.inner, policy, ids.astype(np.int64), parents, toks, deps,
                                         lambda sl: [list(p) for p in pre[sl]], max(1, len(ids)))
        self.inner_rows += len(ids)
        self.inner_calls += 1
        self._inner_live.update(int(i) for i in ids)
        return [(tok[off[j]:off[j + 1]].copy(), lp[off[j]:off[j + 1]].copy()) for j in range(len(ids))]

    def _materialise(self, missing: list[int], policy: Any) -> None:
        """Make the inner backend hold the parents of ``missing``: a fresh inner run over their ancestor
        chains, one batch per depth."""
        need: set[int] = set()
        for i in missing:
            p = self._parent[i]
            while p >= 0 and p not in need:
                need.add(p)
                p = self._parent[p]
        self.inner.reset()
        self._inner_live = set()
        self._inner_started = True
        by_depth: dict[int, list[int]] = {}
        for i in need:
            by_depth.setdefault(len(self._prefix[i]), []).append(i)
        for d in sorted(by_depth):
            self._inner_expand(np.array(sorted(by_depth[d]), dtype=np.int64), policy)

    # --- the protocol ----------------------------------------------------------------------------
    def expand(self, batch: NodeBatch, policy: Any) -> PolicySupport:
        key = (float(policy.temperature), policy.top_k, float(policy.top_p))
        table = self.tables.setdefault(key, {})
        ids = np.asarray(batch.node_ids, dtype=np.int64)
        parents = np.asarray(batch.parent_ids, dtype=np.int64)
        tokens = np.asarray(batch.tokens, dtype=np.int64)
        rows: list[Optional[tuple[np.ndarray, np.ndarray]]] = []
        missing: list[int] = []
        for j, (i, p, t) in enumerate(zip(ids.tolist(), parents.tolist(), tokens.tolist())):
            pre = () if p < 0 else self._prefix[p] + (t,)
            self._prefix[i] = pre
            self._parent[i] = p
            hit = table.get(pre)
            rows.append(hit)
            if hit is None:
                missing.append(j)
        if missing:
            self.misses += len(missing)
            miss_ids = [int(ids[j]) for j in missing]
            if any(self._parent[i] >= 0 and self._parent[i] not in self._inner_live for i in miss_ids):
                self._materialise(miss_ids, policy)
            elif not self._inner_started:  # this run's first miss is the root
                self.inner.reset()
                self._inner_started = True
            got = self._inner_expand(np.array(miss_ids, dtype=np.int64), policy)
            for j, i, r in zip(missing, miss_ids, got):
                rows[j] = r
                table[self._prefix[i]] = r
        self.hits += len(ids) - len(missing)
        self._calls += 1
        self._rows += len(ids)
        # The root's forward is the prompt's, which model tokens leave out (a callable's root prefix is empty).
        pre = [self._prefix[i] for i in ids.tolist()]
        self._tokens += sum(len(p) for p in pre) if self._prefix_cost else sum(1 for p in pre if p)
        counts = np.array([r[0].shape[0] for r in rows], dtype=np.int64)  # type: ignore[index]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return PolicySupport(offsets, np.concatenate([r[0] for r in rows]),  # type: ignore[index]
                             np.concatenate([r[1] for r in rows]))  # type: ignore[index]

    def release(self, node_ids: np.ndarray) -> None:
        live = [int(i) for i in np.asarray(node_ids).tolist() if int(i) in self._inner_live]
        if live:
            self._inner_live.difference_update(live)
            self.inner.release(np.array(live, dtype=np.int64))

    def counters(self) -> dict[str, float]:
        """The cost of this run as if every node had been computed: ``model_calls`` (one per expand),
        ``rows_evaluated`` (one per node) and ``tokens_forwarded`` (see the module docstring)."""
        return {"model_calls": self._calls, "rows_evaluated": self._rows, "tokens_forwarded": self._tokens}
