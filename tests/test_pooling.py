"""Pooling across prompts and the paired bootstrap, checked against hand computations (docs/definitions.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from canopy_rs.estimators import estimate_arrays, paired_bootstrap, pool
from canopy_rs.estimators.pooling import pooled_columns, prompt_columns


def _prompt(**kw):
    base = dict(
        ce_star=1.0, ce_star_surprisal=1.0, expected_length=2.0, entropy_rate=0.5, truncation_rate=0.0,
        length_rate_pearson=0.0, length_rate_spearman=0.0, length_rate_kendall=0.0, length_rate_cov=0.0,
        num_rollouts=100,
    )
    base.update(kw)
    return base


def test_linear_means_and_exp_after_averaging():
    ps = [
        _prompt(ce_star=2.0, expected_length=4.0, entropy_rate=0.4, truncation_rate=0.1),
        _prompt(ce_star=6.0, expected_length=2.0, entropy_rate=1.2, truncation_rate=0.3),
        _prompt(ce_star=float("nan"), expected_length=3.0, entropy_rate=0.2, truncation_rate=float("nan")),
    ]
    p = pool(ps)
    assert p.num_prompts == 3
    assert p.ce_star == pytest.approx(4.0)  # nanmean drops the NaN prompt
    assert p.expected_length == pytest.approx(3.0)
    assert p.entropy_rate == pytest.approx(0.6)
    assert p.truncation_rate == pytest.approx(0.2)
    assert p.gen_ppl == pytest.approx(math.exp(4.0 / 3.0))
    # Not the mean of per-prompt GenPPLs.
    assert p.gen_ppl != pytest.approx(np.mean([math.exp(2 / 4), math.exp(6 / 2)]))
    assert p.branching_factor == pytest.approx(math.exp(0.6))
    # Decomposition from pooled values: E[N] = CE / log GenPPL, E[r] = log BF, Cov = CE - E[N] E[r].
    en = p.ce_star / math.log(p.gen_ppl)
    er = math.log(p.branching_factor)
    assert en == pytest.approx(3.0)
    assert p.length_driven == pytest.approx(en * er)
    assert p.length_rate_cov_residual == pytest.approx(4.0 - 3.0 * 0.6)
    assert p.length_driven_share + p.cov_share == pytest.approx(1.0)


def test_fisher_kendall_and_covariance_weights():
    ps = [
        _prompt(num_rollouts=10, length_rate_pearson=0.5, length_rate_spearman=0.3, length_rate_kendall=0.2,
                length_rate_cov=1.0),
        _prompt(num_rollouts=20, length_rate_pearson=-0.2, length_rate_spearman=0.1, length_rate_kendall=-0.1,
                length_rate_cov=-2.0),
        # n = 3: zero Fisher weight (n - 3), but Kendall (3 pairs) and covariance (2) weights are positive.
        _prompt(num_rollouts=3, length_rate_pearson=0.9, length_rate_spearman=0.9, length_rate_kendall=1.0,
                length_rate_cov=5.0),
        # Non-finite entries are dropped.
        _prompt(num_rollouts=50, length_rate_pearson=float("nan"), length_rate_spearman=float("inf"),
                length_rate_kendall=float("nan"), length_rate_cov=float("nan")),
    ]
    p = pool(ps)
    assert p.length_rate_pearson == pytest.approx(math.tanh((7 * math.atanh(0.5) + 17 * math.atanh(-0.2)) / 24))
    assert p.length_rate_spearman == pytest.approx(math.tanh((7 * math.atanh(0.3) + 17 * math.atanh(0.1)) / 24))
    assert p.length_rate_kendall == pytest.approx((45 * 0.2 + 190 * -0.1 + 3 * 1.0) / (45 + 190 + 3))
    assert p.length_rate_cov == pytest.approx((9 * 1.0 + 19 * -2.0 + 2 * 5.0) / (9 + 19 + 2))


def test_fisher_clips_and_falls_back_to_the_unweighted_fisher_mean():
    p = pool([_prompt(num_rollouts=10, length_rate_pearson=1.0), _prompt(num_rollouts=10, length_rate_pearson=1.0)])
    assert p.length_rate_pearson == pytest.approx(0.999999)  # clipped before atanh
    # No weight left (every n_p <= 3): the unweighted mean on the Fisher scale (docs/pooling-parity.md, P1).
    q = pool([_prompt(num_rollouts=3, length_rate_pearson=0.2), _prompt(num_rollouts=2, length_rate_pearson=0.6),
              _prompt(num_rollouts=3, length_rate_pearson=float("nan"))])
    assert q.length_rate_pearson == pytest.approx(math.tanh((math.atanh(0.2) + math.atanh(0.6)) / 2))
    # Equal n: reduces to tanh(mean atanh r).
    r = pool([_prompt(num_rollouts=40, length_rate_pearson=x) for x in (0.1, 0.4, -0.3)])
    assert r.length_rate_pearson == pytest.approx(math.tanh(np.mean(np.arctanh([0.1, 0.4, -0.3]))))


def _raw_prompts(seed, sizes):
    """Per-prompt (N, H) data and their PromptEstimates."""
    rng = np.random.default_rng(seed)
    data, ests = [], []
    for m in sizes:
        n = rng.integers(1, 9, size=m)
        ent = np.zeros((m, 8))
        for i in range(m):
            ent[i, : n[i]] = rng.gamma(2.0, 0.3 + 0.05 * n[i], size=n[i])
        data.append((n, ent.sum(1) / n))
        ests.append(estimate_arrays(n, ent, None, max_new_tokens=8))
    return data, ests


def test_pooled_covariance_is_pooled_within_prompt_covariance():
    data, ests = _raw_prompts(0, [12, 30, 7, 50])
    num = sum(((n - n.mean()) * (r - r.mean())).sum() for n, r in data)
    den = sum(len(n) - 1 for n, _ in data)
    assert pool(ests).length_rate_cov == pytest.approx(num / den)


def test_residual_is_within_plus_between_covariance():
    # docs/definitions.md#decomposition: residual = mean_p Cov_pop^(p)(N, r) + Cov_pop over prompts(Nbar_p, Rbar_p).
    data, ests = _raw_prompts(1, [20, 20, 35, 9, 14])
    within = np.mean([np.mean((n - n.mean()) * (r - r.mean())) for n, r in data])
    nb = np.array([n.mean() for n, _ in data])
    rb = np.array([r.mean() for _, r in data])
    between = np.mean((nb - nb.mean()) * (rb - rb.mean()))
    assert pool(ests).length_rate_cov_residual == pytest.approx(within + between, rel=1e-10)


def test_pooled_trajectory_is_rollout_weighted():
    lengths_a = np.array([2, 4])
    ent_a = np.array([[1.0, 1.0, 0, 0], [2.0, 2.0, 2.0, 2.0]])
    lengths_b = np.array([4])
    ent_b = np.array([[0.5, 0.5, 0.5, 0.5]])
    ea = estimate_arrays(lengths_a, ent_a, None, max_new_tokens=4, bin_step=2)
    eb = estimate_arrays(lengths_b, ent_b, None, max_new_tokens=4, bin_step=2)
    p = pool([ea, eb])
    assert p.trajectory_positions.tolist() == [2, 4]
    assert p.trajectory_active.tolist() == [3, 2]
    # t=2: rates 1, 2, 0.5 over three rollouts; t=4: 2 and 0.5.
    assert p.trajectory_rate == pytest.approx([3.5 / 3, 1.25])
    # The to_dict() form (what the CLI stores) pools the same way.
    q = pool([ea.to_dict(), eb.to_dict()])
    assert q.trajectory_rate == pytest.approx(p.trajectory_rate) and q.ce_star == pytest.approx(p.ce_star)


def test_pool_validates():
    with pytest.raises(ValueError, match="at least one prompt"):
        pool([])


# --- paired bootstrap ------------------------------------------------------------------------------


def _loop_bootstrap(base, ft, metric, b, seed):
    """Reference: one replicate at a time with pool() on the resampled prompt lists."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), size=(b, len(base)))
    rb = np.array([getattr(pool([base[i] for i in row]), metric) for row in idx])
    rf = np.array([getattr(pool([ft[i] for i in row]), metric) for row in idx])
    return rb, rf


