"""CachedModel: answers from its prefix table give the same draws and the same reported cost as a fresh
backend, and misses under cached parents re-materialise the ancestors without breaking the protocol."""

from __future__ import annotations

import numpy as np
import pytest

import canopy_rs
from canopy_rs.backends.cached import CachedModel
from canopy_rs.testing import random_logits_fn
from estimator_helpers import CheckingBackend

KW = dict(max_new_tokens=6)


def test_same_draws_and_fresh_costs_with_a_growing_table():
    fn = random_logits_fn(5, seed=5, scale=3.0)
    inner = CheckingBackend(fn, 5, [0])
    cm = CachedModel(inner)
    for s in range(6):
        got = canopy_rs.sample(cm, num_rollouts=40, seed=s, **KW)
        ref = canopy_rs.sample(fn, vocab_size=5, eos_token_ids=[0], num_rollouts=40, seed=s, **KW)
        assert np.array_equal(got.tokens, ref.tokens)
        assert np.allclose(got.entropies, ref.entropies) and np.allclose(got.logq, ref.logq)
        for k in ("model_calls", "rows_evaluated", "nodes_expanded"):
            assert got.cost[k] == ref.cost[k], k
    # Later repeats were partly answered from the table, and the inner backend saw a valid protocol
    # (CheckingBackend asserts it) including re-materialised ancestors.
    assert cm.hits > 0 and cm.misses > 0 and cm.inner_rows > cm.misses
    # The hybrid plans its rounds from the model tokens it measures: a cached callable, partly answered from
    # its table, must report what the fresh callable forwards (its whole prefix per row), or the plan changes.
    cf = CachedModel(fn, 5, [0])
    for s in range(3):
        canopy_rs.sample(cf, num_rollouts=40, seed=s, **KW)
    hy = canopy_rs.estimate_hybrid(cf, budget=60, seed=1, **KW)
    ref = canopy_rs.estimate_hybrid(fn, vocab_size=5, eos_token_ids=[0], budget=60, seed=1, **KW)
    assert cf.hits > 0 and hy.ce_star == pytest.approx(ref.ce_star)
    for k in ("model_tokens", "tokens_forwarded", "rows_evaluated", "model_calls"):
        assert hy.cost[k] == ref.cost[k], k


def test_tables_round_trip_and_are_per_policy(tmp_path):
    fn = random_logits_fn(5, seed=5, scale=3.0)
    cm = CachedModel(fn, 5, [0])
    ex = canopy_rs.exact(cm, top_k=3, **KW)
    cm.save_tables(tmp_path / "t.pkl")
    again = CachedModel(fn, 5, [0])
    again.load_tables(tmp_path / "t.pkl")
    assert again.table_size() == ex.num_internal_nodes
    assert canopy_rs.exact(again, top_k=3, **KW).ce_star == ex.ce_star and again.misses == 0
    # Another policy is another table: nothing is answered from the top-k 3 one.
    other = canopy_rs.exact(again, top_k=2, **KW)
    assert again.misses == other.num_internal_nodes


def test_a_cached_transformers_model_costs_what_a_fresh_one_does(tmp_path):
    pytest.importorskip("transformers")
    from canopy_rs.hf_models import load_model
    from tiny_models import make_tiny_model

    hf, tok = load_model(str(make_tiny_model(tmp_path / "m")))
    cm = CachedModel(canopy_rs.TransformersModel(hf, tok, prompt="a b c"))
    for s in range(3):  # later draws are partly answered from the table
        fresh = canopy_rs.sample(canopy_rs.TransformersModel(hf, tok, prompt="a b c"), num_rollouts=6, seed=s,
                                 max_new_tokens=4, top_k=3)
        got = canopy_rs.sample(cm, num_rollouts=6, seed=s, max_new_tokens=4, top_k=3)
        assert np.array_equal(got.tokens, fresh.tokens)
        # The root forwards the prompt, which model tokens leave out: one token per row below it.
        for k in ("model_tokens", "rows_evaluated", "model_calls"):
            assert got.cost[k] == fresh.cost[k], (s, k)
    assert cm.hits > 0
