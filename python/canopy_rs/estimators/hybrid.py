"""Exact head + sampled tail ("sum and sample") estimator of CE*_max.

CE*_max = sum over internal nodes of pi(u) h(u) splits at the frontier F of a best-first expanded head:

    CE*_max = head_sum + sum_{u in F} pi(u) H(L_u | u) = head_sum + m_F E_{u ~ pi / m_F}[ H_u ],

where head_sum is the certified lower bound of the head (sum over expanded nodes of pi h), m_F the frontier
mass and H_u the summed step entropies of a rollout started at the frontier node u (h(u) included), whose
expectation is the entropy of u's subtree (the rollout form of docs/definitions.md, applied to the subtree). So

    CE_hat = head_sum + m_F * mean_i H_i,   u_i ~ pi(u) / m_F,

is unbiased. The head removes all variance from the high-probability part of the tree and the tail is
weighted by m_F, which best-first expansion drives down fastest.

Frontier nodes are drawn i.i.d. (``"multinomial"``) or two per stratum of the cumulative pi in tree order
(``"stratified"``, the default: n/2 equal strata). Stratified rollouts keep descending with their point while
their node's interval straddles a stratum boundary, so the strata reach below the frontier (each rollout is
still distributed as pi restricted to its stratum: unbiased). With two independent draws per stratum,
(1/n^2) sum_strata (H_a - H_b)^2 is an unbiased variance estimate (one draw per stratum only allows the
conservative collapsed-strata estimate).

With a token budget B (``budget=``) the head size is not a parameter: best-first expansion continues while
the predicted tail variance m_F W / (B - b) falls (W = sum over the frontier of pi (T - d), the tokens the
tail rollouts will cost per unit of rollouts; see :class:`_HeadStop`), at most to B/2, and the remaining
tokens buy rollouts. The split depends on the model only, never on random draws, so the estimate stays
unbiased.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from canopy_rs import stats
from canopy_rs.drivers.canopy import Budget, TreeRun
from canopy_rs.drivers.rollouts import Strata, run_rollouts, stratified_uniforms
from canopy_rs.drivers.setup import check_positive_int, cost, make_rng, setup
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.results import to_plain

__all__ = ["HybridEstimate", "estimate_hybrid"]


class _HeadStop:
    """Best-first head growth for a token budget B. With b nodes in the head, frontier mass m and
    W = sum over the frontier of pi(u) (T - d_u), n = (B - b) / (W / m) rollouts give a tail variance
    ~ m^2 sigma^2 / n = sigma^2 m W / (B - b). The head grows while J = m W / (B - b) falls (sigma^2 only
    shrinks as the frontier deepens, so this stops early rather than late) and stops at the first batch
    that raises it."""

    def __init__(self, budget: int, tree: Any, max_new_tokens: int) -> None:
        self.budget = budget
        self.tree = tree
        self.max_new_tokens = max_new_tokens
        self.best = math.inf

    def __call__(self) -> bool:
        b = self.tree.num_expanded
        if b == 0:
            return False
        if b >= self.budget:
            return True
        _, _, _, dep, logr = self.tree.frontier()
        w = np.exp(logr)
        j = float(w.sum()) * float(np.sum(w * (self.max_new_tokens - dep))) / (self.budget - b)
        if j > self.best:
            return True
        self.best = j
        return False


@dataclass(frozen=True)
class HybridEstimate:
    ce_star: float
    ce_star_se: float
    ce_star_ci: tuple[float, float]
    head_sum: float  # certified lower bound: sum over the expanded head of pi h
    ce_star_upper: float  # the head's certified upper bound
    frontier_mass: float
    frontier_size: int
    num_expanded: int
    num_rollouts: int
    tail_mean: float  # mean_i H_i
    is_exact: bool  # the whole canopy fit in the head: ce_star is exact, se = 0
    frontier_sampling: str
    confidence: float
    cost: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dict(self.__dict__))


def estimate_hybrid(
    model,
    *,
    budget: Optional[int] = None,
    budget_nodes: Optional[int] = None,
    num_rollouts: Optional[int] = None,
    max_new_tokens: int,
    seed=None,
    vocab_size: Optional[int] = None,
    eos_token_ids: Optional[Sequence[int]] = None,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    batch_size: Optional[int] = None,
    frontier_sampling: str = "stratified",
    confidence: float = 0.95,
    share_prefixes: bool = True,
    frontier_order: str = "tree",
) -> HybridEstimate:
    """Unbiased CE*_max estimate: the exact sum over a best-first head plus rollouts started at frontier
    nodes drawn in proportion to pi. Model and policy arguments are those of :func:`canopy_rs.exact`.

    Give either ``budget`` (model tokens, i.e. node expansions, for the whole estimate: the head grows while
    that lowers the predicted tail error, see the module docstring, and the rest buys rollouts) or both
    ``budget_nodes`` (head size) and ``num_rollouts``. If the whole canopy fits in the head the result is
    exact (``is_exact``, SE 0) and no rollout is run.

    ``frontier_order="depth"`` (stratified sampling only; experimental, not yet measured on SmolLM2) first
    splits the frontier by depth: each depth group gets pairs of draws in proportion to its mass (at least
    one pair), stratified in tree order inside the group, and the tail is the mass-weighted sum of the group
    means, with the paired-difference variance per group. On bushy canopies a rollout's summed entropy is
    mostly set by its start depth (about h per remaining step), which tree-ordered strata mix."""
    if budget is None:
        if budget_nodes is None or num_rollouts is None:
            raise InvalidArgumentError("estimate_hybrid needs budget= (model tokens) or both budget_nodes= and num_rollouts=")
    else:
        budget = check_positive_int("budget", budget)
    if budget_nodes is not None:
        budget_nodes = check_positive_int("budget_nodes", budget_nodes)
    if num_rollouts is not None:
        num_rollouts = check_positive_int("num_rollouts", num_rollouts)
    if frontier_order not in ("tree", "depth"):
        raise InvalidArgumentError(f"frontier_order must be 'tree' or 'depth', got {frontier_order!r}")
    if frontier_sampling not in ("stratified", "multinomial"):
        raise InvalidArgumentError(f"frontier_sampling must be 'stratified' or 'multinomial', got {frontier_sampling!r}")
    s = setup(model, vocab_size=vocab_size, eos_token_ids=eos_token_ids, max_new_tokens=max_new_tokens,
              temperature=temperature, top_k=top_k, top_p=top_p, batch_size=batch_size)
    rng = make_rng(seed)
    t0 = time.perf_counter()
    # The head: the same best-first expansion as canopy_rs.bounded. The backend is not reset afterwards, so
    # the frontier's parents are still cached when the tail rollouts start from them.
    head = TreeRun(s, order="best-first")
    tree = head.tree
    if budget is None:
        head.expand(Budget(nodes=budget_nodes))
    else:
        stop = _HeadStop(budget, tree, s.max_new_tokens)
        head.expand(Budget(nodes=budget_nodes if budget_nodes is not None else max(1, budget // 2)), stop=stop)
    b = tree.bounds()
    crit_n = stats.critical_value(confidence)
    if tree.is_done:
        ce = float(tree.result()["ce_star"])
        return HybridEstimate(ce, 0.0, (ce, ce), ce, ce, 0.0, 0, int(tree.num_expanded), 0, math.nan, True,
                              frontier_sampling, float(confidence), cost(s.backend, tree.num_expanded, t0))

    f_ids, f_par, f_tok, f_dep, f_logr = tree.frontier()
    head_sum = float(b["ce_star_lower"])
    m_f = float(b["frontier_mass"])
    if num_rollouts is None:
        # Tokens a rollout from the frontier costs at most: its expected remaining depth (no EOS, no sharing).
        per = float(np.sum(np.exp(f_logr) * (s.max_new_tokens - f_dep))) / max(m_f, 1e-300)
        num_rollouts = max(2, int((budget - tree.num_expanded) / max(per, 1.0)))
    # Tree order (lexicographic prefixes) puts siblings in neighbouring strata.
    prefixes = tree.prefixes(f_ids)
    by_depth = frontier_order == "depth" and frontier_sampling == "stratified"
    if by_depth:  # depth groups, tree order inside each: every group is one contiguous piece of the cdf
        order = sorted(range(len(prefixes)), key=lambda i: (int(f_dep[i]), prefixes[i]))
    else:
        order = sorted(range(len(prefixes)), key=prefixes.__getitem__)
    f_ids, f_par, f_tok, f_dep, f_logr = f_ids[order], f_par[order], f_tok[order], f_dep[order], f_logr[order]
    prefixes = [prefixes[i] for i in order]
    w = np.exp(f_logr - f_logr.max())
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    n = num_rollouts
    strata = None
    groups = None
    if by_depth:
        # Group j (one depth) spans [a_j, b_j) of the cdf and gets p_j >= 1 pairs, p_j ~ its mass x n/2;
        # pair k of group j shares the stratum [a_j + (b_j - a_j) k / p_j, a_j + (b_j - a_j) (k + 1) / p_j).
        last = np.flatnonzero(np.diff(f_dep) != 0)
        b_edges = np.append(cdf[last], 1.0)
        a_edges = np.concatenate([[0.0], b_edges[:-1]])
        mass = b_edges - a_edges
        pairs = np.maximum(1, np.rint(mass * max(1, n // 2))).astype(np.int64)
        u_l, lo_l, hi_l = [], [], []
        for a, b_, p in zip(a_edges, b_edges, pairs):
            k = np.arange(p)
            lo_k, hi_k = a + (b_ - a) * k / p, a + (b_ - a) * (k + 1) / p
            d1, d2 = stratified_uniforms(int(p), rng), stratified_uniforms(int(p), rng)
            u_l.append(np.column_stack([a + (b_ - a) * d1, a + (b_ - a) * d2]).ravel())
            lo_l.append(np.repeat(lo_k, 2))
            hi_l.append(np.repeat(hi_k, 2))
        u = np.minimum(np.concatenate(u_l), np.nextafter(np.concatenate(hi_l), -np.inf))
        n = int(u.shape[0])
        groups = (mass, np.repeat(np.arange(pairs.shape[0]), 2 * pairs), pairs)
    elif frontier_sampling == "stratified":
        # Two independent draws per stratum (n/2 strata): the within-stratum differences give an unbiased
        # variance estimate, so the interval is neither optimistic nor (as collapsed strata) conservative.
        n = max(2, n - n % 2)
        g = n // 2
        # Sorted, stratum j holds rows 2j and 2j + 1.
        u = np.sort(np.concatenate([stratified_uniforms(g, rng), stratified_uniforms(g, rng)]))
    else:
        u = rng.random(n)
    assignment = np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1).astype(np.int64)
    if by_depth:
        before = np.concatenate([[0.0], cdf[:-1]])
        strata = Strata(u=u, lo=np.concatenate(lo_l), hi=np.concatenate(hi_l),
                        node_lo=before[assignment].copy(), node_w=(cdf - before)[assignment].copy())
    elif frontier_sampling == "stratified":
        # Keep descending with u inside the frontier node's subtree while its interval straddles the
        # rollout's stratum: the strata then reach below the frontier.
        before = np.concatenate([[0.0], cdf[:-1]])
        strata = Strata(u=u, lo=np.repeat(np.arange(g) / g, 2), hi=np.repeat(np.arange(1, g + 1) / g, 2),
                        node_lo=before[assignment].copy(), node_w=(cdf - before)[assignment].copy())

    run = run_rollouts(
        s,
        start_ids=f_ids, start_parent_ids=f_par, start_tokens=f_tok, start_depths=f_dep,
        start_prefixes=prefixes, assignment=assignment, id_base=int(tree.num_nodes), rng=rng,
        share_prefixes=share_prefixes, strata=strata,
        # The head keeps every frontier parent alive; once the chosen starts are expanded none is needed.
        release_after_start=np.unique(f_par),
    )
    h = run.entropies.sum(axis=1)
    tail = float(h.mean())
    if groups is not None:
        mass, gid, pairs = groups
        means = np.bincount(gid, weights=h, minlength=pairs.shape[0]) / (2 * pairs)
        tail = float(np.sum(mass * means))
        sq = np.bincount(gid[0::2], weights=(h[0::2] - h[1::2]) ** 2, minlength=pairs.shape[0])
        var = float(np.sum(mass**2 * sq / (2 * pairs) ** 2))
        dof = int(pairs.sum())
    elif frontier_sampling == "stratified":
        var = float(np.sum((h[0::2] - h[1::2]) ** 2)) / (n * n)
        dof = n // 2
    else:
        var = float(h.var(ddof=1) / n) if n >= 2 else math.nan
        dof = n - 1
    se = m_f * math.sqrt(var) if math.isfinite(var) else math.nan
    ce = head_sum + m_f * tail
    crit = stats.critical_value(confidence, dof) if n >= 2 else crit_n
    return HybridEstimate(
        ce_star=ce,
        ce_star_se=se,
        ce_star_ci=stats.mean_ci(ce, se, crit),
        head_sum=head_sum,
        ce_star_upper=float(b["ce_star_upper"]),
        frontier_mass=m_f,
        frontier_size=int(f_ids.shape[0]),
        num_expanded=int(tree.num_expanded),
        num_rollouts=n,
        tail_mean=tail,
        is_exact=False,
        frontier_sampling=frontier_sampling,
        confidence=float(confidence),
        cost=cost(s.backend, tree.num_expanded + run.rows_expanded, t0),
    )