@pytest.mark.parametrize("metric", ["ce_star", "gen_ppl", "length_rate_pearson", "length_rate_kendall"])
def test_bootstrap_matches_replicate_loop(metric):
    _, base = _raw_prompts(2, [15, 20, 25, 30, 12, 18])
    _, ft = _raw_prompts(3, [15, 20, 25, 30, 12, 18])
    b = 200
    res = paired_bootstrap(base, ft, num_replicates=b, seed=7, metrics=[metric])
    rb, rf = _loop_bootstrap(base, ft, metric, b, 7)
    e = res[metric]
    assert e["base"]["value"] == pytest.approx(getattr(pool(base), metric))
    assert e["finetuned"]["value"] == pytest.approx(getattr(pool(ft), metric))
    assert e["base"]["se"] == pytest.approx(np.std(rb, ddof=1))
    assert e["finetuned"]["se"] == pytest.approx(np.std(rf, ddof=1))
    d = rf - rb
    assert e["delta"]["value"] == pytest.approx(e["finetuned"]["value"] - e["base"]["value"])
    assert e["delta"]["se"] == pytest.approx(np.std(d, ddof=1))
    assert [e["delta"]["ci_low"], e["delta"]["ci_high"]] == pytest.approx(np.percentile(d, [2.5, 97.5]))
    if metric in ("ce_star", "gen_ppl"):
        pb = e["base"]["value"]
        assert e["percent_delta"]["value"] == pytest.approx(100 * (e["finetuned"]["value"] - pb) / abs(pb))
        assert e["percent_delta"]["se"] == pytest.approx(np.std(100 * d / np.abs(rb), ddof=1))
    else:
        assert "percent_delta" not in e


