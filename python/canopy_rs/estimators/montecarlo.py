"""Per-prompt Monte Carlo estimates from root rollouts (docs/definitions.md#monte-carlo).

Two unbiased estimators of CE*_max are reported side by side:

* ``ce_star`` - the step-entropy (Rao-Blackwellised) estimator mean_i sum_t h_{i,t}, what the paper uses;
* ``ce_star_surprisal`` - the naive estimator mean_i sum_t -log q(y_t | y_<t).

Neither dominates in variance (docs/definitions.md#monte-carlo has a two-branch tree where the naive one wins), so both
come with standard errors (ddof=1) and Student-t intervals. Plug-in quantities (GenPPL, BF, correlations)
are the reference code's estimators; their intervals are delta-method / Fisher-z approximations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

import numpy as np

from canopy_rs import stats
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.results import to_plain
from canopy_rs.sampling import check_rollout_steps
from canopy_rs.semantic import prompt_semantics

from ._buckets import BucketDiversityView

__all__ = ["PromptEstimate", "estimate", "estimate_arrays"]

_Interval = tuple[float, float]


@dataclass(frozen=True)
class PromptEstimate(BucketDiversityView):
    """Per-prompt estimates. Names match :class:`canopy_rs.CanopyResult` where the quantity is the same
    (``ce_star``, ``expected_length``, ``entropy_rate``, ``gen_ppl``, ``branching_factor``,
    ``length_rate_cov``, ``length_var``, ``rate_var``, ``truncation_prob``, ``length_pmf``)."""

    num_rollouts: int
    max_new_tokens: int
    confidence: float
    # CE*_max, two estimators
    ce_star: float
    ce_star_se: float
    ce_star_ci: _Interval
    ce_star_surprisal: float
    ce_star_surprisal_se: float
    ce_star_surprisal_ci: _Interval
    # length and rates
    expected_length: float
    expected_length_se: float
    expected_length_ci: _Interval
    gen_ppl: float
    gen_ppl_se: float
    gen_ppl_ci: _Interval
    entropy_rate: float
    entropy_rate_se: float
    entropy_rate_ci: _Interval
    branching_factor: float
    branching_factor_se: float
    branching_factor_ci: _Interval
    length_var: float
    rate_var: float
    # rho(N, r_N) and covariance (ddof=1)
    length_rate_pearson: float
    length_rate_pearson_ci: _Interval
    length_rate_spearman: float
    length_rate_spearman_ci: _Interval
    length_rate_kendall: float
    length_rate_kendall_ci: _Interval
    length_rate_cov: float
    length_rate_cov_se: float
    length_rate_cov_ci: _Interval
    # decomposition CE = E[N]E[r] + Cov_pop(N, r) (population covariance, 1/M)
    length_driven: float
    length_rate_cov_pop: float
    length_driven_share: float
    cov_share: float
    # truncation
    truncation_rate: float
    truncation_rate_se: float
    truncation_prob: float
    length_pmf: np.ndarray
    # running entropy rate: mean over rollouts with N_i >= t of (1/t) sum_{s<=t} h_{i,s}
    trajectory_positions: np.ndarray
    trajectory_rate: np.ndarray
    trajectory_active: np.ndarray
    trajectory_rate_sum: np.ndarray  # sum over active rollouts (pooling is rollout-weighted)
    cost: dict = field(default_factory=dict)
    # Semantic diversity (estimate(..., embeddings=E); NaN without embeddings): D, Vendi, corr(N, d),
    # corr(r_N, d), D inside the short / medium / long length buckets (canopy_rs.semantic).
    semantic_diversity: float = math.nan
    vendi_score: float = math.nan
    vendi_entropy: float = math.nan
    length_diversity_pearson: float = math.nan
    length_diversity_spearman: float = math.nan
    length_diversity_kendall: float = math.nan
    rate_diversity_pearson: float = math.nan
    rate_diversity_spearman: float = math.nan
    rate_diversity_kendall: float = math.nan
    bucket_diversity_short: float = math.nan
    bucket_diversity_medium: float = math.nan
    bucket_diversity_long: float = math.nan

    @property
    def length_rate_corr(self) -> float:
        """Pearson rho(N, r_N): the name of the exact result's field."""
        return self.length_rate_pearson

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = to_plain(asdict(self))
        out["length_rate_corr"] = self.length_rate_pearson
        return out


