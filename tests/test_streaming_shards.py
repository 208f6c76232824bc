"""Streaming exact enumeration (bounded engine memory) and one canopy split into shards whose partial
results merge into the same result as one run (docs/definitions.md, "Streaming and shards")."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import canopy_rs
from canopy_rs._core import Partial, Policy, Tree
from canopy_rs.drivers.shards import finish, merge_partials, run_shard, split_budget, split_canopy
from canopy_rs.errors import InvalidArgumentError
from reference import RandomModel, enumerate_canopy, population_values
from test_exact import assert_matches_reference, canopy_cases

FIELDS = canopy_rs.CanopyResult.SCALAR_FIELDS
COUNTS = ("num_internal_nodes", "num_leaves", "max_support")


def assert_same_result(a, b, rel=1e-12):
    """Every value field of two exact results: counts equal, floats within ``rel`` (summation order)."""
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        if math.isnan(y):
            assert math.isnan(x), f
        else:
            assert x == pytest.approx(y, rel=rel, abs=1e-15), f
    for f in ("length_pmf", "entropy_by_depth"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=rel, atol=1e-15, err_msg=f)
    for f in COUNTS:
        assert getattr(a, f) == getattr(b, f), f


def kwargs(case):
    return {k: case[k] for k in ("vocab_size", "eos_token_ids", "max_new_tokens", "temperature", "top_k", "top_p")}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(canopy_cases())
def test_streaming_equals_arena_and_reference(case):
    model = RandomModel(case["vocab_size"], case["seed"], case["levels"], case["mask_prob"])
    kw = kwargs(case)
    stream = canopy_rs.exact(model, batch_size=case["batch_size"], streaming=True, **kw)
    arena = canopy_rs.exact(model, batch_size=case["batch_size"], streaming=False, **kw)
    # Same order of operations: bit for bit.
    for f in FIELDS:
        x, y = getattr(stream, f), getattr(arena, f)
        assert (math.isnan(x) and math.isnan(y)) or x == y, f
    assert stream.length_pmf.tolist() == arena.length_pmf.tolist()
    assert stream.entropy_by_depth.tolist() == arena.entropy_by_depth.tolist()
    for f in COUNTS:
        assert getattr(stream, f) == getattr(arena, f)
    policy_args = {k: case[k] for k in ("temperature", "top_k", "top_p")}
    leaves, chain, internal = enumerate_canopy(model.row, case["eos_token_ids"], case["max_new_tokens"], **policy_args)
    assert stream.num_internal_nodes == internal
    assert_matches_reference(stream, population_values(leaves, chain, case["max_new_tokens"]))


def drive(tree, model, batch=4):
    """The canopy loop without a backend: returns the largest arena seen."""
    peak = 0
    while not tree.is_done:
        ids, _, _, _ = tree.next_batch(batch)
        tree.ingest_logits(model(tree.prefixes(ids)))
        tree.take_released()
        peak = max(peak, tree.num_nodes)
    return peak


def test_streaming_arena_stays_bounded_while_the_canopy_grows():
    model = RandomModel(4, 3)
    peaks, sizes = [], []
    for t in (4, 6, 8, 10):
        tree = Tree(4, [0], t, Policy(), streaming=True)
        peaks.append(drive(tree, model))
        sizes.append(tree.result()["num_internal_nodes"])
        assert tree.live_nodes == 0
    assert sizes[-1] > 100 * sizes[0]  # the canopy grows ~30x per two tokens
    for t, peak in zip((4, 6, 8, 10), peaks):
        assert peak <= t * 4 * 4 + 1  # depth x support x batch rows
    arena = Tree(4, [0], 10, Policy())
    assert drive(arena, model) == sizes[-1]


def test_streaming_needs_depth_first_without_nodes():
    with pytest.raises(InvalidArgumentError, match="streaming"):
        Tree(4, [0], 3, Policy(), order="breadth-first", streaming=True)
    with pytest.raises(InvalidArgumentError, match="streaming"):
        canopy_rs.exact(RandomModel(4, 1), vocab_size=4, eos_token_ids=0, max_new_tokens=3, return_nodes=True,
                        streaming=True)
    # With return_nodes the arena path keeps every node (today's behaviour).
    res = canopy_rs.exact(RandomModel(4, 1), vocab_size=4, eos_token_ids=0, max_new_tokens=3, return_nodes=True)
    assert (~res.nodes["is_leaf"]).sum() == res.num_internal_nodes


def test_streaming_ids_are_unique_and_released_once():
    seen, released = [], []

    class Recorder(canopy_rs.CallableModel):
        def expand(self, batch, policy):
            seen.extend(batch.node_ids.tolist())
            return super().expand(batch, policy)

        def release(self, node_ids):
            released.extend(np.asarray(node_ids).tolist())

    res = canopy_rs.exact(Recorder(RandomModel(3, 2), 3, [0]), max_new_tokens=7, batch_size=2)
    assert len(seen) == len(set(seen)) == res.num_internal_nodes
    assert sorted(released) == sorted(seen)


def test_streaming_max_nodes_counts_work_not_memory():
    kw = dict(vocab_size=4, eos_token_ids=[0], max_new_tokens=8)
    with pytest.raises(canopy_rs.TreeTooLargeError, match="max_nodes=500.*streams.*size check"):
        canopy_rs.exact(RandomModel(4, 1), max_nodes=500, **kw)


SPLIT_MODEL = dict(vocab_size=5, eos_token_ids=[0, 4], max_new_tokens=6, top_k=4, temperature=1.3)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 7])
def test_shards_merge_into_one_run(depth, batch_size):
    model = RandomModel(5, 21)
    one = canopy_rs.exact(model, **SPLIT_MODEL)
    head, shards = split_canopy(model, depth=depth, batch_size=batch_size, **SPLIT_MODEL)
    assert shards and all(s.depth == depth for s in shards)
    assert [s.log_reach for s in shards] == sorted((s.log_reach for s in shards), reverse=True)
    parts = [run_shard(model, s, batch_size=batch_size, **SPLIT_MODEL) for s in shards]
    # Partials cross processes as flat arrays (pickle), and merge in any grouping.
    parts = [pickle.loads(pickle.dumps(p)) for p in parts]
    merged = finish(merge_partials([head] + parts))
    assert_same_result(merged, one)
    half = len(parts) // 2
    groups = [parts[half:][::-1] + [head]] + ([parts[:half]] if half else [])
    regrouped = finish(merge_partials([merge_partials(g) for g in groups]))
    assert_same_result(regrouped, one)
    assert merged.rows_evaluated > one.rows_evaluated  # each shard walks the backend down its prefix


def test_shard_sums_match_reference():
    model = RandomModel(4, 8, levels=3)
    kw = dict(vocab_size=4, eos_token_ids=[0], max_new_tokens=5, top_p=0.9)
    head, shards = split_canopy(model, depth=2, **kw)
    merged = finish(merge_partials([head] + [run_shard(model, s, **kw) for s in shards]))
    leaves, chain, internal = enumerate_canopy(model.row, [0], 5, temperature=1.0, top_k=None, top_p=0.9)
    assert merged.num_internal_nodes == internal
    assert_matches_reference(merged, population_values(leaves, chain, 5))


def test_a_canopy_that_ends_above_the_split_has_no_shards():
    model = RandomModel(3, 2)
    head, shards = split_canopy(model, depth=5, vocab_size=3, eos_token_ids=[0], max_new_tokens=3)
    assert shards == []
    assert_same_result(finish(head), canopy_rs.exact(model, vocab_size=3, eos_token_ids=[0], max_new_tokens=3))


def test_bounded_shards_sum_to_a_certified_bracket():
    model = RandomModel(5, 21)
    exact = canopy_rs.exact(model, **SPLIT_MODEL)
    head, shards = split_canopy(model, depth=2, **SPLIT_MODEL)
    budgets = split_budget(60, shards)
    assert len(budgets) == len(shards) and all(b >= 1 for b in budgets)
    assert budgets[0] >= budgets[-1]  # most probable first, budget by reach mass
    parts = [run_shard(model, s, budget=b, **SPLIT_MODEL) for s, b in zip(shards, budgets)]
    for s, p in zip(shards, parts):
        b = p.partial.bounds()
        # Each shard's bracket holds for its subtree.
        sub = run_shard(model, s, **SPLIT_MODEL).partial.result()
        assert b["ce_star_lower"] <= sub["ce_star"] * (1 + 1e-12) + 1e-15
        assert sub["ce_star"] <= b["ce_star_upper"] * (1 + 1e-12) + 1e-15
    bracket = finish(merge_partials([head] + parts))
    assert isinstance(bracket, canopy_rs.CanopyBounds)
    assert bracket.ce_star_lower <= exact.ce_star <= bracket.ce_star_upper
    assert bracket.expected_length_lower <= exact.expected_length <= bracket.expected_length_upper
    assert bracket.truncation_prob_lower <= exact.truncation_prob <= bracket.truncation_prob_upper
    assert bracket.explored_mass + bracket.frontier_mass == pytest.approx(1.0)


def test_shard_root_is_checked():
    with pytest.raises(InvalidArgumentError, match="root"):
        Tree(4, [0], 3, Policy(), root=([1, 0], 0.0, 0.0))  # an EOS inside the prefix
    with pytest.raises(InvalidArgumentError, match="root"):
        Tree(4, [0], 2, Policy(), root=([1, 2], 0.0, 0.0))  # a leaf, not an internal node
    # A prefix the policy cannot produce is refused when the backend is walked down it.
    model = lambda p: np.tile([0.0, 0.0, -np.inf, 0.0], (len(p), 1))  # noqa: E731
    tree = Tree(4, [0], 4, Policy(), root=([2], math.log(0.5), 0.7))
    with pytest.raises(InvalidArgumentError, match="not in the policy support"):
        drive(tree, model)


def test_partial_round_trip_and_merge_checks():
    tree = Tree(3, [0], 3, Policy())
    drive(tree, RandomModel(3, 4))
    p = tree.partial()
    q = Partial.from_array(p.to_array())
    assert q.result()["ce_star"] == p.result()["ce_star"]
    assert q.to_array().tolist() == p.to_array().tolist()
    with pytest.raises(InvalidArgumentError, match="partial"):
        Partial.from_array(np.zeros(5))
    other = Tree(3, [0], 4, Policy())
    drive(other, RandomModel(3, 4))
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        p.merge(other.partial())


@pytest.mark.parametrize("max_expanded", [1, 3, 10, 10**6])
def test_a_shard_split_again_merges_into_the_same_result(max_expanded):
    from canopy_rs.drivers.shards import run_shard_or_split

    kw = dict(vocab_size=5, eos_token_ids=[0, 4], max_new_tokens=7, top_k=4, temperature=1.3)
    model = RandomModel(5, 21)
    one = canopy_rs.exact(model, **kw)
    head, todo = split_canopy(model, min_shards=4, **kw)
    parts, handed_back = [head], 0
    while todo:
        part, rest = run_shard_or_split(model, todo.pop(), max_expanded=max_expanded, **kw)
        assert part.stopped_by is None and (part.frontier_size == 0)  # the pending subtrees are not in it
        parts.append(part)
        todo += rest
        handed_back += len(rest)
    assert (handed_back > 0) == (max_expanded < 100)
    assert_same_result(finish(merge_partials(parts)), one)
