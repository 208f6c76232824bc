"""The Ray executor: units as calls on the package's Ray worker pool (:mod:`canopy_rs.drivers.ray_pool`;
see :mod:`canopy_rs.study.executors`)."""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

from canopy_rs.drivers.ray_pool import WorkerPool

from .config import StudyConfig
from .executors import OnResult, Progress, Say
from .units import Unit, UnitRunner

__all__ = ["run_ray"]


def _run_unit(runner: UnitRunner, unit: Unit) -> dict[str, Any]:
    """One unit on a worker, whose :class:`UnitRunner` outlives its units (so the model stays loaded)."""
    return runner.run(unit)


def run_ray(cfg: StudyConfig, units: Sequence[Unit], on_result: OnResult, say: Say) -> None:
    """Runs the units as Ray actor calls (see the module docstring); ``cfg.ray_address`` picks the cluster
    (``"auto"``, ``"ray://host:10001"``, ...; None: the running Ray of this process, else a new local one).
    An idle worker takes the next unit of the model it holds, and moves to the model with the most units left
    only when its own has none (fewest reloads overall)."""
    with WorkerPool(functools.partial(UnitRunner, cfg), max_workers=len(units),
                    ray_address=cfg.ray_address) as pool:
        say(f"ray: {pool.describe()} for {len(units)} unit(s)")
        holding: dict[int, Optional[str]] = {}

        def pick(worker: int, todo: Sequence[Unit]) -> int:
            mine = [i for i, u in enumerate(todo) if u.model == holding.get(worker)]
            if mine:
                return mine[0]
            left: dict[str, int] = {}
            for u in todo:
                left[u.model] = left.get(u.model, 0) + 1
            holding[worker] = max(left, key=lambda m: left[m])
            return next(i for i, u in enumerate(todo) if u.model == holding[worker])

        progress = Progress(len(units), say)
        for u, out, worker in pool.imap(_run_unit, units, pick=pick):
            progress.loaded(u.model, out.get("load_seconds"), f" (ray worker {worker})", serial=False)
            progress.unit(u, out["record"]["seconds"], f" (ray worker {worker})")
            on_result(out)
