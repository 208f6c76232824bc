"""Figures of one canopy: its length distribution, entropy by step, the (N, r_N) joint distribution of its
rollouts, and the certified bracket against the budget.

* :func:`plot_length_distribution`: P(N = n) split into the EOS mass at each depth and the truncated mass;
* :func:`plot_entropy_by_depth`: each step's contribution sum_{|u| = t-1} pi(u) h(u) to CE*, and the running
  total;
* :func:`plot_length_rate`: the (N, r_N) joint distribution of sampled rollouts, with the sample rho and (when
  given) the exact rho from the canopy;
* :func:`plot_bracket_vs_budget`: the certified bracket [lower, upper] on CE* as the budget grows.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from canopy_rs.errors import InvalidArgumentError
from canopy_rs.plots.figure import BLUE as _BLUE
from canopy_rs.plots.figure import GREY as _GREY
from canopy_rs.plots.figure import ORANGE as _ORANGE
from canopy_rs.plots.figure import RED as _RED
from canopy_rs.plots.figure import fmt as _fmt
from canopy_rs.plots.figure import new_axes as _new_axes
from canopy_rs.stats import pearson

__all__ = [
    "plot_length_distribution",
    "plot_entropy_by_depth",
    "plot_length_rate",
    "plot_bracket_vs_budget",
]

def _result_get(res: Any, name: str) -> Any:
    return res[name] if isinstance(res, dict) else getattr(res, name)


# --------------------------------------------------------------------------------------------------


def plot_length_distribution(result: Any, ax: Any = None, title: Optional[str] = None) -> Any:
    """P(N = n) from an exact :class:`~canopy_rs.CanopyResult` (or its ``to_dict()``): bars split into the
    mass that ends with an EOS at token n and, at n = max_new_tokens, the truncated mass (no EOS by the cap).
    """
    fig, ax = _new_axes(ax)
    pmf = np.asarray(_result_get(result, "length_pmf"), dtype=float)
    trunc = float(_result_get(result, "truncation_prob"))
    eos = pmf.copy()
    eos[-1] = max(eos[-1] - trunc, 0.0)
    n = np.arange(len(pmf))
    lo = 1 if len(pmf) > 1 and pmf[0] == 0 else 0  # N >= 1 always; drop the empty n = 0 bar
    n, eos, pmf = n[lo:], eos[lo:], pmf[lo:]
    tr = np.zeros_like(eos)
    tr[-1] = trunc
    ax.bar(n, eos, color=_BLUE, label="ends with EOS at token n")
    ax.bar(n, tr, bottom=eos, color=_GREY, hatch="//", edgecolor="white", label="truncated (no EOS by the cap)")
    for j, (x, y) in enumerate(zip(n, pmf)):
        if y > 0.005:
            label = f"{y:.3f}"
            if j == len(n) - 1 and trunc > 0.005 and eos[-1] > 0.0005:
                label += f"\n(truncated {trunc:.3f})"
            ax.annotate(label, (x, y), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xlabel("length N (generated tokens, EOS included)")
    ax.set_ylabel("probability")
    ax.set_xticks(n)
    ax.set_ylim(0, min(1.05, max(pmf.max(), 1e-9) * 1.25))
    el = float(_result_get(result, "expected_length"))
    hn = float(_result_get(result, "length_entropy"))
    ax.set_title(title or f"Length distribution: E[N] = {_fmt(el)}, H(N) = {_fmt(hn)} nats, P(trunc) = {_fmt(trunc)}",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_entropy_by_depth(result: Any, ax: Any = None, title: Optional[str] = None) -> Any:
    """Each step's contribution to CE*: step t adds sum over internal nodes u at depth t-1 of pi(u) h(u)
    (bars, left axis) and the running total reaching CE* (line, right axis)."""
    fig, ax = _new_axes(ax)
    e = np.asarray(_result_get(result, "entropy_by_depth"), dtype=float)
    t = np.arange(1, len(e) + 1)
    ce = float(_result_get(result, "ce_star"))
    ax.bar(t, e, color=_BLUE, label="step t's contribution: sum of pi(u) h(u) over prefixes u of length t-1")
    ax.set_xlabel("step t (token position)")
    ax.set_ylabel("contribution to CE* (nats)")
    ax.set_xticks(t if len(t) <= 30 else t[:: max(1, len(t) // 15)])
    ax.grid(axis="y", alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(t, np.cumsum(e), color=_ORANGE, marker="o", label="running total")
    ax2.axhline(ce, color=_ORANGE, ls=":", lw=1)
    ax2.set_ylabel("cumulative (nats)", color=_ORANGE)
    # Headroom above both series for the legend.
    ax2.set_ylim(0, max(ce, 1e-9) * 1.4)
    ax.set_ylim(0, max(e.max() if len(e) else 0, 1e-9) * 1.55)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2 + [], fontsize=8, loc="upper left", frameon=False)
    ax.set_title(title or f"Entropy by step: CE* = {_fmt(ce, 4)} nats (exp CE* = {math.exp(ce):.3g} leaves)",
                 fontsize=10)
    return fig


def plot_length_rate(
    rollouts: Any = None,
    *,
    lengths: Optional[Sequence[float]] = None,
    rates: Optional[Sequence[float]] = None,
    exact: Any = None,
    ax: Any = None,
    title: Optional[str] = None,
    seed: int = 0,
) -> Any:
    """The (N, r_N) joint distribution of sampled rollouts (a :class:`canopy_rs.sampling.Rollouts`, or
    ``lengths`` and ``rates`` arrays): points jittered along N, sized by how many rollouts share them, the
    mean r_N at each N, the sample Pearson rho, and the exact rho when ``exact`` (a CanopyResult, or a
    float) is given."""
    fig, ax = _new_axes(ax)
    if rollouts is not None:
        n = np.asarray(rollouts.lengths, dtype=float)
        r = np.asarray(rollouts.entropy_rates, dtype=float)
    else:
        if lengths is None or rates is None:
            raise InvalidArgumentError("pass rollouts, or both lengths and rates")
        n = np.asarray(lengths, dtype=float)
        r = np.asarray(rates, dtype=float)
    if len(n):
        pts, counts = np.unique(np.stack([n, np.round(r, 9)], axis=1), axis=0, return_counts=True)
        jitter = np.random.default_rng(seed).uniform(-0.12, 0.12, size=len(pts))
        ax.scatter(pts[:, 0] + jitter, pts[:, 1], s=12 + 60 * np.sqrt(counts / counts.max()), alpha=0.55,
                   color=_BLUE, edgecolors="none", label=f"rollouts (M = {len(n)}; size = count)")
        ns = np.unique(n)
        means = [r[n == k].mean() for k in ns]
        ax.plot(ns, means, color=_ORANGE, marker="D", ms=5, lw=1.5, label="mean $r_N$ at each N")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("length N")
    ax.set_ylabel("entropy rate $r_N = \\frac{1}{N}\\sum_t h_t$ (nats/token)")
    if len(n) and len(np.unique(n)) <= 30:
        ax.set_xticks(np.unique(n))
    rho = pearson(n, r)
    parts = [f"sample $\\rho$ = {_fmt(rho)}"]
    if exact is not None:
        ex = float(exact) if isinstance(exact, (int, float, np.floating)) else float(_result_get(exact, "length_rate_corr"))
        parts.append(f"exact $\\rho$ = {_fmt(ex)}")
    ax.set_title(title or ("$\\rho(N, r_N)$: " + ", ".join(parts)), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="best")
    return fig


def _bracket_arrays(brackets: Sequence[Any], x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs, lo, hi = [], [], []
    for b in brackets:
        get = (lambda k: b[k]) if isinstance(b, dict) else (lambda k: getattr(b, k))
        xs.append(float(get(x)))
        lo.append(float(get("ce_star_lower")))
        hi.append(float(get("ce_star_upper")))
    order = np.argsort(xs, kind="stable")
    return np.asarray(xs)[order], np.asarray(lo)[order], np.asarray(hi)[order]


def plot_bracket_vs_budget(
    brackets: Sequence[Any],
    exact: Any = None,
    *,
    x: str = "num_expanded",
    ax: Any = None,
    title: Optional[str] = None,
    logx: Optional[bool] = None,
) -> Any:
    """The certified bracket on CE* against the budget: ``brackets`` are :class:`~canopy_rs.CanopyBounds` /
    :class:`~canopy_rs.CanopyResult` objects (or dicts with ``ce_star_lower``, ``ce_star_upper`` and the ``x``
    field, e.g. ``num_expanded`` or ``model_tokens``) at growing budgets; ``exact`` (a CanopyResult or
    a float) draws the true value."""
    fig, ax = _new_axes(ax)
    xs, lo, hi = _bracket_arrays(brackets, x)
    if len(xs) == 0:
        raise InvalidArgumentError("no brackets to plot")
    ax.fill_between(xs, lo, hi, step="post", color=_BLUE, alpha=0.25, label="certified bracket")
    ax.step(xs, lo, where="post", color=_BLUE, lw=1.5, label="lower bound")
    ax.step(xs, hi, where="post", color=_BLUE, lw=1.0, ls="--", label="upper bound")
    if exact is not None:
        ce = float(exact) if isinstance(exact, (int, float, np.floating)) else float(_result_get(exact, "ce_star"))
        ax.axhline(ce, color=_RED, lw=1.2, label=f"exact CE* = {ce:.4f}")
    if logx is None:
        logx = xs.min() > 0 and xs.max() / max(xs.min(), 1e-12) > 30
    if logx:
        ax.set_xscale("log")
    # Keep the interesting part in view: the first upper bounds (vocab-sized supports) can be huge.
    top = hi[min(len(hi) - 1, max(0, len(hi) // 10))]
    ymax = max(top, lo.max()) * 1.05
    if math.isfinite(ymax) and ymax > 0:
        ax.set_ylim(0, ymax)
    labels = {"num_expanded": "expanded nodes", "model_tokens": "model tokens, prompt excluded",
              "tokens_forwarded": "tokens forwarded, prompt included", "seconds": "seconds"}
    ax.set_xlabel(f"budget ({labels.get(x, x)})")
    ax.set_ylabel("CE* (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=True, framealpha=0.9, loc="lower right")
    unit = labels.get(x, x)
    if hi[-1] - lo[-1] <= 1e-9 * max(1.0, abs(hi[-1])):
        default = f"Bracket vs budget: closed (exact) after {xs[-1]:,.0f} {unit}"
    else:
        default = f"Bracket vs budget: width {_fmt(hi[-1] - lo[-1], 4)} after {xs[-1]:,.0f} {unit}"
    ax.set_title(title or default, fontsize=10)
    return fig
