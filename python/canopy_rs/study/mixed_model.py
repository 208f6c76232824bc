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
    if x.size < 2 or np.ptp(x) == 0:  # equal values (their float mean may leave an SD of 1e-18, not 0)
        return None
    sd = float(np.std(x, ddof=1))
    return None if not (sd > 0 and math.isfinite(sd)) else (x - x.mean()) / sd


_FT_TERM = "C(variant, Treatment('base'))[T.fine-tuned]"


def _design(df: Any, formula: str) -> tuple[int, int, list]:
    """(rank, number of columns, column names) of the fixed-effects design matrix of ``formula`` on ``df``
    (built by statsmodels as the fit would build it; nothing is fitted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = smf.mixedlm(formula, df, groups=df["prompt_uid"])
    x = np.asarray(model.exog, dtype=float)
    return int(np.linalg.matrix_rank(x)), int(x.shape[1]), list(model.exog_names)


def _fit(df: Any, formula: str) -> tuple[float, float, Any]:
    """(base slope beta, fine-tuned change eta, fitted result) of the MixedLM with a random intercept per
    prompt_uid (REML)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence / boundary warnings on small panels; reported via .converged
        fit = smf.mixedlm(formula, df, groups=df["prompt_uid"]).fit(reml=True)
    return float(fit.params["R_sc"]), float(fit.params[f"R_sc:{_FT_TERM}"]), fit


# Optional terms, dropped in this order when they make the design singular (the slope terms are the model).
_WHY = {
    "invN_sc": "the length term 1/N̄ (and its interaction with the variant)",
    "C(family)": "the family term",
    "C(task)": "the task term",
}


def _full_rank_formula(df: Any, terms: list) -> tuple[list, list, Optional[str]]:
    """The terms whose design has full column rank: optional terms (length, family, task, in this order) are
    dropped while the design is singular. Returns (terms kept, [{term, why}] dropped, reason when even the
    slope terms alone are singular)."""
    dropped: list = []
    terms = list(terms)
    while True:
        rank, cols, _ = _design(df, "D ~ " + " + ".join(terms))
        if rank == cols:
            return terms, dropped, None
        optional = [t for t in terms if any(t.startswith(k) for k in _WHY)]
        if not optional:
            return terms, dropped, (f"the design matrix of the slope terms alone has rank {rank} in {cols} "
                                    "columns (R̄ does not vary within a variant)")
        t = optional[0]
        rest = [x for x in terms if x != t]
        r2, c2, _ = _design(df, "D ~ " + " + ".join(rest))
        key = next(k for k in _WHY if t.startswith(k))
        dropped.append({"term": t, "why": (
            f"{_WHY[key]} made the fixed-effects design singular: rank {rank} in {cols} columns, so its "
            f"columns are linear combinations of the others"
            + (" (N̄ hardly varies: most rollouts reach T_max)" if key == "invN_sc" else "")
            + f"; without it: rank {r2} in {c2}")})
        terms = rest


def _slope_se(fit: Any) -> tuple[float, float]:
    """Standard errors of beta and of beta + eta from the fit's covariance of the fixed effects."""
    try:
        cov = fit.cov_params()
        a, b = "R_sc", f"R_sc:{_FT_TERM}"
        vb = float(cov.loc[a, a])
        vs = vb + float(cov.loc[b, b]) + 2.0 * float(cov.loc[a, b])
    except Exception:
        return math.nan, math.nan
    return (math.sqrt(vb) if vb >= 0 else math.nan), (math.sqrt(vs) if vs >= 0 else math.nan)


