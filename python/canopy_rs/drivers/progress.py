"""Progress display: the one tqdm wrapper (:class:`ProgressBar`) and what a canopy bar shows."""

from __future__ import annotations

import time
from typing import Any, Optional

# Steps of a bar over probability mass (its total is 1).
MASS_STEPS = 1000


class ProgressBar:
    """The one tqdm wrapper (a no-op when disabled): ``update(n)`` adds, ``show(n, postfix)`` sets."""

    def __init__(self, enabled: bool, *, desc: str, unit: str, total: Optional[int] = None, file: Any = None) -> None:
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError as e:  # tqdm ships with the [hf] and [demo] extras
                raise ImportError("progress=True needs tqdm: pip install tqdm") from e
            self._bar = tqdm(desc=desc, unit=unit, total=total, smoothing=0.1, file=file, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def show(self, n: int, postfix: dict[str, str]) -> None:
        if self._bar is not None:
            self._bar.n = n
            self._bar.set_postfix(postfix, refresh=True)

    def finish(self) -> None:
        """Marks the work done: a total that was an upper bound (rollouts that ended early) becomes the count
        reached, so the bar ends at 100%."""
        if self._bar is not None:
            self._bar.total = self._bar.n
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def bracket_postfix(b: Any, elapsed: float) -> dict[str, str]:
    """What a canopy progress bar shows for a bracket snapshot."""
    return {
        "nodes/s": f"{b.num_expanded / max(elapsed, 1e-9):,.0f}",
        "mass": f"{b.explored_mass:.4f}",
        "CE*": f"[{b.ce_star_lower:.4f}, {b.ce_star_upper:.4f}]",
        "width": f"{b.ce_star_upper - b.ce_star_lower:.2e}",
    }


def mass_steps(mass: float) -> int:
    """The steps (of :data:`MASS_STEPS`) a mass covered fills; a finished canopy's mass is 1 up to rounding
    in its sum, which still fills the bar."""
    return min(MASS_STEPS, max(0, int(float(mass) * MASS_STEPS + 1e-6)))


class MassProgress:
    """A ``progress=`` callback for a run whose node count is unknown until the end (one canopy on Ray): a
    bar over the reach mass covered towards 1 (the canopy is done when all of it is), the nodes expanded
    and the bracket beside it. ``n`` is the steps shown (of :data:`MASS_STEPS`)."""

    def __init__(self, enabled: bool, *, desc: str = "canopy", file: Any = None) -> None:
        self.bar = ProgressBar(enabled, desc=desc + " (mass covered)", unit="", total=MASS_STEPS, file=file)
        self.t0 = time.perf_counter()
        self.n = 0

    def __call__(self, b: Any) -> None:
        self.n = mass_steps(b.explored_mass)
        postfix = bracket_postfix(b, time.perf_counter() - self.t0)
        self.bar.show(self.n, {"nodes": f"{int(b.num_expanded):,}", **postfix})

    def close(self) -> None:
        self.bar.close()
