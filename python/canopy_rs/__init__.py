"""canopy_rs: the exact canopy entropy (CE*) of a language model's generation tree, certified brackets when
the tree is too large, and the Monte Carlo estimators everyone uses, judged against that truth.

Quick use::

    import canopy_rs
    res = canopy_rs.exact(logits_fn, vocab_size=V, eos_token_ids=[0], max_new_tokens=6, top_k=4)
    res.ce_star, res.expected_length, res.length_rate_corr

Semantic diversity (sampled and exact): :func:`embed`, :func:`semantic_diversity`, :func:`vendi_score`,
:func:`exact_semantics`, ``estimate(rollouts, embeddings=E)`` (module :mod:`canopy_rs.semantic`).
"""

from __future__ import annotations

from typing import Any

from canopy_rs._core import Policy, __version__
from canopy_rs.api import Budget, bounded, exact
from canopy_rs.drivers.setup import make_policy
from canopy_rs.backends import CallableModel, as_backend
from canopy_rs.errors import (
    ArgumentTypeError,
    BackendOutputError,
    CanopyError,
    EngineStateError,
    Interrupted,
    InvalidArgumentError,
    KVBudgetExceededError,
    ModelNotFoundError,
    StudyConfigError,
    TreeAttentionUnsupported,
    TreeTooLargeError,
)
from canopy_rs.estimators import (
    BeamSearchEstimate,
    BestEstimate,
    BootstrapResult,
    HybridEstimate,
    PooledEstimate,
    PromptEstimate,
    ComparisonResult,
    best_estimator,
    compare,
    estimate,
    estimate_best,
    estimate_hybrid,
    paired_bootstrap,
    pool,
    random_logits_fn,
    stochastic_beam_search,
)
from canopy_rs.protocol import Backend, NextTokenLogits, NodeBatch, PolicySupport
from canopy_rs.results import CanopyBounds, CanopyResult, RunInfo
from canopy_rs.sampling import Rollouts, sample
from canopy_rs.semantic import (
    ExactSemantics,
    bucket_diversity,
    embed,
    exact_semantics,
    rollout_diversity,
    rollout_texts,
    semantic_diversity,
    vendi_score,
)

# The package canopy_rs.study is imported here, eagerly, so that the name ``canopy_rs.study`` is bound to the
# function (the submodule stays reachable as ``from canopy_rs.study import ...``).
from canopy_rs.study import StudyOutput, study  # noqa: E402  (after the names it uses)

__all__ = [
    "__version__",
    "exact",
    "bounded",
    "Budget",
    "Interrupted",
    "make_policy",
    "CanopyResult",
    "CanopyBounds",
    "RunInfo",
    "CanopyError",
    "InvalidArgumentError",
    "ArgumentTypeError",
    "BackendOutputError",
    "TreeTooLargeError",
    "EngineStateError",
    "ModelNotFoundError",
    "Policy",
    "Backend",
    "NodeBatch",
    "NextTokenLogits",
    "PolicySupport",
    "CallableModel",
    "as_backend",
    "TransformersModel",
    "KVBudgetExceededError",
    "TreeAttentionUnsupported",
    "sample",
    "Rollouts",
    "estimate",
    "PromptEstimate",
    "pool",
    "PooledEstimate",
    "paired_bootstrap",
    "BootstrapResult",
    "stochastic_beam_search",
    "BeamSearchEstimate",
    "estimate_hybrid",
    "HybridEstimate",
    "estimate_best",
    "best_estimator",
    "BestEstimate",
    "compare",
    "ComparisonResult",
    "random_logits_fn",
    "load_model",
    "embed",
    "rollout_texts",
    "semantic_diversity",
    "vendi_score",
    "rollout_diversity",
    "bucket_diversity",
    "exact_semantics",
    "ExactSemantics",
    "study",
    "StudyOutput",
    "StudyConfigError",
]

# Names whose modules import torch or other heavy optional dependencies: loaded on first use.
_LAZY = {
    "TransformersModel": "canopy_rs.backends.transformers",
    "load_model": "canopy_rs.models",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'canopy_rs' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
