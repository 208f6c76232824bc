"""The budget-spending estimators: estimate_hybrid with the recommended configuration (depth groups, a pilot
round, then Neyman allocation) and estimate_stratified (stratified rollouts from the root, drawn in rounds
until the budget is used). Both judged against the independent brute-force enumerator on small random models:
unbiased, an SE that is neither too small nor too large, the measured model tokens close to the budget, and
the Neyman rounds placing pairs where the pilot saw the variance."""

from __future__ import annotations

import math

import numpy as np
import pytest

import canopy_rs.estimators.hybrid as hybrid
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.estimators.hybrid import RECOMMENDED, _pairs_for, estimate_hybrid, estimate_stratified
from canopy_rs.testing import random_logits_fn
from estimator_helpers import OneTokenPerRowBackend
from reference import enumerate_canopy

REPEATS = 300
# (model, kw, budget in model tokens): near-uniform rows with a rare EOS (bushy), a peaked model, and a
# temperature / top-p policy; 185-364 internal nodes each, so the budgets cover under half of a canopy.
CASES = {
    "bushy": (random_logits_fn(5, seed=0, scale=0.5, eos_bias=-3.0),
              dict(vocab_size=5, eos_token_ids=[0], max_new_tokens=6, top_k=3), 200),
    "peaked": (random_logits_fn(5, seed=5, scale=3.0), dict(vocab_size=5, eos_token_ids=[0], max_new_tokens=5), 150),
    "t0.8_p0.9": (random_logits_fn(6, seed=2, scale=1.0),
                  dict(vocab_size=6, eos_token_ids=[0], max_new_tokens=5, temperature=0.8, top_p=0.9), 150),
}
# Bushier and deeper (5,461 internal nodes): several depth groups at 600 tokens.
DEEP = (random_logits_fn(6, seed=0, scale=0.5, eos_bias=-3.0),
        dict(vocab_size=6, eos_token_ids=[0], max_new_tokens=7, top_k=4))
ESTIMATORS = {
    "neyman": lambda m, b, s, kw: estimate_hybrid(m, budget=b, seed=s, **RECOMMENDED, **kw),
    "stratified": lambda m, b, s, kw: estimate_stratified(m, budget=b, seed=s, **kw),
}


def _truth(fn, kw):
    pol = {k: kw[k] for k in ("temperature", "top_k", "top_p") if k in kw}
    return enumerate_canopy(lambda p: fn([p])[0].tolist(), kw["eos_token_ids"], kw["max_new_tokens"], **pol)[1]


def _model(fn, kw, cached):
    """A plain callable pays its whole prefix per row; a backend with a KV cache one token per row."""
    return OneTokenPerRowBackend(fn, kw["vocab_size"], kw["eos_token_ids"]) if cached else fn


