"""One canopy on a Ray cluster: its shards (:mod:`canopy_rs.drivers.shards`) as Ray actor calls. Ray, an
optional dependency, comes in with :mod:`canopy_rs.drivers.ray_pool`.

The first actor expands the canopy's head breadth-first until a depth holds several shards per worker and
returns the head's sums and the shards, most probable first; every actor then takes shards as it finishes
the last (largest first), and the driver merges the partial results as they arrive. Each actor builds its
model once (``model_factory()`` on the actor, so a large model is loaded there rather than pickled; or
``model`` itself, pickled, for a plain callable). A worker that dies has its shard redone on a fresh actor
(a shard's result does not depend on where it ran); Ctrl-C returns the bracket of what came back, with every
outstanding shard bounded by its root's terms.

Enumerating, the shards go out in bundles (about ``shards_per_worker`` per worker, balanced by reach mass;
a worker runs a bundle's shards in turn, so many small subtrees cost one round trip), and a bundle that
outgrows its share (``resplit_nodes`` expanded nodes) hands back its sums so far and its pending subtrees,
which are bundled again and go to the front of the queue: one subtree far larger than its reach suggested
does not leave the other workers idle. Bracketing (``budget``), the budget left after
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

__all__ = ["run_ray", "bundle", "resplit_threshold", "SHARDS_PER_WORKER", "RESPLIT_FACTOR", "MIN_RESPLIT_NODES",
           "DEFAULT_RESPLIT_NODES"]

# Shards per worker the head is split into (more evens out the load; each costs one prefix walk).
SHARDS_PER_WORKER = 4
# An enumerated shard is split again once it has expanded this many times its share of the canopy's
# estimated size, so no uninterrupted piece of work is longer than half the ideal run (factor over shards
# per worker); never below MIN_RESPLIT_NODES (each re-split costs a round trip and a prefix walk per
# pending subtree), and DEFAULT_RESPLIT_NODES when there is no estimate.
RESPLIT_FACTOR = 2
MIN_RESPLIT_NODES = 10_000
DEFAULT_RESPLIT_NODES = 1_000_000


@dataclass(frozen=True)
class _Job:
    """One call: enumerate a bundle of shards (``budget`` None; handed back past ``resplit`` expanded nodes)
    or bracket one shard within ``budget`` (its seconds, if any, run to the driver's wall-clock
    ``deadline``)."""

    index: int
    shards: tuple[Shard, ...]
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
    """The job's partial, and the subtrees it hands back unrun (to be bundled again)."""
    model, kw = state
    if job.budget is None:
        parts: list[PartialCanopy] = []
        left = job.resplit
        for k, shard in enumerate(job.shards):
            if left is None:
                parts.append(run_shard(model, shard, **kw))
                continue
            part, rest = run_shard_or_split(model, shard, max_expanded=left, **kw)
            parts.append(part)
            left -= int(part.partial.bounds()["num_expanded"])
            if rest or left <= 0:
                return merge_partials(parts), rest + list(job.shards[k + 1:])
        return merge_partials(parts), []
    budget = job.budget
    if job.deadline is not None:  # time.time(): comparable across the cluster's machines, unlike perf_counter
        budget = dataclasses.replace(budget, seconds=max(job.deadline - time.time(), 1e-6))
    (shard,) = job.shards
    return run_shard(model, shard, budget=budget, order=job.order, support_cap=job.support_cap, **kw), []


def bundle(shards: list[Shard], n: int) -> list[tuple[Shard, ...]]:
    """``shards`` in at most ``n`` bundles of about equal reach mass (each shard to the lightest bundle so
    far, most probable first), the heaviest bundle first."""
    bins: list[tuple[float, list[Shard]]] = [(0.0, []) for _ in range(max(1, min(n, len(shards))))]
    for s in sorted(shards, key=lambda s: -s.log_reach):
        k = min(range(len(bins)), key=lambda i: bins[i][0])
        bins[k] = (bins[k][0] + s.reach, bins[k][1] + [s])
    return [tuple(b) for _, b in sorted(bins, key=lambda b: -b[0]) if b]


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
    if budget is not None and not isinstance(budget, Budget):
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
            bundles = bundle(shards, pool.num_workers * shards_per_worker)
            jobs = [_Job(i, b, resplit=resplit) for i, b in enumerate(bundles)]
        else:
            deadline = None if budget.seconds is None else t0 + budget.seconds
            bundles = [(s,) for s in shards]
            jobs = [_Job(i, (s,), b, deadline, order or "best-first", support_cap)
                    for i, (s, b) in enumerate(zip(shards, _shard_budgets(budget, head, shards)))]
        done: dict[int, PartialCanopy] = {}

        def bracket() -> PartialCanopy:
            f = head.info  # the canopy as the head's run saw it (the backend's vocabulary and EOS ids)
            policy = Policy(f.temperature, f.top_k, f.top_p)
            rest = [unexpanded(s, head, vocab_size=f.vocab_size, eos_token_ids=f.eos_token_ids,
                               max_new_tokens=f.max_new_tokens, policy=policy, support_cap=support_cap)
                    for i in range(len(bundles)) if i not in done for s in bundles[i]]
            return merge_partials([head, *done.values(), *rest])

        try:
            if progress is not None:
                progress(snapshot(bracket(), "progress"))
            for job, (part, rest), _w in pool.imap(_run, jobs):  # most probable first
                done[job.index] = part
                # What a bundle handed back runs next, bundled again, the heaviest bundle first: in as many
                # bundles as there are workers without queued work (at least 2), so that the queue, and the
                # round trips, grow only when workers would otherwise idle.
                if rest:
                    queued = len(bundles) - len(done) - (pool.num_workers - 1)
                    again = bundle(rest, max(2, pool.num_workers - max(0, queued)))
                    for k in reversed(range(len(again))):
                        pool.add(dataclasses.replace(job, index=len(bundles) + k, shards=again[k]), first=True)
                    bundles.extend(again)
                if progress is not None:
                    progress(snapshot(bracket(), "progress"))
        except KeyboardInterrupt:
            # Leaving the pool kills the busy actors (their calls cannot be cancelled).
            return dataclasses.replace(bracket(), stopped_by="interrupt"), False
    merged = merge_partials([head] + [done[i] for i in range(len(bundles))])
    if budget is not None:
        stopped = [done[i].stopped_by for i in range(len(bundles)) if done[i].stopped_by]
        merged = dataclasses.replace(merged, stopped_by=stopped[0] if stopped else None)
    return merged, True
