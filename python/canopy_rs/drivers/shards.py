"""One canopy split into subtrees (shards) whose partial results merge exactly.

CE* and every leaf statistic are sums over disjoint parts of the canopy (``docs/definitions.md``), so a
canopy can be enumerated in pieces: :func:`split_canopy` expands its *head* breadth-first down to a depth and
hands back the head's sums and the frontier nodes below it, each a :class:`Shard` (its prefix, log reach and
path entropy); :func:`run_shard` enumerates (or, with a budget, brackets) the subtree below one shard in any
process; :func:`merge_partials` adds the partial sums (compensated sums, length pmf, leaf moments), and
:func:`finish` turns them into the same :class:`~canopy_rs.results.CanopyResult` as one run (up to the order
of summation), or a :class:`~canopy_rs.results.CanopyBounds` whose bracket is the sum of the shards'
certified brackets. A shard's run first walks the backend down its prefix (one row per token, counted in
the cost but not in the sums), so any backend serves it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

from canopy_rs._core import Partial, Policy, Tree
from canopy_rs.drivers.canopy import Budget, TreeRun
from canopy_rs.drivers.setup import DEFAULT_MAX_NODES, check_positive_int, setup
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.results import CanopyBounds, CanopyResult, RunInfo

__all__ = ["Shard", "PartialCanopy", "split_canopy", "run_shard", "run_shard_or_split", "merge_partials", "finish",
           "snapshot", "split_budget", "unexpanded"]

# Counters that add across shards; peak_live_kv_tokens is a maximum.
_ADDED = ("model_calls", "rows_evaluated", "tokens_forwarded", "prompt_tokens", "seconds")


@dataclass(frozen=True)
class Shard:
    """The subtree below one node of the canopy: its generated-token ``prefix``, ``log_reach`` (log pi) and
    ``path_entropy`` (the step entropies summed over its strict ancestors), as the head computed them."""

    prefix: tuple[int, ...]
    log_reach: float
    path_entropy: float

    @property
    def depth(self) -> int:
        return len(self.prefix)

    @property
    def reach(self) -> float:
        return math.exp(self.log_reach)


@dataclass(frozen=True)
class PartialCanopy:
    """The sums of one run over part of a canopy (``partial``, a picklable :class:`canopy_rs._core.Partial`)
    with its cost record; ``stopped_by`` is the budget that stopped a bracketing run, else None."""

    partial: Partial
    info: RunInfo
    stopped_by: Optional[str] = None

    def merge(self, other: "PartialCanopy") -> "PartialCanopy":
        """The sums of both parts (disjoint parts of the same canopy)."""
        a, b = self.info, other.info
        info = dataclasses.replace(a, **{k: getattr(a, k) + getattr(b, k) for k in _ADDED},
                                   peak_live_kv_tokens=max(a.peak_live_kv_tokens, b.peak_live_kv_tokens))
        return PartialCanopy(self.partial.merge(other.partial), info, self.stopped_by or other.stopped_by)

    @property
    def frontier_size(self) -> int:
        return int(self.partial.bounds()["frontier_size"])


def _setup(model: Any, kw: dict[str, Any]) -> Any:
    return setup(model, vocab_size=kw.get("vocab_size"), eos_token_ids=kw.get("eos_token_ids"),
                 max_new_tokens=kw["max_new_tokens"], temperature=kw.get("temperature", 1.0),
                 top_k=kw.get("top_k"), top_p=kw.get("top_p", 1.0), batch_size=kw.get("batch_size"))


def split_canopy(model: Any, *, depth: Optional[int] = None, min_shards: Optional[int] = None,
                 max_nodes: int = DEFAULT_MAX_NODES, **policy: Any) -> tuple[PartialCanopy, list[Shard]]:
    """Expands the head of ``model``'s canopy (every internal node above ``depth``, or above the first
    depth holding at least ``min_shards`` nodes) and returns its sums (without the frontier, which the
    shards cover) and the frontier's nodes as shards, most probable first.
    ``policy`` takes the keywords of :func:`canopy_rs.exact` that define the canopy (``max_new_tokens``,
    ``temperature``, ``top_k``, ``top_p``, ``vocab_size``, ``eos_token_ids``, ``batch_size``). A canopy that
    ends above ``depth`` has no shards: the head is the whole canopy."""
    if (depth is None) == (min_shards is None):
        raise InvalidArgumentError("split_canopy needs exactly one of depth and min_shards")
    depth = None if depth is None else check_positive_int("depth", depth)
    min_shards = None if min_shards is None else check_positive_int("min_shards", min_shards)
    run = TreeRun(_setup(model, policy), order="breadth-first", max_nodes=max_nodes)
    run.expand(max_depth=depth, min_frontier=min_shards)
    shards = [Shard(tuple(p), lr, pe) for p, lr, pe in run.tree.frontier_roots()]
    return PartialCanopy(run.tree.partial(with_frontier=False), run.info()), shards


def run_shard(model: Any, shard: Shard, *, budget: Union[int, Budget, None] = None, order: Optional[str] = None,
              max_nodes: int = DEFAULT_MAX_NODES, support_cap: Optional[int] = None,
              **policy: Any) -> PartialCanopy:
    """Enumerates the subtree below ``shard`` (``budget=None``: depth-first and streaming, memory bounded by
    its depth) or expands it within ``budget`` (expanded nodes, or a :class:`Budget`; best-first by
    default). The sums are in the whole canopy's units (pi includes the shard's reach)."""
    if isinstance(budget, int) and not isinstance(budget, bool):
        budget = Budget(nodes=check_positive_int("budget", budget))
    order = order or ("depth-first" if budget is None else "best-first")
    run = TreeRun(_setup(model, policy), order=order, max_nodes=max_nodes, support_cap=support_cap,
                  streaming=order == "depth-first", root=(shard.prefix, shard.log_reach, shard.path_entropy))
    stopped_by = run.expand(budget)
    return PartialCanopy(run.tree.partial(), run.info(), stopped_by)


def run_shard_or_split(model: Any, shard: Shard, *, max_expanded: int, max_nodes: int = DEFAULT_MAX_NODES,
                       **policy: Any) -> tuple[PartialCanopy, list[Shard]]:
    """Enumerates the subtree below ``shard`` depth-first (streaming) like :func:`run_shard`, but stops after
    ``max_expanded`` expanded nodes and hands back, with the sums so far, the subtrees still pending (the
    unexpanded children along its path, most probable first) as shards of their own: a shard far larger
    than expected is split again without losing its work. The returned shards are empty when it finished."""
    run = TreeRun(_setup(model, policy), order="depth-first", max_nodes=max_nodes, streaming=True,
                  root=(shard.prefix, shard.log_reach, shard.path_entropy))
    if run.expand(Budget(nodes=check_positive_int("max_expanded", max_expanded))) is None:
        return PartialCanopy(run.tree.partial(), run.info()), []
    rest = [Shard(tuple(p), lr, pe) for p, lr, pe in run.tree.frontier_roots()]
    return PartialCanopy(run.tree.partial(with_frontier=False), run.info()), rest


def merge_partials(parts: Iterable[PartialCanopy]) -> PartialCanopy:
    """The sums of disjoint parts of one canopy (the head and its shards, in any order or grouping)."""
    it = iter(parts)
    try:
        out = next(it)
    except StopIteration:
        raise InvalidArgumentError("merge_partials needs at least one partial result") from None
    for p in it:
        out = out.merge(p)
    return out


def finish(part: PartialCanopy) -> Union[CanopyResult, CanopyBounds]:
    """The canopy's exact result when every part was enumerated, else the certified bracket (each shard's
    bracket holds for its subtree, so their sum holds for the canopy)."""
    info = dataclasses.replace(part.info, seconds=float(part.info.seconds))
    if part.frontier_size == 0:
        r = part.partial.result()
        r.pop("engine_calls")
        return CanopyResult(**r, info=info, nodes=None)
    return snapshot(part, part.stopped_by or "nodes")


def snapshot(part: PartialCanopy, stopped_by: str) -> CanopyBounds:
    """The bracket of ``part`` as a :class:`CanopyBounds`, also once nothing is left to expand (then it is
    closed: the progress report of a finished run)."""
    info = dataclasses.replace(part.info, seconds=float(part.info.seconds))
    b = part.partial.bounds()
    for k in ("num_expanded", "frontier_size", "num_nodes"):
        b[k] = int(b[k])
    return CanopyBounds(**b, stopped_by=stopped_by, info=info)


def split_budget(nodes: int, shards: Sequence[Shard]) -> list[int]:
    """Splits a budget of ``nodes`` expanded nodes over ``shards`` in proportion to their reach mass (at
    least one node each, so every shard's root is expanded)."""
    mass = math.fsum(s.reach for s in shards)
    if not shards or not mass > 0:
        return [max(1, nodes // max(1, len(shards)))] * len(shards)
    return [max(1, int(nodes * s.reach / mass)) for s in shards]


def unexpanded(shard: Shard, like: PartialCanopy, *, vocab_size: int, eos_token_ids: Sequence[int],
               max_new_tokens: int, policy: Policy, support_cap: Optional[int] = None) -> PartialCanopy:
    """A shard not (yet) run, as a partial: only its root's certified bound terms (its reach, and at most
    ``(T - depth) log S`` nats below it), so a bracket can be given before every shard is back."""
    tree = Tree(vocab_size, list(eos_token_ids), max_new_tokens, policy, support_cap=support_cap,
                root=(list(shard.prefix), shard.log_reach, shard.path_entropy))
    zero = {k: 0 for k in _ADDED} | {"peak_live_kv_tokens": 0}
    return PartialCanopy(tree.partial(), dataclasses.replace(like.info, **zero), "interrupt")
