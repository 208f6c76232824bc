"""The estimator the evidence recommends for a token budget, run on a model.

``benches/bench_estimators.py`` judges every estimator against exact (or certified) CE*_max on SmolLM2
canopies (depth 6-10, top-k 4 with and without top-p 0.9) and tiny models; its summary
(``benches/results/estimators_summary.md``) is the evidence behind :data:`BEST_BY_BUDGET`. The paper's
estimator (the mean over rollouts of the summed step entropies) is what :func:`canopy_rs.estimate` reports;
:func:`estimate_best` is what to put beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from canopy_rs.drivers.setup import check_positive_int
from canopy_rs.results import to_plain
from canopy_rs.sampling import sample

from .beam import stochastic_beam_search
from .hybrid import estimate_hybrid
from .montecarlo import estimate

__all__ = ["BEST_BY_BUDGET", "BestEstimate", "best_estimator", "estimate_best"]

# (smallest budget in model tokens, estimator): the last entry whose budget is <= the given one wins.
BEST_BY_BUDGET: tuple[tuple[int, str], ...] = ((1, "hybrid"),)

DESCRIPTIONS = {
    "hybrid": "exact best-first head + stratified rollouts from its frontier",
    "mc_rb_stratified": "stratified rollouts, summed step entropies",
    "sbs": "stochastic beam search, node-level inclusion weights",
}


@dataclass(frozen=True)
class BestEstimate:
    """CE*_max from the recommended estimator: ``estimator`` names it, ``detail`` is its own result."""

    estimator: str
    description: str
    budget: int
    ce_star: float
    ce_star_se: float
    ce_star_ci: tuple[float, float]
    cost: dict = field(default_factory=dict)
    detail: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["detail"] = self.detail.to_dict() if hasattr(self.detail, "to_dict") else None
        return to_plain(d)


def best_estimator(budget: int) -> str:
    """The estimator with the lowest RMSE at ``budget`` model tokens in the bench."""
    budget = check_positive_int("budget", budget)
    name = BEST_BY_BUDGET[0][1]
    for lo, est in BEST_BY_BUDGET:
        if budget >= lo:
            name = est
    return name


def estimate_best(model: Any, *, budget: int, seed: Any = None, confidence: float = 0.95, **kw: Any) -> BestEstimate:
    """Run :func:`best_estimator` ``(budget)`` on ``model`` with about ``budget`` model tokens. ``kw`` are the
    model and policy arguments of :func:`canopy_rs.exact` (``max_new_tokens``, ``top_k``, ...)."""
    name = best_estimator(budget)
    if name == "hybrid":
        r: Any = estimate_hybrid(model, budget=budget, seed=seed, confidence=confidence, **kw)
        cost = r.cost
    elif name == "sbs":
        r = stochastic_beam_search(model, beam_size=max(2, budget // kw["max_new_tokens"]), seed=seed,
                                   confidence=confidence, **kw)
        cost = r.cost
    else:  # mc_rb_stratified
        ro = sample(model, num_rollouts=max(2, budget // kw["max_new_tokens"]), seed=seed, stratified=True, **kw)
        r, cost = estimate(ro, confidence=confidence), ro.cost
    ci = tuple(float(x) for x in r.ce_star_ci)
    return BestEstimate(name, DESCRIPTIONS[name], int(budget), float(r.ce_star), float(r.ce_star_se),
                        (ci[0], ci[1]) if len(ci) == 2 else (math.nan, math.nan), dict(cost), r)
