"""Pooling per-prompt estimates over a (model, task) cell (docs/definitions.md#pooling-across-prompts).

* linear quantities: unweighted nanmean over prompts; ``exp`` after averaging (GenPPL, BF);
* Pearson / Spearman: Fisher-z mean, weights max(n_p - 3, 0), r clipped to +-0.999999;
* Kendall tau-b: raw-scale mean, weights n_p (n_p - 1) / 2;
* covariance: weights n_p - 1 (= the pooled within-prompt unbiased covariance);
* correlations and covariances: non-finite entries and zero weights are dropped; with no weight left, the
  unweighted mean on the same scale (tanh of the mean Fisher z for Pearson / Spearman);
* linear means skip NaN (undefined) and keep +-inf, as the reference's nanmean does;
* decomposition from the pooled values: E[N] = CE / log GenPPL, E[r] = log BF, Cov = CE - E[N] E[r]
  (a residual: mean within-prompt population covariance plus between-prompt covariance of the means);
* running entropy rate: rollout-weighted over all prompts;
* semantic diversity D and the bucketed D_b: nanmean; Vendi: exp(mean H_V); corr(N, d) and corr(r_N, d):
  like rho(N, r_N).

:func:`pool_exact` pools exact per-prompt values (population values: every prompt weighs the same) by the
same rules. :func:`pooled_columns` works on an index matrix ``[B, P]`` so the bootstrap evaluates all replicates at once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from canopy_rs.errors import InvalidArgumentError
from canopy_rs.results import to_plain

from ._buckets import BucketDiversityView

__all__ = [
    "PooledEstimate",
    "pool",
    "pool_exact",
    "prompt_columns",
    "pooled_columns",
    "POOLED_METRICS",
    "SEMANTIC_METRICS",
]

_CLIP = 0.999999

# Per-prompt columns the pooled metrics are computed from.
_COLUMNS = {
    "ce_star": "ce_star",
    "ce_star_surprisal": "ce_star_surprisal",
    "expected_length": "expected_length",
    "entropy_rate": "entropy_rate",
    "truncation_rate": "truncation_rate",
    "length_rate_pearson": "length_rate_pearson",
    "length_rate_spearman": "length_rate_spearman",
    "length_rate_kendall": "length_rate_kendall",
    "length_rate_cov": "length_rate_cov",
    "num_rollouts": "num_rollouts",
}
SEMANTIC_METRICS = (
    "semantic_diversity",
    "vendi_score",
    "length_diversity_pearson",
    "length_diversity_spearman",
    "length_diversity_kendall",
    "rate_diversity_pearson",
    "rate_diversity_spearman",
    "rate_diversity_kendall",
    "bucket_diversity_short",
    "bucket_diversity_medium",
    "bucket_diversity_long",
)
# Per-prompt semantic columns (canopy_rs.semantic; NaN for prompts estimated without embeddings): the pooled
# metrics' inputs, with the Vendi entropy H_V in place of the score (VS = exp(mean H_V)).
_SEMANTIC_COLUMNS = tuple("vendi_entropy" if m == "vendi_score" else m for m in SEMANTIC_METRICS)

POOLED_METRICS = (
    "ce_star",
    "ce_star_surprisal",
    "expected_length",
    "entropy_rate",
    "gen_ppl",
    "branching_factor",
    "truncation_rate",
    "length_rate_pearson",
    "length_rate_spearman",
    "length_rate_kendall",
    "length_rate_cov",
    "length_driven",
    "length_rate_cov_residual",
    "length_driven_share",
    "cov_share",
) + SEMANTIC_METRICS


def prompt_columns(estimates: Sequence[Any]) -> dict[str, np.ndarray]:
    """Per-prompt arrays [P] from PromptEstimate objects (or mappings with the same keys)."""
    if len(estimates) == 0:
        raise InvalidArgumentError("estimates must hold at least one prompt")
    cols = {}
    for key, attr in _COLUMNS.items():
        vals = []
        for e in estimates:
            v = e[attr] if isinstance(e, Mapping) else getattr(e, attr)
            vals.append(float(v))
        cols[key] = np.asarray(vals, dtype=np.float64)
    for key in _SEMANTIC_COLUMNS:
        vals = []
        for e in estimates:
            v = e.get(key) if isinstance(e, Mapping) else getattr(e, key, None)
            vals.append(np.nan if v is None else float(v))
        cols[key] = np.asarray(vals, dtype=np.float64)
    return cols


def _take(x: np.ndarray, idx: Optional[np.ndarray]) -> np.ndarray:
    return x[None, :] if idx is None else x[idx]


def _mean_over(v: np.ndarray, keep: np.ndarray, w: Optional[np.ndarray] = None) -> np.ndarray:
    """Mean over the last axis of the entries in ``keep`` (weighted by ``w``); NaN where none is kept."""
    w = np.ones_like(v) if w is None else np.broadcast_to(w, v.shape)
    wsum = np.where(keep, w, 0.0).sum(axis=-1)
    tot = np.where(keep, w * np.where(keep, v, 0.0), 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(wsum > 0, tot / np.where(wsum > 0, wsum, 1.0), np.nan)


def _nanmean(v: np.ndarray) -> np.ndarray:
    """The reference's nanmean: NaN (undefined) entries are skipped, +-inf kept (the mean is then +-inf)."""
    return _mean_over(v, ~np.isnan(v))


