"""Figures of the estimator comparison (:func:`canopy_rs.compare`), drawn from its rows (the data is passed in;
nothing here runs or imports an estimator)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from canopy_rs.plots.figure import new_axes

__all__ = ["plot_rmse_vs_cost", "rmse_curve"]


def rmse_curve(rows: Sequence[Mapping[str, Any]], name: str, cost_key: str = "model_tokens") -> tuple[np.ndarray, np.ndarray]:
    """``(cost, rmse)`` of estimator ``name``'s rows with a positive RMSE and cost, by increasing cost."""
    sel = sorted((r for r in rows if r["estimator"] == name and r["rmse"] > 0 and r[cost_key] > 0),
                 key=lambda r: r[cost_key])
    return np.array([r[cost_key] for r in sel], dtype=float), np.array([r["rmse"] for r in sel], dtype=float)


def plot_rmse_vs_cost(
    rows: Sequence[Mapping[str, Any]],
    *,
    exact_ce_star: float,
    cost_key: str = "model_tokens",
    reference: str = "mc_rb",
    title: Optional[str] = None,
    ax: Any = None,
) -> Any:
    """Log-log RMSE against measured cost, one line per estimator, from a comparison's ``rows`` (dicts with
    ``estimator``, ``rmse`` and ``cost_key``; :attr:`ComparisonResult.rows`), and a slope -1/2 guide through
    the ``reference`` estimator's first point. Returns the figure."""
    fig, ax = new_axes(ax, figsize=(6.4, 4.6))
    markers = "osD^v<>px*"
    names = list(dict.fromkeys(r["estimator"] for r in rows))
    for i, name in enumerate(names):
        x, y = rmse_curve(rows, name, cost_key)
        exact_at = [r[cost_key] for r in rows if r["estimator"] == name and r["rmse"] == 0]
        label = name + (f" (exact from {min(exact_at):.0f})" if exact_at else "")
        if x.shape[0]:
            ax.loglog(x, y, marker=markers[i % len(markers)], lw=1.6, ms=5, label=label)
    x, y = rmse_curve(rows, reference, cost_key)
    if x.shape[0]:
        xs = np.geomspace(x.min(), x.max(), 8)
        ax.loglog(xs, y[0] * np.sqrt(x[0] / xs), ls=":", color="grey", lw=1.0, label="slope -1/2")
    ax.set_xlabel("model tokens per estimate (prompt excluded)" if cost_key == "model_tokens" else cost_key)
    ax.set_ylabel("RMSE vs exact CE*$_{max}$ (nats)")
    ax.set_title(title or f"Estimator RMSE vs cost (exact CE* = {exact_ce_star:.3f})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return fig