def _nan_ci() -> _Interval:
    return (math.nan, math.nan)


def estimate_arrays(
    lengths: np.ndarray,
    entropies: np.ndarray,
    logq: Optional[np.ndarray],
    *,
    max_new_tokens: int,
    eos: Optional[np.ndarray] = None,
    confidence: float = 0.95,
    bin_step: int = 5,
    cost: Optional[dict] = None,
    stratified: bool = False,
) -> PromptEstimate:
    """Estimates from padded arrays: ``lengths`` [M] (N_i, EOS counted), ``entropies`` and ``logq`` [M, L]
    with zeros after N_i. ``eos`` [M] marks rollouts that ended by an EOS id (default: N_i < max_new_tokens).
    ``stratified``: rollout i came from stratum i of M (:func:`canopy_rs.sample` with ``stratified=True``);
    the SEs of means then use collapsed strata (pairs of neighbouring strata; conservative).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    ent = np.asarray(entropies, dtype=np.float64)
    m = int(lengths.shape[0])
    if m < 1:
        raise InvalidArgumentError("need at least one rollout")
    if ent.ndim != 2 or ent.shape[0] != m:
        raise InvalidArgumentError(f"entropies must have shape [M, L] with M={m}, got {ent.shape}")
    if np.any(lengths < 1) or np.any(lengths > max_new_tokens):
        raise InvalidArgumentError("lengths must lie in 1..max_new_tokens")
    if np.any(lengths > ent.shape[1]):
        raise InvalidArgumentError("entropies has fewer columns than the longest rollout")
    if bin_step < 1:
        raise InvalidArgumentError(f"bin_step must be >= 1, got {bin_step}")
    check_rollout_steps(ent, None if logq is None else np.asarray(logq, dtype=np.float64),
                        np.arange(ent.shape[1])[None, :] < lengths[:, None])
    if stratified:
        crit_dof = stats.critical_value(confidence, max(1, m // 2))

        def mean_se(v):
            v = np.asarray(v, dtype=np.float64)
            return float(v.mean()), math.sqrt(stats.collapsed_strata_var(v))
    else:
        crit_dof = stats.critical_value(confidence, m - 1)
        mean_se = stats.mean_se

    n = lengths.astype(np.float64)
    h_sum = ent.sum(axis=1)
    rate = h_sum / np.maximum(n, 1.0)

    ce, ce_se = mean_se(h_sum)
    if logq is None:
        s_sum = np.full(m, np.nan)
    else:
        s_sum = -np.asarray(logq, dtype=np.float64).sum(axis=1)
    ces, ces_se = mean_se(s_sum)
    nbar, nbar_se = mean_se(n)
    rbar, rbar_se = mean_se(rate)

    # GenPPL = exp(ratio of means). Delta method on the ratio R = Hbar / Nbar: residuals (H - R N) / Nbar.
    ratio = ce / nbar
    gen_ppl = math.exp(ratio)
    ratio_se = mean_se((h_sum - ratio * n) / nbar)[1] if m >= 2 else math.nan
    ratio_ci = stats.mean_ci(ratio, ratio_se, crit_dof)
    rate_ci = stats.mean_ci(rbar, rbar_se, crit_dof)

    length_var = float(np.var(n, ddof=1)) if m >= 2 else math.nan
    rate_var = float(np.var(rate, ddof=1)) if m >= 2 else math.nan
    pearson = stats.pearson(n, rate)
    spearman = stats.spearman(n, rate)
    kendall = stats.kendall_tau_b(n, rate)
    if m >= 2:
        cov = float(np.cov(n, rate, ddof=1)[0, 1])
        # Influence terms of the sample covariance give its asymptotic standard error.
        cov_se = mean_se((n - nbar) * (rate - rbar))[1]
    else:
        cov, cov_se = math.nan, math.nan

    length_driven = nbar * rbar
    cov_pop = ce - length_driven
    trunc = lengths >= max_new_tokens
    trate = float(trunc.mean())
    eos_arr = (lengths < max_new_tokens) if eos is None else np.asarray(eos, dtype=bool)

    # Running entropy rate at t = bin_step, 2 bin_step, ..., <= max_new_tokens.
    positions = np.arange(bin_step, max_new_tokens + 1, bin_step, dtype=np.int64)
    cum = np.cumsum(ent, axis=1)
    width = ent.shape[1]
    traj_sum = np.zeros(positions.shape[0])
    traj_active = np.zeros(positions.shape[0], dtype=np.int64)
    for j, t in enumerate(positions):
        if t > width:
            break
        act = lengths >= t
        traj_active[j] = int(act.sum())
        traj_sum[j] = float(cum[act, t - 1].sum() / t)
    with np.errstate(invalid="ignore", divide="ignore"):
        traj_rate = np.where(traj_active > 0, traj_sum / np.maximum(traj_active, 1), np.nan)

    return PromptEstimate(
        num_rollouts=m,
        max_new_tokens=int(max_new_tokens),
        confidence=float(confidence),
        ce_star=ce,
        ce_star_se=ce_se,
        ce_star_ci=stats.mean_ci(ce, ce_se, crit_dof),
        ce_star_surprisal=ces,
        ce_star_surprisal_se=ces_se,
        ce_star_surprisal_ci=stats.mean_ci(ces, ces_se, crit_dof),
        expected_length=nbar,
        expected_length_se=nbar_se,
        expected_length_ci=stats.mean_ci(nbar, nbar_se, crit_dof),
        gen_ppl=gen_ppl,
        gen_ppl_se=gen_ppl * ratio_se,
        gen_ppl_ci=(math.exp(ratio_ci[0]), math.exp(ratio_ci[1])) if math.isfinite(ratio_se) else _nan_ci(),
        entropy_rate=rbar,
        entropy_rate_se=rbar_se,
        entropy_rate_ci=rate_ci,
        branching_factor=math.exp(rbar),
        branching_factor_se=math.exp(rbar) * rbar_se,
        branching_factor_ci=(math.exp(rate_ci[0]), math.exp(rate_ci[1])) if math.isfinite(rbar_se) else _nan_ci(),
        length_var=length_var,
        rate_var=rate_var,
        length_rate_pearson=pearson,
        length_rate_pearson_ci=stats.fisher_ci(pearson, m, confidence),
        length_rate_spearman=spearman,
        length_rate_spearman_ci=stats.fisher_ci(spearman, m, confidence, var_factor=1.06),
        length_rate_kendall=kendall,
        length_rate_kendall_ci=stats.fisher_ci(kendall, m, confidence, var_factor=0.437, dof_shift=4),
        length_rate_cov=cov,
        length_rate_cov_se=cov_se,
        length_rate_cov_ci=stats.mean_ci(cov, cov_se, crit_dof),
        length_driven=length_driven,
        length_rate_cov_pop=cov_pop,
        length_driven_share=length_driven / ce if ce != 0 else math.nan,
        cov_share=cov_pop / ce if ce != 0 else math.nan,
        truncation_rate=trate,
        truncation_rate_se=math.sqrt(trate * (1.0 - trate) / m),
        truncation_prob=float((~eos_arr).mean()),
        length_pmf=np.bincount(lengths, minlength=max_new_tokens + 1).astype(np.float64) / m,
        trajectory_positions=positions,
        trajectory_rate=traj_rate,
        trajectory_active=traj_active,
        trajectory_rate_sum=traj_sum,
        cost=dict(cost or {}),
    )


def estimate(rollouts, *, embeddings=None, confidence: float = 0.95, bin_step: int = 5) -> PromptEstimate:
    """Per-prompt estimates from root rollouts (:func:`canopy_rs.sample` or :meth:`Rollouts.from_ragged`).

    ``embeddings`` [M, d] (one row per rollout, e.g. :func:`canopy_rs.embed` of
    :func:`canopy_rs.rollout_texts`) adds the semantic fields (semantic_diversity, vendi_score,
    length_diversity_*, rate_diversity_*, bucket_diversity); without it they are NaN. ``confidence`` sets
    the interval level; ``bin_step`` the spacing of the running entropy-rate positions.
    """
    if np.any(rollouts.start_depths != 0):
        raise InvalidArgumentError("estimate() needs rollouts started at the root (start_depths == 0)")
    est = estimate_arrays(
        rollouts.lengths,
        rollouts.entropies,
        rollouts.logq,
        max_new_tokens=rollouts.max_new_tokens,
        eos=rollouts.eos,
        confidence=confidence,
        bin_step=bin_step,
        cost=rollouts.cost,
        stratified=bool(getattr(rollouts, "stratified", False)),
    )
    if embeddings is None:
        return est
    return replace(est, **prompt_semantics(embeddings, rollouts.lengths, rollouts.entropy_rates))
