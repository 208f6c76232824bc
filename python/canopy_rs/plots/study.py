"""Figures of the base-vs-fine-tuned study (:func:`canopy_rs.run_study`), drawn from its tables: the CE*
decomposition, the running entropy rate, the length distributions, D against the entropy rate, exact against
sampled. Every figure is a :class:`matplotlib.figure.Figure` that pyplot never sees."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from canopy_rs.plots.figure import Figure, save_figure
from canopy_rs.text import format_number

__all__ = ["study_figures", "model_colors"]




def _save(fig: Any, out: Path, name: str) -> str:
    save_figure(fig, out / name)
    return f"{out.name}/{name}.png"


# One colour per model, the same in every figure (models in config order).
_PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974",
            "#64b5cd")


def model_colors(models: Sequence[str]) -> dict[str, str]:
    """``{model: colour}``: the study's models in order, one colour each, used by every figure."""
    return {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(models)}


def _no_data(ax: Any, why: str) -> None:
    """An empty panel that says so (instead of blank axes)."""
    ax.text(0.5, 0.5, f"no data:\n{why}", ha="center", va="center", transform=ax.transAxes, fontsize=8,
            color="0.35", wrap=True)


def _fit_ylim(ax: Any, values: Sequence[float], pad: float = 0.08) -> None:
    """y-limits that show every value given (bars, markers, the 0 line) with a margin."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if not v.size:
        return
    lo, hi = float(min(v.min(), 0.0)), float(max(v.max(), 0.0))
    span = (hi - lo) or 1.0
    ax.set_ylim(lo - pad * span if lo < 0 else lo, hi + pad * span)


def _grid(n: int, w: float = 4.6, h: float = 3.6):
    cols = min(n, 2)
    rows = int(math.ceil(n / cols))
    fig = Figure(figsize=(w * cols, h * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _fig_decomposition(out: Path, pooled: Sequence[Mapping[str, Any]], tasks: Sequence[str],
                       colors: Mapping[str, str]) -> str:
    """Per task, per model: E[N]·E[r_N] as a bar from 0 and Cov(N, r_N) stacked on it when positive, drawn
    below the axis when negative (it subtracts); the marker is CE* = their sum. The bars' edge is the model's
    colour."""
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        rows = [r for r in pooled if r["task"] == task]
        x = np.arange(len(rows))
        ld = np.array([_num(r.get("length_driven")) for r in rows])
        cov = np.array([_num(r.get("length_rate_cov_residual")) for r in rows])
        edge = [colors.get(r["model"], "k") for r in rows]
        ax.bar(x, ld, color="#9db4d6", edgecolor=edge, lw=1.5, label="E[N]·E[r_N]")
        pos = np.where(cov > 0, cov, 0.0)
        neg = np.where(cov < 0, cov, 0.0)
        ax.bar(x, pos, bottom=ld, color="#f0b27a", edgecolor=edge, lw=1.5,
               label="Cov(N, r_N) > 0 (adds)" if (pos > 0).any() else "_nolegend_")
        ax.bar(x, neg, bottom=0.0, color="#f0b27a", hatch="//", edgecolor=edge, lw=1.5,
               label="Cov(N, r_N) < 0 (subtracts; below 0)" if (neg < 0).any() else "_nolegend_")
        ce = ld + cov
        ax.plot(x, ce, "k_", markersize=18, mew=2, label="CE*_max", zorder=5)
        ax.set_xticks(x, [f"{r['model']}\n({r['variant']})" for r in rows], fontsize=7)
        ax.set_ylabel("nats")
        ax.set_title(f"CE* decomposition: {task}", fontsize=9)
        ax.axhline(0, color="0.3", lw=0.8)
        _fit_ylim(ax, [*ld, *(ld + pos), *neg, *ce])
        if not np.isfinite(ce).any():
            _no_data(ax, "CE* is undefined for every model of this task")
    # One legend for the figure (each panel may lack an entry): every component that appears anywhere.
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="lower center", ncol=len(handles))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, out, "decomposition")


def _fig_entropy_rate(out: Path, traj: Mapping[tuple, tuple], models: Sequence[str], tasks: Sequence[str],
                      colors: Mapping[str, str]) -> str:
    fig = Figure(figsize=(4.6 * len(tasks), 5.2))
    axes = fig.subplots(2, len(tasks), squeeze=False, gridspec_kw={"height_ratios": [3, 1.3]}, sharex="col")
    for j, task in enumerate(tasks):
        top, bot = axes[0, j], axes[1, j]
        drawn = 0
        for m in models:
            t = traj.get((m, task))
            if t is None or len(t[0]) == 0:
                continue
            pos, rate, act = (np.asarray(a) for a in t)
            top.plot(pos, rate, marker=".", label=m, color=colors.get(m))
            bot.plot(pos, act, drawstyle="steps-mid", marker=".", color=colors.get(m))
            drawn += 1
        if not drawn:
            _no_data(top, "no running entropy rate for this task")
        top.set_title(f"running entropy rate: {task}", fontsize=9)
        top.set_ylabel("mean (1/t) Σ h (nats)")
        bot.set_ylabel("active rollouts")
        bot.set_xlabel("position t")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, "entropy_rate")


def _fig_lengths(out: Path, rollouts: Sequence[Mapping[str, Any]], models: Sequence[str], tasks: Sequence[str],
                 t_max: int, colors: Mapping[str, str]) -> str:
    fig, axes = _grid(len(tasks))
    bins = np.arange(0.5, t_max + 1.5, max(1, t_max // 40))
    for ax, task in zip(axes, tasks):
        drawn = 0
        for m in models:
            n = [int(r["length"]) for r in rollouts if r["task"] == task and r["model"] == m]
            if n:
                ax.hist(n, bins=bins, histtype="step", density=True, label=m, lw=1.3, color=colors.get(m))
                drawn += 1
        if not drawn:
            _no_data(ax, "no rollouts for this task")
        ax.set_title(f"length N: {task}", fontsize=9)
        ax.set_xlabel("N (EOS counted; T_max = truncated)")
        ax.set_ylabel("fraction of rollouts")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, "lengths")


def _fig_diversity_rate(out: Path, panel: Sequence[Mapping[str, Any]], reg: Mapping[str, Any],
                        mcolors: Mapping[str, str]) -> Optional[str]:
    pts = [r for r in panel if math.isfinite(r["D"]) and math.isfinite(r["R_bar"])]
    if not pts:
        return None
    fig = Figure(figsize=(6.2, 4.4))
    ax = fig.subplots()
    # Points in their model's colour; a variant's slope line in its model's colour when one model is that
    # variant (one family), else grey; solid for base, dashed for fine-tuned.
    by_variant: dict[str, set] = {}
    for r in pts:
        by_variant.setdefault(r["variant"], set()).add(r["model"])
    colors = {v: (mcolors.get(next(iter(ms)), "0.4") if len(ms) == 1 else "0.4") for v, ms in by_variant.items()}
    styles = {"base": "-", "fine-tuned": "--"}
    families = sorted({r["family"] for r in pts})
    markers = dict(zip(families, "osD^v<>"))
    for r in pts:
        ax.scatter(r["R_bar"], r["D"], color=mcolors.get(r["model"], "0.4"), marker=markers[r["family"]], s=22,
                   alpha=0.75)
    sd = reg.get("R_bar_sd", math.nan)
    for variant, key in (("base", "base_slope"), ("fine-tuned", "finetuned_slope")):
        vs = [r for r in pts if r["variant"] == variant]
        slope = reg.get(key, math.nan)
        if not vs or not (math.isfinite(slope) and sd and math.isfinite(sd)):
            continue
        x = np.array([r["R_bar"] for r in vs])
        y = np.array([r["D"] for r in vs])
        xs = np.linspace(x.min(), x.max(), 2)
        # MixedLM slope per SD of R_bar, drawn through the variant's mean point.
        ax.plot(xs, y.mean() + slope / sd * (xs - x.mean()), color=colors.get(variant, "0.4"), lw=2,
                ls=styles[variant], label=f"{variant}: slope {format_number(slope)} per SD of R̄")
    for m in mcolors:
        vs = [r for r in pts if r["model"] == m]
        if vs:
            ax.scatter([], [], color=mcolors[m], label=f"{m} ({vs[0]['variant']}) prompts")
    ax.set_xlabel("R̄ = mean entropy rate r_N (nats/token)")
    ax.set_ylabel("semantic diversity D")
    title = "D vs R̄ per prompt"
    if math.isfinite(reg.get("ratio", math.nan)):
        lo, hi = reg.get("ratio_ci", [math.nan, math.nan])
        title += f"; slope ratio fine-tuned/base {format_number(reg['ratio'], 2)} [{format_number(lo, 2)}, {format_number(hi, 2)}]"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, "diversity_vs_rate")


def _fig_exact(out: Path, prompts: Sequence[Mapping[str, Any]], colors: Mapping[str, str]) -> Optional[str]:
    rows = [r for r in prompts if r.get("exact_ce_star") is not None]
    if not rows:
        return None
    has_d = any(math.isfinite(_num(r.get("exact_semantic_diversity"))) for r in rows)
    panels = [("ce_star", "CE*_max (nats)"), ("length_rate_corr", "ρ(N, r_N) Pearson")]
    if has_d:
        panels.append(("semantic_diversity", "semantic diversity D"))
    fig = Figure(figsize=(4.3 * len(panels), 4.0))
    axes = fig.subplots(1, len(panels), squeeze=False)
    present = {r["model"] for r in rows}
    models = [m for m in colors if m in present] + sorted(present - set(colors))
    for ax, (k, label) in zip(axes[0], panels):
        lo, hi = math.inf, -math.inf
        shown = 0
        for m in models:
            xs = np.array([_num(r.get(f"exact_{k}")) for r in rows if r["model"] == m])
            ys = np.array([_num(r.get(f"exact_sampled_{k}")) for r in rows if r["model"] == m])
            se = np.array([_num(r.get(f"exact_sampled_{k}_se")) for r in rows if r["model"] == m])
            yerr = 1.96 * se if np.isfinite(se).any() else None
            ok = np.isfinite(xs) & np.isfinite(ys)
            shown += int(ok.sum())
            ax.errorbar(xs, ys, yerr=yerr, fmt="o", ms=4, capsize=2, label=m, color=colors.get(m))
            fin = np.concatenate([xs[np.isfinite(xs)], ys[np.isfinite(ys)]])
            if fin.size:
                lo, hi = min(lo, fin.min()), max(hi, fin.max())
        if shown and math.isfinite(lo):
            ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--")
        if not shown:
            why = ("no prompt has it defined both exactly\nand sampled (N hardly varies at this depth)"
                   if k == "length_rate_corr" else "no prompt has it defined both\nexactly and sampled")
            _no_data(ax, f"{label}:\n{why}")
        ax.set_xlabel(f"exact {label}")
        ax.set_ylabel(f"sampled {label}")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("exact canopy vs M rollouts at the same policy (one point per prompt; bars: 95% CI)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out, "exact_vs_sampled")


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def study_figures(out: Path, *, models: Sequence[str], tasks: Sequence[str], max_new_tokens: int,
                  pooled: Sequence[Mapping[str, Any]], trajectories: Mapping[tuple, tuple],
                  rollouts: Sequence[Mapping[str, Any]], panel: Sequence[Mapping[str, Any]],
                  regression: Mapping[str, Any], prompts: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """All the study's figures, PNG + SVG in the folder ``out``, from its tables (``pooled``, the running
    entropy-rate ``trajectories`` per (model, task), ``rollouts``, the regression ``panel`` and its fit
    ``regression``, ``prompts``); returns name -> PNG path relative to ``out``'s parent. Tasks without pooled
    rows are left out."""
    tasks = [t for t in tasks if any(r["task"] == t for r in pooled)]
    figs: dict[str, str] = {}
    if not tasks:
        return figs
    colors = model_colors(models)
    figs["decomposition"] = _fig_decomposition(out, pooled, tasks, colors)
    figs["entropy_rate"] = _fig_entropy_rate(out, trajectories, models, tasks, colors)
    figs["lengths"] = _fig_lengths(out, rollouts, models, tasks, max_new_tokens, colors)
    p = _fig_diversity_rate(out, panel, regression, colors)
    if p:
        figs["diversity_vs_rate"] = p
    p = _fig_exact(out, prompts, colors)
    if p:
        figs["exact_vs_sampled"] = p
    return figs
