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
    hy = canopy_rs.estimate_hybrid(cm, budget=60, seed=1, **KW)
    ref = canopy_rs.estimate_hybrid(fn, vocab_size=5, eos_token_ids=[0], budget=60, seed=1, **KW)
    assert hy.ce_star == pytest.approx(ref.ce_star) and hy.cost["rows_evaluated"] == ref.cost["rows_evaluated"]


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