def interaction_model(cfg: StudyConfig, panel: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The interaction model (docs/definitions.md#interaction-model) with statsmodels' MixedLM:

        D ~ R_sc * variant + invN_sc * variant [+ C(task)] [+ C(family)],  random intercept per prompt_uid

    R_sc = z-scored R_bar, invN_sc = z-scored 1/N_bar (the reference code's length term; dropped when N_bar
    does not vary), base the reference variant; task / family terms only when there is more than one.
    The design's rank is checked before fitting: an optional term (length, family, task) that makes it
    singular is dropped and ``dropped_terms`` says which and why.
    Reports the base slope beta, the fine-tuned slope beta + eta (each with its SE) and their ratio
    (beta + eta) / beta with a percentile CI from ``bootstrap.regression_replicates`` replicates that resample
    prompt_uids with replacement (each draw keeps all models' rows of that prompt, so both variants see the
    same prompts; a prompt drawn twice enters as two groups). Each refit uses the main fit's formula and is
    counted as converged, not converged, failed (raised) or skipped (singular design, or a draw where R_bar
    does not vary or a variant is missing); the CI and SE of the ratio come from converged refits only."""
    out: dict[str, Any] = {"model": "statsmodels MixedLM (REML), random intercept per prompt_uid",
                           "base_slope": math.nan, "finetuned_slope": math.nan, "eta": math.nan,
                           "base_slope_se": math.nan, "finetuned_slope_se": math.nan,
                           "eta_pvalue": math.nan, "ratio": math.nan, "ratio_ci": [math.nan, math.nan],
                           "ratio_se": math.nan, "num_replicates": 0, "num_finite_replicates": 0,
                           "replicates": {"converged": 0, "not_converged": 0, "failed": 0, "skipped": 0,
                                          "failed_reasons": {}, "skipped_reasons": {}},
                           "dropped_terms": []}
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
    terms = ["R_sc * C(variant, Treatment('base'))"]
    inv_n = _zscore(1.0 / df["N_bar"].to_numpy(float))
    if inv_n is not None:
        df["invN_sc"] = inv_n
        terms.append("invN_sc * C(variant, Treatment('base'))")
    else:
        out["dropped_terms"].append({"term": "invN_sc * C(variant, Treatment('base'))",
                                     "why": "N̄ is the same in every panel row (every rollout reaches T_max), so "
                                            "1/N̄ has no variance to z-score"})
    if df["task"].nunique() > 1:
        terms.append("C(task)")
    if df["family"].nunique() > 1:
        terms.append("C(family)")
    out.update(num_prompts=int(df["prompt_uid"].nunique()),
               R_bar_mean=float(df["R_bar"].mean()), R_bar_sd=float(df["R_bar"].std(ddof=1)))
    terms, dropped, singular = _full_rank_formula(df, terms)
    out["dropped_terms"].extend(dropped)
    formula = "D ~ " + " + ".join(terms)
    out["formula"] = formula
    if singular:
        out["skipped"] = f"not fitted: {singular}"
        return out
    if not any(t.startswith("invN_sc") for t in terms) and "invN_sc" in df:
        df = df.drop(columns="invN_sc")
    try:
        beta, eta, fit = _fit(df, formula)
    except Exception as e:
        out["skipped"] = f"MixedLM fit failed: {type(e).__name__}: {e}"
        return out
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (beta + eta) / beta if beta != 0 else math.nan
    se_b, se_f = _slope_se(fit)
    coefficients = [{"term": k, "estimate": float(fit.params[k]), "se": float(fit.bse.get(k, math.nan)),
                     "pvalue": float(fit.pvalues.get(k, math.nan))} for k in fit.fe_params.index]
    out.update(
        base_slope=beta, finetuned_slope=beta + eta, eta=eta,
        eta_pvalue=float(fit.pvalues.get(f"R_sc:{_FT_TERM}", math.nan)), ratio=ratio,
        base_slope_se=float(fit.bse.get("R_sc", math.nan)), finetuned_slope_se=se_f,
        base_slope_pvalue=float(fit.pvalues.get("R_sc", math.nan)),
        converged=bool(getattr(fit, "converged", True)),
        group_variance=float(np.asarray(fit.cov_re)[0, 0]) if fit.cov_re is not None else math.nan,
        coefficients=coefficients,
        nan_se_terms=[c["term"] for c in coefficients if not math.isfinite(c["se"])],
    )
    # Prompt bootstrap of the ratio (refits; the z-scores are recomputed on each replicate's panel).
    b = cfg.bootstrap.regression_replicates
    if b > 0:
        rep = out["replicates"]

        def count(kind: str, why: str) -> None:
            rep[kind] += 1
            reasons = rep[f"{kind}_reasons"]
            reasons[why] = reasons.get(why, 0) + 1

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
            if set(rdf["variant"]) != {"base", "fine-tuned"}:
                count("skipped", "the draw lacks a variant")
                continue
            if rs is None:
                count("skipped", "R̄ does not vary in the draw")
                continue
            rdf["R_sc"] = rs
            if "invN_sc" in df:
                iv = _zscore(1.0 / rdf["N_bar"].to_numpy(float))
                if iv is None:
                    count("skipped", "N̄ does not vary in the draw")
                    continue
                rdf["invN_sc"] = iv
            try:
                rank, cols, _ = _design(rdf, formula)
            except Exception as e:
                count("failed", type(e).__name__)
                continue
            if rank < cols:
                count("skipped", "singular design in the draw")
                continue
            try:
                bb, ee, rfit = _fit(rdf, formula)
            except Exception as e:
                count("failed", f"{type(e).__name__}: {e}")
                continue
            if not bool(getattr(rfit, "converged", True)):
                rep["not_converged"] += 1
                continue
            if bb != 0 and math.isfinite(bb) and math.isfinite(ee):
                rep["converged"] += 1
                reps[i] = (bb + ee) / bb
            else:
                count("skipped", "the draw's base slope is 0")
        fin = reps[np.isfinite(reps)]
        alpha = (1.0 - cfg.bootstrap.confidence) / 2.0
        out.update(num_replicates=b, num_finite_replicates=int(fin.size))
        if fin.size >= 2:
            lo, hi = np.percentile(fin, [100 * alpha, 100 * (1 - alpha)])
            out.update(ratio_ci=[float(lo), float(hi)], ratio_se=float(np.std(fin, ddof=1)))
    return out
