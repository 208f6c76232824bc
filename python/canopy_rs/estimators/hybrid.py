"""Exact head + sampled tail ("sum and sample") estimator of CE*_max.

CE*_max = sum over internal nodes of pi(u) h(u) splits at the frontier F of a best-first expanded head:

    CE*_max = head_sum + sum_{u in F} pi(u) H(L_u | u) = head_sum + m_F E_{u ~ pi / m_F}[ H_u ],

where head_sum is the certified lower bound of the head (sum over expanded nodes of pi h), m_F the frontier
mass and H_u the summed step entropies of a rollout started at the frontier node u (h(u) included), whose
expectation is the entropy of u's subtree (the rollout form of docs/definitions.md, applied to the subtree).

**Frontier strata.** The frontier, in tree order (lexicographic prefixes; ``frontier_order="tree"``) or split
into depth groups with tree order inside each (``"depth"``), is one piece of the cumulative pi per group.
Group g (mass share M_g of m_F) gets p_g >= 1 pairs of draws; pair k shares the k-th of p_g equal strata of
the group's piece, and each rollout keeps descending with its point while its node's interval straddles the
stratum boundary (each rollout is distributed as pi restricted to its stratum). The tail is
T = sum_g M_g mean_g, unbiased, and (1/(2 p_g)^2) sum_k (H_a - H_b)^2 estimates Var(mean_g) unbiasedly.
(``frontier_sampling="multinomial"``: i.i.d. draws over the whole frontier, the sample variance.) On bushy
canopies a rollout's summed entropy is mostly set by its start depth (about h per remaining step), which
tree-ordered strata mix and depth groups separate.

**Spending a token budget.** With ``budget=B`` (measured model tokens, the prompt excluded) the head grows
while the predicted tail variance m_F W / (B - b) falls (W = sum over the frontier of pi (T - d); see
:class:`_HeadStop`), past B/2 only while the tokens left buy MIN_TAIL_ROLLOUTS rollouts, and at most to
0.9 B (on a small canopy, all of it: the estimate is then exact). The tail then runs in rounds until the
measured tokens reach B, each planned from what the earlier rounds measured: tokens per rollout per group,
and, since rollouts of one round forward a shared prefix once, the distinct rows n rollouts expand,
estimated from the earlier paths as E_path[sum over its nodes of min(n, 1/pi)]. The last round (designated
before it runs) gets what is left. A one-node head (stratified MC from the root) first runs a probe round of
one pair per group with weight 0, since the head then says nothing about what a deeper row costs on the
backend. With ``allocation="neyman"``
the first weighted round is a pilot with pairs in proportion to the group masses and every later round
allocates n_g ~ M_g S_g / sqrt(c_g) (S_g the earlier rounds' within-pair SD of H in group g, c_g the measured
tokens per rollout: the cost-optimal Neyman allocation), at least one pair per group. With tokens for fewer
than FEW_ROLLOUTS rollouts there is no pilot, and one proportional round where the head's rows cost about one
token (a KV cache): splitting a handful of pairs over rounds would cost more stratification than a second
round's cost plan gains. :class:`_RoundPlanner` plans the rounds and :class:`_TailSampler` runs them.

**Unbiased and an honest SE.** Round r is an unbiased estimate T_r of the tail whatever its allocation (the
allocation depends only on earlier rounds), and E[T_r | earlier rounds] is the same constant, so the rounds
are uncorrelated. They are combined with weights fixed before each round runs: lambda_r = rho_r w_r, w_r the
round's planned rollouts over those plus the rollouts the tokens after it would buy (1 for the last), rho_r
the weight the earlier rounds left. Then T = sum_r lambda_r T_r is unbiased (the weights sum to 1 whatever
happens), Var T = sum_r lambda_r^2 Var T_r, and its estimate sums the rounds' paired-difference estimates;
the interval is Student-t with Welch-Satterthwaite degrees of freedom. No weight, allocation or stopping
decision looks at a round's own draws.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from canopy_rs import stats
from canopy_rs.drivers.canopy import Budget, TreeRun
from canopy_rs.drivers.rollouts import Strata, run_rollouts, stratified_uniforms
from canopy_rs.drivers.setup import check_positive_int, cost, counters, make_rng, model_tokens, setup
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.results import to_plain

__all__ = ["HybridEstimate", "estimate_hybrid", "estimate_stratified", "RECOMMENDED"]


# What compare's and estimate_best's "hybrid" run (benches/bench_estimators.py measures it; see
# docs/estimators.md for the measurements behind the choice).
RECOMMENDED: dict[str, str] = {"frontier_order": "depth", "allocation": "neyman"}
# The head grows on the predicted tail error alone up to HEAD_FREE_SHARE of the budget, past it only while
# the tokens left buy MIN_TAIL_ROLLOUTS rollouts (an SE needs pairs behind it), and never past HEAD_SHARE.
# The tail's rounds: the first weighted one plans this share of the tokens left (a pilot under Neyman
# allocation), later ones NEXT_SHARE of what is left, and the last (at most MAX_ROUNDS, not counting a probe)
# all of it. PRIOR_ROLLOUTS shrinks the measured steps per rollout towards the no-EOS depth; a round grows
# for prefix sharing to at most SHARING_GROWTH x the rollouts behind its prediction, and only with at least
# MIN_OBSERVED of them.
HEAD_FREE_SHARE = 0.5
MIN_TAIL_ROLLOUTS = 12
HEAD_SHARE = 0.9
PILOT_SHARE = 0.3
FIRST_SHARE = 0.5
NEXT_SHARE = 0.7
MAX_ROUNDS = 3
LAST_AIM = 0.95
PRIOR_ROLLOUTS = 4.0
WEIGHT_POWER = 1.0
SHARING_GROWTH = 4.0
MIN_OBSERVED = 16
FEW_ROLLOUTS = 24  # below this many rollouts' worth of tokens: proportional, one round (two without a KV cache)


class _HeadStop:
    """Best-first head growth for a token budget B. With b measured tokens spent on the head, frontier mass
    m and W = sum over the frontier of pi(u) (T - d_u), n ~ (B - b) / (W / m) rollouts give a tail variance
    ~ m^2 sigma^2 / n = sigma^2 m W / (B - b) (up to the backend's tokens per row, which the rollouts pay
    too). The head grows while J = m W / (B - b) falls (sigma^2 only shrinks as the frontier deepens, so
    this stops early rather than late) and stops at the first batch that raises it. Past HEAD_FREE_SHARE B
    it also stops once B - b would buy fewer than MIN_TAIL_ROLLOUTS rollouts at the head's measured tokens
    per row."""

    def __init__(self, budget: int, tree: Any, max_new_tokens: int, spent: Any) -> None:
        self.budget = budget
        self.tree = tree
        self.max_new_tokens = max_new_tokens
        self.spent = spent  # measured tokens so far: a backend may pay a whole prefix per row
        self.best = math.inf

    def __call__(self) -> bool:
        if self.tree.num_expanded == 0:
            return False
        b = self.spent()
        if b >= self.budget:
            return True
        _, _, _, dep, logr = self.tree.frontier()
        w = np.exp(logr)
        m, rem = float(w.sum()), float(np.sum(w * (self.max_new_tokens - dep)))
        if (b >= HEAD_FREE_SHARE * self.budget and m > 0
                and self.budget - b < MIN_TAIL_ROLLOUTS * _tokens_per_row(b, self.tree.num_expanded) * rem / m):
            return True
        j = m * rem / (self.budget - b)
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
    tail_mean: float  # the tail estimate T (weighted over rounds; the plain mean_i H_i for one round)
    is_exact: bool  # the whole canopy fit in the head: ce_star is exact, se = 0
    frontier_sampling: str
    confidence: float
    cost: dict = field(default_factory=dict)
    frontier_order: str = "tree"
    allocation: str = "proportional"
    num_rounds: int = 0
    num_groups: int = 0  # frontier strata (depth groups, or 1)
    dof: float = math.nan  # Welch-Satterthwaite degrees of freedom of the SE

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dict(self.__dict__))


class _Frontier:
    """The frontier in sampling order (tree order, or depth then tree order), its cumulative pi and its
    groups: contiguous pieces [a_g, b_g) of the cdf with mass share M_g and a naive cost per rollout
    (the expected remaining depth T - d, no EOS, no sharing)."""

    def __init__(self, tree: Any, max_new_tokens: int, by_depth: bool) -> None:
        f_ids, f_par, f_tok, f_dep, f_logr = tree.frontier()
        prefixes = tree.prefixes(f_ids)
        if by_depth:
            order = sorted(range(len(prefixes)), key=lambda i: (int(f_dep[i]), prefixes[i]))
        else:  # tree order (lexicographic prefixes) puts siblings in neighbouring strata
            order = sorted(range(len(prefixes)), key=prefixes.__getitem__)
        self.par, self.tok, self.dep = f_par[order], f_tok[order], f_dep[order]
        self.prefixes = [prefixes[i] for i in order]
        self.size = len(order)
        w = np.exp(f_logr[order] - f_logr.max())
        cdf = np.cumsum(w)
        cdf /= cdf[-1]
        self.cdf = cdf
        self.before = np.concatenate([[0.0], cdf[:-1]])
        self.width = cdf - self.before
        rem = (max_new_tokens - self.dep).astype(np.float64)
        last = np.flatnonzero(np.diff(self.dep) != 0) if by_depth else np.zeros(0, dtype=np.int64)
        self.ends = np.append(last, self.size - 1)  # last frontier index of each group
        self._rem = rem

    def merge_to(self, max_groups: int) -> None:
        """Merge neighbouring groups (the pair of least joint mass first) until at most ``max_groups``."""
        while self.ends.shape[0] > max(1, max_groups):
            m = self.mass
            j = int(np.argmin(m[:-1] + m[1:]))
            self.ends = np.delete(self.ends, j)

    @property
    def b_edges(self) -> np.ndarray:
        return self.cdf[self.ends]

    @property
    def a_edges(self) -> np.ndarray:
        b = self.b_edges
        return np.concatenate([[0.0], b[:-1]])

    @property
    def mass(self) -> np.ndarray:
        return self.b_edges - self.a_edges

    @property
    def num_groups(self) -> int:
        return int(self.ends.shape[0])

    def naive_cost(self) -> np.ndarray:
        gid = np.searchsorted(self.ends, np.arange(self.size))
        num = np.bincount(gid, weights=self.width * self._rem, minlength=self.num_groups)
        return np.maximum(num / np.maximum(self.mass, 1e-300), 1.0)


def _pairs_for(tokens: float, mass: np.ndarray, cost_g: np.ndarray, sd: Optional[np.ndarray]) -> np.ndarray:
    """Pairs per group for a round planned at ``tokens``: n_g ~ M_g (proportional) or M_g S_g / sqrt(c_g)
    (Neyman), scaled so that sum n_g c_g = tokens; at least one pair per group."""
    a = mass.copy()
    if sd is not None and np.any(sd > 0):
        a = mass * np.maximum(sd, 0.05 * float(sd.max())) / np.sqrt(cost_g)
    denom = float(np.sum(a * cost_g))
    n_g = tokens * a / denom if denom > 0 else np.zeros_like(a)
    return np.maximum(1, np.rint(n_g / 2.0)).astype(np.int64)


def _spent(s: Any) -> float:
    return model_tokens(counters(s.backend))


def _tokens_per_row(tokens: float, rows: int) -> float:
    """Measured tokens per head row: what a row costs on this backend (at most 1 with a KV cache)."""
    return max(tokens / max(rows, 1), 1.0)


def _pair_sq(h: np.ndarray, gid: np.ndarray, num_groups: int) -> np.ndarray:
    """Per group, the sum of squared differences within a round's pairs (draws 2k and 2k + 1)."""
    return np.bincount(gid[0::2], weights=(h[0::2] - h[1::2]) ** 2, minlength=num_groups)


