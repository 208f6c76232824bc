"""Certified brackets from budgeted best-first expansion (canopy_rs.bounded)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import canopy_rs
from reference import RandomModel, enumerate_canopy


@st.composite
def cases(draw):
    v = draw(st.integers(2, 6))
    top_k = draw(st.one_of(st.none(), st.integers(1, v)))
    return dict(
        vocab_size=v,
        eos_token_ids=draw(st.lists(st.integers(0, v - 1), min_size=1, max_size=2, unique=True)),
        max_new_tokens=draw(st.integers(1, 5)),
        temperature=draw(st.sampled_from([1.0, 0.5, 2.0])),
        top_k=top_k,
        top_p=draw(st.sampled_from([1.0, 0.6, 0.9])),
        order=draw(st.sampled_from(["best-first", "breadth-first", "depth-first"])),
        batch_size=draw(st.sampled_from([1, 4])),
    ), draw(st.integers(0, 10**6)), draw(st.sampled_from([0, 2]))


@settings(max_examples=120, deadline=None)
@given(cases())
def test_bracket_contains_exact_and_tightens(case):
    kw, seed, levels = case
    model = RandomModel(kw["vocab_size"], seed, levels)
    truth = canopy_rs.exact(model, **{k: v for k, v in kw.items() if k not in ("order",)})
    last_width = math.inf
    for budget in (1, 2, 3, 5, 8, 13, 21, 34, 55, 10**6):
        b = canopy_rs.bounded(model, budget=budget, **kw)
        tol = 1e-12 * max(1.0, truth.ce_star)
        assert b.ce_star_lower <= truth.ce_star + tol and truth.ce_star <= b.ce_star_upper + tol
        assert b.expected_length_lower - tol <= truth.expected_length <= b.expected_length_upper + tol
        assert b.truncation_prob_lower - tol <= truth.truncation_prob <= b.truncation_prob_upper + tol
        width = b.ce_star_upper - b.ce_star_lower
        assert width <= last_width + tol
        last_width = width
        assert b.num_expanded <= budget
        if b.is_exact:
            assert isinstance(b, canopy_rs.CanopyResult)
            assert b.ce_star == pytest.approx(truth.ce_star, rel=1e-12, abs=1e-15)
            assert b.num_expanded == truth.num_internal_nodes
        else:
            assert b.explored_mass + b.frontier_mass == pytest.approx(1.0, abs=1e-12)
    assert last_width == 0.0


def test_support_cap_tightens_and_is_enforced():
    model = RandomModel(8, 3)
    kw = dict(vocab_size=8, eos_token_ids=[0], max_new_tokens=6, top_k=2)
    loose = canopy_rs.bounded(model, budget=5, **kw)
    tight = canopy_rs.bounded(model, budget=5, support_cap=2, **kw)
    assert not tight.is_exact
    assert tight.ce_star_lower == loose.ce_star_lower
    assert tight.ce_star_upper < loose.ce_star_upper
    truth = canopy_rs.exact(model, **kw).ce_star
    assert tight.ce_star_lower <= truth <= tight.ce_star_upper
    # Ties at the k-th logit keep more than k tokens: a cap of k is then unsound and must be refused.
    tied = lambda p: np.tile([0.0, 1.0, 1.0, 1.0], (len(p), 1))
    with pytest.raises(ValueError, match="support_cap"):
        canopy_rs.bounded(tied, budget=5, vocab_size=4, eos_token_ids=[0], max_new_tokens=3, top_k=2, support_cap=2)


def peaked_model(v):
    """One dominant token per step (p ~ 0.98), EOS growing more likely with depth: most mass in few branches."""

    def logits(prefixes):
        out = np.tile(-0.1 * np.arange(v), (len(prefixes), 1))  # distinct: no ties at the top-k cut
        for i, p in enumerate(prefixes):
            out[i, 1 + (len(p) % (v - 1))] = 4.5
            out[i, 0] = -3.0 + 0.8 * len(p)
        return out

    return logits


def test_peaked_model_reaches_one_percent_with_a_tenth_of_the_nodes():
    v = 6
    kw = dict(vocab_size=v, eos_token_ids=[0], max_new_tokens=8, top_k=4)
    truth = canopy_rs.exact(peaked_model(v), **kw)
    b = canopy_rs.bounded(peaked_model(v), budget=truth.num_internal_nodes // 10, support_cap=4, **kw)
    assert not b.is_exact
    assert b.ce_star_lower <= truth.ce_star <= b.ce_star_upper
    assert b.width <= 0.01 * truth.ce_star


def test_budget_kinds_and_progress_callback():
    model = RandomModel(4, 1)
    kw = dict(vocab_size=4, eos_token_ids=[0], max_new_tokens=8)
    snaps = []
    b = canopy_rs.bounded(model, budget=canopy_rs.Budget(tokens=200), progress=snaps.append, progress_interval=0.0, **kw)
    assert b.stopped_by == "tokens" and b.tokens_forwarded >= 200
    widths = [s.width for s in snaps]
    assert len(snaps) >= 2 and all(w2 <= w1 + 1e-12 for w1, w2 in zip(widths, widths[1:]))
    b = canopy_rs.bounded(model, budget=canopy_rs.Budget(seconds=1e-9), **kw)
    assert b.stopped_by == "seconds"
    b = canopy_rs.bounded(model, budget=canopy_rs.Budget(memory_bytes=2000), **kw)
    assert b.stopped_by == "memory"
    with pytest.raises(ValueError, match="budget"):
        canopy_rs.Budget()
    with pytest.raises(ValueError, match="budget"):
        canopy_rs.bounded(model, budget=0, **kw)
    with pytest.raises(TypeError, match="budget"):
        canopy_rs.bounded(model, budget="10", **kw)


def test_ctrl_c_returns_the_bracket():
    model = RandomModel(4, 2)
    calls = {"n": 0}

    def fn(prefixes):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return model(prefixes)

    kw = dict(vocab_size=4, eos_token_ids=[0], max_new_tokens=6)
    b = canopy_rs.bounded(fn, budget=10**6, batch_size=2, order="breadth-first", **kw)
    assert b.stopped_by == "interrupt" and b.num_expanded == 1 + 2 + 2
    truth = canopy_rs.exact(model, **kw).ce_star
    assert b.ce_star_lower <= truth <= b.ce_star_upper


@settings(max_examples=60, deadline=None)
@given(cases(), st.integers(1, 6))
def test_beam_bracket_contains_brute_force(case, width):
    kw, seed, levels = case
    kw = {**kw, "order": "beam", "beam_width": width}
    model = RandomModel(kw["vocab_size"], seed, levels)
    pol = {k: kw[k] for k in ("temperature", "top_k", "top_p")}
    _, ce_star, internal = enumerate_canopy(model.row, kw["eos_token_ids"], kw["max_new_tokens"], **pol)
    for budget in (1, 3, 10**6):
        b = canopy_rs.bounded(model, budget=budget, **kw)
        tol = 1e-12 * max(1.0, ce_star)
        assert b.ce_star_lower <= ce_star + tol and ce_star <= b.ce_star_upper + tol
        assert b.num_expanded <= min(budget, width * kw["max_new_tokens"])
        if b.is_exact:
            assert b.num_expanded == internal
        else:
            assert b.stopped_by == "beam" if b.num_expanded < budget else b.stopped_by in ("nodes", "beam")
            assert b.explored_mass + b.frontier_mass == pytest.approx(1.0, abs=1e-12)


def test_beam_wider_than_every_level_is_exact():
    # Vocabulary 3 with EOS 0: at most 2^(d) internal nodes at depth d, so width 2^4 never prunes.
    model = RandomModel(3, 11)
    kw = dict(vocab_size=3, eos_token_ids=[0], max_new_tokens=5)
    _, ce_star, internal = enumerate_canopy(model.row, [0], 5)
    r = canopy_rs.bounded(model, budget=10**6, order="beam", beam_width=16, **kw)
    assert r.is_exact and r.num_internal_nodes == internal
    assert r.ce_star == pytest.approx(ce_star, rel=1e-12)
    b = canopy_rs.bounded(model, budget=10**6, order="beam", beam_width=3, **kw)
    assert not b.is_exact and b.stopped_by == "beam" and b.frontier_size > 0
    assert b.info.order == "beam" and b.info.beam_width == 3


def test_beam_arguments_are_checked():
    model = RandomModel(3, 1)
    kw = dict(vocab_size=3, eos_token_ids=[0], max_new_tokens=3, budget=10)
    with pytest.raises(ValueError, match="beam_width.*order='beam' needs"):
        canopy_rs.bounded(model, order="beam", **kw)
    with pytest.raises(ValueError, match="beam_width.*drop it"):
        canopy_rs.bounded(model, order="best-first", beam_width=2, **kw)
    with pytest.raises(ValueError, match="beam_width must be >= 1"):
        canopy_rs.bounded(model, order="beam", beam_width=0, **kw)
    with pytest.raises(TypeError, match="beam_width must be an int"):
        canopy_rs.bounded(model, order="beam", beam_width=2.0, **kw)
    del kw["budget"]
    with pytest.raises(ValueError, match="order='beam'.*not exact.*bounded"):
        canopy_rs.exact(model, order="beam", **kw)
