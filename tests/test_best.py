"""best_estimator's table derived from the measured benchmark, every branch of best_estimator and
estimate_best, and as_backend."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import canopy_rs
from canopy_rs.backends import CallableModel, as_backend
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.estimators import best
from canopy_rs.estimators.beam import BeamSearchEstimate
from canopy_rs.estimators.best import (
    BEST_BY_BUDGET,
    BEST_TABLE,
    CANDIDATES,
    best_estimator,
    canopy_shape,
    derive_best_table,
    estimate_best,
)
from canopy_rs.estimators.hybrid import HybridEstimate
from canopy_rs.estimators.montecarlo import PromptEstimate
from canopy_rs.testing import random_logits_fn

SUMMARY = Path(__file__).resolve().parents[1] / "benches" / "results" / "estimators_summary.json"


# --- the shipped table is the measured one ----------------------------------------------------------


def test_shipped_table_is_derived_from_the_benchmark_results():
    """_best_table.py is what bench_estimators.py --summarise derives from the committed results: editing
    either alone fails here."""
    summary = json.loads(SUMMARY.read_text())
    assert derive_best_table(summary) == BEST_TABLE
    assert BEST_BY_BUDGET == tuple((b, e) for b, e, *_ in BEST_TABLE["any"])
    # What the measurements say (benches/results/estimators_summary.md): the hybrid (its recommended
    # configuration) at every budget and shape, within 4% of the best candidate at 64 tokens on the bushy
    # canopies and the best from 256 on; SBS is never recommended.
    assert best_estimator(64, "bushy") == "hybrid"
    assert {e for entries in BEST_TABLE.values() for _, e, *_ in entries} == {"hybrid"}
    # Each entry's regret is its measured worst ratio to the cell's best candidate.
    for entries in BEST_TABLE.values():
        assert all(r >= 1.0 for _, _, r, _ in entries)


def _case(name, ce, en, ratios, unjudged=()):
    """A bench summary record: ratios {(estimator, budget): ratio}."""
    rows = [{"estimator": e, "budget": b, "judged": (e, b) not in unjudged} for e, b in ratios]
    return {"case": name, "exact": {"ce_star": ce, "expected_length": en}, "rows": rows,
            "ratios": [{"estimator": e, "budget": b, "ratio": r} for (e, b), r in ratios.items()]}


def test_derive_best_table_branches():
    bushy = _case("b", 9.5, 10.0, {("hybrid", 64): 0.8, ("mc_rb_stratified", 64): 0.6, ("sbs", 64): 2.0,
                                   ("mc_rb", 64): 1.0, ("mc_surprisal", 64): 0.1,  # not a candidate
                                   ("hybrid", 256): 0.0, ("mc_rb_stratified", 256): 0.2, ("sbs", 256): 0.0,
                                   ("mc_rb", 256): 1.0})
    bushy2 = _case("b2", 12.0, 10.0, {("hybrid", 64): 0.5, ("mc_rb_stratified", 64): 0.55, ("sbs", 64): 1.0,
                                      ("mc_rb", 64): 1.0, ("hybrid", 256): 0.3, ("mc_rb_stratified", 256): 0.1,
                                      ("mc_rb", 256): 1.0},
                   unjudged={("mc_rb_stratified", 256)})  # the bracket could not judge it: left out
    peaked = _case("p", 5.0, 10.0, {("hybrid", 64): 0.2, ("mc_rb_stratified", 64): 0.4, ("mc_rb", 64): 1.0,
                                    ("hybrid", 1024): math.nan, ("mc_rb", 1024): 1.0})
    t = derive_best_table([bushy, bushy2, peaked])
    # bushy @64: stratified's worst regret 0.55/0.5 = 1.1 beats the hybrid's 0.8/0.6 = 1.33; mc_surprisal
    # (0.1) is not a candidate. @256: hybrid and SBS both enumerated b (regret 1 each), b2 has no SBS row, so
    # SBS is not judged there; stratified has no judged row in b2 either.
    assert t["bushy"] == ((64, "mc_rb_stratified", 1.1, "b2"), (256, "hybrid", 1.0, "b2"))
    # peaked: one canopy; the NaN ratio at 1024 is dropped, leaving plain MC alone.
    assert t["peaked"] == ((64, "hybrid", 1.0, "p"), (1024, "mc_rb", 1.0, "p"))
    # any @64: hybrid's worst is 1.33 (b), stratified's 2.0 (p): the hybrid.
    assert t["any"][0] == (64, "hybrid", pytest.approx(1.3333, abs=1e-4), "b")
    # A candidate that misses the best's exact answer has infinite regret; ties go to the smaller mean
    # regret, then to CANDIDATES order.
    only = _case("x", 1.0, 10.0, {("sbs", 64): 0.0, ("hybrid", 64): 0.01, ("mc_rb", 64): 0.0})
    assert derive_best_table([only])["peaked"] == ((64, "sbs", 1.0, "x"),)
    tie = _case("y", 1.0, 10.0, {("mc_rb", 64): 0.5, ("sbs", 64): 0.5})
    assert derive_best_table([tie])["peaked"] == ((64, "sbs", 1.0, "y"),)
    assert "bushy" not in derive_best_table([tie])
    assert derive_best_table([]) == {}


def test_canopy_shape():
    assert canopy_shape(9.0, 10.0) == "bushy" and canopy_shape(8.99, 10.0) == "peaked"
    with pytest.raises(InvalidArgumentError):
        canopy_shape(1.0, 0.0)
    with pytest.raises(InvalidArgumentError):
        canopy_shape(math.nan, 2.0)


def test_best_estimator_every_branch(monkeypatch):
    table = {"any": ((64, "sbs", 1.0, ""), (256, "mc_rb_stratified", 1.0, ""), (1024, "hybrid", 1.0, "")),
             "bushy": ((100, "mc_rb", 1.0, ""),), "peaked": ((64, "hybrid", 1.0, ""), (512, "sbs", 1.0, ""))}
    monkeypatch.setattr(best, "BEST_TABLE", table)
    # Below the smallest measured budget: the first entry; then the last entry at or below the budget.
    assert [best_estimator(b) for b in (1, 64, 255, 256, 1023, 1024, 10**9)] == \
        ["sbs", "sbs", "sbs", "mc_rb_stratified", "mc_rb_stratified", "hybrid", "hybrid"]
    assert best_estimator(5, "bushy") == best_estimator(10**6, "bushy") == "mc_rb"
    assert [best_estimator(b, "peaked") for b in (64, 511, 512)] == ["hybrid", "hybrid", "sbs"]
    for bad in ("any", "flat", ""):
        with pytest.raises(InvalidArgumentError, match="shape"):
            best_estimator(64, bad)
    for bad in (0, -3, 1.5):
        with pytest.raises((InvalidArgumentError, TypeError, ValueError)):
            best_estimator(bad)


KW = dict(vocab_size=5, eos_token_ids=[0], max_new_tokens=5)


@pytest.fixture(scope="module")
def small():
    fn = random_logits_fn(5, seed=3, scale=2.0)
    return fn, canopy_rs.exact(fn, **KW)


@pytest.mark.parametrize("name, kind", [("hybrid", HybridEstimate), ("mc_rb_stratified", HybridEstimate),
                                        ("sbs", BeamSearchEstimate), ("mc_rb", PromptEstimate)])
def test_estimate_best_runs_every_candidate(small, name, kind):
    fn, ex = small
    r = estimate_best(fn, budget=80, seed=1, estimator=name, **KW)
    assert r.estimator == name and r.description == best.DESCRIPTIONS[name] and isinstance(r.detail, kind)
    assert r.budget == 80 and r.ce_star == r.detail.ce_star and r.ce_star_se == r.detail.ce_star_se
    assert r.ce_star_ci[0] <= r.ce_star <= r.ce_star_ci[1]
    assert 0 < r.cost["rows_evaluated"] <= 80 * 1.2
    if name in ("hybrid", "mc_rb_stratified"):  # the configurations the bench measured, spending the budget
        assert r.detail.allocation == ("neyman" if name == "hybrid" else "proportional")
        assert r.cost["model_tokens"] <= 1.3 * 80
        # Stratified rollouts from the root of this peaked canopy share most prefixes: 43 of 80 tokens.
        assert r.cost["model_tokens"] >= (0.7 if name == "hybrid" else 0.4) * 80
    assert abs(r.ce_star - ex.ce_star) <= 5 * r.ce_star_se + 1e-9
    d = json.loads(json.dumps(r.to_dict()))
    assert d["estimator"] == name and d["detail"]["ce_star"] == pytest.approx(r.ce_star)
    # Same seed, same estimate.
    assert estimate_best(fn, budget=80, seed=1, estimator=name, **KW).ce_star == r.ce_star
    # An estimate over many seeds is unbiased: |z| of the mean of 40 runs < 4.
    v = np.array([estimate_best(fn, budget=80, seed=s, estimator=name, **KW).ce_star for s in range(40)])
    assert abs(v.mean() - ex.ce_star) < 4 * max(v.std(ddof=1), 1e-12) / math.sqrt(v.size)


def test_estimate_best_follows_the_table_and_validates(small, monkeypatch):
    fn, _ = small
    assert estimate_best(fn, budget=64, seed=0, shape="bushy", **KW).estimator == best_estimator(64, "bushy")
    assert estimate_best(fn, budget=300, seed=0, **KW).estimator == best_estimator(300)
    monkeypatch.setattr(best, "BEST_TABLE", {"any": ((1, "sbs", 1.0, ""),)})
    assert estimate_best(fn, budget=50, seed=0, **KW).estimator == "sbs"
    with pytest.raises(InvalidArgumentError, match="estimator"):
        estimate_best(fn, budget=50, estimator="magic", **KW)
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        estimate_best(fn, budget=50, vocab_size=5, eos_token_ids=[0])
    with pytest.raises((InvalidArgumentError, ValueError)):
        estimate_best(fn, budget=0, **KW)
    assert set(CANDIDATES) == set(best.DESCRIPTIONS)


# --- as_backend ---------------------------------------------------------------------------------


def test_as_backend_wraps_callables_and_checks_backends():
    fn = random_logits_fn(5, seed=0)
    b = as_backend(fn, 5, 0)
    assert isinstance(b, CallableModel) and b.vocab_size == 5 and b.eos_token_ids == (0,)
    assert as_backend(b) is b
    assert as_backend(b, 5, [0]) is b and as_backend(b, vocab_size=5, eos_token_ids=np.int64(0)) is b
    with pytest.raises(InvalidArgumentError, match="vocab_size=6 disagrees"):
        as_backend(b, 6)
    with pytest.raises(InvalidArgumentError, match="eos_token_ids=\\[1\\] disagrees"):
        as_backend(b, eos_token_ids=[1])
    with pytest.raises(InvalidArgumentError, match="disagrees"):
        as_backend(b, eos_token_ids=[0, 1])
    # A wrapped callable computes what the bare one does.
    assert canopy_rs.exact(b, max_new_tokens=3).ce_star == pytest.approx(
        canopy_rs.exact(fn, vocab_size=5, eos_token_ids=[0], max_new_tokens=3).ce_star, rel=1e-12)
    with pytest.raises((InvalidArgumentError, ValueError, TypeError)):
        as_backend(fn)  # a callable needs vocab_size and eos_token_ids
