"""Estimators of canopy entropy from samples, their pooling across prompts, and the estimator study.

* :func:`estimate` - per-prompt Monte Carlo estimates from :func:`canopy_rs.sample` rollouts (step-entropy
  / Rao-Blackwellised and surprisal / naive CE*_max, E[N], GenPPL, BF, rho(N, r_N), decomposition, ...);
* :func:`pool` and :func:`paired_bootstrap` - the reference code's aggregation over prompts and its paired
  base-vs-fine-tuned bootstrap;
* :func:`stochastic_beam_search` - Gumbel-top-k sampling without replacement with importance weights;
* :func:`estimate_hybrid` - exact best-first head plus sampled tail (:data:`RECOMMENDED` configuration);
  :func:`estimate_stratified` - stratified rollouts from the root that spend a token budget;
* :func:`estimate_best` - the estimator the study recommends for a token budget (:func:`best_estimator`);
* :func:`compare` - every estimator, repeated, against the exact value: bias, SD, RMSE, coverage, cost.
"""

from .beam import BeamSearchEstimate, stochastic_beam_search
from .best import BEST_BY_BUDGET, BestEstimate, best_estimator, estimate_best
from .bootstrap import DEFAULT_BOOTSTRAP_METRICS, SEMANTIC_BOOTSTRAP_METRICS, BootstrapResult, paired_bootstrap
from .hybrid import RECOMMENDED, HybridEstimate, estimate_hybrid, estimate_stratified
from .montecarlo import PromptEstimate, estimate, estimate_arrays
from .pooling import PooledEstimate, pool
from .comparison import BUILTIN_ESTIMATORS, ComparisonResult, compare

__all__ = [
    "BEST_BY_BUDGET",
    "BUILTIN_ESTIMATORS",
    "BestEstimate",
    "best_estimator",
    "estimate_best",
    "BeamSearchEstimate",
    "BootstrapResult",
    "DEFAULT_BOOTSTRAP_METRICS",
    "HybridEstimate",
    "PooledEstimate",
    "PromptEstimate",
    "SEMANTIC_BOOTSTRAP_METRICS",
    "ComparisonResult",
    "compare",
    "estimate",
    "estimate_arrays",
    "estimate_hybrid",
    "estimate_stratified",
    "RECOMMENDED",
    "paired_bootstrap",
    "pool",
    "stochastic_beam_search",
]
