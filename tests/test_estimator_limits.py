"""benches/estimator_limits.py: the per-node quantities its limits rest on, against the independent brute-force
enumerator (tests/reference.py), at the root and at a node below it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from canopy_rs.backends.cached import CachedModel
from canopy_rs.testing import random_logits_fn
from reference import enumerate_canopy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import estimator_limits  # noqa: E402


def _moments(fn, prefix, kw):
    """CE*, E[N] and the variance of a rollout's step-entropy sum below ``prefix``, from the leaf list."""
    pol = {k: kw[k] for k in ("temperature", "top_k", "top_p") if k in kw}
    leaves, chain, _ = enumerate_canopy(lambda p: fn([list(prefix) + p])[0].tolist(), [0],
                                        kw["max_new_tokens"] - len(prefix), **pol)
    p = [math.exp(l.log_reach) for l in leaves]
    mean = math.fsum(pi * l.path_entropy for pi, l in zip(p, leaves))
    var = math.fsum(pi * (l.path_entropy - mean) ** 2 for pi, l in zip(p, leaves))
    return chain, math.fsum(pi * l.length for pi, l in zip(p, leaves)), var


@pytest.mark.parametrize("kw", [dict(max_new_tokens=5, top_k=3), dict(max_new_tokens=4, temperature=0.8, top_p=0.9)])
def test_node_sums_match_the_brute_force(kw):
    fn = random_logits_fn(5, seed=3, scale=1.5)
    canopy = estimator_limits.Canopy(CachedModel(fn, 5, [0]), kw)
    below = next(c for c in canopy.S if len(c) == 2)
    for prefix in [(), below]:
        ce, en, var = _moments(fn, prefix, kw)
        assert canopy.S[prefix] == pytest.approx(ce, rel=1e-9)
        assert canopy.L[prefix] == pytest.approx(en, rel=1e-9)
        assert canopy.V[prefix] == pytest.approx(var, rel=1e-9, abs=1e-12)


def test_limits_are_ordered_and_below_plain_monte_carlo():
    """The stratification limit is below the depth-groups one, and both beat plain MC (1.0) on a bushy model."""
    kw = dict(max_new_tokens=6, top_k=4)
    canopy = estimator_limits.Canopy(CachedModel(random_logits_fn(6, seed=0, scale=0.5, eos_bias=-3.0), 6, [0]), kw)
    r = estimator_limits.limits(canopy, 256)
    assert 0 < r["stratification_limit_ratio"] < r["depth_groups_ratio"] < 1.0
    assert 0.0 <= r["control_variate_share"] <= 1.0
