"""The study's interaction model recovers a slope ratio planted in synthetic panels (not only its internal
identities): D = prompt intercept + slope_variant * R_bar + noise, with a length 1/N_bar that varies but has
no effect, over two tasks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("statsmodels")  # the [study] extra; installed in CI's test extra

from canopy_rs.study.mixed_model import interaction_model  # noqa: E402


def _cfg(replicates: int) -> SimpleNamespace:
    return SimpleNamespace(bootstrap=SimpleNamespace(regression_replicates=replicates, seed=7, confidence=0.95))


def _panel(base_slope: float, ratio: float, num_prompts: int, noise: float, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(num_prompts):
        task = "poetry" if p % 2 else "math"
        intercept = rng.normal(0.0, 0.5) + (0.3 if task == "poetry" else 0.0)
        for variant, model, slope in (("base", "m-base", base_slope), ("fine-tuned", "m-tuned", base_slope * ratio)):
            r_bar = rng.uniform(0.5, 2.5)
            n_bar = rng.uniform(5.0, 20.0)
            rows.append(dict(model=model, variant=variant, family="fam", task=task, prompt_id=f"p{p}",
                             prompt_uid=f"{task}/p{p}", R_bar=r_bar, N_bar=n_bar,
                             D=intercept + (0.2 if variant == "fine-tuned" else 0.0) + slope * r_bar
                             + rng.normal(0.0, noise)))
    return rows


@pytest.mark.parametrize("ratio, replicates", [(0.5, 12), (1.6, 0)])
def test_recovers_a_planted_slope_ratio(ratio, replicates):
    """60 prompts, noise SD 0.05 against a slope of 0.4 over R_bar in [0.5, 2.5]: the ratio is known to ~2%;
    the estimate lies within 10% of the planted ratio (and within 3 prompt-bootstrap SEs of it; 12 refits keep
    the test fast, too few for a percentile interval's tails), and the slopes (on z-scored R_bar: the raw slope times R_bar's SD) match the
    planted ones."""
    panel = _panel(0.4, ratio, 60, 0.05, seed=1)
    out = interaction_model(_cfg(replicates), panel)
    assert "skipped" not in out, out.get("skipped")
    assert out["ratio"] == pytest.approx(ratio, rel=0.10)
    if replicates:
        lo, hi = out["ratio_ci"]
        assert abs(out["ratio"] - ratio) < 3 * out["ratio_se"] and 0 < hi - lo < 0.5 * ratio
        assert out["num_finite_replicates"] >= replicates - 2
    sd = float(np.std([r["R_bar"] for r in panel], ddof=1))
    assert out["base_slope"] == pytest.approx(0.4 * sd, rel=0.10)
    assert out["finetuned_slope"] == pytest.approx(0.4 * ratio * sd, rel=0.10)
    # The change eta is real and large here: its p-value is tiny.
    assert out["eta_pvalue"] < 1e-6


def test_no_planted_change_is_not_detected():
    """Equal slopes: the ratio is 1 within 10% and eta is not significant at 1%."""
    out = interaction_model(_cfg(0), _panel(0.4, 1.0, 60, 0.05, seed=2))
    assert out["ratio"] == pytest.approx(1.0, rel=0.10)
    assert out["eta_pvalue"] > 0.01 and math.isfinite(out["eta_pvalue"])
