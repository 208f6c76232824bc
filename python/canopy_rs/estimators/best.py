"""The estimator the evidence recommends for a token budget and canopy shape, run on a model.

``benches/bench_estimators.py`` judges every estimator against exact (or certified) CE*_max on SmolLM2
canopies (depth 6-10, top-k 4 with and without top-p 0.9), tiny models and synthetic canopies, and
``--summarise`` derives :data:`BEST_TABLE` from its measured results (``benches/results/estimators_summary.json``)
with :func:`derive_best_table`, writing it to ``_best_table.py``. The rule: per canopy shape and measured budget,
the candidate whose worst RMSE ratio (at equal measured tokens) to the best candidate of the same canopy is
smallest over every measured canopy of that shape. A canopy is ``"bushy"`` when its CE*_max / E[N] (nats per
generated token, ``log(gen_ppl)`` of any estimate) is at least :data:`BUSHY_NATS_PER_TOKEN`, else
``"peaked"``; ``shape=None`` uses every canopy.

The paper's estimator (the mean over rollouts of the summed step entropies) is what
:func:`canopy_rs.estimate` reports; :func:`estimate_best` is what to put beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from canopy_rs.drivers.setup import check_positive_int
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.results import to_plain
from canopy_rs.sampling import sample

from ._best_table import BEST_TABLE
from .beam import stochastic_beam_search
from .hybrid import RECOMMENDED, estimate_hybrid, estimate_stratified
from .montecarlo import estimate

__all__ = ["BEST_BY_BUDGET", "BEST_TABLE", "BUSHY_NATS_PER_TOKEN", "CANDIDATES", "BestEstimate", "best_estimator",
           "canopy_shape", "derive_best_table", "estimate_best"]

# Nats per generated token (CE*_max / E[N]) from which a canopy counts as bushy. The measured SmolLM2 sky
# canopies have 0.71-0.87, the haiku ones 0.80-0.86 with top-p 0.9 and 0.96-1.00 without, the tiny Llama
# 1.15, the random callable 1.23 and the synthetic ones 0.69 and 1.32.
BUSHY_NATS_PER_TOKEN = 0.9
SHAPES = ("bushy", "peaked")
# What estimate_best can run, in the order that breaks ties.
CANDIDATES = ("hybrid", "mc_rb_stratified", "sbs", "mc_rb")

# (smallest budget in model tokens, estimator) over every measured canopy: the last entry whose budget is
# <= the given one wins (the first entry below the smallest measured budget).
BEST_BY_BUDGET: tuple[tuple[int, str], ...] = tuple((b, e) for b, e, *_ in BEST_TABLE["any"])

DESCRIPTIONS = {
    "hybrid": "exact best-first head + rollouts from its frontier (depth groups, Neyman allocation)",
    "mc_rb_stratified": "stratified rollouts from the root, summed step entropies, drawn until the budget is used",
    "sbs": "stochastic beam search, node-level inclusion weights",
    "mc_rb": "i.i.d. rollouts, summed step entropies (the paper's estimator)",
}


def canopy_shape(ce_star: float, expected_length: float) -> str:
    """``"bushy"`` when CE*_max / E[N] >= :data:`BUSHY_NATS_PER_TOKEN` nats per token, else ``"peaked"``."""
    if not (expected_length > 0 and math.isfinite(ce_star)):
        raise InvalidArgumentError(f"canopy_shape needs a finite CE*_max and E[N] > 0, got {ce_star}, {expected_length}")
    return "bushy" if ce_star / expected_length >= BUSHY_NATS_PER_TOKEN else "peaked"


def derive_best_table(summary: Iterable[Mapping[str, Any]]) -> dict[str, tuple[tuple[int, str, float, str], ...]]:
    """From the bench's summary (per canopy: ``case``, ``exact`` with ``ce_star`` and ``expected_length``,
    ``rows`` with ``judged``, and ``ratios``: RMSE / plain MC's RMSE at the same measured tokens) to
    ``{shape: ((budget, estimator, worst regret, worst canopy), ...)}`` for the shapes ``"any"``, ``"bushy"``
    and ``"peaked"``. A candidate's regret in a canopy is its ratio over the best candidate's there (1 when
    both enumerated the canopy, RMSE 0; infinite when only the best did); the entry is the candidate with the
    smallest worst regret over the canopies of that shape measured at that budget (ties: the smaller mean
    regret, then :data:`CANDIDATES` order). Cells a bracket could not judge are left out."""
    cells: dict[tuple[str, int], list[tuple[str, dict[str, float]]]] = {}
    for case in summary:
        ex = case["exact"]
        shape = canopy_shape(float(ex["ce_star"]), float(ex["expected_length"]))
        judged = {(r["estimator"], r["budget"]) for r in case["rows"] if r.get("judged", True)}
        by_budget: dict[int, dict[str, float]] = {}
        for r in case["ratios"]:
            if r["estimator"] in CANDIDATES and (r["estimator"], r["budget"]) in judged and math.isfinite(r["ratio"]):
                by_budget.setdefault(int(r["budget"]), {})[r["estimator"]] = float(r["ratio"])
        for b, ratios in by_budget.items():
            for key in ("any", shape):
                cells.setdefault((key, b), []).append((str(case["case"]), ratios))
    table: dict[str, tuple[tuple[int, str, float, str], ...]] = {}
    for key in ("any", *SHAPES):
        entries = []
        for b in sorted(b for k, b in cells if k == key):
            scored = []
            for i, est in enumerate(CANDIDATES):
                if any(est not in ratios for _, ratios in cells[(key, b)]):
                    continue  # not measured in every canopy of this cell: not judged
                regrets = [(_regret(ratios[est], min(ratios.values())), name) for name, ratios in cells[(key, b)]]
                worst, where = max(regrets)
                scored.append((worst, sum(r for r, _ in regrets) / len(regrets), i, est, where))
            if scored:
                worst, _, _, est, where = min(scored)
                entries.append((b, est, round(worst, 4), where))
        if entries:
            table[key] = tuple(entries)
    return table


def _regret(ratio: float, best: float) -> float:
    if best == 0:  # the best candidate enumerated the canopy (RMSE 0)
        return 1.0 if ratio == 0 else math.inf
    return ratio / best


def best_estimator(budget: int, shape: Optional[str] = None) -> str:
    """The estimator :data:`BEST_TABLE` recommends at ``budget`` model tokens for a canopy of ``shape``
    (``"bushy"``, ``"peaked"`` (see :func:`canopy_shape`), or None: every measured canopy)."""
    budget = check_positive_int("budget", budget)
    key = "any" if shape is None else shape
    if key not in BEST_TABLE or key == "any" and shape is not None:
        raise InvalidArgumentError(f"shape must be one of {', '.join(map(repr, SHAPES))} or None, got {shape!r}")
    entries = BEST_TABLE[key]
    name = entries[0][1]
    for lo, est, *_ in entries:
        if budget >= lo:
            name = est
    return name


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


def estimate_best(model: Any, *, budget: int, seed: Any = None, confidence: float = 0.95, shape: Optional[str] = None,
                  estimator: Optional[str] = None, **kw: Any) -> BestEstimate:
    """Run :func:`best_estimator` ``(budget, shape)`` (or ``estimator``, one of :data:`CANDIDATES`) on
    ``model`` with about ``budget`` model tokens. ``kw`` are the model and policy arguments of
    :func:`canopy_rs.exact` (``max_new_tokens``, ``top_k``, ...)."""
    budget = check_positive_int("budget", budget)
    name = best_estimator(budget, shape) if estimator is None else estimator
    if name not in CANDIDATES:
        raise InvalidArgumentError(f"estimator must be one of {', '.join(map(repr, CANDIDATES))}, got {name!r}")
    if "max_new_tokens" not in kw:
        raise InvalidArgumentError("estimate_best needs max_new_tokens=")
    n = max(2, budget // int(kw["max_new_tokens"]))
    # The same configurations the bench measured (compare's "hybrid" and "mc_rb_stratified").
    if name == "hybrid":
        r: Any = estimate_hybrid(model, budget=budget, seed=seed, confidence=confidence, **RECOMMENDED, **kw)
        cost = r.cost
    elif name == "mc_rb_stratified":
        r = estimate_stratified(model, budget=budget, seed=seed, confidence=confidence, **kw)
        cost = r.cost
    elif name == "sbs":
        r = stochastic_beam_search(model, beam_size=n, seed=seed, confidence=confidence, **kw)
        cost = r.cost
    else:  # mc_rb
        ro = sample(model, num_rollouts=n, seed=seed, **kw)
        r, cost = estimate(ro, confidence=confidence), ro.cost
    ci = tuple(float(x) for x in r.ce_star_ci)
    return BestEstimate(name, DESCRIPTIONS[name], int(budget), float(r.ce_star), float(r.ce_star_se),
                        (ci[0], ci[1]) if len(ci) == 2 else (math.nan, math.nan), dict(cost), r)
