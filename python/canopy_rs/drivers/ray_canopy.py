"""One canopy on a Ray cluster: its shards (:mod:`canopy_rs.drivers.shards`) as Ray actor calls. Ray, an
optional dependency, is imported here and only here.

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
from typing import Any, Callable, Optional

try:
    import ray
    from ray.exceptions import RayActorError
except ImportError:
    raise ImportError('executor="ray" needs Ray: pip install "canopy_rs[ray]"') from None

from canopy_rs._core import Policy
from canopy_rs.drivers.shards import (PartialCanopy, Shard, finish, merge_partials, run_shard, split_budget,
                                      split_canopy, unexpanded)
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.results import CanopyBounds

__all__ = ["run_ray", "ray_init"]

# Shards per worker the head is split into (more evens out the load; each costs one prefix walk).
SHARDS_PER_WORKER = 4


class _ShardWorker:
    """The Ray actor: holds one model for all the shards it runs."""

    def __init__(self, model: Any, model_factory: Optional[Callable[[], Any]], kw: dict[str, Any]) -> None:
        self.model = model_factory() if model_factory is not None else model
        self.kw = kw

    def split(self, min_shards: int) -> tuple[PartialCanopy, list[Shard]]:
        return split_canopy(self.model, min_shards=min_shards, **self.kw)

    def run(self, shard: Shard, budget: Optional[int], support_cap: Optional[int]) -> PartialCanopy:
        kw = dict(self.kw)
        if budget is None:
            return run_shard(self.model, shard, **kw)
        return run_shard(self.model, shard, budget=budget, support_cap=support_cap, **kw)


def ray_init(address: Optional[str]) -> bool:
    """Connects to (or starts) Ray; True when this call started it (so the caller shuts it down again). The
    one Ray start-up of the package: the canopy's shards and the study's units both use it."""
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
    if address:
        kw.pop("include_dashboard")
        ray.init(address=address, **kw)
    else:
        ray.init(**kw)
    return True


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
    started = ray_init(ray_address)
    try:
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        slots = gpus if gpus >= 1 else max(1, int(res.get("CPU", 1)))
        n = max(1, num_workers or slots)
        opts: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpus >= 1 else {"num_cpus": 1}
        actor_cls = ray.remote(**opts)(_ShardWorker)
        make = lambda: actor_cls.remote(model if model_factory is None else None, model_factory, kw)  # noqa: E731
        actors = [make() for _ in range(n)]
        head, shards = ray.get(actors[0].split.remote(n * shards_per_worker))
        budgets: list[Optional[int]] = [None] * len(shards)
        if budget is not None:
            left = max(len(shards), budget - int(head.partial.bounds()["num_expanded"]))
            budgets = list(split_budget(left, shards))
        done: dict[int, PartialCanopy] = {}
        todo = list(range(len(shards)))  # most probable (largest) first
        pending: dict[Any, tuple[int, int]] = {}  # ref -> (actor index, shard index)

        def submit(a: int) -> None:
            if todo:
                i = todo.pop(0)
                pending[actors[a].run.remote(shards[i], budgets[i], support_cap)] = (a, i)

        def bracket() -> PartialCanopy:
            f = head.info  # the canopy as the head's run saw it (the backend's vocabulary and EOS ids)
            policy = Policy(f.temperature, f.top_k, f.top_p)
            rest = [unexpanded(shards[i], head, vocab_size=f.vocab_size, eos_token_ids=f.eos_token_ids,
                               max_new_tokens=f.max_new_tokens, policy=policy, support_cap=support_cap)
                    for i in range(len(shards)) if i not in done]
            return merge_partials([head, *done.values(), *rest])

        for a in range(n):
            submit(a)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                a, i = pending.pop(ready[0])
                try:
                    done[i] = ray.get(ready[0])
                except RayActorError:
                    # The worker died: a fresh actor redoes the shard (its result does not depend on where).
                    actors[a] = make()
                    todo.insert(0, i)
                submit(a)
                if progress is not None:
                    b = finish(bracket())
                    if isinstance(b, CanopyBounds):
                        progress(b)
        except KeyboardInterrupt:
            # Actor tasks cannot be force-cancelled: the busy actors are killed instead.
            for a_busy in {a for a, _ in pending.values()}:
                ray.kill(actors[a_busy])
            return bracket(), False
        merged = merge_partials([head] + [done[i] for i in range(len(shards))])
        if budget is not None:
            stopped = [done[i].stopped_by for i in range(len(shards)) if done[i].stopped_by]
            merged = dataclasses.replace(merged, stopped_by=stopped[0] if stopped else None)
        return merged, True
    finally:
        if started:
            ray.shutdown()

