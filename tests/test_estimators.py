"""Per-prompt Monte Carlo estimates and stochastic beam search, against hand computations, scipy and the
exact canopy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

import canopy_rs
from canopy_rs.estimators import estimate, estimate_arrays
from canopy_rs.stats import (
    collapsed_strata_var,
    kendall_tau_b,
    pearson,
    rankdata,
    spearman,
    student_t_ppf,
)
from canopy_rs.estimators.beam import stochastic_beam_search
from canopy_rs.testing import random_logits_fn
from canopy_rs.sampling import Rollouts, sample
from estimator_helpers import CheckingBackend, leaf_table, two_branch_model

# (vocab, depth, seed, scale, eos_bias): small random callables with different shapes.
MODELS = [(3, 3, 0, 1.0, 0.0), (4, 4, 1, 2.0, 0.0), (5, 3, 2, 1.0, -0.5), (4, 5, 3, 1.5, 0.5), (6, 4, 4, 2.5, 0.0)]


def _model(v, t, seed, scale, eos_bias):
    return random_logits_fn(v, seed=seed, scale=scale, eos_bias=eos_bias), dict(
        vocab_size=v, eos_token_ids=[0], max_new_tokens=t
    )


# --- hand computations ----------------------------------------------------------------------------


def test_estimate_matches_hand_computation():
    # Three rollouts, T_max = 3: lengths 1, 3 (EOS at the cap: counted as truncated), 3 (no EOS).
    r = Rollouts.from_ragged(
        [[0], [2, 1, 0], [1, 1, 2]],
        [[0.6], [0.6, 0.9, 0.3], [0.6, 0.2, 0.4]],
        [[-0.5], [-1.0, -0.7, -0.2], [-0.9, -0.1, -1.2]],
        eos_token_ids=[0], max_new_tokens=3,
    )
    e = estimate(r, bin_step=1)
    h = np.array([0.6, 1.8, 1.2])
    s = np.array([0.5, 1.9, 2.2])
    n = np.array([1.0, 3.0, 3.0])
    rate = h / n
    t2 = student_t_ppf(0.975, 2)
    assert e.num_rollouts == 3
    assert e.ce_star == pytest.approx(1.2)
    assert e.ce_star_se == pytest.approx(np.std(h, ddof=1) / math.sqrt(3))
    assert e.ce_star_ci == pytest.approx((1.2 - t2 * e.ce_star_se, 1.2 + t2 * e.ce_star_se))
    assert e.ce_star_surprisal == pytest.approx(s.mean())
    assert e.ce_star_surprisal_se == pytest.approx(np.std(s, ddof=1) / math.sqrt(3))
    assert e.expected_length == pytest.approx(7 / 3)
    assert e.gen_ppl == pytest.approx(math.exp(1.2 / (7 / 3)))
    assert e.entropy_rate == pytest.approx(rate.mean())
    assert e.branching_factor == pytest.approx(math.exp(rate.mean()))
    assert e.length_var == pytest.approx(np.var(n, ddof=1))
    assert e.rate_var == pytest.approx(np.var(rate, ddof=1))
    assert e.length_rate_cov == pytest.approx(np.cov(n, rate, ddof=1)[0, 1])
    assert e.length_rate_pearson == pytest.approx(np.corrcoef(n, rate)[0, 1])
    assert e.length_rate_corr == e.length_rate_pearson
    # Decomposition with the population covariance (1/M): CE = E[N] E[r] + Cov_pop.
    assert e.length_driven == pytest.approx(n.mean() * rate.mean())
    assert e.length_rate_cov_pop == pytest.approx(np.mean((n - n.mean()) * (rate - rate.mean())))
    assert e.length_driven + e.length_rate_cov_pop == pytest.approx(e.ce_star)
    assert e.length_driven_share + e.cov_share == pytest.approx(1.0)
    assert e.truncation_rate == pytest.approx(2 / 3)  # N >= T_max, EOS at the cap included
    assert e.truncation_prob == pytest.approx(1 / 3)  # no EOS at all (the exact result's quantity)
    assert e.length_pmf.tolist() == pytest.approx([0, 1 / 3, 0, 2 / 3])
    # Running rate at t = 1, 2, 3 over active rollouts (N_i >= t).
    assert e.trajectory_positions.tolist() == [1, 2, 3]
    assert e.trajectory_active.tolist() == [3, 2, 2]
    assert e.trajectory_rate == pytest.approx([0.6, (1.5 / 2 + 0.8 / 2) / 2, (1.8 / 3 + 1.2 / 3) / 2])
    d = json.loads(json.dumps(e.to_dict()))
    assert d["ce_star"] == pytest.approx(1.2) and d["length_rate_corr"] == pytest.approx(e.length_rate_pearson)


def test_undefined_quantities_are_nan():
    e = estimate_arrays(np.array([2]), np.array([[0.5, 0.5]]), None, max_new_tokens=2)
    assert e.ce_star == 1.0 and math.isnan(e.ce_star_se) and math.isnan(e.ce_star_ci[0])
    assert math.isnan(e.ce_star_surprisal)  # no log q given
    # Constant N: the correlations are undefined.
    e = estimate_arrays(np.array([2, 2, 2, 2]), np.array([[0.5, 0.1], [0.2, 0.2], [0.3, 0.9], [0.1, 0.1]]),
                        None, max_new_tokens=2)
    assert math.isnan(e.length_rate_pearson) and math.isnan(e.length_rate_spearman)
    assert math.isnan(e.length_rate_kendall)
    assert e.length_rate_cov == 0.0


def test_estimate_validates():
    with pytest.raises(ValueError, match="lengths"):
        estimate_arrays(np.array([3]), np.zeros((1, 3)), None, max_new_tokens=2)
    with pytest.raises(ValueError, match="bin_step"):
        estimate_arrays(np.array([1]), np.zeros((1, 1)), None, max_new_tokens=2, bin_step=0)
    with pytest.raises(ValueError, match="confidence"):
        estimate_arrays(np.array([1, 2]), np.zeros((2, 2)), None, max_new_tokens=2, confidence=1.5)
    r = Rollouts(np.zeros((1, 1), dtype=np.int64), np.array([2]), np.zeros((1, 1)), np.zeros((1, 1)),
                 np.array([True]), 4, (0,), start_depths=np.array([1]))
    with pytest.raises(ValueError, match="root"):
        estimate(r)


@pytest.mark.parametrize("seed", range(4))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 6, size=57).astype(float)  # many ties, like lengths
    r = np.round(rng.normal(size=57) + 0.3 * n, 1)  # ties too
    assert rankdata(r) == pytest.approx(stats.rankdata(r))
    assert pearson(n, r) == pytest.approx(stats.pearsonr(n, r).statistic, abs=1e-12)
    assert spearman(n, r) == pytest.approx(stats.spearmanr(n, r).statistic, abs=1e-12)
    assert kendall_tau_b(n, r) == pytest.approx(stats.kendalltau(n, r, variant="b").statistic, abs=1e-12)
    big = rng.integers(0, 40, size=3000).astype(float)
    other = big + rng.integers(0, 30, size=3000)
    assert kendall_tau_b(big, other) == pytest.approx(stats.kendalltau(big, other).statistic, abs=1e-12)


@pytest.mark.parametrize("dof", [1, 2, 5, 30, 1000])
def test_student_t_quantile_matches_scipy(dof):
    for q in (0.6, 0.975, 0.995):
        assert student_t_ppf(q, dof) == pytest.approx(stats.t.ppf(q, dof), rel=1e-9)


def test_collapsed_strata_variance_by_hand():
    y = np.array([1.0, 3.0, 2.0, 2.0, 5.0])
    # Pairs (1, 3) and then the trailing triple (2, 2, 5): (1/25) [(1-3)^2 + 1.5 * sum (y - 3)^2].
    assert collapsed_strata_var(y) == pytest.approx((4.0 + 1.5 * 6.0) / 25.0)
    assert collapsed_strata_var(np.array([1.0, 4.0])) == pytest.approx(9.0 / 4.0)
    assert math.isnan(collapsed_strata_var(np.array([1.0])))


# --- against the exact canopy -----------------------------------------------------------------------


def test_rb_and_naive_within_four_se_for_many_seeds():
    """100 independent runs (5 models x 20 seeds) of M = 1000 rollouts: every RB and naive estimate lies
    within 4 of its standard errors of the exact CE*_max (P(|z| > 4) ~ 6e-5 per check)."""
    for v, t, seed, scale, eb in MODELS:
        fn, kw = _model(v, t, seed, scale, eb)
        truth = canopy_rs.exact(fn, **kw).ce_star
        for s in range(20):
            e = estimate(sample(fn, num_rollouts=1000, seed=1000 + s, **kw))
            assert abs(e.ce_star - truth) < 4 * e.ce_star_se
            assert abs(e.ce_star_surprisal - truth) < 4 * e.ce_star_surprisal_se


def test_z_scores_are_standard_normal_and_intervals_cover():
    """1000 z-scores per estimator (5 models x 200 disjoint groups of M = 50 i.i.d. rollouts).

    Tolerances: the mean of 1000 z's has SE ~0.032 (+ a small negative skew bias for the naive estimator):
    |mean| < 0.15. Their SD is ~1.02 for t_49 plus skew, with sampling SE ~0.03: 0.9 < SD < 1.15. Coverage of
    the 95% t-interval: binomial SE 0.0069, so 0.925 < rate < 0.975 (~3.6 SE)."""
    z = {"rb": [], "naive": []}
    cover = {"rb": [], "naive": []}
    m, groups = 50, 200
    for v, t, seed, scale, eb in MODELS:
        fn, kw = _model(v, t, seed, scale, eb)
        truth = canopy_rs.exact(fn, **kw).ce_star
        r = sample(fn, num_rollouts=m * groups, seed=seed, **kw)
        for g in range(groups):
            e = estimate(r.subset(slice(g * m, (g + 1) * m)))
            for key, val, se, ci in (("rb", e.ce_star, e.ce_star_se, e.ce_star_ci),
                                     ("naive", e.ce_star_surprisal, e.ce_star_surprisal_se, e.ce_star_surprisal_ci)):
                z[key].append((val - truth) / se)
                cover[key].append(ci[0] <= truth <= ci[1])
    for key in z:
        zz = np.array(z[key])
        assert abs(zz.mean()) < 0.15, key
        assert 0.9 < zz.std(ddof=1) < 1.15, key
        assert 0.925 < np.mean(cover[key]) < 0.975, key


def test_other_estimates_agree_with_exact():
    fn, kw = _model(4, 4, 7, 1.5, 0.0)
    ex = canopy_rs.exact(fn, **kw)
    e = estimate(sample(fn, num_rollouts=40000, seed=3, **kw))
    # 5-sigma checks with each estimate's own SE (delta-method ones included).
    for name in ("expected_length", "entropy_rate", "gen_ppl", "branching_factor", "length_rate_cov"):
        assert abs(getattr(e, name) - getattr(ex, name)) < 5 * getattr(e, name + "_se"), name
    assert abs(e.truncation_prob - ex.truncation_prob) < 5 * math.sqrt(ex.truncation_prob / 40000)
    assert abs(e.length_rate_pearson - ex.length_rate_corr) < 0.03
    assert np.abs(e.length_pmf - ex.length_pmf).max() < 0.015
    assert e.length_var == pytest.approx(ex.length_var, rel=0.05)


@pytest.mark.parametrize("p_bushy, var_rb, var_naive", [(0.05, 0.727, 2.233), (0.95, 0.727, 0.045)])
def test_two_branch_counterexample(p_bushy, var_rb, var_naive):
    """docs/definitions.md#monte-carlo: when the common branch is the bushy one, the naive estimator has lower variance
    (0.045) than the Rao-Blackwellised one (0.727)."""
    fn, kw = two_branch_model(p_bushy)
    ex = canopy_rs.exact(fn, return_nodes=True, **kw)
    table = leaf_table(ex)
    lp = np.array([v[0] for v in table.values()])
    hs = np.array([v[1] for v in table.values()])
    p = np.exp(lp)
    exact_var_rb = float(p @ hs**2 - (p @ hs) ** 2)
    exact_var_naive = float(p @ lp**2 - (p @ lp) ** 2)
    # docs/definitions.md#monte-carlo quotes 3 decimals; the naive variance is 0.04447 ("0.045" rounds 0.0445).
    assert exact_var_rb == pytest.approx(var_rb, abs=1e-3)
    assert exact_var_naive == pytest.approx(var_naive, abs=1e-3)
    assert p @ hs == pytest.approx(ex.ce_star) and -(p @ lp) == pytest.approx(ex.ce_star)
    m = 20000
    e = estimate(sample(fn, num_rollouts=m, seed=0, **kw))
    # Sample variances (M SE^2) within 15% (~5 sampling SDs for these two-point laws).
    assert e.ce_star_se**2 * m == pytest.approx(exact_var_rb, rel=0.15)
    assert e.ce_star_surprisal_se**2 * m == pytest.approx(exact_var_naive, rel=0.15)
    if p_bushy > 0.5:
        assert e.ce_star_surprisal_se < e.ce_star_se
    else:
        assert e.ce_star_surprisal_se > e.ce_star_se


def test_stratified_estimate_uses_conservative_strata_se():
    fn, kw = _model(4, 5, 3, 1.5, 0.5)
    truth = canopy_rs.exact(fn, **kw).ce_star
    vals, ses = [], []
    for s in range(200):
        e = estimate(sample(fn, num_rollouts=40, seed=s, stratified=True, **kw))
        vals.append(e.ce_star)
        ses.append(e.ce_star_se)
    vals = np.array(vals)
    assert abs(vals.mean() - truth) < 4 * vals.std(ddof=1) / math.sqrt(200)
    # Collapsed strata overestimate: the mean reported variance is at least the empirical one (with a
    # 20% margin for the sampling error of the variance of 200 values).
    assert np.mean(np.square(ses)) > 0.8 * vals.var(ddof=1)
    iid = np.array([estimate(sample(fn, num_rollouts=40, seed=s, **kw)).ce_star for s in range(200)])
    assert vals.var() < iid.var()


# --- stochastic beam search -------------------------------------------------------------------------


def test_sbs_enumerates_small_trees_exactly():
    fn, kw = _model(3, 3, 0, 1.0, 0.0)
    ex = canopy_rs.exact(fn, **kw)
    r = stochastic_beam_search(fn, beam_size=ex.num_leaves, seed=0, **kw)
    assert r.is_exact and r.num_leaves == ex.num_leaves and math.isinf(r.threshold)
    assert r.ce_star == pytest.approx(ex.ce_star)
    assert r.ce_star_surprisal == pytest.approx(ex.ce_star)
    assert r.ce_star_se == 0.0
    assert np.exp(r.leaf_log_reach).sum() == pytest.approx(1.0)


def test_sbs_samples_distinct_leaves_and_keeps_the_protocol():
    fn, kw = _model(4, 4, 1, 2.0, 0.0)
    be = CheckingBackend(fn, 4, [0])
    r = stochastic_beam_search(be, beam_size=10, seed=3, max_new_tokens=4)
    assert r.num_leaves == 10 and not r.is_exact
    assert len({tuple(t) for t in r.leaf_tokens}) == 10
    assert np.all((r.leaf_inclusion > 0) & (r.leaf_inclusion <= 1))
    assert be.released == set(be.expanded)
    # Every leaf's recorded reach and path entropy match the exact tree.
    table = leaf_table(canopy_rs.exact(fn, return_nodes=True, **kw))
    for toks, lp, hs, n in zip(r.leaf_tokens, r.leaf_log_reach, r.leaf_entropy_sums, r.leaf_lengths):
        assert table[tuple(toks)][0] == pytest.approx(lp) and table[tuple(toks)][1] == pytest.approx(hs)
        assert n == len(toks)
    with pytest.raises(ValueError, match="beam_size"):
        stochastic_beam_search(fn, beam_size=0, **kw)


@pytest.mark.parametrize("v,t,scale,k", [(4, 4, 1.5, 16), (5, 6, 3.0, 12)])
def test_sbs_is_unbiased_with_calibrated_variance(v, t, scale, k):
    """600 runs per tree. Unbiased HT estimators: |z| of the mean < 4. Node-level SE (with the nested
    covariance): mean reported variance within 25% of the empirical one (its sampling SD over 600 runs is
    ~8%); the normal interval covers at least 85% (the HT sum is right-skewed: a rare heavy node, when
    missed, also leaves the variance estimate low)."""
    fn = random_logits_fn(v, seed=1, scale=scale)
    kw = dict(vocab_size=v, eos_token_ids=[0], max_new_tokens=t)
    truth = canopy_rs.exact(fn, **kw).ce_star
    res = [stochastic_beam_search(fn, beam_size=k, seed=s, **kw) for s in range(600)]
    for attr in ("ce_star", "ce_star_surprisal"):
        x = np.array([getattr(r, attr) for r in res])
        se = np.array([getattr(r, attr + "_se") for r in res])
        lo = np.array([getattr(r, attr + "_ci")[0] for r in res])
        hi = np.array([getattr(r, attr + "_ci")[1] for r in res])
        assert abs(x.mean() - truth) < 4 * x.std(ddof=1) / math.sqrt(x.size), attr
        assert np.mean(se**2) == pytest.approx(x.var(ddof=1), rel=0.25), attr
        assert np.mean((lo <= truth) & (truth <= hi)) >= 0.85, attr


def test_sbs_beats_plain_monte_carlo_on_a_peaked_model():
    """The regression the node-level estimator fixed: on a peaked model (most mass on few paths) SBS's RMSE
    at equal model tokens is far below plain Monte Carlo's (measured 0.34x; the old leaf-weighted
    estimator was 2-5x *worse* than Monte Carlo on SmolLM2)."""
    fn = random_logits_fn(5, seed=1, scale=3.0)
    kw = dict(vocab_size=5, eos_token_ids=[0], max_new_tokens=6)
    truth = canopy_rs.exact(fn, **kw).ce_star
    sbs = [stochastic_beam_search(fn, beam_size=12, seed=s, **kw) for s in range(200)]
    tokens = np.mean([r.cost["rows_evaluated"] for r in sbs])
    mc = [sample(fn, num_rollouts=12, seed=s, share_prefixes=False, **kw) for s in range(200)]
    mc_tokens = np.mean([r.cost["rows_evaluated"] for r in mc])
    assert tokens <= 1.2 * mc_tokens
    rmse_sbs = math.sqrt(np.mean([(r.ce_star - truth) ** 2 for r in sbs]))
    rmse_mc = math.sqrt(np.mean([(estimate(r).ce_star - truth) ** 2 for r in mc]))
    assert rmse_sbs < 0.5 * rmse_mc
