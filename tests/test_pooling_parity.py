"""One test per row of docs/pooling-parity.md: where pooling matches the paper's reference code, and each
deliberate difference. ``_ref_*`` re-implement the reference rules from docs/definitions.md and the
reference's documented behaviour (clip before atanh; drop non-finite or zero-weight entries from the
weighted mean; fall back to a nanmean that skips NaN and keeps inf)."""

from __future__ import annotations

import math
import pathlib
import re

import numpy as np
import pytest

import canopy_rs
from canopy_rs.estimators import estimate_arrays, pool
from canopy_rs.stats import kendall_tau_b, pearson, spearman
from canopy_rs.sampling import Rollouts

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "pooling-parity.md"


def _ref_weighted_nanmean(v, w):
    v, w = np.asarray(v, dtype=float), np.asarray(w, dtype=float)
    ok = np.isfinite(v) & np.isfinite(w) & (w > 0)
    if ok.any():
        return float((v[ok] * w[ok]).sum() / w[ok].sum())
    keep = ~np.isnan(v)
    return float(v[keep].mean()) if keep.any() else math.nan


def _ref_fisher(r, n):
    z = np.arctanh(np.clip(np.asarray(r, dtype=float), -0.999999, 0.999999))
    return math.tanh(_ref_weighted_nanmean(z, np.maximum(np.asarray(n, dtype=float) - 3, 0)))


def _prompt(**kw):
    base = dict(ce_star=1.0, ce_star_surprisal=1.0, expected_length=2.0, entropy_rate=0.5, truncation_rate=0.0,
                length_rate_pearson=0.1, length_rate_spearman=0.1, length_rate_kendall=0.1, length_rate_cov=0.1,
                num_rollouts=50)
    base.update(kw)
    return base


def test_every_row_of_the_parity_table_has_a_test():
    rows = re.findall(r"^\| (P\d+) \|", DOC.read_text(), flags=re.M)
    tests = {name.split("_")[1] for name in globals() if re.match(r"test_P\d+_", name)}
    assert rows and set(rows) == tests


def test_P1_no_fisher_weight_left_matches_the_reference():
    r, n = [0.2, 0.6, -0.7, math.nan], [3, 2, 1, 3]
    p = pool([_prompt(num_rollouts=k, length_rate_pearson=x, length_rate_spearman=x) for x, k in zip(r, n)])
    assert p.length_rate_pearson == pytest.approx(_ref_fisher(r, n), abs=1e-12)
    assert p.length_rate_spearman == pytest.approx(_ref_fisher(r, n), abs=1e-12)
    # ... and not the plain mean of r, what canopy_rs did before.
    assert p.length_rate_pearson != pytest.approx(np.nanmean(r))
    # With weights left, the weighted Fisher mean, as the reference.
    r2, n2 = [0.5, -0.2, 0.9], [10, 20, 3]
    q = pool([_prompt(num_rollouts=k, length_rate_pearson=x) for x, k in zip(r2, n2)])
    assert q.length_rate_pearson == pytest.approx(_ref_fisher(r2, n2), abs=1e-12)


@pytest.mark.parametrize("field", ["ce_star", "expected_length", "entropy_rate", "truncation_rate"])
def test_P2_an_infinite_linear_value_is_kept_a_nan_skipped(field):
    p = pool([_prompt(**{field: 1.0}), _prompt(**{field: math.inf}), _prompt(**{field: math.nan})])
    assert getattr(p, field) == math.inf
    q = pool([_prompt(**{field: 1.0}), _prompt(**{field: 3.0}), _prompt(**{field: math.nan})])
    assert getattr(q, field) == pytest.approx(2.0)


@pytest.mark.parametrize("field", ["length_rate_pearson", "length_rate_spearman", "length_rate_kendall",
                                   "length_rate_cov"])
