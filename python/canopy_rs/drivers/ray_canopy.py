"""One canopy on a Ray cluster: its shards (:mod:`canopy_rs.drivers.shards`) as Ray actor calls. Ray, an
optional dependency, comes in with :mod:`canopy_rs.drivers.ray_pool`.

The first actor expands the canopy's head breadth-first until a depth holds several shards per worker and
returns the head's sums and the shards, most probable first; every actor then takes shards as it finishes
the last (largest first), and the driver merges the partial results as they arrive. Each actor builds its
model once (``model_factory()`` on the actor, so a large model is loaded there rather than pickled; or
``model`` itself, pickled, for a plain callable). A worker that dies has its shard redone on a fresh actor
(a shard's result does not depend on where it ran); Ctrl-C returns the bracket of what came back, with every
outstanding shard bounded by its root's terms.

Enumerating, a shard that outgrows its share (``resplit_nodes`` expanded nodes) hands back its sums so far
and its pending subtrees as new shards, which go to the front of the queue: one subtree far larger than
its reach suggested does not leave the other workers idle. Bracketing (``budget``), the budget left after
the head is split over the shards by reach mass, and the shards' certified brackets add up to one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from canopy_rs._core import Policy
from canopy_rs.drivers.canopy import Budget
from canopy_rs.drivers.ray_pool import WorkerPool
from canopy_rs.drivers.setup import check_positive_int
from canopy_rs.drivers.shards import (PartialCanopy, Shard, merge_partials, run_shard, run_shard_or_split, snapshot,
                                      split_budget, split_canopy, unexpanded)
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.results import CanopyBounds

__all__ = ["run_ray", "resplit_threshold", "SHARDS_PER_WORKER", "RESPLIT_FACTOR", "MIN_RESPLIT_NODES",
           "DEFAULT_RESPLIT_NODES"]

# Shards per worker the head is split into (more evens out the load; each costs one prefix walk).
SHARDS_PER_WORKER = 4
# An enumerated shard is split again once it has expanded this many times its share of the canopy's
# estimated size; never below MIN_RESPLIT_NODES (each re-split costs a round trip and a prefix walk per
# pending subtree), and DEFAULT_RESPLIT_NODES when there is no estimate.
RESPLIT_FACTOR = 4
MIN_RESPLIT_NODES = 10_000
DEFAULT_RESPLIT_NODES = 1_000_000


@dataclass(frozen=True)
class _Job:
    """One shard's call: enumerate it (``budget`` None; split again past ``resplit`` expanded nodes) or
    bracket it within ``budget`` (its seconds, if any, run to the driver's wall-clock ``deadline``)."""

    index: int
    shard: Shard
    budget: Optional[Budget] = None
    deadline: Optional[float] = None
    order: Optional[str] = None
    support_cap: Optional[int] = None
    resplit: Optional[int] = None


def _shard_state(model: Any, model_factory: Optional[Callable[[], Any]], kw: dict[str, Any]) -> tuple[Any, dict]:
    """What a worker holds: its model (built once there) and the canopy's keywords."""
    return (model_factory() if model_factory is not None else model), kw


def _split(state: tuple[Any, dict], min_shards: int) -> tuple[PartialCanopy, list[Shard]]:
    model, kw = state
    return split_canopy(model, min_shards=min_shards, **kw)


def _run(state: tuple[Any, dict], job: _Job) -> tuple[PartialCanopy, list[Shard]]:
    """One shard's partial, and the subtrees it hands back to be run as shards of their own."""
    model, kw = state
    if job.budget is None:
        if job.resplit is None:
            return run_shard(model, job.shard, **kw), []
        return run_shard_or_split(model, job.shard, max_expanded=job.resplit, **kw)
    budget = job.budget
    if job.deadline is not None:  # time.time(): comparable across the cluster's machines, unlike perf_counter
        budget = dataclasses.replace(budget, seconds=max(job.deadline - time.time(), 1e-6))
    return run_shard(model, job.shard, budget=budget, order=job.order, support_cap=job.support_cap, **kw), []


def resplit_threshold(size_estimate: Optional[float], num_shards: int) -> int:
    """Expanded nodes past which an enumerated shard is split again: :data:`RESPLIT_FACTOR` times a shard's
    share of ``size_estimate`` (the canopy's estimated nodes, e.g. the size probe's), at least
    :data:`MIN_RESPLIT_NODES`; :data:`DEFAULT_RESPLIT_NODES` without an estimate."""
    if size_estimate is None or not math.isfinite(size_estimate):
        return DEFAULT_RESPLIT_NODES
    share = RESPLIT_FACTOR * size_estimate / max(1, num_shards)
    return int(min(max(MIN_RESPLIT_NODES, share), 2**62))


def _shard_budgets(budget: Budget, head: PartialCanopy, shards: list[Shard]) -> list[Budget]:
    """What the head left of ``budget``'s nodes and tokens, split over the shards by reach mass (at least one
    node and token each); seconds are the run's wall clock (a deadline), memory is per run."""
    n = len(shards)
    nodes: list[Optional[int]] = [None] * n
    tokens: list[Optional[int]] = [None] * n
    if budget.nodes is not None:
        nodes = list(split_budget(max(n, budget.nodes - int(head.partial.bounds()["num_expanded"])), shards))
    if budget.tokens is not None:
        tokens = list(split_budget(max(n, budget.tokens - int(head.info.model_tokens)), shards))
    return [Budget(nodes=nodes[i], tokens=tokens[i], seconds=budget.seconds, memory_bytes=budget.memory_bytes)
            for i in range(n)]


def run_ray(
    model: Any,
    kw: dict[str, Any],
    *,
    model_factory: Optional[Callable[[], Any]] = None,
    budget: Union[int, Budget, None] = None,
    order: Optional[str] = None,
    support_cap: Optional[int] = None,
    ray_address: Optional[str] = None,
    num_workers: Optional[int] = None,
    shards_per_worker: int = SHARDS_PER_WORKER,
    resplit_nodes: Optional[int] = None,
    size_estimate: Optional[float] = None,
    progress: Optional[Callable[[CanopyBounds], None]] = None,
) -> tuple[PartialCanopy, bool]:
    """The merged partial of one canopy run as shards on Ray (``kw``: the canopy's policy keywords, as for
    :func:`~canopy_rs.drivers.shards.split_canopy`), and whether every shard came back (False after
    Ctrl-C: the bracket, ``stopped_by="interrupt"``).

    ``budget`` (expanded nodes, or a :class:`~canopy_rs.drivers.canopy.Budget`) brackets instead of
    enumerating: what the head leaves of its nodes and tokens is split over the shards by reach mass, each
    shard is expanded in ``order`` (default best-first) and the bracket is the sum of theirs; ``seconds``
    is the whole run's wall clock, ``memory_bytes`` holds for each shard's run. Without a budget, a shard
    that has expanded ``resplit_nodes`` nodes (default: :func:`resplit_threshold` of ``size_estimate``) is
    split again. ``progress`` receives the merged bracket after the head and after every shard."""
    if model is None and model_factory is None:
        raise InvalidArgumentError("executor='ray' needs a model or a model_factory")
    if isinstance(budget, int) and not isinstance(budget, bool):
        budget = Budget(nodes=check_positive_int("budget", budget))
    if budget is None and (order is not None or support_cap is not None):
        raise InvalidArgumentError("order and support_cap shape a bracket: they need a budget")
    if resplit_nodes is not None:
        check_positive_int("resplit_nodes", resplit_nodes)
    t0 = time.time()
    make_state = functools.partial(_shard_state, model if model_factory is None else None, model_factory, kw)
    with WorkerPool(make_state, num_workers=num_workers, ray_address=ray_address) as pool:
        head, shards = pool.call(_split, pool.num_workers * shards_per_worker)
        if budget is None:
            resplit = resplit_nodes or resplit_threshold(size_estimate, len(shards))
            jobs = [_Job(i, s, resplit=resplit) for i, s in enumerate(shards)]
        else:
            deadline = None if budget.seconds is None else t0 + budget.seconds
            jobs = [_Job(i, s, b, deadline, order or "best-first", support_cap)
                    for i, (s, b) in enumerate(zip(shards, _shard_budgets(budget, head, shards)))]
        done: dict[int, PartialCanopy] = {}

        def bracket() -> PartialCanopy:
            f = head.info  # the canopy as the head's run saw it (the backend's vocabulary and EOS ids)
            policy = Policy(f.temperature, f.top_k, f.top_p)
            rest = [unexpanded(shards[i], head, vocab_size=f.vocab_size, eos_token_ids=f.eos_token_ids,
                               max_new_tokens=f.max_new_tokens, policy=policy, support_cap=support_cap)
                    for i in range(len(shards)) if i not in done]
            return merge_partials([head, *done.values(), *rest])

        try:
            if progress is not None:
                progress(snapshot(bracket(), "progress"))
            for job, (part, rest), _w in pool.imap(_run, jobs):  # most probable first
                done[job.index] = part
                # A shard split again: its pending subtrees run next, the most probable first.
                for s in reversed(rest):
                    pool.add(dataclasses.replace(job, index=len(shards), shard=s), first=True)
                    shards.append(s)
                if progress is not None:
                    progress(snapshot(bracket(), "progress"))
        except KeyboardInterrupt:
            # Leaving the pool kills the busy actors (their calls cannot be cancelled).
            return dataclasses.replace(bracket(), stopped_by="interrupt"), False
    merged = merge_partials([head] + [done[i] for i in range(len(shards))])
    if budget is not None:
        stopped = [done[i].stopped_by for i in range(len(shards)) if done[i].stopped_by]
        merged = dataclasses.replace(merged, stopped_by=stopped[0] if stopped else None)
    return merged, True
