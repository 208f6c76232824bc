"""The Ray executor: units as Ray actor calls (see :mod:`canopy_rs.study.executors`). Ray, an optional
dependency, is imported here and in :mod:`canopy_rs.drivers.ray_canopy` (whose ``ray_init`` starts it)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

try:
    import ray
except ImportError:
    raise ImportError('executor="ray" needs Ray: pip install "canopy_rs[ray]"') from None

from canopy_rs.drivers.ray_canopy import ray_init

from .config import StudyConfig
from .executors import OnResult, Progress, Say, by_model
from .units import Unit, UnitRunner

__all__ = ["run_ray"]


class _Worker:
    """The Ray actor: a :class:`UnitRunner` that outlives its units (so the model stays loaded)."""

    def __init__(self, cfg: StudyConfig) -> None:
        self.runner = UnitRunner(cfg)

    def run(self, unit: Unit) -> dict[str, Any]:
        return self.runner.run(unit)


def run_ray(cfg: StudyConfig, units: Sequence[Unit], on_result: OnResult, say: Say) -> None:
    """Runs the units as Ray actor calls (see the module docstring); ``cfg.ray_address`` picks the cluster
    (``"auto"``, ``"ray://host:10001"``, ...; None: the running Ray of this process, else a new local one)."""
    started = ray_init(cfg.ray_address)
    try:
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        slots = gpus if gpus >= 1 else max(1, int(res.get("CPU", 1)))
        n_workers = max(1, min(slots, len(units)))
        opts: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpus >= 1 else {"num_cpus": 1}
        actor_cls = ray.remote(**opts)(_Worker)
        say(f"ray: {n_workers} worker(s) ({'1 GPU' if gpus >= 1 else '1 CPU'} each) for {len(units)} unit(s)")
        actors = [actor_cls.remote(cfg) for _ in range(n_workers)]
        queues = by_model(units)
        holding: dict[int, Optional[str]] = {i: None for i in range(n_workers)}
        pending: dict[Any, tuple[int, Unit]] = {}

        def next_unit(worker: int) -> Optional[Unit]:
            model = holding[worker]
            if model is None or not queues.get(model):
                # Move to the model with the most units left (fewest reloads overall).
                left = {m: len(q) for m, q in queues.items() if q}
                if not left:
                    return None
                model = max(left, key=lambda m: left[m])
                holding[worker] = model
            return queues[model].pop(0)

        def submit(worker: int) -> None:
            u = next_unit(worker)
            if u is not None:
                pending[actors[worker].run.remote(u)] = (worker, u)

        for w in range(n_workers):
            submit(w)
        progress = Progress(len(units), say)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                worker, u = pending.pop(ready[0])
                out = ray.get(ready[0])
                progress.loaded(u.model, out.get("load_seconds"), f" (ray worker {worker})", serial=False)
                progress.unit(u, out["record"]["seconds"], f" (ray worker {worker})")
                on_result(out)
                submit(worker)
        finally:
            # Killing the actors also drops their unfinished calls (results already saved are kept).
            for a in actors:
                ray.kill(a)
    finally:
        if started:
            ray.shutdown()
