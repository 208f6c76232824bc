"""Where units run: in this process (default) or as Ray actors (:mod:`canopy_rs.study.ray_executor`).

Both executors hand every finished unit to the same ``on_result`` callback as soon as it is done, and the
driver checkpoints it right away: an interrupted study (Ctrl-C, a crashed worker, a lost node) loses no
finished unit, and the rerun resumes from the same keys whichever executor computed them.

Ray: one actor per GPU when the cluster has GPUs (``num_gpus=1`` each), else one per CPU, at most one per
unit. An actor loads a model once and keeps it; the scheduler hands an idle actor the next unit of the model
it already holds, and only moves it to another model when its own has no units left. Actors import
canopy_rs themselves, so every node needs it installed (same version) and the model paths must exist on the
nodes (a shared filesystem, or the same paths on each machine).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .config import StudyConfig
from .units import Unit, UnitRunner

__all__ = ["run_local", "by_model"]

OnResult = Callable[[dict[str, Any]], None]
Say = Callable[[str], None]


def by_model(units: Sequence[Unit]) -> dict[str, list[Unit]]:
    out: dict[str, list[Unit]] = {}
    for u in units:
        out.setdefault(u.model, []).append(u)
    return out


def run_local(cfg: StudyConfig, units: Sequence[Unit], on_result: OnResult, say: Say) -> None:
    """Runs the units in this process, one model at a time (each model loaded once)."""
    runner = UnitRunner(cfg)
    done = 0
    for model, group in by_model(units).items():
        say(f"loading {model} ...")
        for u in group:
            out = runner.run(u)
            done += 1
            say(f"[{done}/{len(units)}] {u.label()}: {out['record']['seconds']:.1f} s")
            on_result(out)
