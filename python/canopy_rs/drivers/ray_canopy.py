"""One canopy on a Ray cluster: its shards (:mod:`canopy_rs.drivers.shards`) as Ray actor calls. Ray, an
optional dependency, comes in with :mod:`canopy_rs.drivers.ray_pool`.

The first actor expands the canopy's head breadth-first until a depth holds several shards per worker and
returns the head's sums and the shards, most probable first; every actor then takes shards as it finishes
the last (largest first), and the driver merges the partial results as they arrive. Each actor builds its
model once (``model_factory()`` on the actor, so a large model is loaded there rather than pickled; or
``model`` itself, pickled, for a plain callable). A worker that dies has its shard redone on a fresh actor
(a shard's result does not depend on where it ran); Ctrl-C returns the bracket of what came back, with every
outstanding shard bounded by its root's terms.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

from canopy_rs._core import Policy
from canopy_rs.drivers.ray_pool import WorkerPool
from canopy_rs.drivers.shards import (PartialCanopy, Shard, finish, merge_partials, run_shard, split_budget,
                                      split_canopy, unexpanded)
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.results import CanopyBounds

__all__ = ["run_ray"]

# Shards per worker the head is split into (more evens out the load; each costs one prefix walk).
SHARDS_PER_WORKER = 4


def _shard_state(model: Any, model_factory: Optional[Callable[[], Any]], kw: dict[str, Any]) -> tuple[Any, dict]:
    """What a worker holds: its model (built once there) and the canopy's keywords."""
    return (model_factory() if model_factory is not None else model), kw


def _split(state: tuple[Any, dict], min_shards: int) -> tuple[PartialCanopy, list[Shard]]:
    model, kw = state
    return split_canopy(model, min_shards=min_shards, **kw)


def _run(state: tuple[Any, dict], job: tuple[int, Shard, Optional[int], Optional[int]]) -> PartialCanopy:
    model, kw = state
    _, shard, budget, support_cap = job
    if budget is None:
        return run_shard(model, shard, **kw)
    return run_shard(model, shard, budget=budget, support_cap=support_cap, **kw)


def run_ray(
    model: Any,
    kw: dict[str, Any],
    *,
    model_factory: Optional[Callable[[], Any]] = None,
    budget: Optional[int] = None,
    support_cap: Optional[int] = None,
    ray_address: Optional[str] = None,
    num_workers: Optional[int] = None,
    shards_per_worker: int = SHARDS_PER_WORKER,
    progress: Optional[Callable[[CanopyBounds], None]] = None,
) -> tuple[PartialCanopy, bool]:
    """The merged partial of one canopy run as shards on Ray (``kw``: the canopy's policy keywords, as for
    :func:`~canopy_rs.drivers.shards.split_canopy`), and whether every shard came back (False after
    Ctrl-C). ``budget`` (expanded nodes) brackets instead of enumerating: what the head leaves is split
    over the shards by reach mass."""
    if model is None and model_factory is None:
        raise InvalidArgumentError("executor='ray' needs a model or a model_factory")
    make_state = functools.partial(_shard_state, model if model_factory is None else None, model_factory, kw)
    with WorkerPool(make_state, num_workers=num_workers, ray_address=ray_address) as pool:
        head, shards = pool.call(_split, pool.num_workers * shards_per_worker)
        budgets: list[Optional[int]] = [None] * len(shards)
        if budget is not None:
            left = max(len(shards), budget - int(head.partial.bounds()["num_expanded"]))
            budgets = list(split_budget(left, shards))
        done: dict[int, PartialCanopy] = {}

        def bracket() -> PartialCanopy:
            f = head.info  # the canopy as the head's run saw it (the backend's vocabulary and EOS ids)
            policy = Policy(f.temperature, f.top_k, f.top_p)
            rest = [unexpanded(shards[i], head, vocab_size=f.vocab_size, eos_token_ids=f.eos_token_ids,
                               max_new_tokens=f.max_new_tokens, policy=policy, support_cap=support_cap)
                    for i in range(len(shards)) if i not in done]
            return merge_partials([head, *done.values(), *rest])

        jobs = [(i, shards[i], budgets[i], support_cap) for i in range(len(shards))]  # most probable first
        try:
            for (i, *_), part, _w in pool.imap(_run, jobs):
                done[i] = part
                if progress is not None:
                    b = finish(bracket())
                    if isinstance(b, CanopyBounds):
                        progress(b)
        except KeyboardInterrupt:
            return bracket(), False  # leaving the pool kills the busy actors (their calls cannot be cancelled)
    merged = merge_partials([head] + [done[i] for i in range(len(shards))])
    if budget is not None:
        stopped = [done[i].stopped_by for i in range(len(shards)) if done[i].stopped_by]
        merged = dataclasses.replace(merged, stopped_by=stopped[0] if stopped else None)
    return merged, True
