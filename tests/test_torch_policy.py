"""The on-device (torch) decoding policy against the Rust reference ``canopy_rs._core.policy_support``."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from canopy_rs import Policy  # noqa: E402
from canopy_rs.errors import BackendOutputError  # noqa: E402
from canopy_rs._core import policy_support  # noqa: E402
from canopy_rs.backends.torch_policy import policy_support_numpy, policy_support_torch  # noqa: E402

POLICIES = [
    Policy(1.0, None, 1.0),
    Policy(0.7, 3, 1.0),
    Policy(1.3, None, 0.8),
    Policy(1.0, 2, 0.5),
    Policy(0.5, 5, 0.9),
    Policy(2.0, 1, 1.0),
    Policy(1.0, 100, 0.95),  # top-k wider than the vocabulary
    Policy(1.0, None, 1e-9),  # top-p keeps only the first token
    Policy(0.9, 4, 0.3),
]


def rows_by_token(offsets, tokens, logprobs):
    out = []
    for i in range(len(offsets) - 1):
        t = tokens[offsets[i] : offsets[i + 1]]
        lp = logprobs[offsets[i] : offsets[i + 1]]
        order = np.argsort(t, kind="stable")
        out.append((t[order], lp[order]))
    return out


def assert_same_support(logits, policy, tol=1e-12):
    ro, rt, rl, _ = policy_support(logits, policy)
    to, tt, tl = policy_support_numpy(logits, policy)
    assert to.dtype == np.int64 and tt.dtype == np.int64 and tl.dtype == np.float64
    assert to[0] == 0 and to[-1] == len(tt) == len(tl)
    ref_rows = rows_by_token(ro, rt, rl)
    got_rows = rows_by_token(to, tt, tl)
    assert len(ref_rows) == len(got_rows)
    for i, ((rtok, rlp), (gtok, glp)) in enumerate(zip(ref_rows, got_rows)):
        np.testing.assert_array_equal(gtok, rtok, err_msg=f"row {i} support, policy {policy}")
        np.testing.assert_allclose(glp, rlp, rtol=0, atol=tol, err_msg=f"row {i} logprobs, policy {policy}")


def tied_logits(rng, rows, vocab, dtype):
    """Small-integer logits (many exact ties), a few -inf, some rows with continuous values."""
    x = rng.integers(-3, 4, size=(rows, vocab)).astype(np.float64)
    x[rows // 2 :] += rng.normal(size=(rows - rows // 2, vocab)) * 2.0
    mask = rng.random((rows, vocab)) < 0.1
    mask[:, 0] = False  # keep every row non-empty
    x[mask] = -np.inf
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_matches_rust_reference_with_ties(policy, dtype):
    rng = np.random.default_rng(1234)
    for vocab in (8, 13, 16):
        assert_same_support(tied_logits(rng, 24, vocab, dtype), policy)


@pytest.mark.parametrize("policy", [Policy(1.0, 2, 1.0), Policy(0.8, 5, 0.9), Policy(1.0, 30, 1.0)], ids=repr)
def test_many_ties_beyond_the_candidate_slack(policy):
    # Wide rows of 3 distinct values: ~V/3 tokens tie at the k-th value, far more than k + the slack.
    rng = np.random.default_rng(5)
    for vocab in (64, 200):
        x = rng.integers(-1, 2, size=(6, vocab)).astype(np.float32)
        x[0] = rng.normal(size=vocab)  # one row without ties
        assert_same_support(x, policy)


def test_uniform_row_exact_top_p_boundary():
    # p = 0.5 on a uniform row of 8: the cumulative mass hits 0.5 exactly at the 4th token.
    logits = np.zeros((3, 8), dtype=np.float32)
    for p in (0.5, 0.25, 0.75, 0.125):
        assert_same_support(logits, Policy(1.0, None, p))
        _, tokens, _ = policy_support_numpy(logits, Policy(1.0, None, p))
        assert len(tokens) == 3 * round(8 * p)


def test_descending_order_ties_by_token_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -float("inf")]])
    offsets, tokens, logprobs = policy_support_torch(logits, Policy(1.0, 2, 1.0))
    assert offsets.tolist() == [0, 3]
    assert tokens.tolist() == [1, 2, 4]  # three tied at the 2nd-largest value, ascending ids
    assert torch.allclose(logprobs, torch.full((3,), -np.log(3.0), dtype=torch.float64))


def test_underflowing_and_masked_tokens_are_not_in_support():
    logits = np.array([[0.0, -2000.0, -np.inf, 1.0]], dtype=np.float64)
    assert_same_support(logits, Policy(1.0, None, 1.0))
    _, tokens, _ = policy_support_numpy(logits, Policy(1.0, None, 1.0))
    assert sorted(tokens.tolist()) == [0, 3]


def test_bf16_logits_are_accepted():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(4, 16)).astype(np.float32)).to(torch.bfloat16)
    o, t, lp = policy_support_torch(x, Policy(1.0, 5, 0.9))
    assert_same_support(x.float().numpy(), Policy(1.0, 5, 0.9))
    ref = policy_support_numpy(x.float(), Policy(1.0, 5, 0.9))
    np.testing.assert_array_equal(o.numpy(), ref[0])


def test_invalid_rows_raise():
    with pytest.raises(BackendOutputError, match="NaN"):
        policy_support_torch(torch.tensor([[0.0, float("nan")]]), Policy())
    with pytest.raises(BackendOutputError, match="-inf"):
        policy_support_torch(torch.tensor([[-float("inf"), -float("inf")]]), Policy())
    # The one-transfer host path (top-k below the vocabulary) flags the row and names the same problem.
    for bad, what in ((float("nan"), "NaN"), (float("inf"), r"\+inf")):
        x = torch.zeros((3, 6))
        x[1, 2] = bad
        with pytest.raises(BackendOutputError, match=what):
            policy_support_numpy(x, Policy(1.0, 2, 1.0))


def test_empty_batch():
    o, t, lp = policy_support_torch(torch.zeros((0, 5)), Policy(1.0, 2, 0.9))
    assert o.tolist() == [0] and t.numel() == 0 and lp.numel() == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    vocab=st.integers(1, 20),
    temperature=st.sampled_from([0.3, 0.7, 1.0, 1.5, 4.0]),
    top_k=st.one_of(st.none(), st.integers(1, 24)),
    top_p=st.sampled_from([1.0, 0.99, 0.9, 0.6, 0.5, 0.3, 0.05]),
    integer=st.booleans(),
)
def test_property_matches_rust(seed, vocab, temperature, top_k, top_p, integer):
    rng = np.random.default_rng(seed)
    if integer:
        x = rng.integers(-2, 3, size=(5, vocab)).astype(np.float32)
    else:
        x = (rng.normal(size=(5, vocab)) * 3).astype(np.float32)
    assert_same_support(x, Policy(temperature, top_k, top_p))
