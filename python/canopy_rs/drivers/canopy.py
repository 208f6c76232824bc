"""The canopy loop (:class:`TreeRun`), behind ``exact``, ``bounded`` and the hybrid's head, and the public
:class:`Budget` that stops it::

    tree.next_batch -> backend.expand -> tree.ingest_* -> backend.release(tree.take_released())
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

from canopy_rs._core import Tree
from canopy_rs.backends.output import blame_backend, expand_checked
from canopy_rs.drivers.progress import ProgressBar, bracket_postfix
from canopy_rs.drivers.setup import DEFAULT_MAX_NODES, Setup, check_positive_int, counters, describe, model_tokens
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.protocol import NextTokenLogits, NodeBatch
from canopy_rs.results import CanopyBounds, CanopyResult, RunInfo

__all__ = ["Budget", "TreeRun"]

# Best-first batches take at most 1/BEST_FIRST_SHARE of the frontier.
BEST_FIRST_SHARE = 4
# Approximate arena bytes per stored node (parent, token, depth, log pi, path entropy, h, flags).
ARENA_BYTES_PER_NODE = 48


@dataclass(frozen=True)
class Budget:
    """Stop expanding when any limit is reached: expanded ``nodes``, model ``tokens`` forwarded (the prompt
    excluded: ``model_tokens``), wall ``seconds``, or ``memory_bytes`` (engine arena plus the backend's
    reported ``kv_bytes``)."""

    nodes: Optional[int] = None
    tokens: Optional[int] = None
    seconds: Optional[float] = None
    memory_bytes: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("nodes", "tokens", "seconds", "memory_bytes"):
            v = getattr(self, name)
            if v is not None and not (v > 0):
                raise InvalidArgumentError(f"budget {name} must be > 0, got {v}")
        if all(getattr(self, n) is None for n in ("nodes", "tokens", "seconds", "memory_bytes")):
            raise InvalidArgumentError("budget: set at least one of nodes, tokens, seconds, memory_bytes")


class TreeRun:
    """One expansion of one canopy: the Rust tree, the backend, counters and progress."""

    def __init__(
        self,
        s: Setup,
        *,
        order: str,
        beam_width: Optional[int] = None,
        max_nodes: int = DEFAULT_MAX_NODES,
        record_nodes: bool = False,
        support_cap: Optional[int] = None,
        progress: Union[bool, Callable[[CanopyBounds], None]] = False,
        progress_interval: float = 0.5,
        streaming: bool = False,
        root: Optional[tuple[tuple[int, ...], float, float]] = None,
    ) -> None:
        self.setup = s
        self.backend = s.backend
        self.order = order
        # The core says whether order needs or forbids beam_width; this checks the type.
        self.beam_width = None if beam_width is None else check_positive_int("beam_width", beam_width)
        self.record_nodes = record_nodes
        self.tree = Tree(
            s.vocab_size,
            list(s.eos_token_ids),
            s.max_new_tokens,
            s.policy,
            order=order,
            beam_width=self.beam_width,
            max_nodes=check_positive_int("max_nodes", max_nodes),
            record_nodes=record_nodes,
            support_cap=support_cap,
            streaming=streaming,
            root=None if root is None else (list(root[0]), float(root[1]), float(root[2])),
        )
        self.callback = progress if callable(progress) else None
        self.bar = ProgressBar(progress is True, desc="canopy", unit="node")
        self.reporting = progress is True or self.callback is not None
        self.progress_interval = progress_interval
        self.seconds = 0.0
        self.peak_kv = 0

    def counters(self) -> dict[str, float]:
        c = counters(self.backend)
        self.peak_kv = max(self.peak_kv, int(c.get("peak_live_kv_tokens", 0)))
        return c

    def info(self) -> RunInfo:
        c, s = self.counters(), self.setup
        return RunInfo(
            vocab_size=s.vocab_size,
            eos_token_ids=s.eos_token_ids,
            max_new_tokens=s.max_new_tokens,
            temperature=s.policy.temperature,
            top_k=s.policy.top_k,
            top_p=s.policy.top_p,
            order=self.order,
            beam_width=self.beam_width,
            model_calls=int(c.get("model_calls", 0)),
            rows_evaluated=int(c.get("rows_evaluated", 0)),
            tokens_forwarded=int(c.get("tokens_forwarded", 0)),
            prompt_tokens=int(c.get("prompt_tokens", 0)),
            model_tokens=int(model_tokens(c)),
            peak_live_kv_tokens=self.peak_kv,
            seconds=self.seconds,
            **describe(self.backend),
        )

    def bounds(self, stopped_by: str) -> CanopyBounds:
        b = self.tree.bounds()
        for k in ("num_expanded", "frontier_size", "num_nodes"):
            b[k] = int(b[k])
        return CanopyBounds(**b, stopped_by=stopped_by, info=self.info())

    def result(self) -> CanopyResult:
        r = self.tree.result()
        r.pop("engine_calls")
        nodes = self.tree.nodes() if self.record_nodes else None
        return CanopyResult(**r, info=self.info(), nodes=nodes)

    def _budget_hit(self, budget: Optional[Budget], start: float) -> Optional[str]:
        if budget is None:
            return None
        if budget.nodes is not None and self.tree.num_expanded >= budget.nodes:
            return "nodes"
        if budget.seconds is not None and time.perf_counter() - start >= budget.seconds:
            return "seconds"
        if budget.tokens is not None or budget.memory_bytes is not None:
            c = self.counters()
            if budget.tokens is not None and model_tokens(c) >= budget.tokens:
                return "tokens"
            if budget.memory_bytes is not None:
                used = self.tree.num_nodes * ARENA_BYTES_PER_NODE + c.get("kv_bytes", 0)
                if used >= budget.memory_bytes:
                    return "memory"
        return None

    def expand(self, budget: Optional[Budget] = None, stop: Optional[Callable[[], bool]] = None,
               max_depth: Optional[int] = None, min_frontier: Optional[int] = None) -> Optional[str]:
        """Resets the backend and expands until the canopy is complete (returns None) or the budget is hit
        (returns which limit), or ``stop()`` (checked before every batch) says so (returns ``"stop"``).
        With ``max_depth`` (breadth-first only) nodes at that depth or deeper are left on the frontier
        (returns ``"depth"`` once only those remain): the head of a split canopy. With ``min_frontier``
        (breadth-first only) it stops the same way at the first depth whose nodes number at least that.
        KeyboardInterrupt propagates with the tree in a consistent state."""
        if (max_depth is not None or min_frontier is not None) and self.order != "breadth-first":
            raise InvalidArgumentError("max_depth and min_frontier need order='breadth-first'")
        tree, backend, policy = self.tree, self.backend, self.setup.policy
        start = time.perf_counter()
        last_report = start
        backend.reset()
        try:
            while not tree.is_done:
                hit = self._budget_hit(budget, start)
                if hit is not None:
                    return hit
                if stop is not None and stop():
                    return "stop"
                rows = self.setup.batch_size
                if self.order == "best-first":
                    # Popping the whole frontier at once would be breadth-first: take only its best share,
                    # so the batch stays close to the exact priority order while still growing wide.
                    rows = min(rows, max(1, tree.frontier_size // BEST_FIRST_SHARE))
                if budget is not None and budget.nodes is not None:
                    rows = min(rows, budget.nodes - tree.num_expanded)
                if max_depth is not None or min_frontier is not None:
                    # The queue holds nodes in depth order, shallowest first; batches stop at each depth.
                    depths = tree.frontier()[3]
                    level = int(depths.min())
                    if max_depth is not None and level >= max_depth:
                        return "depth"
                    if min_frontier is not None and len(depths) >= min_frontier and level == int(depths.max()):
                        return "depth"
                    rows = min(rows, int((depths == level).sum()))
                ids, parents, tokens, depths = tree.next_batch(rows)
                batch = NodeBatch(ids, parents, tokens, depths, lambda ids=ids: tree.prefixes(ids))
                out = expand_checked(backend, batch, policy)
                with blame_backend(backend):
                    if isinstance(out, NextTokenLogits):
                        tree.ingest_logits(out.logits)
                    else:
                        tree.ingest_support(out.offsets, out.tokens, out.logprobs)
                released = tree.take_released()
                if len(released):
                    backend.release(released)
                now = time.perf_counter()
                if self.reporting and now - last_report >= self.progress_interval:
                    last_report = now
                    self._report(now - start)
            return None
        finally:
            self.seconds += time.perf_counter() - start
            self.counters()
            if self.reporting:
                self._report(self.seconds)
            self.bar.close()

    def _report(self, elapsed: float) -> None:
        b = self.bounds("progress")
        if self.callback is not None:
            self.callback(b)
        self.bar.show(b.num_expanded, bracket_postfix(b, elapsed))
