"""Paired prompt bootstrap, base vs fine-tuned (docs/definitions.md#paired-bootstrap).

Prompts are resampled with replacement, with the *same* indices for both models; every rollout of a drawn
prompt is kept (the per-prompt estimates are reused). Each replicate recomputes the pooled metrics. Reported
per metric and for base, fine-tuned, delta = fine-tuned - base and (positive-scale metrics) percent delta =
100 (ft - base) / |base|: the point value on the full data, SE = std(ddof=1) of the replicates and the
percentile interval.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from canopy_rs.errors import InvalidArgumentError

from .pooling import POOLED_METRICS, SEMANTIC_METRICS, pooled_columns, prompt_columns

__all__ = [
    "BootstrapResult",
    "paired_bootstrap",
    "DEFAULT_BOOTSTRAP_METRICS",
    "SEMANTIC_BOOTSTRAP_METRICS",
    "POSITIVE_METRICS",
]

# The reference configuration's metrics (ce_star_max, gen_ppl, branching_factor, entropy_rate_vs_length.*).
DEFAULT_BOOTSTRAP_METRICS = (
    "ce_star",
    "gen_ppl",
    "branching_factor",
    "length_rate_pearson",
    "length_rate_spearman",
    "length_rate_kendall",
    "length_rate_cov",
)
# Added when the prompts carry embeddings (docs/definitions.md#semantic-metrics): D, VS, corr(N, d), corr(r, d).
SEMANTIC_BOOTSTRAP_METRICS = tuple(m for m in SEMANTIC_METRICS if not m.startswith("bucket_diversity"))
POSITIVE_METRICS = frozenset(
    {"ce_star", "ce_star_surprisal", "gen_ppl", "branching_factor", "expected_length", "semantic_diversity",
     "vendi_score"}
)


def _summary(point: float, reps: np.ndarray, confidence: float) -> dict[str, float]:
    finite = reps[np.isfinite(reps)]
    alpha = (1.0 - confidence) / 2.0
    if finite.size >= 2:
        se = float(np.std(finite, ddof=1))
        lo, hi = np.percentile(finite, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    else:
        se, lo, hi = math.nan, math.nan, math.nan
    return {
        "value": float(point),
        "se": se,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "num_finite": int(finite.size),
    }


@dataclass(frozen=True)
class BootstrapResult:
    """``table[metric][side]`` with side in ``base``, ``finetuned``, ``delta`` and (positive-scale metrics)
    ``percent_delta``; each entry has ``value``, ``se``, ``ci_low``, ``ci_high``, ``num_finite``."""

    table: dict[str, dict[str, dict[str, float]]]
    num_prompts: int
    num_replicates: int
    seed: Any
    confidence: float

    def __getitem__(self, metric: str) -> dict[str, dict[str, float]]:
        return self.table[metric]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_prompts": self.num_prompts,
            "num_replicates": self.num_replicates,
            "seed": self.seed,
            "confidence": self.confidence,
            "metrics": self.table,
        }

    def rows(self) -> list[dict[str, Any]]:
        """Flat rows (metric, side, value, se, ci_low, ci_high) for a CSV."""
        out = []
        for metric, sides in self.table.items():
            for side, s in sides.items():
                out.append({"metric": metric, "side": side, **s})
        return out


def paired_bootstrap(
    base: Sequence[Any],
    finetuned: Sequence[Any],
    *,
    num_replicates: int = 2000,
    seed: Any = 42,
    confidence: float = 0.95,
    metrics: Optional[Sequence[str]] = None,
) -> BootstrapResult:
    """Paired bootstrap over prompts. ``base[p]`` and ``finetuned[p]`` are the per-prompt estimates
    (:class:`PromptEstimate`) of the same prompt p. ``seed`` seeds ``numpy.random.default_rng``.
    ``metrics`` (names of :func:`pool`'s metrics); None: the reference set (``DEFAULT_BOOTSTRAP_METRICS``)
    plus ``SEMANTIC_BOOTSTRAP_METRICS`` when the estimates carry semantic diversity (embeddings)."""
    if len(base) != len(finetuned):
        raise InvalidArgumentError(
            f"base and finetuned must hold the same prompts: got {len(base)} and {len(finetuned)}"
        )
    if len(base) == 0:
        raise InvalidArgumentError("base and finetuned must hold at least one prompt")
    if isinstance(num_replicates, bool) or not isinstance(num_replicates, (int, np.integer)) or num_replicates < 2:
        raise InvalidArgumentError(f"num_replicates must be an integer >= 2, got {num_replicates!r}")
    if not 0.0 < confidence < 1.0:
        raise InvalidArgumentError(f"confidence must be in (0, 1), got {confidence!r}")
    cols_b = prompt_columns(base)
    cols_f = prompt_columns(finetuned)
    if metrics is None:
        semantic = any(np.isfinite(c["semantic_diversity"]).any() for c in (cols_b, cols_f))
        metrics = DEFAULT_BOOTSTRAP_METRICS + (SEMANTIC_BOOTSTRAP_METRICS if semantic else ())
    unknown = [m for m in metrics if m not in POOLED_METRICS]
    if unknown:
        raise InvalidArgumentError(f"unknown metrics {unknown}; choose from {list(POOLED_METRICS)}")
    p = len(base)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, p, size=(int(num_replicates), p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        point_b = pooled_columns(cols_b)
        point_f = pooled_columns(cols_f)
        reps_b = pooled_columns(cols_b, idx)
        reps_f = pooled_columns(cols_f, idx)
    table: dict[str, dict[str, dict[str, float]]] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for m in metrics:
            pb, pf = float(point_b[m][0]), float(point_f[m][0])
            rb, rf = reps_b[m], reps_f[m]
            entry = {
                "base": _summary(pb, rb, confidence),
                "finetuned": _summary(pf, rf, confidence),
                "delta": _summary(pf - pb, rf - rb, confidence),
            }
            if m in POSITIVE_METRICS:
                pct = 100.0 * (pf - pb) / abs(pb) if pb != 0 else math.nan
                entry["percent_delta"] = _summary(pct, 100.0 * (rf - rb) / np.abs(rb), confidence)
            table[m] = entry
    return BootstrapResult(table, p, int(num_replicates), seed, float(confidence))
