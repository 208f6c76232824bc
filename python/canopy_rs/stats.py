"""Statistics helpers (numpy; no scipy at import time): weighted moments and rank correlations, Student-t
critical values, Fisher-z intervals. Shared by the results, the estimators, the semantic metrics and the plots.

Correlations follow the reference code (docs/definitions.md): Pearson, Spearman on mid-ranks, Kendall tau-b, all
NaN when undefined: fewer than two points, a constant variable, or a non-finite value (never clipped into
[-1, 1]). docs/pooling-parity.md lists where that differs from the reference.
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist

import numpy as np

from canopy_rs.errors import InvalidArgumentError

__all__ = [
    "rankdata",
    "pearson",
    "spearman",
    "kendall_tau_b",
    "mean_se",
    "critical_value",
    "student_t_ppf",
    "fisher_ci",
    "mean_ci",
    "collapsed_strata_var",
    "snap_ties",
    "unit_weights",
    "weighted_pearson",
    "weighted_spearman",
    "weighted_kendall_tau_b",
]


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based mid-ranks (ties get the average rank), as ``scipy.stats.rankdata(method="average")``."""
    x = np.asarray(x)
    n = x.shape[0]
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Boundaries of tie groups in the sorted order.
    new_group = np.empty(n, dtype=bool)
    if n:
        new_group[0] = True
        new_group[1:] = xs[1:] != xs[:-1]
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def _defined(x: np.ndarray, y: np.ndarray) -> bool:
    """At least two points and every value finite: otherwise a correlation is undefined."""
    return x.shape[0] >= 2 and bool(np.isfinite(x).all() and np.isfinite(y).all())