def _one_token_rows(tokens: float, rows: int, deepest: int) -> bool:
    """Whether a head of ``rows`` rows, the deepest at depth ``deepest``, that cost ``tokens`` shows a backend
    paying one token per row (at most ``rows``) rather than its prefix (the depths' sum: at least rows + 2
    once a row at depth 3 is in, at least ``rows`` with one at depth 2)."""
    return tokens <= rows and (deepest >= 3 or (deepest == 2 and tokens < rows))


@dataclass
class _RoundDraws:
    """What one round measured: H per rollout, its group, its steps, the tokens the round spent, and per
    rollout and step 1 / (the node's chance of being drawn by one rollout of its group)."""

    h: np.ndarray
    gid: np.ndarray
    steps: np.ndarray
    tokens: float
    inv: np.ndarray


class _TailSampler:
    """Runs the tail's rounds from the head's frontier: stratified pairs per group, or i.i.d. draws."""

    def __init__(self, s: Any, fr: _Frontier, rng: Any, stratified: bool, share_prefixes: bool,
                 next_id: int) -> None:
        self.s, self.fr, self.rng = s, fr, rng
        self.stratified, self.share_prefixes = stratified, share_prefixes
        self.next_id = next_id
        self.rows_total = 0
        self.frontier_parents = np.unique(fr.par)

    def run(self, pairs: Optional[np.ndarray], n: int, last: bool) -> _RoundDraws:
        """One round: ``pairs`` per group (stratified) or ``n`` i.i.d. draws."""
        s, fr, rng = self.s, self.fr, self.rng
        spent0 = _spent(s)
        if self.stratified:
            a_e, b_e = fr.a_edges, fr.b_edges
            u_l, lo_l, hi_l = [], [], []
            for a, b_, p in zip(a_e, b_e, pairs):
                k = np.arange(p)
                d1, d2 = stratified_uniforms(int(p), rng), stratified_uniforms(int(p), rng)
                u_l.append(np.column_stack([a + (b_ - a) * d1, a + (b_ - a) * d2]).ravel())
                lo_l.append(np.repeat(a + (b_ - a) * k / p, 2))
                hi_l.append(np.repeat(a + (b_ - a) * (k + 1) / p, 2))
            hi = np.concatenate(hi_l)
            u = np.minimum(np.concatenate(u_l), np.nextafter(hi, -np.inf))
            gid = np.repeat(np.arange(pairs.shape[0]), 2 * pairs)
        else:
            u = rng.random(n)
            gid = np.zeros(n, dtype=np.int64)
        assignment = np.minimum(np.searchsorted(fr.cdf, u, side="right"), fr.size - 1).astype(np.int64)
        strata = None
        if self.stratified:
            # Keep descending with u inside the frontier node's subtree while its interval straddles the
            # rollout's stratum: the strata then reach below the frontier.
            strata = Strata(u=u, lo=np.concatenate(lo_l), hi=hi, node_lo=fr.before[assignment].copy(),
                            node_w=fr.width[assignment].copy())
        # Fresh ids per round (a backend sees every id once); the head's frontier parents stay cached until
        # the last round has started from them.
        start_ids = np.arange(self.next_id, self.next_id + fr.size, dtype=np.int64)
        run = run_rollouts(
            s,
            start_ids=start_ids, start_parent_ids=fr.par, start_tokens=fr.tok, start_depths=fr.dep,
            start_prefixes=fr.prefixes, assignment=assignment, id_base=self.next_id + fr.size, rng=rng,
            share_prefixes=self.share_prefixes, strata=strata,
            release_after_start=self.frontier_parents if last else None,
        )
        self.next_id += fr.size + int(run.rows_expanded)
        self.rows_total += int(run.rows_expanded)
        # 1 / (each expanded node's chance of being drawn by one rollout of its group): a round of n stratified
        # rollouts expands about sum over nodes of min(1, n pi) = E_path[sum over its nodes of min(n, 1/pi)]
        # distinct rows, which plans the next round's size with its prefix sharing.
        steps = run.steps.astype(np.int64)
        width = run.logq.shape[1]
        mask = np.arange(width)[None, :] < steps[:, None]
        lq = np.where(mask, run.logq, 0.0)
        before = np.concatenate([np.zeros((lq.shape[0], 1)), np.cumsum(lq, axis=1)[:, :-1]], axis=1)
        log_rel = np.log(fr.width[assignment] / fr.mass[gid])[:, None] + before
        inv = np.zeros((lq.shape[0], s.max_new_tokens + 1))  # one width for every round
        inv[:, :width] = np.where(mask, np.exp(np.minimum(-log_rel, 40.0)), 0.0)
        return _RoundDraws(run.entropies.sum(axis=1), gid, steps.astype(np.float64), _spent(s) - spent0, inv)

    def estimate(self, d: _RoundDraws, pairs: Optional[np.ndarray]) -> tuple[float, list[tuple[float, int]]]:
        """(T_r, variance components [(v, dof)]) of one round."""
        h, gid = d.h, d.gid
        if not self.stratified:
            n = h.shape[0]
            return float(h.mean()), [(float(h.var(ddof=1)) / n if n >= 2 else math.nan, n - 1)]
        mass = self.fr.mass
        means = np.bincount(gid, weights=h, minlength=pairs.shape[0]) / (2 * pairs)
        sq = _pair_sq(h, gid, pairs.shape[0])
        comps = [(float(mass[g] ** 2 * sq[g] / (2 * pairs[g]) ** 2), int(pairs[g])) for g in range(pairs.shape[0])]
        return float(np.sum(mass * means)), comps


