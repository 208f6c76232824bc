"""canopy_rs.sample: reproducibility, protocol discipline, per-step values, and the sampled distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

import canopy_rs
from canopy_rs.drivers.rollouts import sample_csr
from canopy_rs.drivers.setup import make_policy
from canopy_rs.sampling import Rollouts, sample
from estimator_helpers import CheckingBackend, leaf_table, peaked_model
from canopy_rs.testing import random_logits_fn

KW = dict(vocab_size=5, eos_token_ids=[0, 3], max_new_tokens=4)


def _fn():
    return random_logits_fn(5, seed=11, scale=1.5, eos_bias=-0.5)


def test_same_seed_same_rollouts_and_sharing_changes_only_cost():
    fn = _fn()
    a = sample(fn, num_rollouts=300, seed=123, **KW)
    b = sample(fn, num_rollouts=300, seed=123, **KW)
    c = sample(fn, num_rollouts=300, seed=124, **KW)
    d = sample(fn, num_rollouts=300, seed=123, share_prefixes=False, batch_size=7, **KW)
    for name in ("tokens", "lengths", "entropies", "logq", "eos"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert np.array_equal(getattr(a, name), getattr(d, name)), name
    assert not np.array_equal(a.tokens, c.tokens)
    # Without sharing every drawn token of an unfinished rollout is its own node: sum(N_i - 1) + root.
    unfinished_steps = int((a.lengths - 1).sum())
    assert d.cost["nodes_expanded"] == 1 + unfinished_steps
    assert d.cost["rows_evaluated"] == d.cost["nodes_expanded"]
    assert a.cost["nodes_expanded"] < d.cost["nodes_expanded"]
    assert d.cost["model_calls"] > a.cost["model_calls"]  # batch_size=7 splits the calls
    assert a.seed == 123 and a.policy == {"temperature": 1.0, "top_k": None, "top_p": 1.0}


@pytest.mark.parametrize("stratified", [False, True])
def test_protocol_rules_are_kept(stratified):
    be = CheckingBackend(_fn(), 5, [0, 3])
    r = sample(be, num_rollouts=64, seed=0, max_new_tokens=4, stratified=stratified)
    assert be.resets == 2  # construction + the run
    # Everything expanded is released by the end.
    assert be.released == set(be.expanded)
    assert r.num_rollouts == 64


@pytest.mark.parametrize("policy", [dict(), dict(temperature=0.7, top_k=3), dict(top_p=0.8)])
def test_per_step_values_match_the_policy(policy):
    fn = _fn()
    r = sample(fn, num_rollouts=40, seed=5, **KW, **policy)
    pol = make_policy(policy.get("temperature", 1.0), policy.get("top_k"), policy.get("top_p", 1.0))
    from canopy_rs._core import policy_support

    eos = set(KW["eos_token_ids"])
    for i, toks in enumerate(r.token_lists()):
        n = int(r.lengths[i])
        assert len(toks) == n and 1 <= n <= KW["max_new_tokens"]
        assert r.eos[i] == (toks[-1] in eos)
        assert all(t not in eos for t in toks[:-1])
        assert r.eos[i] or n == KW["max_new_tokens"]
        assert r.truncated[i] == (n >= KW["max_new_tokens"])
        prefixes = [toks[:t] for t in range(n)]
        off, tok, lp, ent = policy_support(np.asarray(fn(prefixes), dtype=np.float64), pol)
        for t in range(n):
            row = dict(zip(tok[off[t]:off[t + 1]].tolist(), lp[off[t]:off[t + 1]].tolist()))
            assert toks[t] in row, "sampled a token outside the policy support"
            assert r.logq[i, t] == pytest.approx(row[toks[t]], abs=1e-12)
            assert r.entropies[i, t] == pytest.approx(ent[t], abs=1e-12)
        assert np.all(r.tokens[i, n:] == -1) and np.all(r.entropies[i, n:] == 0) and np.all(r.logq[i, n:] == 0)
    assert r.step_entropy_sums == pytest.approx(r.entropies.sum(1))
    assert r.entropy_rates == pytest.approx(r.step_entropy_sums / r.lengths)


def test_leaf_frequencies_follow_the_policy():
    """Chi-square goodness of fit of 20000 rollouts to the exact leaf distribution (fixed seed; the
    threshold p > 1e-3 fails a wrong sampler by a wide margin: one misplaced 1% of mass gives p ~ 1e-10)."""
    fn = random_logits_fn(3, seed=2, scale=1.0)
    kw = dict(vocab_size=3, eos_token_ids=[0], max_new_tokens=3)
    table = leaf_table(canopy_rs.exact(fn, return_nodes=True, **kw))
    r = sample(fn, num_rollouts=20000, seed=9, **kw)
    keys = list(table)
    counts = dict.fromkeys(keys, 0)
    for toks in r.token_lists():
        counts[tuple(toks)] += 1
    obs = np.array([counts[k] for k in keys])
    exp = np.array([math.exp(table[k][0]) for k in keys]) * r.num_rollouts
    assert obs.sum() == r.num_rollouts
    assert stats.chisquare(obs, exp).pvalue > 1e-3


def test_stratified_counts_are_within_two_of_expected():
    """One draw per stratum of the leaf CDF: every leaf (an interval of length pi) gets M pi +- 2 rollouts,
    far tighter than i.i.d. sampling's sqrt(M pi)."""
    fn = random_logits_fn(3, seed=4, scale=2.0)
    kw = dict(vocab_size=3, eos_token_ids=[0], max_new_tokens=4)
    table = leaf_table(canopy_rs.exact(fn, return_nodes=True, **kw))
    m = 1000
    for seed in range(3):
        r = sample(fn, num_rollouts=m, seed=seed, stratified=True, **kw)
        assert r.stratified
        counts = dict.fromkeys(table, 0)
        for toks in r.token_lists():
            counts[tuple(toks)] += 1
        dev = max(abs(counts[k] - m * math.exp(v[0])) for k, v in table.items())
        assert dev <= 2.0
    iid = sample(fn, num_rollouts=m, seed=0, **kw)
    counts = dict.fromkeys(table, 0)
    for toks in iid.token_lists():
        counts[tuple(toks)] += 1
    assert max(abs(counts[k] - m * math.exp(v[0])) for k, v in table.items()) > 2.0


