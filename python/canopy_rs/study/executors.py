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

import time
from typing import Any, Callable, Optional, Sequence

from .config import StudyConfig
from .units import Unit, UnitRunner

__all__ = ["run_local", "by_model", "Progress"]

OnResult = Callable[[dict[str, Any]], None]
Say = Callable[[str], None]


def by_model(units: Sequence[Unit]) -> dict[str, list[Unit]]:
    out: dict[str, list[Unit]] = {}
    for u in units:
        out.setdefault(u.model, []).append(u)
    return out


def _hms(seconds: float) -> str:
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Progress lines of the executors: a model load with its own time, then per unit its time, the elapsed
    total and an ETA (the wall time per unit so far, model loads left out, times the units left)."""

    def __init__(self, total: int, say: Say) -> None:
        self.total, self.say = total, say
        self.done = 0
        self.t0 = time.perf_counter()
        self.loads = 0.0  # load seconds on the critical path (the local executor's; Ray's overlap)

    def loaded(self, model: str, seconds: Optional[float], where: str = "", serial: bool = True) -> None:
        if seconds is None:
            return
        if serial:
            self.loads += seconds
        self.say(f"loaded {model} in {seconds:.1f} s{where}")

    def unit(self, unit: Unit, seconds: float, where: str = "") -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        per = max(elapsed - self.loads, 0.0) / self.done
        eta = per * (self.total - self.done)
        self.say(f"[{self.done}/{self.total}] {unit.label()}: {seconds:.1f} s{where}; elapsed {_hms(elapsed)}, "
                 f"ETA {_hms(eta)}" + (" (+ model loads)" if self.done < self.total else ""))


def run_local(cfg: StudyConfig, units: Sequence[Unit], on_result: OnResult, say: Say) -> None:
    """Runs the units in this process, one model at a time (each model loaded once, and timed apart)."""
    runner = UnitRunner(cfg)
    progress = Progress(len(units), say)
    for model, group in by_model(units).items():
        say(f"loading {model} ...")
        progress.loaded(model, runner.load(model))
        for u in group:
            out = runner.run(u)
            progress.loaded(model, out.get("load_seconds"))
            progress.unit(u, out["record"]["seconds"])
            on_result(out)