def _weighted(v: np.ndarray, w: np.ndarray, transform=None, inverse=None) -> np.ndarray:
    """Weighted mean over the last axis of ``transform(v)``, mapped back by ``inverse``. Non-finite values
    never enter (an infinite correlation is not a value); where no weight is left, the unweighted mean of
    the finite values on the same scale, as the reference falls back to its nanmean."""
    finite = np.isfinite(v)
    tv = v if transform is None else transform(np.where(finite, v, 0.0))
    has_weight = (np.where(finite, w, 0.0) > 0).any(axis=-1)
    mean = np.where(has_weight, _mean_over(tv, finite & (w > 0), w), _mean_over(tv, finite))
    return mean if inverse is None else inverse(mean)


def _fisher(v):
    return np.arctanh(np.clip(v, -_CLIP, _CLIP))


def pooled_columns(cols: Mapping[str, np.ndarray], idx: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Pooled metrics for each row of the prompt index matrix ``idx`` [B, P] (None: all prompts once).

    Returns arrays of shape [B] (or [1])."""
    n = _take(cols["num_rollouts"], idx)
    ce = _nanmean(_take(cols["ce_star"], idx))
    ces = _nanmean(_take(cols["ce_star_surprisal"], idx))
    length = _nanmean(_take(cols["expected_length"], idx))
    rate = _nanmean(_take(cols["entropy_rate"], idx))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        gen_ppl = np.exp(ce / length)
        bf = np.exp(rate)
        length_driven = length * rate
        cov_res = ce - length_driven
        ld_share = length_driven / ce
        cov_share = cov_res / ce
    fisher_w = np.maximum(n - 3.0, 0.0)
    out = {
        "ce_star": ce,
        "ce_star_surprisal": ces,
        "expected_length": length,
        "entropy_rate": rate,
        "gen_ppl": gen_ppl,
        "branching_factor": bf,
        "truncation_rate": _nanmean(_take(cols["truncation_rate"], idx)),
        "length_rate_pearson": _weighted(_take(cols["length_rate_pearson"], idx), fisher_w, _fisher, np.tanh),
        "length_rate_spearman": _weighted(_take(cols["length_rate_spearman"], idx), fisher_w, _fisher, np.tanh),
        "length_rate_kendall": _weighted(_take(cols["length_rate_kendall"], idx), n * (n - 1.0) / 2.0),
        "length_rate_cov": _weighted(_take(cols["length_rate_cov"], idx), n - 1.0),
        "length_driven": length_driven,
        "length_rate_cov_residual": cov_res,
        "length_driven_share": ld_share,
        "cov_share": cov_share,
    }
    # Semantic metrics (docs/definitions.md#semantic-metrics): D and D_b nanmean, VS = exp(mean H_V), corr(N, d) and
    # corr(r, d) like rho(N, r_N).
    out["semantic_diversity"] = _nanmean(_take(cols["semantic_diversity"], idx))
    with np.errstate(over="ignore", invalid="ignore"):
        out["vendi_score"] = np.exp(_nanmean(_take(cols["vendi_entropy"], idx)))
    for prefix in ("length_diversity", "rate_diversity"):
        for kind in ("pearson", "spearman"):
            out[f"{prefix}_{kind}"] = _weighted(_take(cols[f"{prefix}_{kind}"], idx), fisher_w, _fisher, np.tanh)
        out[f"{prefix}_kendall"] = _weighted(_take(cols[f"{prefix}_kendall"], idx), n * (n - 1.0) / 2.0)
    for b in ("short", "medium", "long"):
        out[f"bucket_diversity_{b}"] = _nanmean(_take(cols[f"bucket_diversity_{b}"], idx))
    return out


@dataclass(frozen=True)
class PooledEstimate(BucketDiversityView):
    """Pooled metrics of one (model, task) cell. ``length_rate_cov`` is the pooled within-prompt covariance
    (the reference ``entropy_rate_vs_length.covariance``); ``length_rate_cov_residual`` is the decomposition's
    residual CE - E[N] E[r]. They are different numbers (docs/definitions.md#decomposition)."""

    num_prompts: int
    ce_star: float
    ce_star_surprisal: float
    expected_length: float
    entropy_rate: float
    gen_ppl: float
    branching_factor: float
    truncation_rate: float
    length_rate_pearson: float
    length_rate_spearman: float
    length_rate_kendall: float
    length_rate_cov: float
    length_driven: float
    length_rate_cov_residual: float
    length_driven_share: float
    cov_share: float
    semantic_diversity: float
    vendi_score: float
    length_diversity_pearson: float
    length_diversity_spearman: float
    length_diversity_kendall: float
    rate_diversity_pearson: float
    rate_diversity_spearman: float
    rate_diversity_kendall: float
    bucket_diversity_short: float
    bucket_diversity_medium: float
    bucket_diversity_long: float
    trajectory_positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    trajectory_rate: np.ndarray = field(default_factory=lambda: np.zeros(0))
    trajectory_active: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dict(self.__dict__))

    def to_pooled_metrics(self) -> dict[str, Any]:
        """The reference ``pooled_metrics.json`` "raw" section layout."""
        return {
            "gen_ppl": self.gen_ppl,
            "ce_star_max": self.ce_star,
            "branching_factor": self.branching_factor,
            "entropy_rate_vs_length": {
                "pearson": self.length_rate_pearson,
                "spearman": self.length_rate_spearman,
                "kendall": self.length_rate_kendall,
                "covariance": self.length_rate_cov,
            },
            "truncation_rate": self.truncation_rate,
            "semantic_diversity_vs_length": {
                "pearson": self.length_diversity_pearson,
                "spearman": self.length_diversity_spearman,
                "kendall": self.length_diversity_kendall,
            },
            "semantic_diversity": self.semantic_diversity,
            "semantic_diversity_bucketed_mean": self.bucket_diversity,
            "vendi_score": self.vendi_score,
        }


def _field(e: Any, name: str) -> Any:
    return e.get(name) if isinstance(e, Mapping) else getattr(e, name, None)


def _pooled_trajectory(estimates):
    """Rollout-weighted running entropy rate: sum of per-rollout rates over all prompts / active count.
    Prompts without trajectory fields (e.g. hand-made mappings) are skipped."""
    with_traj = [e for e in estimates if _field(e, "trajectory_rate_sum") is not None]
    if not with_traj:
        return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0, dtype=np.int64)
    pos = np.zeros(0, dtype=np.int64)
    for e in with_traj:
        p = np.asarray(_field(e, "trajectory_positions"), dtype=np.int64)
        if p.shape[0] > pos.shape[0]:
            pos = p
    tot = np.zeros(pos.shape[0])
    act = np.zeros(pos.shape[0], dtype=np.int64)
    for e in with_traj:
        p = np.asarray(_field(e, "trajectory_positions"), dtype=np.int64)
        if not np.array_equal(p, pos[: p.shape[0]]):
            raise InvalidArgumentError("prompts use different trajectory positions (bin_step); pool like with like")
        k = p.shape[0]
        tot[:k] += np.asarray(_field(e, "trajectory_rate_sum"), dtype=np.float64)
        act[:k] += np.asarray(_field(e, "trajectory_active"), dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(act > 0, tot / np.maximum(act, 1), np.nan)
    return pos, rate, act


def pool(estimates: Sequence[Any]) -> PooledEstimate:
    """Pool per-prompt :class:`PromptEstimate` objects (one per prompt), or their ``to_dict()`` mappings, as
    the reference code does."""
    cols = prompt_columns(estimates)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        vals = {k: float(v[0]) for k, v in pooled_columns(cols).items()}
    pos, rate, act = _pooled_trajectory(estimates)
    return PooledEstimate(
        num_prompts=len(estimates),
        trajectory_positions=pos,
        trajectory_rate=rate,
        trajectory_active=act,
        **vals,
    )


# Exact values that only some results carry (leaf-based rank correlations, exact semantics).
# The semantic metrics come from SEMANTIC_METRICS (less the buckets, which exact results do not carry).
_EXACT_OPTIONAL = ("length_rate_spearman", "length_rate_kendall") + tuple(
    m for m in SEMANTIC_METRICS if not m.startswith("bucket_diversity")
)


def pool_exact(results: Sequence[Any]) -> dict[str, float]:
    """Pool exact per-prompt results (:class:`canopy_rs.CanopyResult` objects or their ``to_dict()``) by the
    rules of :func:`pool`. Each value is a population value, not an estimate from rollouts, so every prompt
    weighs the same: plain means, ``exp`` after averaging, the Fisher-z mean of rho(N, r_N). Keys follow
    ``CanopyResult`` (``truncation_prob``, ``length_rate_corr``).

    Optional values are pooled when every result has them (not None): ``length_rate_spearman`` and
    ``length_rate_kendall`` (``exact(..., return_leaves=True)``) and the exact semantic values of
    :func:`canopy_rs.exact_semantics` (pass ``{**res.to_dict(), **sem.to_dict()}``): D* and the correlations
    with d* like their sampled counterparts, VS* as exp(mean log VS*)."""
    if len(results) == 0:
        raise ValueError("results must hold at least one prompt")

    def col(name: str) -> np.ndarray:
        return np.asarray([[float(_field(r, name))] for r in results], dtype=np.float64).T

    equal = np.ones((1, len(results)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ce, length, rate = _nanmean(col("ce_star")), _nanmean(col("expected_length")), _nanmean(col("entropy_rate"))
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            vals = {
                "ce_star": ce,
                "expected_length": length,
                "entropy_rate": rate,
                "gen_ppl": np.exp(ce / length),
                "branching_factor": np.exp(rate),
                "truncation_prob": _nanmean(col("truncation_prob")),
                "length_rate_corr": _weighted(col("length_rate_corr"), equal, _fisher, np.tanh),
                "length_rate_cov": _weighted(col("length_rate_cov"), equal),
                "length_driven": length * rate,
                "length_rate_cov_residual": ce - length * rate,
            }
            for name in _EXACT_OPTIONAL:
                if any(_field(r, name) is None for r in results):
                    continue
                if name == "vendi_score":
                    vals[name] = np.exp(_nanmean(np.log(col(name))))
                elif name.endswith(("_pearson", "_spearman")):
                    vals[name] = _weighted(col(name), equal, _fisher, np.tanh)
                else:  # semantic_diversity and Kendall tau: plain means
                    vals[name] = _weighted(col(name), equal)
    out: dict[str, float] = {"num_prompts": len(results)}
    out.update({k: float(v[0]) for k, v in vals.items()})
    return out
