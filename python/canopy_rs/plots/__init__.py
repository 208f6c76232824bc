"""Figures (matplotlib; the ``canopy_rs[plot]`` or ``[demo]`` extra), one module per subject:

* :mod:`~canopy_rs.plots.canopy`: one canopy's length distribution, entropy by step, the (N, r_N) joint
  distribution of its rollouts, the certified bracket against the budget;
* :mod:`~canopy_rs.plots.estimators`: the estimator comparison's RMSE against cost;
* :mod:`~canopy_rs.plots.study`: the base-vs-fine-tuned study's figures;
* :mod:`~canopy_rs.plots.figure`: the shared helpers (:func:`save_figure` writes PNG and SVG).

Each ``plot_*`` function takes its data (a result object, its ``to_dict()``, or plain rows and arrays), draws
into ``ax`` when given (e.g. from ``plt.subplots()``), else into a new :class:`matplotlib.figure.Figure` that is
not registered with pyplot (nothing is shown, no global state is touched, no backend is switched), and returns
the figure. Nothing here runs a model or an estimator.
"""

from canopy_rs.plots.canopy import plot_bracket_vs_budget, plot_entropy_by_depth, plot_length_distribution, plot_length_rate
from canopy_rs.plots.estimators import plot_rmse_vs_cost
from canopy_rs.plots.figure import save_figure

__all__ = [
    "plot_length_distribution",
    "plot_entropy_by_depth",
    "plot_length_rate",
    "plot_bracket_vs_budget",
    "plot_rmse_vs_cost",
    "save_figure",
]
