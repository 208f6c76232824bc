"""Certified brackets (canopy_rs.bounded) and stochastic beam search against the independent brute-force
enumerator of tests/reference.py, never against the engine's own exact values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import canopy_rs
from canopy_rs.estimators.beam import stochastic_beam_search
from reference import RandomModel, enumerate_canopy, population_values


@st.composite
def cases(draw):
    v = draw(st.integers(2, 6))
    return dict(
        vocab_size=v,
        eos_token_ids=draw(st.lists(st.integers(0, v - 1), min_size=1, max_size=2, unique=True)),
        max_new_tokens=draw(st.integers(1, 5)),
        temperature=draw(st.sampled_from([1.0, 0.5, 2.0])),
        top_k=draw(st.one_of(st.none(), st.integers(1, v))),
        top_p=draw(st.sampled_from([1.0, 0.6, 0.9])),
        order=draw(st.sampled_from(["best-first", "breadth-first", "depth-first"])),
        batch_size=draw(st.sampled_from([1, 4])),
    ), draw(st.integers(0, 10**6)), draw(st.sampled_from([0, 2]))


def _reference(model, kw):
    pol = {k: kw[k] for k in ("temperature", "top_k", "top_p") if k in kw}
    leaves, chain, internal = enumerate_canopy(model.row, kw["eos_token_ids"], kw["max_new_tokens"], **pol)
    return leaves, population_values(leaves, chain, kw["max_new_tokens"]), internal


@settings(max_examples=80, deadline=None, derandomize=True)
@given(cases())
def test_bracket_contains_brute_force_and_closes_on_it(case):
    """At every budget the bracket holds the brute-force CE*_max, E[N] and truncation probability, narrows,
    and once exact equals the brute force field by field."""
    kw, seed, levels = case
    model = RandomModel(kw["vocab_size"], seed, levels)
    _, ref, internal = _reference(model, kw)
    tol = 1e-12 * max(1.0, ref["ce_star"])
    last = math.inf
    for budget in (1, 2, 3, 5, 8, 13, 34, 10**6):
        b = canopy_rs.bounded(model, budget=budget, **kw)
        assert b.ce_star_lower <= ref["ce_star"] + tol and ref["ce_star"] <= b.ce_star_upper + tol
        assert b.expected_length_lower - tol <= ref["expected_length"] <= b.expected_length_upper + tol
        assert b.truncation_prob_lower - tol <= ref["truncation_prob"] <= b.truncation_prob_upper + tol
        assert b.ce_star_upper - b.ce_star_lower <= last + tol
        last = b.ce_star_upper - b.ce_star_lower
        if b.is_exact:
            assert b.num_expanded == internal and b.num_leaves == ref["num_leaves"]
            for name in ("ce_star", "expected_length", "truncation_prob", "length_entropy"):
                assert getattr(b, name) == pytest.approx(ref[name], rel=1e-10, abs=1e-12), name
    assert last == 0.0


def peaked_model(v):
    """One dominant token per step (p ~ 0.98), EOS more likely with depth (tests/test_bounds.py's model)."""

    def logits(prefixes):
        out = np.tile(-0.1 * np.arange(v), (len(prefixes), 1))
        for i, p in enumerate(prefixes):
            out[i, 1 + (len(p) % (v - 1))] = 4.5
            out[i, 0] = -3.0 + 0.8 * len(p)
        return out

    return logits


def test_peaked_bracket_and_support_cap_against_brute_force():
    v = 6
    kw = dict(vocab_size=v, eos_token_ids=[0], max_new_tokens=8, top_k=4)
    fn = peaked_model(v)
    _, chain, internal = enumerate_canopy(lambda p: fn([p])[0].tolist(), [0], 8, top_k=4)
    b = canopy_rs.bounded(fn, budget=internal // 10, support_cap=4, **kw)
    assert not b.is_exact and b.ce_star_lower <= chain <= b.ce_star_upper
    assert b.width <= 0.01 * chain
    model = RandomModel(8, 3)
    kw = dict(vocab_size=8, eos_token_ids=[0], max_new_tokens=6, top_k=2)
    _, ref, _ = _reference(model, kw)
    for cap in (None, 2):
        t = canopy_rs.bounded(model, budget=5, support_cap=cap, **kw)
        assert t.ce_star_lower <= ref["ce_star"] <= t.ce_star_upper


@pytest.mark.parametrize("pol", [dict(), dict(temperature=0.7, top_k=3), dict(temperature=1.4, top_p=0.8)])
def test_sbs_leaves_and_enumeration_match_brute_force(pol):
    """Every sampled leaf's reach, path entropy and length are the brute force's for that token sequence;
    with a beam at least as wide as the leaf count the search enumerates and is exact."""
    model = RandomModel(4, 7, scale=1.5)
    kw = dict(vocab_size=4, eos_token_ids=[0], max_new_tokens=4, **pol)
    leaves, ref, _ = _reference(model, kw)
    table = {l.tokens: l for l in leaves}
    for seed in range(5):
        r = stochastic_beam_search(model, beam_size=6, seed=seed, **kw)
        assert r.num_leaves == min(6, len(leaves))
        for toks, lp, hs, n in zip(r.leaf_tokens, r.leaf_log_reach, r.leaf_entropy_sums, r.leaf_lengths):
            leaf = table[tuple(int(t) for t in toks)]
            assert lp == pytest.approx(leaf.log_reach, abs=1e-10) and hs == pytest.approx(leaf.path_entropy, abs=1e-10)
            assert n == leaf.length
    full = stochastic_beam_search(model, beam_size=len(leaves), seed=0, **kw)
    assert full.is_exact and full.ce_star_se == 0.0
    assert full.ce_star == pytest.approx(ref["ce_star"], rel=1e-10)
    assert full.ce_star_surprisal == pytest.approx(ref["ce_star_leaves"], rel=1e-10)


@pytest.mark.parametrize("pol", [dict(), dict(temperature=0.8, top_k=3, top_p=0.9)])
def test_sbs_is_unbiased_for_the_brute_force_value(pol):
    """300 runs, beam 8: |z| of the mean < 4 against the brute-force CE*_max (not the engine's)."""
    model = RandomModel(4, 9, scale=2.0)
    kw = dict(vocab_size=4, eos_token_ids=[0], max_new_tokens=5, **pol)
    _, ref, _ = _reference(model, kw)
    x = np.array([stochastic_beam_search(model, beam_size=8, seed=s, **kw).ce_star for s in range(300)])
    assert abs(x.mean() - ref["ce_star"]) < 4 * x.std(ddof=1) / math.sqrt(x.size)