def _clip(r: float) -> float:
    """Rounding can push a correlation just past +-1; NaN stays NaN (``min(1, nan)`` would return 1)."""
    return r if math.isnan(r) else max(-1.0, min(1.0, r))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if not _defined(x, y):
        return math.nan
    dx = x - x.mean()
    dy = y - y.mean()
    sxx = float(dx @ dx)
    syy = float(dy @ dy)
    if not (sxx > 0.0 and syy > 0.0):
        return math.nan
    return _clip(float(dx @ dy) / math.sqrt(sxx * syy))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson on mid-ranks; NaN for constant data (the reference's torchmetrics gives 0 there)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if not _defined(x, y):
        return math.nan
    return pearson(rankdata(x), rankdata(y))


def _tie_pairs(x: np.ndarray) -> int:
    _, counts = np.unique(x, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall tau-b. Exact O(n^2) pair count in row blocks (n is rollouts per prompt, ~100); for very large
    n, scipy's O(n log n) routine is used when available."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.shape[0]
    if not _defined(x, y):
        return math.nan
    n0 = n * (n - 1) // 2
    denom = (n0 - _tie_pairs(x)) * (n0 - _tie_pairs(y))
    if denom <= 0:
        return math.nan
    if n > 8192:
        try:
            from scipy.stats import kendalltau

            return float(kendalltau(x, y, variant="b").statistic)
        except ImportError:  # pragma: no cover - scipy is optional
            pass
    s = 0
    block = max(1, (1 << 21) // n)
    for a in range(0, n, block):
        sx = np.sign(x[a : a + block, None] - x[None, :]).astype(np.int8)
        sy = np.sign(y[a : a + block, None] - y[None, :]).astype(np.int8)
        s += int(np.einsum("ij,ij->", sx, sy, dtype=np.int64))
    # Every unordered pair was counted twice (i<j and j<i have the same sign product).
    return (s // 2) / math.sqrt(denom)


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Sample mean and its standard error (ddof=1); SE is NaN with fewer than two values."""
    v = np.asarray(values, dtype=np.float64)
    m = v.shape[0]
    if m == 0:
        return math.nan, math.nan
    mean = float(v.mean())
    if m < 2:
        return mean, math.nan
    return mean, float(v.std(ddof=1) / math.sqrt(m))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def _student_t_sf(t: float, dof: float) -> float:
    """P(T > t) for t >= 0."""
    return 0.5 * _betainc(dof / 2.0, 0.5, dof / (dof + t * t))


@lru_cache(maxsize=4096)
def student_t_ppf(q: float, dof: float) -> float:
    """Quantile of Student's t for q in (0.5, 1) (bisection on the exact tail; ~1e-12 accurate). Written out
    so that intervals do not depend on whether scipy is installed."""
    if not 0.5 < q < 1.0:
        raise InvalidArgumentError(f"q must be in (0.5, 1), got {q}")
    tail = 1.0 - q
    lo, hi = 0.0, 1.0
    while _student_t_sf(hi, dof) > tail:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _student_t_sf(mid, dof) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def critical_value(confidence: float, dof: float | None = None) -> float:
    """Two-sided critical value: Student t with ``dof`` degrees of freedom (better small-sample coverage
    for a mean with an estimated SE), or the normal quantile when ``dof`` is None."""
    if not 0.0 < confidence < 1.0:
        raise InvalidArgumentError(f"confidence must be in (0, 1), got {confidence!r}")
    q = 0.5 + confidence / 2.0
    if dof is not None and math.isfinite(dof) and dof >= 1:
        return student_t_ppf(q, float(dof))
    return NormalDist().inv_cdf(q)


def mean_ci(mean: float, se: float, crit: float) -> tuple[float, float]:
    if not (math.isfinite(mean) and math.isfinite(se)):
        return math.nan, math.nan
    return mean - crit * se, mean + crit * se


def fisher_ci(r: float, n: int, confidence: float, var_factor: float = 1.0, dof_shift: int = 3):
    """Approximate CI for a correlation by the Fisher z transform: z = atanh(r) with standard error
    sqrt(var_factor / (n - dof_shift)). var_factor 1 (Pearson), 1.06 (Spearman) and 0.437 with shift 4
    (Kendall) are Fieller, Hartley & Pearson's (1957) approximations."""
    if not math.isfinite(r) or n - dof_shift <= 0:
        return math.nan, math.nan
    z = math.atanh(max(-0.999999, min(0.999999, r)))
    half = NormalDist().inv_cdf(0.5 + confidence / 2.0) * math.sqrt(var_factor / (n - dof_shift))
    return math.tanh(z - half), math.tanh(z + half)


def collapsed_strata_var(y: np.ndarray) -> float:
    """Variance of mean(y) for one draw per equal-weight stratum (strata in order), by collapsing adjacent
    strata into pairs (a trailing odd stratum joins the last pair):
    (1/n^2) sum_g n_g/(n_g - 1) sum_{h in g} (y_h - ybar_g)^2. Conservative: it also counts the
    between-strata differences inside each pair. NaN for fewer than two draws."""
    y = np.asarray(y, dtype=np.float64)
    n = y.shape[0]
    if n < 2:
        return math.nan
    even = n - (n % 2)
    pairs = y[:even].reshape(-1, 2)
    tot = float(((pairs[:, 0] - pairs[:, 1]) ** 2).sum())  # k/(k-1) sum (y - ybar)^2 for k = 2
    if n % 2:
        # Replace the last pair by the last triple.
        last = pairs[-1]
        tot -= float((last[0] - last[1]) ** 2)
        g = y[n - 3 :]
        tot += 1.5 * float(((g - g.mean()) ** 2).sum())
    return tot / (n * n)


# ------------------------------------------------------------------------------------------------
# Probability-weighted (population) correlations over an exact canopy's leaves (docs/definitions.md#semantic-metrics).
# With equal weights 1/n each equals its sample counterpart above on the same points.
# ------------------------------------------------------------------------------------------------

# A weighted variance this small relative to the squared mean is rounding noise of a constant.
_VAR_ZERO = 1e-24
# Population values (e.g. a leaf's rate, a sum of step entropies in path order) that are equal in exact
# arithmetic can differ in the last bits; the weighted rank correlations count values this close as ties.
TIE_RTOL = 1e-12


def snap_ties(v: np.ndarray, rtol: float = TIE_RTOL) -> np.ndarray:
    """``v`` with runs of sorted values whose consecutive gaps are <= rtol * max|v| set to the run's first
    value, so rounding noise does not break ties."""
    v = np.asarray(v, dtype=np.float64)
    if v.size < 2 or not np.isfinite(v).all():  # nothing to snap; a non-finite value stays for the caller
        return v.copy()
    order = np.argsort(v, kind="stable")
    sv = v[order]
    tol = rtol * float(np.max(np.abs(sv)))
    starts = np.concatenate([[True], np.diff(sv) > tol])
    out = np.empty_like(v)
    out[order] = sv[np.flatnonzero(starts)][np.cumsum(starts) - 1]
    return out


def unit_weights(w: np.ndarray, n: int) -> np.ndarray:
    """``w`` normalised to sum 1, after checking it holds n finite, non-negative, not all zero values."""
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (n,):
        raise InvalidArgumentError(f"weights must have shape ({n},) (one per point), got {w.shape}")
    tot = float(w.sum())
    if not (np.all(np.isfinite(w)) and np.all(w >= 0.0) and tot > 0.0):
        raise InvalidArgumentError("weights must be finite, >= 0 and not all zero")
    return w / tot


def weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Pearson correlation under the distribution w (normalised); NaN when a variable is constant."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w = unit_weights(w, x.shape[0])
    if not _defined(x, y):
        return math.nan
    dx = x - float(w @ x)
    dy = y - float(w @ y)
    vx, vy = float(w @ (dx * dx)), float(w @ (dy * dy))
    mx, my = float(w @ x), float(w @ y)
    if not (vx > _VAR_ZERO * max(1.0, mx * mx) and vy > _VAR_ZERO * max(1.0, my * my)):
        return math.nan
    return _clip(float(w @ (dx * dy)) / math.sqrt(vx * vy))


def _mid_cdf(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """F(x_i) = P(X < x_i) + P(X = x_i) / 2 under w: the population mid-rank."""
    values, inv = np.unique(x, return_inverse=True)
    mass = np.bincount(inv, weights=w, minlength=values.shape[0])
    below = np.cumsum(mass) - mass
    return (below + mass / 2.0)[inv]


def weighted_spearman(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Spearman under w: the weighted Pearson correlation of the mid-rank CDF transforms F_x(x), F_y(y).
    Values within :data:`TIE_RTOL` are ties (:func:`snap_ties`)."""
    x = snap_ties(x)
    y = snap_ties(y)
    w = unit_weights(w, x.shape[0])
    if not _defined(x, y):
        return math.nan
    return weighted_pearson(_mid_cdf(x, w), _mid_cdf(y, w), w)


def _tie_mass(keys: np.ndarray, w: np.ndarray) -> tuple[float, int]:
    """P(two independent draws share the key) = sum over key groups of (group weight)^2, and the number of
    groups with positive weight."""
    _, inv = np.unique(keys, return_inverse=True, axis=0 if keys.ndim > 1 else None)
    g = np.bincount(inv.ravel(), weights=w)
    return float(g @ g), int(np.count_nonzero(g > 0))


def _runs(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a sorted array: the start and (exclusive) end index of each entry's run of equal values."""
    n = k.shape[0]
    idx = np.arange(n)
    new = np.ones(n, dtype=bool)
    new[1:] = k[1:] != k[:-1]
    start = np.maximum.accumulate(np.where(new, idx, 0))
    last = np.ones(n, dtype=bool)
    last[:-1] = new[1:]
    end = np.minimum.accumulate(np.where(last, idx + 1, n)[::-1])[::-1]
    return start, end


def weighted_kendall_tau_b(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Kendall tau-b under w: (P(concordant) - P(discordant)) for two independent draws, divided by
    sqrt((1 - P(x tie)) (1 - P(y tie))). NaN when either variable is constant. Values within
    :data:`TIE_RTOL` are ties (:func:`snap_ties`).

    O(n log^2 n): the points are sorted by (x, y); the signed weight of later-vs-earlier pairs in y is summed
    by a bottom-up merge (each level pairs blocks of size s; every pair i < j is split at exactly one level),
    and the pairs tied in x, which that sum counts as concordant or tied, are subtracted in closed form."""
    x = snap_ties(x)
    y = snap_ties(y)
    n = x.shape[0]
    w = unit_weights(w, n)
    if not _defined(x, y):
        return math.nan
    (tx, gx), (ty, gy) = _tie_mass(x, w), _tie_mass(y, w)
    if gx < 2 or gy < 2:
        return math.nan
    denom = (1.0 - tx) * (1.0 - ty)
    order = np.lexsort((y, x))
    ry = np.unique(y, return_inverse=True)[1].ravel()[order].astype(np.int64)
    ws = w[order]
    pos = np.arange(n, dtype=np.int64)
    n_ranks = int(ry.max()) + 1
    # t = sum_{i<j} w_i w_j sign(y_j - y_i) over the (x, y)-sorted sequence.
    t = 0.0
    arr = pos  # arrangement: positions sorted by y within blocks of the current size (stable)
    s = 1
    while s < n:
        pair = arr // (2 * s)
        right = (arr // s) % 2 == 1
        key = pair * n_ranks + ry[arr]
        perm = np.argsort(key, kind="stable")
        arr, key, right = arr[perm], key[perm], right[perm]
        # c[i] = left weight among the first i entries; runs of equal (pair, y) and of equal pair give, for
        # each right entry j, the left weight in its pair with y < y_j, y <= y_j, and in total.
        c = np.concatenate([[0.0], np.cumsum(np.where(right, 0.0, ws[arr]))])
        g_lo, g_hi = _runs(key)
        p_lo, p_hi = _runs(key // n_ranks)
        less = c[g_lo] - c[p_lo]
        leq = c[g_hi] - c[p_lo]
        total = c[p_hi] - c[p_lo]
        rw = np.where(right, ws[arr], 0.0)
        t += float(rw @ (less - (total - leq)))
        s *= 2
    # Pairs i < j tied in x were counted with sign(y_j - y_i) = +1 unless also tied in y: remove them.
    tied_x = tx - _tie_mass(np.stack([x, y], axis=1), w)[0]  # ordered pairs tied in x, not in y
    s_total = 2.0 * t - tied_x
    return _clip(s_total / math.sqrt(denom))
