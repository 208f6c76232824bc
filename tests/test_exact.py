"""The exact engine against brute-force enumeration, closed forms and the identities of docs/definitions.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import canopy_rs
from reference import RandomModel, enumerate_canopy, iid_model, policy, population_values

FIELDS = canopy_rs.CanopyResult.SCALAR_FIELDS


def assert_matches_reference(res, ref, tol=1e-10):
    for f in FIELDS:
        a, b = getattr(res, f), ref[f]
        if math.isnan(b):
            assert math.isnan(a), f"{f}: engine {a}, reference NaN"
            continue
        # rho divides by sd(N) sd(r_N): the rounding of the deviations (~1e-16 of the means) is amplified by
        # mean / sd, in both implementations alike, when nearly every path has the same length or rate.
        cond = 0.0
        if f == "length_rate_corr":
            cond = max(
                max(1.0, abs(ref["entropy_rate"])) / math.sqrt(ref["rate_var"]),
                max(1.0, ref["expected_length"]) / math.sqrt(ref["length_var"]),
            )
        assert a == pytest.approx(b, rel=tol, abs=tol + 1e-14 * cond), f
    np.testing.assert_allclose(res.length_pmf, ref["length_pmf"], rtol=tol, atol=tol)
    assert res.num_leaves == ref["num_leaves"]


@st.composite
def canopy_cases(draw):
    v = draw(st.integers(2, 8))
    n_eos = draw(st.integers(1, min(3, v - 1)))
    eos = draw(st.lists(st.integers(0, v - 1), min_size=n_eos, max_size=n_eos, unique=True))
    top_k = draw(st.one_of(st.none(), st.integers(1, v)))
    branching = min(v, top_k or v)
    # Keep the brute force small: at most ~3000 leaves.
    max_depth = max(1, min(6, int(math.log(3000) / math.log(max(branching, 2)))))
    return dict(
        vocab_size=v,
        eos_token_ids=eos,
        max_new_tokens=draw(st.integers(1, max_depth)),
        temperature=draw(st.sampled_from([1.0, 0.5, 1.7, 0.05])),
        top_k=top_k,
        top_p=draw(st.one_of(st.just(1.0), st.sampled_from([0.25, 0.5, 0.9]), st.floats(0.05, 1.0))),
        seed=draw(st.integers(0, 10**6)),
        levels=draw(st.sampled_from([0, 2, 3])),  # 2-3 levels: many ties
        mask_prob=draw(st.sampled_from([0.0, 0.3])),
        batch_size=draw(st.sampled_from([1, 3, 64])),
        order=draw(st.sampled_from(["depth-first", "breadth-first", "best-first"])),
    )


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(canopy_cases())
def test_every_field_matches_brute_force(case):
    model = RandomModel(case["vocab_size"], case["seed"], case["levels"], case["mask_prob"])
    policy_args = {k: case[k] for k in ("temperature", "top_k", "top_p")}
    res = canopy_rs.exact(
        model,
        vocab_size=case["vocab_size"],
        eos_token_ids=case["eos_token_ids"],
        max_new_tokens=case["max_new_tokens"],
        batch_size=case["batch_size"],
        order=case["order"],
        **policy_args,
    )
    leaves, chain, internal = enumerate_canopy(
        model.row, case["eos_token_ids"], case["max_new_tokens"], **policy_args
    )
    assert res.num_internal_nodes == internal
    assert_matches_reference(res, population_values(leaves, chain, case["max_new_tokens"]))


@settings(max_examples=100, deadline=None)
@given(
    v=st.integers(2, 12),
    seed=st.integers(0, 10**6),
    levels=st.sampled_from([0, 2, 4]),
    temperature=st.sampled_from([1.0, 0.3, 2.5]),
    top_k=st.one_of(st.none(), st.integers(1, 12)),
    top_p=st.floats(0.01, 1.0),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_policy_support_matches_reference(v, seed, levels, temperature, top_k, top_p, dtype):
    rows = np.array([RandomModel(v, seed + i, levels, 0.2).row([]) for i in range(5)], dtype=dtype)
    pol = canopy_rs.Policy(temperature, top_k, top_p)
    offsets, tokens, logprobs, entropy = canopy_rs._core.policy_support(rows, pol)
    for i, row in enumerate(rows):
        expect = policy([float(x) for x in row], temperature, top_k, top_p)
        got = dict(zip(tokens[offsets[i] : offsets[i + 1]].tolist(), logprobs[offsets[i] : offsets[i + 1]].tolist()))
        assert sorted(got) == sorted(expect)
        for t in expect:
            assert got[t] == pytest.approx(expect[t], abs=1e-12)
        assert entropy[i] == pytest.approx(math.fsum(-math.exp(x) * x for x in expect.values()), abs=1e-12)


@pytest.mark.parametrize("q,k,t", [(0.3, 3, 6), (0.05, 2, 9), (0.9, 5, 3), (0.5, 1, 12)])
def test_iid_closed_form(q, k, t):
    h = -q * math.log(q) - (1 - q) * math.log((1 - q) / k)
    res = canopy_rs.exact(iid_model(q, k), vocab_size=k + 1, eos_token_ids=0, max_new_tokens=t)
    assert res.ce_star == pytest.approx(sum((1 - q) ** i * h for i in range(t)), rel=1e-12)
    assert res.truncation_prob == pytest.approx((1 - q) ** t, rel=1e-12)
    # N is a geometric law truncated at t; every step has the same entropy, so r_N = h for every leaf.
    pmf = [0.0] + [(1 - q) ** (n - 1) * q for n in range(1, t)] + [(1 - q) ** (t - 1)]
    np.testing.assert_allclose(res.length_pmf, pmf, rtol=1e-12, atol=1e-15)
    assert res.entropy_rate == pytest.approx(h, rel=1e-12)
    assert math.isnan(res.length_rate_corr)


def test_uniform_tree_closed_form():
    # No EOS reachable before the cap in a uniform k-ary tree with an EOS id outside the top-k: T log k.
    v, k, t = 6, 3, 5
    row = np.array([0.0] * k + [-5.0] * (v - k))
    res = canopy_rs.exact(lambda p: np.tile(row, (len(p), 1)), vocab_size=v, eos_token_ids=[v - 1], max_new_tokens=t, top_k=k)
    assert res.ce_star == pytest.approx(t * math.log(k), rel=1e-13)
    assert res.num_leaves == k**t and res.num_internal_nodes == (k**t - 1) // (k - 1)
    assert res.truncation_prob == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(v=st.integers(2, 6), seed=st.integers(0, 10**6), t=st.integers(1, 5), top_k=st.one_of(st.none(), st.integers(1, 3)))
def test_identities(v, seed, t, top_k):
    model = RandomModel(v, seed, scale=1.5)
    res = canopy_rs.exact(model, vocab_size=v, eos_token_ids=[0], max_new_tokens=t, top_k=top_k)
    assert res.ce_star == pytest.approx(res.ce_star_leaves, rel=1e-9, abs=1e-12)
    assert res.ce_star == pytest.approx(res.length_entropy + res.content_entropy, abs=1e-12)
    assert res.ce_star == pytest.approx(res.expected_length * res.entropy_rate + res.length_rate_cov, rel=1e-9, abs=1e-12)
    assert math.log(res.gen_ppl) - math.log(res.branching_factor) == pytest.approx(
        res.length_rate_cov / res.expected_length, abs=1e-10
    )
    assert res.total_mass == pytest.approx(1.0, abs=1e-12)
    assert res.length_pmf.sum() == pytest.approx(1.0, abs=1e-12)
    assert res.entropy_by_depth.sum() == pytest.approx(res.ce_star, rel=1e-12, abs=1e-14)


@settings(max_examples=40, deadline=None)
@given(v=st.integers(2, 5), seed=st.integers(0, 10**6), top_p=st.floats(0.3, 1.0))
def test_ce_star_max_non_decreasing_in_t(v, seed, top_p):
    model = RandomModel(v, seed)
    values = [
        canopy_rs.exact(model, vocab_size=v, eos_token_ids=[0], max_new_tokens=t, top_p=top_p, top_k=3).ce_star
        for t in range(1, 6)
    ]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))


def test_full_vocab_policy_is_model_entropy():
    logits = np.random.default_rng(3).normal(size=(1, 7))
    res = canopy_rs.exact(lambda p: np.repeat(logits, len(p), 0), vocab_size=7, eos_token_ids=[0, 1, 2, 3, 4, 5, 6], max_new_tokens=1, top_k=7)
    p = np.exp(logits[0] - logits[0].max())
    p /= p.sum()
    assert res.ce_star == pytest.approx(-(p * np.log(p)).sum(), rel=1e-13)


def test_orders_and_batch_sizes_agree_and_are_reproducible():
    model = RandomModel(5, 11)
    kw = dict(vocab_size=5, eos_token_ids=[0, 4], max_new_tokens=5, top_k=3)
    results = [
        canopy_rs.exact(model, order=o, batch_size=b, **kw) for o in ("depth-first", "breadth-first", "best-first") for b in (1, 7, 500)
    ]
    for r in results[1:]:
        assert r.ce_star == pytest.approx(results[0].ce_star, rel=1e-13)
        assert r.num_leaves == results[0].num_leaves
    again = canopy_rs.exact(model, order="depth-first", batch_size=1, **kw)
    assert again.ce_star == results[0].ce_star  # bit-for-bit


def test_float32_logits_and_node_arrays():
    model = RandomModel(4, 5)
    res = canopy_rs.exact(lambda p: model(p).astype(np.float32), vocab_size=4, eos_token_ids=0, max_new_tokens=3, return_nodes=True)
    nodes = res.nodes
    assert set(nodes) == {"parent", "token", "depth", "log_reach", "entropy", "is_leaf"}
    leaf = nodes["is_leaf"]
    assert leaf.sum() == res.num_leaves and (~leaf).sum() == res.num_internal_nodes
    assert np.exp(nodes["log_reach"][leaf]).sum() == pytest.approx(1.0)
    internal = ~leaf
    assert (np.exp(nodes["log_reach"][internal]) * nodes["entropy"][internal]).sum() == pytest.approx(res.ce_star)
    assert nodes["parent"][0] == -1 and nodes["token"][0] == -1
    d = res.to_dict()
    assert d["ce_star"] == res.ce_star and isinstance(d["length_pmf"], list) and d["is_exact"] is True


def test_backend_counters_and_release_protocol():
    calls = []

    class Recorder(canopy_rs.CallableModel):
        def release(self, node_ids):
            calls.append(node_ids.copy())

    model = Recorder(RandomModel(3, 2), 3, [0])
    res = canopy_rs.exact(model, max_new_tokens=4, batch_size=2)
    released = np.concatenate(calls)
    assert len(released) == res.num_internal_nodes == len(set(released.tolist()))
    assert res.model_calls >= math.ceil(res.num_internal_nodes / 2)
    assert res.rows_evaluated == res.num_internal_nodes
    assert res.tokens_forwarded > 0  # the callable recomputes every prefix


# ----------------------------------------------------------------------------------------------------------
# Errors: a clear exception naming the parameter, never a panic or a wrong number.

GOOD = dict(vocab_size=4, eos_token_ids=[0], max_new_tokens=3)


def const_model(row):
    row = np.asarray(row, dtype=np.float64)
    return lambda p: np.tile(row, (len(p), 1))


@pytest.mark.parametrize(
    "row,match",
    [
        ([0.0, np.nan, 0.0, 0.0], "NaN"),
        ([0.0, np.inf, 0.0, 0.0], r"\+inf"),
        ([-np.inf] * 4, "all -inf"),
    ],
)
def test_bad_logits_rows(row, match):
    with pytest.raises(ValueError, match=match):
        canopy_rs.exact(const_model(row), **GOOD)


def test_wrong_shape_and_dtype():
    with pytest.raises(ValueError, match=r"shape \(1, 5\)"):
        canopy_rs.exact(lambda p: np.zeros((len(p), 5)), **GOOD)
    with pytest.raises(ValueError, match="shape"):
        canopy_rs.exact(lambda p: np.zeros(4), **GOOD)
    # A wrong dtype from the model is a malformed output, like a wrong shape (one error type for both).
    with pytest.raises(canopy_rs.errors.BackendOutputError, match="float32 or float64"):
        canopy_rs.exact(lambda p: np.zeros((len(p), 4), dtype=np.int64), **GOOD)
    with pytest.raises(TypeError, match="float32 or float64"):
        canopy_rs._core.policy_support(np.zeros((2, 3), dtype=np.int32), canopy_rs.Policy())


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(eos_token_ids=[4]), ValueError, "eos_token_ids"),
        (dict(eos_token_ids=[-1]), ValueError, "eos_token_ids"),
        (dict(eos_token_ids=[]), ValueError, "eos_token_ids"),
        (dict(eos_token_ids=None), TypeError, "eos_token_ids"),
        (dict(vocab_size=None), TypeError, "vocab_size"),
        (dict(vocab_size=0), ValueError, "vocab_size"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_k=1.5), TypeError, "top_k"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.01), ValueError, "top_p"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(max_nodes=0), ValueError, "max_nodes"),
        (dict(order="random"), ValueError, "order"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = {**GOOD, **kwargs}
    with pytest.raises(exc, match=match):
        canopy_rs.exact(const_model([0.0] * 4), **args)


def test_tree_larger_than_budget_raises_with_count():
    with pytest.raises(canopy_rs.TreeTooLargeError, match=r"max_nodes=100: (\d+) nodes were reached") as e:
        canopy_rs.exact(const_model([0.0] * 4), vocab_size=4, eos_token_ids=[0], max_new_tokens=12, max_nodes=100)
    assert isinstance(e.value, ValueError)
    assert "canopy_rs.bounded" in str(e.value)


def test_non_callable_model():
    with pytest.raises(TypeError, match="callable"):
        canopy_rs.exact(42, **GOOD)


def test_interrupt_keeps_the_bracket():
    model = RandomModel(4, 9)
    seen = {"n": 0}

    def fn(prefixes):
        seen["n"] += 1
        if seen["n"] == 5:
            raise KeyboardInterrupt
        return model(prefixes)

    with pytest.raises(canopy_rs.Interrupted) as e:
        canopy_rs.exact(fn, vocab_size=4, eos_token_ids=[0], max_new_tokens=6, batch_size=3)
    b = e.value.bounds
    truth = canopy_rs.exact(model, vocab_size=4, eos_token_ids=[0], max_new_tokens=6).ce_star
    assert b.num_expanded == b.info.rows_evaluated == 1 + 3 * 3  # root, then three full batches
    assert b.ce_star_lower <= truth <= b.ce_star_upper


def _policy_rows_in_child(queue):
    x = np.random.default_rng(1).normal(size=(20_000, 32)).astype(np.float32)
    queue.put(len(canopy_rs._core.policy_support(x, canopy_rs.Policy(1.0, 4))[3]))


def test_forked_child_does_not_hang_on_the_thread_pool():
    import multiprocessing as mp

    x = np.random.default_rng(0).normal(size=(20_000, 32)).astype(np.float32)
    canopy_rs._core.policy_support(x, canopy_rs.Policy(1.0, 4))  # the parent's pool is running
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_policy_rows_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0, "the forked child hung or failed"
    assert queue.get(timeout=5) == 20_000


def test_one_json_conversion_for_results_and_files():
    import json
    import pathlib

    from canopy_rs import runs
    from canopy_rs.results import to_plain

    res = canopy_rs.exact(RandomModel(4, 5), vocab_size=4, eos_token_ids=[0], max_new_tokens=2)
    v = {"r": res, "x": np.float32(0.5), "a": np.array([1.0, np.nan]), 3: (np.int64(2), pathlib.Path("p")),
         "inf": float("inf")}
    plain = to_plain(v)
    assert plain["r"] == res.to_dict() and plain["x"] == 0.5 and plain["3"] == [2, "p"]
    assert math.isnan(plain["a"][1]) and plain["inf"] == math.inf
    strict = to_plain(v, strict=True)
    assert strict["a"] == [1.0, None] and strict["inf"] is None
    assert json.loads(runs.dumps(v)) == json.loads(json.dumps(strict))  # files use the same conversion
