"""Stochastic beam search (Gumbel-top-k; Kool, van Hoof & Welling, ICML 2019) and its importance-weighted
estimators of CE*_max.

Every node gets a perturbed log-probability G (the root: a Gumbel(0) draw); a child's G is a Gumbel with location
log pi(child) conditioned so that the largest child's G equals its parent's ("top-down" Gumbel-max), so a node's
G is the largest G of the leaves below it. Keeping the k largest G per level (children of the beam plus the
leaves already kept) yields k leaves sampled *without replacement* from the leaf distribution.

Level d's beam is the top k of the cut C_d (the nodes at depth d and the leaves above them: disjoint subtrees
with independent G_x ~ Gumbel(log pi(x))), and its threshold kappa_d, the (k+1)-th largest G of C_d, is the
running maximum of the pruned G. Conditional on kappa_d a node is kept with probability
q_d(x) = 1 - exp(-exp(log pi(x) - kappa_d)) (rank conditioning; Vieira 2017, Kool et al. 2019), so

    ce_star = sum over every expanded beam node u of pi(u) h(u) / q_{d(u)}(u)

is unbiased for CE*_max = sum_u pi(u) h(u). Every expanded node contributes its exact entropy, and nodes with
q = 1 (the high-probability head) contribute exactly. An earlier version weighted *leaves* by q at the final
threshold and gave each leaf its path's entropy sum: that HT estimate of the mass below a node is noisy even
for nodes that are certainly in the beam, which made it 2-5x worse than plain Monte Carlo on SmolLM2.

Where it wins: on peaked canopies (most mass on few paths) the head is exact and the rest is small. Where it
loses: on bushy, near-uniform canopies the number of kept nodes per level times their weight is a random
estimate of a level mass that is exactly 1, and h multiplies that noise; Monte Carlo's mean of path sums is
self-normalised and does better there (see docs/estimators.md).

``ce_star_surprisal`` is the leaf-level estimate of -sum pi log pi (weights pi / q at the final threshold).
When the whole tree has at most k leaves the search enumerates it and every estimate is exact (kappa = -inf).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from canopy_rs import stats
from canopy_rs.backends.output import expand_support
from canopy_rs.drivers.setup import check_positive_int, cost, make_rng, setup
from canopy_rs.results import to_plain

__all__ = ["BeamSearchEstimate", "stochastic_beam_search"]


def _log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 - exp(x)) for x <= 0, stable at both ends (x = 0 gives -inf)."""
    with np.errstate(divide="ignore"):
        return np.where(x > -math.log(2.0), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def _gumbel_with_maximum(phi: np.ndarray, parent_g: np.ndarray, group: np.ndarray, num_groups: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Gumbels with locations ``phi`` whose per-group maximum equals ``parent_g[group]`` (Kool et al.,
    appendix B, numerically stable form)."""
    g = phi + rng.gumbel(size=phi.shape[0])
    z = np.full(num_groups, -np.inf)
    np.maximum.at(z, group, g)
    t = parent_g[group]
    with np.errstate(invalid="ignore"):
        v = t - g + _log1mexp(np.minimum(g - z[group], 0.0))
        return t - np.maximum(v, 0.0) - np.log1p(np.exp(-np.abs(v)))


@dataclass(frozen=True)
class BeamSearchEstimate:
    """Result of :func:`stochastic_beam_search`; ``leaf_*`` arrays describe the sampled leaves."""

    ce_star: float
    ce_star_se: float
    ce_star_ci: tuple[float, float]
    ce_star_surprisal: float
    ce_star_surprisal_se: float
    ce_star_surprisal_ci: tuple[float, float]
    beam_size: int
    num_leaves: int
    threshold: float
    is_exact: bool
    confidence: float
    leaf_log_reach: np.ndarray
    leaf_entropy_sums: np.ndarray
    leaf_lengths: np.ndarray
    leaf_inclusion: np.ndarray
    leaf_tokens: list = field(repr=False, default_factory=list)
    cost: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dict(self.__dict__))


def _inclusion(logpi: np.ndarray, kappa: float) -> np.ndarray:
    """P(a node with reach log pi is in the beam | threshold kappa) = P(Gumbel(log pi) > kappa)."""
    if math.isinf(kappa):
        return np.ones(logpi.shape[0])
    return -np.expm1(-np.exp(logpi - kappa))


def _node_estimate(lvl_wh: list, lvl_q: list, lvl_par: list) -> tuple[float, float]:
    """Sum over every expanded beam node of pi h / q, and its SE.

    Variance: items at one level are disjoint subtrees (zero covariance given the threshold); a node and
    its descendant v at a later level are both in the beam iff v is (G_v <= G_u and thresholds only rise),
    so Cov(1_u/q_u, 1_v/q_v) = (1 - q_u)/q_u. Its HT estimate gives
    sum_u (1 - q_u) a_u (a_u + 2 D_u), a = pi h / q, D_u = sum of a over u's expanded descendants."""
    est = float(sum(float(a.sum()) for a in lvl_wh))
    desc = np.zeros(lvl_wh[-1].shape[0])
    var = 0.0
    for d in range(len(lvl_wh) - 1, -1, -1):
        a = lvl_wh[d]
        var += float(np.sum((1.0 - lvl_q[d]) * a * (a + 2.0 * desc)))
        if d > 0:
            up = np.zeros(lvl_wh[d - 1].shape[0])
            np.add.at(up, lvl_par[d], a + desc)
            desc = up
    return est, math.sqrt(max(0.0, var))


def _ht(weights: np.ndarray, f: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """HT total over disjoint items (the sampled leaves) and its SE: the terms have zero covariance given
    the threshold (Duffield, Lund & Thorup 2007), so sum (w f)^2 (1 - q) estimates the variance unbiasedly."""
    a = weights * f
    return float(a.sum()), float(math.sqrt(max(0.0, float(np.sum(a * a * (1.0 - q))))))


def stochastic_beam_search(
    model,
    *,
    beam_size: int,
    max_new_tokens: int,
    seed=None,
    vocab_size: Optional[int] = None,
    eos_token_ids: Optional[Sequence[int]] = None,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    batch_size: Optional[int] = None,
    confidence: float = 0.95,
) -> BeamSearchEstimate:
    """Sample ``beam_size`` distinct leaves without replacement by stochastic beam search and estimate
    CE*_max. Model and policy arguments are those of :func:`canopy_rs.exact`. Cost (``.cost``): the backend's
    counters plus ``nodes_expanded`` and ``seconds``; model calls grow with depth, rows with
    ``beam_size x depth``."""
    beam_size = check_positive_int("beam_size", beam_size)
    crit = stats.critical_value(confidence)
    s = setup(model, vocab_size=vocab_size, eos_token_ids=eos_token_ids, max_new_tokens=max_new_tokens,
              temperature=temperature, top_k=top_k, top_p=top_p, batch_size=batch_size)
    backend, policy, max_new_tokens, batch_size = s.backend, s.policy, s.max_new_tokens, s.batch_size
    rng = make_rng(seed)
    eos_arr = np.asarray(sorted(set(s.eos_token_ids)), dtype=np.int64)
    t0 = time.perf_counter()
    backend.reset()

    # Unfinished beam (all at the same depth d): ids, log pi, G, sum of ancestors' h, paths [n, d].
    ids = np.array([0], dtype=np.int64)
    logpi = np.zeros(1)
    # The root's G must be a Gumbel(0) draw, not 0: the inclusion probabilities assume unconditional
    # Gumbels, and fixing the root conditions every leaf G on max = 0 (which biases the estimator).
    gval = np.array([rng.gumbel()])
    hsum = np.zeros(1)
    paths = np.zeros((1, 0), dtype=np.int64)
    support = expand_support(backend, policy, ids, np.array([-1]), np.array([-1]), np.array([0]),
                             lambda sl: [[] for _ in range(ids[sl].shape[0])], batch_size)
    rows_expanded = 1
    next_id = 1
    # Node-level terms: per beam level, w = pi / q (q at that level's threshold), the node's row in the
    # previous level's beam, and (once expanded) w * h.
    lvl_w: list[np.ndarray] = [np.ones(1)]
    lvl_q: list[np.ndarray] = [np.ones(1)]
    lvl_par: list[np.ndarray] = [np.full(1, -1, dtype=np.int64)]
    lvl_wh: list[np.ndarray] = []
    # Finished leaves kept in the beam.
    f_logpi = np.zeros(0)
    f_g = np.zeros(0)
    f_h = np.zeros(0)
    f_len = np.zeros(0, dtype=np.int64)
    f_tok: list[np.ndarray] = []
    kappa = -np.inf
    depth = 0
    while ids.shape[0] > 0:
        offsets, s_tok, s_lp, s_ent = support
        lvl_wh.append(lvl_w[-1] * s_ent)
        counts = np.diff(offsets)
        group = np.repeat(np.arange(ids.shape[0]), counts)
        c_logpi = logpi[group] + s_lp
        c_g = _gumbel_with_maximum(c_logpi, gval, group, ids.shape[0], rng)
        c_h = hsum[group] + s_ent[group]
        depth += 1
        c_leaf = np.isin(s_tok, eos_arr) | (depth >= max_new_tokens)
        # Candidates: the children, then the leaves already in the beam.
        all_g = np.concatenate([c_g, f_g])
        n_child = c_g.shape[0]
        if all_g.shape[0] > beam_size:
            keep = np.argpartition(-all_g, beam_size - 1)[:beam_size]
            pruned = np.ones(all_g.shape[0], dtype=bool)
            pruned[keep] = False
            kappa = max(kappa, float(all_g[pruned].max()))
            keep = np.sort(keep)
        else:
            keep = np.arange(all_g.shape[0])
        keep_child = keep[keep < n_child]
        keep_fin = keep[keep >= n_child] - n_child
        new_leaf = keep_child[c_leaf[keep_child]]
        new_int = keep_child[~c_leaf[keep_child]]
        # Leaves: old kept ones, then newly finished children.
        f_logpi = np.concatenate([f_logpi[keep_fin], c_logpi[new_leaf]])
        f_g = np.concatenate([f_g[keep_fin], c_g[new_leaf]])
        f_h = np.concatenate([f_h[keep_fin], c_h[new_leaf]])
        f_len = np.concatenate([f_len[keep_fin], np.full(new_leaf.shape[0], depth, dtype=np.int64)])
        f_tok = [f_tok[i] for i in keep_fin] + [
            np.append(paths[group[e]], s_tok[e]) for e in new_leaf
        ]
        # Internal children go on: expand them as the next beam.
        prev_ids = ids
        par_rows = group[new_int]
        ids = np.arange(next_id, next_id + new_int.shape[0], dtype=np.int64)
        next_id += new_int.shape[0]
        new_paths = np.concatenate([paths[par_rows], s_tok[new_int][:, None]], axis=1)
        logpi, gval, hsum, paths = c_logpi[new_int], c_g[new_int], c_h[new_int], new_paths
        if ids.shape[0]:
            q_lvl = _inclusion(logpi, kappa)
            lvl_w.append(np.exp(logpi) / q_lvl)
            lvl_q.append(q_lvl)
            lvl_par.append(par_rows.astype(np.int64))
            support = expand_support(backend, policy, ids, prev_ids[par_rows], s_tok[new_int],
                                     np.full(ids.shape[0], depth),
                                     lambda sl, p=new_paths: [row.tolist() for row in p[sl]], batch_size)
            rows_expanded += int(ids.shape[0])
        backend.release(prev_ids)

    q = _inclusion(f_logpi, kappa)
    weights = np.exp(f_logpi) / q
    est, se = _node_estimate(lvl_wh, lvl_q, lvl_par)
    s_est, s_se = _ht(weights, -f_logpi, q)
    exact = math.isinf(kappa)
    return BeamSearchEstimate(
        ce_star=est,
        ce_star_se=se,
        ce_star_ci=(est - crit * se, est + crit * se),
        ce_star_surprisal=s_est,
        ce_star_surprisal_se=s_se,
        ce_star_surprisal_ci=(s_est - crit * s_se, s_est + crit * s_se),
        beam_size=beam_size,
        num_leaves=int(f_logpi.shape[0]),
        threshold=float(kappa),
        is_exact=exact,
        confidence=float(confidence),
        leaf_log_reach=f_logpi,
        leaf_entropy_sums=f_h,
        leaf_lengths=f_len,
        leaf_inclusion=q,
        leaf_tokens=[t.tolist() for t in f_tok],
        cost=cost(backend, rows_expanded, t0),
    )