def test_stratified_rollouts_are_marginally_exact():
    """Averaged over seeds, the stratified RB estimate is unbiased (z-test on 300 independent runs)."""
    fn = peaked_model(vocab_size=4, seed=3, scale=2.0)
    kw = dict(vocab_size=4, eos_token_ids=[0], max_new_tokens=5)
    truth = canopy_rs.exact(fn, **kw).ce_star
    vals = np.array([sample(fn, num_rollouts=7, seed=s, stratified=True, **kw).step_entropy_sums.mean()
                     for s in range(300)])
    z = (vals.mean() - truth) / (vals.std(ddof=1) / math.sqrt(vals.size))
    assert abs(z) < 4.0


def test_sample_csr_is_exact_inverse_cdf():
    offsets = np.array([0, 3, 4, 6])
    lp = np.log(np.array([0.5, 0.3, 0.2, 1.0, 1e-300, 1.0 - 1e-300]))
    rows = np.array([0, 0, 0, 0, 1, 2, 2])
    u = np.array([0.0, 0.49, 0.5, 0.99, 0.7, 0.0, 0.5])
    e, lo, p = sample_csr(offsets, lp, rows, u)
    # Per-row cumulative sums keep a 1e-300 entry resolvable: it owns [0, 1e-300) of its row.
    assert e.tolist() == [0, 0, 1, 2, 3, 4, 5]
    assert p[:4] == pytest.approx([0.5, 0.5, 0.3, 0.2])
    assert lo[:4] == pytest.approx([0.0, 0.0, 0.5, 0.8])


def test_bad_arguments_raise_value_errors():
    fn = _fn()
    with pytest.raises(ValueError, match="num_rollouts"):
        sample(fn, num_rollouts=0, seed=0, **KW)
    with pytest.raises(TypeError, match="num_rollouts"):
        sample(fn, num_rollouts=2.5, seed=0, **KW)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample(fn, num_rollouts=2, seed=0, vocab_size=5, eos_token_ids=[0], max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        sample(fn, num_rollouts=2, seed=0, batch_size=0, **KW)
    with pytest.raises(ValueError, match="seed"):
        sample(fn, num_rollouts=2, seed="abc", **KW)


def test_from_ragged_and_subset():
    r = Rollouts.from_ragged([[1, 2, 0], [4, 4, 4, 4], [0]], [[1.0, 0.5, 0.2], [0.1, 0.1, 0.1, 0.1], [0.7]],
                             [[-1.0, -0.5, -0.1], [-0.2] * 4, [-0.3]], eos_token_ids=[0], max_new_tokens=4)
    assert r.lengths.tolist() == [3, 4, 1]
    assert r.eos.tolist() == [True, False, True]
    assert r.truncated.tolist() == [False, True, False]
    assert r.step_entropy_sums == pytest.approx([1.7, 0.4, 0.7])
    assert r.surprisal_sums == pytest.approx([1.6, 0.8, 0.3])
    d = r.to_dict()
    assert d["tokens"][1] == [4, 4, 4, 4] and d["entropies"][2] == [0.7] and d["truncated"] == [False, True, False]
    s = r.subset([2, 0])
    assert s.lengths.tolist() == [1, 3] and s.tokens.shape == (2, 3)
    with pytest.raises(ValueError, match="after an EOS"):
        Rollouts.from_ragged([[0, 1]], [[1.0, 1.0]], eos_token_ids=[0], max_new_tokens=4)
    with pytest.raises(ValueError, match="without EOS"):
        Rollouts.from_ragged([[1, 1]], [[1.0, 1.0]], eos_token_ids=[0], max_new_tokens=4)
    with pytest.raises(ValueError, match="entropies/logq"):
        Rollouts.from_ragged([[0]], [[1.0, 2.0]], eos_token_ids=[0], max_new_tokens=4)
