"""The study's interaction model: statsmodels' MixedLM of D on the entropy rate, base vs fine-tuned (pandas
and statsmodels, optional dependencies, are imported here and only here)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf

from .config import StudyConfig

__all__ = ["interaction_model"]


def _zscore(x: np.ndarray) -> Optional[np.ndarray]:
    sd = float(np.std(x, ddof=1)) if x.size > 1 else 0.0
    return None if not (sd > 0 and math.isfinite(sd)) else (x - x.mean()) / sd


_FT_TERM = "C(variant, Treatment('base'))[T.fine-tuned]"


def _fit(df: Any, formula: str) -> tuple[float, float, Any]:
    """(base slope beta, fine-tuned change eta, fitted result) of the MixedLM with a random intercept per
    prompt_uid (REML)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence / boundary warnings on small panels; reported via .converged
        fit = smf.mixedlm(formula, df, groups=df["prompt_uid"]).fit(reml=True)
    return float(fit.params["R_sc"]), float(fit.params[f"R_sc:{_FT_TERM}"]), fit


def interaction_model(cfg: StudyConfig, panel: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The interaction model (docs/definitions.md#interaction-model) with statsmodels' MixedLM:

        D ~ R_sc * variant + invN_sc * variant [+ C(task)] [+ C(family)],  random intercept per prompt_uid

    R_sc = z-scored R_bar, invN_sc = z-scored 1/N_bar (the reference code's length term; dropped when N_bar
    does not vary), base the reference variant; task / family terms only when there is more than one.
    Reports the base slope beta, the fine-tuned slope beta + eta and their ratio (beta + eta) / beta with a
    percentile CI from ``bootstrap.regression_replicates`` replicates that resample prompt_uids with
    replacement (each draw keeps all models' rows of that prompt, so both variants see the same prompts;
    a prompt drawn twice enters as two groups)."""
    out: dict[str, Any] = {"model": "statsmodels MixedLM (REML), random intercept per prompt_uid",
                           "base_slope": math.nan, "finetuned_slope": math.nan, "eta": math.nan,
                           "eta_pvalue": math.nan, "ratio": math.nan, "ratio_ci": [math.nan, math.nan],
                           "ratio_se": math.nan, "num_replicates": 0, "num_finite_replicates": 0}
    df = pd.DataFrame(list(panel))
    if df.empty:
        out["skipped"] = "no finished units"
        return out
    df = df[np.isfinite(df["D"]) & np.isfinite(df["R_bar"]) & np.isfinite(df["N_bar"])].copy()
    out["num_rows"] = int(len(df))
    if df.empty:
        out["skipped"] = "no semantic diversity: the study has no encoder (encoder.path = \"none\")"
        return out
    if set(df["variant"]) != {"base", "fine-tuned"}:
        out["skipped"] = "the panel needs rows of both variants"
        return out
    r_sc = _zscore(df["R_bar"].to_numpy(float))
    if r_sc is None:
        out["skipped"] = "R_bar does not vary across the panel"
        return out
    df["R_sc"] = r_sc
    terms = [f"R_sc * C(variant, Treatment('base'))"]
    inv_n = _zscore(1.0 / df["N_bar"].to_numpy(float))
    if inv_n is not None:
        df["invN_sc"] = inv_n
        terms.append("invN_sc * C(variant, Treatment('base'))")
    if df["task"].nunique() > 1:
        terms.append("C(task)")
    if df["family"].nunique() > 1:
        terms.append("C(family)")
    out.update(num_prompts=int(df["prompt_uid"].nunique()),
               R_bar_mean=float(df["R_bar"].mean()), R_bar_sd=float(df["R_bar"].std(ddof=1)))
    formula = "D ~ " + " + ".join(terms)
    try:
        beta, eta, fit = _fit(df, formula)
    except Exception as e:  # singular designs on tiny panels: report, do not crash the study
        if inv_n is None:
            out.update(formula=formula, skipped=f"MixedLM fit failed: {type(e).__name__}: {e}")
            return out
        # A length term that barely varies (e.g. every rollout truncated at T_max) makes the design singular:
        # fit without it and say so.
        terms = [t for t in terms if not t.startswith("invN_sc")]
        df = df.drop(columns="invN_sc")
        out["note"] = f"the length term was dropped: with it the fit failed ({type(e).__name__}: {e})"
        formula = "D ~ " + " + ".join(terms)
        try:
            beta, eta, fit = _fit(df, formula)
        except Exception as e2:
            out.update(formula=formula, skipped=f"MixedLM fit failed: {type(e2).__name__}: {e2}")
            return out
    out["formula"] = formula
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (beta + eta) / beta if beta != 0 else math.nan
    out.update(
        base_slope=beta, finetuned_slope=beta + eta, eta=eta,
        eta_pvalue=float(fit.pvalues.get(f"R_sc:{_FT_TERM}", math.nan)), ratio=ratio,
        base_slope_se=float(fit.bse.get("R_sc", math.nan)), base_slope_pvalue=float(fit.pvalues.get("R_sc", math.nan)),
        converged=bool(getattr(fit, "converged", True)),
        group_variance=float(np.asarray(fit.cov_re)[0, 0]) if fit.cov_re is not None else math.nan,
        coefficients=[{"term": k, "estimate": float(fit.params[k]), "se": float(fit.bse.get(k, math.nan)),
                       "pvalue": float(fit.pvalues.get(k, math.nan))} for k in fit.fe_params.index],
    )
    # Prompt bootstrap of the ratio (refits; the z-scores are recomputed on each replicate's panel).
    b = cfg.bootstrap.regression_replicates
    if b > 0:
        rng = np.random.default_rng(cfg.bootstrap.seed)
        uids = np.asarray(sorted(df["prompt_uid"].unique()))
        groups = {u: df[df["prompt_uid"] == u] for u in uids}
        reps = np.full(b, math.nan)
        for i in range(b):
            draw = rng.integers(0, uids.size, size=uids.size)
            parts = []
            for j, k in enumerate(draw):
                g = groups[uids[k]].copy()
                g["prompt_uid"] = f"{uids[k]}#{j}"
                parts.append(g)
            rdf = pd.concat(parts, ignore_index=True)
            rs = _zscore(rdf["R_bar"].to_numpy(float))
            if rs is None or set(rdf["variant"]) != {"base", "fine-tuned"}:
                continue
            rdf["R_sc"] = rs
            if "invN_sc" in df:
                iv = _zscore(1.0 / rdf["N_bar"].to_numpy(float))
                if iv is None:
                    continue
                rdf["invN_sc"] = iv
            try:
                bb, ee, _ = _fit(rdf, formula)
            except Exception:
                continue
            if bb != 0 and math.isfinite(bb) and math.isfinite(ee):
                reps[i] = (bb + ee) / bb
        fin = reps[np.isfinite(reps)]
        alpha = (1.0 - cfg.bootstrap.confidence) / 2.0
        out.update(num_replicates=b, num_finite_replicates=int(fin.size))
        if fin.size >= 2:
            lo, hi = np.percentile(fin, [100 * alpha, 100 * (1 - alpha)])
            out.update(ratio_ci=[float(lo), float(hi)], ratio_se=float(np.std(fin, ddof=1)))
    return out