def test_P3_an_infinite_correlation_or_covariance_is_dropped(field):
    # With weights: the reference clips a Fisher column's inf to 0.999999; canopy_rs drops it.
    vals, n = [0.3, math.inf, -0.1], [20, 20, 40]
    p = pool([_prompt(num_rollouts=k, **{field: x}) for x, k in zip(vals, n)])
    finite = pool([_prompt(num_rollouts=k, **{field: x}) for x, k in zip(vals, n) if math.isfinite(x)])
    assert getattr(p, field) == pytest.approx(getattr(finite, field), abs=1e-12)
    if field in ("length_rate_pearson", "length_rate_spearman"):
        assert getattr(p, field) != pytest.approx(_ref_fisher(vals, n))
    # Without weights (n_p = 1): the reference's fallback keeps inf in Kendall and covariance.
    q = pool([_prompt(num_rollouts=1, **{field: x}) for x in (0.4, math.inf)])
    assert getattr(q, field) == pytest.approx(0.4)


def test_P4_constant_data_gives_nan_correlations_and_leaves_the_pool():
    lengths = np.full(6, 3)
    ent = np.tile([0.5, 0.7, 0.2], (6, 1)) * np.linspace(1, 2, 6)[:, None]
    e = estimate_arrays(lengths, ent, None, max_new_tokens=3)
    assert math.isnan(e.length_rate_pearson) and math.isnan(e.length_rate_spearman)
    assert math.isnan(e.length_rate_kendall)
    other = _prompt(num_rollouts=30, length_rate_spearman=0.4)
    p = pool([e, other])
    # The reference would average in Spearman 0 for the constant prompt, pulling the pool toward 0.
    assert p.length_rate_spearman == pytest.approx(0.4)
    assert p.length_rate_spearman != pytest.approx(_ref_fisher([0.0, 0.4], [6, 30]))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("corr", [pearson, spearman, kendall_tau_b])
def test_P5_a_correlation_over_non_finite_data_is_nan(corr, bad):
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.array([0.2, 0.1, bad, 0.4, 0.3])
    assert math.isnan(corr(x, y)) and math.isnan(corr(y, x))
    # The bug this row fixes: an undefined Pearson used to be clipped to exactly +1.
    assert math.isnan(pearson(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, math.inf])))


@pytest.mark.parametrize(
    "entropies, logq, match",
    [
        ([[0.5, math.nan, 0.1]], None, r"entropies: rollout 0, step 1: nan"),
        ([[0.5, 0.2, math.inf]], None, r"entropies: rollout 0, step 2: inf"),
        ([[0.5, -0.2, 0.1]], None, r"entropies: rollout 0, step 1: -0.2"),
        ([[0.5, 0.2, 0.1]], [[-0.1, math.nan, -0.3]], r"logq: rollout 0, step 1: nan"),
        ([[0.5, 0.2, 0.1]], [[-0.1, -0.2, math.inf]], r"logq: rollout 0, step 2: inf"),
        ([[0.5, 0.2, 0.1]], [[0.3, -0.2, -0.3]], r"logq: rollout 0, step 0: 0.3"),
    ],
)
def test_P6_invalid_step_values_are_rejected_naming_rollout_and_step(entropies, logq, match):
    ok_ent, ok_lq = [[0.1, 0.1, 0.1]], [[-0.1, -0.1, -0.1]]
    match = match.replace("rollout 0", "rollout 1")  # the bad rollout comes second
    with pytest.raises(canopy_rs.InvalidArgumentError, match=match):  # a ValueError
        Rollouts.from_ragged([[1, 2, 0]] * 2, ok_ent + entropies, None if logq is None else ok_lq + logq,
                             eos_token_ids=[0], max_new_tokens=3)
    # The same check guards the array entry point.
    ent = np.array(ok_ent + entropies)
    lq = None if logq is None else np.array(ok_lq + logq)
    with pytest.raises(canopy_rs.InvalidArgumentError, match=match):
        estimate_arrays(np.array([3, 3]), ent, lq, max_new_tokens=3)
