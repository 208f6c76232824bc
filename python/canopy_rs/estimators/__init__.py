"""Estimators of canopy entropy from samples, their pooling across prompts, and the estimator study.

Plain Monte Carlo (:func:`estimate` on :func:`canopy_rs.sample` rollouts), stochastic beam search
(:func:`stochastic_beam_search`), the exact-head + sampled-tail hybrid (:func:`estimate_hybrid`), pooling
(:func:`pool`), the paired bootstrap (:func:`paired_bootstrap`) and the study against exact truth
(:func:`compare`). The model-driving functions import the Rust core lazily, so the pure-numpy parts work
on their own.
"""

from .bootstrap import DEFAULT_BOOTSTRAP_METRICS, BootstrapResult, paired_bootstrap
from .montecarlo import PromptEstimate, estimate, estimate_arrays
from .pooling import PooledEstimate, pool

__all__ = [
    "BootstrapResult",
    "DEFAULT_BOOTSTRAP_METRICS",
    "PooledEstimate",
    "PromptEstimate",
    "estimate",
    "estimate_arrays",
    "paired_bootstrap",
    "pool",
]