@dataclass
class _RoundPlan:
    pairs: Optional[np.ndarray]  # per group (stratified)
    n: int  # i.i.d. draws (multinomial)
    last: bool
    weight: float  # lambda_r, the round's weight in the tail


class _RoundPlanner:
    """Plans the tail's rounds for a token budget from what the earlier rounds measured (see the module
    docstring), and merges the frontier's groups to what the pilot can support."""

    def __init__(self, budget: int, s: Any, fr: _Frontier, num_expanded: int, stratified: bool,
                 neyman: bool) -> None:
        self.budget, self.s, self.fr, self.stratified = budget, s, fr, stratified
        head_tokens = _spent(s)
        self.kappa = kappa = _tokens_per_row(head_tokens, num_expanded)
        naive = kappa * fr.naive_cost()
        r0 = budget - head_tokens
        # Few rollouts in all: no pilot (it would leave too little for the rounds it plans), and one round
        # where the head shows that a row costs one token (a KV cache), since splitting few pairs over rounds
        # loses stratification (each round's pairs share the strata). Where a row may cost its prefix the
        # head's shallow rows under-predict a rollout's, and a second round corrects the first's cost plan.
        self.few = few = r0 / float(np.sum(fr.mass * naive) if stratified else naive[0]) < FEW_ROLLOUTS
        self.few_rounds = 1 if _one_token_rows(head_tokens, num_expanded, int(fr.dep.max()) - 1) else 2
        self.first_share = first_share = PILOT_SHARE if neyman or few else FIRST_SHARE
        self.neyman = neyman and not few
        if stratified:
            # At most one group per two pilot pairs: each group's pilot variance has some pairs behind it.
            all_pairs = r0 / float(np.sum(fr.mass * naive)) / 2.0
            pilot_pairs = max(1.0, all_pairs * first_share)
            if few:  # no pilot; a group per two pairs (one per group and round where there are two)
                fr.merge_to(int(all_pairs // 2))
            else:
                fr.merge_to(int(pilot_pairs // 2) if self.neyman else int(pilot_pairs))
            naive = kappa * fr.naive_cost()
        self.naive = naive
        self.g_n = g_n = fr.num_groups
        self.sq_sum = np.zeros(g_n)
        self.pair_cnt = np.zeros(g_n)
        self.steps_sum = np.zeros(g_n)
        self.roll_cnt = np.zeros(g_n)
        self.phi = 1.0
        self.tok_sum = self.pred_sum = 0.0
        self.cal = kappa  # measured tokens per predicted row (the backend's cost per row, and the model's error)
        self.inv_g: list[list[np.ndarray]] = [[] for _ in range(g_n)]
        self.rho = 1.0
        # A one-row head (stratified MC from the root) says nothing about what a deeper row costs on this
        # backend (a whole prefix without a KV cache): a probe round of one pair per group, weighted by its
        # small planned share, measures it before the rounds that carry the weight.
        self.probe = num_expanded <= 1
        self.rounds = 0

    def round_tokens(self, pairs: Optional[np.ndarray], n: int) -> float:
        """Predicted tokens of a round: distinct rows from the earlier rounds' paths (see _TailSampler.run) x
        measured tokens per predicted row; the no-EOS depth for a group not yet drawn."""
        tot = 0.0
        for g in range(self.g_n):
            k = float(2 * pairs[g]) if self.stratified else float(n)
            if self.inv_g[g]:
                tot += self.cal * float(np.concatenate(self.inv_g[g]).clip(max=k).sum(axis=1).mean())
            else:
                tot += k * float(self.naive[g])
        return tot

    def _grow_for_sharing(self, pairs: np.ndarray, tokens: float) -> np.ndarray:
        """Rollouts in one round share prefixes: more of them fit than the per-rollout cost says. Scale the
        plan up while the predicted tokens fit, each group to at most SHARING_GROWTH x the rollouts the
        prediction rests on (it extrapolates poorly), and only with MIN_OBSERVED of them (too noisy below)."""
        roll_cnt = self.roll_cnt
        grow = np.where(roll_cnt >= MIN_OBSERVED, SHARING_GROWTH * roll_cnt / 2.0, 0.0)
        cap = np.maximum(pairs, np.floor(grow)).astype(np.int64)
        lo_t, hi_t = 1.0, SHARING_GROWTH * max(1.0, float(roll_cnt.sum()))

        def plan(t: float) -> np.ndarray:
            return np.minimum(np.maximum(1, np.rint(pairs * t)), cap).astype(np.int64)

        if self.round_tokens(plan(hi_t), 0) <= tokens:
            lo_t = hi_t
        else:
            for _ in range(30):
                mid = math.sqrt(lo_t * hi_t)
                lo_t, hi_t = (mid, hi_t) if self.round_tokens(plan(mid), 0) <= tokens else (lo_t, mid)
        return plan(lo_t)

    def next_round(self) -> _RoundPlan:
        self.rounds += 1
        rounds, probe, stratified = self.rounds, self.probe, self.stratified
        left = self.budget - _spent(self.s)
        # Measured tokens per rollout; the mean steps shrunk towards the no-EOS depth by PRIOR_ROLLOUTS
        # pseudo-rollouts, so that a few early EOS in a small round do not plan an overspending one.
        steps_g = (self.steps_sum + PRIOR_ROLLOUTS * self.naive / self.kappa) / (self.roll_cnt + PRIOR_ROLLOUTS)
        cost_g = self.naive if rounds == 1 else np.maximum(self.phi * steps_g, 1.0)
        if rounds == 1 and probe:
            share = min(0.5, 2.0 * float(np.sum(self.naive) if stratified else self.naive[0]) / max(left, 1.0))
        else:
            share = self.first_share if rounds == 1 + probe else NEXT_SHARE
        min_round = 2.0 * float(np.sum(cost_g) if stratified else cost_g[0])
        last = rounds >= MAX_ROUNDS + probe or left * (1.0 - share) < min_round
        if self.few and rounds >= self.few_rounds + probe:
            last = True
        if last:
            share = 1.0
        # The last round aims a little short: fewer rollouts than the round before share fewer prefixes,
        # so its measured cost per rollout runs slightly over the plan.
        tokens = max(left * (LAST_AIM if last else share), 0.0)
        pairs = None
        n = 0
        if stratified:
            sd = (np.sqrt(self.sq_sum / np.maximum(2.0 * self.pair_cnt, 1.0))
                  if (self.neyman and rounds > 1 + probe) else None)
            if rounds == 1 and probe and not last:
                pairs = np.ones(self.g_n, dtype=np.int64)
            else:
                pairs = _pairs_for(tokens, self.fr.mass, cost_g, sd)
                if rounds > 1:
                    pairs = self._grow_for_sharing(pairs, tokens)
        else:
            n = max(2, int(tokens / float(cost_g[0])))
            if rounds > 1:
                while (self.roll_cnt[0] >= MIN_OBSERVED and n < SHARING_GROWTH * self.roll_cnt[0]
                       and self.round_tokens(None, int(n * 1.1) + 1) <= tokens):
                    n = int(n * 1.1) + 1
        if last:
            w = 1.0
        elif rounds == 1 and probe:
            w = 0.0  # a cost probe: its one pair per group would weigh more than it knows
        else:
            # The round's share of the weight left: its planned rollouts against those the tokens after it
            # buy at the same rate, each to the power WEIGHT_POWER (> 1: stratified rounds gain more than
            # linearly from size, so the big early rounds should outweigh the small last ones).
            n_this = float(2 * pairs.sum()) if stratified else float(n)
            per = float(np.sum(2 * pairs * cost_g)) / n_this if stratified else float(cost_g[0])
            n_rest = max(left - n_this * per, 0.0) / per
            w = n_this**WEIGHT_POWER / (n_this**WEIGHT_POWER + n_rest**WEIGHT_POWER)
        lam = self.rho * w
        self.rho *= 1.0 - w
        return _RoundPlan(pairs, n, last, lam)

    def record(self, d: _RoundDraws, plan: _RoundPlan) -> None:
        """What the round measured, for the next one's plan."""
        g_n, gid, h = self.g_n, d.gid, d.h
        if self.stratified:
            self.sq_sum += _pair_sq(h, gid, g_n)
            self.pair_cnt += np.bincount(gid[0::2], minlength=g_n)
        self.steps_sum += np.bincount(gid, weights=d.steps, minlength=g_n)
        self.roll_cnt += np.bincount(gid, minlength=g_n)
        # Measured tokens per rollout step (prefix sharing and what the backend pays per row) and per row.
        # Both over every round so far: one small round's luck (short, shared rollouts) must not plan a
        # large overspending one.
        self.tok_sum += d.tokens
        self.phi = self.tok_sum / max(float(self.steps_sum.sum()), 1.0)
        for g in range(g_n):
            self.inv_g[g].append(d.inv[gid == g])
        self.cal = 1.0
        self.pred_sum += self.round_tokens(plan.pairs if self.stratified else None, int(h.shape[0]))
        self.cal = self.tok_sum / max(self.pred_sum, 1.0)


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
    allocation: str = "proportional",
) -> HybridEstimate:
    """Unbiased CE*_max estimate: the exact sum over a best-first head plus rollouts started at frontier
    nodes drawn in proportion to pi. Model and policy arguments are those of :func:`canopy_rs.exact`.

    Give either ``budget`` (measured model tokens, the prompt excluded, for the whole estimate: the head
    grows while that lowers the predicted tail error and the tail's rounds spend the rest, see the module
    docstring; ``budget_nodes`` then caps the head) or both ``budget_nodes`` (head size) and
    ``num_rollouts`` (one round of that many rollouts). If the whole canopy fits in the head the result is
    exact (``is_exact``, SE 0) and no rollout is run.

    ``frontier_order="depth"`` (stratified sampling only) splits the frontier into depth groups (merged
    with their neighbours while there are more groups than pilot pairs). ``allocation="neyman"`` spends the
    rounds after a pilot where its within-pair variances say, per token (with a budget only; a single
    round is proportional). :data:`RECOMMENDED` holds the configuration the benchmark recommends, which is
    what ``compare``'s and ``estimate_best``'s ``"hybrid"`` run; the defaults here are the original
    estimator's."""
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
    if allocation not in ("proportional", "neyman"):
        raise InvalidArgumentError(f"allocation must be 'proportional' or 'neyman', got {allocation!r}")
    s = setup(model, vocab_size=vocab_size, eos_token_ids=eos_token_ids, max_new_tokens=max_new_tokens,
              temperature=temperature, top_k=top_k, top_p=top_p, batch_size=batch_size)
    rng = make_rng(seed)
    t0 = time.perf_counter()
    # The head: the same best-first expansion as canopy_rs.bounded. The backend is not reset afterwards, so
    # the frontier's parents are still cached when the tail rollouts start from them.
    hs = s
    if budget is not None:
        # Batches small enough that the head overshoots its token cap by little even when a row costs its
        # whole prefix (a backend without a KV cache).
        hs = dataclasses.replace(s, batch_size=max(1, min(s.batch_size, budget // (16 * s.max_new_tokens))))
    head = TreeRun(hs, order="best-first")
    tree = head.tree
    if budget is None:
        head.expand(Budget(nodes=budget_nodes))
    else:
        stop = _HeadStop(budget, tree, s.max_new_tokens, lambda: _spent(s))
        head.expand(Budget(nodes=budget_nodes, tokens=max(1, int(budget * HEAD_SHARE))), stop=stop)
    b = tree.bounds()
    stratified = frontier_sampling == "stratified"
    if tree.is_done:
        ce = float(tree.result()["ce_star"])
        return HybridEstimate(ce, 0.0, (ce, ce), ce, ce, 0.0, 0, int(tree.num_expanded), 0, math.nan, True,
                              frontier_sampling, float(confidence), cost(s.backend, tree.num_expanded, t0),
                              frontier_order, allocation, 0, 0, math.nan)

    head_sum = float(b["ce_star_lower"])
    m_f = float(b["frontier_mass"])
    fr = _Frontier(tree, s.max_new_tokens, by_depth=frontier_order == "depth" and stratified)
    sampler = _TailSampler(s, fr, rng, stratified, share_prefixes, next_id=int(tree.num_nodes))
    tail = 0.0
    comps_all: list[tuple[float, int]] = []
    total_n = 0
    if num_rollouts is not None:  # one round of the given size
        n = num_rollouts
        pairs = None
        if stratified:
            fr.merge_to(max(1, n // 2))
            if fr.num_groups == 1:
                pairs = np.array([max(1, n // 2)], dtype=np.int64)
            else:
                pairs = np.maximum(1, np.rint(fr.mass * max(1, n // 2))).astype(np.int64)
        else:
            n = max(2, n)
        draws = sampler.run(pairs, n, last=True)
        tail, comps_all = sampler.estimate(draws, pairs)
        total_n, rounds = int(draws.h.shape[0]), 1
    else:
        assert budget is not None
        planner = _RoundPlanner(budget, s, fr, int(tree.num_expanded), stratified,
                                neyman=allocation == "neyman" and stratified)
        while True:
            plan = planner.next_round()
            draws = sampler.run(plan.pairs, plan.n, plan.last)
            t_r, comps = sampler.estimate(draws, plan.pairs)
            tail += plan.weight * t_r
            comps_all += [(plan.weight * plan.weight * v, dof) for v, dof in comps]
            total_n += int(draws.h.shape[0])
            planner.record(draws, plan)
            if plan.last:
                break
        rounds = planner.rounds
    var = float(sum(v for v, _ in comps_all))
    if not math.isfinite(var):
        se, dof = math.nan, math.nan
    else:
        se = m_f * math.sqrt(var)
        den = sum(v * v / d for v, d in comps_all if d >= 1)
        dof = var * var / den if den > 0 else math.nan
    ce = head_sum + m_f * tail
    crit = stats.critical_value(confidence, dof if math.isfinite(dof) else None)
    return HybridEstimate(
        ce_star=ce,
        ce_star_se=se,
        ce_star_ci=stats.mean_ci(ce, se, crit),
        head_sum=head_sum,
        ce_star_upper=float(b["ce_star_upper"]),
        frontier_mass=m_f,
        frontier_size=int(fr.size),
        num_expanded=int(tree.num_expanded),
        num_rollouts=total_n,
        tail_mean=tail,
        is_exact=False,
        frontier_sampling=frontier_sampling,
        confidence=float(confidence),
        cost=cost(s.backend, tree.num_expanded + sampler.rows_total, t0),
        frontier_order=frontier_order,
        allocation=allocation,
        num_rounds=rounds,
        num_groups=int(fr.num_groups),
        dof=float(dof),
    )


def estimate_stratified(
    model,
    *,
    budget: int,
    max_new_tokens: int,
    seed=None,
    vocab_size: Optional[int] = None,
    eos_token_ids: Optional[Sequence[int]] = None,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    batch_size: Optional[int] = None,
    confidence: float = 0.95,
) -> HybridEstimate:
    """Stratified Monte Carlo that spends ``budget`` measured model tokens: rollouts from the root, two per
    stratum of the leaf distribution (children in support order), shared prefixes forwarded once, drawn in
    rounds until the budget is used (each round planned from the tokens the earlier ones measured). It is
    :func:`estimate_hybrid` with a one-node head (the root, whose entropy every rollout adds anyway) and
    proportional allocation: unbiased, with the paired-difference SE (not the conservative collapsed-strata
    one of :func:`canopy_rs.estimate` on ``sample(stratified=True)``)."""
    return estimate_hybrid(model, budget=budget, budget_nodes=1, max_new_tokens=max_new_tokens, seed=seed,
                           vocab_size=vocab_size, eos_token_ids=eos_token_ids, temperature=temperature,
                           top_k=top_k, top_p=top_p, batch_size=batch_size, confidence=confidence,
                           frontier_order="tree", allocation="proportional")
