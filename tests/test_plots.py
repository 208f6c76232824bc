"""canopy_rs.plots on a synthetic model: every figure builds from live objects and from their JSON dicts,
draws into given axes, and saves PNG + SVG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import canopy_rs  # noqa: E402
from canopy_rs import plots  # noqa: E402
from canopy_rs.estimators.comparison import compare  # noqa: E402
from canopy_rs.testing import random_logits_fn  # noqa: E402
from canopy_rs.sampling import sample  # noqa: E402

V, T, K = 12, 4, 3
FN = random_logits_fn(V, seed=3, scale=1.5, eos_bias=0.5)
KW = dict(vocab_size=V, eos_token_ids=[0], max_new_tokens=T, top_k=K)


@pytest.fixture(scope="module")
def exact() -> canopy_rs.CanopyResult:
    return canopy_rs.exact(FN, **KW)


def _check_saved(fig, path: Path) -> None:
    files = plots.save_figure(fig, path)
    assert [f.suffix for f in files] == [".png", ".svg"]
    for f in files:
        assert f.stat().st_size > 1000
    assert files[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_length_and_entropy_plots(exact, tmp_path: Path) -> None:
    fig = plots.plot_length_distribution(exact)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    # the EOS bars plus the truncated bar add up to the whole length distribution
    assert sum(heights) == pytest.approx(exact.length_pmf.sum(), abs=1e-9)
    assert "E[N]" in ax.get_title()
    _check_saved(fig, tmp_path / "length")
    fig = plots.plot_entropy_by_depth(exact)
    bars = [p.get_height() for p in fig.axes[0].patches]
    assert sum(bars) == pytest.approx(exact.ce_star, rel=1e-9)
    _check_saved(fig, tmp_path / "entropy.png")
    # JSON round trip: dicts work too
    d = exact.to_dict()
    plots.plot_length_distribution(d)
    plots.plot_entropy_by_depth(d)


def test_length_rate_plot(exact, tmp_path: Path) -> None:
    ro = sample(FN, num_rollouts=60, seed=1, **KW)
    fig = plots.plot_length_rate(ro, exact=exact)
    title = fig.axes[0].get_title()
    assert "sample" in title and "exact" in title and f"{exact.length_rate_corr:.3f}" in title
    _check_saved(fig, tmp_path / "rho")
    fig2 = plots.plot_length_rate(lengths=ro.lengths, rates=ro.entropy_rates, exact=0.25)
    assert "0.250" in fig2.axes[0].get_title()
    with pytest.raises(ValueError):
        plots.plot_length_rate()


def test_bracket_plot(exact, tmp_path: Path) -> None:
    snaps: list = []
    res = canopy_rs.bounded(FN, budget=10**6, support_cap=K, progress=snaps.append, progress_interval=0.0,
                            batch_size=2, **KW)
    assert res.is_exact and len(snaps) > 3
    fig = plots.plot_bracket_vs_budget(snaps, exact=exact)
    assert "exact" in fig.axes[0].get_title()
    _check_saved(fig, tmp_path / "bracket")
    partial = [canopy_rs.bounded(FN, budget=b, **KW) for b in (2, 5, 10)]
    fig = plots.plot_bracket_vs_budget([b.to_dict() for b in partial], exact=exact.ce_star, x="tokens_forwarded")
    assert "width" in fig.axes[0].get_title()
    with pytest.raises(ValueError):
        plots.plot_bracket_vs_budget([])


def test_draws_into_given_axes(exact) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2)
    try:
        assert plots.plot_length_distribution(exact, ax=axes[0]) is fig
        assert plots.plot_entropy_by_depth(exact, ax=axes[1]) is fig
    finally:
        plt.close(fig)


def test_rmse_vs_cost_from_the_comparison_rows(tmp_path: Path) -> None:
    study = compare(FN, estimators=["mc_rb", "hybrid"], budgets=[8, 16], repeats=2, seed=0, **KW)
    fig = plots.plot_rmse_vs_cost(study.rows, exact_ce_star=study.exact_ce_star)
    files = plots.save_figure(fig, tmp_path / "rmse")
    assert [f.name for f in files] == ["rmse.png", "rmse.svg"]
    assert all(f.stat().st_size > 1000 for f in files)


def test_no_pyplot_state(exact) -> None:
    """Figures from the plot functions are not registered with pyplot (nothing leaks or shows)."""
    import matplotlib.pyplot as plt

    n = len(plt.get_fignums())
    plots.plot_length_distribution(exact)
    assert len(plt.get_fignums()) == n
    assert np.isfinite(exact.ce_star)