def test_bootstrap_is_paired_and_reproducible():
    _, base = _raw_prompts(4, [10, 20, 30, 40])
    a = paired_bootstrap(base, base, num_replicates=300, seed=1)
    for m, e in a.table.items():
        # Same prompts on both sides: every replicate delta is exactly 0 (the pairing).
        assert e["delta"]["se"] == 0.0 and e["delta"]["ci_low"] == 0.0 and e["delta"]["ci_high"] == 0.0, m
    b1 = paired_bootstrap(base, base[::-1], num_replicates=300, seed=5).to_dict()
    b2 = paired_bootstrap(base, base[::-1], num_replicates=300, seed=5).to_dict()
    assert b1 == b2
    assert set(a.table) == {"ce_star", "gen_ppl", "branching_factor", "length_rate_pearson", "length_rate_spearman",
                            "length_rate_kendall", "length_rate_cov"}
    assert {r["side"] for r in a.rows()} == {"base", "finetuned", "delta", "percent_delta"}


def test_bootstrap_validates():
    _, base = _raw_prompts(5, [10, 10])
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap(base, base[:1])
    with pytest.raises(ValueError, match="num_replicates"):
        paired_bootstrap(base, base, num_replicates=1)
    with pytest.raises(ValueError, match="unknown metrics"):
        paired_bootstrap(base, base, metrics=["nope"])
    with pytest.raises(ValueError, match="at least one prompt"):
        paired_bootstrap([], [])


def test_vectorised_pooling_equals_pool():
    _, ests = _raw_prompts(6, [9, 14, 22])
    cols = prompt_columns(ests)
    idx = np.array([[0, 0, 2], [1, 2, 2], [2, 1, 0]])
    got = pooled_columns(cols, idx)
    for row, r in enumerate(idx):
        ref = pool([ests[i] for i in r])
        for k, v in got.items():
            assert v[row] == pytest.approx(getattr(ref, k), nan_ok=True), k


def test_pool_exact_weighs_every_prompt_the_same():
    """Exact per-prompt values are population values: plain means, exp after averaging, the equal-weight
    Fisher-z mean of rho; a NaN rho (constant length) is dropped, as pool() drops it."""
    from canopy_rs.estimators.pooling import pool_exact

    rows = [
        {"ce_star": 2.0, "expected_length": 4.0, "entropy_rate": 0.5, "truncation_prob": 0.2,
         "length_rate_corr": 0.5, "length_rate_cov": -0.1},
        {"ce_star": 4.0, "expected_length": 2.0, "entropy_rate": 1.5, "truncation_prob": 0.6,
         "length_rate_corr": -0.2, "length_rate_cov": 0.3},
        {"ce_star": 3.0, "expected_length": 3.0, "entropy_rate": 1.0, "truncation_prob": 0.4,
         "length_rate_corr": math.nan, "length_rate_cov": 0.1},
    ]
    p = pool_exact(rows)
    assert p["num_prompts"] == 3
    assert p["ce_star"] == pytest.approx(3.0) and p["expected_length"] == pytest.approx(3.0)
    assert p["gen_ppl"] == pytest.approx(math.exp(1.0)) and p["branching_factor"] == pytest.approx(math.exp(1.0))
    assert p["truncation_prob"] == pytest.approx(0.4)
    assert p["length_rate_corr"] == pytest.approx(math.tanh((math.atanh(0.5) + math.atanh(-0.2)) / 2))
    assert p["length_rate_cov"] == pytest.approx(0.1)
    assert p["length_rate_cov_residual"] == pytest.approx(3.0 - 3.0 * 1.0)
    with pytest.raises(ValueError, match="at least one"):
        pool_exact([])