@pytest.mark.parametrize("cached", [False, True], ids=["prefix_cost", "one_token_per_row"])
@pytest.mark.parametrize("est", sorted(ESTIMATORS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_unbiased_with_a_calibrated_se(case, est, cached):
    """300 seeds against the brute force. Bias: |z| of the mean < 4, and that check is sharp enough to catch
    a 5% bias (4 SDs of the mean < 5% of CE*; measured 0.02-1%). SE: mean SE^2 / empirical variance in
    0.6-1.6 (measured 0.89-1.18; a 10x inflated SE gives 100) and the mean per-run z in [-0.5, 0.5]
    (measured -0.25 to 0.37 - heavy-tailed with a few pairs per round; a 5% bias moves it by 2 or more
    here); 95% intervals cover 0.80-0.99 of the runs (measured 0.83-0.96: few pairs per
    round give a Student-t interval on skewed sums, slightly short)."""
    fn, kw, budget = CASES[case]
    truth = _truth(fn, kw)
    model = _model(fn, kw, cached)
    res = [ESTIMATORS[est](model, budget, s, kw) for s in range(REPEATS)]
    assert not any(r.is_exact for r in res)
    x = np.array([r.ce_star for r in res])
    se = np.array([r.ce_star_se for r in res])
    sem = x.std(ddof=1) / math.sqrt(REPEATS)
    assert abs(x.mean() - truth) < 4 * sem
    assert 4 * sem < 0.05 * truth
    assert np.all(se > 0)
    assert 0.6 < np.mean(se**2) / x.var(ddof=1) < 1.6
    assert abs(np.mean((x - truth) / se)) < 0.5
    cover = np.mean([r.ce_star_ci[0] <= truth <= r.ce_star_ci[1] for r in res])
    assert 0.80 <= cover <= 0.99


@pytest.mark.parametrize("cached", [False, True], ids=["prefix_cost", "one_token_per_row"])
@pytest.mark.parametrize("est", sorted(ESTIMATORS))
def test_spends_the_budget_in_measured_tokens(est, cached):
    """The measured model tokens (the cost record's own, whatever a row costs on the backend) land close to
    the budget and never far over it: mean 0.85-1.05 x the budget (measured 0.91-1.02) and every run at
    most 1.3x (measured 1.10x) when a row costs one token; mean 0.85-1.1x (measured 0.91-1.05) and every run
    at most 1.6x (measured 1.52x) when it costs its whole prefix: at 150 tokens a pair of depth-5 rollouts
    then costs up to 30 tokens, a first round is planned from what the head's shallower rows cost, and the
    last round's pairs from a handful of measured ones. The exception, measured and kept honest here: stratified
    rollouts from the root of the peaked canopy through a one-token-per-row backend share most of their
    prefixes, more than the few rollouts behind each plan can predict, so the rounds underspend (0.61x);
    they must still never overspend."""
    for case, (fn, kw, budget) in sorted(CASES.items()):
        model = _model(fn, kw, cached)
        tok = np.array([ESTIMATORS[est](model, budget, s, kw).cost["model_tokens"] for s in range(60)])
        assert tok.max() <= (1.6 if not cached else 1.3) * budget, (case, tok.max())
        if est == "stratified" and case == "peaked" and cached:
            assert tok.mean() >= 0.25 * budget
        else:
            assert 0.85 * budget <= tok.mean() <= (1.1 if not cached else 1.05) * budget, (case, tok.mean())


@pytest.mark.parametrize("cached", [False, True], ids=["prefix_cost", "one_token_per_row"])
def test_larger_budgets_spend_within_a_few_percent(cached):
    """With more rollouts behind each plan the spend is tight: every run within 0.9-1.05x the budget."""
    fn, kw = DEEP
    model = _model(fn, kw, cached)
    budget = 2000 if not cached else 600  # the same few hundred rollouts
    for est in sorted(ESTIMATORS):
        tok = np.array([ESTIMATORS[est](model, budget, s, kw).cost["model_tokens"] for s in range(30)])
        assert 0.9 * budget <= tok.min() and tok.max() <= 1.05 * budget, (est, tok.min(), tok.max())


def test_pairs_follow_the_neyman_rule():
    """n_g ~ M_g S_g / sqrt(c_g), scaled to the round's tokens, at least one pair per group; proportional
    (n_g ~ M_g) without pilot SDs."""
    mass, cost = np.array([0.5, 0.5]), np.array([4.0, 4.0])
    p = _pairs_for(800.0, mass, cost, np.array([1.0, 3.0]))
    assert p[1] == pytest.approx(3 * p[0], rel=0.05)
    assert float(np.sum(2 * p * cost)) == pytest.approx(800.0, rel=0.02)
    p = _pairs_for(800.0, mass, np.array([1.0, 4.0]), np.array([1.0, 1.0]))
    assert p[0] == pytest.approx(2 * p[1], rel=0.05)  # per token: 1/sqrt(c)
    p = _pairs_for(800.0, np.array([0.2, 0.8]), cost, None)
    assert p[1] == pytest.approx(4 * p[0], rel=0.05)
    # A group whose pilot pairs agreed exactly keeps a floor (5% of the largest SD) and one pair.
    p = _pairs_for(40.0, mass, cost, np.array([0.0, 2.0]))
    assert p[0] >= 1 and p[1] > p[0]


def test_neyman_rounds_put_pairs_where_the_pilot_saw_variance(monkeypatch):
    """Record each round's plan in a real run: the first (pilot) round is proportional, every later round
    gets the pilot's within-pair SDs, and per unit of group mass the group with the largest SD / sqrt(cost)
    gets at least as many pairs as the one with the smallest (strictly more where they differ by 2x), unless
    the smaller one is at its one-pair floor."""
    calls = []

    def spy(tokens, mass, cost_g, sd):
        out = _pairs_for(tokens, mass, cost_g, sd)
        calls.append((mass.copy(), cost_g.copy(), None if sd is None else sd.copy(), out.copy()))
        return out

    monkeypatch.setattr(hybrid, "_pairs_for", spy)
    fn, kw = DEEP
    checked = 0
    for s in range(10):
        calls.clear()
        r = estimate_hybrid(_model(fn, kw, True), budget=600, seed=s, **RECOMMENDED, **kw)
        assert r.num_rounds == len(calls) >= 2 and r.num_groups >= 2
        assert calls[0][2] is None and all(c[2] is not None for c in calls[1:])
        for mass, cost_g, sd, pairs in calls[1:]:
            key = np.maximum(sd, 0.05 * sd.max()) / np.sqrt(cost_g)
            hi, lo = int(np.argmax(key)), int(np.argmin(key))
            if pairs[lo] == 1:
                continue  # the one-pair floor, not the rule
            assert (pairs[hi] + 1) / mass[hi] >= pairs[lo] / mass[lo]  # up to rounding
            if key[hi] > 2 * key[lo]:
                assert pairs[hi] / mass[hi] > pairs[lo] / mass[lo]
                checked += 1
    assert checked > 0


def test_bad_arguments_are_named():
    fn, kw, _ = CASES["peaked"]
    with pytest.raises(InvalidArgumentError, match="allocation"):
        estimate_hybrid(fn, budget=100, allocation="optimal", **kw)
    with pytest.raises(InvalidArgumentError, match="frontier_order"):
        estimate_hybrid(fn, budget=100, frontier_order="breadth", **kw)
    with pytest.raises(InvalidArgumentError, match="frontier_sampling"):
        estimate_hybrid(fn, budget=100, frontier_sampling="poisson", **kw)
    with pytest.raises(ValueError, match="budget"):
        estimate_stratified(fn, budget=0, **kw)
    with pytest.raises(ValueError, match="budget"):
        estimate_stratified(fn, budget=-5, **kw)
    with pytest.raises(TypeError, match="budget"):
        estimate_stratified(fn, **kw)


def test_reproducible_and_reports_its_rounds():
    fn, kw, budget = CASES["t0.8_p0.9"]
    a = estimate_hybrid(fn, budget=budget, seed=7, **RECOMMENDED, **kw)
    b = estimate_hybrid(fn, budget=budget, seed=7, **RECOMMENDED, **kw)
    assert a.ce_star == b.ce_star and a.ce_star_se == b.ce_star_se
    assert a.allocation == "neyman" and a.frontier_order == "depth" and a.num_rounds >= 1
    assert a.ce_star == pytest.approx(a.head_sum + a.frontier_mass * a.tail_mean)
    assert a.dof > 0 and a.ce_star_ci[0] < a.ce_star < a.ce_star_ci[1]
    s = estimate_stratified(fn, budget=budget, seed=7, **kw)
    assert s.num_expanded == 1 and s.allocation == "proportional" and s.num_rounds >= 1


def test_few_rollouts_run_one_round_where_a_row_costs_one_token():
    """With tokens for under FEW_ROLLOUTS rollouts the recommended hybrid runs one proportional round where
    the head shows that a row costs one token (splitting a handful of rollouts over rounds loses
    stratification: side by side at 64 tokens, 0.84x plain MC on the SmolLM2 haiku canopy against 1.06x with
    two rounds), and two where a row may cost its prefix (the second corrects the first's cost plan). The
    round stays unbiased and its SE calibrated (300 seeds against the brute force, the limits of
    test_unbiased_with_a_calibrated_se; measured z 0.07, SE^2 ratio 1.09, coverage 0.96), and it spends 0.9x
    the budget (a last round aims short: LAST_AIM)."""
    fn, kw, _ = CASES["bushy"]
    budget = 60
    assert {estimate_hybrid(fn, budget=budget, seed=s, **RECOMMENDED, **kw).num_rounds for s in range(5)} == {2}
    model = _model(fn, kw, cached=True)
    res = [estimate_hybrid(model, budget=budget, seed=s, **RECOMMENDED, **kw) for s in range(REPEATS)]
    assert {r.num_rounds for r in res} == {1} and not any(r.is_exact for r in res)
    truth = _truth(fn, kw)
    x = np.array([r.ce_star for r in res])
    se = np.array([r.ce_star_se for r in res])
    assert abs(x.mean() - truth) < 4 * x.std(ddof=1) / math.sqrt(REPEATS)
    assert 0.6 < np.mean(se**2) / x.var(ddof=1) < 1.6
    cover = np.mean([r.ce_star_ci[0] <= truth <= r.ce_star_ci[1] for r in res])
    assert 0.80 <= cover <= 0.99
    tok = np.array([r.cost["model_tokens"] for r in res])
    assert 0.8 * budget <= tok.mean() <= 1.05 * budget and tok.max() <= 1.3 * budget


def test_the_head_tells_one_token_rows_from_prefix_costs():
    """A head's measured tokens against its rows: a KV cache pays at most one token per row (the root's
    forward is the prompt's, or counted as one), a stateless callable its prefix (the depths' sum)."""
    one = hybrid._one_token_rows
    # root + 4 rows at depth 1 + 3 at depth 2 + 1 at depth 3 (9 rows): prefix cost 4 + 6 + 3 = 13
    assert one(8, 9, 3) and one(9, 9, 3) and not one(13, 9, 3)
    # root + 3 at depth 1 + 1 at depth 2 (5 rows): a prefix costs 5, like a KV cache counting the root
    assert one(4, 5, 2) and not one(5, 5, 2)
    # nothing deeper than depth 1: both cost a token per row, so the head cannot tell
    assert not one(4, 5, 1)


def test_head_grows_past_half_the_budget_while_the_tail_keeps_its_rollouts():
    """Where the head pays (a row costs one token, the predicted tail error keeps falling) it grows past B/2:
    a canopy of fewer rows than 0.9 B is enumerated, exactly; otherwise it stops where the tokens left buy
    MIN_TAIL_ROLLOUTS rollouts (measured: a 135-row head and 16 rollouts at 150 tokens)."""
    fn, kw, _ = CASES["peaked"]
    pol = {k: kw[k] for k in ("temperature", "top_k", "top_p") if k in kw}
    _, truth, internal = enumerate_canopy(lambda p: fn([p])[0].tolist(), kw["eos_token_ids"], kw["max_new_tokens"], **pol)
    r = estimate_hybrid(_model(fn, kw, cached=True), budget=int(1.2 * internal), seed=0, **RECOMMENDED, **kw)
    assert r.is_exact and r.num_expanded == internal and r.ce_star == pytest.approx(truth, rel=1e-9)
    fn, kw, budget = CASES["t0.8_p0.9"]
    for s in range(5):
        r = estimate_hybrid(_model(fn, kw, cached=True), budget=budget, seed=s, **RECOMMENDED, **kw)
        assert not r.is_exact and r.num_expanded > budget / 2 and r.num_rollouts >= hybrid.MIN_TAIL_ROLLOUTS
