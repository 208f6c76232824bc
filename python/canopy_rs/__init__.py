"""canopy_rs: the exact canopy entropy (CE*) of a language model's generation tree, certified brackets when
the tree is too large, and the Monte Carlo estimators everyone uses, judged against that truth.

Quick use::

    import canopy_rs
    res = canopy_rs.exact(logits_fn, vocab_size=V, eos_token_ids=[0], max_new_tokens=6, top_k=4)
    res.ce_star, res.expected_length, res.length_rate_corr

Semantic diversity (sampled and exact): :func:`embed`, :func:`semantic_diversity`, :func:`vendi_score`,
:func:`exact_semantics`, ``estimate(rollouts, embeddings=E)`` (module :mod:`canopy_rs.semantic`).

The top level holds what a newcomer needs; everything else is reachable from its module (e.g.
:mod:`canopy_rs.errors`, :mod:`canopy_rs.protocol`, :mod:`canopy_rs.estimators`, :mod:`canopy_rs.semantic`,
:mod:`canopy_rs.stats`, :mod:`canopy_rs.testing`, :mod:`canopy_rs.study`, :mod:`canopy_rs.plots`).
"""

from __future__ import annotations

from typing import Any

from canopy_rs._core import Policy, __version__
from canopy_rs.api import Budget, bounded, exact
from canopy_rs.backends.callable import CallableModel
from canopy_rs.errors import CanopyError, Interrupted, InvalidArgumentError, StrategyUnsupportedError, TreeTooLargeError
from canopy_rs.estimators import compare, estimate, estimate_best, estimate_hybrid, paired_bootstrap, pool
from canopy_rs.protocol import Backend
from canopy_rs.results import CanopyBounds, CanopyResult
from canopy_rs.sampling import Rollouts, sample
from canopy_rs.semantic import embed, exact_semantics, rollout_texts, semantic_diversity, vendi_score

__all__ = [
    "__version__",
    # the canopy, exactly or bracketed, and Monte Carlo rollouts
    "exact",
    "bounded",
    "Budget",
    "sample",
    "CanopyResult",
    "CanopyBounds",
    "Rollouts",
    # estimators
    "estimate",
    "pool",
    "paired_bootstrap",
    "estimate_hybrid",
    "estimate_best",
    "compare",
    # many prompts, locally or on Ray
    "map_prompts",
    # semantic diversity
    "embed",
    "rollout_texts",
    "semantic_diversity",
    "vendi_score",
    "exact_semantics",
    # the base-vs-fine-tuned study
    "run_study",
    # models and policies
    "Policy",
    "Backend",
    "CallableModel",
    "TransformersModel",
    "load_model",
    # errors
    "CanopyError",
    "InvalidArgumentError",
    "TreeTooLargeError",
    "StrategyUnsupportedError",
    "Interrupted",
]

# Names whose modules import torch or other heavy optional dependencies, or load much: imported on first use
# (the one lazy gate of the package).
_LAZY = {
    "TransformersModel": "canopy_rs.backends.transformers",
    "load_model": "canopy_rs.hf_models",
    "map_prompts": "canopy_rs.drivers.prompts",
    "run_study": "canopy_rs.study",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'canopy_rs' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
